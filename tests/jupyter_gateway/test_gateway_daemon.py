"""The gateway inside the daemon: its Unix socket, and a stop with WebSockets still open."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.client import unix_connect

from tests.daemon.conftest import leftovers_of, stop_process
from tests.jupyter_gateway._support import (
    GatewayClient,
    GatewayProcess,
    KernelSocket,
    execute_request,
    running_gateway,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def test_the_kernel_websocket_over_the_unix_socket_needs_no_token(
    gateway_process: GatewayProcess,
) -> None:
    async with GatewayClient(gateway_process.gateway) as client:
        kernel_id = await client.start_kernel()
        async with unix_connect(
            str(gateway_process.socket), f"ws://sandkernel/api/kernels/{kernel_id}/channels"
        ) as ws:
            sock = KernelSocket(ws)
            assert (await sock.execute("print(6 * 7)")).stdout == "42\n"


async def test_stopping_the_daemon_closes_open_websockets_and_leaves_nothing() -> None:
    with running_gateway(pool_size=1) as process:
        async with GatewayClient(process.gateway) as client:
            sock = await client.connect(await client.start_kernel())
            assert (await sock.execute("x = 1")).status == "ok"
            # A cell still running as the daemon stops.
            await sock.send(execute_request("import time\ntime.sleep(100)"))
            code = await asyncio.to_thread(stop_process, process.process.process)
            assert code == 0, process.process.log_text()[-3000:]
            async with asyncio.timeout(10):
                await sock.ws.wait_closed()
            assert not leftovers_of(process.process.pid)
            with pytest.raises(websockets.ConnectionClosed):
                await sock.ws.send(json.dumps(execute_request("1")))
            # The client's own clean-up finds no daemon: nothing to delete.
            client._kernels.clear()
