"""A sandboxed kernel against a plain ipykernel: start, round trip, shutdown, memory.

Both sides are measured in the same run, alternating, so each figure comes
with its ratio to the baseline:

- start until ready (``kernel_info`` answered and IOPub connected, checked by
  the same ``sandkernel.kernel.wait_until_ready`` on both sides), shutdown
  timed apart;
- the round trip of ``execute("pass")`` in a held, warmed-up kernel;
- the memory of an idle, freshly started kernel;
- the engine's own path, against the baseline's ``1+1`` round trip in the
  same phase: a held session's ``run("1+1")``, and a warm session's first
  result (``engine.session()`` then ``run("1+1")``, the pool full, with the
  engine's default prewarm imports and self-check).

The baseline is the same ipykernel, run by the same interpreter with the same
command-line flags, environment (paths moved out of ``/tmp``) and transport
(``ipc``), started by jupyter_client's ``AsyncKernelManager`` without nsjail,
cgroup or workspace mount. What remains between the two is the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import math
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from benchmarks._stats import machine_info, median, ns_to_ms, ratio, summary
from sandkernel import Engine, Session
from sandkernel.errors import KernelDead, KernelStartFailed
from sandkernel.kernel import SandboxedKernel, wait_until_ready
from sandkernel.policy import Policy, load_policy
from sandkernel.provisioner import wait_exit
from sandkernel.sandbox import CgroupVersion, SandboxHost, sandbox_env

POLICY = "default"
CODE = "pass"
START_TIMEOUT_S = 30.0
EXECUTE_TIMEOUT_S = 30.0
#: How often a waiting round trip wakes up; the same as SandboxedKernel's poll.
_POLL_S = 0.2
_MIB = 1 << 20
#: Tries of one measurement whose kernel died under it (see ``_attempt``).
MAX_ATTEMPTS = 3

# Flags that sandkernel's in-sandbox launcher (kernels/runtime/launch.py) gives
# ipykernel; the baseline gets them too so both kernels are configured alike
# (no 0.5 ms sleep before each reply either: the ratios are of the paths).
_IPYKERNEL_FLAGS = (
    "--HistoryManager.enabled=False",
    "--InlineBackend.figure_formats=png",
    "--IPKernelApp.quiet=True",
    "--Kernel._execute_sleep=0",
)


class KernelLost(RuntimeError):
    """A kernel died while it was being measured."""


@dataclass(frozen=True)
class Plan:
    """How many times each measurement is repeated."""

    start_warmup: int
    starts: int
    execute_warmup: int
    executes: int
    #: round trips per block; blocks of the variants alternate
    block: int
    #: warm sessions' first results (each waits, untimed, for the pool's refill)
    first_results: int = 60
    #: baseline round trips timed before each first result
    first_result_baseline: int = 5
    #: held cells (and baseline round trips) each timed after ``IDLE_S`` of idling
    after_idle: int = 20


FULL = Plan(start_warmup=2, starts=20, execute_warmup=50, executes=500, block=50)
QUICK = Plan(
    start_warmup=1, starts=3, execute_warmup=10, executes=50, block=10, first_results=5,
    after_idle=3,
)  # fmt: skip
#: How long both kernels idle before each "after idle" round trip: a pooled
#: kernel idles at least this long before its session's first cell.
IDLE_S = 0.3
#: What a session runs in the engine-path measurements (a value, as users' cells have).
SESSION_CODE = "1+1"
#: Warm kernels the engine keeps for the first-result measurement.
SESSION_POOL = 2


# ---------------------------------------------------------------------------
# the baseline: a plain ipykernel


class PlainKernel:
    """An unsandboxed ipykernel started by ``AsyncKernelManager``: the baseline.

    Args:
        spec_dir: a kernel-spec folder holding ``python3/kernel.json``.
        work_dir: the kernel's working directory.
        transport: ``ipc`` (like the sandboxed kernel) or ``tcp``.
    """

    def __init__(self, spec_dir: Path, work_dir: Path, transport: str) -> None:
        self.spec_dir = spec_dir
        self.work_dir = work_dir
        self.transport = transport
        self.env: dict[str, str] = {}
        self.km: AsyncKernelManager | None = None
        self.client: AsyncKernelClient | None = None
        self._run_dir: Path | None = None
        self._closed = False

    @property
    def pid(self) -> int:
        if self.km is None or self.km.provisioner is None:
            raise RuntimeError("baseline kernel not started")
        pid = getattr(self.km.provisioner, "pid", None)
        if not isinstance(pid, int):
            raise RuntimeError("baseline kernel has no process")
        return pid

    @property
    def alive(self) -> bool:
        process = getattr(self.km.provisioner, "process", None) if self.km else None
        return isinstance(process, subprocess.Popen) and process.poll() is None

    async def start(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the kernel and wait until it answers ``kernel_info``."""
        # A fresh folder per kernel keeps ipc socket names and connection files apart.
        self._run_dir = Path(tempfile.mkdtemp(prefix="k", dir=self.work_dir))
        options: dict[str, Any] = {
            "kernel_name": "python3",
            "kernel_spec_manager": KernelSpecManager(kernel_dirs=[str(self.spec_dir)]),
            "transport": self.transport,
            "connection_file": str(self._run_dir / "connection.json"),
        }
        if self.transport == "ipc":
            options["ip"] = str(self._run_dir / "k")
        km = AsyncKernelManager(**options)
        self.km = km
        try:
            await km.start_kernel(env=self.env, cwd=str(self.work_dir / "workspace"))
            client = km.client()
            assert isinstance(client, AsyncKernelClient)
            client.start_channels(hb=False)  # as the engine starts its own
            self.client = client
            # The same readiness check as the sandboxed kernel, so that the
            # comparison is of the sandbox alone.
            await asyncio.wait_for(
                wait_until_ready(client, timeout_s, lambda: self.alive), timeout_s + 1
            )
        except BaseException:
            await self.shutdown()
            raise

    async def shutdown(self, *, grace_s: float = 1.0) -> None:
        """End the kernel the way ``SandboxedKernel.shutdown`` ends its nsjail. Idempotent.

        SIGTERM, a pidfd wait of at most ``grace_s``, SIGKILL, then jupyter_client's
        clean-up. jupyter_client's own ``shutdown_kernel()`` asks over the control
        channel and polls every 100 ms, and under load sometimes waits out its
        2.5 s limit before signalling: a different procedure, not a baseline.
        """
        if self._closed:
            return
        self._closed = True
        km = self.km
        try:
            if self.client is not None:
                self.client.stop_channels()
            process = getattr(km.provisioner, "process", None) if km is not None else None
            if isinstance(process, subprocess.Popen) and process.poll() is None:
                process.terminate()
                try:
                    await asyncio.wait_for(wait_exit(process), grace_s)
                except TimeoutError:
                    process.kill()
                    await asyncio.wait_for(wait_exit(process), 5)
        finally:
            try:
                if km is not None:
                    await km.cleanup_resources(restart=False)
            finally:
                if self._run_dir is not None:
                    shutil.rmtree(self._run_dir, ignore_errors=True)


def _write_baseline_spec(spec_root: Path, python: str) -> None:
    """A ``python3`` spec running ``python`` the way the sandboxed spec runs ipykernel.

    Built here rather than taken from the environment so the interpreter and
    flags are pinned, and so it declares no transport encryption (the
    sandboxed spec declares none either).
    """
    spec = spec_root / "python3"
    spec.mkdir(parents=True)
    argv = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", *_IPYKERNEL_FLAGS]
    kernel_json = {
        "argv": argv,
        "display_name": "Python 3 (baseline)",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {},
    }
    (spec / "kernel.json").write_text(json.dumps(kernel_json, indent=1))


def _baseline_env(policy: Policy, host: SandboxHost, work_dir: Path) -> dict[str, str]:
    """The sandbox's environment, with its in-sandbox ``/tmp`` paths moved to ``work_dir``."""
    env: dict[str, str] = {}
    for item in sandbox_env(policy, host.runtime):
        key, _, value = item.partition("=")
        if value == "/tmp" or value.startswith("/tmp/"):
            value = str(work_dir) + value[len("/tmp") :]
        env[key] = value
    env.pop("SANDKERNEL_WORKSPACE", None)
    return env


# ---------------------------------------------------------------------------
# what is timed


async def protocol_round_trip(
    client: AsyncKernelClient,
    code: str,
    alive: Callable[[], bool],
    *,
    timeout_s: float = EXECUTE_TIMEOUT_S,
) -> None:
    """Run ``code``: execute_request, iopub until its ``idle`` status, then its reply.

    The messages ``SandboxedKernel.execute`` waits for, read the same way
    (iopub polled with the same timeout), without its bookkeeping (cgroup
    accounting, output folding, the result model). ``alive`` is asked while
    nothing arrives, as the engine does, so a dead kernel fails fast.
    """
    deadline = time.monotonic() + timeout_s
    msg_id = client.execute(code, silent=False, store_history=True, allow_stdin=False)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no idle status for {code!r} within {timeout_s} s")
        try:
            msg = await client.get_iopub_msg(timeout=min(remaining, _POLL_S))
        except queue.Empty:
            if not alive():
                raise KernelLost(f"the kernel died while running {code!r}") from None
            continue
        if (
            msg.get("parent_header", {}).get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"].get("execution_state") == "idle"
        ):
            break
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no execute_reply for {code!r} within {timeout_s} s")
        reply = await client.get_shell_msg(timeout=remaining)
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            break
    if reply["content"].get("status") != "ok":
        raise RuntimeError(f"{code!r} failed in the baseline kernel: {reply['content']}")


async def sandboxed_execute(kernel: SandboxedKernel, code: str) -> None:
    result = await kernel.execute(code, timeout_s=EXECUTE_TIMEOUT_S)
    if not result.kernel_alive:
        raise KernelLost(f"the sandboxed kernel died running {code!r}: {result.message}")
    if result.status != "ok":
        raise RuntimeError(f"{code!r} failed in the sandboxed kernel: {result.status}")


# ---------------------------------------------------------------------------
# memory


def _tree_memory(pids: Sequence[int]) -> dict[str, int]:
    rss = uss = count = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = psutil.Process(pid).memory_full_info()
            rss += info.rss
            uss += info.uss
            count += 1
    return {"rss_bytes": rss, "uss_bytes": uss, "processes": count}


def sandboxed_memory(kernel: SandboxedKernel) -> dict[str, int]:
    """RSS and USS of every process in the kernel's cgroup, and the cgroup's own count."""
    cgroup = kernel.cgroup
    found = _tree_memory(cgroup.pids())
    usage_file = "memory.current" if cgroup.layout.version is CgroupVersion.V2 else (
        "memory.usage_in_bytes"
    )  # fmt: skip
    try:
        found["cgroup_bytes"] = int((cgroup.dirs["memory"] / usage_file).read_text())
    except OSError as exc:
        raise KernelLost(f"the sandboxed kernel's cgroup is gone: {exc}") from None
    if not kernel.alive:
        raise KernelLost("the sandboxed kernel died before its memory was read")
    return found


def plain_memory(kernel: PlainKernel) -> dict[str, int]:
    """RSS and USS of the baseline kernel's process and its children."""
    if not kernel.alive:
        raise KernelLost("the baseline kernel died before its memory was read")
    process = psutil.Process(kernel.pid)
    return _tree_memory([process.pid, *(c.pid for c in process.children(recursive=True))])


# ---------------------------------------------------------------------------
# the run


@dataclass
class _Setup:
    host: SandboxHost
    policy: Policy
    spec_dir: Path
    work_dir: Path
    env: dict[str, str]
    transport: str = "ipc"
    #: why measurements were repeated (see ``_attempt``)
    repeats: list[str] = field(default_factory=list)

    def plain(self) -> PlainKernel:
        kernel = PlainKernel(self.spec_dir, self.work_dir, self.transport)
        kernel.env = self.env
        return kernel


@dataclass
class _Cycle:
    start_ns: int
    shutdown_ns: int
    memory: dict[str, int]


async def _sandboxed_cycle(setup: _Setup) -> _Cycle:
    kernel = SandboxedKernel(setup.host, setup.policy)
    try:
        started = time.perf_counter_ns()
        await kernel.start(timeout_s=START_TIMEOUT_S)
        ready = time.perf_counter_ns()
        memory = sandboxed_memory(kernel)
        stopping = time.perf_counter_ns()
        await kernel.shutdown()
        stopped = time.perf_counter_ns()
    finally:
        await kernel.shutdown()  # idempotent: covers a failure before the timed shutdown
    return _Cycle(ready - started, stopped - stopping, memory)


async def _plain_cycle(setup: _Setup) -> _Cycle:
    kernel = setup.plain()
    try:
        started = time.perf_counter_ns()
        await kernel.start(timeout_s=START_TIMEOUT_S)
        ready = time.perf_counter_ns()
        memory = plain_memory(kernel)
        stopping = time.perf_counter_ns()
        await kernel.shutdown()
        stopped = time.perf_counter_ns()
    finally:
        await kernel.shutdown()  # idempotent: covers a failure before the timed shutdown
    return _Cycle(ready - started, stopped - stopping, memory)


async def _attempt[T](setup: _Setup, what: str, measure: Callable[[], Awaitable[T]]) -> T:
    """Run ``measure``; if a kernel died under it, run it again, up to MAX_ATTEMPTS.

    On a shared host a kernel can be killed from outside the run (another
    engine's clean-up, the OOM killer); one lost kernel then costs one repeated
    measurement instead of the whole run. Every repeat is printed and reported.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return await measure()
        except (KernelLost, KernelStartFailed, KernelDead) as exc:
            reason = str(exc).splitlines()[0]
            setup.repeats.append(f"{what}: {reason}")
            print(
                f"{what}: a kernel was lost ({reason}); attempt {attempt} of {MAX_ATTEMPTS}",
                file=sys.stderr,
            )
            if attempt == MAX_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def _choose_transport(setup: _Setup) -> str:
    """``ipc`` if a baseline kernel starts on it, else ``tcp`` (also a warm-up start)."""
    setup.transport = "ipc"
    try:
        await _plain_cycle(setup)
    except Exception:
        setup.transport = "tcp"
        await _plain_cycle(setup)
    return setup.transport


async def _measure_starts(setup: _Setup, plan: Plan) -> dict[str, list[_Cycle]]:
    cycles: dict[str, list[_Cycle]] = {"sandboxed": [], "unsandboxed": []}
    runners = {"sandboxed": _sandboxed_cycle, "unsandboxed": _plain_cycle}
    for i in range(plan.start_warmup + plan.starts):
        # ABBA order: neither side always follows the other's shutdown.
        order = ("sandboxed", "unsandboxed") if i % 2 == 0 else ("unsandboxed", "sandboxed")
        for side in order:
            gc.collect()
            measure = functools.partial(runners[side], setup)
            cycle = await _attempt(setup, f"{side} start", measure)
            if i >= plan.start_warmup:
                cycles[side].append(cycle)
    return cycles


async def _measure_round_trips(setup: _Setup, plan: Plan) -> dict[str, list[int]]:
    return await _attempt(setup, "round trips", functools.partial(_round_trips_once, setup, plan))


async def _round_trips_once(setup: _Setup, plan: Plan) -> dict[str, list[int]]:
    async with contextlib.AsyncExitStack() as stack:
        sandboxed = SandboxedKernel(setup.host, setup.policy)
        stack.push_async_callback(sandboxed.shutdown)
        plain = setup.plain()
        stack.push_async_callback(plain.shutdown)
        await sandboxed.start(timeout_s=START_TIMEOUT_S)
        await plain.start(timeout_s=START_TIMEOUT_S)
        assert plain.client is not None
        plain_client = plain.client

        variants: dict[str, Callable[[], Awaitable[None]]] = {
            "sandboxed_execute": lambda: sandboxed_execute(sandboxed, CODE),
            "unsandboxed_protocol": lambda: protocol_round_trip(
                plain_client, CODE, lambda: plain.alive
            ),
        }
        # The sandboxed kernel's own client, driven like the baseline's: splits
        # the sandbox's cost from the engine's per-cell bookkeeping.
        sandboxed_client = getattr(sandboxed, "_client", None)
        if isinstance(sandboxed_client, AsyncKernelClient):
            variants["sandboxed_protocol"] = lambda: protocol_round_trip(
                sandboxed_client, CODE, lambda: sandboxed.alive
            )

        async def own_iopub(name: str) -> None:
            # While no cell runs, the kernel reads and drops IOPub itself (output
            # of threads a cell left running); driving its client directly, the
            # benchmark must have IOPub to itself. Switched between blocks, untimed.
            if name == "sandboxed_protocol":
                await sandboxed._stop_drain()
            elif sandboxed.alive:
                sandboxed._start_drain()

        for name, run_once in variants.items():
            await own_iopub(name)
            for _ in range(plan.execute_warmup):
                await run_once()

        samples: dict[str, list[int]] = {name: [] for name in variants}
        names = list(variants)
        for block in range(math.ceil(plan.executes / plan.block)):
            count = min(plan.block, plan.executes - block * plan.block)
            shift = block % len(names)
            for name in names[shift:] + names[:shift]:
                run_once = variants[name]
                await own_iopub(name)
                gc.collect()
                for _ in range(count):
                    started = time.perf_counter_ns()
                    await run_once()
                    samples[name].append(time.perf_counter_ns() - started)
        return samples


async def _wait_warm(engine: Engine, count: int) -> None:
    async with asyncio.timeout(120):
        while (await engine.stats()).pool.warm < count:  # noqa: ASYNC110 - polled, bounded
            await asyncio.sleep(0.01)


async def _session_cell(session: Session) -> None:
    result = await session.run(SESSION_CODE, timeout_s=EXECUTE_TIMEOUT_S)
    if not result.kernel_alive:
        raise KernelLost(f"the session's kernel died running {SESSION_CODE!r}: {result.message}")
    if result.text != "2":
        raise RuntimeError(f"{SESSION_CODE!r} in a session gave {result.status}: {result.text}")


async def _sessions_once(setup: _Setup, plan: Plan, store: Path) -> dict[str, list[int]]:
    samples: dict[str, list[int]] = {
        "session_held": [],
        "unsandboxed_protocol_held": [],
        "session_first_result": [],
        "unsandboxed_protocol_first": [],
        "session_held_after_idle": [],
        "unsandboxed_protocol_held_after_idle": [],
    }
    async with contextlib.AsyncExitStack() as stack:
        plain = setup.plain()
        stack.push_async_callback(plain.shutdown)
        await plain.start(timeout_s=START_TIMEOUT_S)
        assert plain.client is not None
        plain_client = plain.client

        async def baseline() -> None:
            await protocol_round_trip(plain_client, SESSION_CODE, lambda: plain.alive)

        engine = Engine(
            policy=setup.policy, store_dir=store, pool_size=SESSION_POOL, handle_sigterm=False
        )
        # The baseline imports what the engine's kernels import before hand-out:
        # with pyplot loaded, IPython runs the inline backend's hooks after every
        # cell, in both kernels alike.
        imports = "\n".join(
            f"try:\n    import {m}\nexcept ImportError:\n    pass" for m in engine.prewarm_imports
        )
        await protocol_round_trip(plain_client, imports, lambda: plain.alive, timeout_s=120)
        await stack.enter_async_context(engine)
        await _wait_warm(engine, SESSION_POOL)

        async def timed(name: str, run_once: Callable[[], Awaitable[None]], count: int) -> None:
            for _ in range(count):
                started = time.perf_counter_ns()
                await run_once()
                samples[name].append(time.perf_counter_ns() - started)

        # A warm session's first result: session() then run, the pool full.
        for _ in range(plan.execute_warmup):
            await baseline()
        for i in range(3 + plan.first_results):
            gc.collect()
            await timed("unsandboxed_protocol_first", baseline, plan.first_result_baseline)
            started = time.perf_counter_ns()
            session = await engine.session()
            await _session_cell(session)
            elapsed = time.perf_counter_ns() - started
            await session.close()
            if i >= 3:  # 3 warm-ups
                samples["session_first_result"].append(elapsed)
            else:
                del samples["unsandboxed_protocol_first"][-plan.first_result_baseline :]
            await _wait_warm(engine, SESSION_POOL)

        # A held session's cell, in blocks rotating with the baseline's.
        session = await engine.session()
        stack.push_async_callback(session.close)
        await _wait_warm(engine, SESSION_POOL)  # its refill is not measured

        async def held() -> None:
            await _session_cell(session)

        variants = {"session_held": held, "unsandboxed_protocol_held": baseline}
        for run_once in variants.values():
            for _ in range(plan.execute_warmup):
                await run_once()
        names = list(variants)
        for block in range(math.ceil(plan.executes / plan.block)):
            count = min(plan.block, plan.executes - block * plan.block)
            shift = block % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                await timed(name, variants[name], count)

        # The same cells, each after both kernels idled: a pooled kernel's first
        # cell always comes after idling, the baseline's above never does.
        for _ in range(plan.after_idle):
            for name, run_once in variants.items():
                gc.collect()
                await asyncio.sleep(IDLE_S)
                await timed(f"{name}_after_idle", run_once, 1)
    return samples


async def _measure_sessions(setup: _Setup, plan: Plan) -> dict[str, list[int]]:
    store = setup.work_dir / "store"

    async def measure() -> dict[str, list[int]]:
        shutil.rmtree(store, ignore_errors=True)
        return await _sessions_once(setup, plan, store)

    return await _attempt(setup, "sessions", measure)


async def _run(host: SandboxHost, plan: Plan, work_dir: Path) -> dict[str, Any]:
    policy = load_policy(POLICY)
    spec_dir = work_dir / "kernels"
    _write_baseline_spec(spec_dir, host.runtime.python)
    (work_dir / "workspace").mkdir()
    setup = _Setup(host, policy, spec_dir, work_dir, _baseline_env(policy, host, work_dir))
    transport = await _choose_transport(setup)
    cycles = await _measure_starts(setup, plan)
    round_trips = await _measure_round_trips(setup, plan)
    round_trips.update(await _measure_sessions(setup, plan))
    return {
        "transport": transport,
        "repeats": setup.repeats,
        "policy": POLICY,
        "policy_cpus": policy.cpus,
        "policy_memory_mb": policy.memory_mb,
        "cycles": cycles,
        "round_trips": round_trips,
    }


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _mib(value: float) -> str:
    return f"{value / _MIB:.1f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _rounded(samples_ns: Sequence[int]) -> list[float]:
    """Milliseconds to the microsecond, for the JSON file."""
    return [round(ms, 3) for ms in ns_to_ms(samples_ns)]


def run(*, quick: bool) -> dict[str, Any]:
    """Measure both sides in one run; see the module docstring."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    with (
        # No sweep: this run must not remove sandboxes that other engines on the
        # host still use; it cleans up its own kernels itself.
        SandboxHost(sweep=False) as host,
        tempfile.TemporaryDirectory(prefix="sk-bench-") as tmp,
    ):
        raw = asyncio.run(_run(host, plan, Path(tmp)))
    load_after = machine_info()["load_average"]

    cycles: dict[str, list[_Cycle]] = raw["cycles"]
    start = {side: summary(ns_to_ms([c.start_ns for c in cs])) for side, cs in cycles.items()}
    stop = {side: summary(ns_to_ms([c.shutdown_ns for c in cs])) for side, cs in cycles.items()}
    memory: dict[str, dict[str, float]] = {
        side: {
            key: median([c.memory[key] for c in cs])
            for key in cs[0].memory
        }
        for side, cs in cycles.items()
    }  # fmt: skip
    trips = {name: summary(ns_to_ms(ns)) for name, ns in raw["round_trips"].items()}
    base = trips["unsandboxed_protocol"]
    sb_mem, un_mem = memory["sandboxed"], memory["unsandboxed"]

    def pair(
        label: str, sandboxed: dict[str, float], unsandboxed: dict[str, float]
    ) -> list[list[Any]]:
        return [
            [
                f"{label}, {stat} (ms)",
                _ms(sandboxed[stat]),
                _ms(unsandboxed[stat]),
                _x(ratio(sandboxed[stat], unsandboxed[stat])),
            ]
            for stat in ("median", "p99")
        ]

    rows: list[list[Any]] = [
        *pair(f"Start to ready ({plan.starts} starts)", start["sandboxed"], start["unsandboxed"]),
        *pair(f"Shutdown ({plan.starts})", stop["sandboxed"], stop["unsandboxed"]),
        *pair(
            f'`execute("{CODE}")` round trip ({plan.executes})', trips["sandboxed_execute"], base
        ),
    ]
    if "sandboxed_protocol" in trips:
        rows += pair("Protocol-only round trip", trips["sandboxed_protocol"], base)
    held, held_base = trips["session_held"], trips["unsandboxed_protocol_held"]
    first, first_base = trips["session_first_result"], trips["unsandboxed_protocol_first"]
    idle, idle_base = (
        trips["session_held_after_idle"], trips["unsandboxed_protocol_held_after_idle"]
    )  # fmt: skip
    rows += [
        *pair(f'Held session, `run("{SESSION_CODE}")` ({plan.executes})', held, held_base),
        *pair(
            f"Warm session, `session()` → first result ({plan.first_results})", first, first_base
        ),
        *pair(
            f"Held session after {IDLE_S:g} s idle, both kernels ({plan.after_idle})",
            idle,
            idle_base,
        ),
    ]
    rows += [
        [
            "Idle memory, RSS of process tree (MiB)",
            _mib(sb_mem["rss_bytes"]),
            _mib(un_mem["rss_bytes"]),
            _x(ratio(sb_mem["rss_bytes"], un_mem["rss_bytes"])),
        ],
        [
            "Idle memory, USS of process tree (MiB)",
            _mib(sb_mem["uss_bytes"]),
            _mib(un_mem["uss_bytes"]),
            _x(ratio(sb_mem["uss_bytes"], un_mem["uss_bytes"])),
        ],
        ["Idle memory, cgroup usage (MiB)", _mib(sb_mem["cgroup_bytes"]), "n/a", "—"],
        [
            "Processes per kernel",
            f"{sb_mem['processes']:.0f}",
            f"{un_mem['processes']:.0f}",
            "—",
        ],
    ]

    transport = raw["transport"]
    notes = [
        f"Indicative figures: {machine['cpu_count']} CPUs shared with other work "
        f"(load average {machine['load_average']} before, {load_after} after).",
        f"Baseline: the same interpreter, ipykernel flags and environment, transport "
        f"`{transport}` on both sides, started by `AsyncKernelManager` without nsjail.",
        f"The sandbox runs under policy `{raw['policy']}` ({raw['policy_cpus']:g} CPU quota, "
        f"{raw['policy_memory_mb']} MiB); the baseline has no limits.",
        "Start to ready: `kernel_info` answered and IOPub connected, checked the same way on "
        "both sides (`wait_until_ready`, without jupyter_client's extra 0.2 s IOPub flush); "
        "the sandboxed start also prepares the kernel's folder, tmpfs workspace and cgroup.",
        f"Starts alternate ABBA after {plan.start_warmup} warm-up pair(s) and one transport "
        f"probe; p99 of {plan.starts} starts is close to their maximum.",
        "Shutdown: the same procedure on both sides (SIGTERM, pidfd wait, jupyter_client "
        "clean-up); the sandboxed one also waits for nsjail to tear the jail down and "
        "removes the kernel's cgroup, mounts and folder.",
        f"Round trips: {plan.execute_warmup} warm-up each, then {plan.executes} each in "
        f"blocks of {plan.block} rotating between the variants, all kernels held at once. "
        "`execute` is the engine API (includes cgroup accounting and the result model); "
        "protocol-only drives the sandboxed kernel's client exactly like the baseline's.",
        f"Sessions: an `Engine` (policy `{raw['policy']}`, default prewarm imports and "
        f"self-check, a pool of {SESSION_POOL}) beside a held baseline kernel that imported "
        f"the same modules, running `{SESSION_CODE}` the same way. Held: "
        f"{plan.execute_warmup} warm-up cells each, then {plan.executes} each in rotating "
        f"blocks of {plan.block}. First result: "
        f"`session()` then `run`, {plan.first_results} times after 3 warm-ups, each after "
        f"{plan.first_result_baseline} baseline round trips and with the pool refilled "
        "(awaited, untimed); its ratio is to those round trips. Targets: held ≤ 1.2×, "
        "first result ≤ 1.5× the baseline. After idle: the held session's cell and the "
        f"baseline's round trip, alternating, each after {IDLE_S:g} s without a message "
        f"({plan.after_idle} each): a pooled kernel idles before its first cell, the "
        "baseline before its timed round trips does not; context, not a target.",
        "Memory: median over the freshly started kernels of the start runs. The sandboxed "
        "tree is nsjail, the in-sandbox init and the kernel; USS counts pages only that "
        "process maps, so the forked init adds little.",
    ]
    repeats: list[str] = raw["repeats"]
    if repeats:
        notes.append(
            f"{len(repeats)} measurement(s) repeated because a kernel died under them: "
            + "; ".join(repeats)
        )
    versions = {pkg: version(pkg) for pkg in ("ipykernel", "jupyter-client", "pyzmq", "psutil")}
    return {
        "title": "sandboxed kernel vs plain ipykernel (start, round trip, memory)",
        "quick": quick,
        "machine": machine,
        "load_average_after": load_after,
        "plan": asdict(plan),
        "transport": transport,
        "repeats": repeats,
        "policy": raw["policy"],
        "versions": versions,
        "start_ms": start,
        "shutdown_ms": stop,
        "round_trip_ms": trips,
        "ratios": {
            "start_median": ratio(start["sandboxed"]["median"], start["unsandboxed"]["median"]),
            "start_p99": ratio(start["sandboxed"]["p99"], start["unsandboxed"]["p99"]),
            "round_trip_median": ratio(trips["sandboxed_execute"]["median"], base["median"]),
            "round_trip_p99": ratio(trips["sandboxed_execute"]["p99"], base["p99"]),
            "shutdown_median": ratio(stop["sandboxed"]["median"], stop["unsandboxed"]["median"]),
            "session_held_median": ratio(held["median"], held_base["median"]),
            "session_held_p99": ratio(held["p99"], held_base["p99"]),
            "session_first_result_median": ratio(first["median"], first_base["median"]),
            "session_first_result_p99": ratio(first["p99"], first_base["p99"]),
            "session_held_after_idle_median": ratio(idle["median"], idle_base["median"]),
            "idle_rss": ratio(sb_mem["rss_bytes"], un_mem["rss_bytes"]),
            "idle_uss": ratio(sb_mem["uss_bytes"], un_mem["uss_bytes"]),
        },
        "idle_memory_bytes": memory,
        "samples_ms": {
            "start": {s: _rounded([c.start_ns for c in cs]) for s, cs in cycles.items()},
            "shutdown": {s: _rounded([c.shutdown_ns for c in cs]) for s, cs in cycles.items()},
            "round_trip": {name: _rounded(ns) for name, ns in raw["round_trips"].items()},
        },
        "table": {"columns": ["Metric", "Sandboxed", "Unsandboxed", "Ratio"], "rows": rows},
        "notes": notes,
    }
