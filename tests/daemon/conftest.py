"""Daemons for the tests: in this process on an ``engine_factory`` engine, or as subprocesses.

Unix socket paths are limited to 107 bytes, so sockets live in short
folders under /tmp rather than in pytest's (long) tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket as socket_module
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sandkernel.daemon.client import AsyncClient
from sandkernel.daemon.server import Daemon, DaemonConfig
from sandkernel.engine import Engine
from sandkernel.sandbox import CgroupLayout, mounts_under
from tests.conftest import runtime_root

EngineFactory = Callable[..., Awaitable[Engine]]
# Generous: on a loaded machine a kernel start can fail and be retried before one is ready.
_ACQUIRE_TIMEOUT_S = 100.0  # within the 120 s per-test timeout


@dataclass
class RunningDaemon:
    """A daemon serving in this process; stopped by the fixture."""

    daemon: Daemon
    engine: Engine
    socket: Path
    task: asyncio.Task[None]
    clients: list[AsyncClient | httpx.AsyncClient] = field(default_factory=list)

    def client(self, **kwargs: Any) -> AsyncClient:
        """A client of this daemon (over its Unix socket unless ``url`` is given)."""
        if "url" not in kwargs:
            kwargs.setdefault("socket", self.socket)
        client = AsyncClient(**kwargs)
        self.clients.append(client)
        return client

    def raw(self) -> httpx.AsyncClient:
        """A plain HTTP client on the socket, for requests the Client would never send."""
        raw = httpx.AsyncClient(
            base_url="http://sandkernel", transport=httpx.AsyncHTTPTransport(uds=str(self.socket))
        )
        self.clients.append(raw)
        return raw

    @property
    def url(self) -> str:
        assert self.daemon.tcp_address is not None
        host, port = self.daemon.tcp_address
        return f"http://{host}:{port}"


DaemonFactory = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def daemon_factory(
    engine_factory: EngineFactory, short_dir: Path, tmp_path: Path
) -> AsyncIterator[DaemonFactory]:
    """Start daemons on fresh engines; after the test: clients closed, daemons stopped."""
    running: list[RunningDaemon] = []

    async def start(
        *, engine_options: dict[str, Any] | None = None, **config: Any
    ) -> RunningDaemon:
        options = {"acquire_timeout_s": _ACQUIRE_TIMEOUT_S, **(engine_options or {})}
        engine = await engine_factory(**options)
        n = len(running)
        config.setdefault("socket_path", short_dir / f"d{n}" / "daemon.sock")
        config.setdefault("records_path", tmp_path / "daemon-sessions.sqlite3")
        daemon = Daemon(engine, DaemonConfig(**config))
        task = asyncio.create_task(daemon.serve())
        ready = asyncio.create_task(daemon.ready.wait())
        await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await task  # raises why it did not start
            raise AssertionError("the daemon did not start within 30 s")
        handle = RunningDaemon(daemon, engine, daemon.config.socket_path, task)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        for client in handle.clients:
            await client.aclose()
        handle.daemon.shutdown()
        async with asyncio.timeout(30):
            await handle.task
        assert not handle.socket.exists(), "the daemon left its socket file behind"


# -- daemons as subprocesses ---------------------------------------------------------------


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_daemon(socket: Path, store: Path, log: Path, *extra: str) -> DaemonProcess:
    """``python -m sandkernel.daemon serve`` in the tests' runtime folder, answering."""
    argv = [
        sys.executable, "-m", "sandkernel.daemon", "serve", "--socket", str(socket),
        "--store", str(store), "--runtime-dir", str(runtime_root()),
        "--pool-size", "1", "--prewarm", "", "--acquire-timeout", str(_ACQUIRE_TIMEOUT_S), *extra,
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    handle = DaemonProcess(process, socket, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the daemon exited {process.returncode}:\n{handle.log_text()}")
        # Probed with a plain socket: httpx's sync transport leaks the socket of a
        # failed Unix connect (a ResourceWarning here).
        if _accepts(socket):
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket))) as probe:
                if probe.get("http://sandkernel/v1/health").status_code == 200:
                    return handle
        time.sleep(0.05)  # polled readiness of another process, bounded by the deadline
    stop_process(handle.process)
    raise AssertionError(f"the daemon did not answer within 60 s:\n{handle.log_text()}")


def _accepts(path: Path) -> bool:
    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Signal the process and wait for it (SIGKILL after 30 s)."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=10)


def leftovers_of(pid: int) -> list[str]:
    """What kernels of the engine in process ``pid`` left: folders, cgroups, mounts, processes."""
    prefix = f"{pid}-"
    root = runtime_root()
    found = (
        [f"dir {p}" for p in root.iterdir() if p.name.startswith(prefix)] if root.exists() else []
    )
    for parent in CgroupLayout.detect().parent_dirs():
        found += [f"cgroup {p}" for p in parent.glob(f"{prefix}*")]
    found += [
        f"mount {m}" for m in mounts_under(root) if m.relative_to(root).parts[0].startswith(prefix)
    ]
    marker = f"{root}/{prefix}"
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if marker in cmdline and proc.pid != os.getpid():
            found.append(f"process {proc.pid}: {cmdline[:120]}")
    return found
