"""The pool's bookkeeping and its hand-out order, without processes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sandkernel.errors import EngineClosed, KernelStartFailed
from sandkernel.pool import FAILED_STARTS_IN_A_ROW, Pool, PoolBook, percentile


def test_starts_fill_up_to_target_within_concurrency() -> None:
    book = PoolBook(target_warm=4, max_kernels=10, max_concurrent_starts=2)
    assert book.starts_needed() == 2
    book.begin_start()
    book.begin_start()
    assert book.starts_needed() == 0  # both start slots busy
    book.start_succeeded()
    assert book.starts_needed() == 1
    book.begin_start()
    book.start_succeeded()
    book.start_succeeded()
    assert (book.warm, book.starting) == (3, 0)
    assert book.starts_needed() == 1


def test_hand_out_triggers_refill_and_counts_hits() -> None:
    book = PoolBook(target_warm=2, max_kernels=10)
    for _ in range(2):
        book.begin_start()
        book.start_succeeded()
    assert book.starts_needed() == 0
    book.hand_out(waited=False, latency_s=0.001)
    assert (book.warm, book.in_use, book.hits, book.misses) == (1, 1, 1, 0)
    assert book.starts_needed() == 1


def test_waiters_add_demand_beyond_target() -> None:
    book = PoolBook(target_warm=0, max_kernels=5, max_concurrent_starts=4)
    assert book.starts_needed() == 0
    book.waiters = 3
    assert book.starts_needed() == 3


def test_max_kernels_bounds_starts_even_with_waiters() -> None:
    book = PoolBook(target_warm=2, max_kernels=3, max_concurrent_starts=8)
    book.in_use = 3
    book.waiters = 5
    assert book.starts_needed() == 0
    book.released()
    assert book.starts_needed() == 1


def test_exhaustion_and_miss_are_counted() -> None:
    book = PoolBook(target_warm=1, max_kernels=1)
    book.begin_start()
    book.start_succeeded()
    book.hand_out(waited=True, latency_s=0.5)
    assert book.misses == 1 and book.hits == 0
    assert book.starts_needed() == 0  # the only kernel is in use


def test_failed_starts_back_off_exponentially_and_reset() -> None:
    book = PoolBook(target_warm=1, max_kernels=2)
    assert book.retry_delay_s() == 0
    delays = []
    for _ in range(8):
        book.begin_start()
        book.start_failed()
        delays.append(book.retry_delay_s())
    assert delays[:3] == [0.5, 1.0, 2.0] and delays[-1] == 30.0
    assert book.failed == 8
    book.begin_start()
    book.start_succeeded()
    assert book.retry_delay_s() == 0


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


class _FakeKernel:
    """Stands in for a SandboxedKernel the factory made ready: numbered, shutdown recorded."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.alive = True
        self.shut_down = False

    async def shutdown(self) -> None:
        self.alive = False
        self.shut_down = True


async def _filled(pool: Pool, count: int) -> None:
    async with asyncio.timeout(5):
        while pool.book.warm < count:  # noqa: ASYNC110 - the pool's own task fills it
            await asyncio.sleep(0)


@pytest.mark.anyio
async def test_kernels_are_handed_out_last_in_first_out() -> None:
    made: list[_FakeKernel] = []

    async def factory() -> Any:
        made.append(_FakeKernel(len(made)))
        return made[-1]

    pool = Pool(factory, size=2, max_kernels=4, max_concurrent_starts=1)
    runner = asyncio.ensure_future(pool.run())
    try:
        await _filled(pool, 2)
        first = await pool.acquire(timeout_s=5)
        assert first is made[1]  # the most recently started
    finally:
        runner.cancel()
        await pool.close()
    assert all(k.shut_down for k in made)


@pytest.mark.anyio
async def test_a_start_that_fails_is_counted_failed_and_the_next_one_serves() -> None:
    made: list[_FakeKernel] = []

    async def factory() -> Any:
        made.append(_FakeKernel(len(made)))
        if len(made) == 1:
            raise KernelStartFailed("set-up cell failed: dead")
        return made[-1]

    pool = Pool(factory, size=1, max_kernels=2, max_concurrent_starts=1)
    runner = asyncio.ensure_future(pool.run())
    try:
        await _filled(pool, 1)
        assert pool.book.failed == 1 and "set-up cell failed" in (pool.last_start_error or "")
        assert await pool.acquire(timeout_s=5) is made[1]
    finally:
        runner.cancel()
        await pool.close()


@pytest.mark.anyio
async def test_closing_cancels_a_start_outside_the_pool_and_tells_its_caller_closed() -> None:
    entered, ended = asyncio.Event(), asyncio.Event()

    async def factory() -> Any:
        entered.set()
        try:
            await asyncio.Event().wait()  # a start that takes long
        finally:
            ended.set()

    pool = Pool(factory, size=0, max_kernels=1)
    starting = asyncio.ensure_future(pool.start_outside(factory))
    await entered.wait()
    await pool.close()
    assert ended.is_set()  # the start was cancelled, not left running
    with pytest.raises(EngineClosed):
        await starting


@pytest.mark.anyio
async def test_a_kernel_started_outside_the_pool_is_shut_down_on_close_unless_released() -> None:
    made: list[_FakeKernel] = []

    async def factory() -> Any:
        made.append(_FakeKernel(len(made)))
        return made[-1]

    pool = Pool(factory, size=0, max_kernels=1)
    released = await pool.start_outside(factory)
    kept = await pool.start_outside(factory)
    await pool.release(released)
    assert released.shut_down and not kept.shut_down
    assert pool.book.in_use == 0  # not one of the pool's own
    await pool.close()
    assert kept.shut_down
    with pytest.raises(EngineClosed):
        await pool.start_outside(factory)


@pytest.mark.anyio
async def test_a_kernel_started_outside_the_pool_as_its_caller_gave_up_is_shut_down() -> None:
    made: list[_FakeKernel] = []
    ready = asyncio.Event()

    async def factory() -> Any:
        made.append(_FakeKernel(len(made)))
        ready.set()
        return made[-1]

    pool = Pool(factory, size=0, max_kernels=1)
    starting = asyncio.ensure_future(pool.start_outside(factory))
    await ready.wait()
    starting.cancel()  # its kernel is ready; the caller has not taken it yet
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert made[0].shut_down
    await pool.close()


def test_a_waiting_caller_ends_the_back_off_and_repeated_failures_are_failing() -> None:
    book = PoolBook(target_warm=1, max_kernels=4)
    for _ in range(FAILED_STARTS_IN_A_ROW - 1):
        book.begin_start()
        book.start_failed()
    assert book.retry_delay_s() > 0 and not book.failing()
    book.waiters = 1
    assert book.retry_delay_s() == 0  # a caller waits: try again now
    book.begin_start()
    book.start_failed()
    assert book.failing()
    book.begin_start()
    book.start_succeeded()
    assert not book.failing()


@pytest.mark.anyio
async def test_a_caller_waiting_while_every_start_fails_gets_the_failure_not_the_deadline() -> None:
    async def factory() -> Any:
        raise KernelStartFailed("nsjail exited with code 255: cannot mount /proc")

    pool = Pool(factory, size=1, max_kernels=2, max_concurrent_starts=1)
    # Far into its back-off already (16 s before the next start): a caller's
    # wait ends it, and the caller learns why within a few starts.
    pool.book.consecutive_failures = 6
    runner = asyncio.ensure_future(pool.run())
    try:
        async with asyncio.timeout(10):
            with pytest.raises(KernelStartFailed, match="cannot mount /proc") as raised:
                await pool.acquire(timeout_s=60)
        assert "no kernel could start" in str(raised.value)
        assert pool.book.waiters == 0
    finally:
        runner.cancel()
        await pool.close()


@pytest.mark.anyio
async def test_no_start_is_made_for_a_caller_already_told_that_starts_fail() -> None:
    starts = 0

    async def factory() -> Any:
        nonlocal starts
        starts += 1
        raise KernelStartFailed("cannot mount /proc")

    pool = Pool(factory, size=0, max_kernels=2, max_concurrent_starts=1)
    runner = asyncio.ensure_future(pool.run())
    try:
        with pytest.raises(KernelStartFailed):
            await pool.acquire(timeout_s=60)
        for _ in range(20):  # the pool's task runs whatever it would start now
            await asyncio.sleep(0)
        assert starts == FAILED_STARTS_IN_A_ROW
        assert pool.book.waiters == 0 and pool.book.starting == 0
    finally:
        runner.cancel()
        await pool.close()


@pytest.mark.anyio
async def test_a_start_failing_now_and_then_keeps_the_caller_waiting_for_the_next() -> None:
    made: list[_FakeKernel] = []

    async def factory() -> Any:
        made.append(_FakeKernel(len(made)))
        if len(made) < FAILED_STARTS_IN_A_ROW:
            raise KernelStartFailed("start timed out")
        return made[-1]

    pool = Pool(factory, size=0, max_kernels=2, max_concurrent_starts=1)
    runner = asyncio.ensure_future(pool.run())
    try:
        async with asyncio.timeout(10):
            assert await pool.acquire(timeout_s=60) is made[-1]
        assert pool.book.failed == FAILED_STARTS_IN_A_ROW - 1
    finally:
        runner.cancel()
        await pool.close()
