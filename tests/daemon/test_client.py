"""The daemon's client, apart from a daemon: how it reads the lines of a streamed body."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from sandkernel.daemon.client import _lines

pytestmark = pytest.mark.anyio


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def test_a_line_ends_at_a_newline_only_whatever_the_chunks() -> None:
    """U+2028, U+2029 and U+0085 end lines for str.splitlines (and httpx's aiter_lines)."""
    first = '{"a":"x\u2028y\u2029z\x85"}'
    body = (first + '\r\n{"b":1}\n{"c":2}').encode()
    cut = body.index("\u2028".encode()) + 1  # a chunk ends inside a character
    response = httpx.Response(200, stream=_Chunks([body[:cut], body[cut:20], body[20:]]))
    assert [line async for line in _lines(response)] == [first, '{"b":1}', '{"c":2}']
