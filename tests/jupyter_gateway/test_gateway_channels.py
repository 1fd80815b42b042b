"""The kernel WebSocket: Jupyter messages relayed both ways, on real sandboxed kernels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from sandkernel.jupyter_gateway.codec import V1_PROTOCOL, WireMessage, decode, encode
from tests.jupyter_gateway._support import (
    Gateway,
    GatewayClient,
    GatewayProcess,
    execute_request,
    is_status,
    message,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def test_cells_keep_their_state_and_answer_every_shell_request(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        sock = await client.connect(await client.start_kernel(), session_id="sess-a")
        first = await sock.execute("x = 20")
        assert first.status == "ok"
        # As Jupyter Server sends them: msg_id and msg_type also at the top (clients read them).
        for msg in [first.reply, *first.outputs]:
            assert msg["msg_type"] == msg["header"]["msg_type"]
            assert msg["msg_id"] == msg["header"]["msg_id"]
        second = await sock.execute("x * 2 + 2")
        assert second.status == "ok"
        [result] = second.of_type("execute_result")
        assert result["content"]["data"]["text/plain"] == "42"
        assert second.reply["content"]["execution_count"] == 2
        error = await sock.execute("1 / 0")
        assert error.status == "error"
        assert error.of_type("error")[0]["content"]["ename"] == "ZeroDivisionError"
        for msg_type, content in [
            ("kernel_info_request", {}),
            ("complete_request", {"code": "impo", "cursor_pos": 4}),
            ("inspect_request", {"code": "len", "cursor_pos": 3, "detail_level": 0}),
            ("is_complete_request", {"code": "for i in x:"}),
            ("history_request", {"output": False, "raw": True, "hist_access_type": "tail", "n": 3}),
            ("comm_info_request", {}),
        ]:
            msg_id = await sock.send(message(msg_type, content))
            reply = await sock.until(lambda m, i=msg_id: m["parent_header"].get("msg_id") == i
                                     and m["channel"] == "shell")  # fmt: skip
            assert reply["header"]["msg_type"] == msg_type.replace("_request", "_reply")
            expected = "incomplete" if msg_type == "is_complete_request" else "ok"
            assert reply["content"]["status"] == expected
        # The sandbox's unprivileged user, not the daemon's.
        uid = await sock.execute("import os; print(os.getuid())")
        assert uid.stdout.strip() not in ("", "0")


async def test_every_connection_sees_iopub_and_only_its_requester_the_reply(
    gateway: Gateway,
) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        first = await client.connect(kernel_id, session_id="one")
        second = await client.connect(kernel_id, session_id="two")
        assert (await client.kernel(kernel_id))["connections"] == 2
        cell = await first.execute("print('to everyone')")
        assert cell.stdout == "to everyone\n"
        msg_id = cell.reply["parent_header"]["msg_id"]
        seen = await second.until(
            lambda m: (
                m["header"]["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
            )
        )
        assert seen["content"]["text"] == "to everyone\n"
        await second.until(
            lambda m: is_status("idle")(m) and m["parent_header"]["msg_id"] == msg_id
        )
        # The second connection's own request is answered to it, not to the first.
        mine = await second.execute("print('second')")
        assert mine.stdout == "second\n"
        assert not any(m["channel"] == "shell" and m["parent_header"].get("msg_id") == msg_id
                       for m in second.seen)  # fmt: skip


async def test_input_is_answered_over_stdin(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        sock = await client.connect(await client.start_kernel())
        msg_id = await sock.send(
            execute_request("name = input('who? ')\nprint('hello', name)", allow_stdin=True)
        )
        request = await sock.until(lambda m: m["header"]["msg_type"] == "input_request")
        assert request["channel"] == "stdin"
        assert request["content"]["prompt"] == "who? "
        reply = message("input_reply", {"value": "sandbox"}, channel="stdin")
        reply["parent_header"] = request["header"]
        await sock.send(reply)
        cell = await sock.result_of(msg_id)
        assert cell.status == "ok"
        assert "hello sandbox" in cell.stdout


# Prints first: an interrupt that came before the cell's code ran would be lost on it.
SLEEP_100 = "import time\nprint('sleeping', flush=True)\ntime.sleep(100)"


def is_stream_of(msg_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["header"]["msg_type"] == "stream" and m["parent_header"]["msg_id"] == msg_id


async def test_interrupt_stops_a_long_sleep_and_the_kernel_lives_on(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        await sock.execute("survivor = 1")
        msg_id = await sock.send(execute_request(SLEEP_100))
        await sock.until(is_stream_of(msg_id))
        assert (await client.kernel(kernel_id))["execution_state"] == "busy"
        response = await client.http.post(f"/api/kernels/{kernel_id}/interrupt")
        assert response.status_code == 204
        cell = await sock.result_of(msg_id, timeout_s=20)
        assert cell.status == "error"
        assert cell.reply["content"]["ename"] == "KeyboardInterrupt"
        assert (await sock.execute("print(survivor)")).stdout == "1\n"
        # And by a control message, as JupyterLab's interrupt button sends it.
        msg_id = await sock.send(execute_request(SLEEP_100))
        await sock.until(is_stream_of(msg_id))
        await sock.send(message("interrupt_request", {}, channel="control"))
        assert (await sock.result_of(msg_id, timeout_s=20)).reply["content"]["ename"] == (
            "KeyboardInterrupt"
        )


async def test_produced_files_are_listed_by_sandkernels_api(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        cell = await sock.execute(
            "%matplotlib inline\nimport matplotlib.pyplot as plt\n"
            "from IPython.display import display\n"
            "open('/mnt/data/report.csv', 'w').write('a,b\\n1,2\\n')\n"
            "fig = plt.figure(); plt.plot([1, 2, 3]); display(fig); plt.close(fig)",
            timeout_s=120,
        )
        assert cell.status == "ok", cell.reply
        [shown] = cell.of_type("display_data")
        assert "image/png" in shown["content"]["data"]
        # Stored before the reply went out: listed as soon as the client has it.
        bearer = {"Authorization": f"Bearer {gateway.token}"}
        listed = await client.http.get(f"/v1/sessions/{kernel_id}/files", headers=bearer)
        files = listed.json()["data"]
        assert "report.csv" in [f["name"] for f in files]
        assert "image/png" in [f["mime_type"] for f in files]


async def test_the_v1_binary_protocol_when_a_client_asks_for_it(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        sock = await client.connect(await client.start_kernel(), subprotocols=[V1_PROTOCOL])
        assert sock.ws.subprotocol == V1_PROTOCOL
        request = execute_request("print('binary')")
        wire = WireMessage(
            "shell", request["header"], {}, {}, request["content"], buffers=[b"\x00ignored"]
        )
        await sock.ws.send(encode(wire, V1_PROTOCOL))
        texts = []
        async with asyncio.timeout(30):
            while True:
                frame = await sock.ws.recv()
                assert isinstance(frame, bytes)
                msg = decode(frame, V1_PROTOCOL)
                if msg.parent_id != wire.msg_id:
                    continue
                if msg.msg_type == "stream":
                    texts.append(msg.content["text"])
                if msg.channel == "shell":
                    assert msg.content["status"] == "ok"
                    break
        assert texts == ["binary\n"]


async def test_a_client_offering_only_other_subprotocols_gets_json(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        sock = await client.connect(await client.start_kernel(), subprotocols=["v9.unknown"])
        assert sock.ws.subprotocol is None
        assert (await sock.execute("print(7)")).stdout == "7\n"


async def test_comms_pass_through(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        sock = await client.connect(await client.start_kernel())
        setup = await sock.execute(
            "got = []\n"
            "def target(comm, open_msg):\n"
            "    comm.send({'echo': open_msg['content']['data']})\n"
            "    comm.on_msg(lambda m: got.append(m['content']['data']))\n"
            "get_ipython().kernel.comm_manager.register_target('echo', target)"
        )
        assert setup.status == "ok"
        await sock.send(
            message("comm_open", {"comm_id": "c1", "target_name": "echo", "data": {"hi": 1}})
        )
        echoed = await sock.until(lambda m: m["header"]["msg_type"] == "comm_msg")
        assert echoed["content"] == {"comm_id": "c1", "data": {"echo": {"hi": 1}}}
        await sock.send(message("comm_msg", {"comm_id": "c1", "data": {"n": 2}}))
        # Shell messages are handled in order: the cell sees the comm message before it.
        assert (await sock.execute("print(got)")).stdout == "[{'n': 2}]\n"


async def test_malformed_frames_are_dropped_and_everything_keeps_serving(
    gateway_process: GatewayProcess,
) -> None:
    gateway = gateway_process.gateway
    async with GatewayClient(gateway) as client:
        victim = await client.connect(await client.start_kernel())
        bystander = await client.connect(await client.start_kernel())
        good = execute_request("1")
        for frame in [
            "not json",
            "[]",
            json.dumps({**good, "channel": "bogus"}),
            json.dumps({**good, "channel": "iopub"}),
            json.dumps({**good, "header": {"msg_type": "execute_request"}}),
            json.dumps({**good, "header": None}),
            json.dumps({**good, "content": "text"}),
            b"\x00\x00\x00\x09garbage",
            b"",
            "{" * 10_000,
            '{"header": ' + "[" * 200_000,  # deeper than Python's JSON parser goes
        ]:
            await victim.ws.send(frame)
        # The same connection still serves, and so does another kernel.
        assert (await victim.execute("print('still here')")).stdout == "still here\n"
        assert (await bystander.execute("print('unbothered')")).stdout == "unbothered\n"
        assert (await client.http.get("/api/kernels")).status_code == 200
    # Dropped at debug level: a client sending garbage must not fill the log.
    log = gateway_process.process.log_text()
    assert "relaying a client's message failed" not in log


async def test_a_client_reconnecting_with_its_session_id_gets_what_it_missed(
    gateway: Gateway,
) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        away = await client.connect(kernel_id, session_id="away")
        runner = await client.connect(kernel_id, session_id="runner")
        await away.ws.close()
        deadline = asyncio.get_running_loop().time() + 10
        while (await client.kernel(kernel_id))["connections"] != 1:
            assert asyncio.get_running_loop().time() < deadline, "the close was never seen"
            await asyncio.sleep(0.05)  # the daemon's count, polled with a deadline
        cell = await runner.execute("print('while you were away')")
        msg_id = cell.reply["parent_header"]["msg_id"]
        back = await client.connect(kernel_id, session_id="away")
        missed = await back.until(is_stream_of(msg_id), timeout_s=10)
        assert missed["content"]["text"] == "while you were away\n"
        # A new client (another session id) gets only what comes after it connected.
        fresh = await client.connect(kernel_id, session_id="new")
        assert (await fresh.execute("print('now')")).stdout == "now\n"
        assert not any(m["parent_header"].get("msg_id") == msg_id for m in fresh.seen)


async def test_a_kernel_info_request_while_a_cell_runs_leaves_the_kernel_busy(
    gateway: Gateway,
) -> None:
    """JupyterLab sends one on every connect; Jupyter Server's state ignores its status."""
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        runner = await client.connect(kernel_id)
        # Running until the test answers its input(): busy all that time.
        msg_id = await runner.send(execute_request("value = input('go? ')", allow_stdin=True))
        request = await runner.until(lambda m: m["header"]["msg_type"] == "input_request")
        if not any(is_status("busy")(m) for m in runner.seen):  # IOPub travels apart
            await runner.until(is_status("busy"))
        assert (await client.kernel(kernel_id))["execution_state"] == "busy"
        newcomer = await client.connect(kernel_id)
        info_id = await newcomer.send(message("kernel_info_request", {}, channel="control"))

        def of_info(m: dict[str, Any]) -> bool:
            return bool(m["parent_header"].get("msg_id") == info_id)

        info = await newcomer.until(lambda m: of_info(m) and m["channel"] == "control")
        assert info["content"]["status"] == "ok"
        # Its idle too (the reply and the idle travel apart: either may come first).
        if not any(of_info(m) and is_status("idle")(m) for m in newcomer.seen):
            await newcomer.until(lambda m: of_info(m) and is_status("idle")(m))
        assert (await client.kernel(kernel_id))["execution_state"] == "busy"
        answer = message("input_reply", {"value": "yes"}, channel="stdin")
        answer["parent_header"] = request["header"]
        await runner.send(answer)
        assert (await runner.result_of(msg_id)).status == "ok"
        assert (await client.kernel(kernel_id))["execution_state"] == "idle"
