"""Limits hold for relayed cells: wall timeout, memory, expiry; a death is told at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.jupyter_gateway._support import (
    GatewayClient,
    GatewayProcess,
    execute_request,
    is_status,
    message,
    running_gateway,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

WALL_S = 3.0
GRACE_S = 1.0
REPORTED_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose policy has 256 MiB of memory and a 3 s wall timeout per cell."""
    policy = tmp_path_factory.mktemp("policy") / "tight.toml"
    policy.write_text(
        f"memory_mb = 256\nwall_timeout_s = {WALL_S}\ninterrupt_grace_s = {GRACE_S}\n"
    )
    with running_gateway(policy=policy, pool_size=1) as process:
        yield process


async def _pool(client: GatewayClient) -> dict[str, Any]:
    bearer = {"Authorization": f"Bearer {client.gateway.token}"}
    stats: dict[str, Any] = (await client.http.get("/v1/stats", headers=bearer)).json()["pool"]
    return stats


async def _next_kernel_is_warm(client: GatewayClient) -> None:
    """The next kernel comes from the warm pool (a hit), not from a cold start."""
    deadline = time.monotonic() + 60
    while (before := await _pool(client))["warm"] < 1:
        assert time.monotonic() < deadline, "the pool was not refilled within 60 s"
        await _wait_a_little()
    kernel_id = await client.start_kernel()
    after = await _pool(client)
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"])
    sock = await client.connect(kernel_id)
    assert (await sock.execute("print('fresh')")).stdout == "fresh\n"


async def _wait_a_little() -> None:
    # The pool's refill is announced by no event over the API: it is polled, with a deadline.
    await asyncio.sleep(0.2)


async def test_out_of_memory_is_reported_dead_at_once_and_never_reused(
    tight: GatewayProcess,
) -> None:
    async with GatewayClient(tight.gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        await sock.execute("kept = 1")
        sent = time.monotonic()
        msg_id = await sock.send(
            execute_request("hoard = []\nwhile True:\n    hoard.append(bytearray(32 << 20))")
        )
        await sock.until(is_status("dead"), timeout_s=30)
        # The sandbox fills 256 MiB in well under a second; the rest is the report.
        assert time.monotonic() - sent < 1.0 + REPORTED_WITHIN_S
        cell = await sock.result_of(msg_id, timeout_s=5)
        assert cell.status == "error"
        # The cell ends (idle) for clients that wait for that rather than for the reply.
        assert cell.of_type("status")[-1]["content"]["execution_state"] == "idle"
        assert "out of memory" in cell.reply["content"]["evalue"]
        assert "memory_mb" in cell.of_type("error")[0]["content"]["evalue"]
        model = await client.kernel(kernel_id)
        assert model["execution_state"] == "dead"
        # A dead kernel answers at once, and is not silently replaced.
        again = await sock.execute("print(kept)", timeout_s=5)
        assert again.reply["content"]["ename"] == "DeadKernelError"
        await _next_kernel_is_warm(client)


async def test_a_crashed_kernel_is_reported_dead_at_once(tight: GatewayProcess) -> None:
    async with GatewayClient(tight.gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        sent = time.monotonic()
        msg_id = await sock.send(execute_request("import os, signal\nos.kill(os.getpid(), 9)"))
        await sock.until(is_status("dead"), timeout_s=30)
        assert time.monotonic() - sent < REPORTED_WITHIN_S
        cell = await sock.result_of(msg_id, timeout_s=5)
        assert cell.reply["content"]["ename"] == "DeadKernelError"
        assert (await client.kernel(kernel_id))["execution_state"] == "dead"


async def test_a_cell_past_its_wall_timeout_is_interrupted_and_the_kernel_lives(
    tight: GatewayProcess,
) -> None:
    async with GatewayClient(tight.gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        await sock.execute("kept = 2")
        cell = await sock.execute("import time\ntime.sleep(100)", timeout_s=WALL_S + 15)
        assert cell.reply["content"]["ename"] == "KeyboardInterrupt"
        notes = [m["content"]["text"] for m in cell.of_type("stream")]
        assert any("wall_timeout_s" in text for text in notes)
        assert (await sock.execute("print(kept)")).stdout == "2\n"
        assert (await client.kernel(kernel_id))["execution_state"] == "idle"


async def test_a_cell_that_ignores_the_interrupt_gets_its_kernel_killed(
    tight: GatewayProcess,
) -> None:
    async with GatewayClient(tight.gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        msg_id = await sock.send(
            execute_request(
                "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "print('spinning', flush=True)\nwhile True:\n    pass"
            )
        )
        await sock.until(lambda m: m["header"]["msg_type"] == "stream")
        started = time.monotonic()
        await sock.until(is_status("dead"), timeout_s=WALL_S + GRACE_S + 30)
        assert time.monotonic() - started < WALL_S + GRACE_S + REPORTED_WITHIN_S
        cell = await sock.result_of(msg_id, timeout_s=5)
        assert "did not stop" in cell.reply["content"]["evalue"]
        assert (await client.kernel(kernel_id))["execution_state"] == "dead"
        # Restarting it is a fresh sandbox.
        assert (await client.http.post(f"/api/kernels/{kernel_id}/restart")).status_code == 200
        assert (await sock.execute("print('back')")).stdout == "back\n"
        await _next_kernel_is_warm(client)


def test_an_expired_kernel_is_dead_and_use_keeps_a_kernel_alive(
    gateway_factory: Any,
) -> None:
    process = gateway_factory(pool_size=2, extra=["--session-ttl", "3"])

    async def scenario() -> None:
        async with GatewayClient(process.gateway) as client:
            idle_id = await client.start_kernel()
            busy_id = await client.start_kernel()
            idle = await client.connect(idle_id)
            busy = await client.connect(busy_id)
            started = time.monotonic()
            # Cells, one after the other, for longer than the TTL (each counts as use),
            # and until the engine's reaper, passing every 5 s, has ended the idle one.
            while (
                time.monotonic() - started < 5
                or (await client.kernel(idle_id))["execution_state"] != "dead"
            ):
                assert time.monotonic() - started < 30, "the idle kernel outlived its TTL"
                assert (await busy.execute("import time; time.sleep(0.5)")).status == "ok"
            # The death is reported as the reaper ends the kernel.
            await idle.until(is_status("dead"), timeout_s=20)
            assert (await client.kernel(idle_id))["execution_state"] == "dead"
            assert (await busy.execute("print('alive')")).stdout == "alive\n"

    asyncio.run(scenario())


def test_the_tight_policy_is_the_served_spec(tight: GatewayProcess) -> None:
    headers = {"Authorization": f"token {tight.gateway.token}"}
    specs = httpx.get(tight.gateway.url + "/api/kernelspecs", headers=headers).json()
    assert specs["default"] == "sandkernel-tight"
    limits = specs["kernelspecs"]["sandkernel-tight"]["spec"]["metadata"]["sandkernel"]["limits"]
    assert (limits["memory_mb"], limits["wall_timeout_s"]) == (256, WALL_S)


def _replied(msg_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["channel"] != "iopub" and m["parent_header"].get("msg_id") == msg_id


async def test_every_cell_keeps_the_wall_timeout_whatever_channel_or_subshell_it_names(
    tight: GatewayProcess,
) -> None:
    """ipykernel 7 runs a cell sent on control there, and offers subshells: out of reach."""
    async with GatewayClient(tight.gateway) as client:
        sock = await client.connect(await client.start_kernel())
        info_id = await sock.send(message("kernel_info_request", {}))
        info = await sock.until(_replied(info_id))
        assert "kernel subshells" not in info["content"].get("supported_features", [])
        create_id = await sock.send(message("create_subshell_request", {}, channel="control"))
        assert (await sock.until(_replied(create_id)))["content"]["status"] == "error"
        on_control = execute_request("import time\ntime.sleep(100)")
        on_control["channel"] = "control"
        refused = await sock.until(_replied(await sock.send(on_control)), timeout_s=5)
        assert refused["content"]["ename"] == "RequestRefused"
        # A long cell, and beside it one naming a subshell (whose error reply the
        # kernel would send with a busy and an idle of its own): the long cell is
        # still interrupted at its limit.
        long_id = await sock.send(
            execute_request("import time\nprint('long', flush=True)\ntime.sleep(100)")
        )
        await sock.until(lambda m: m["header"]["msg_type"] == "stream")
        beside = execute_request("print('beside')")
        beside["header"]["subshell_id"] = "any"
        refused = await sock.result_of(await sock.send(beside), timeout_s=5)
        assert refused.reply["content"]["ename"] == "RequestRefused"
        cell = await sock.result_of(long_id, timeout_s=WALL_S + 15)
        assert cell.reply["content"]["ename"] == "KeyboardInterrupt"
        assert any("wall_timeout_s" in m["content"]["text"] for m in cell.of_type("stream"))
