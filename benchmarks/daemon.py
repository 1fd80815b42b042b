"""The daemon against the embedded engine: many clients running ``1+1``, each in its own session.

Measured in one run, with the same engine settings on both sides:

- **embedded** (the baseline): one :class:`~sandkernel.Engine` in this process;
  each client is a task with its own session, running ``1+1`` back to back;
- **daemon**: ``python -m sandkernel.daemon serve`` as its own process; each
  client is an :class:`~sandkernel.daemon.AsyncClient` (its own connection)
  in this process with its own session, running ``1+1`` back to back over the
  Unix socket.

Sessions are opened first and warmed up (untimed); then every client runs for
the same fixed time. A request counts as an error if it raises or if its
result is not ``2``. Latency is one ``session.run`` call, seen by the client.
The client side shares the machine's cores with the daemon and the kernels,
as it would on a single host.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks._servers import cpu_since, progress, spawn, stop
from benchmarks._stats import machine_info, ratio, summary
from sandkernel import Engine
from sandkernel.daemon.client import AsyncClient

FULL = {"clients": 32, "seconds": 30.0, "warmup_s": 3.0}
QUICK = {"clients": 4, "seconds": 3.0, "warmup_s": 0.5}
CODE = "1+1"
POOL_SIZE = 2
ACQUIRE_TIMEOUT_S = 900.0  # opening every session starts that many kernels, two at a time
Runner = Callable[[], Awaitable[Any]]


async def _drive(runners: Sequence[Runner], seconds: float) -> dict[str, Any]:
    """Each runner back to back until the deadline; latencies in ms, errors by kind."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def client(run: Runner) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                result = await run()
            except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
                errors[type(exc).__name__] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if result.text != "2":
                errors[f"status {result.status}"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(run) for run in runners))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies) + sum(errors.values()),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": summary(latencies),
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 2),
    }


async def _embedded(plan: dict[str, Any], store: Path) -> dict[str, Any]:
    engine = Engine(
        pool_size=POOL_SIZE,
        max_sessions=plan["clients"],
        acquire_timeout_s=ACQUIRE_TIMEOUT_S,
        prewarm_imports=(),
        store_dir=store,
        handle_sigterm=False,
    )
    async with engine:
        progress(f"embedded: opening {plan['clients']} sessions")
        sessions = await asyncio.gather(
            *(engine.session(f"bench-{i}") for i in range(plan["clients"]))
        )
        runners = [lambda s=s: s.run(CODE) for s in sessions]
        progress("embedded: warm-up, then the timed run")
        await _drive(runners, plan["warmup_s"])
        cpu_before = psutil.Process().cpu_times()
        figures = await _drive(runners, plan["seconds"])
        figures["cpu_s_this_process"] = cpu_since(psutil.Process(), cpu_before)
        return figures


async def _daemon(plan: dict[str, Any], store: Path, socket_path: Path) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "sandkernel.daemon", "serve", "--socket", str(socket_path),
        "--store", str(store), "--pool-size", str(POOL_SIZE),
        "--max-sessions", str(plan["clients"]), "--acquire-timeout", str(ACQUIRE_TIMEOUT_S),
        "--prewarm", "", "--log-level", "warning",
    ]  # fmt: skip
    log = store.parent / "daemon.log"
    process = await spawn(argv, log)
    clients: list[AsyncClient] = []
    try:
        await _wait_listening(socket_path, process, log)
        progress(f"daemon: opening {plan['clients']} sessions")
        clients = [
            AsyncClient(socket_path, timeout_s=ACQUIRE_TIMEOUT_S) for _ in range(plan["clients"])
        ]
        sessions = await asyncio.gather(
            *(client.session(f"bench-{i}") for i, client in enumerate(clients))
        )
        runners = [lambda s=s: s.run(CODE) for s in sessions]
        progress("daemon: warm-up, then the timed run")
        await _drive(runners, plan["warmup_s"])
        daemon = psutil.Process(process.pid)
        daemon_before, this_before = daemon.cpu_times(), psutil.Process().cpu_times()
        figures = await _drive(runners, plan["seconds"])
        figures["cpu_s_daemon_process"] = cpu_since(daemon, daemon_before)
        figures["cpu_s_client_process"] = cpu_since(psutil.Process(), this_before)
        return figures
    finally:
        for client in clients:
            await client.aclose()
        await stop(process)


async def _wait_listening(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    async with asyncio.timeout(120):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the daemon exited with {process.returncode}; see {log}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
            await asyncio.sleep(0.05)


async def _run(plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    embedded = await _embedded(plan, tmp / "store-embedded")
    daemon = await _daemon(plan, tmp / "store-daemon", tmp / "daemon.sock")
    return {"embedded": embedded, "daemon": daemon}


def run(*, quick: bool) -> dict[str, Any]:
    """Requests per second, latency and errors of the daemon and of the embedded engine."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    # A short folder: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="sk-bench-", dir="/tmp") as tmp:
        raw = asyncio.run(_run(plan, Path(tmp)))
    embedded, daemon = raw["embedded"], raw["daemon"]
    e_lat, d_lat = embedded["latency_ms"], daemon["latency_ms"]
    errors_e, errors_d = sum(embedded["errors"].values()), sum(daemon["errors"].values())
    n = plan["clients"]
    rows: list[list[Any]] = [
        [f"{n} clients, {CODE}: requests/s", embedded["requests_per_s"], daemon["requests_per_s"],
         f"{ratio(daemon['requests_per_s'], embedded['requests_per_s'])}× of embedded"],
        ["latency p50 (ms)", e_lat["median"], d_lat["median"],
         f"{d_lat['median'] - e_lat['median']:+.2f} ms"],
        ["latency p99 (ms)", e_lat["p99"], d_lat["p99"],
         f"{d_lat['p99'] - e_lat['p99']:+.2f} ms"],
        ["requests", embedded["requests"], daemon["requests"], ""],
        ["errors (target: 0)", errors_e, errors_d, str(daemon["errors"] or "")],
        ["CPU s (client / daemon process)", embedded["cpu_s_this_process"],
         f"{daemon['cpu_s_client_process']} / {daemon['cpu_s_daemon_process']}", ""],
    ]  # fmt: skip
    return {
        "title": f"daemon over its Unix socket vs embedded engine, {n} concurrent sessions",
        "machine": machine,
        "quick": quick,
        "table": {
            "columns": ["metric", "embedded engine", "daemon (Unix socket)", "note"],
            "rows": rows,
        },
        "notes": [
            f"{n} clients, each with its own session, run {CODE!r} back to back for "
            f"{plan['seconds']:g} s after {plan['warmup_s']:g} s of warm-up; both sides in the "
            f"same run, pool of {POOL_SIZE}, prewarm imports off, kernels self-checked.",
            "daemon: `python -m sandkernel.daemon serve` as a separate process; one "
            "AsyncClient (one connection) per client, HTTP/1.1 over the Unix socket.",
            "CPU: user+system seconds during the timed phase; the kernels' own CPU is in "
            f"neither column. {os.cpu_count()} cores shared by kernels, daemon and clients.",
        ],
        "raw": raw,
    }
