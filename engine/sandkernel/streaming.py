"""A cell's outputs as an async iterator: the one way every backend streams.

``session.stream(code)`` yields each output message (a Jupyter IOPub message
as a JSON-able dict: ``stream``, ``display_data``, ``execute_result``,
``error``…) the moment the kernel sends it, and ends with the cell's
:class:`~sandkernel.results.ExecutionResult`. Closing the iterator early
(``contextlib.aclosing``) or cancelling the consumer interrupts the cell and
waits for it to stop.

Every session type gets its ``stream`` from :class:`StreamsFromRun`, which
builds it with :func:`stream_run` from the session's own
``run(..., on_output=...)``, so the queue, the bound and the cancellation
are written once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio

from sandkernel.results import ExecutionResult

log = logging.getLogger(__name__)

#: One output of a running cell: a Jupyter IOPub message as a dict.
OutputMessage = dict[str, Any]
#: What ``stream`` yields: outputs, then exactly one result, last.
StreamEvent = OutputMessage | ExecutionResult

#: Outputs held for a consumer that reads slower than the cell writes; past
#: it, outputs are dropped (and counted) rather than held without bound. The
#: result still carries the cell's whole (capped) stdout and stderr.
MAX_PENDING_OUTPUTS = 10_000
#: ...and this many bytes of them (a cell's output is the cell's to size).
MAX_PENDING_BYTES = 64 << 20

_DONE = object()


async def stream_run(
    run: Callable[..., Awaitable[ExecutionResult]],
    *,
    max_pending: int = MAX_PENDING_OUTPUTS,
    max_pending_bytes: int = MAX_PENDING_BYTES,
    label: str = "cell",
) -> AsyncIterator[StreamEvent]:
    """Turn ``run(on_output=...)`` into an iterator of its outputs, then its result.

    Args:
        run: runs the cell, calling ``on_output`` with each output message.
        max_pending: outputs held for a slow consumer before dropping more.
        max_pending_bytes: and bytes of them (about: their text and data).
        label: names the cell in the log line about dropped outputs.
    """
    pending: asyncio.Queue[object] = asyncio.Queue()
    dropped = 0
    held = 0

    def on_output(message: OutputMessage) -> None:
        nonlocal dropped, held
        weight = _weight(message)
        if pending.qsize() >= max_pending or held + weight > max_pending_bytes:
            dropped += 1
            return
        held += weight
        pending.put_nowait((message, weight))

    task = asyncio.ensure_future(run(on_output=on_output))
    task.add_done_callback(lambda _: pending.put_nowait(_DONE))
    try:
        while (item := await pending.get()) is not _DONE:
            assert isinstance(item, tuple)
            message, weight = item
            held -= weight
            yield message
        if dropped:
            log.warning("%s: %d outputs dropped for a slow reader", label, dropped)
        yield task.result()
    finally:
        if not task.done():
            # The consumer went away: stop the cell (the session interrupts it) and wait.
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})


def _weight(message: OutputMessage) -> int:
    """About how many bytes an output holds: its text, data and traceback."""
    content = message.get("content")
    weight = 256
    if not isinstance(content, dict):
        return weight
    text = content.get("text")
    if isinstance(text, str):
        weight += len(text)
    data = content.get("data")
    if isinstance(data, dict):
        weight += sum(len(v) for v in data.values() if isinstance(v, str))
    traceback = content.get("traceback")
    if isinstance(traceback, list):
        weight += sum(len(line) for line in traceback if isinstance(line, str))
    return weight


class StreamsFromRun:
    """Gives a session class ``stream()``, made from its ``run(..., on_output=...)``."""

    id: str
    run: Callable[..., Awaitable[ExecutionResult]]

    def stream(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> AsyncIterator[StreamEvent]:
        """Run one cell, yielding each output as it comes, then the result (last)."""
        return stream_run(
            partial(self.run, code, timeout_s=timeout_s, restart=restart, file_ids=file_ids),
            label=f"session {self.id}",
        )
