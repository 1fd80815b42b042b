"""The direct channel to a host: answers, cancellation, broken connections, strangers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import pytest

pytest.importorskip("ray")

from sandkernel.ray._channel import ChannelClient, ChannelClosed, ChannelServer  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.anyio]


class Calls:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.next_item = asyncio.Event()

    async def __call__(self, method: str, args: Sequence[Any]) -> Any:
        if method == "echo":
            return list(args)
        if method == "count":
            return self.count(*args)
        if method == "fail":
            raise KeyError("boom")
        self.started.set()
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return None

    async def count(self, items: int) -> AsyncGenerator[int]:
        """Yields 0, 1...: each once told to go on."""
        try:
            for n in range(items):
                await self.next_item.wait()
                self.next_item.clear()
                yield n
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_calls_are_answered_and_failures_reported() -> None:
    server = ChannelServer(Calls())
    endpoint = await server.start("127.0.0.1")
    client = await ChannelClient.connect(endpoint)
    try:
        answers = await asyncio.gather(*(client.call("echo", (n, "x")) for n in range(20)))
        assert answers == [[n, "x"] for n in range(20)]
        with pytest.raises(RuntimeError, match="KeyError"):
            await client.call("fail", ())
        assert await client.call("echo", ()) == []  # the connection survives a failure
    finally:
        client.abort()
        await server.close()


async def test_cancelling_a_call_cancels_it_on_the_host() -> None:
    calls = Calls()
    server = ChannelServer(calls)
    client = await ChannelClient.connect(await server.start("127.0.0.1"))
    try:
        task = asyncio.create_task(client.call("wait", ()))
        await asyncio.wait_for(calls.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(calls.cancelled.wait(), 5)
        assert client.open
    finally:
        client.abort()
        await server.close()


async def test_a_streamed_answer_comes_item_by_item_and_closing_it_cancels_it() -> None:
    calls = Calls()
    server = ChannelServer(calls)
    client = await ChannelClient.connect(await server.start("127.0.0.1"))
    try:
        async with contextlib.aclosing(client.stream("count", (3,))) as items:
            calls.next_item.set()
            assert await asyncio.wait_for(anext(items), 5) == 0  # before the others exist
            calls.next_item.set()
            assert await asyncio.wait_for(anext(items), 5) == 1
        await asyncio.wait_for(calls.cancelled.wait(), 5)
        # To its end, then the connection serves on.
        calls.next_item.set()
        whole = client.stream("count", (1,))
        assert [n async for n in whole] == [0]
        assert await client.call("echo", (1,)) == [1]
    finally:
        client.abort()
        await server.close()


async def test_a_broken_connection_fails_calls_in_flight_and_cancels_them() -> None:
    calls = Calls()
    server = ChannelServer(calls)
    client = await ChannelClient.connect(await server.start("127.0.0.1"))
    task = asyncio.create_task(client.call("wait", ()))
    await asyncio.wait_for(calls.started.wait(), 5)
    await server.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(task, 5)
    assert calls.cancelled.is_set()
    assert not client.open
    with pytest.raises(ChannelClosed):
        await client.call("echo", ())


async def test_a_peer_without_the_token_is_refused_before_unpickling() -> None:
    server = ChannelServer(Calls())
    endpoint = await server.start("127.0.0.1")
    stranger = await ChannelClient.connect(dataclasses.replace(endpoint, token=b"x" * 32))
    try:
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(stranger.call("echo", (1,)), 5)
    finally:
        stranger.abort()
        await server.close()


async def test_a_peer_that_never_sends_the_token_is_dropped() -> None:
    server = ChannelServer(Calls(), auth_timeout_s=0.2)
    endpoint = await server.start("127.0.0.1")
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        # Silent: the server closes the connection by itself once the deadline passes.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await server.close()
