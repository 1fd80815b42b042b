"""A cell's outputs as an async iterator: bounded for a reader slower than the cell."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sandkernel.results import ExecutionResult, Usage
from sandkernel.streaming import stream_run

pytestmark = pytest.mark.anyio


async def _print_megabytes(
    count: int, on_output: Callable[[dict[str, Any]], None]
) -> ExecutionResult:
    # All before the reader gets to run: the slowest reader there is.
    for _ in range(count):
        on_output({"msg_type": "stream", "content": {"name": "stdout", "text": "x" * (1 << 20)}})
    return ExecutionResult(status="ok", usage=Usage(wall_ms=1), stdout=f"{count} MiB")


async def test_a_slow_reader_is_held_no_more_bytes_than_the_bound() -> None:
    events = [
        event
        async for event in stream_run(
            lambda on_output: _print_megabytes(20, on_output), max_pending_bytes=5 << 20
        )
    ]
    *outputs, result = events
    # Four 1 MiB outputs fit in 5 MiB; the rest were dropped, and the result still comes.
    assert len(outputs) == 4
    assert isinstance(result, ExecutionResult) and result.stdout == "20 MiB"


async def test_a_reader_that_keeps_up_gets_every_output() -> None:
    outputs = 0
    async for event in stream_run(
        lambda on_output: _print_megabytes(3, on_output), max_pending_bytes=5 << 20
    ):
        outputs += isinstance(event, dict)
    assert outputs == 3
