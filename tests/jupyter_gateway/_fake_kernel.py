"""A relay on a kernel the test plays itself, and clients on plain objects (no sandbox, no server).

- :class:`FakeKernel`: a kernel's shell, control and stdin sockets (ZeroMQ
  ROUTERs the test reads and answers) and its IOPub (published through the
  link's tap, as the engine's subscription hands it over);
- :class:`FakeLink`: the engine's side of a kernel (``KernelLink``): it ends
  when the test says so;
- :class:`FakeWebSocket`, :class:`FakeClient`: a client's WebSocket, which can
  stop reading, and a client on the relay;
- :func:`fake_relay`: a :class:`KernelRelay` on fake kernels (a restart gets
  the next one).

Every wait has a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio
from jupyter_client.session import Session
from starlette.websockets import WebSocket

from sandkernel.api import KernelConnectionInfo, KernelLink
from sandkernel.jupyter_gateway.codec import WireMessage, decode
from sandkernel.jupyter_gateway.relay import Connection, KernelRelay
from sandkernel.policy import Policy, load_policy
from sandkernel.results import DisplayOutput, ProducedFile
from tests.jupyter_gateway._support import execute_request, message

_PORTS = {"shell": 1, "control": 2, "stdin": 3}
DEADLINE_S = 10.0


class FakeKernel:
    """A kernel's sockets, bound under ``folder``; the test reads requests and answers them."""

    def __init__(self, context: zmq.asyncio.Context, folder: Path, name: str) -> None:
        self.key = secrets.token_hex(16)
        self.session = Session(key=self.key.encode(), username="kernel")
        self.ip = str(folder / name)
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.identities: dict[str, list[bytes]] = {}
        self.taps: list[Callable[[list[bytes]], None]] = []
        for channel, port in _PORTS.items():
            sock = context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"ipc://{self.ip}-{port}")
            self.sockets[channel] = sock

    def info(self) -> KernelConnectionInfo:
        return {
            "transport": "ipc",
            "ip": self.ip,
            "shell_port": _PORTS["shell"],
            "iopub_port": 0,
            "stdin_port": _PORTS["stdin"],
            "control_port": _PORTS["control"],
            "hb_port": 0,
            "key": self.key,
            "signature_scheme": "hmac-sha256",
        }

    async def receive(self, channel: str = "shell") -> dict[str, Any]:
        """The next request the relay sent on ``channel``."""
        async with asyncio.timeout(DEADLINE_S):
            frames = await self.sockets[channel].recv_multipart()
        identities, parts = self.session.feed_identities(frames)
        self.identities[channel] = list(identities)
        msg: dict[str, Any] = self.session.deserialize(parts)
        return msg

    async def reply(
        self,
        request: dict[str, Any],
        msg_type: str,
        content: dict[str, Any],
        channel: str = "shell",
    ) -> None:
        msg = self.session.msg(msg_type, content, parent=request["header"])
        frames = self.session.serialize(msg, ident=self.identities[channel])
        await self.sockets[channel].send_multipart(frames)

    async def send_raw(self, channel: str, parts: Sequence[bytes]) -> None:
        """Header, parent, metadata and content as given (signed), to the relay's socket."""
        frames = [*self.identities[channel], b"<IDS|MSG>", self.session.sign(list(parts))]
        await self.sockets[channel].send_multipart([*frames, *parts])

    def hand_to_thread(self, channel: str) -> zmq.Socket[bytes]:
        """The socket of ``channel``, for one other thread alone from now on (as a kernel's own).

        A ZeroMQ socket may be used by one thread at a time. Once the event
        loop has awaited on it, pyzmq watches its descriptor and reads its
        state (``EVENTS``) whenever that fires, which races a send in
        another thread: libzmq can then fail an assertion and abort the whole
        process. So the loop stops watching it first (pyzmq's own step at
        close), and is not to use it again.
        """
        sock = self.sockets[channel]
        sock._clear_io_state()  # type: ignore[no-untyped-call]
        return zmq.Socket.shadow(sock.underlying)

    def publish(
        self, msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None
    ) -> None:
        msg = self.session.msg(msg_type, content, parent=(parent or {}).get("header"))
        self.publish_frames(self.session.serialize(msg, ident=b"kernel.fake." + msg_type.encode()))

    def publish_raw(self, parts: Sequence[bytes]) -> None:
        self.publish_frames([b"kernel.fake", b"<IDS|MSG>", self.session.sign(list(parts)), *parts])

    def publish_frames(self, frames: list[bytes]) -> None:
        for tap in list(self.taps):
            tap(frames)

    def status(self, state: str, parent: dict[str, Any] | None = None) -> None:
        self.publish("status", {"execution_state": state}, parent)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)


class FakeLink:
    """The engine's side of a :class:`FakeKernel`: alive until :meth:`die` or ``end``."""

    def __init__(self, kernel: FakeKernel, policy: Policy | None = None) -> None:
        self.kernel = kernel
        self._policy = policy or load_policy("default")
        self.ended = asyncio.Event()
        self.ended_reason: str | None = None
        #: called as the kernel's end is noticed: what it sent just before it died
        self.last_words: Callable[[], None] | None = None
        #: once cleared, storing a cell's files waits for it to be set
        self.collect_gate = asyncio.Event()
        self.collect_gate.set()
        self.collecting = asyncio.Event()  # storing a cell's files began
        #: per call to ``collect``: whether the kernel had been ended
        self.collected: list[bool] = []
        #: per call to ``collect``: the displays it was given to store
        self.displays: list[list[DisplayOutput]] = []
        #: calls to ``collect`` that ran to their end (not cancelled)
        self.stored = 0

    @property
    def session_id(self) -> str:
        return "fake"

    @property
    def alive(self) -> bool:
        return not self.ended.is_set()

    @property
    def policy(self) -> Policy:
        return self._policy

    def connection_info(self) -> KernelConnectionInfo:
        return self.kernel.info()

    def tap_iopub(self, tap: Callable[[list[bytes]], None]) -> Callable[[], None]:
        self.kernel.taps.append(tap)
        return lambda: self.kernel.taps.remove(tap)

    async def wait_ended(self) -> None:
        await self.ended.wait()

    def touch(self, *, ran: bool) -> None:
        pass

    async def interrupt(self) -> None:
        pass

    async def collect(
        self, displays: Sequence[DisplayOutput], execution_count: int | None
    ) -> list[ProducedFile]:
        self.collected.append(self.ended.is_set())
        self.displays.append(list(displays))
        self.collecting.set()
        await self.collect_gate.wait()
        self.stored += 1
        return []

    def ended_because(self, fallback: str) -> str:
        if self.last_words is not None:
            self.last_words()
        return fallback

    async def end(self, reason: str) -> None:
        self.ended_reason = reason
        self.ended.set()

    def die(self) -> None:
        self.ended.set()


class FakeWebSocket:
    """What a :class:`Connection` uses of a WebSocket; a client that reads nothing if ``stuck``."""

    def __init__(self, *, stuck: bool = False) -> None:
        self.frames: asyncio.Queue[str | bytes] = asyncio.Queue()
        self.reading = asyncio.Event()
        if not stuck:
            self.reading.set()
        self.sending = asyncio.Event()  # a send was attempted
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def send_text(self, text: str) -> None:
        self.sending.set()
        await self.reading.wait()
        text.encode()  # as a server does to send it (UTF-8 or nothing)
        self.frames.put_nowait(text)

    async def send_bytes(self, data: bytes) -> None:
        self.sending.set()
        await self.reading.wait()
        self.frames.put_nowait(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code = code
        self.closed.set()


class FakeClient:
    """A client's connection on a relay, with its writer running."""

    def __init__(
        self,
        relay: KernelRelay,
        *,
        session_id: str | None = None,
        protocol: str | None = None,
        stuck: bool = False,
    ) -> None:
        self.relay = relay
        self.protocol = protocol
        self.ws = FakeWebSocket(stuck=stuck)
        self.connection = Connection(cast(WebSocket, self.ws), protocol, session_id)
        relay.connect(self.connection)
        self.writer = asyncio.ensure_future(self.connection.write_loop())
        self.seen: list[WireMessage] = []

    async def send(self, msg: dict[str, Any]) -> dict[str, Any]:
        await self.relay.from_client(self.connection, json.dumps(msg))
        return msg

    async def execute(self, code: str) -> dict[str, Any]:
        return await self.send(execute_request(code))

    async def request(self, msg_type: str, channel: str = "shell") -> dict[str, Any]:
        return await self.send(message(msg_type, {}, channel=channel))

    async def next(self) -> WireMessage:
        async with asyncio.timeout(DEADLINE_S):
            frame = await self.ws.frames.get()
        msg = decode(frame, self.protocol)
        self.seen.append(msg)
        return msg

    async def until(self, predicate: Callable[[WireMessage], bool]) -> WireMessage:
        while True:
            msg = await self.next()
            if predicate(msg):
                return msg

    async def closed(self) -> int | None:
        """Wait for the connection's writer to end; the code the socket was closed with."""
        async with asyncio.timeout(DEADLINE_S):
            await self.writer
        return self.ws.close_code


def status_is(state: str, parent: str | None = None) -> Callable[[WireMessage], bool]:
    return lambda m: (
        m.msg_type == "status"
        and m.content.get("execution_state") == state
        and (parent is None or m.parent_id == parent)
    )


def reply_to(request: dict[str, Any]) -> Callable[[WireMessage], bool]:
    msg_id = request["header"]["msg_id"]
    return lambda m: m.channel in ("shell", "control") and m.parent_id == msg_id


@dataclass
class Harness:
    """A relay on fake kernels: ``kernels[-1]`` is the one attached last."""

    relay: KernelRelay
    context: zmq.asyncio.Context
    folder: Path
    kernels: list[FakeKernel] = field(default_factory=list)
    links: list[FakeLink] = field(default_factory=list)
    clients: list[FakeClient] = field(default_factory=list)
    #: a restart's fresh kernel is handed over once this is set
    restart_gate: asyncio.Event = field(default_factory=asyncio.Event)
    #: set when a restart asks for its fresh kernel
    restart_asked: asyncio.Event = field(default_factory=asyncio.Event)
    #: the links each restart was given to replace, in order
    replaced: list[KernelLink | None] = field(default_factory=list)
    #: the policy of every fake kernel (default: the shipped default)
    policy: Policy | None = None

    @property
    def kernel(self) -> FakeKernel:
        return self.kernels[-1]

    @property
    def link(self) -> FakeLink:
        return self.links[-1]

    def new_link(self) -> FakeLink:
        kernel = FakeKernel(self.context, self.folder, f"k{len(self.kernels)}")
        self.kernels.append(kernel)
        self.links.append(FakeLink(kernel, self.policy))
        return self.links[-1]

    async def fresh_link(self, replaced: KernelLink | None) -> FakeLink:
        self.replaced.append(replaced)
        self.restart_asked.set()
        await self.restart_gate.wait()
        return self.new_link()

    def client(self, **options: Any) -> FakeClient:
        self.clients.append(FakeClient(self.relay, **options))
        return self.clients[-1]


async def terminate(context: zmq.asyncio.Context) -> None:
    """End ``context``; a socket left open fails the test instead of hanging it."""
    ending = threading.Thread(target=context.term, daemon=True)
    ending.start()
    await asyncio.to_thread(ending.join, DEADLINE_S)
    assert not ending.is_alive(), "a ZeroMQ socket was left open"


@contextlib.asynccontextmanager
async def fake_relay(policy: Policy | None = None) -> AsyncIterator[Harness]:
    """A :class:`KernelRelay` attached to a fake kernel; shut down, and everything closed, after.

    ``policy``: the fake kernels' limits (default: the shipped default policy's).
    """
    # ipc:// paths must be short: not under pytest's long tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="skr-", dir="/tmp"))
    context = zmq.asyncio.Context()
    context.setsockopt(zmq.LINGER, 0)
    harness: Harness | None = None
    try:

        async def on_restart(replaced: KernelLink | None) -> FakeLink:
            assert harness is not None
            return await harness.fresh_link(replaced)

        relay = KernelRelay("kernel-id", "sandkernel-default", context, on_restart)
        harness = Harness(relay, context, folder, policy=policy)
        harness.restart_gate.set()
        await relay.attach(harness.new_link())
        yield harness
    finally:
        if harness is not None:
            await harness.relay.shutdown()
            writers = [c.writer for c in harness.clients]
            if writers:
                await asyncio.wait(writers, timeout=DEADLINE_S)
            for kernel in harness.kernels:
                kernel.close()
        try:
            await terminate(context)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
