"""SandboxFusion's ``/run_code`` under load: the batch path against a fresh sandbox per request.

64 concurrent HTTP clients (as verl sends reward checks) post ``/run_code``
bodies for HumanEval check programs (the 164 canonical solutions, cycled)
with ``run_timeout`` 10 and ``memory_limit_MB`` 1024, back to back, for 30 s,
to each server in turn, in the same run:

- **sandkernel**: ``sandkernel serve --tcp 127.0.0.1:PORT --fusion-without-token``
  with no warm kernels and one batch worker per core: each request is a fork
  of a warm, sandboxed fork server;
- **fresh sandbox per request** (the baseline, what SandboxFusion's python
  runner does, plus sandkernel's sandbox): ``benchmarks._fresh_sandbox_server``,
  the same HTTP stack and models, and per request a new workspace, cgroup
  and nsjail running ``python main.py`` under the same policy.

A request is an error if it raises or answers other than 200; a verdict is
the response's ``status`` (``Success`` when the program's checks pass). Both
servers must give every task the same verdict.

The same daemon far beyond its queue bound (1,024 clients) is
:mod:`benchmarks.overload`, which reuses the bodies and the daemon's command
line from here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks._servers import cpu_since, progress, spawn, stop
from benchmarks._stats import machine_info, ratio, summary
from sandkernel.evaluate.problems import load_problems

FULL = {"clients": 64, "seconds": 30.0, "warmup_s": 3.0}
QUICK = {"clients": 8, "seconds": 3.0, "warmup_s": 1.0}
RUN_TIMEOUT_S = 10
MEMORY_MB = 1024


def humaneval_bodies() -> list[tuple[str, dict[str, Any]]]:
    """``(task id, /run_code body)`` for the HumanEval check programs (canonical solutions)."""
    problems = load_problems("humaneval")
    return [
        (
            p.task_id,
            {
                "code": p.check_program(p.reference or ""),
                "language": "python",
                "run_timeout": RUN_TIMEOUT_S,
                "memory_limit_MB": MEMORY_MB,
            },
        )
        for p in problems.values()
    ]


def sandkernel_argv(tmp: Path, port: int, *extra: str) -> list[str]:
    """``sandkernel serve`` on loopback TCP for SandboxFusion's clients: batch path only."""
    return [
        sys.executable, "-m", "sandkernel.daemon", "serve",
        "--socket", str(tmp / "daemon.sock"), "--store", str(tmp / "store"),
        "--tcp", f"127.0.0.1:{port}", "--fusion-without-token",
        "--pool-size", "0", "--prewarm", "", "--log-level", "warning", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    async with asyncio.timeout(120):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def _drive(
    http: httpx.AsyncClient, bodies: list[tuple[str, dict[str, Any]]], clients: int, seconds: float
) -> dict[str, Any]:
    """``clients`` loops posting the next body until the deadline."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    verdicts: dict[str, set[str]] = defaultdict(set)
    order = itertools.cycle(range(len(bodies)))
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            task_id, body = bodies[next(order)]
            started = time.perf_counter()
            try:
                response = await http.post("/run_code", json=body)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, by kind
                errors[type(exc).__name__] += 1
                continue
            if response.status_code != 200:
                errors[f"HTTP {response.status_code}"] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            verdicts[task_id].add(response.json()["status"])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies) + sum(errors.values()),
        "runs_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": summary(latencies) if latencies else {},
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 2),
        "verdicts": {task: sorted(v) for task, v in verdicts.items()},
    }


async def _measure(
    name: str, argv: list[str], port: int, plan: dict[str, Any], bodies: Any, log: Path
) -> dict[str, Any]:
    process = await spawn(argv, log)
    limits = httpx.Limits(
        max_connections=plan["clients"], max_keepalive_connections=plan["clients"]
    )
    try:
        await wait_listening(port, process, log)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits
        ) as http:
            progress(f"{name}: warm-up")
            await _drive(http, bodies, plan["clients"], plan["warmup_s"])
            progress(f"{name}: {plan['clients']} clients for {plan['seconds']:g} s")
            # The server process itself: its sandboxes are not its children.
            server, clients = psutil.Process(process.pid), psutil.Process()
            server_before, clients_before = server.cpu_times(), clients.cpu_times()
            figures = await _drive(http, bodies, plan["clients"], plan["seconds"])
            figures["cpu_s_clients"] = cpu_since(clients, clients_before)
            figures["cpu_s_server_process"] = cpu_since(server, server_before)
            return figures
    finally:
        await stop(process)


async def _run(plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    bodies = humaneval_bodies()
    port = free_port()
    results = {
        "sandkernel": await _measure(
            "sandkernel", sandkernel_argv(tmp, port), port, plan, bodies, tmp / "daemon.log"
        )
    }
    port = free_port()
    fresh_argv = [sys.executable, "-m", "benchmarks._fresh_sandbox_server", "--port", str(port)]
    results["fresh sandbox per request"] = await _measure(
        "fresh sandbox per request", fresh_argv, port, plan, bodies, tmp / "fresh.log"
    )
    return results


def run(*, quick: bool) -> dict[str, Any]:
    """Runs per second, latency, errors and verdicts of both servers, in one run."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="sk-bench-", dir="/tmp") as tmp:
        raw = asyncio.run(_run(plan, Path(tmp)))
    ours, fresh = raw["sandkernel"], raw["fresh sandbox per request"]
    both = set(ours["verdicts"]) & set(fresh["verdicts"])
    identical = all(ours["verdicts"][t] == fresh["verdicts"][t] for t in both)
    single = all(len(v) == 1 for r in (ours, fresh) for v in r["verdicts"].values())
    passed = sum(v == ["Success"] for v in ours["verdicts"].values())
    tasks = len(ours["verdicts"])
    o_lat, f_lat = ours["latency_ms"], fresh["latency_ms"]
    speedup = ratio(ours["runs_per_s"], fresh["runs_per_s"])
    rows: list[list[Any]] = [
        ["runs/s", ours["runs_per_s"], fresh["runs_per_s"], f"{speedup}×"],
        ["latency p50 (ms)", o_lat.get("median"), f_lat.get("median"), ""],
        ["latency p99 (ms)", o_lat.get("p99"), f_lat.get("p99"), ""],
        ["requests", ours["requests"], fresh["requests"], ""],
        ["errors (target: 0)", sum(ours["errors"].values()), sum(fresh["errors"].values()),
         str(ours["errors"] or fresh["errors"] or "")],
        ["tasks seen / verdicts identical", f"{len(ours['verdicts'])}",
         f"{len(fresh['verdicts'])}", f"{len(both)} compared: {'yes' if identical else 'NO'}"],
        ["CPU s: clients / server process", ours["cpu_s_clients"],
         fresh["cpu_s_clients"], f"{ours['cpu_s_server_process']} / "
         f"{fresh['cpu_s_server_process']} (server)"],
    ]  # fmt: skip
    for result in (ours, fresh):
        result["verdicts"] = dict(Counter(s for v in result["verdicts"].values() for s in v))
    return {
        "title": f"SandboxFusion /run_code, {plan['clients']} concurrent clients",
        "chart": {
            "title": f"/run_code, {plan['clients']} clients, HumanEval checks: runs/s",
            "unit": "runs per second",
            "bars": [
                ["sandkernel (batch path)", ours["runs_per_s"]],
                ["fresh sandbox per request", fresh["runs_per_s"]],
            ],
        },
        "machine": machine,
        "quick": quick,
        "table": {
            "columns": ["metric", "sandkernel (batch path)", "fresh sandbox per request", "ratio"],
            "rows": rows,
        },
        "notes": [
            f"{plan['clients']} HTTP clients on loopback TCP post `/run_code` with HumanEval check "
            f"programs (164 canonical solutions, cycled), run_timeout {RUN_TIMEOUT_S} s, "
            f"memory_limit_MB {MEMORY_MB}, back to back for {plan['seconds']:g} s after "
            f"{plan['warmup_s']:g} s of warm-up; both servers in the same run.",
            "sandkernel: the daemon with `--fusion-without-token`, no warm kernels, one batch "
            f"worker per core ({os.cpu_count()}). Baseline: the same HTTP stack and models, a new "
            "workspace, cgroup and nsjail running `python main.py` per request, same policy.",
            f"Verdicts: {passed} of {tasks} tasks Success on sandkernel; each task "
            f"got one verdict throughout: {'yes' if single else 'NO'}.",
            "Target: 0 errors, identical verdicts, ≥ 2.5× the per-request baseline.",
        ],
        "raw": raw,
    }
