"""The warm pool: kernels started, warmed and self-checked before anyone asks.

Two layers, as in sans-IO protocol libraries:

* :class:`PoolBook` is plain data and pure decisions (how many kernels to
  start now, who gets the next warm one, the metrics). No processes, no
  clock of its own: the time is passed in. Unit-tested without kernels.
* :class:`Pool` is the async driver: it starts kernels as the book says,
  hands them out, destroys them when released, and runs as one task of the
  engine's task group.

A kernel is single-use: handed to one session, destroyed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel

from sandkernel.errors import EngineClosed, KernelStartFailed, PoolExhausted, SandkernelError
from sandkernel.kernel import SandboxedKernel

log = logging.getLogger(__name__)

#: A coroutine that starts, warms and self-checks one kernel.
KernelFactory = Callable[[], Awaitable[SandboxedKernel]]

#: Kernel starts failing one after another, none succeeding between them,
#: after which the callers waiting for a kernel get the failure instead of
#: waiting out ``acquire_timeout_s``.
FAILED_STARTS_IN_A_ROW = 3


def _failure(waiter: asyncio.Future[SandboxedKernel]) -> BaseException | None:
    return None if waiter.cancelled() else waiter.exception()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class PoolBook:
    """Counts and decisions of the warm pool; pure, no I/O.

    Args:
        target_warm: kernels to keep warm (``pool_size``).
        max_kernels: kernels alive at once (warm + starting + in use).
        max_concurrent_starts: starts in flight at once (protects the CPUs).
    """

    target_warm: int
    max_kernels: int
    max_concurrent_starts: int = 2
    warm: int = 0
    starting: int = 0
    in_use: int = 0
    waiters: int = 0
    hits: int = 0
    misses: int = 0
    started: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    acquire_latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    @property
    def alive(self) -> int:
        return self.warm + self.starting + self.in_use

    def starts_needed(self) -> int:
        """How many kernel starts to begin now."""
        wanted = self.target_warm + self.waiters - self.warm - self.starting
        room = self.max_kernels - self.alive
        slots = self.max_concurrent_starts - self.starting
        return max(0, min(wanted, room, slots))

    def retry_delay_s(self) -> float:
        """Back-off after failed starts, so a broken sandbox does not spin the CPU.

        None while a caller waits for a kernel: its wait is for a start, and
        it should learn soon whether one can succeed (see :meth:`failing`).
        """
        if self.consecutive_failures == 0 or self.waiters:
            return 0.0
        return float(min(30.0, 0.5 * 2 ** (self.consecutive_failures - 1)))

    def failing(self) -> bool:
        """Whether starts fail every time, so that a caller waiting for a kernel is told now.

        A start failing now and then (under load, say) is retried and the
        caller keeps waiting; :data:`FAILED_STARTS_IN_A_ROW` failures with
        no success between them is a sandbox that cannot start kernels.
        """
        return self.consecutive_failures >= FAILED_STARTS_IN_A_ROW

    def begin_start(self) -> None:
        self.starting += 1

    def start_succeeded(self) -> None:
        self.starting -= 1
        self.warm += 1
        self.started += 1
        self.consecutive_failures = 0

    def start_failed(self) -> None:
        self.starting -= 1
        self.failed += 1
        self.consecutive_failures += 1

    def hand_out(self, *, waited: bool, latency_s: float) -> None:
        """A warm kernel leaves the pool for a session."""
        self.warm -= 1
        self.in_use += 1
        if waited:
            self.misses += 1
        else:
            self.hits += 1
        self.acquire_latencies_s.append(latency_s)

    def discard_warm(self) -> None:
        """A warm kernel was found dead or is being shut down."""
        self.warm -= 1

    def released(self) -> None:
        self.in_use -= 1


class PoolStats(BaseModel):
    """What ``engine.stats()`` reports about the pool."""

    warm: int
    starting: int
    in_use: int
    waiting: int
    target_warm: int
    max_kernels: int
    hits: int
    misses: int
    kernels_started: int
    kernels_failed: int
    acquire_p50_ms: float | None
    acquire_p99_ms: float | None
    last_start_error: str | None
    #: which kernel start is in force and why: forked from the zygote, or a
    #: cold start and why (``zygote=False``, a policy a fork cannot honour, a
    #: zygote that failed); set by the engine, None from the pool alone
    kernel_start: str | None = None


class Pool:
    """Keeps ``size`` kernels warm and hands them out, first come first served.

    Args:
        factory: starts, warms and self-checks one kernel.
        size: kernels kept warm.
        max_kernels: bound on live kernels (warm + starting + in use).
        max_concurrent_starts: bound on starts in flight.
        refill_delay_s: how long after a hand-out the refill starts.
    """

    def __init__(
        self,
        factory: KernelFactory,
        *,
        size: int,
        max_kernels: int,
        max_concurrent_starts: int = 2,
        refill_delay_s: float = 0.0,
    ) -> None:
        self._factory = factory
        self.refill_delay_s = refill_delay_s
        self.book = PoolBook(size, max_kernels, max_concurrent_starts)
        # Handed out last in, first out: the kernel that ran a cell (its warm-up)
        # most recently has the warmest caches. Measured here, a kernel's cell
        # after 2 s idle spends about 2 ms more in the kernel than one right
        # after another (of 3 ms).
        self._warm: deque[SandboxedKernel] = deque()
        self._waiters: deque[asyncio.Future[SandboxedKernel]] = deque()
        self._in_use: set[SandboxedKernel] = set()
        #: kernels started for one caller outside the warm ones (see :meth:`start_outside`)
        self._outside: set[SandboxedKernel] = set()
        self._outside_starts: set[asyncio.Task[SandboxedKernel]] = set()
        self._wake = asyncio.Event()
        self._starts: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_start_error: str | None = None

    # -- the driver task --------------------------------------------------------

    async def run(self) -> None:
        """Start kernels whenever the book says so. Runs until cancelled."""
        while not self._closed:
            await self._back_off()
            for _ in range(self.book.starts_needed()):
                self.book.begin_start()
                task = asyncio.create_task(self._start_one())
                self._starts.add(task)
                task.add_done_callback(self._starts.discard)
            self._wake.clear()
            await self._wake.wait()

    async def _back_off(self) -> None:
        """Wait out the back-off after failed starts; a caller waiting for a kernel ends it."""
        delay = self.book.retry_delay_s()
        if not delay:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                while not self.book.waiters and not self._closed:
                    self._wake.clear()
                    await self._wake.wait()

    async def _start_one(self) -> None:
        try:
            # Ready for a session: self-checked, prewarmed and warmed up.
            kernel = await self._factory()
        except asyncio.CancelledError:
            self.book.start_failed()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is counted and reported
            self.book.start_failed()
            self.last_start_error = str(exc)
            log.warning("kernel start failed: %s", exc)
            if self.book.failing():
                self._fail_waiters()
            self._wake.set()
            return
        self.book.start_succeeded()
        if self._closed:
            self.book.discard_warm()
            await kernel.shutdown()
            return
        self._warm.append(kernel)
        self._serve_waiters()
        self._wake.set()

    def _fail_waiters(self) -> None:
        """Tell every caller waiting for a kernel that none can start, and why."""
        why = (
            f"no kernel could start: the last {self.book.consecutive_failures} starts "
            f"failed, the last with: {self.last_start_error}"
        )
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(KernelStartFailed(why))
                # Told now: no longer waiting, so no start is made for it (its
                # own bookkeeping, in _take, runs only once it resumes).
                self.book.waiters -= 1

    def _serve_waiters(self) -> None:
        while self._waiters and self._warm:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            kernel = self._warm.pop()
            waiter.set_result(kernel)

    # -- acquire / release ----------------------------------------------------------

    async def acquire(self, *, timeout_s: float) -> SandboxedKernel:
        """Take a warm kernel, waiting up to ``timeout_s`` for one.

        Raises:
            PoolExhausted: none became ready in time (says which setting to raise).
            KernelStartFailed: starts fail one after another (the last one's error
                says why), found while waiting, not at the deadline.
            EngineClosed: the pool is shutting down.
        """
        if self._closed:
            raise EngineClosed("the engine is shut down")
        started = time.monotonic()
        while True:
            kernel, waited = await self._take(started, timeout_s)
            if kernel.alive:
                self.book.hand_out(waited=waited, latency_s=time.monotonic() - started)
                self._in_use.add(kernel)
                # The refill starts a little later: started at once, it would
                # compete with the first cell of the session that just got this
                # kernel, which usually follows right away.
                asyncio.get_running_loop().call_later(self.refill_delay_s, self._wake.set)
                return kernel
            # Died while warm (rare): discard and take the next one.
            self.book.discard_warm()
            await kernel.shutdown()
            self._wake.set()

    async def _take(self, started: float, timeout_s: float) -> tuple[SandboxedKernel, bool]:
        if self._warm and not self._waiters:
            return self._warm.pop(), False
        waiter: asyncio.Future[SandboxedKernel] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.book.waiters += 1
        self._wake.set()
        handed = False
        try:
            remaining = max(0.0, timeout_s - (time.monotonic() - started))
            kernel = await asyncio.wait_for(asyncio.shield(waiter), remaining)
            handed = True
            return kernel, True
        except TimeoutError:
            raise PoolExhausted(self._exhausted_message(timeout_s)) from None
        finally:
            if not (waiter.done() and isinstance(_failure(waiter), KernelStartFailed)):
                self.book.waiters -= 1  # else counted out when it was told
            if not waiter.done():
                waiter.cancel()
            elif not handed and not waiter.cancelled() and waiter.exception() is None:
                # A kernel arrived just as we timed out or were cancelled: give it back.
                self._warm.append(waiter.result())
                self._serve_waiters()

    def _exhausted_message(self, timeout_s: float) -> str:
        b = self.book
        why = (
            f"all {b.max_kernels} kernels are in use (max_kernels)"
            if b.alive >= b.max_kernels
            else f"{b.starting} kernel(s) still starting"
        )
        msg = f"no warm kernel within {timeout_s:g} s (acquire_timeout_s): {why}"
        if self.last_start_error:
            msg += f"; last start failure: {self.last_start_error}"
        return msg + "; raise pool_size, max_kernels or acquire_timeout_s"

    async def start_outside(self, factory: KernelFactory) -> SandboxedKernel:
        """Start a kernel for the caller alone, outside the warm ones (a session's own folder).

        Owned by the pool as a handed-out kernel is: :meth:`close` cancels its
        start or shuts it down, so none outlives the engine; :meth:`release`
        destroys it. It does not count in the pool's figures.

        Raises:
            EngineClosed: the pool is shutting down (the kernel, if any, is ended).
        """
        if self._closed:
            raise EngineClosed("the engine is shut down")

        async def start() -> SandboxedKernel:
            kernel = await factory()
            # In the step the start ends: close() either cancels it or finds the kernel.
            self._outside.add(kernel)
            return kernel

        task = asyncio.ensure_future(start())
        self._outside_starts.add(task)
        task.add_done_callback(self._outside_starts.discard)
        try:
            kernel = await task  # cancelling the caller cancels the start
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if task.done() and not task.cancelled() and task.exception() is None:
                await self.release(task.result())  # started as its caller gave up
            elif self._closed and caller is not None and caller.cancelling() == 0:
                raise EngineClosed("the engine is shutting down") from None
            raise
        if self._closed:  # started as the pool closed, which ended it
            await self.release(kernel)
            raise EngineClosed("the engine is shutting down")
        return kernel

    async def release(self, kernel: SandboxedKernel) -> None:
        """Destroy a kernel from :meth:`acquire` or :meth:`start_outside` (never reused)."""
        self._outside.discard(kernel)
        if kernel in self._in_use:
            self._in_use.discard(kernel)
            self.book.released()
        try:
            await kernel.shutdown()  # shielded inside: it ends even if we are cancelled
        finally:
            self._wake.set()  # the slot is free: a cancelled releaser still wakes the waiters

    # -- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop starting, fail waiters, shut down every warm and in-use kernel."""
        self._closed = True
        self._wake.set()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(EngineClosed("the engine is shutting down"))
        starts = [*self._starts, *self._outside_starts]
        for task in starts:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, SandkernelError):
            await asyncio.gather(*starts, return_exceptions=True)
        kernels = list(self._warm) + list(self._in_use) + list(self._outside)
        self._warm.clear()
        self._in_use.clear()
        self._outside.clear()
        await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)

    def stats(self) -> PoolStats:
        b = self.book
        lat = list(b.acquire_latencies_s)
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        return PoolStats(
            warm=b.warm,
            starting=b.starting,
            in_use=b.in_use,
            waiting=b.waiters,
            target_warm=b.target_warm,
            max_kernels=b.max_kernels,
            hits=b.hits,
            misses=b.misses,
            kernels_started=b.started,
            kernels_failed=b.failed,
            acquire_p50_ms=None if p50 is None else round(p50 * 1000, 3),
            acquire_p99_ms=None if p99 is None else round(p99 * 1000, 3),
            last_start_error=self.last_start_error,
        )
