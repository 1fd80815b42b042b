"""The ``--ray`` pieces of the ``sandkernel`` command.

* ``sandkernel doctor --ray ADDRESS``: :func:`doctor_ray` runs the local
  doctor on every node (a task pinned to each) and prints what each node has
  and lacks;
* ``sandkernel serve --ray ADDRESS``: :func:`make_cluster_engine` gives the
  daemon a :class:`~sandkernel.ray.ClusterEngine` in place of an ``Engine``;
* ``sandkernel eval --ray auto|ADDRESS`` builds its ``ClusterEngine`` itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sandkernel.config import EngineConfig
from sandkernel.ray.cluster import ClusterEngine, alive_nodes


def make_cluster_engine(
    address: str | None, config: EngineConfig | None = None, **cluster_options: Any
) -> ClusterEngine:
    """A cluster engine for ``address`` whose nodes' engines follow ``config`` (not started).

    ``config.runtime_dir`` and ``config.store_dir`` may use ``{node}`` (the
    node's tag); ``cluster_options`` are the other arguments of
    :class:`~sandkernel.ray.ClusterEngine` (``namespace``, ``node_resource``,
    ``batch_slots``...), or engine settings applied over ``config``.
    """
    return ClusterEngine(address or "auto", config, **cluster_options)


# -- doctor ----------------------------------------------------------------------------


def _node_doctor(python: str | None) -> dict[str, Any]:
    """Run on one node: the local doctor's JSON report, with who ran it."""
    from sandkernel import __version__
    from sandkernel.doctor import run_doctor

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_doctor(as_json=True, python=python)
    try:
        report: dict[str, Any] = json.loads(out.getvalue())
    except ValueError:
        report = {"ok": False, "checks": [{"name": "doctor", "ok": False, "critical": True,
                  "detail": out.getvalue()[-500:], "fix": None}]}  # fmt: skip
    report["ok"] = bool(report.get("ok")) and code == 0
    report["node"] = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "sandkernel": __version__,
        "ray": ray.__version__,
    }
    return report


def _failed_report(why: str) -> dict[str, Any]:
    return {
        "ok": False,
        "checks": [{"name": "sandkernel", "ok": False, "critical": True, "detail": why,
                    "fix": "install sandkernel with its ray extra in the nodes' Python "
                           "(the same version as here), then run this again"}],
        "node": {},
    }  # fmt: skip


class RayUnreachable(ConnectionError):
    """``ray.init`` could not connect: nothing answers at the address, or no cluster was found."""


#: How long the doctor waits for the cluster's address to take a TCP connection.
_CONNECT_TIMEOUT_S = 10.0


def _endpoint(address: str) -> tuple[str, int] | None:
    """The host and port ``ray.init(address)`` connects to; None if Ray finds it itself."""
    if address == "auto":
        # What ray.init reads for "auto"; without it Ray looks for a local cluster.
        address = os.environ.get("RAY_ADDRESS", "")
    if "://" in address and not address.startswith("ray://"):
        return None  # another scheme's client: its own way to connect
    try:
        parts = urlsplit("//" + address.removeprefix("ray://"))
        port = parts.port
    except ValueError:
        return None  # not host:port: ray.init says what is wrong with it
    if parts.hostname is None or port is None:
        return None
    return parts.hostname, port


def _connect(address: str, *, timeout_s: float = _CONNECT_TIMEOUT_S) -> None:
    """``ray.init(address)``, or :class:`RayUnreachable` within ``timeout_s`` if nothing answers.

    ray.init retries an address where nothing listens for many minutes,
    printing only its own lines: a TCP connection first says so at once.
    """
    endpoint = _endpoint(address)
    where = (
        f"{address} ({endpoint[0]}:{endpoint[1]})" if address == "auto" and endpoint else address
    )
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=timeout_s).close()
        except OSError as exc:
            raise RayUnreachable(f"cannot reach Ray at {where}: {exc}") from None
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise RayUnreachable(f"cannot reach Ray at {where}: {exc}") from None


def diagnose_cluster(
    address: str | None, *, python: str | None = None, timeout_s: float = 600.0
) -> dict[str, dict[str, Any]]:
    """Run the local doctor on every alive node: node id -> report (ok, checks, node).

    Raises:
        RayUnreachable: not connected to Ray yet, and it cannot be reached at ``address``.
    """
    owns = not ray.is_initialized()
    if owns:
        _connect(address or "auto")
    try:
        task = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(_node_doctor)
        nodes = alive_nodes()
        refs = {
            n["NodeID"]: task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(python)
            for n in nodes
        }
        deadline = time.monotonic() + timeout_s
        reports: dict[str, dict[str, Any]] = {}
        for node in nodes:
            node_id = node["NodeID"]
            try:
                remaining = max(1.0, deadline - time.monotonic())
                report = ray.get(refs[node_id], timeout=remaining)
            except ray.exceptions.GetTimeoutError:
                report = _failed_report(f"the doctor did not finish within {timeout_s:g} s")
            except ray.exceptions.RayError as exc:
                lines = [line for line in str(exc).splitlines() if line.strip()]
                report = _failed_report(lines[-1] if lines else type(exc).__name__)
            report.setdefault("node", {})["address"] = node.get("NodeManagerAddress", "")
            reports[node_id] = report
        return reports
    finally:
        if owns:
            ray.shutdown()


def doctor_ray(address: str | None, *, as_json: bool = False, python: str | None = None) -> int:
    """``sandkernel doctor --ray ADDRESS``: print each node's report; 0 if every node is ready."""
    try:
        reports = diagnose_cluster(address, python=python)
    except RayUnreachable as exc:
        print(f"sandkernel doctor --ray: {exc}", file=sys.stderr)
        return 1
    ready = [n for n, r in reports.items() if r["ok"]]
    if as_json:
        print(json.dumps({"ok": len(ready) == len(reports) > 0, "nodes": reports}, indent=2))
    else:
        print(f"sandkernel doctor --ray: {len(reports)} node(s)")
        for node_id, report in reports.items():
            info = report.get("node", {})
            where = ", ".join(str(info[k]) for k in ("hostname", "address") if info.get(k))
            versions = ", ".join(
                f"{k} {info[k]}" for k in ("python", "sandkernel", "ray") if info.get(k)
            )
            mark = "ready" if report["ok"] else "NOT READY"
            print(f"\nnode {node_id} ({where}) {mark}" + (f" [{versions}]" if versions else ""))
            for check in report.get("checks", []):
                ok = check.get("ok")
                label = "ok  " if ok else ("FAIL" if check.get("critical", True) else "warn")
                print(f"  [{label}] {check.get('name', ''):18} {check.get('detail', '')}")
                if not ok and check.get("fix"):
                    print(f"         {'':18} fix: {check['fix']}")
        print(f"\n{len(ready)} of {len(reports)} node(s) can run sandkernel hosts")
    if not reports:
        print("no alive node in the cluster", file=sys.stderr)
        return 1
    return 0 if len(ready) == len(reports) else 1
