"""Soak: well-behaved sessions beside misbehaving ones, for a set time.

``python -m benchmarks.soak --minutes N`` (or ``python -m benchmarks --only soak``,
1 minute with ``--quick``, else 10).

Two phases on one engine whose policy has small limits:

- **baseline**: only the *steady* sessions run, cell after cell, each cell
  adding a random number to a running total and returning it;
- **soak**: the steady sessions go on while *chaos* sessions run a random mix
  of the same normal cells and faults: the kernel SIGKILLed from the host in
  the middle of a cell, an out-of-memory, a timeout that an interrupt ends, a
  timeout that ignores interrupts, ``os._exit``, a segfault. Every
  ``restart_every_s`` the engine itself is restarted under running cells.

It reports the cells run, the faults injected, **wrong results** (a normal
cell whose value is not the expected total, or that failed although no fault
touched its session: target 0), faults the result misreported, **leaks**
after every engine restart and at the end (processes, cgroups, mounts,
folders, descriptors, against the snapshot taken before the first engine:
target 0), and the p99 latency of the steady sessions' cells during the soak
against the baseline's, as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_info, ratio, summary
from sandkernel import leaks
from sandkernel.engine import Engine
from sandkernel.errors import KernelStartFailed, PoolExhausted
from sandkernel.policy import Policy
from sandkernel.results import ExecutionResult
from sandkernel.session import Session

POLICY = Policy(
    name="soak",
    memory_mb=256,
    cpus=0.5,
    pids_max=64,
    wall_timeout_s=10,
    interrupt_grace_s=1,
    workspace_mb=64,
    tmp_mb=32,
    shm_mb=16,
)

#: fault -> (cell, timeout_s, statuses that report it correctly)
FAULTS: dict[str, tuple[str, float, frozenset[str]]] = {
    "oom": ("x = []\nwhile True:\n    x.append(bytearray(16 << 20))", 30, frozenset({"oom"})),
    "timeout": ("while True:\n    pass", 1.0, frozenset({"timeout"})),
    "timeout_ignored": (
        "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')",
        1.0,
        frozenset({"timeout"}),
    ),
    "exit": ("import os\nos._exit(3)", 30, frozenset({"dead"})),
    "segfault": ("import ctypes\nctypes.string_at(0)", 30, frozenset({"dead"})),
    "sigkill": ("import time\ntime.sleep(5)", 30, frozenset({"killed", "dead"})),
}


@dataclass
class Tally:
    cells: int = 0
    normal_cells: int = 0
    wrong: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    misreported: list[str] = field(default_factory=list)
    restarts: int = 0
    interrupted_by_restart: int = 0
    #: a session or a fresh kernel could not be had (PoolExhausted, KernelStartFailed)
    unavailable: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    baseline_ms: list[float] = field(default_factory=list)
    soak_ms: list[float] = field(default_factory=list)


class _Total:
    """A session's running total as the client expects it."""

    def __init__(self) -> None:
        self.value = 0

    @staticmethod
    def cell(rng: random.Random) -> tuple[str, int]:
        k = rng.randint(1, 1_000_000)
        return f"total = globals().get('total', 0) + {k}\ntotal", k


def _kill_kernel_from_outside(session: Session) -> None:
    """SIGKILL the ipykernel process of the session (found through its cgroup)."""
    kernel = session.kernel
    if kernel is None:
        return
    for pid in kernel.cgroup.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        # The kernel, not its init (which runs launch.py too, for a cold kernel):
        # the kernel's parent is its sandbox's init, PID 1 in the sandbox.
        if b"launch.py" in cmdline and "\nNSpid:" in parent and _nspid(parent)[-1] == "1":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return


def _nspid(status: str) -> list[str]:
    return status.split("\nNSpid:", 1)[1].split("\n", 1)[0].split()


async def _normal(
    session: Session, total: _Total, rng: random.Random, tally: Tally, *, steady: bool
) -> float:
    """One normal cell; checks its value. Returns its latency in ms."""
    code, k = total.cell(rng)
    started = time.perf_counter()
    result = await session.run(code, timeout_s=60, restart=not steady)
    elapsed = (time.perf_counter() - started) * 1000
    tally.cells += 1
    tally.normal_cells += 1
    # After a fault of its own, a chaos session continues on a fresh kernel; a
    # steady session has no faults, so a lost state is a neighbour's doing: wrong.
    expected = k if result.state_lost and not steady else total.value + k
    if result.status != "ok" or result.text != str(expected) or (steady and result.state_lost):
        tally.wrong.append(f"{session.id}: {result.status} {result.text!r}, expected {expected}")
        total.value = 0
    else:
        total.value = expected
    return elapsed


async def _fault(session: Session, name: str, total: _Total, tally: Tally) -> None:
    code, timeout, expected = FAULTS[name]
    if name == "sigkill":
        asleep = asyncio.Event()

        def watch(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                asleep.set()

        code = "print('asleep', flush=True)\n" + code
        running = asyncio.ensure_future(
            session.run(code, timeout_s=timeout, restart=True, on_output=watch)
        )
        waiting = asyncio.ensure_future(asleep.wait())
        try:
            await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if asleep.is_set():
                _kill_kernel_from_outside(session)  # mid-cell
            result: ExecutionResult = await running
        finally:
            # Cancelled with its engine (a restart): no task left behind unawaited.
            for task in (running, waiting):
                task.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)
    else:
        result = await session.run(code, timeout_s=timeout, restart=True)
    tally.cells += 1
    tally.faults[name] += 1
    if result.status not in expected:
        tally.misreported.append(f"{name}: {result.status} ({result.message})")
    total.value = 0  # whether the kernel survived or not, start the total again
    if result.kernel_alive and not result.state_lost:
        await session.run("total = 0", timeout_s=60)


async def _session(engine: Engine, tally: Tally) -> Session:
    while True:
        try:
            return await engine.session()
        except (PoolExhausted, KernelStartFailed) as exc:
            tally.unavailable.append(f"session(): {str(exc)[:160]}")


async def _steady(engine: Engine, tally: Tally, samples: list[float], seed: int) -> None:
    rng = random.Random(seed)
    session = await _session(engine, tally)
    total = _Total()
    while True:
        samples.append(await _normal(session, total, rng, tally, steady=True))


async def _chaos(engine: Engine, tally: Tally, seed: int, fault_share: float) -> None:
    rng = random.Random(seed)
    session = await _session(engine, tally)
    total = _Total()
    while True:
        try:
            if rng.random() < fault_share:
                await _fault(session, rng.choice(sorted(FAULTS)), total, tally)
            else:
                await _normal(session, total, rng, tally, steady=False)
        except (PoolExhausted, KernelStartFailed) as exc:
            # Its kernel died and no fresh one could be had: not a wrong result,
            # an unavailable one. The next cell tries again.
            tally.unavailable.append(f"run(restart=True): {str(exc)[:160]}")
            total.value = 0


def _engine(store: Path, runtime: Path) -> Engine:
    return Engine(
        policy=POLICY,
        pool_size=2,
        max_concurrent_starts=2,
        prewarm_imports=(),
        store_dir=store,
        runtime_dir=runtime,
        handle_sigterm=False,
        acquire_timeout_s=120,
    )


Workers = Callable[[Engine], list["asyncio.Task[None]"]]


async def _phase(
    workers: Workers,
    seconds: float,
    *,
    store: Path,
    runtime: Path,
    baseline: leaks.LeakSnapshot,
    tally: Tally,
    restart_every_s: float,
) -> None:
    """Run ``workers(engine)`` for ``seconds``; restart the engine every ``restart_every_s``.

    A restart cancels the running cells and closes the engine under them;
    then nothing of it may be left (compared with ``baseline``).
    """
    end = time.monotonic() + seconds
    first = True
    while time.monotonic() < end:
        if not first:
            tally.restarts += 1
        first = False
        engine = _engine(store, runtime)
        await engine.start()
        tasks = workers(engine)
        try:
            until = min(end, time.monotonic() + restart_every_s)
            done, _ = await asyncio.wait(tasks, timeout=max(0.0, until - time.monotonic()))
            for task in done:  # a worker only stops when something raised
                tally.wrong.append(f"worker stopped: {str(task.exception())[:200]}")
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            tally.interrupted_by_restart += sum(
                isinstance(r, asyncio.CancelledError) for r in results
            )
            await engine.aclose()
        found = await asyncio.to_thread(
            leaks.wait_for_baseline,
            baseline,
            roots=[runtime],
            owner_prefix=f"{os.getpid()}-",
            rss_slack_bytes=None,
        )
        tally.leaks += found


async def soak(
    *,
    seconds: float,
    baseline_s: float | None = None,
    steady: int = 2,
    chaos: int = 3,
    fault_share: float = 0.35,
    restart_every_s: float = 120.0,
    seed: int = 1,
) -> dict[str, Any]:
    """Run the baseline, then the soak for ``seconds``; return the figures."""
    tally = Tally()
    baseline_s = baseline_s if baseline_s is not None else min(60.0, max(10.0, seconds / 10))
    with tempfile.TemporaryDirectory(prefix="sk-soak-") as tmp:
        store, runtime = Path(tmp) / "store", Path(tmp) / "run"
        baseline = leaks.snapshot(roots=[runtime], owner_prefix=f"{os.getpid()}-")
        started = time.monotonic()

        def steady_workers(engine: Engine, samples: list[float]) -> list[asyncio.Task[None]]:
            return [
                asyncio.ensure_future(_steady(engine, tally, samples, seed + i))
                for i in range(steady)
            ]

        def soak_workers(engine: Engine) -> list[asyncio.Task[None]]:
            return steady_workers(engine, tally.soak_ms) + [
                asyncio.ensure_future(_chaos(engine, tally, seed + 100 + i, fault_share))
                for i in range(chaos)
            ]

        common = {"store": store, "runtime": runtime, "baseline": baseline, "tally": tally}
        await _phase(
            lambda e: steady_workers(e, tally.baseline_ms), baseline_s,
            restart_every_s=baseline_s, **common,
        )  # fmt: skip
        await _phase(soak_workers, seconds, restart_every_s=restart_every_s, **common)
        final = leaks.snapshot(roots=[runtime], owner_prefix=f"{os.getpid()}-")
        tally.leaks += final.leaks_since(baseline, rss_slack_bytes=None)
        elapsed = time.monotonic() - started
    base_p99 = summary(tally.baseline_ms)["p99"] if tally.baseline_ms else None
    soak_p99 = summary(tally.soak_ms)["p99"] if tally.soak_ms else None
    return {
        "seconds": round(elapsed, 1),
        "cells": tally.cells,
        "normal_cells": tally.normal_cells,
        "faults": dict(tally.faults),
        "faults_injected": sum(tally.faults.values()) + tally.restarts,
        "engine_restarts": tally.restarts,
        "cells_cut_by_restarts": tally.interrupted_by_restart,
        "unavailable": len(tally.unavailable),
        "unavailable_examples": tally.unavailable[:5],
        "wrong_results": len(tally.wrong),
        "wrong_examples": tally.wrong[:10],
        "misreported_faults": len(tally.misreported),
        "misreported_examples": tally.misreported[:10],
        "leaks": len(tally.leaks),
        "leak_examples": tally.leaks[:10],
        "rss_mb_end": final.rss_bytes >> 20,
        "baseline_latency_ms": summary(tally.baseline_ms) if tally.baseline_ms else None,
        "soak_latency_ms": summary(tally.soak_ms) if tally.soak_ms else None,
        "p99_ratio": ratio(soak_p99, base_p99) if base_p99 and soak_p99 else None,
    }


def run(*, quick: bool, minutes: float | None = None) -> dict[str, Any]:
    """One soak: 1 minute with ``quick``, else 10 (or ``minutes``)."""
    minutes = minutes if minutes is not None else (1.0 if quick else 10.0)
    machine = machine_info()
    raw = asyncio.run(soak(seconds=minutes * 60, restart_every_s=max(30.0, minutes * 60 / 4)))
    base, under = raw["baseline_latency_ms"] or {}, raw["soak_latency_ms"] or {}
    rows: list[list[Any]] = [
        ["cells run (normal)", f"{raw['cells']} ({raw['normal_cells']})", "", ""],
        ["faults injected", raw["faults_injected"],
         ", ".join(f"{k} {v}" for k, v in sorted(raw["faults"].items()))
         + f", engine restarts {raw['engine_restarts']}", ""],
        ["wrong results", raw["wrong_results"], "target 0", ""],
        ["faults misreported", raw["misreported_faults"], "target 0", ""],
        ["no kernel to be had (PoolExhausted, KernelStartFailed)", raw["unavailable"], "", ""],
        ["leaks (after each restart and at the end)", raw["leaks"], "target 0", ""],
        ["steady sessions' cell latency p50 (ms)", under.get("median"), base.get("median"),
         f"{ratio(under.get('median', 0), base.get('median', 0))}× the idle baseline"],
        ["steady sessions' cell latency p99 (ms)", under.get("p99"), base.get("p99"),
         f"{raw['p99_ratio']}× the idle baseline"],
    ]  # fmt: skip
    return {
        "title": f"{minutes:g} min of normal cells beside faults",
        "machine": machine,
        "quick": quick,
        "table": {"columns": ["metric", "soak", "baseline", "note"], "rows": rows},
        "notes": [
            f"policy: {POLICY.memory_mb} MiB, {POLICY.cpus} CPU, {POLICY.pids_max} processes "
            "per kernel; pool of 2; 2 steady sessions, 3 chaos sessions (35% faults).",
            "baseline: the steady sessions alone; soak: the same while the chaos sessions "
            "fail in every way and the engine is restarted under running cells.",
        ],
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    result = run(quick=False, minutes=args.minutes)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    from benchmarks.__main__ import render_markdown

    print(render_markdown("soak", result))
    print(text, file=sys.stderr)
    bad = result["raw"]["wrong_results"] or result["raw"]["leaks"]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
