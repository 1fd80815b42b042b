"""A direct channel from a driver to a host actor, for the calls on the hot path.

A Ray actor call costs a few milliseconds on a small machine (several thread
hops on each side, more when the method suspends, as every cell run does); a
frame on a TCP connection costs a tenth of one. So each host also listens on a
port of its node, and a driver that can reach it sends its session calls and
one-shot runs there. Everything else (polls and leases, file transfers,
streamed output) and every driver that cannot reach the port (a Ray Client
outside the cluster) uses Ray calls; so does a driver whose connection broke.

The channel is trusted as Ray is: whoever holds the host's random token (which
travels through Ray, as every call's arguments do) may call the host. A peer
is authenticated before anything it sends is unpickled: its first frame must
be the token, compared in constant time.

Frames are a 4-byte big-endian length and a pickle: ``("call", id, method,
args)`` and ``("cancel", id)`` from the driver; ``("reply", id, value)`` or
``("error", id, text)`` from the host. A method that answers with an async
generator streams its answer, as a Ray streaming generator would: an
``("item", id, value)`` frame per item, then ``("reply", id, None)``. Closing
the connection cancels the calls in flight, as cancelling a Ray call does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import itertools
import logging
import pickle
import secrets
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
MAX_FRAME_BYTES = 1 << 30
_TOKEN_BYTES = 32
CONNECT_TIMEOUT_S = 3.0
#: A peer that has not sent the token by then is dropped: a connection that
#: never authenticates must not hold a descriptor and a task for ever.
AUTH_TIMEOUT_S = 10.0

Handler = Callable[[str, Sequence[Any]], Awaitable[Any]]


class ChannelClosed(ConnectionError):
    """The connection to the host broke: the call may or may not have run."""


@dataclass(frozen=True)
class Endpoint:
    """Where a host listens, and the token it expects first."""

    host: str
    port: int
    token: bytes = field(repr=False)


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"a channel frame is limited to {MAX_FRAME_BYTES} bytes")
    return _LENGTH.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > max_bytes:
        raise ConnectionError(f"channel frame of {size} bytes (at most {max_bytes})")
    return await reader.readexactly(size)


class ChannelServer:
    """The host's side: serves ``handler(method, args)`` to authenticated peers."""

    def __init__(self, handler: Handler, *, auth_timeout_s: float = AUTH_TIMEOUT_S) -> None:
        self._handler = handler
        self._auth_timeout_s = auth_timeout_s
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self, bind: str) -> Endpoint:
        """Listen on a free port of ``bind`` (the node's address)."""
        self._server = await asyncio.start_server(self._serve, bind, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return Endpoint(bind, port, self._token)

    async def close(self) -> None:
        """Stop listening and drop every peer (their calls in flight are cancelled)."""
        if self._server is not None:
            self._server.close()
        # Closing the transports ends each connection's loop; cancelling its task
        # instead would make asyncio's stream callback log the cancellation.
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        assert current is not None
        self._connections[current] = writer
        calls: dict[int, asyncio.Task[None]] = {}
        try:
            async with asyncio.timeout(self._auth_timeout_s):
                token = await _read_frame(reader, max_bytes=_TOKEN_BYTES)
            if not hmac.compare_digest(token, self._token):
                log.warning("sandkernel channel: a peer without the token was refused")
                return
            while True:
                message = pickle.loads(await _read_frame(reader))  # noqa: S301 - authenticated
                if message[0] == "call":
                    _, call_id, method, args = message
                    task = asyncio.create_task(self._answer(writer, call_id, method, args))
                    calls[call_id] = task
                    task.add_done_callback(functools.partial(_forget, calls, call_id))
                elif message[0] == "cancel" and message[1] in calls:
                    calls[message[1]].cancel()
        except (
            ConnectionError, asyncio.IncompleteReadError, pickle.UnpicklingError, ValueError,
            TimeoutError,
        ):  # fmt: skip
            pass  # the peer left, spoke nonsense or never authenticated: its calls end below
        finally:
            for task in list(calls.values()):
                task.cancel()
            await asyncio.gather(*calls.values(), return_exceptions=True)
            writer.close()
            self._connections.pop(current, None)

    async def _answer(
        self, writer: asyncio.StreamWriter, call_id: int, method: str, args: Sequence[Any]
    ) -> None:
        try:
            value = await self._handler(method, args)
            if isinstance(value, AsyncGenerator):
                async with contextlib.aclosing(value) as items:
                    async for item in items:
                        await _write(writer, _pickled(("item", call_id, item)))
                value = None
            payload = _pickled(("reply", call_id, value))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug on this side: the caller reports it
            log.exception("sandkernel channel: %s failed", method)
            payload = _pickled(("error", call_id, f"{type(exc).__name__}: {exc}"))
        await _write(writer, payload)


def _pickled(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


async def _write(writer: asyncio.StreamWriter, payload: bytes) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):  # the peer left: its calls end
        writer.write(_frame(payload))
        await writer.drain()


def _forget(calls: dict[int, Any], call_id: int, _: object) -> None:
    calls.pop(call_id, None)


class ChannelClient:
    """The driver's side: one connection to one host, shared by every call."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count()
        #: the frames of each call in flight, as they come: (kind, value)
        self._pending: dict[int, asyncio.Queue[tuple[str, Any]]] = {}
        self._closed: str | None = None
        self._receiver = asyncio.create_task(self._receive(), name="sandkernel-channel")

    @classmethod
    async def connect(
        cls, endpoint: Endpoint, timeout_s: float = CONNECT_TIMEOUT_S
    ) -> ChannelClient:
        """Connect and authenticate; OSError or TimeoutError if the host is out of reach."""
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.write(_frame(endpoint.token))
        return cls(reader, writer)

    @property
    def open(self) -> bool:
        return self._closed is None

    async def call(self, method: str, args: Sequence[Any]) -> Any:
        """The host's answer to ``method(*args)``. Cancelling the caller cancels it there.

        Raises:
            ChannelClosed: the connection broke before the answer came.
            RuntimeError: the host failed unexpectedly (its log says more).
        """
        call_id, frames = self._send_call(method, args)
        answered = False
        try:
            await self._drain()
            _, value = await self._next_frame(frames)
            answered = True
            return value
        finally:
            self._end_call(call_id, answered)

    async def stream(self, method: str, args: Sequence[Any]) -> AsyncGenerator[Any]:
        """The items of the host's streamed answer to ``method(*args)``, each as it comes.

        Closing the iterator early, or cancelling its consumer, cancels the call there.

        Raises:
            ChannelClosed: the connection broke before the answer ended.
            RuntimeError: the host failed unexpectedly (its log says more).
        """
        call_id, frames = self._send_call(method, args)
        answered = False
        try:
            await self._drain()
            while True:
                kind, value = await self._next_frame(frames)
                if kind == "reply":
                    answered = True
                    return
                yield value
        finally:
            self._end_call(call_id, answered)

    def _send_call(
        self, method: str, args: Sequence[Any]
    ) -> tuple[int, asyncio.Queue[tuple[str, Any]]]:
        """Send ``method(*args)`` now: its id and the queue its frames arrive in.

        Calls are started on the host in the order they are sent.
        """
        if self._closed is not None:
            raise ChannelClosed(self._closed)
        call_id = next(self._ids)
        try:
            self._send(("call", call_id, method, tuple(args)))
        except (ConnectionError, RuntimeError) as exc:
            raise ChannelClosed(str(exc)) from None
        frames: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._pending[call_id] = frames
        return call_id, frames

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise ChannelClosed(str(exc)) from None

    @staticmethod
    async def _next_frame(frames: asyncio.Queue[tuple[str, Any]]) -> tuple[str, Any]:
        kind, value = await frames.get()
        if kind == "error":
            raise RuntimeError(f"the sandkernel host failed: {value}")
        if kind == "closed":
            raise ChannelClosed(value)
        return kind, value

    def _end_call(self, call_id: int, answered: bool) -> None:
        """Forget a call; cancel it on the host unless it was answered in full."""
        if self._pending.pop(call_id, None) is not None and not answered and self._closed is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._send(("cancel", call_id))

    def _send(self, message: tuple[Any, ...]) -> None:
        self._writer.write(_frame(_pickled(message)))

    async def _receive(self) -> None:
        reason = "the host closed the connection"
        try:
            while True:
                kind, call_id, value = pickle.loads(await _read_frame(self._reader))  # noqa: S301 - our host
                frames = self._pending.get(call_id)
                if frames is not None:
                    frames.put_nowait((kind, value))
        except asyncio.CancelledError:
            reason = "the channel was closed"
            raise
        except (ConnectionError, asyncio.IncompleteReadError, pickle.UnpicklingError) as exc:
            reason = f"the connection to the host broke ({type(exc).__name__})"
        finally:
            self._closed = reason
            for frames in self._pending.values():
                frames.put_nowait(("closed", reason))
            self._writer.close()

    def abort(self) -> None:
        """Close the connection now; calls in flight fail with :class:`ChannelClosed`."""
        self._receiver.cancel()
        self._writer.close()
