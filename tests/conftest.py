"""Shared fixtures: sandbox hosts and kernels that always clean up, with a leak check."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import CgroupLayout, CgroupVersion, SandboxHost, mounts_under
from tests.zygote import mode as zygote_mode

if zygote_mode.enabled():
    zygote_mode.install()

# Tallies printed at the end of a run. Plugins of this conftest rather than
# hooks of their folders' own: under pytest-xdist the reports reach the
# controller, which loads this conftest only.
pytest_plugins = ("tests.contract._tally", "tests.security._tally")


def sandbox_available() -> str | None:
    """None if real sandboxes can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if CgroupLayout.detect().version is CgroupVersion.NONE:
        return "no usable cgroups"
    try:
        from sandkernel.sandbox import find_nsjail

        find_nsjail()
    except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip
        return str(exc)
    return None


_WHY_NOT = sandbox_available()


def pytest_configure(config: pytest.Config) -> None:
    # Started as a background job of a shell without job control (a CI step
    # run with `&`, nohup), the run ignores SIGINT, and so would every process
    # it starts: Python then installs no KeyboardInterrupt handler. The tests
    # of ^C expect what a terminal's foreground gives, whatever started them.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The longest tests first: pytest-xdist hands tests out in this order, and
    # a run whose last test takes minutes ends with every other worker idle.
    items.sort(key=lambda item: item.get_closest_marker("early") is None)
    if _WHY_NOT is None:
        return
    skip = pytest.mark.skip(reason=f"sandbox unavailable: {_WHY_NOT}")
    for item in items:
        if "sandbox" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def leftovers(host: SandboxHost) -> list[str]:
    """Everything of this host's still on the machine: kernel dirs, cgroups, mounts."""
    found = [
        f"dir {p}"
        for p in host.root.iterdir()
        if p.name != "owners" and p.name.startswith(host.owner)
    ]
    for parent in host.cgroups.parent_dirs():
        found += [f"cgroup {p}" for p in parent.glob(f"{host.owner}-*")]
    found += [
        f"mount {m}"
        for m in mounts_under(host.root)
        if m.relative_to(host.root).parts[0].startswith(host.owner)
    ]
    return found


def open_fds() -> Counter[str]:
    """This process's open fds, counted by what they point at."""
    fds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[os.readlink(f"/proc/self/fd/{fd}")] += 1
        except OSError:
            continue
    return fds


def fds_opened_since(before: Counter[str]) -> Counter[str]:
    """Descriptors open now that were not in ``before``, garbage collected first if any are.

    A descriptor that only garbage holds is not left open: a full collection
    closes it. The collection runs only when some descriptor looks left
    open, since in a process that has imported what the whole suite imports
    it takes about a fifth of a second, which every test's teardown paid.
    """
    opened = open_fds() - before
    if opened:
        gc.collect()
        opened = open_fds() - before
    return opened


@pytest.fixture
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHost]:
    """A SandboxHost in its own runtime folder; after the test nothing of it may remain."""
    root = Path("/run") / f"sandkernel-test-{os.getpid()}"
    fds_before = open_fds()
    with SandboxHost(root) as h:
        yield h
        left = leftovers(h)
    assert not left, f"sandbox resources left behind: {left}"
    new_fds = fds_opened_since(fds_before)
    assert not new_fds, f"file descriptors left open: {dict(new_fds)}"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path (for Unix sockets, runtime roots), removed after the test.

    Not under ``tmp_path``, whose path grows with the test's name and, under
    pytest-xdist, with the worker's.
    """
    path = Path(tempfile.mkdtemp(prefix="skd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


KernelFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def kernel_factory(host: SandboxHost) -> AsyncIterator[KernelFactory]:
    """Start sandboxed kernels on demand; all are shut down after the test."""
    from sandkernel.kernel import SandboxedKernel

    kernels: list[SandboxedKernel] = []

    async def make(policy: Policy | str | None = None, **kwargs: Any) -> SandboxedKernel:
        policy = load_policy(policy)
        if zygote_mode.enabled() and "workspace" not in kwargs:
            kwargs.setdefault("zygote", await zygote_mode.ZYGOTES.get(host, policy))
        kernel = SandboxedKernel(host, policy, **kwargs)
        kernels.append(kernel)
        await kernel.start()
        return kernel

    yield make
    for kernel in kernels:
        await kernel.shutdown()
    await zygote_mode.ZYGOTES.close(host)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    root = Path("/run") / f"sandkernel-test-{os.getpid()}"
    if root.exists():
        shutil.rmtree(root / "owners", ignore_errors=True)
        try:
            root.rmdir()
        except OSError:
            print(f"\nsandkernel test runtime folder not empty: {list(root.iterdir())}")
            session.exitstatus = 1


async def cell_under_way(kernel: Any, code: str, *, timeout_s: float = 10) -> asyncio.Future[Any]:
    """``code`` started on ``kernel``, once it has printed (it must print first): its result."""
    printed = asyncio.Event()
    cell = asyncio.ensure_future(
        kernel.execute(code, on_output=lambda m: m["msg_type"] == "stream" and printed.set())
    )
    await asyncio.wait_for(printed.wait(), timeout_s)
    return cell


@dataclass
class HeldShutdowns:
    """Kernels' shutdowns held at their start: ``entered`` once one is, until ``gate`` is set."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def held_shutdowns(monkeypatch: pytest.MonkeyPatch) -> HeldShutdowns:
    """Every kernel's shutdown waits, before it stops anything, for the test to let it go on."""
    from sandkernel.kernel import SandboxedKernel

    held = HeldShutdowns()
    stop_drain = SandboxedKernel._stop_drain

    async def held_stop_drain(self: SandboxedKernel) -> None:
        held.entered.set()
        await held.gate.wait()
        await stop_drain(self)

    monkeypatch.setattr(SandboxedKernel, "_stop_drain", held_stop_drain)
    return held


def runtime_root() -> Path:
    return Path("/run") / f"sandkernel-test-{os.getpid()}"


@pytest.fixture
async def engine_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Engines in the test runtime folder; after the test: closed, nothing left behind."""
    from sandkernel.engine import Engine

    engines: list[Engine] = []
    fds_before = open_fds()

    async def make(**kwargs: Any) -> Engine:
        kwargs.setdefault("runtime_dir", runtime_root())
        kwargs.setdefault("store_dir", tmp_path_factory.mktemp("store"))
        kwargs.setdefault("prewarm_imports", ())
        kwargs.setdefault("pool_size", 1)
        kwargs.setdefault("handle_sigterm", False)
        engine = Engine(**kwargs)
        engines.append(engine)
        await engine.start()
        return engine

    yield make
    for engine in engines:
        host = engine._host
        await engine.aclose()
        if host is not None:
            left = leftovers(host)
            assert not left, f"engine left resources behind: {left}"
    new_fds = fds_opened_since(fds_before)
    assert not new_fds, f"file descriptors left open: {dict(new_fds)}"


@contextlib.contextmanager
def engine_process(script: str, ready: Path, *, timeout_s: float = 60) -> Iterator[tuple[Any, str]]:
    """Run ``script`` (Python) in a child process until it writes ``ready``.

    Yields the process and what it wrote to ``ready`` (its engine's owner id);
    the process is killed and reaped afterwards whatever happened.
    """
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "engine did not start"
            time.sleep(0.05)
        yield proc, ready.read_text()
    finally:
        proc.kill()
        proc.wait()
