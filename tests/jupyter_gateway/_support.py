"""A daemon serving the Jupyter Kernel Gateway API over TCP with a token, as a subprocess.

A subprocess, not a task on the test's event loop: clients under test (a
Jupyter Server, a browser, blocking websocket clients, benchmarks) may block
the thread they run on, and the daemon must keep answering meanwhile.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tests.daemon.conftest import DaemonProcess, leftovers_of, spawn_daemon, stop_process

_LISTENING = re.compile(r"and http://(?P<host>[^\s]+):(?P<port>\d+) \(token required\)")


class Gateway(NamedTuple):
    """Where a daemon serves the gateway API, and the token its clients send."""

    url: str
    token: str


@dataclass
class GatewayProcess:
    """A running gateway daemon: its address and token, its process, socket and store."""

    gateway: Gateway
    process: DaemonProcess
    store: Path

    @property
    def socket(self) -> Path:
        """The daemon's Unix socket (no token needed there)."""
        return self.process.socket


def _tcp_port(process: DaemonProcess, timeout_s: float) -> tuple[str, int]:
    # The daemon logs its TCP address once it accepts; spawn_daemon waited for that.
    deadline = time.monotonic() + timeout_s
    while True:
        found = _LISTENING.search(process.log_text())
        if found is not None:
            return found["host"], int(found["port"])
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon logged no TCP address:\n{process.log_text()}")
        time.sleep(0.05)  # polled log of another process, bounded by the deadline


@contextlib.contextmanager
def running_gateway(
    *,
    policy: str | Path | None = None,
    pool_size: int = 2,
    prewarm: str = "",
    extra: Sequence[str] = (),
) -> Iterator[GatewayProcess]:
    """Start ``sandkernel serve --tcp 127.0.0.1:0`` with a fresh token; stop it after.

    Args:
        policy: a shipped policy name or a TOML path (default: the default policy).
        pool_size: warm kernels.
        prewarm: modules imported in warm kernels (comma-separated; '' for none).
        extra: more ``serve`` arguments.

    Yields:
        The running daemon; ``.gateway`` is its ``(url, token)``. After the
        block, the daemon is stopped and nothing of it may remain.
    """
    folder = Path(tempfile.mkdtemp(prefix="skg-", dir="/tmp"))
    token = secrets.token_urlsafe(24)
    token_file = folder / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    args = ["--tcp", "127.0.0.1:0", "--token-file", str(token_file)]
    args += ["--pool-size", str(pool_size), "--prewarm", prewarm]
    if policy is not None:
        args += ["--policy", str(policy)]
    process = spawn_daemon(
        folder / "d.sock", folder / "store", folder / "daemon.log", *args, *extra
    )
    try:
        host, port = _tcp_port(process, 10)
        yield GatewayProcess(Gateway(f"http://{host}:{port}", token), process, folder / "store")
    finally:
        code = stop_process(process.process)
        left = leftovers_of(process.pid)
        log = process.log_text()
        shutil.rmtree(folder, ignore_errors=True)
    assert code == 0, f"the daemon exited {code}:\n{log[-4000:]}"
    assert not left, f"the daemon left resources behind: {left}"
