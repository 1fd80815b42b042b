"""The driver's handle on one node's host actor: its calls, and how they fail when it is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray

from sandkernel.errors import EngineClosed
from sandkernel.ray._channel import ChannelClient, ChannelClosed, Endpoint
from sandkernel.ray._protocol import CHANNEL_METHODS, HostClosing, HostInfo, HostStats, Raised
from sandkernel.ray.errors import HostUnreachable

#: A call's bytes argument (an upload) larger than this is handed to Ray off the loop.
_BIG_ARGUMENT = 1 << 20

log = logging.getLogger(__name__)

MIN_CHUNK = 4  # one-shot runs per call, at least (when that many wait)
CHUNKS_PER_HOST = 3  # chunks in flight per host: one finishing, two keeping it busy
RUN_ATTEMPTS = 3  # hosts a one-shot run (or a session's placement) is tried on before giving up


class HostGone(Exception):
    """Internal: the host of a call is lost; public methods turn it into the right error."""

    def __init__(self, host: HostHandle) -> None:
        super().__init__(host.lost_reason)
        self.host = host


#: After these a stateless one-shot run is run again on another host.
RERUN_ON = (HostGone, HostUnreachable, HostClosing, EngineClosed)


class HostHandle:
    """The driver's handle on one incarnation of a node's host actor."""

    def __init__(
        self,
        actor: Any,
        info: HostInfo,
        endpoint: Endpoint | None,
        confirm: Callable[[HostHandle], Awaitable[None]],
    ) -> None:
        self.actor = actor
        self.info = info
        self.endpoint = endpoint
        self.channel: ChannelClient | None = None
        self.node_id = info.node_id
        self.tag = info.tag
        self._confirm = confirm
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.stats: HostStats | None = None
        self.free_slots = info.max_sessions
        self.placing = 0  # sessions being opened here
        self.opened = 0  # sessions opened here, ever (to discount those a poll missed)
        self.batch_slots = info.batch_slots
        self.batch_inflight = 0  # one-shot runs sent, not yet answered
        self.batch_calls = 0

    @property
    def batch_chunk(self) -> int:
        """One-shot runs sent to this host in one call, at most."""
        return max(MIN_CHUNK, self.batch_slots)

    @property
    def batch_window(self) -> int:
        """One-shot runs this host is given at once (back-pressure bound)."""
        return CHUNKS_PER_HOST * self.batch_chunk

    @property
    def batch_load(self) -> float:
        """One-shot runs in flight here per batch slot (below 1: a slot is free)."""
        return self.batch_inflight / self.batch_slots

    @property
    def gone(self) -> bool:
        return self.lost.done()

    @property
    def lost_reason(self) -> str:
        return self.lost.result() if self.lost.done() else ""

    def describe(self) -> str:
        return f"node {self.node_id} ({self.info.hostname}, {self.info.address})"

    def mark_lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        self.disconnect()

    async def connect(self) -> None:
        """Open the direct channel if there is none (or it broke); Ray calls if out of reach."""
        if self.endpoint is None or self.gone or (self.channel is not None and self.channel.open):
            return
        try:
            self.channel = await ChannelClient.connect(self.endpoint)
        except (OSError, TimeoutError) as exc:
            log.info("no direct channel to %s (%s): using Ray calls", self.describe(), exc)

    def disconnect(self) -> None:
        if self.channel is not None:
            self.channel.abort()
            self.channel = None

    @property
    def warm(self) -> int:
        return self.stats.engine.pool.warm if self.stats is not None else 0

    def submit(self, method: str, *args: Any) -> Any:
        """Send a call; the ObjectRef (or streaming generator) of its reply."""
        if not self.gone and not ray.is_initialized():
            # Never let Ray's auto-connect open a new connection behind the caller's back.
            self.mark_lost("cannot be reached: this process's Ray connection was shut down")
        if self.gone:
            raise HostGone(self)
        return getattr(self.actor, method).remote(*args)

    async def call(self, method: str, *args: Any) -> Any:
        """Call a host method (over the direct channel if open); its reply, or its error."""
        if self.gone:
            raise HostGone(self)
        channel = self.channel
        if channel is not None and channel.open and method in CHANNEL_METHODS:
            reply = await self._over_channel(channel, channel.call(method, args))
        else:
            if any(isinstance(a, bytes | bytearray) and len(a) > _BIG_ARGUMENT for a in args):
                # Ray copies the bytes into its object store as the call is made
                # (seconds for an upload of hundreds of MiB): not on the event loop.
                ref = await asyncio.to_thread(self.submit, method, *args)
            else:
                ref = self.submit(method, *args)
            reply = await self.guard(asyncio.wrap_future(ref.future()), cancel=ref)
        if isinstance(reply, Raised):
            raise reply.error
        return reply

    async def stream(self, method: str, *args: Any) -> AsyncGenerator[Any]:
        """The items a streaming host method yields, each as it comes; a :class:`Raised` is raised.

        Over the direct channel if open, else as a Ray streaming generator.
        Closing the iterator early, or cancelling its consumer, cancels the
        call on the host.
        """
        if self.gone:
            raise HostGone(self)
        channel = self.channel
        if channel is not None and channel.open and method in CHANNEL_METHODS:
            items = self._stream_over_channel(channel, method, args)
        else:
            items = self._stream_over_ray(method, args)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, Raised):
                    raise item.error
                yield item

    async def _stream_over_channel(
        self, channel: ChannelClient, method: str, args: tuple[Any, ...]
    ) -> AsyncGenerator[Any]:
        items = channel.stream(method, args)
        async with contextlib.aclosing(items):  # closed early: cancelled on the host
            while True:
                try:
                    item = await self._over_channel(channel, anext(items))
                except StopAsyncIteration:
                    return
                yield item

    async def _stream_over_ray(self, method: str, args: tuple[Any, ...]) -> AsyncGenerator[Any]:
        refs = self.submit(method, *args)

        async def next_item() -> Any:
            return await asyncio.wrap_future((await refs.__anext__()).future())

        ended = False
        try:
            while True:
                try:
                    item = await self.guard(next_item(), cancel=None)
                except StopAsyncIteration:
                    ended = True
                    return
                yield item
        finally:
            if not ended and not self.gone:
                ray.cancel(refs)  # cancelled or closed early: the host interrupts it

    async def _over_channel[T](self, channel: ChannelClient, answer: Awaitable[T]) -> T:
        """A call's answer over the direct channel; a broken channel is told from a lost host.

        A host found lost closes its channel (:meth:`mark_lost`): the answer
        fails at once, without a race against :attr:`lost` per call.
        """
        try:
            return await answer
        except ChannelClosed as exc:
            if self.channel is channel:
                self.channel = None  # Ray calls until the next poll reconnects
            await self._confirm(self)
            if self.gone:
                raise HostGone(self) from None
            raise HostUnreachable(
                f"the connection to the sandkernel host on {self.describe()} broke ({exc}); "
                "the call may or may not have run: try again"
            ) from None

    async def guard[T](self, awaitable: Awaitable[T], *, cancel: Any) -> T:
        """Await a Ray reply of this host, failing at once when the host is lost meanwhile.

        Cancelling the caller cancels the call on the host (``ray.cancel`` of
        ``cancel``); there the engine interrupts the cell.
        """
        future = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait((future, self.lost), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()
            if not self.gone and cancel is not None:
                ray.cancel(cancel)
            raise
        if not future.done():
            future.cancel()
            raise HostGone(self)
        try:
            return future.result()
        except ray.exceptions.ActorUnavailableError as exc:
            await self._confirm(self)
            if self.gone:
                raise HostGone(self) from None
            raise HostUnreachable(
                f"the sandkernel host on {self.describe()} did not answer ({exc}); "
                "the call may or may not have run: try again"
            ) from None
        except ray.exceptions.RayActorError as exc:
            self.mark_lost(death_reason(exc))
            raise HostGone(self) from None


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes, as ``ray.nodes()`` describes them (blocking)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # ray: untyped
    return [n for n in nodes if n.get("Alive")]


def death_reason(exc: BaseException) -> str:
    text = str(exc)
    if "node has died" in text or "node died" in text:
        return "left the cluster (its node died)"
    first = next((line for line in text.splitlines() if line.strip()), "no detail")
    return f"lost its host actor ({first.strip()})"


@dataclass
class LostHost:
    """What the driver remembers of a lost host, to name it in errors."""

    node_id: str
    where: str
    reason: str

    @classmethod
    def of(cls, host: HostHandle) -> LostHost:
        return cls(host.node_id, host.describe(), host.lost_reason)
