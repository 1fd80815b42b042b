"""Shared by the Ray tests: a local multi-node cluster and leak checks by owner."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from sandkernel.ray import HostInfo
from sandkernel.sandbox import CgroupLayout, iter_sandkernel_cgroups, mounts_under

#: Nodes notice a dead peer within ~1.5 s (the defaults take 30 s).
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "include_dashboard": False}


@dataclass
class LocalCluster:
    """A Ray cluster of several nodes on this machine, and every host seen on it."""

    namespace: str
    root: Path  # runtime folders: <root>/<node tag>
    stores: Path  # file stores: <stores>/<node tag>
    cluster: Cluster | None = None
    hosts_seen: dict[str, HostInfo] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.cluster is not None

    def start(self, nodes: int = 3) -> None:
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE_ARGS, "_system_config": SYSTEM_CONFIG},
        )
        for _ in range(nodes - 1):
            self.cluster.add_node(**NODE_ARGS)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace=self.namespace, log_to_driver=False)

    def shutdown(self) -> None:
        if self.cluster is not None:
            ray.shutdown()
            self.cluster.shutdown()
            self.cluster = None

    def engine_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """ClusterEngine arguments: per-node folders, a small pool, no prewarm imports."""
        kwargs: dict[str, Any] = {
            "namespace": self.namespace,
            "runtime_dir": str(self.root / "{node}"),
            "store_dir": str(self.stores / "{node}"),
            "pool_size": 1,
            "prewarm_imports": (),
            "refresh_interval_s": 0.5,
            # Generous: the tests start many kernels at once on few cores.
            "acquire_timeout_s": 300.0,
        }
        kwargs.update(overrides)
        return kwargs

    def remember(self, hosts: list[HostInfo]) -> None:
        for info in hosts:
            self.hosts_seen[info.owner] = info

    def worker_nodes(self) -> list[Any]:
        assert self.cluster is not None
        return list(self.cluster.worker_nodes)


def processes_of(owner: str, runtime_dir: str) -> list[str]:
    """Processes in a cgroup of ``owner``'s kernels, or naming its runtime folder."""
    found = []
    marker = f"/sandkernel/{owner}-"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cgroups or f"{runtime_dir}/" in cmdline:
                found.append(f"{pid}: {cmdline[:120]}")
    return found


def leftovers_of(info: HostInfo) -> list[str]:
    """What of a host's kernels is still on the machine: processes, cgroups, mounts."""
    found = [f"process {p}" for p in processes_of(info.owner, info.runtime_dir)]
    found += [
        f"cgroup {c}"
        for c in iter_sandkernel_cgroups(CgroupLayout.detect())
        if c.name.startswith(f"{info.owner}-")
    ]
    found += [f"mount {m}" for m in mounts_under(Path(info.runtime_dir))]
    return found


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    """Poll machine state (processes, cgroups) that has no event to wait on."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True


def remove_tree(path: Path) -> None:
    """Remove a test folder, unless something is still mounted in it."""
    if path.exists() and not mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)
