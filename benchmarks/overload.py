"""SandboxFusion's ``/run_code`` far beyond the daemon's queue bound: 1,024 concurrent clients.

One daemon (``sandkernel serve --tcp 127.0.0.1:PORT --fusion-without-token``,
no warm kernels, one batch worker per core, the default ``--max-queued-runs``)
gets, in the same run, after a warm-up:

- **64 clients** for 30 s (the baseline: below the bound, nothing is refused);
- **1,024 clients** for 30 s: beyond the bound the daemon answers 503 with
  ``Retry-After`` at once, and each such client waits that long and sends
  the same request again, as SandboxFusion's own client retries.

The bodies are :mod:`benchmarks.fusion`'s: HumanEval check programs (the 164
canonical solutions, cycled), so every answered run must be ``Success``.
Reported per phase: runs/s; latency of answered runs, both of the attempt
that was answered and from the request's first attempt (waits included);
overload answers; connection errors and other 5xx (target: 0); wrong verdicts
(target: 0); and the daemon's peak RSS, sampled every 100 ms: of the daemon
process alone (where queued requests live) and summed over it and every
process under it (the sandboxed fork servers and their runs; shared pages are
counted once per process, so this overstates).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks._servers import progress, spawn, stop
from benchmarks._stats import machine_info, ratio, summary
from benchmarks.fusion import free_port, humaneval_bodies, sandkernel_argv, wait_listening
from sandkernel.daemon.admission import default_max_queued_runs

FULL: dict[str, Any] = {
    "baseline_clients": 64,
    "clients": 1024,
    "seconds": 30.0,
    "warmup_s": 3.0,
    "max_queued_runs": None,  # the daemon's default
}
# A smoke run: a small bound, so the overload path is exercised in seconds.
QUICK: dict[str, Any] = {
    "baseline_clients": 8,
    "clients": 128,
    "seconds": 3.0,
    "warmup_s": 1.0,
    "max_queued_runs": 16,
}
_SAMPLE_EVERY_S = 0.1


@dataclass
class _Tally:
    answered_ms: list[float] = field(default_factory=list)
    first_attempt_ms: list[float] = field(default_factory=list)
    overloaded: int = 0
    connection_errors: Counter[str] = field(default_factory=Counter)
    other_answers: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    given_up_at_deadline: int = 0

    def report(self, elapsed_s: float) -> dict[str, Any]:
        return {
            "answered": len(self.answered_ms),
            "runs_per_s": round(len(self.answered_ms) / elapsed_s, 1),
            "latency_ms": summary(self.answered_ms) if self.answered_ms else {},
            "latency_from_first_attempt_ms": (
                summary(self.first_attempt_ms) if self.first_attempt_ms else {}
            ),
            "overload_answers": self.overloaded,
            "connection_errors": dict(self.connection_errors),
            "other_answers": dict(self.other_answers),
            "wrong_verdicts": dict(self.wrong),
            "given_up_at_deadline": self.given_up_at_deadline,
            "elapsed_s": round(elapsed_s, 2),
        }


async def _drive(
    http: httpx.AsyncClient, bodies: list[tuple[str, dict[str, Any]]], clients: int, seconds: float
) -> dict[str, Any]:
    """``clients`` loops posting the next body until the deadline, retrying overload answers."""
    tally = _Tally()
    order = itertools.cycle(range(len(bodies)))
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            task_id, body = bodies[next(order)]
            first = time.perf_counter()
            while True:
                started = time.perf_counter()
                try:
                    response = await http.post("/run_code", json=body)
                except httpx.TransportError as exc:
                    tally.connection_errors[type(exc).__name__] += 1
                    break
                retry_after = response.headers.get("retry-after")
                if response.status_code == 503 and retry_after is not None:
                    tally.overloaded += 1
                    wait = float(retry_after)
                    if time.perf_counter() + wait >= deadline:
                        tally.given_up_at_deadline += 1
                        break
                    await asyncio.sleep(wait)  # what the answer asks for
                    continue
                if response.status_code != 200:
                    tally.other_answers[f"HTTP {response.status_code}"] += 1
                    break
                done = time.perf_counter()
                tally.answered_ms.append((done - started) * 1000)
                tally.first_attempt_ms.append((done - first) * 1000)
                answer = response.json()
                if answer["status"] != "Success":
                    tally.wrong[task_id] += 1
                break

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally.report(time.perf_counter() - started)


class _RssSampler:
    """Peak RSS of a process, alone and with every process under it, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_own = 0
        self.peak_tree = 0
        self.processes_in_tree = 0

    def sample(self) -> None:
        own = self.process.memory_info().rss
        tree = own
        children = self.process.children(recursive=True)
        for child in children:
            try:
                tree += child.memory_info().rss
            except psutil.Error:
                continue  # ended between listing and reading
        self.peak_own = max(self.peak_own, own)
        self.peak_tree = max(self.peak_tree, tree)
        self.processes_in_tree = max(self.processes_in_tree, 1 + len(children))

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(_SAMPLE_EVERY_S)  # the sampling period

    def report(self) -> dict[str, Any]:
        return {
            "daemon_process_peak_rss_mib": round(self.peak_own / (1 << 20), 1),
            "daemon_and_descendants_peak_rss_mib": round(self.peak_tree / (1 << 20), 1),
            "most_processes_in_tree": self.processes_in_tree,
        }


async def _phase(
    http: httpx.AsyncClient,
    bodies: list[tuple[str, dict[str, Any]]],
    pid: int,
    clients: int,
    seconds: float,
) -> dict[str, Any]:
    sampler = _RssSampler(pid)
    sampling = asyncio.create_task(sampler.run())
    try:
        figures = await _drive(http, bodies, clients, seconds)
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
    sampler.sample()
    return {**figures, **sampler.report()}


def _raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


async def _run(plan: dict[str, Any], tmp: Path) -> dict[str, Any]:
    bodies = humaneval_bodies()
    port = free_port()
    bound = plan["max_queued_runs"]
    extra = ["--max-queued-runs", str(bound)] if bound is not None else []
    log = tmp / "daemon.log"
    process = await spawn(sandkernel_argv(tmp, port, *extra), log)
    most = max(plan["clients"], plan["baseline_clients"])
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    try:
        await wait_listening(port, process, log)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits
        ) as http:
            progress("overload: warm-up")
            await _drive(http, bodies, plan["baseline_clients"], plan["warmup_s"])
            phases: dict[str, Any] = {}
            for clients in (plan["baseline_clients"], plan["clients"]):
                progress(f"overload: {clients} clients for {plan['seconds']:g} s")
                phases[str(clients)] = await _phase(
                    http, bodies, process.pid, clients, plan["seconds"]
                )
            return phases
    finally:
        await stop(process)


def run(*, quick: bool) -> dict[str, Any]:
    """Throughput, latency, refusals, errors, verdicts and memory at 64 and 1,024 clients."""
    plan = QUICK if quick else FULL
    # One descriptor per client connection, and some for everything else.
    open_files = _raise_open_files_limit(plan["clients"] + 1024)
    bound = plan["max_queued_runs"] or default_max_queued_runs(None)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="sk-bench-", dir="/tmp") as tmp:
        raw = asyncio.run(_run(plan, Path(tmp)))
    base, over = raw[str(plan["baseline_clients"])], raw[str(plan["clients"])]

    def errors(phase: dict[str, Any]) -> int:
        return sum(phase["connection_errors"].values())

    def other(phase: dict[str, Any]) -> int:
        return sum(phase["other_answers"].values())

    def wrong(phase: dict[str, Any]) -> int:
        return sum(phase["wrong_verdicts"].values())

    b_lat, o_lat = base["latency_ms"], over["latency_ms"]
    b_first, o_first = base["latency_from_first_attempt_ms"], over["latency_from_first_attempt_ms"]
    columns = [f"{plan['baseline_clients']} clients", f"{plan['clients']:,} clients"]
    rows: list[list[Any]] = [
        ["runs/s", base["runs_per_s"], over["runs_per_s"],
         f"{ratio(over['runs_per_s'], base['runs_per_s'])}×"],
        ["answered runs", base["answered"], over["answered"], ""],
        ["latency p50 / p99 of the answered attempt (ms)",
         f"{b_lat.get('median')} / {b_lat.get('p99')}",
         f"{o_lat.get('median')} / {o_lat.get('p99')}", ""],
        ["latency p50 / p99 from the first attempt (ms)",
         f"{b_first.get('median')} / {b_first.get('p99')}",
         f"{o_first.get('median')} / {o_first.get('p99')}", ""],
        ["overload answers (503 + Retry-After)", base["overload_answers"],
         over["overload_answers"], ""],
        ["connection errors (target: 0)", errors(base), errors(over),
         str(base["connection_errors"] or over["connection_errors"] or "")],
        ["other 5xx / other answers (target: 0)", other(base), other(over),
         str(base["other_answers"] or over["other_answers"] or "")],
        ["wrong verdicts (target: 0)", wrong(base), wrong(over), ""],
        ["daemon process peak RSS (MiB)", base["daemon_process_peak_rss_mib"],
         over["daemon_process_peak_rss_mib"],
         f"{ratio(over['daemon_process_peak_rss_mib'], base['daemon_process_peak_rss_mib'])}×"],
        ["daemon + sandboxes peak RSS, summed (MiB)",
         base["daemon_and_descendants_peak_rss_mib"],
         over["daemon_and_descendants_peak_rss_mib"], ""],
        ["requests given up at the deadline (in a wait)", base["given_up_at_deadline"],
         over["given_up_at_deadline"], ""],
    ]  # fmt: skip
    met = errors(base) + errors(over) + other(base) + other(over) + wrong(base) + wrong(over) == 0
    return {
        "title": f"/run_code beyond the queue bound: {plan['clients']:,} concurrent clients",
        "chart": {
            "title": f"/run_code, HumanEval checks, queue bound {bound}: runs/s",
            "unit": "runs per second",
            "bars": [
                [f"{plan['clients']:,} clients", over["runs_per_s"]],
                [f"{plan['baseline_clients']} clients", base["runs_per_s"]],
            ],
        },
        "machine": machine,
        "quick": quick,
        "table": {"columns": ["metric", *columns, "ratio"], "rows": rows},
        "notes": [
            f"One daemon (`--fusion-without-token`, no warm kernels, one batch worker per core "
            f"({os.cpu_count()}), `--max-queued-runs` {bound}"
            f"{'' if plan['max_queued_runs'] else ' (the default)'}); loopback HTTP clients post "
            f"`/run_code` with HumanEval check programs (164 canonical solutions, cycled) back "
            f"to back for {plan['seconds']:g} s per phase after {plan['warmup_s']:g} s of "
            "warm-up, both phases in the same run.",
            "An overload answer (503 with `Retry-After`) is followed, that many seconds later, "
            "by the same request; the latency from the first attempt includes those waits. "
            "Requests whose wait would end after the deadline are given up (not errors).",
            "RSS: the daemon process (where queued requests and their bodies live), and the "
            "sum over it and every process under it (sandboxed fork servers and runs).",
            f"Clients' open files limit {open_files}; one client process (Python, httpx) "
            "on the same machine as the daemon.",
            f"Target: 0 connection errors, 0 other 5xx, 0 wrong verdicts: "
            f"{'met' if met else 'NOT MET'}.",
        ],
        "raw": raw,
    }
