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
  within ``interrupt_grace_s`` the kernel is killed. So that every cell is one
  the relay times, a cell runs on shell only, one at a time: an
  ``execute_request`` on control or stdin, one whose ``msg_id`` is already
  pending, and kernel subshells are refused (an error reply to the sender);
- a kernel that dies (out of memory, killed, expired, crashed) is reported at
  once: what it sent before it died is relayed, each cell it never answered
  gets an ``error`` and an ``execute_reply``, then every connection gets IOPub
  ``status: dead``; the kernel is never used again (a restart is a fresh
  sandbox, and what clients send while it comes is held for it);
- the files a cell wrote under ``/mnt/data`` and the images it displayed are
  stored, as after a cell of the session API, before clients get its reply
  or its ``idle`` (the kernel's IOPub waits behind that ``idle`` meanwhile,
  so that it all comes in the order the kernel sent it); a delete or a
  restart of the kernel waits for the cells that ended to be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import secrets
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import zmq
import zmq.asyncio
from jupyter_client.session import Session
from starlette.websockets import WebSocket, WebSocketDisconnect

from sandkernel.api import KernelConnectionInfo, KernelLink
from sandkernel.errors import BadInput, SessionNotFound
from sandkernel.jupyter_gateway.codec import WireMessage, decode, encode
from sandkernel.results import DisplayOutput
from sandkernel.workspace.collect import IMAGE_TYPES

log = logging.getLogger(__name__)

#: How often a kernel that has not ended is checked for still serving its
#: session; its end itself is awaited, and told at once.
_RECHECK_S: Final = 2.0
_SEND_TIMEOUT_S: Final = 5.0  # a kernel that takes no message in this long is not waited for
#: What a slow connection may have pending, then it is closed: output is the
#: kernel's to size, not the client's. Bytes only, each frame counted with what
#: keeping it costs (:func:`_held`), so that many small frames count too.
_CONNECTION_BYTES: Final = 64 << 20
#: What all the connections of one kernel may have pending together: past it,
#: the one furthest behind is closed as too slow (several slow clients of one
#: kernel would otherwise hold 64 MiB each).
_KERNEL_BYTES: Final = 4 * _CONNECTION_BYTES
_FRAME_UPKEEP: Final = 64  # a queued frame's queue slot, about
_MAX_ROUTES: Final = 10_000  # requests remembered to route their replies
_MAX_CELLS: Final = 10_000  # cells waiting to run or for their reply, per kernel
#: what a made-up answer takes of a request's header (the rest is not kept)
_PARENT_FIELDS: Final = ("msg_id", "msg_type", "session", "username", "date", "version")
_IOPUB_QUEUE: Final = 1000  # IOPub messages waiting for the relay; past it, dropped (zmq's HWM)
_IDLE_AFTER_REPLY_S: Final = 5.0  # how long a reply waits for its cell's last IOPub message
#: IOPub held behind a cell's idle while its files are stored (see KernelRelay._hold);
#: past it, all of it goes out at once
_MAX_HELD: Final = 1000
_MAX_MISSED_SESSIONS: Final = 8  # disconnected clients whose messages are kept for them
#: Output kept per disconnected client, the latest (the oldest goes first)...
_MAX_MISSED_MESSAGES: Final = 1000
_MAX_MISSED_BYTES: Final = 16 << 20  # ...and at most this much of it
#: Its answers (replies, input requests, statuses: what ends its cells), kept
#: beside the output and never dropped for it; bounded on their own.
_MAX_MISSED_ANSWERS: Final = 4000
_MAX_MISSED_ANSWER_BYTES: Final = 16 << 20
#: Status messages whose parent is one of these do not change the kernel's
#: ``execution_state``: Jupyter Server's ``untracked_message_types`` (a client's
#: kernel_info_request while a cell runs must not make the kernel look idle).
_UNTRACKED_PARENTS: Final = frozenset(
    {
        "comm_info_request",
        "kernel_info_request",
        "shutdown_request",
        "interrupt_request",
        "debug_request",
    }
)
#: A cell's displayed images kept until its reply, to be stored (the store's own
#: cap is 100 files a cell): what the kernel displays is the kernel's to size.
_CELL_IMAGES: Final = 100
_CELL_IMAGE_BYTES: Final = 64 << 20
_DRAIN_S: Final = 10.0  # how long a dead kernel's last messages may take to be relayed
_DRAIN_MAX: Final = 2000  # of a dead kernel's last messages, relayed per socket at most
_COLLECT_DEAD_S: Final = 5.0  # how long storing a dead kernel's unanswered cell's files may take
#: How long a delete or a restart waits for the cells that ended to be stored and answered.
_SETTLE_S: Final = 10.0
_CLOSE_FLUSH_S: Final = 2.0  # how long a closed connection's queued frames may take to go out
_CLOSE_S: Final = 5.0  # how long closing a WebSocket is waited for
#: The close code of a client too slow for its messages: "try again later".
CLOSE_TOO_SLOW: Final = 1013
#: What sending to a client that is gone raises.
_GONE: Final = (WebSocketDisconnect, RuntimeError, OSError)
_SOCKETS: Final = {
    "shell": zmq.DEALER,
    "control": zmq.DEALER,
    "stdin": zmq.DEALER,
}


def now_utc() -> datetime:
    return datetime.now(UTC)


def _size(msg: WireMessage) -> int:
    """About how many bytes a message takes: its content as JSON and its buffers."""
    try:
        content = len(json.dumps(msg.content, default=str))
    except (TypeError, ValueError):
        content = 0
    return content + sum(len(b) for b in msg.buffers)


def _held(frame: str | bytes) -> int:
    """The memory a queued frame holds: its object (a text's up to 4 bytes a character)."""
    return sys.getsizeof(frame) + _FRAME_UPKEEP


def _is_answer(msg: WireMessage) -> bool:
    """What ends a client's requests and cells (replies, input requests, statuses), not output."""
    return msg.channel != "iopub" or msg.header.get("msg_type") == "status"


class Connection:
    """One client's WebSocket on a kernel; frames to it go through a bounded queue.

    :meth:`write_loop` sends them, and once the connection is closed (or the
    client is gone) closes the socket and returns, whatever the client does:
    the WebSocket's handler ends with it. The answers among the frames not
    yet sent (see :meth:`take_unsent_answers`) can go to the client's next
    connection instead.
    """

    def __init__(self, websocket: WebSocket, protocol: str | None, session_id: str | None) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.session_id = session_id
        # Bounded by bytes (_CONNECTION_BYTES), not by a count of frames.
        self._queue: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._queued_bytes = 0
        self._queued = 0  # frames queued so far
        self._sent = 0  # ...and sent
        #: the answers among the queued frames, each with its frame's number
        self._answers: deque[tuple[int, WireMessage]] = deque()
        self._stopped = asyncio.Event()
        self._close_code = 1000
        self._flush = True
        self.closed = False
        #: the connection of the same client that replaced this one, if any
        self.replaced_by: Connection | None = None
        #: told (at once, before the close) when the connection is closed as too slow
        self.on_too_slow: Callable[[Connection], None] | None = None

    def send(self, msg: WireMessage) -> None:
        """Queue a message; a connection too slow to take its messages is closed.

        Closed so, it takes no more (nor ``msg``): :attr:`on_too_slow` is told,
        and the client's messages from then on are the relay's to keep for it.
        """
        if self.closed:
            return
        try:
            frame = encode(msg, self.protocol)
        except Exception:  # noqa: BLE001 - one connection's failure is not the others'
            log.exception("a message for a WebSocket client could not be encoded; not sent")
            return
        size = _held(frame)
        if self._queued_bytes + size > _CONNECTION_BYTES and self._queued_bytes:
            self.close_as_too_slow()
            return
        self._queue.put_nowait(frame)
        if _is_answer(msg):
            self._answers.append((self._queued, msg))
        self._queued += 1
        self._queued_bytes += size

    @property
    def queued_bytes(self) -> int:
        """What the frames not sent yet hold (see :func:`_held`)."""
        return self._queued_bytes

    def close_as_too_slow(self) -> None:
        """Close it for the output it could not keep up with, and tell :attr:`on_too_slow`."""
        log.warning("a WebSocket client of a kernel is too slow for its output; closing it")
        self.close(CLOSE_TOO_SLOW, flush=False)
        if self.on_too_slow is not None:
            self.on_too_slow(self)

    def take_unsent_answers(self) -> list[WireMessage]:
        """The answers queued and not sent yet (one being sent included); taken once.

        For a connection that will send no more: its client gets them on its
        next connection. One that was being sent as it closed may reach the
        client twice; clients ignore a reply or status they have had.
        """
        answers = [msg for _, msg in self._answers]
        self._answers.clear()
        return answers

    def close(self, code: int = 1000, *, flush: bool = True) -> None:
        """Stop sending and close the socket with ``code``.

        ``flush``: what is queued still goes out first, if the client takes it
        within ``_CLOSE_FLUSH_S``; a client that is gone or too slow gets
        nothing more.
        """
        if not self.closed:
            self.closed = True
            self._close_code = code
            self._flush = flush
            self._stopped.set()

    async def write_loop(self) -> None:
        """Send queued frames until closed or the client is gone; then close the socket."""
        sender = asyncio.ensure_future(self._send_queued())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({sender, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if self._flush and not sender.done():
                flushed = asyncio.ensure_future(self._queue.join())
                try:
                    await asyncio.wait(
                        {sender, flushed},
                        timeout=_CLOSE_FLUSH_S,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    flushed.cancel()
        finally:
            # A send the client does not take would wait for it forever; and it
            # must be over before the close, which the server cannot interleave with it.
            sender.cancel()
            stopped.cancel()
            await asyncio.wait({sender}, timeout=_CLOSE_S)
            self.closed = True
            if not sender.done():
                # Its transport is stuck: a close would only be interleaved with that send.
                log.warning("a WebSocket send did not end when cancelled; not closing it")
            else:
                if not sender.cancelled() and sender.exception() is not None:
                    log.error(
                        "sending to a WebSocket client failed; closing it",
                        exc_info=sender.exception(),
                    )
                    self._close_code = 1011  # the server's failure: the client may reconnect
                with contextlib.suppress(*_GONE, TimeoutError):
                    async with asyncio.timeout(_CLOSE_S):
                        await self.websocket.close(self._close_code)

    async def _send_queued(self) -> None:
        with contextlib.suppress(*_GONE):
            while True:
                frame = await self._queue.get()
                try:
                    if isinstance(frame, str):
                        await self.websocket.send_text(frame)
                    else:
                        await self.websocket.send_bytes(frame)
                finally:
                    self._queued_bytes -= _held(frame)
                    self._queue.task_done()
                self._sent += 1
                answers = self._answers
                while answers and answers[0][0] < self._sent:
                    answers.popleft()


@dataclass
class _Cell:
    """An ``execute_request`` relayed to the kernel, from request to reply."""

    request: WireMessage
    requester: Connection | None
    deadline: float | None = None  # set when the kernel starts it (IOPub busy)
    paused_at: float | None = None  # waiting for input(): the wall clock stops
    displays: list[DisplayOutput] = field(default_factory=list)  # its images, to store
    display_bytes: int = 0
    execution_count: int | None = None
    collected: bool = False  # its files are stored (or being stored): once is all
    done: asyncio.Event = field(default_factory=asyncio.Event)  # its reply or its idle came
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # its IOPub idle came
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # its reply went to clients


class _Missed:
    """What the kernel said while a client (a ``session_id``) was away, kept for it, bounded.

    Its answers (replies, input requests, statuses: what ends its requests
    and cells) are kept over output: past its bounds, output loses its
    oldest messages, never an answer. Answers have bounds of their own,
    which only a kernel flooding them reaches (then the oldest go).
    """

    def __init__(self) -> None:
        self._count = 0  # messages kept so far: their order
        self._output: deque[tuple[int, WireMessage, int]] = deque()
        self._output_bytes = 0
        self._answers: deque[tuple[int, WireMessage, int]] = deque()
        self._answer_bytes = 0

    def keep(self, msg: WireMessage, size: int) -> None:
        entry = (self._count, msg, size)
        self._count += 1
        if _is_answer(msg):
            self._answers.append(entry)
            self._answer_bytes += size
            while len(self._answers) > 1 and (
                len(self._answers) > _MAX_MISSED_ANSWERS
                or self._answer_bytes > _MAX_MISSED_ANSWER_BYTES
            ):
                self._answer_bytes -= self._answers.popleft()[2]
        else:
            self._output.append(entry)
            self._output_bytes += size
            while self._output and (
                len(self._output) > _MAX_MISSED_MESSAGES or self._output_bytes > _MAX_MISSED_BYTES
            ):
                self._output_bytes -= self._output.popleft()[2]

    def messages(self) -> list[WireMessage]:
        """What is kept, in the order it came."""
        return [m for _, m, _ in heapq.merge(self._output, self._answers, key=lambda e: e[0])]


def _as_parent(request: WireMessage) -> WireMessage:
    """What is kept of a request while it waits: enough to answer it, not its code or buffers."""
    header: dict[str, Any] = {k: request.header[k] for k in _PARENT_FIELDS if k in request.header}
    return WireMessage(request.channel, header)


@dataclass(frozen=True)
class _Source:
    """Where one channel's messages from the kernel come from.

    ``receive`` waits for the next one, and has taken nothing if it is
    cancelled while it waits; ``take`` takes one already here (``None``: none is);
    ``pending`` is at least how many are here now, at most what a drain takes.
    """

    channel: str
    receive: Callable[[], Awaitable[list[bytes]]]
    take: Callable[[], Awaitable[list[bytes] | None]]
    pending: Callable[[], int]


def _socket_source(channel: str, sock: zmq.asyncio.Socket) -> _Source:
    async def take() -> list[bytes] | None:
        try:
            # Non-blocking: the future is done at once.
            return await sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    async def receive() -> list[bytes]:
        while True:
            # Polled, then taken: a wait cancelled in the poll has taken no message.
            await sock.poll()  # for POLLIN, with no timeout
            frames = await take()
            if frames is not None:
                return frames

    # ZeroMQ does not tell how many messages a socket holds: at most its
    # high-water mark, and what the kernel sent before it died is in flight behind.
    return _Source(channel, receive, take, lambda: _DRAIN_MAX)


def _queue_source(channel: str, queue: asyncio.Queue[list[bytes]]) -> _Source:
    async def take() -> list[bytes] | None:
        try:
            return queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    return _Source(channel, queue.get, take, queue.qsize)


def _without_subshells(reply: WireMessage) -> None:
    """Not offered here (see ``KernelRelay._refusal``): clients then send no subshell requests."""
    features = reply.content.get("supported_features")
    if isinstance(features, list):
        reply.content["supported_features"] = [f for f in features if f != "kernel subshells"]


def _object(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ValueError(f"its {name} is not a JSON object")
    return dict(value)


class KernelRelay:
    """A gateway kernel: its sandkernel session, connections, state and limits.

    Args:
        kernel_id: the Jupyter kernel id (also the sandkernel session's id).
        name: the kernel spec it was started from.
        context: the gateway's ZMQ context.
        on_restart: gets a fresh link for the kernel (a new sandbox, same id), given
            the link it replaces (``None``: none was attached).
    """

    def __init__(
        self,
        kernel_id: str,
        name: str,
        context: zmq.asyncio.Context,
        on_restart: Callable[[KernelLink | None], Awaitable[KernelLink]],
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
        self._pumps: dict[asyncio.Task[None], _Source] = {}
        self._waiting: set[asyncio.Task[None]] = set()  # pumps waiting for a message
        self._draining = False  # the kernel is dying: pumps relay only what is already here
        self._drain_deadline = 0.0
        self._iopub_flushed = asyncio.Event()  # ...and IOPub's is all relayed
        self._routes: dict[str, Connection] = {}
        #: the relay's own requests (their replies and status are not the clients'),
        #: the latest ``_MAX_ROUTES`` of them: an insertion-ordered set
        self._internal: dict[str, None] = {}
        #: messages kept for clients (by session_id) whose connections are gone
        self._missed: dict[str, _Missed] = {}
        #: IOPub held back from clients: from the idle of a cell whose reply is not
        #: out yet (its files are being stored) until it is, each message with the
        #: cell it is the idle of, if any (see _hold)
        self._held: list[tuple[WireMessage, _Cell | None]] | None = None
        self._shut_down = False  # by shutdown(): a restart waiting for the lock gives up
        self._restarts = 0  # under way or waiting for the lock
        self._no_restart = asyncio.Event()  # set while _restarts is 0
        self._no_restart.set()
        self._cells: dict[str, _Cell] = {}
        #: cells the kernel started (IOPub busy) and has not ended, each with its deadline
        self._running: list[_Cell] = []
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
        self._draining = False
        self._iopub_flushed = asyncio.Event()
        self.dead_reason = None
        self.execution_state = "idle"
        self.last_activity = now_utc()
        sources = [_socket_source(c, s) for c, s in self._sockets.items()]
        for source in [*sources, _queue_source("iopub", iopub)]:
            self._pumps[self._spawn(self._pump(source))] = source
        self._spawn(self._watch_life())
        self._spawn(self._watch_cells())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._pumps.clear()
        self._waiting.clear()

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
        self._release(everything=True)
        self._close_sockets()
        link, self._link = self._link, None
        self._cells.clear()
        self._running.clear()
        self._routes.clear()
        self._internal.clear()
        return link

    async def restart(self) -> None:
        """A fresh sandbox under the same id; connections stay, and see it start.

        They get ``status: starting``, then ``idle`` once the fresh kernel is
        attached: what a kernel that starts publishes. ``restarting`` is what
        Jupyter Server sends when a kernel died and was restarted automatically,
        and JupyterLab tells its user so ("the kernel appears to have died").
        What clients send meanwhile waits in their handlers (see :meth:`from_client`)
        and goes to the fresh kernel; the cells that ended are stored and
        answered first (see :meth:`_settle`).
        """
        self._restarts += 1
        self._no_restart.clear()
        try:
            await self._settle()
            async with self._lock:
                if self._shut_down:
                    # Deleted while this waited: no kernel to bring back.
                    raise SessionNotFound(f"kernel {self.id} was shut down")
                self._release(everything=True)
                self.broadcast_status("starting")
                replaced = await self.detach()
                self.execution_state = "starting"
                try:
                    await self.attach(await self._restart_link(replaced))
                except BaseException:
                    # No fresh sandbox (the pool is exhausted...): the kernel stays dead,
                    # and says so, until a restart succeeds.
                    self._ending = True
                    self.broadcast_status("dead")
                    raise
                self.broadcast_status("idle")
        finally:
            self._restarts -= 1
            if not self._restarts:
                self._no_restart.set()

    async def shutdown(self) -> None:
        """Stop relaying and close every connection (the session is the caller's to close).

        The cells that ended are stored and answered first (see :meth:`_settle`).
        """
        await self._settle()
        async with self._lock:
            self._shut_down = True
            await self.detach()
            self._ending = True
            self.execution_state = "dead"
            for connection in list(self.connections):
                connection.close()

    async def _settle(self) -> None:
        """Wait, ``_SETTLE_S`` at most, for the cells that ended to be stored and answered.

        A client may delete the kernel as soon as it sees a cell end (Open
        WebUI does at its ``idle``): the files the cell wrote are stored all
        the same, not cut short with the kernel. A cell still running is not
        waited for.
        """
        if self._link is None or self._ending:
            return
        ended = [c.answered for c in self._cells.values() if c.done.is_set()]
        if not ended:
            return
        waits = [asyncio.ensure_future(answered.wait()) for answered in ended]
        try:
            _, late = await asyncio.wait(waits, timeout=_SETTLE_S)
        finally:
            for wait in waits:
                wait.cancel()
        if late:
            log.warning(
                "kernel %s: %d ended cells were not stored within %g s; going on without them",
                self.id,
                len(late),
                _SETTLE_S,
            )

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
        self._internal[msg["header"]["msg_id"]] = None  # its reply is the relay's
        while len(self._internal) > _MAX_ROUTES:
            del self._internal[next(iter(self._internal))]
        await self._send_raw("control", msg)

    # -- from clients ------------------------------------------------------------------

    def connect(self, connection: Connection) -> None:
        """A new WebSocket; one that comes back with its ``session_id`` gets what it missed.

        A kernel deleted while the socket was being accepted closes it at once.
        """
        if self._shut_down:
            connection.close()
            return
        connection.on_too_slow = self._away
        session_id = connection.session_id
        stale = [c for c in self.connections if session_id and c.session_id == session_id]
        self.connections.add(connection)
        for old in stale:
            self._replace(old, connection)
        missed = self._missed.pop(session_id or "", None)
        if missed is not None:
            self._send_all(connection, missed.messages())
        if self.execution_state == "dead":
            self._send_to(connection, self._status("dead"))

    def _send_all(self, connection: Connection, messages: list[WireMessage]) -> None:
        """``messages`` to ``connection``, in order; what it cannot take is kept for its client."""
        for index, msg in enumerate(messages):
            connection.send(msg)
            if connection.closed:  # too slow already: what is left waits for the next one
                if connection.session_id:
                    missed = self._missed_for(connection.session_id)
                    for rest in messages[index:]:
                        missed.keep(rest, _size(rest))
                return

    def _replace(self, stale: Connection, connection: Connection) -> None:
        """A client back with its ``session_id`` while its old socket still seems open.

        As Jupyter Server does: it is the same client, whose network went away
        unnoticed; the old socket is closed, and the replies to what the client
        sent through it go to the new one.
        """
        log.warning("kernel %s: replacing a stale connection of the same session", self.id)
        stale.replaced_by = connection
        self.connections.discard(stale)
        # A normal close; were the old socket still read after all, its client may
        # reconnect (JupyterLab does after any close) and replace this one in turn.
        stale.close(flush=False)
        # What the old socket had still to send of its answers, the new one sends.
        self._send_all(connection, stale.take_unsent_answers())
        for msg_id, routed in self._routes.items():
            if routed is stale:
                self._routes[msg_id] = connection
        for cell in self._cells.values():
            if cell.requester is stale:
                cell.requester = connection

    def disconnect(self, connection: Connection) -> None:
        connection.close()
        self._away(connection)

    def _away(self, connection: Connection) -> None:
        """``connection`` takes no more messages: its client left, or was too slow and closed.

        Its routes stay: the replies to what it asked wait for its client (see
        :meth:`_send_to`). As Jupyter Server does, what the kernel says while a
        client's last connection is gone waits for it to reconnect (within the
        bounds of :class:`_Missed`), beginning with the answers the connection
        had still to send. A replaced connection's late end keeps what was kept
        for its client already.
        """
        self.connections.discard(connection)
        unsent = connection.take_unsent_answers()
        session_id = connection.session_id
        if not session_id:
            return
        back = [c for c in self.connections if c.session_id == session_id]
        if back:
            self._send_all(back[-1], unsent)
            return
        missed = self._missed_for(session_id)
        for msg in unsent:
            missed.keep(msg, _size(msg))

    def _missed_for(self, session_id: str) -> _Missed:
        """What is kept for the client ``session_id`` while it is away (kept from now on)."""
        missed = self._missed.get(session_id)
        if missed is None:
            missed = self._missed[session_id] = _Missed()
            while len(self._missed) > _MAX_MISSED_SESSIONS:
                del self._missed[next(iter(self._missed))]
        return missed

    async def from_client(self, connection: Connection, frame: str | bytes) -> None:
        """Relay one frame a client sent.

        Raises:
            BadInput: the frame is not a message for a kernel (the caller answers it).
        """
        msg = decode(frame, connection.protocol)
        if msg.channel == "iopub":
            raise BadInput("clients do not send on iopub")
        # The kernel is not gone, only being replaced: the fresh one answers. Its
        # handler waits here, reading nothing more from its client meanwhile, so
        # what a client sends waits in order, and in its own socket's buffers.
        while self._restarts:
            await self._no_restart.wait()
        while connection.replaced_by is not None:
            connection = connection.replaced_by
        await self._handle(connection, msg)

    async def _handle(self, connection: Connection, msg: WireMessage) -> None:
        refusal = self._refusal(msg) or self._taken(connection, msg)
        if refusal is not None:
            self._refuse(connection, msg, refusal)
            return
        if self._link is None or self._ending:
            if msg.channel == "shell" and msg.msg_type == "execute_request":
                self._answer_dead_cell(
                    _Cell(msg, connection), self.dead_reason or "the kernel is not running"
                )
                dead = self._status("dead")
                dead.parent_header = dict(msg.header)
                self._send_to(connection, dead)
            return
        self.last_activity = now_utc()
        if msg.channel in ("control", "shell") and msg.msg_type == "shutdown_request":
            # On shell too, where clients before jupyter_client 7 send it and
            # ipykernel takes it all the same.
            await self._client_shutdown(connection, msg)
            return
        # Serialised first: a message that cannot be (text no UTF-8 encodes) is
        # the client's error, and leaves no cell or route waiting for a reply.
        frames = self._frames(msg.parts())
        if msg.channel in ("shell", "control") and msg.msg_type.endswith("_request"):
            self._route(msg.msg_id, connection)  # a request: its reply goes back to it
        cell = None
        if msg.channel == "shell":
            self._link.touch(ran=msg.msg_type == "execute_request")
            if msg.msg_type == "execute_request":
                cell = self._cells[msg.msg_id] = _Cell(_as_parent(msg), connection)
        elif msg.channel == "stdin" and msg.msg_type == "input_reply":
            self._resume()
        if not await self._send_frames(msg.channel, frames):
            self._routes.pop(msg.msg_id, None)
            if cell is not None and self._cells.pop(msg.msg_id, None) is cell:
                self._answer_unrun_cell(
                    cell,
                    "the kernel did not take the request "
                    f"within {_SEND_TIMEOUT_S:g} s; it was not run",
                    "KernelNotResponding",
                )

    def _refusal(self, msg: WireMessage) -> str | None:
        """Why ``msg`` must not reach the kernel, if it must not: a cell the relay could not time.

        The wall timeout holds for a cell the relay sees start and end, and
        interrupts it with a message on control, which ipykernel turns into a
        SIGINT for its main thread. A cell on control would block that channel
        (and its interrupts) untimed; one reusing a pending ``msg_id`` would
        take the timing of the other. Subshells (ipykernel 7) run cells in
        threads of their own, which no SIGINT interrupts: not offered, rather
        than timed and then killed with the kernel and every variable in it.
        """
        if msg.header.get("subshell_id") is not None or msg.msg_type == "create_subshell_request":
            return (
                "kernel subshells are not offered by this kernel: its cells run one at a "
                "time, within the policy's wall_timeout_s; send the request without subshell_id"
            )
        if msg.msg_type != "execute_request":
            return None
        # ipykernel answers a cell without code, or with user_expressions that are
        # not an object, with busy and idle and no reply: a cell waiting forever.
        if not isinstance(msg.content.get("code"), str):
            return "an execute_request needs content.code, the cell's source as a string"
        if not isinstance(msg.content.get("user_expressions", {}), dict):
            return "an execute_request's content.user_expressions must be an object"
        if len(self._cells) >= _MAX_CELLS:
            return (
                f"{len(self._cells)} cells are already waiting to run or be answered on this "
                "kernel; send more once some have ended"
            )
        if msg.channel != "shell":
            return (
                f"an execute_request on {msg.channel} is not run: cells run on the shell "
                "channel, where the policy's wall_timeout_s and interrupts reach them"
            )
        if msg.msg_id in self._cells:
            return (
                f"an execute_request with msg_id {msg.msg_id[:80]!r} is already pending; "
                "give each request a msg_id of its own"
            )
        return None

    def _taken(self, connection: Connection, msg: WireMessage) -> str | None:
        """Why a request must not reach the kernel: its ``msg_id`` is another client's request's.

        Replies go to the client whose request they answer, found by that
        ``msg_id``, which every client sees on IOPub: reused by another, the
        reply would go to it, and its sender would wait for ever.
        """
        if msg.channel not in ("shell", "control") or not msg.msg_type.endswith("_request"):
            return None
        owner = self._routes.get(msg.msg_id)
        while owner is not None and owner.replaced_by is not None:
            owner = owner.replaced_by
        if owner is None or owner is connection:
            return None
        return (
            f"msg_id {msg.msg_id[:80]!r} is that of another client's request still waiting "
            "for its reply; give each request a msg_id of its own"
        )

    def _refuse(self, connection: Connection, msg: WireMessage, reason: str) -> None:
        """Answer a request the kernel will never see: an error reply, then ``idle``, to its sender.

        Raises:
            BadInput: ``msg`` is no request (nothing to answer; the caller drops it).
        """
        if not msg.msg_type.endswith("_request"):
            raise BadInput(reason)
        shown, reply, idle = self._error_answer(msg, reason, "RequestRefused")
        if shown is not None:
            self._send_to(connection, shown)
        if reply.channel not in ("shell", "control"):
            reply.channel = "shell"  # a reply on stdin would be read as an input_request
        self._send_to(connection, reply)
        # Clients wait for the idle as much as for the reply (Open WebUI, JupyterLab's futures).
        self._send_to(connection, idle)

    async def _client_shutdown(self, connection: Connection, msg: WireMessage) -> None:
        # The kernel would exit and leave its sandbox for nobody to restart: the
        # gateway does what the request asks of a kernel manager instead.
        restart = bool(msg.content.get("restart"))
        reply = self._reply(msg, "shutdown_reply", {"status": "ok", "restart": restart})
        self._send_to(connection, reply)
        if restart:
            await self.restart()
        elif self._link is not None:
            await self._die(
                self._link, "the kernel was shut down by a client's shutdown_request", kill=True
            )

    async def _send_raw(self, channel: str, msg: dict[str, Any]) -> None:
        await self._send_frames(channel, self._frames(msg))

    def _frames(self, msg: dict[str, Any]) -> list[bytes]:
        """The message signed and serialised for the kernel.

        Raises:
            BadInput: it cannot be (text that no UTF-8 encodes, a value JSON has not).
        """
        try:
            frames = self._session.serialize(msg)
        except (UnicodeError, TypeError, ValueError) as exc:
            raise BadInput(f"the message cannot be sent to a kernel: {exc}") from None
        return [*frames, *(bytes(b) for b in msg.get("buffers") or ())]

    async def _send_frames(self, channel: str, frames: list[bytes]) -> bool:
        """Send on the asyncio socket; False if the kernel did not take it in time.

        Not ``Session.send``: that sends blocking, and a kernel that stopped
        reading would stall the daemon.
        """
        sock = self._sockets.get(channel)
        if sock is None:
            return False
        try:
            await asyncio.wait_for(sock.send_multipart(frames), _SEND_TIMEOUT_S)
        except (TimeoutError, zmq.ZMQError) as exc:
            log.warning("kernel %s: a %s message was not sent: %s", self.id, channel, exc)
            return False
        return True

    def _route(self, msg_id: str, connection: Connection) -> None:
        self._routes[msg_id] = connection
        while len(self._routes) > _MAX_ROUTES:
            del self._routes[next(iter(self._routes))]

    # -- from the kernel ------------------------------------------------------------------

    async def _pump(self, source: _Source) -> None:
        """Relay one channel's messages from the kernel, in order.

        Once the kernel is dying (``_draining``), only those already here, then
        return: at most what was pending as the drain began, until its deadline,
        and yielding after each, so that a kernel still sending can neither keep
        the drain going nor hold the event loop.
        """
        task = asyncio.current_task()
        assert task is not None
        left: int | None = None
        while True:
            if self._draining:
                if left is None:
                    left = source.pending()
                frames = None
                if left > 0 and time.monotonic() < self._drain_deadline:
                    frames = await source.take()
                if frames is None:
                    if source.channel == "iopub":
                        self._iopub_flushed.set()
                    return
                left -= 1
                await self._relay(source.channel, frames)
                await asyncio.sleep(0)
            else:
                self._waiting.add(task)
                try:
                    frames = await source.receive()
                finally:
                    self._waiting.discard(task)
                await self._relay(source.channel, frames)
                if source.channel == "iopub" and source.pending():
                    # IOPub's is a queue, whose receive returns without waiting
                    # while it holds messages: a kernel printing fast would have
                    # them all relayed in one step, each encoded for every client,
                    # holding the daemon's event loop (every other kernel and
                    # request) and every client's writer, whose queue then filled
                    # however fast its client read. With none waiting, the next
                    # receive waits: no step is added to a cell's round trip.
                    await asyncio.sleep(0)

    async def _relay(self, channel: str, frames: list[bytes]) -> None:
        # The kernel's code holds the key: whatever it sends is checked, and
        # what cannot be relayed is dropped without stopping the channel.
        try:
            _, parts = self._session.feed_identities(frames)
            raw = self._session.deserialize(parts, content=True)
            msg = WireMessage(
                channel=channel,
                header=_object(raw, "header"),
                parent_header=_object(raw, "parent_header"),
                metadata=_object(raw, "metadata"),
                content=_object(raw, "content"),
                buffers=[bytes(b) for b in raw.get("buffers") or ()],
            )
        except Exception as exc:  # noqa: BLE001 - a bad message is dropped, never fatal
            log.warning("kernel %s: dropped a %s message: %s", self.id, channel, exc)
            return
        self.last_activity = now_utc()
        try:
            await self._from_kernel(msg)
        except Exception:  # noqa: BLE001 - the channel goes on; the failure is the relay's
            log.exception("kernel %s: relaying a %s message failed", self.id, channel)

    async def _drain(self) -> None:
        """Relay what the kernel sent and is already here; the pumps end with it.

        A pump waiting for a message is cancelled (it has taken none) and its
        channel drained anew; one relaying a message finishes it first.
        """
        self._draining = True
        self._drain_deadline = time.monotonic() + _DRAIN_S
        current = asyncio.current_task()
        pumps = {t: s for t, s in self._pumps.items() if t is not current and not t.done()}
        if not any(s.channel == "iopub" for s in pumps.values()):
            self._iopub_flushed.set()
        waiting = [t for t in pumps if t in self._waiting]
        for task in waiting:
            task.cancel()
        if waiting:
            await asyncio.wait(waiting)
        drains = [t for t in pumps if t not in waiting]
        drains += [self._spawn(self._pump(pumps[t])) for t in waiting]
        if drains:
            _, late = await asyncio.wait(drains, timeout=_DRAIN_S)
            # Stuck storing a cell's files: its reply still goes out (see _from_kernel).
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    async def _from_kernel(self, msg: WireMessage) -> None:
        parent = msg.parent_id
        if parent in self._internal:
            return  # the relay's own kernel_info requests (cleared when it detaches)
        if msg.channel == "iopub":
            ended = self._track(msg)
            if ended is None and self._held is None:
                self.broadcast(msg)
            else:
                self._hold(msg, ended)
            return
        if msg.msg_type == "kernel_info_reply":
            _without_subshells(msg)
        cell = self._cells.get(parent)
        if msg.channel == "shell" and msg.msg_type == "execute_reply" and cell is not None:
            try:
                await self._finish(cell)
            finally:
                # Also when cancelled storing its files (the kernel is dying or
                # replaced): the reply is the kernel's own, not one to make up.
                self._deliver(msg)
                # Only now: a cell still here when the kernel dies gets a reply made up.
                self._cells.pop(parent, None)
                cell.answered.set()
                self._release()
            return
        if msg.channel == "stdin" and msg.msg_type == "input_request" and cell is not None:
            self._pause(cell)
        self._deliver(msg)

    def _deliver(self, msg: WireMessage) -> None:
        """A reply or request from the kernel, to the connection it answers, and it only.

        As Jupyter Server does: another client never gets it. If that
        connection is gone, its client gets it on coming back with its
        ``session_id`` (within the bounds of what is kept for it). What
        answers no request a client made here goes to every client.
        """
        target = self._routes.get(msg.parent_id)
        if msg.channel in ("shell", "control"):
            self._routes.pop(msg.parent_id, None)
        if target is None:
            self.broadcast(msg)
        else:
            self._send_to(target, msg)

    def _send_to(self, target: Connection, msg: WireMessage) -> None:
        """To ``target`` only; if it is gone, to its client once back with its ``session_id``."""
        if target in self.connections:
            target.send(msg)
            if not target.closed:
                return
            # Closed as too slow by this very message: its client gets it on coming back.
        session_id = target.session_id
        if not session_id:
            return
        back = [c for c in self.connections if c.session_id == session_id and c is not target]
        if back:  # its client came back with its session_id
            back[-1].send(msg)
            if not back[-1].closed:
                return
        self._keep_missed(session_id, msg, _size(msg))

    def _hold(self, msg: WireMessage, ended: _Cell | None) -> None:
        """Hold back IOPub from ``ended``'s idle until its reply is out (see :meth:`_release`).

        Its reply waits for its files to be stored: so does its idle, and so
        does what the kernel sent after it (the next cell's), so that clients
        get it all in the order the kernel sent it, reply first, as ipykernel
        sends them. A client that takes a cell's idle for its end (Open WebUI
        does, and deletes the kernel) then finds its files stored. Bounded:
        past ``_MAX_HELD`` messages held (a next cell's flood while a large
        file is stored), all goes out at once. (Code that forges an idle for
        its own cell, with the kernel's key, holds its output back until the
        cell ends, and no longer than that bound.)
        """
        if self._held is None:
            self._held = []
        self._held.append((msg, ended))
        if len(self._held) > _MAX_HELD:
            self._release(everything=True)

    def _release(self, *, everything: bool = False) -> None:
        """Relay the IOPub held back, up to the idle of a cell whose reply is still not out.

        ``everything``: all of it (the kernel is replaced, dying or too chatty).
        """
        held, self._held = self._held, None
        if held is None:
            return
        for index, (msg, ended) in enumerate(held):
            if not everything and ended is not None and not ended.answered.is_set():
                self._held = held[index:]
                return
            self.broadcast(msg)

    def _track(self, msg: WireMessage) -> _Cell | None:
        """Follow the kernel's state and its cells' timing; the cell whose idle ``msg`` is."""
        cell = self._cells.get(msg.parent_id)
        kind = msg.msg_type
        if kind == "status":
            state = msg.content.get("execution_state")
            if isinstance(state, str) and msg.parent_header.get("msg_type") not in (
                _UNTRACKED_PARENTS
            ):
                self.execution_state = state
            if cell is not None and state == "busy" and cell.deadline is None:
                assert self._link is not None
                cell.deadline = time.monotonic() + self._link.policy.wall_timeout_s
                # A deadline per cell, not one slot for "the" running cell: what the
                # kernel says of another cell (an error reply to a request naming an
                # unknown subshell comes with its own busy and idle, beside a running
                # cell) must not end the timing of this one.
                self._running.append(cell)
                self._changed.set()
            elif cell is not None and state == "idle":
                cell.idle.set()
                self._end_cell(cell)
                return cell
        elif cell is not None and kind == "display_data":
            self._keep_image(cell, msg.content.get("data"))
        elif cell is not None and kind == "execute_input":
            count = msg.content.get("execution_count")
            cell.execution_count = count if isinstance(count, int) else None
        return None

    def _keep_image(self, cell: _Cell, data: object) -> None:
        """Keep a displayed image to store with the cell's files; nothing else, and bounded."""
        if not isinstance(data, dict):
            return
        mime = next((t for t in IMAGE_TYPES if t in data), None)
        if mime is None:
            return
        payload = data[mime]
        size = len(payload) if isinstance(payload, str) else _CELL_IMAGE_BYTES + 1
        if len(cell.displays) >= _CELL_IMAGES or cell.display_bytes + size > _CELL_IMAGE_BYTES:
            return  # not stored: the client still sees it
        cell.displays.append(DisplayOutput(data={mime: payload}, metadata={}))
        cell.display_bytes += size

    def _end_cell(self, cell: _Cell) -> None:
        cell.done.set()
        self._running = [c for c in self._running if c is not cell]
        self._changed.set()

    async def _finish(self, cell: _Cell) -> None:
        """The cell's reply came: store what it produced before the client sees the reply."""
        self._end_cell(cell)
        # The reply and the cell's IOPub travel on different sockets: the images it
        # displayed may still be on their way. Its idle comes after all of them
        # (from a dying kernel, it may never come).
        if not cell.idle.is_set():
            waits = [
                asyncio.ensure_future(cell.idle.wait()),
                asyncio.ensure_future(self._iopub_flushed.wait()),
            ]
            try:
                await asyncio.wait(
                    waits, timeout=_IDLE_AFTER_REPLY_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for wait in waits:
                    wait.cancel()
        link = self._link
        if link is None:
            return
        link.touch(ran=True)
        await self._collect(link, cell)

    async def _collect(self, link: KernelLink, cell: _Cell, timeout_s: float | None = None) -> None:
        """Store the files ``cell`` wrote and the images it displayed, unless done already."""
        async with self._collect_lock:
            if cell.collected:
                return
            cell.collected = True
            try:
                async with asyncio.timeout(timeout_s):
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
        # After the connections: one closed as too slow by ``msg`` has its client away now.
        if self._missed:
            size = _size(msg)
            for missed in self._missed.values():
                missed.keep(msg, size)
        # Each connection is bounded; together they are too, the furthest behind closed
        # first. After the clients away have had ``msg``: one closed here has queued it,
        # and keeps it if it is an answer (``_away``), once.
        pending = sum(c.queued_bytes for c in self.connections)
        if pending > _KERNEL_BYTES:
            for slowest in sorted(self.connections, key=lambda c: c.queued_bytes, reverse=True):
                if pending <= _KERNEL_BYTES:
                    break
                pending -= slowest.queued_bytes
                slowest.close_as_too_slow()

    def _keep_missed(self, session_id: str, msg: WireMessage, size: int) -> None:
        """Keep ``msg`` for a client that is away, if it is (see :class:`_Missed`)."""
        missed = self._missed.get(session_id)
        if missed is not None:
            missed.keep(msg, size)

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

        ``status: dead`` follows, for the kernel.
        """
        self._answer_unrun_cell(cell, reason, "DeadKernelError")

    def _answer_unrun_cell(self, cell: _Cell, reason: str, ename: str) -> None:
        """A cell the kernel will never answer: an error, its reply, its ``idle``.

        The ``idle`` ends the cell for clients that wait for it rather than for
        the reply (Open WebUI's), unless the kernel sent it.
        """
        shown, reply, idle = self._error_answer(cell.request, reason, ename)
        if shown is not None:
            self.broadcast(shown)
        self._routes.pop(cell.request.msg_id, None)
        # As the kernel's own replies go: never to another client; to nobody if
        # its requester is gone for good.
        if cell.requester is not None:
            self._send_to(cell.requester, reply)
        if not cell.idle.is_set():
            self.broadcast(idle)
        cell.answered.set()

    def _error_answer(
        self, request: WireMessage, reason: str, ename: str
    ) -> tuple[WireMessage | None, WireMessage, WireMessage]:
        """An answer to ``request`` that the kernel did not give: its error, reply and ``idle``.

        The error shown on IOPub (for a cell only: None for another request),
        the ``<kind>_reply`` with status error, and the ``idle`` that ends it.
        """
        error = {"ename": ename, "evalue": reason, "traceback": [reason]}
        shown = None
        if request.msg_type == "execute_request":
            raw = self._session.msg("error", error, parent=request.header)
            shown = WireMessage("iopub", raw["header"], dict(request.header), {}, error)
        reply_type = request.msg_type.removesuffix("_request") + "_reply"
        reply = self._reply(request, reply_type, {"status": "error", **error})
        reply.metadata = {"status": "error"}
        idle = self._status("idle")
        idle.parent_header = dict(request.header)
        return shown, reply, idle

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
            timed = [c for c in self._running if c.paused_at is None and c.deadline is not None]
            if not timed:
                await self._changed.wait()
                continue
            cell = min(timed, key=lambda c: c.deadline or 0.0)
            assert cell.deadline is not None
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
            kill=True,
        )

    def _stderr(self, cell: _Cell, text: str) -> None:
        content = {"name": "stderr", "text": text}
        raw = self._session.msg("stream", content, parent=cell.request.header)
        self.broadcast(WireMessage("iopub", raw["header"], dict(cell.request.header), {}, content))

    async def _die(self, link: KernelLink, fallback: str, *, kill: bool = False) -> None:
        """Report the kernel dead to every client at once, then end it for good.

        What the kernel sent before it died goes out first (as Jupyter Server
        flushes IOPub before ``dead``); then a made-up reply for each cell whose
        real one never came, then ``status: dead``. ``kill``: the kernel still
        runs, and the relay ends it; first, so that what is drained is all it
        will ever send.
        """
        # Under the lock: a restart must not attach a fresh kernel while this one
        # is being reported dead, and have its sockets closed for it.
        async with self._lock:
            if self._ending or self._link is not link:
                return
            self._ending = True
            reason = link.ended_because(fallback)
            self.dead_reason = reason
            if kill:
                # Ending it takes its workspace, and what its cells wrote there.
                await self._collect_and_end(link, list(self._cells.values()), reason)
            await self._drain()
            # What the kernel said is out before what is made up for it.
            self._release(everything=True)
            unanswered = list(self._cells.values())
            for cell in unanswered:
                self._answer_dead_cell(cell, reason)
            self.broadcast_status("dead")
            log.info("kernel %s is dead: %s", self.id, reason)
            await self._stop_tasks()
            self._close_sockets()
            self._cells.clear()
            self._running.clear()
            if not kill:
                # What a dying cell wrote is still in its workspace until the kernel ends.
                await self._collect_and_end(link, unanswered, reason)

    async def _collect_and_end(self, link: KernelLink, cells: list[_Cell], reason: str) -> None:
        """Store what ``cells`` wrote (those that ran: a queued one has nothing), then end."""
        for cell in cells:
            if cell.deadline is not None:
                await self._collect(link, cell, _COLLECT_DEAD_S)
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
