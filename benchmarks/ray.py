"""The cluster engine against the local engine: eval throughput and session round trip.

Measured in one run, on a local Ray cluster of 2 nodes with 1 CPU each
(``ray.cluster_utils.Cluster``), so that both sides have the same cores:

- **eval throughput**: ``sandkernel eval``'s harness (:func:`evaluate_samples`)
  on HumanEval's 164 canonical solutions five times over (820 samples), once
  through a :class:`~sandkernel.ray.ClusterEngine` (one sandboxed fork server
  per node, samples sent to the hosts in chunks) and once on a local
  :class:`~sandkernel.batch.BatchPool` of 2 fork servers (the baseline),
  alternating over ``repeats`` rounds; the median round is reported. Every
  variant must give every sample the same verdict.
- **session round trip**: ``await session.run("1")`` in a session of each
  engine, after warm-ups, one call at a time; the cluster's added latency is
  the difference of the medians.

Both engines run while the Ray cluster is up, so both share the machine with
Ray's own daemons. Targets: at most 1 ms added per round trip, and at least
90% of the local eval throughput.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_info, ratio, summary
from sandkernel import Engine
from sandkernel.batch import BatchPool
from sandkernel.evaluate import evaluate_samples, load_problems
from sandkernel.sandbox import SandboxHost, mounts_under

NODES = 2
CPUS_PER_NODE = 1
TIMEOUT_S = 3.0
FULL = {"copies": 5, "repeats": 3, "round_trips": 300}
QUICK = {"copies": 1, "repeats": 1, "round_trips": 30}


def _samples(problems: dict[str, Any], copies: int) -> list[tuple[int, dict[str, Any]]]:
    samples = [
        {"task_id": p.task_id, "completion": p.reference or ""} for p in problems.values()
    ] * copies
    return list(enumerate(samples, start=1))


async def _eval(runner: Any, problems: dict[str, Any], copies: int) -> tuple[float, list[str]]:
    """Samples per second of one evaluation, and its verdicts in the samples' order."""
    out = io.StringIO()
    result = await evaluate_samples(
        problems, _samples(problems, copies), runner, timeout_s=TIMEOUT_S, ks=[1], out=out
    )
    verdicts = [json.loads(line)["result"] for line in out.getvalue().splitlines()]
    return result.samples_per_s, verdicts


async def _round_trips(session: Any, count: int) -> list[float]:
    for _ in range(5):
        await session.run("1")
    times = []
    for _ in range(count):
        started = time.perf_counter()
        result = await session.run("1")
        times.append((time.perf_counter() - started) * 1000)
        assert result.text == "1", result
    return times


async def _measure(plan: dict[str, int], root: Path, stores: Path, address: str) -> dict[str, Any]:
    from sandkernel.ray import ClusterEngine

    problems = load_problems("humaneval")
    raw: dict[str, Any] = {"cluster_eval": [], "local_eval": []}
    cluster = ClusterEngine(
        address,
        namespace=f"sandkernel-bench-{secrets.token_hex(4)}",
        runtime_dir=str(root / "{node}"),
        store_dir=str(stores / "{node}"),
        pool_size=1,
        prewarm_imports=(),
        min_hosts=NODES,
    )
    local = Engine(
        pool_size=1,
        prewarm_imports=(),
        runtime_dir=root / "local",
        store_dir=stores / "local",
        handle_sigterm=False,
    )
    reference: list[str] | None = None
    async with cluster, local:
        with SandboxHost(root / "batch", sweep=False) as host:
            async with BatchPool(host, workers=NODES * CPUS_PER_NODE) as pool:
                # Warm-up: every fork server of both sides started and used once.
                await _eval(cluster, problems, 1)
                await _eval(pool, problems, 1)
                for _ in range(plan["repeats"]):
                    for name, runner in (("cluster_eval", cluster), ("local_eval", pool)):
                        rate, verdicts = await _eval(runner, problems, plan["copies"])
                        reference = reference or verdicts
                        assert verdicts == reference, f"{name} gave other verdicts"
                        raw[name].append(rate)
        raw["batch_workers"] = {"cluster": cluster.batch_slots(), "local": NODES * CPUS_PER_NODE}
        remote = await cluster.session()
        here = await local.session()
        raw["local_rtt_ms"] = await _round_trips(here, plan["round_trips"])
        raw["cluster_rtt_ms"] = await _round_trips(remote, plan["round_trips"])
        raw["local_rtt_ms"] += await _round_trips(here, plan["round_trips"])
        raw["cluster_rtt_ms"] += await _round_trips(remote, plan["round_trips"])
    assert reference is not None and set(reference) == {"passed"}
    return raw


def run(*, quick: bool) -> dict[str, Any]:
    """Measure the cluster engine and the local engine in one run."""
    import ray
    from ray.cluster_utils import Cluster

    plan = QUICK if quick else FULL
    machine = machine_info()
    root = Path("/run") / f"sk-bench-ray-{os.getpid()}"
    node_args: dict[str, Any] = {"num_cpus": CPUS_PER_NODE, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        for _ in range(NODES - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        with tempfile.TemporaryDirectory(prefix="sk-bench-ray-") as stores:
            raw = asyncio.run(_measure(plan, root, Path(stores), cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
        # The hosts' guardians sweep their kernels once the hosts are gone.
        deadline = time.monotonic() + 15
        while mounts_under(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not mounts_under(root):
            shutil.rmtree(root, ignore_errors=True)
    cluster_eval = sorted(raw["cluster_eval"])[len(raw["cluster_eval"]) // 2]
    local_eval = sorted(raw["local_eval"])[len(raw["local_eval"]) // 2]
    remote, here = summary(raw["cluster_rtt_ms"], digits=3), summary(raw["local_rtt_ms"], digits=3)
    added = round(remote["median"] - here["median"], 3)
    samples = 164 * plan["copies"]
    rows: list[list[Any]] = [
        ["eval throughput (samples/s, median round)", round(cluster_eval, 1), round(local_eval, 1),
         f"{ratio(cluster_eval, local_eval)}× of local"],
        ["session round trip p50 (ms)", remote["median"], here["median"], f"+{added} ms"],
        ["session round trip p99 (ms)", remote["p99"], here["p99"],
         f"+{round(remote['p99'] - here['p99'], 3)} ms"],
    ]  # fmt: skip
    return {
        "title": "cluster engine (Ray, 2 nodes x 1 CPU) vs local engine, same cores",
        "machine": machine,
        "quick": quick,
        "table": {"columns": ["metric", "cluster engine", "local engine", "note"], "rows": rows},
        "notes": [
            f"eval: HumanEval canonical solutions x{plan['copies']} ({samples} samples), "
            f"{plan['repeats']} round(s) alternating, after one warm-up round each; "
            f"batch workers: {raw['batch_workers']}; every verdict equal on both sides.",
            f"round trip: `await session.run('1')`, {2 * plan['round_trips']} calls per engine "
            "in two alternating blocks, after 5 warm-ups; pool of 1, no prewarm imports.",
            "Both engines run while the Ray cluster is up (its daemons share the cores).",
            "Targets: <= 1 ms added per round trip; >= 90% of local eval throughput.",
        ],
        "raw": raw,
    }
