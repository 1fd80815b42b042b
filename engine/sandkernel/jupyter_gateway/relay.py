"""One gateway kernel: its WebSocket connections relayed to a sandboxed kernel's sockets.

::

    WebSocket ─┐                        ┌─ shell   DEALER ─┐
    WebSocket ─┼─ KernelRelay ──────────┼─ control DEALER ─┼─ the kernel, in its sandbox
    WebSocket ─┘   (signs, routes,      ├─ stdin   DEALER ─┤  (KernelLink.connection_info)
                    keeps the limits)   └─ iopub, through the engine's own subscription
                                           (KernelLink.tap_iopub)

The relay opens sockets of its own to the kernel for requests and replies, as
Jupyter Server does, and signs with the kernel's key (jupyter_client's
``Session``). IOPub it takes from the engine's subscription, in place since
the kernel started: a subscription of its own would take effect some
milliseconds after it is made, and what the kernel published meanwhile would
be lost (a new kernel's start would wait for it). IOPub goes to
every connection; a reply, and an ``input_request``, to the connection whose
request it answers. What the engine enforces on its own cells holds here too:

- a cell runs at most the policy's ``wall_timeout_s`` (time spent waiting for
  ``input()`` not counted); then it is interrupted, and if it does not stop
  within ``interrupt_grace_s`` the kernel is killed;
- a kernel that dies (out of memory, killed, expired, crashed) is reported at
  once: each cell still running gets an ``error`` and an ``execute_reply``,
  then every connection gets IOPub ``status: dead``; the kernel is never used
  again (a restart is a fresh sandbox);
- after each ``execute_reply`` the files the cell wrote under ``/mnt/data``
  and the images it displayed are stored, as after a cell of the session API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import zmq
import zmq.asyncio
from jupyter_client.session import Session
from starlette.websockets import WebSocket, WebSocketDisconnect

from sandkernel.api import KernelConnectionInfo, KernelLink
from sandkernel.errors import BadInput
from sandkernel.jupyter_gateway.codec import WireMessage, decode, encode
from sandkernel.results import DisplayOutput

log = logging.getLogger(__name__)

#: How often a kernel that has not ended is checked for still serving its
#: session; its end itself is awaited, and told at once.
_RECHECK_S: Final = 2.0
_SEND_TIMEOUT_S: Final = 5.0  # a kernel that takes no message in this long is not waited for
_CONNECTION_QUEUE: Final = 10_000  # frames a slow connection may have pending, then it is closed
_MAX_ROUTES: Final = 10_000  # requests remembered to route their replies
_IOPUB_QUEUE: Final = 1000  # IOPub messages waiting for the relay; past it, dropped (zmq's HWM)
_IDLE_AFTER_REPLY_S: Final = 5.0  # how long a reply waits for its cell's last IOPub message
_MAX_MISSED_SESSIONS: Final = 8  # disconnected clients whose messages are kept for them
_MAX_MISSED_MESSAGES: Final = 1000  # kept per disconnected client, the first ones
_SOCKETS: Final = {
    "shell": zmq.DEALER,
    "control": zmq.DEALER,
    "stdin": zmq.DEALER,
}


def now_utc() -> datetime:
    return datetime.now(UTC)


class Connection:
    """One client's WebSocket on a kernel; frames to it go through a bounded queue."""

    def __init__(self, websocket: WebSocket, protocol: str | None, session_id: str | None) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.session_id = session_id
        self._queue: asyncio.Queue[str | bytes | None] = asyncio.Queue(_CONNECTION_QUEUE)
        self.closed = False

    def send(self, msg: WireMessage) -> None:
        """Queue a message; a connection too slow to take its messages is closed."""
        if self.closed:
            return
        try:
            self._queue.put_nowait(encode(msg, self.protocol))
        except asyncio.QueueFull:
            log.warning("a WebSocket client of a kernel is too slow; closing it")
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def write_loop(self) -> None:
        """Send queued frames until closed or the client is gone."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                frame = await self._queue.get()
                if frame is None:
                    await self.websocket.close()
                    return
                if isinstance(frame, str):
                    await self.websocket.send_text(frame)
                else:
                    await self.websocket.send_bytes(frame)


@dataclass
class _Cell:
    """An ``execute_request`` relayed to the kernel, from request to reply."""

    request: WireMessage
    requester: Connection | None
    deadline: float | None = None  # set when the kernel starts it (IOPub busy)
    paused_at: float | None = None  # waiting for input(): the wall clock stops
    displays: list[DisplayOutput] = field(default_factory=list)
    execution_count: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its reply or its idle came
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # its IOPub idle came


class KernelRelay:
    """A gateway kernel: its sandkernel session, connections, state and limits.

    Args:
        kernel_id: the Jupyter kernel id (also the sandkernel session's id).
        name: the kernel spec it was started from.
        context: the gateway's ZMQ context.
        on_restart: gets a fresh link for the kernel (a new sandbox, same id).
    """

    def __init__(
        self,
        kernel_id: str,
        name: str,
        context: zmq.asyncio.Context,
        on_restart: Callable[[], Awaitable[KernelLink]],
    ) -> None:
        self.id = kernel_id
        self.name = name
        self.execution_state = "starting"
        self.last_activity = now_utc()
        self.connections: set[Connection] = set()
        self.dead_reason: str | None = None
        self._context = context
        self._restart_link = on_restart
        self._link: KernelLink | None = None
        # Replaced by one with the kernel's key when a kernel is attached.
        self._session = Session(key=secrets.token_hex(16).encode(), username="sandkernel")
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._untap: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._routes: dict[str, Connection] = {}
        self._internal: set[str] = set()
        #: messages kept for clients (by session_id) whose connections are gone
        self._missed: dict[str, list[WireMessage]] = {}
        self._cells: dict[str, _Cell] = {}
        self._running: _Cell | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._collect_lock = asyncio.Lock()
        self._ending = False

    # -- life ------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return sum(1 for c in self.connections if not c.closed)

    async def attach(self, link: KernelLink) -> None:
        """Open sockets to ``link``'s kernel, wait until IOPub flows, then relay."""
        info = link.connection_info()
        self._session = Session(
            key=info["key"].encode(),
            signature_scheme=info["signature_scheme"],
            username="sandkernel",
        )
        identity = uuid.uuid4().hex.encode()
        stdin_monitor: zmq.asyncio.Socket | None = None
        try:
            for channel, kind in _SOCKETS.items():
                sock = self._context.socket(kind)
                sock.setsockopt(zmq.LINGER, 0)
                # ipykernel sends input_request to the identity that sent the
                # execute_request: shell and stdin must share it.
                sock.setsockopt(zmq.IDENTITY, identity)
                self._sockets[channel] = sock
                if channel == "stdin":
                    stdin_monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                sock.connect(_address(info, channel))
            # Requests wait in the shell socket until it connects, but the
            # kernel's ROUTER drops an input_request to a stdin socket whose
            # handshake has not completed: an execute with allow_stdin sent
            # at once would then never get its prompt.
            assert stdin_monitor is not None
            await _handshake(stdin_monitor)
        except BaseException:
            self._close_sockets()
            raise
        finally:
            stdin = self._sockets.get("stdin")
            if stdin is not None:
                with contextlib.suppress(zmq.ZMQError):
                    stdin.disable_monitor()
            if stdin_monitor is not None:
                stdin_monitor.close(linger=0)
        iopub: asyncio.Queue[list[bytes]] = asyncio.Queue(_IOPUB_QUEUE)

        def take(frames: list[bytes]) -> None:
            with contextlib.suppress(asyncio.QueueFull):
                iopub.put_nowait(frames)

        self._untap = link.tap_iopub(take)
        self._link = link
        self._ending = False
        self.dead_reason = None
        self.execution_state = "idle"
        self.last_activity = now_utc()
        for channel, sock in self._sockets.items():
            self._spawn(self._pump(channel, sock.recv_multipart))
        self._spawn(self._pump("iopub", iopub.get))
        self._spawn(self._watch_life())
        self._spawn(self._watch_cells())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        untap, self._untap = self._untap, None
        if untap is not None:
            untap()

    async def detach(self) -> KernelLink | None:
        """Stop relaying and close the sockets; returns the link that was served."""
        await self._stop_tasks()
        self._close_sockets()
        link, self._link = self._link, None
        self._cells.clear()
        self._running = None
        self._routes.clear()
        self._internal.clear()
        return link

    async def restart(self) -> None:
        """A fresh sandbox under the same id; connections stay and see ``restarting``."""
        async with self._lock:
            self.broadcast_status("restarting")
            await self.detach()
            self.execution_state = "restarting"
            try:
                await self.attach(await self._restart_link())
            except BaseException:
                # No fresh sandbox (the pool is exhausted...): the kernel stays dead,
                # and says so, until a restart succeeds.
                self._ending = True
                self.broadcast_status("dead")
                raise
            self.broadcast_status("idle")

    async def shutdown(self) -> None:
        """Stop relaying and close every connection (the session is the caller's to close)."""
        async with self._lock:
            await self.detach()
            self._ending = True
            self.execution_state = "dead"
            for connection in list(self.connections):
                connection.close()

    async def interrupt(self) -> None:
        """Interrupt the running cell (REST ``/interrupt``, and past the wall timeout).

        An ``interrupt_request`` on the relay's own control socket, as the kernel
        spec's ``interrupt_mode`` (``message``) asks and as a Jupyter client sends
        it: the path a connected client's own interrupts take.
        """
        if self._link is None:
            return
        if "control" not in self._sockets:
            await self._link.interrupt()
            return
        msg = self._session.msg("interrupt_request", {})
        self._internal.add(msg["header"]["msg_id"])  # its reply is the relay's
        await self._send_raw("control", msg)

    # -- from clients ------------------------------------------------------------------

    def connect(self, connection: Connection) -> None:
        """A new WebSocket; one that comes back with its ``session_id`` gets what it missed."""
        self.connections.add(connection)
        missed = self._missed.pop(connection.session_id or "", None)
        for msg in missed or ():
            connection.send(msg)
        if self.execution_state == "dead":
            connection.send(self._status("dead"))

    def disconnect(self, connection: Connection) -> None:
        connection.close()
        self.connections.discard(connection)
        for key in [k for k, c in self._routes.items() if c is connection]:
            del self._routes[key]
        session_id = connection.session_id
        if session_id and not any(c.session_id == session_id for c in self.connections):
            # As Jupyter Server does: what the kernel says while a client's last
            # connection is gone waits for it to reconnect (within bounds).
            self._missed[session_id] = []
            while len(self._missed) > _MAX_MISSED_SESSIONS:
                del self._missed[next(iter(self._missed))]

    async def from_client(self, connection: Connection, frame: str | bytes) -> None:
        """Relay one frame a client sent.

        Raises:
            BadInput: the frame is not a message for a kernel (the caller answers it).
        """
        msg = decode(frame, connection.protocol)
        if msg.channel == "iopub":
            raise BadInput("clients do not send on iopub")
        if self._link is None or self._ending:
            if msg.channel == "shell" and msg.msg_type == "execute_request":
                self._answer_dead_cell(
                    _Cell(msg, connection), self.dead_reason or "the kernel is not running"
                )
                dead = self._status("dead")
                dead.parent_header = dict(msg.header)
                connection.send(dead)
            return
        self.last_activity = now_utc()
        if msg.channel == "control" and msg.msg_type == "shutdown_request":
            await self._client_shutdown(connection, msg)
            return
        if msg.channel in ("shell", "control"):
            self._route(msg.msg_id, connection)
        if msg.channel == "shell":
            self._link.touch(ran=msg.msg_type == "execute_request")
            if msg.msg_type == "execute_request":
                self._cells[msg.msg_id] = _Cell(msg, connection)
        elif msg.channel == "stdin" and msg.msg_type == "input_reply":
            self._resume()
        await self._send_raw(msg.channel, msg.parts())

    async def _client_shutdown(self, connection: Connection, msg: WireMessage) -> None:
        # The kernel would exit and leave its sandbox for nobody to restart: the
        # gateway does what the request asks of a kernel manager instead.
        restart = bool(msg.content.get("restart"))
        reply = self._reply(msg, "shutdown_reply", {"status": "ok", "restart": restart})
        connection.send(reply)
        if restart:
            await self.restart()
        elif self._link is not None:
            await self._die(self._link, "the kernel was shut down by a client's shutdown_request")

    async def _send_raw(self, channel: str, msg: dict[str, Any]) -> None:
        # Serialised here and sent on the asyncio socket: Session.send would send
        # blocking, and a kernel that stopped reading would stall the daemon.
        frames = self._session.serialize(msg)
        frames += [bytes(b) for b in msg.get("buffers") or ()]
        sock = self._sockets.get(channel)
        if sock is None:
            return
        try:
            await asyncio.wait_for(sock.send_multipart(frames), _SEND_TIMEOUT_S)
        except (TimeoutError, zmq.ZMQError) as exc:
            log.warning("kernel %s: a %s message was not sent: %s", self.id, channel, exc)

    def _route(self, msg_id: str, connection: Connection) -> None:
        self._routes[msg_id] = connection
        while len(self._routes) > _MAX_ROUTES:
            del self._routes[next(iter(self._routes))]

    # -- from the kernel ------------------------------------------------------------------

    async def _pump(self, channel: str, receive: Callable[[], Awaitable[list[bytes]]]) -> None:
        while True:
            frames = await receive()
            try:
                _, parts = self._session.feed_identities(frames)
                raw = self._session.deserialize(parts, content=True)
            except Exception as exc:  # noqa: BLE001 - a bad message is dropped, never fatal
                log.warning("kernel %s: dropped a %s message: %s", self.id, channel, exc)
                continue
            msg = WireMessage(
                channel=channel,
                header=dict(raw["header"]),
                parent_header=dict(raw["parent_header"]),
                metadata=dict(raw["metadata"]),
                content=dict(raw["content"]),
                buffers=[bytes(b) for b in raw.get("buffers") or ()],
            )
            self.last_activity = now_utc()
            await self._from_kernel(msg)

    async def _from_kernel(self, msg: WireMessage) -> None:
        parent = msg.parent_id
        if parent in self._internal:
            return  # the relay's own kernel_info requests (cleared when it detaches)
        if msg.channel == "iopub":
            self._track(msg)
            self.broadcast(msg)
            return
        cell = self._cells.get(parent)
        if msg.channel == "shell" and msg.msg_type == "execute_reply" and cell is not None:
            await self._finish(cell)
        elif msg.channel == "stdin" and msg.msg_type == "input_request" and cell is not None:
            self._pause(cell)
        target = self._routes.get(parent)
        if msg.channel in ("shell", "control"):
            self._routes.pop(parent, None)
        if target is not None and target in self.connections:
            target.send(msg)
        else:
            self.broadcast(msg)

    def _track(self, msg: WireMessage) -> None:
        cell = self._cells.get(msg.parent_id)
        kind = msg.msg_type
        if kind == "status":
            state = msg.content.get("execution_state")
            if isinstance(state, str):
                self.execution_state = state
            if cell is not None and state == "busy" and cell.deadline is None:
                assert self._link is not None
                cell.deadline = time.monotonic() + self._link.policy.wall_timeout_s
                self._running = cell
                self._changed.set()
            elif cell is not None and state == "idle":
                cell.idle.set()
                self._end_cell(cell)
        elif cell is not None and kind in ("display_data", "execute_result"):
            data = msg.content.get("data")
            if kind == "display_data" and isinstance(data, dict):
                meta = msg.content.get("metadata")
                cell.displays.append(
                    DisplayOutput(data=data, metadata=meta if isinstance(meta, dict) else {})
                )
        elif cell is not None and kind == "execute_input":
            count = msg.content.get("execution_count")
            cell.execution_count = count if isinstance(count, int) else None

    def _end_cell(self, cell: _Cell) -> None:
        cell.done.set()
        if self._running is cell:
            self._running = None
        self._changed.set()

    async def _finish(self, cell: _Cell) -> None:
        """The cell's reply came: store what it produced before the client sees the reply."""
        self._end_cell(cell)
        # The reply and the cell's IOPub travel on different sockets: the images it
        # displayed may still be on their way. Its idle comes after all of them.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cell.idle.wait(), _IDLE_AFTER_REPLY_S)
        self._cells.pop(cell.request.msg_id, None)
        link = self._link
        if link is None:
            return
        link.touch(ran=True)
        async with self._collect_lock:
            try:
                await link.collect(cell.displays, cell.execution_count)
            except Exception:  # noqa: BLE001 - the reply goes out whatever the store says
                log.exception("kernel %s: collecting a cell's files failed", self.id)

    def _pause(self, cell: _Cell) -> None:
        if cell.paused_at is None:
            cell.paused_at = time.monotonic()
            self._changed.set()

    def _resume(self) -> None:
        # An input_reply's parent is the input_request, not the cell: every cell
        # waiting for input resumes (the kernel runs one at a time anyway).
        for cell in self._cells.values():
            if cell.paused_at is not None:
                if cell.deadline is not None:
                    cell.deadline += time.monotonic() - cell.paused_at
                cell.paused_at = None
                self._changed.set()

    # -- to clients ----------------------------------------------------------------------

    def broadcast(self, msg: WireMessage) -> None:
        for connection in list(self.connections):
            connection.send(msg)
        for missed in self._missed.values():
            if len(missed) < _MAX_MISSED_MESSAGES:
                missed.append(msg)

    def _status(self, state: str) -> WireMessage:
        raw = self._session.msg("status", {"execution_state": state})
        return WireMessage("iopub", raw["header"], {}, {}, raw["content"])

    def broadcast_status(self, state: str) -> None:
        self.execution_state = state
        self.broadcast(self._status(state))

    def _reply(self, request: WireMessage, msg_type: str, content: dict[str, Any]) -> WireMessage:
        raw = self._session.msg(msg_type, content, parent=request.header)
        return WireMessage(request.channel, raw["header"], dict(request.header), {}, content)

    def _answer_dead_cell(self, cell: _Cell, reason: str) -> None:
        """A cell the dead kernel will never answer: an error, its reply, its ``idle``.

        The ``idle`` ends the cell for clients that wait for it rather than for
        the reply (Open WebUI's); ``status: dead`` follows, for the kernel.
        """
        error = {"ename": "DeadKernelError", "evalue": reason, "traceback": [reason]}
        shown = self._session.msg("error", error, parent=cell.request.header)
        self.broadcast(WireMessage("iopub", shown["header"], dict(cell.request.header), {}, error))
        reply = self._reply(cell.request, "execute_reply", {"status": "error", **error})
        reply.metadata = {"status": "error"}
        if cell.requester is not None and cell.requester in self.connections:
            cell.requester.send(reply)
        else:
            self.broadcast(reply)
        idle = self._status("idle")
        idle.parent_header = dict(cell.request.header)
        self.broadcast(idle)

    # -- limits ---------------------------------------------------------------------------

    async def _watch_life(self) -> None:
        link = self._link
        assert link is not None
        # One wait for the end, rechecked beside: not a new wait (a pidfd) every time.
        ended = asyncio.ensure_future(link.wait_ended())
        try:
            while link.alive and not ended.done():
                await asyncio.wait({ended}, timeout=_RECHECK_S)
        finally:
            ended.cancel()
        await self._die(link, "the kernel process ended")

    async def _watch_cells(self) -> None:
        link = self._link
        assert link is not None
        while True:
            self._changed.clear()
            cell = self._running
            if cell is None or cell.paused_at is not None or cell.deadline is None:
                await self._changed.wait()
                continue
            remaining = cell.deadline - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
                continue
            await self._enforce_timeout(link, cell)
            return

    async def _enforce_timeout(self, link: KernelLink, cell: _Cell) -> None:
        limit = link.policy.wall_timeout_s
        grace = link.policy.interrupt_grace_s
        note = f"the cell ran longer than its {limit:g} s limit (policy field wall_timeout_s)"
        self._stderr(cell, f"\n[sandkernel] {note}; interrupting it\n")
        await self.interrupt()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cell.done.wait(), grace)
        if cell.done.is_set():
            self._spawn(self._watch_cells())
            return
        await self._die(
            link,
            f"{note} and did not stop within {grace:g} s of an interrupt; the kernel was killed "
            "and its variables are lost",
        )

    def _stderr(self, cell: _Cell, text: str) -> None:
        content = {"name": "stderr", "text": text}
        raw = self._session.msg("stream", content, parent=cell.request.header)
        self.broadcast(WireMessage("iopub", raw["header"], dict(cell.request.header), {}, content))

    async def _die(self, link: KernelLink, fallback: str) -> None:
        """Report the kernel dead to every client at once, then end it for good."""
        if self._ending or self._link is not link:
            return
        self._ending = True
        reason = link.ended_because(fallback)
        self.dead_reason = reason
        running = [c for c in self._cells.values() if not c.done.is_set()]
        for cell in running:
            self._answer_dead_cell(cell, reason)
        self.broadcast_status("dead")
        log.info("kernel %s is dead: %s", self.id, reason)
        await self._stop_tasks()
        self._close_sockets()
        self._cells.clear()
        self._running = None
        # What a dying cell wrote is still in its workspace until the kernel ends.
        async with self._collect_lock:
            for cell in running:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.collect(cell.displays, cell.execution_count), 5)
        try:
            await link.end(reason)
        except Exception:  # noqa: BLE001 - the kernel is reported dead whatever ending it says
            log.exception("kernel %s: ending it failed", self.id)


async def _handshake(monitor: zmq.asyncio.Socket, timeout_s: float = _SEND_TIMEOUT_S) -> None:
    """Wait for the handshake ``monitor`` watches (set up before its socket's connect).

    After ``timeout_s`` it stops waiting, and the socket goes on connecting
    as it would have: a kernel that is this slow is reported by the rest.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await monitor.recv_multipart()
    except TimeoutError:
        log.warning("no handshake with the kernel's stdin socket within %g s", timeout_s)


def _address(info: KernelConnectionInfo, channel: str) -> str:
    port = {
        "shell": info["shell_port"],
        "control": info["control_port"],
        "stdin": info["stdin_port"],
    }[channel]
    if info["transport"] == "ipc":
        return f"ipc://{info['ip']}-{port}"
    return f"{info['transport']}://{info['ip']}:{port}"
