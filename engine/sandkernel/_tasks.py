"""Waiting for work that must end even when its caller is cancelled."""

from __future__ import annotations

import asyncio


async def wait_out[T](task: asyncio.Future[T]) -> T:
    """Await ``task`` to its end, even through cancellations of the caller.

    A cancellation that came meanwhile is raised once ``task`` has ended (an
    anyio cancel scope cancels every await in it again and again, so each is
    waited out); otherwise ``task``'s result or exception is. Only for work
    bounded in time, such as a shutdown, a jail's removal or an interrupt's
    settling: its caller, once it returns or raises, knows the work is done.
    """
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    return task.result()
