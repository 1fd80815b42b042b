"""A daemon serving the Jupyter Kernel Gateway API over TCP with a token, as a subprocess.

A subprocess, not a task on the test's event loop: clients under test (a
Jupyter Server, a browser, blocking websocket clients, benchmarks) may block
the thread they run on, and the daemon must keep answering meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from tests.daemon.conftest import DaemonProcess, leftovers_of, spawn_daemon, stop_process
from tests.jupyter_gateway._clients import new_message

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


# -- a Jupyter client over the gateway's WebSocket ---------------------------------------


def ws_url(gateway: Gateway, kernel_id: str, **query: str) -> str:
    """The kernel's channels URL (``ws://``), with ``query`` parameters."""
    url = gateway.url.replace("http://", "ws://", 1) + f"/api/kernels/{kernel_id}/channels"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


def auth(gateway: Gateway) -> dict[str, str]:
    """The header Jupyter clients send the token in."""
    return {"Authorization": f"token {gateway.token}"}


def message(
    msg_type: str, content: dict[str, Any], channel: str = "shell", session: str = "test"
) -> dict[str, Any]:
    """A Jupyter message as a client sends it on the JSON protocol."""
    return new_message(msg_type, content, session=session, channel=channel)


def execute_request(code: str, *, allow_stdin: bool = False) -> dict[str, Any]:
    return message(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": True,
        },
    )


@dataclass
class Cell:
    """What one execute_request brought back: its reply and its IOPub messages."""

    reply: dict[str, Any]
    outputs: list[dict[str, Any]]

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["header"]["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )

    @property
    def status(self) -> str:
        return str(self.reply["content"]["status"])

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [m for m in self.outputs if m["header"]["msg_type"] == msg_type]


class KernelSocket:
    """One WebSocket on a kernel: send messages, wait for the ones a test expects.

    Every message received is kept (``seen``), so a test can look for one
    that came while it waited for another. Waits have deadlines, never sleeps.
    """

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []
        self._read = 0
        self._sent_at: dict[str, int] = {}  # msg_id -> messages received before it was sent

    async def send(self, msg: dict[str, Any]) -> str:
        msg_id = str(msg["header"]["msg_id"])
        self._sent_at[msg_id] = len(self.seen)
        await self.ws.send(json.dumps(msg))
        return msg_id

    async def next(self, timeout_s: float = 60) -> dict[str, Any]:
        """The next message not yet handed out (received now if needed)."""
        if self._read < len(self.seen):
            self._read += 1
            return self.seen[self._read - 1]
        async with asyncio.timeout(timeout_s):
            frame = await self.ws.recv()
        msg: dict[str, Any] = json.loads(frame)
        self.seen.append(msg)
        self._read += 1
        return msg

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 60
    ) -> dict[str, Any]:
        """The first message (from the unread ones on) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(msg):
                return msg

    async def execute(self, code: str, timeout_s: float = 60, **options: Any) -> Cell:
        """Run a cell; returns once its reply and its IOPub ``idle`` have both come."""
        msg_id = await self.send(execute_request(code, **options))
        return await self.result_of(msg_id, timeout_s)

    async def result_of(self, msg_id: str, timeout_s: float = 60) -> Cell:
        """The reply and IOPub messages of a request, also those already received.

        Complete once the reply and the request's IOPub ``idle`` have come, or
        the reply and the kernel's ``status: dead`` (a dead kernel goes idle no more).
        """
        reply: dict[str, Any] | None = None
        outputs: list[dict[str, Any]] = []
        done = False
        deadline = time.monotonic() + timeout_s
        index = self._sent_at.get(msg_id, 0)
        while reply is None or not done:
            if index < len(self.seen):
                msg = self.seen[index]
            else:
                await self.next(max(0.01, deadline - time.monotonic()))
                continue
            index += 1
            self._read = max(self._read, index)
            if is_status("dead")(msg):
                done = True
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell":
                reply = msg
            elif msg["channel"] == "iopub":
                outputs.append(msg)
                if is_status("idle")(msg):
                    done = True
        return Cell(reply, outputs)


def is_status(state: str) -> Callable[[dict[str, Any]], bool]:
    def check(msg: dict[str, Any]) -> bool:
        return (
            msg.get("channel") == "iopub"
            and msg["header"]["msg_type"] == "status"
            and msg["content"].get("execution_state") == state
        )

    return check


class GatewayClient:
    """REST and WebSocket calls on one gateway, with its token; kernels deleted on close."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.http = httpx.AsyncClient(base_url=gateway.url, headers=auth(gateway), timeout=120)
        self._kernels: list[str] = []
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()
        for kernel_id in self._kernels:
            await self.http.delete(f"/api/kernels/{kernel_id}")
        await self.http.aclose()

    async def start_kernel(self, name: str | None = None) -> str:
        response = await self.http.post("/api/kernels", json={"name": name} if name else {})
        assert response.status_code == 201, response.text
        kernel_id = str(response.json()["id"])
        self._kernels.append(kernel_id)
        return kernel_id

    async def kernel(self, kernel_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/kernels/{kernel_id}")
        assert response.status_code == 200, response.text
        model: dict[str, Any] = response.json()
        return model

    async def connect(
        self, kernel_id: str, *, subprotocols: Sequence[str] | None = None, **query: str
    ) -> KernelSocket:
        ws = await self._stack.enter_async_context(
            websockets.connect(
                ws_url(self.gateway, kernel_id, **query),
                additional_headers=auth(self.gateway),
                subprotocols=[websockets.Subprotocol(s) for s in subprotocols]
                if subprotocols
                else None,
                max_size=None,
            )
        )
        return KernelSocket(ws)
