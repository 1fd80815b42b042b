"""Keeping a session alive while a run or a response uses it.

A session's time to live counts from its last activity. A running cell is
activity to the engine; the wait for the model between two code calls is
not, yet the run (or response) still uses the session then: the model is
told its variables are there, and its next call runs in it. So the session
is renewed while the run or response goes on, as OpenAI counts a hosted
container's use: each time a third of its time to live is left, so that
once the run is done it has between two thirds of that time and all of it.
A run that waits for the caller's tool outputs (with ``code_interpreter``)
holds its session the same way until they come or its wait is over
(:func:`hold`): its next code call runs in the same session, even with a
time to live shorter than the wait. Renewing counts the time to live again;
an idle timeout (counted from the last cell) and a maximum lifetime still
apply, as they do between two model turns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio

log = logging.getLogger(__name__)

#: Renews a session; returns its new expiry (a Unix time), or None if there is none to renew.
Renew = Callable[[], Awaitable[float | None]]

#: How soon to look again when there is no session to renew yet (made by the first code call).
_LOOK_AGAIN_S: Final = 1.0
#: The shortest wait between two renewals (a session whose maximum lifetime is near).
_MIN_INTERVAL_S: Final = 0.5


@asynccontextmanager
async def renewing(renew: Renew | None) -> AsyncIterator[None]:
    """Call ``renew`` now, then again well before each expiry it gives, while the body runs.

    What the body raises comes out as itself (not in an exception group), so
    callers handle it as they would without this. The renewals never raise:
    one that fails is logged and ends them. ``None``: nothing to renew.
    """
    if renew is None:
        yield
        return
    failure: Exception | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_renew_until_cancelled, renew)
        try:
            yield
        except Exception as exc:
            # Raised below, once the renewals stopped: a task group would wrap it.
            failure = exc
        finally:
            tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def hold(renew: Renew) -> None:
    """Renew well before each expiry until cancelled, or until there is no session to renew.

    For a session that exists already and that nothing else will make (a run
    waiting for tool outputs): once it has ended, there is nothing to hold.
    Never raises but the cancellation.
    """
    await _renew_until_cancelled(renew, until_gone=True)


async def _renew_until_cancelled(renew: Renew, *, until_gone: bool = False) -> None:
    while True:
        try:
            expiry = await renew()
        except Exception:
            log.exception("could not renew a session in use; it may expire")
            return
        if expiry is None:
            if until_gone:
                return
            await anyio.sleep(_LOOK_AGAIN_S)
            continue
        # A third of what is left: a late wake-up still renews it in time.
        await anyio.sleep(max(_MIN_INTERVAL_S, (expiry - time.time()) / 3))
