"""Kernels forked from the zygote against cold-started kernels, in the same run.

Both sides are the engine's own kernel start with the default prewarm
(numpy, pandas, matplotlib) and its self-check, each kernel in a sandbox of
its own; the only difference is ``EngineConfig.zygote``:

- refill: the pool's start of one kernel (request → ready, self-checked and
  prewarmed), wall time p50/p99, alternating cold and forked starts;
- CPU per new kernel: the engine's own CPU, the zygote's (its own, and its
  child's until that joins the kernel's cgroup, as the child reports it) and
  the kernel's cgroup (nsjail, the sandbox's init, the zygote's child, the
  kernel), over the alternating starts and over each side's starts back to
  back (as a pool refills: the target is for these);
- idle memory with N kernels alive: USS and RSS per kernel (its cgroup's
  processes), for forked kernels (sharing the zygote's pages) and cold ones;
- sustained new sessions per second: 8 clients, each creating a session,
  running ``1 + 1`` and closing it, for a fixed time, on a default engine
  (pool of 2; 2 starts at a time cold, ``FORKED_CONCURRENT_STARTS`` forked);
- a warm ``session()`` → first result: the pool full, one session created and
  its first cell run, p50/p99.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks._stats import machine_info, median, ratio, summary
from benchmarks.engine import _wait_warm
from sandkernel.config import DEFAULT_PREWARM, FORKED_CONCURRENT_STARTS
from sandkernel.engine import Engine
from sandkernel.kernel import SandboxedKernel

CLIENTS = 8
_MIB = 1 << 20


@dataclass(frozen=True)
class Plan:
    refill_warmup: int
    refills: int
    idle_kernels: int
    sustained_s: float
    first_results: int


FULL = Plan(refill_warmup=2, refills=20, idle_kernels=20, sustained_s=30.0, first_results=20)
QUICK = Plan(refill_warmup=1, refills=4, idle_kernels=4, sustained_s=8.0, first_results=4)


def _engine(root: Path, *, zygote: bool, **settings: Any) -> Engine:
    settings.setdefault("pool_size", 0)
    return Engine(
        zygote=zygote,
        runtime_dir=root / "rt",
        store_dir=root / ("store-zygote" if zygote else "store-cold"),
        prewarm_imports=DEFAULT_PREWARM,
        handle_sigterm=False,
        **settings,
    )


def _process_cpu_s(pid: int, children: bool = True) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def _thread_cpu_s(pid: int) -> float:
    """CPU of a single-threaded process, to the nanosecond (``/proc/<pid>/schedstat``)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except OSError:  # a kernel without schedstats: clock ticks
        return _process_cpu_s(pid, children=False)


def _zygote_cpu_s(engine: Engine) -> float:
    """The zygote's own CPU and its children's before they joined a kernel's cgroup.

    Not the zygote's reaped children's CPU as a whole: a child joins the
    kernel's cgroup, whose CPU is counted with the kernel's, as its first act.
    """
    zygotes = engine.zygotes
    zygote = zygotes.zygote if zygotes is not None else None
    if zygote is None or zygote.pid is None:
        return 0.0
    with contextlib.suppress(OSError):
        return _thread_cpu_s(zygote.pid) + zygote.outside_cpu_s
    return 0.0


async def _refill(engine: Engine) -> tuple[SandboxedKernel, float, float]:
    """One start as the pool does it: wall ms and CPU ms (engine + zygote + cgroup)."""
    engine_cpu = time.process_time()
    zygote_cpu = _zygote_cpu_s(engine)
    started = time.perf_counter()
    kernel = await engine._start_kernel()
    wall = (time.perf_counter() - started) * 1000
    cgroup_ns = kernel.cgroup.usage().cpu_ns or 0
    cpu = (
        (time.process_time() - engine_cpu) + (_zygote_cpu_s(engine) - zygote_cpu) + cgroup_ns / 1e9
    ) * 1000
    return kernel, wall, cpu


def _kernel_memory(kernel: SandboxedKernel) -> dict[str, int]:
    rss = uss = 0
    for pid in kernel.cgroup.pids():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = psutil.Process(pid).memory_full_info()
            rss += info.rss
            uss += info.uss
    return {"rss": rss, "uss": uss}


async def _measure_refills(engines: dict[str, Engine], plan: Plan) -> dict[str, Any]:
    walls: dict[str, list[float]] = {side: [] for side in engines}
    cpus: dict[str, list[float]] = {side: [] for side in engines}
    forked = 0
    order = list(engines)
    for i in range(plan.refill_warmup + plan.refills):
        for side in order if i % 2 == 0 else reversed(order):
            kernel, wall, cpu = await _refill(engines[side])
            forked += side == "zygote" and kernel.forked_pid is not None
            await kernel.shutdown()
            if i >= plan.refill_warmup:
                walls[side].append(wall)
                cpus[side].append(cpu)
    return {"wall": walls, "cpu": cpus, "forked": forked}


async def _measure_back_to_back(engines: dict[str, Engine], plan: Plan) -> dict[str, list[float]]:
    """CPU of each side's refills one after another, as a pool refills: no other start between.

    In the alternating measure each forked start follows a cold one, whose
    seconds of imports leave the caches cold for it; a pool that forks its
    kernels refills from the zygote only.
    """
    cpus: dict[str, list[float]] = {side: [] for side in engines}
    for side, engine in engines.items():
        for i in range(plan.refill_warmup + plan.refills):
            kernel, _, cpu = await _refill(engine)
            await kernel.shutdown()
            if i >= plan.refill_warmup:
                cpus[side].append(cpu)
    return cpus


async def _measure_idle(engine: Engine, count: int) -> dict[str, float]:
    kernels: list[SandboxedKernel] = []
    try:
        for _ in range(count):
            kernels.append((await _refill(engine))[0])
        await asyncio.sleep(1.0)  # idle: let start-up garbage settle
        memory = [_kernel_memory(k) for k in kernels]
    finally:
        await asyncio.gather(*(k.shutdown() for k in kernels))
    return {
        "uss_mib": median([m["uss"] for m in memory]) / _MIB,
        "rss_mib": median([m["rss"] for m in memory]) / _MIB,
        "kernels": len(memory),
    }


async def _measure_sustained(root: Path, zygote: bool, seconds: float) -> dict[str, float]:
    async with _engine(root, zygote=zygote, pool_size=2) as engine:
        await _wait_warm(engine, 2)  # the pool's first fill is not part of the rate
        done = 0
        errors = 0
        deadline = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                try:
                    session = await engine.session()
                    result = await session.run("1 + 1")
                    await session.close()
                except Exception:  # noqa: BLE001 - counted: a failed session is a data point
                    errors += 1
                    continue
                if result.text == "2":
                    done += 1
                else:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.monotonic() - started
    return {"sessions_per_s": done / elapsed, "sessions": done, "errors": errors}


async def _measure_first_results(root: Path, zygote: bool, count: int) -> list[float]:
    latencies: list[float] = []
    async with _engine(root, zygote=zygote, pool_size=2) as engine:
        for _ in range(count + 1):
            await _wait_warm(engine, 2)  # a full pool: the warm path, not a refill
            started = time.perf_counter()
            session = await engine.session()
            result = await session.run("1 + 1")
            latencies.append((time.perf_counter() - started) * 1000)
            assert result.text == "2", result
            await session.close()
    return latencies[1:]


async def _run(root: Path, plan: Plan) -> dict[str, Any]:
    async with (
        _engine(root, zygote=False) as cold,
        _engine(root, zygote=True) as forked,
    ):
        engines = {"cold": cold, "zygote": forked}
        zygotes = forked.zygotes
        assert zygotes is not None
        if await zygotes.get() is None:
            raise RuntimeError(f"the zygote did not start: {zygotes.last_error}")
        refills = await _measure_refills(engines, plan)
        refills["cpu_back_to_back"] = await _measure_back_to_back(engines, plan)
        idle = {side: await _measure_idle(e, plan.idle_kernels) for side, e in engines.items()}
        zygote = zygotes.zygote
        zygote_memory = _kernel_memory_of(zygote.pid) if zygote is not None and zygote.pid else {}
        fallbacks = zygotes.fallbacks
    sustained = {
        side: await _measure_sustained(root, side == "zygote", plan.sustained_s)
        for side in ("cold", "zygote")
    }
    first = {
        side: await _measure_first_results(root, side == "zygote", plan.first_results)
        for side in ("cold", "zygote")
    }
    return {
        "refills": refills,
        "idle": idle,
        "zygote_memory": zygote_memory,
        "fallbacks": fallbacks,
        "sustained": sustained,
        "first": first,
    }


def _kernel_memory_of(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"uss_mib": info.uss / _MIB, "rss_mib": info.rss / _MIB}


def _row(label: str, cold: float, zygote: float, target: str, fmt: str = "{:.1f}") -> list[Any]:
    return [label, fmt.format(cold), fmt.format(zygote), f"{ratio(zygote, cold)}×", target]


def run(*, quick: bool) -> dict[str, Any]:
    """Measure cold and forked kernels in one run; see the module docstring."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="sk-zygote-") as tmp:
        raw = asyncio.run(_run(Path(tmp), plan))
    load_after = machine_info()["load_average"]
    wall = {s: summary(v) for s, v in raw["refills"]["wall"].items()}
    cpu = {s: summary(v) for s, v in raw["refills"]["cpu"].items()}
    cpu_pool = {s: summary(v) for s, v in raw["refills"]["cpu_back_to_back"].items()}
    idle = raw["idle"]
    rate = {s: v["sessions_per_s"] for s, v in raw["sustained"].items()}
    first = {s: summary(v) for s, v in raw["first"].items()}
    rows = [
        _row("Refill p50 (ms)", wall["cold"]["median"], wall["zygote"]["median"], "≤ 100"),
        _row("Refill p99 (ms)", wall["cold"]["p99"], wall["zygote"]["p99"], ""),
        _row(
            "CPU per new kernel, refills back to back (a pool's), p50 (ms)",
            cpu_pool["cold"]["median"],
            cpu_pool["zygote"]["median"],
            "≤ 40",
        ),  # fmt: skip
        _row(
            "CPU per new kernel, alternating with cold starts, p50 (ms)",
            cpu["cold"]["median"],
            cpu["zygote"]["median"],
            "",
        ),  # fmt: skip
        _row(
            f"Idle USS per kernel, {idle['zygote']['kernels']} alive (MiB)",
            idle["cold"]["uss_mib"],
            idle["zygote"]["uss_mib"],
            "≤ 12",
        ),  # fmt: skip
        _row(
            f"Idle RSS per kernel, {idle['zygote']['kernels']} alive (MiB)",
            idle["cold"]["rss_mib"],
            idle["zygote"]["rss_mib"],
            "",
        ),  # fmt: skip
        _row(
            f"New sessions/s, {CLIENTS} clients",
            rate["cold"],
            rate["zygote"],
            "≥ 10× cold",
            "{:.2f}",
        ),  # fmt: skip
        _row(
            "Warm session() → first result p50 (ms)",
            first["cold"]["median"],
            first["zygote"]["median"],
            "",
        ),  # fmt: skip
        _row(
            "Warm session() → first result p99 (ms)",
            first["cold"]["p99"],
            first["zygote"]["p99"],
            "",
        ),  # fmt: skip
    ]
    zmem = raw["zygote_memory"]
    notes = [
        f"{machine['cpu_count']} CPUs shared with other work: load average "
        f"{machine['load_average']} before, {load_after} after. Ratios are of one run.",
        "Both sides: the engine's own kernel start (sandbox, self-check, prewarm of "
        f"{', '.join(DEFAULT_PREWARM)}), one sandbox per kernel; zygote=False vs True.",
        f"Refills alternate cold/forked after {plan.refill_warmup} warm-up pair(s); "
        f"{raw['refills']['forked']} of {plan.refill_warmup + plan.refills} zygote-side "
        f"starts were forked ({raw['fallbacks']} fell back cold).",
        "CPU per kernel: the engine's process CPU during the start, plus the zygote's "
        "own and its child's before that joined the kernel's cgroup, plus the kernel's "
        "cgroup (nsjail, init, the zygote's child, kernel). Measured twice: alternating "
        "with the other side (each forked start right after a cold one, whose imports "
        "leave the caches cold), and each side's refills back to back, as a pool makes "
        "them; the target is for the pool's.",
        f"The zygote itself: USS {zmem.get('uss_mib', 0):.1f} MiB, RSS "
        f"{zmem.get('rss_mib', 0):.1f} MiB, shared by every forked kernel.",
        f"Sustained: {CLIENTS} clients for {plan.sustained_s:g} s each side, each creating a "
        "session, running `1 + 1` and closing it; default pool (2 warm; starts at a time: "
        f"2 cold, {FORKED_CONCURRENT_STARTS} forked, the defaults). "
        f"Errors: cold {raw['sustained']['cold']['errors']}, "
        f"zygote {raw['sustained']['zygote']['errors']}.",
    ]
    return {
        "title": "kernels forked from a zygote vs cold starts",
        "quick": quick,
        "machine": machine,
        "load_average_after": load_after,
        "plan": asdict(plan),
        "refill_ms": wall,
        "cpu_ms": cpu,
        "cpu_back_to_back_ms": cpu_pool,
        "idle": idle,
        "zygote_memory": zmem,
        "sustained": raw["sustained"],
        "first_result_ms": first,
        "ratios": {
            "refill_median": ratio(wall["zygote"]["median"], wall["cold"]["median"]),
            "cpu_median": ratio(cpu["zygote"]["median"], cpu["cold"]["median"]),
            "cpu_back_to_back_median": ratio(
                cpu_pool["zygote"]["median"], cpu_pool["cold"]["median"]
            ),
            "idle_uss": ratio(idle["zygote"]["uss_mib"], idle["cold"]["uss_mib"]),
            "sessions_per_s": ratio(rate["zygote"], rate["cold"]),
        },
        "samples_ms": {
            "refill": {s: _rounded(v) for s, v in raw["refills"]["wall"].items()},
            "cpu": {s: _rounded(v) for s, v in raw["refills"]["cpu"].items()},
            "cpu_back_to_back": {
                s: _rounded(v) for s, v in raw["refills"]["cpu_back_to_back"].items()
            },
            "first": {s: _rounded(v) for s, v in raw["first"].items()},
        },
        "table": {"columns": ["Metric", "Cold", "Zygote", "Ratio", "Target"], "rows": rows},
        "notes": notes,
    }


def _rounded(samples: Sequence[float]) -> list[float]:
    return [round(s, 2) for s in samples]
