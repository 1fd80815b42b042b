"""The relay's own waits, on plain ZeroMQ sockets (no sandbox)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from sandkernel.jupyter_gateway.relay import _handshake

pytestmark = pytest.mark.anyio


async def test_the_stdin_handshake_is_awaited_until_the_kernel_side_answers(
    tmp_path: Path,
) -> None:
    context = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/stdin"
    dealer = context.socket(zmq.DEALER)
    router = context.socket(zmq.ROUTER)
    try:
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.connect(address)  # nothing listens yet
        waiting = asyncio.ensure_future(_handshake(monitor, timeout_s=30))
        await asyncio.sleep(0.3)  # time for a wrong early return; nothing to wait on
        assert not waiting.done()
        router.bind(address)
        await asyncio.wait_for(waiting, 10)
        # once the handshake is made, the kernel side reaches the socket by its identity
        await dealer.send(b"hello")
        identity, _ = await asyncio.wait_for(router.recv_multipart(), 5)
        await router.send_multipart([identity, b"input_request"])
        assert await asyncio.wait_for(dealer.recv(), 5) == b"input_request"
        dealer.disable_monitor()
        monitor.close(linger=0)
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        context.term()


async def test_a_handshake_that_never_comes_is_waited_for_a_bounded_time(tmp_path: Path) -> None:
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    try:
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.connect(f"ipc://{tmp_path}/nobody")
        await asyncio.wait_for(_handshake(monitor, timeout_s=0.2), 5)  # returns, no error
        dealer.disable_monitor()
        monitor.close(linger=0)
    finally:
        dealer.close(linger=0)
        context.term()
