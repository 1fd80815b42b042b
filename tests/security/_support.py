"""Helpers shared by the attack modules: run hostile code, read its verdict."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sandkernel._attacks import PRELUDE
from sandkernel.kernel import SandboxedKernel
from sandkernel.results import ExecutionResult
from sandkernel.session import Session
from tests.conftest import runtime_root


def _code(code: str) -> str:
    return PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(result))\n"


async def run_json(target: SandboxedKernel | Session, code: str, *, timeout_s: float = 30) -> Any:
    """Run ``code`` (which sets ``result``) after :data:`PRELUDE`; return ``result``."""
    r = await run(target, _code(code), timeout_s=timeout_s)
    assert r.status == "ok", f"{r.status}: {r.message}\n{r.stderr}\n{r.error}"
    return json.loads(r.stdout.strip().splitlines()[-1])


async def run(
    target: SandboxedKernel | Session, code: str, *, timeout_s: float | None = None
) -> ExecutionResult:
    """One cell, on a kernel or a session."""
    if isinstance(target, SandboxedKernel):
        return await target.execute(code, timeout_s=timeout_s)
    return await target.run(code, timeout_s=timeout_s)


async def latency_s(session: Session) -> float:
    """Seconds a trivial cell takes in ``session`` (and that it answered right)."""
    started = time.monotonic()
    r = await session.run("6 * 7", timeout_s=30)
    elapsed = time.monotonic() - started
    assert r.status == "ok" and r.text == "42", r
    return elapsed


#: An attack prints this (flushed) once it is under way.
STARTED = "ATTACK-UNDER-WAY"
# ipykernel's flush() returns once its IOPub thread has *queued* the stream
# message; the send itself is one more step on that thread, which needs the
# GIL. An attack that then holds the GIL in C (a regex backtracking) would
# keep its announcement from ever leaving. A second flush returns only after
# the IOPub thread has got past that send.
ANNOUNCE = f"import sys\nprint({STARTED!r}, flush=True)\nsys.stdout.flush()\n"


async def while_running(
    attacker: Session, code: str, bystander: Session, *, timeout_s: float, probes: int = 5
) -> tuple[ExecutionResult, list[float]]:
    """Run ``code`` in ``attacker`` and, while it runs, time cells of ``bystander``.

    ``code`` must print :data:`STARTED` (see :data:`ANNOUNCE`) once the attack
    is under way; the probes start then, and stop early if the attack ends.
    """
    under_way = asyncio.Event()

    def watch(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and STARTED in msg["content"].get("text", ""):
            under_way.set()

    task = asyncio.ensure_future(attacker.run(code, timeout_s=timeout_s, on_output=watch))
    latencies: list[float] = []
    try:
        signal = asyncio.ensure_future(under_way.wait())
        await asyncio.wait({task, signal}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        signal.cancel()
        assert under_way.is_set(), "the attack never got under way"
        for _ in range(probes):
            latencies.append(await latency_s(bystander))
            if task.done():
                break
        return await task, latencies
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def swap_sockets_for_a_link(target: str) -> str:
    """A cell that swaps the kernel's sockets for links to ``target`` and drops its control links.

    Each socket is renamed and a symlink to ``target`` (a host socket) put in
    its place; then every connection accepted on the control socket (the
    engine's, the manager's) is shut down, so that zmq on the other side
    reconnects by name. The cell prints how many it dropped.
    """
    return textwrap.dedent(
        f"""
        import json, os, socket
        info = json.load(open('/run/sandkernel/kernel.json'))
        names = [f"{{info['ip']}}-{{info[c + '_port']}}"
                 for c in ('shell', 'iopub', 'stdin', 'control', 'hb')]
        for name in names:
            os.rename(name, name + '.moved')
            os.symlink({target!r}, name)
        dropped = 0
        for fd in map(int, os.listdir('/proc/self/fd')):
            try:
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue  # not a socket
            with s:
                if (s.family == socket.AF_UNIX
                        and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                        and s.getsockname() == names[3]):
                    s.shutdown(socket.SHUT_RDWR)  # the other end sees it closed
                    dropped += 1
        print(dropped)
        """
    )


@contextlib.contextmanager
def host_unix_socket() -> Iterator[tuple[str, socket.socket]]:
    """A listening, non-blocking Unix socket on the host, and its path; removed after."""
    runtime_root().mkdir(parents=True, exist_ok=True)
    path = runtime_root() / f"host-{secrets.token_hex(4)}.sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        try:
            listening.listen()
            listening.setblocking(False)
            yield str(path), listening
        finally:
            path.unlink()


async def nothing_connects(listening: socket.socket, within_s: float = 1.0) -> None:
    """Fail if anything connects to ``listening`` within ``within_s``.

    zmq retries a lost connection every 100 ms: a second is ten times over.
    """
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.get_running_loop().sock_accept(listening), within_s)
