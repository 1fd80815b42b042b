"""Work waited out through its caller's cancellations."""

from __future__ import annotations

import asyncio

import pytest

from sandkernel._tasks import wait_out

pytestmark = pytest.mark.anyio


async def test_the_result_or_the_error_of_the_task_is_given() -> None:
    async def answer() -> int:
        return 42

    async def fail() -> None:
        raise LookupError("gone")

    assert await wait_out(asyncio.ensure_future(answer())) == 42
    with pytest.raises(LookupError, match="gone"):
        await wait_out(asyncio.ensure_future(fail()))


async def test_every_cancellation_is_waited_out_then_raised() -> None:
    gate, ended = asyncio.Event(), asyncio.Event()

    async def bounded_work() -> None:
        await gate.wait()
        ended.set()

    work = asyncio.ensure_future(bounded_work())
    caller = asyncio.ensure_future(wait_out(work))
    for _ in range(3):  # as an anyio cancel scope does, again and again
        await asyncio.sleep(0)
        caller.cancel()
        done, _ = await asyncio.wait([caller], timeout=0.05)
        assert not done
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended.is_set() and work.done() and not work.cancelled()


async def test_a_task_cancelled_itself_gives_a_cancellation() -> None:
    work = asyncio.ensure_future(asyncio.Event().wait())
    caller = asyncio.ensure_future(wait_out(work))
    await asyncio.sleep(0)
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
