"""The warm pool: from ``engine.session()`` to the first result, warm against cold.

Measured in one run:

- **warm**: ``await engine.session()`` then ``await session.run("1+1")`` with a
  pool whose kernels are all warm (the refill after each hand-out is awaited,
  untimed, before the next sample);
- **cold** (the baseline): the same with ``pool_size=0``, so every session
  starts its kernel on demand, as a wrapper without a pool would;
- **sustained**: sessions opened, used for one cell and closed back to back by
  4 concurrent clients for a fixed time, with the pool at 2 and at 4 kernels.

Kernels are self-checked as in production; the prewarm imports are off so a
refill takes one kernel start (they do not change the timed path).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_info, ratio, summary
from sandkernel import Engine

FULL = {"warm": 200, "cold": 20, "sustained_s": 20.0, "clients": 4}
QUICK = {"warm": 10, "cold": 3, "sustained_s": 3.0, "clients": 2}


async def _wait_warm(engine: Engine, count: int) -> None:
    async with asyncio.timeout(120):
        while (await engine.stats()).pool.warm < count:  # noqa: ASYNC110 - polled, bounded
            await asyncio.sleep(0.01)


async def _first_result_ms(engine: Engine) -> float:
    started = time.perf_counter()
    session = await engine.session()
    result = await session.run("1+1")
    elapsed = (time.perf_counter() - started) * 1000
    assert result.text == "2", result
    await session.close()
    return elapsed


def _engine(store: Path, **kwargs: Any) -> Engine:
    return Engine(prewarm_imports=(), store_dir=store, handle_sigterm=False, **kwargs)


async def _warm(samples: int, store: Path) -> list[float]:
    async with _engine(store, pool_size=2) as engine:
        await _wait_warm(engine, 2)
        for _ in range(3):  # warm-up
            await _first_result_ms(engine)
            await _wait_warm(engine, 2)
        out = []
        for _ in range(samples):
            out.append(await _first_result_ms(engine))
            await _wait_warm(engine, 2)
        return out


async def _cold(samples: int, store: Path) -> list[float]:
    async with _engine(store, pool_size=0) as engine:
        await _first_result_ms(engine)  # warm-up
        return [await _first_result_ms(engine) for _ in range(samples)]


async def _sustained(pool: int, seconds: float, clients: int, store: Path) -> dict[str, Any]:
    async with _engine(store, pool_size=pool, max_concurrent_starts=2) as engine:
        await _wait_warm(engine, pool)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                latencies.append(await _first_result_ms(engine))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        stats = (await engine.stats()).pool
        return {
            "sessions": len(latencies),
            "sessions_per_s": round(len(latencies) / elapsed, 2),
            "latency_ms": summary(latencies),
            "hits": stats.hits,
            "misses": stats.misses,
        }


async def _run(plan: dict[str, Any], store: Path) -> dict[str, Any]:
    warm = await _warm(plan["warm"], store)
    cold = await _cold(plan["cold"], store)
    sustained = {
        pool: await _sustained(pool, plan["sustained_s"], plan["clients"], store) for pool in (2, 4)
    }
    return {"warm_ms": warm, "cold_ms": cold, "sustained": sustained}


def run(*, quick: bool) -> dict[str, Any]:
    """Measure warm, cold and sustained session starts in one run."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="sk-bench-store-") as tmp:
        raw = asyncio.run(_run(plan, Path(tmp)))
    warm, cold = summary(raw["warm_ms"]), summary(raw["cold_ms"])
    rows: list[list[Any]] = [
        ["session() → first result, warm pool: p50 (ms)", warm["median"], cold["median"],
         f"{ratio(cold['median'], warm['median'])}× faster"],
        ["session() → first result, warm pool: p99 (ms)", warm["p99"], cold["p99"],
         f"{ratio(cold['p99'], warm['p99'])}× faster"],
    ]  # fmt: skip
    for pool, figures in raw["sustained"].items():
        lat = figures["latency_ms"]
        rows.append(
            [f"sustained, pool {pool}, {plan['clients']} clients: sessions/s",
             figures["sessions_per_s"], "", f"p50 {lat['median']} ms, p99 {lat['p99']} ms, "
             f"hits {figures['hits']}, misses {figures['misses']}"]
        )  # fmt: skip
    return {
        "title": "warm pool vs cold start: session() to the first result of 1+1",
        "machine": machine,
        "quick": quick,
        "table": {"columns": ["metric", "warm pool", "cold (no pool)", "note"], "rows": rows},
        "notes": [
            f"warm: {plan['warm']} samples after 3 warm-ups, pool of 2, refill awaited "
            "(untimed) between samples; cold: pool_size=0, "
            f"{plan['cold']} samples; both self-check each kernel; prewarm imports off.",
            "sustained: each client opens a session, runs 1+1 and closes it, back to back, "
            f"for {plan['sustained_s']:g} s; throughput is bound by kernel starts (2 cores).",
            "Target (issue): warm p50 <= 10 ms and p99 <= 30 ms.",
        ],
        "raw": raw,
    }
