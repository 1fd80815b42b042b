"""The relay on plain ZeroMQ sockets and kernels the tests play (no sandbox)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, cast

import pytest
import zmq
import zmq.asyncio
from jupyter_client.jsonutil import json_default
from starlette.websockets import WebSocket

from sandkernel.errors import BadInput
from sandkernel.jupyter_gateway import relay as relay_module
from sandkernel.jupyter_gateway.app import create_gateway_app
from sandkernel.jupyter_gateway.codec import V1_PROTOCOL, WireMessage
from sandkernel.jupyter_gateway.codec import encode as codec_encode
from sandkernel.jupyter_gateway.kernels import GatewayKernels
from sandkernel.jupyter_gateway.relay import (
    _CONNECTION_BYTES,
    CLOSE_TOO_SLOW,
    Connection,
    _handshake,
)
from sandkernel.jupyter_gateway.specs import KernelSpecs
from sandkernel.policy import Policy, load_policy
from tests.jupyter_gateway._fake_kernel import (
    DEADLINE_S,
    FakeClient,
    FakeKernel,
    FakeLink,
    FakeWebSocket,
    Harness,
    fake_relay,
    reply_to,
    status_is,
    terminate,
)
from tests.jupyter_gateway._support import execute_request, message

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


# -- a relay on a kernel the test plays (see _fake_kernel) --------------------------------


def _stream(text: str) -> WireMessage:
    return WireMessage(
        "iopub",
        header={"msg_id": uuid.uuid4().hex, "msg_type": "stream"},
        content={"name": "stdout", "text": text},
    )


async def test_a_client_too_slow_for_many_small_messages_is_closed_and_its_writer_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = 1 << 16
    monkeypatch.setattr(relay_module, "_CONNECTION_BYTES", bound)
    ws = FakeWebSocket(stuck=True)
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    small = _stream("x")
    frame = len(codec_encode(small, None))
    # Fewer bytes than the bound (and far fewer frames than any count a client might be
    # closed at), but more once each frame's upkeep is counted: a client is closed for
    # what it costs to keep.
    count = bound // frame - 1
    for _ in range(count):
        connection.send(small)
    async with asyncio.timeout(DEADLINE_S):
        await writer
    assert connection.closed
    # Not 1000 or 1001: after those JupyterLab would not reconnect.
    assert ws.close_code == CLOSE_TOO_SLOW


async def test_a_client_is_not_closed_for_the_count_of_its_frames_below_the_byte_bound() -> None:
    """The README's promise: closed once 64 MiB behind, not at some count of small messages."""
    ws = FakeWebSocket(stuck=True)
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    for _ in range(30_000):  # a cell's `for i in range(30_000): display(i)`
        connection.send(_stream("x"))
    assert not connection.closed
    ws.reading.set()
    for _ in range(30_000):
        async with asyncio.timeout(DEADLINE_S):
            await ws.frames.get()
    connection.close()
    async with asyncio.timeout(DEADLINE_S):
        await writer
    assert ws.close_code == 1000


async def test_a_client_too_slow_for_the_bytes_of_its_messages_is_closed() -> None:
    ws = FakeWebSocket(stuck=True)
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    # A few frames, but more bytes than a client may owe.
    big = _stream("x" * (1 << 20))
    for _ in range((_CONNECTION_BYTES >> 20) + 2):
        connection.send(big)
    async with asyncio.timeout(DEADLINE_S):
        await writer
    assert connection.closed and ws.close_code == CLOSE_TOO_SLOW


async def test_a_client_is_closed_for_the_memory_its_text_holds_not_its_count_of_characters() -> (
    None
):
    ws = FakeWebSocket(stuck=True)
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    # A quarter of a MiB of characters a frame, each held in 4 bytes: 64 MiB in 64 frames,
    # where counting characters would let 256 of them wait.
    wide = _stream("\U0001f600" * (1 << 18))
    for _ in range(80):
        connection.send(wide)
    async with asyncio.timeout(DEADLINE_S):
        await writer
    assert connection.closed and ws.close_code == CLOSE_TOO_SLOW


async def test_the_clients_of_one_kernel_are_bounded_together_the_furthest_behind_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_CONNECTION_BYTES", 1 << 20)
    monkeypatch.setattr(relay_module, "_KERNEL_BYTES", 2 << 20)
    async with fake_relay() as harness:
        reading = harness.client()
        stuck = [harness.client(stuck=True) for _ in range(4)]
        # Each stuck client stays under its own MiB; the four together do not.
        for n in range(8):
            harness.kernel.publish("stream", {"name": "stdout", "text": f"{n}" * 100_000})
        for n in range(8):
            assert (await reading.until(lambda m: m.msg_type == "stream")).content["text"][0] == (
                str(n)
            )
        closed = [c for c in stuck if c.connection.closed]
        assert len(closed) == 2, "closed until the rest fit in the kernel's bound"
        for client in closed:
            assert await client.closed() == CLOSE_TOO_SLOW
        left = sum(c.connection.queued_bytes for c in stuck if not c.connection.closed)
        assert left <= 2 << 20
        assert not reading.connection.closed


async def test_a_status_that_closes_a_client_by_the_kernels_bound_is_kept_for_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with fake_relay() as harness:
        relay = harness.relay
        stuck = [harness.client(stuck=True, session_id=f"tab-{n}") for n in range(2)]
        relay.broadcast(_stream("x" * 300_000))
        pending = sum(c.connection.queued_bytes for c in stuck)
        # The next message takes the two over their bound together: one is closed.
        monkeypatch.setattr(relay_module, "_KERNEL_BYTES", pending + 1)
        relay.broadcast_status("busy")
        (closed,) = [c for c in stuck if c.connection.closed]
        kept = relay._missed[closed.connection.session_id or ""].messages()
        assert [m.msg_type for m in kept] == ["status"]


async def test_messages_a_kernel_printed_fast_are_relayed_one_per_step_of_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not all at once: the daemon's other tasks (other kernels, clients' writers) run between."""
    async with fake_relay() as harness:
        client = harness.client()
        relayed = 0
        send = client.connection.send

        def counting(msg: WireMessage) -> None:
            nonlocal relayed
            relayed += msg.msg_type == "stream"
            send(msg)

        monkeypatch.setattr(client.connection, "send", counting)
        for n in range(300):  # all queued for the relay before it runs again
            harness.kernel.publish("stream", {"name": "stdout", "text": f"{n}\n"})
        # What another task of the daemon sees: how far the relay got each time it ran.
        seen = [relayed]  # none yet: the relay has not run since
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def tick() -> None:
            seen.append(relayed)
            if relayed < 300:
                loop.call_soon(tick)
            else:
                done.set_result(None)

        loop.call_soon(tick)
        async with asyncio.timeout(DEADLINE_S):
            await done
        steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        assert max(steps, default=0) <= 2, "the relay held the event loop"


async def test_a_cells_images_are_kept_to_be_stored_nothing_else_and_within_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_CELL_IMAGES", 2)
    async with fake_relay() as harness:
        client = harness.client()
        request = await client.execute("show()")
        got = await harness.kernel.receive()
        kernel = harness.kernel
        kernel.status("busy", got)
        kernel.publish("display_data", {"data": {"text/plain": "t" * (1 << 20)}}, got)
        for n in range(3):
            data = {"image/png": f"png-{n}", "text/plain": "<Figure>"}
            kernel.publish("display_data", {"data": data, "metadata": {}}, got)
        kernel.status("idle", got)
        await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        await client.until(reply_to(request))
        kept = [d.data for d in harness.link.displays[0]]
        assert kept == [{"image/png": "png-0"}, {"image/png": "png-1"}]
        # Every display still reached the client.
        shown = [m for m in client.seen if m.msg_type == "display_data"]
        assert len(shown) == 4


async def test_what_a_gone_client_missed_is_kept_within_a_byte_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_MAX_MISSED_BYTES", 4 << 20)
    async with fake_relay() as harness:
        away = harness.client(session_id="away")
        watcher = harness.client()
        harness.relay.disconnect(away.connection)
        for n in range(10):
            harness.kernel.publish("stream", {"name": "stdout", "text": f"{n}" + "x" * (1 << 20)})
        harness.kernel.publish("stream", {"name": "stdout", "text": "last"})
        await watcher.until(lambda m: m.content.get("text") == "last")
        back = harness.client(session_id="away")
        texts = []
        while len(texts) < 4:
            texts.append((await back.next()).content["text"].rstrip("x"))
        # The latest ones, as many as fit (a cell's last output, its error, matter most).
        assert texts == ["7", "8", "9", "last"]
        assert back.ws.frames.empty()


async def test_a_request_no_utf8_encodes_is_refused_and_leaves_no_cell_waiting() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        with pytest.raises(BadInput, match="cannot be sent to a kernel"):
            await client.execute("print('\ud800')")
        assert not harness.relay._cells and not harness.relay._routes
        # The kernel got nothing; the next request goes through.
        request = await client.request("kernel_info_request")
        got = await harness.kernel.receive()
        await harness.kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        assert (await client.until(reply_to(request))).content == {"status": "ok"}


async def test_deleting_a_kernel_closes_a_connection_whose_client_reads_nothing() -> None:
    async with fake_relay() as harness:
        stuck = harness.client(stuck=True)
        harness.kernel.publish("stream", {"name": "stdout", "text": "never read"})
        async with asyncio.timeout(DEADLINE_S):
            await stuck.ws.sending.wait()
        await harness.relay.shutdown()
        await stuck.closed()
        assert stuck.ws.closed.is_set()


async def test_a_socket_accepted_as_its_kernel_was_deleted_is_closed_at_once() -> None:
    async with fake_relay() as harness:
        await harness.relay.shutdown()
        late = harness.client()
        assert await late.closed() == 1000
        assert harness.relay.connection_count == 0


async def test_the_relays_own_requests_are_remembered_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_MAX_ROUTES", 3)
    async with fake_relay() as harness:
        for _ in range(5):
            await harness.relay.interrupt()  # as REST /interrupt and every timeout do
        assert len(harness.relay._internal) == 3


async def test_the_websocket_handler_ends_when_its_slow_client_is_closed() -> None:
    """The handler of a connection the relay closed returns, whatever its client does."""
    folder = Path(tempfile.mkdtemp(prefix="skr-", dir="/tmp"))
    context = zmq.asyncio.Context()
    fakes: list[FakeKernel] = []

    class Sessions:
        async def session(self, session_id: str, **options: Any) -> None:
            pass

        async def close_session(self, session_id: str) -> None:
            pass

    class Links:
        async def kernel_link(self, session_id: str) -> FakeLink:
            fakes.append(FakeKernel(context, folder, f"k{len(fakes)}"))
            return FakeLink(fakes[-1])

    engine: Any = Sessions()
    links: Any = Links()
    kernels = GatewayKernels(engine, links, KernelSpecs(load_policy("default")))
    try:
        relay = await kernels.start(None)
        app = create_gateway_app(KernelSpecs(load_policy("default")), kernels)
        incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        incoming.put_nowait({"type": "websocket.connect"})
        never, reading = asyncio.Event(), asyncio.Event()
        receives = 0
        closes: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal receives
            receives += 1
            if receives > 1:
                reading.set()  # past the accept: the handler is connected and reads
            return await incoming.get()  # a client that sends nothing, and is never seen leaving

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "websocket.send":
                await never.wait()  # a client that reads nothing
            elif message["type"] == "websocket.close":
                closes.append(message["code"])

        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": f"/api/kernels/{relay.id}/channels",
            "raw_path": f"/api/kernels/{relay.id}/channels".encode(),
            "root_path": "",
            "query_string": b"session_id=s",
            "headers": [],
            "subprotocols": [],
            "scheme": "ws",
            "server": ("gateway", 80),
            "client": ("client", 1234),
        }
        handler = asyncio.ensure_future(app(scope, receive, send))
        async with asyncio.timeout(DEADLINE_S):
            await reading.wait()
        assert relay.connection_count == 1
        big = _stream("x" * (1 << 20))
        for _ in range((_CONNECTION_BYTES >> 20) + 2):
            relay.broadcast(big)
        # Waited for, not cancelled: a cancelled handler would still wait for its writer.
        done, _ = await asyncio.wait({handler}, timeout=DEADLINE_S)
        assert handler in done, "the handler did not end"
        assert closes == [1013]
        assert relay.connection_count == 0
    finally:
        await kernels.aclose()
        for fake in fakes:
            fake.close()
        try:
            await terminate(context)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


async def test_a_restart_shows_a_kernel_starting_not_one_that_died() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        await harness.relay.restart()
        # Jupyter Server sends "restarting" only for a kernel that died and was
        # restarted automatically; JupyterLab then says the kernel died.
        first, second = await client.next(), await client.next()
        assert [first.content["execution_state"], second.content["execution_state"]] == [
            "starting",
            "idle",
        ]
        assert harness.relay.execution_state == "idle"
        request = await client.send(message("shutdown_request", {"restart": True}, "control"))
        assert (await client.next()).parent_id == request["header"]["msg_id"]
        states = [(await client.next()).content["execution_state"] for _ in range(2)]
        assert states == ["starting", "idle"]
        assert len(harness.kernels) == 3
        # Each restart is handed the kernel it replaces (its session's files go on).
        assert harness.replaced == harness.links[:2]


async def answered_while_storing(harness: Harness, client: FakeClient) -> dict[str, Any]:
    """A cell run and answered ok, the relay held storing its files (release: collect_gate)."""
    link, kernel = harness.link, harness.kernel
    link.collect_gate.clear()
    request = await client.execute("1")
    got = await kernel.receive()
    kernel.status("busy", got)
    kernel.status("idle", got)
    await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
    async with asyncio.timeout(DEADLINE_S):
        await link.collecting.wait()
    return request


async def held_restart(harness: Harness) -> asyncio.Future[None]:
    """A restart begun, held while it waits for its fresh kernel (release: restart_gate)."""
    harness.restart_gate.clear()
    restarting = asyncio.ensure_future(harness.relay.restart())
    async with asyncio.timeout(DEADLINE_S):
        await harness.restart_asked.wait()
    return restarting


async def test_what_clients_send_during_a_restart_goes_to_the_fresh_kernel() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        restarting = await held_restart(harness)
        execute = execute_request("print(1)")
        info = message("kernel_info_request", {})

        async def handler() -> None:  # as a WebSocket's handler: one frame after the other
            await client.send(execute)
            await client.send(info)

        sending = asyncio.ensure_future(handler())
        harness.restart_gate.set()
        async with asyncio.timeout(DEADLINE_S):
            await restarting
            await sending
        fresh = harness.kernel
        assert len(harness.kernels) == 2
        got = await fresh.receive()
        assert got["header"]["msg_id"] == execute["header"]["msg_id"]
        asked = await fresh.receive()
        assert asked["header"]["msg_id"] == info["header"]["msg_id"]
        await fresh.reply(asked, "kernel_info_reply", {"status": "ok"})
        fresh.status("busy", got)
        fresh.status("idle", got)
        await fresh.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        assert (await client.until(reply_to(info))).content["status"] == "ok"
        assert (await client.until(reply_to(execute))).content["status"] == "ok"
        assert not any(status_is("dead")(m) for m in client.seen)
        assert not any(m.content.get("ename") == "DeadKernelError" for m in client.seen)


async def _flushed(client: FakeClient, harness: Harness) -> None:
    """Wait until ``client`` got all that was sent to it so far (a broadcast goes last)."""
    harness.kernel.publish("stream", {"name": "stdout", "text": "marker"})
    await client.until(lambda m: m.msg_type == "stream" and m.content["text"] == "marker")


async def test_a_client_back_with_its_session_id_gets_the_replies_its_stale_socket_would() -> None:
    async with fake_relay() as harness:
        old = harness.client(session_id="same")
        bystander = harness.client(session_id="other")
        request = await old.execute("x = 1")
        got = await harness.kernel.receive()
        # The old socket is half-open: its client is gone, the server has not noticed.
        new = harness.client(session_id="same")
        # 1000: were the old socket still read, its client must not reconnect in turn.
        assert await old.closed() == 1000
        harness.kernel.status("busy", got)
        harness.kernel.status("idle", got)
        await harness.kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        assert (await new.until(reply_to(request))).content["status"] == "ok"
        await _flushed(bystander, harness)
        assert not any(reply_to(request)(m) for m in bystander.seen)
        assert harness.relay.connection_count == 2
        # The stale socket's handler ends later; the client's new connection stays.
        harness.relay.disconnect(old.connection)
        assert harness.relay.connection_count == 2


async def test_a_reply_to_a_client_that_left_waits_for_it_and_reaches_no_other() -> None:
    async with fake_relay() as harness:
        leaving = harness.client(session_id="leaving")
        bystander = harness.client(session_id="other")
        request = await leaving.request("kernel_info_request")
        got = await harness.kernel.receive()
        harness.relay.disconnect(leaving.connection)
        await harness.kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        # Its client comes back (before or after the reply was relayed) and gets it...
        back = harness.client(session_id="leaving")
        assert (await back.until(reply_to(request))).content == {"status": "ok"}
        # ...and only it.
        await _flushed(bystander, harness)
        assert not any(reply_to(request)(m) for m in bystander.seen)


async def test_a_cell_sent_before_a_reconnect_gets_its_dead_reply_on_the_new_socket() -> None:
    async with fake_relay() as harness:
        old = harness.client(session_id="same")
        bystander = harness.client(session_id="other")
        request = await old.execute("while True: pass")
        await harness.kernel.receive()
        new = harness.client(session_id="same")
        harness.link.die()
        reply = await new.until(reply_to(request))
        assert reply.content["ename"] == "DeadKernelError"
        await bystander.until(status_is("dead"))
        assert not any(reply_to(request)(m) for m in bystander.seen)


async def test_what_a_replaced_socket_sent_during_a_restart_is_answered_on_the_new_one() -> None:
    async with fake_relay() as harness:
        old = harness.client(session_id="same")
        bystander = harness.client(session_id="other")
        restarting = await held_restart(harness)
        info = message("kernel_info_request", {})
        sending = asyncio.ensure_future(old.send(info))
        new = harness.client(session_id="same")
        harness.restart_gate.set()
        async with asyncio.timeout(DEADLINE_S):
            await restarting
            await sending
        got = await harness.kernel.receive()
        await harness.kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        assert (await new.until(reply_to(info))).content["status"] == "ok"
        await _flushed(bystander, harness)
        assert not any(reply_to(info)(m) for m in bystander.seen)


async def test_a_kernel_message_that_cannot_be_relayed_is_dropped_and_the_rest_flows() -> None:
    async with fake_relay() as harness:
        plain = harness.client()
        binary = harness.client(protocol=V1_PROTOCOL)
        kernel = harness.kernel

        def header(msg_type: str) -> bytes:
            raw = kernel.session.msg(msg_type, {})
            return json.dumps(raw["header"], default=json_default).encode()

        kernel.publish_raw([header("stream"), b"{}", b"{}", b'"text, not an object"'])
        kernel.publish_raw([header("stream"), b"{}", b"[]", b"{}"])
        kernel.publish_raw([header("stream"), b"[]", b"{}", b"{}"])
        kernel.publish_raw([b'"header"', b"{}", b"{}", b"{}"])
        # A lone surrogate: valid JSON, and no UTF-8 encodes it.
        kernel.publish_raw(
            [header("stream"), b"{}", b"{}", b'{"name": "stdout", "text": "odd \\ud800"}']
        )
        kernel.publish("stream", {"name": "stdout", "text": "after"})
        for client in (plain, binary):
            odd = await client.until(lambda m: m.msg_type == "stream")
            assert odd.content["text"] == "odd \ud800"
            after = await client.next()
            assert after.content["text"] == "after"
        # The shell channel goes on too.
        request = await plain.request("kernel_info_request")
        got = await kernel.receive()
        await kernel.send_raw("shell", [header("kernel_info_reply"), b"{}", b"{}", b"[1]"])
        await kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        assert (await plain.until(reply_to(request))).content == {"status": "ok"}


async def test_text_no_utf8_encodes_reaches_the_client_escaped() -> None:
    ws = FakeWebSocket()
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    connection.send(_stream("odd \ud800"))
    connection.send(_stream("after"))
    async with asyncio.timeout(DEADLINE_S):
        first, second = await ws.frames.get(), await ws.frames.get()
    assert isinstance(first, str)
    assert json.loads(first)["content"]["text"] == "odd \ud800"
    assert json.loads(second)["content"]["text"] == "after"
    connection.close()
    async with asyncio.timeout(DEADLINE_S):
        await writer


async def test_a_dying_kernels_last_messages_come_before_dead_and_their_reply_is_real() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        kernel = harness.kernel
        first = await client.execute("print('last words')")
        second = await client.execute("print('never runs')")
        got = await kernel.receive()
        await kernel.receive()
        kernel.status("busy", got)
        await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        # The reply waits in the relay for the cell's idle (its outputs may still come).
        async with asyncio.timeout(DEADLINE_S):
            await harness.relay._cells[first["header"]["msg_id"]].done.wait()

        def last_words() -> None:
            kernel.publish("stream", {"name": "stdout", "text": "last words\n"}, got)
            kernel.status("idle", got)

        harness.link.last_words = last_words
        harness.link.die()
        await client.until(status_is("dead"))
        seen = client.seen
        first_id, second_id = first["header"]["msg_id"], second["header"]["msg_id"]
        stream = [m for m in seen if m.msg_type == "stream" and m.parent_id == first_id]
        assert [m.content["text"] for m in stream] == ["last words\n"]
        [reply] = [m for m in seen if m.channel == "shell" and m.parent_id == first_id]
        assert reply.content["status"] == "ok"
        assert not any(m.parent_id == first_id and m.msg_type == "error" for m in seen)
        # The cell the kernel never ran gets its reply made up, after what the kernel said.
        [made_up] = [m for m in seen if m.channel == "shell" and m.parent_id == second_id]
        assert made_up.content["ename"] == "DeadKernelError"
        assert seen.index(stream[0]) < seen.index(made_up)
        assert status_is("dead")(seen[-1])


async def test_a_message_naming_no_channel_goes_to_shell() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        request = message("kernel_info_request", {})
        del request["channel"]
        await harness.relay.from_client(client.connection, json.dumps(request))
        got = await harness.kernel.receive("shell")
        assert got["header"]["msg_id"] == request["header"]["msg_id"]


async def test_what_clients_send_during_a_restart_is_never_dropped() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        restarting = await held_restart(harness)
        # More than any buffer for a restart would hold: the client's handler waits instead.
        requests = [message("kernel_info_request", {}) for _ in range(1500)]

        async def handler() -> None:
            for request in requests:
                await client.send(request)

        sending = asyncio.ensure_future(handler())
        harness.restart_gate.set()
        async with asyncio.timeout(DEADLINE_S):
            await restarting
        got = [(await harness.kernel.receive())["header"]["msg_id"] for _ in requests]
        assert got == [r["header"]["msg_id"] for r in requests]
        async with asyncio.timeout(DEADLINE_S):
            await sending


# -- a dying kernel ---------------------------------------------------------------------


def _flood_frames(kernel: FakeKernel, identity: list[bytes], count: int) -> list[list[bytes]]:
    """``count`` distinct signed shell messages from ``kernel`` (no parent: every client's)."""
    frames = []
    for n in range(count):
        header = json.dumps({"msg_id": f"flood-{n}", "msg_type": "comm_msg"}).encode()
        parts = [header, b"{}", b"{}", b'{"data": {}}']
        frames.append([*identity, b"<IDS|MSG>", kernel.session.sign(parts), *parts])
    return frames


def _flood(
    sock: zmq.Socket[bytes],
    frames: list[list[bytes]],
    stop: threading.Event,
    full: threading.Event,
) -> None:
    """Send ``frames`` on the kernel's shell socket, as fast as the relay's socket takes them.

    Runs in a thread of its own, as a kernel runs in a process of its own: the
    event loop's being held stops nothing here. ``sock``: the kernel's shell
    socket, handed to this thread (``FakeKernel.hand_to_thread``). ``full``:
    the relay's socket took no more for a while.
    """
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # wait while the relay's socket is full
    sock.setsockopt(zmq.SNDTIMEO, 100)
    for msg in frames:
        while not stop.is_set():
            try:
                sock.send_multipart(msg)
                break
            except zmq.Again:
                full.set()
            except zmq.ZMQError:
                return  # the relay's socket is closed
        if stop.is_set():
            return


@pytest.mark.parametrize("bound", ["count", "deadline"])
async def test_a_kernel_flooding_its_drain_holds_neither_the_event_loop_nor_the_death(
    monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """Whatever a dead kernel's session still sends, it is reported dead, and the daemon runs."""
    cap = 100
    if bound == "count":
        monkeypatch.setattr(relay_module, "_DRAIN_S", 3600.0)
        monkeypatch.setattr(relay_module, "_DRAIN_MAX", cap)
    else:
        monkeypatch.setattr(relay_module, "_DRAIN_MAX", 10**9)
        monkeypatch.setattr(relay_module, "_DRAIN_S", 0.3)
    async with fake_relay() as harness:
        relay, kernel, link = harness.relay, harness.kernel, harness.link
        client = harness.client()
        relayed = drained = 0
        send = client.connection.send

        def counting(msg: WireMessage) -> None:
            nonlocal relayed, drained
            if msg.msg_type == "comm_msg":
                relayed += 1
                drained += relay._draining
            send(msg)

        monkeypatch.setattr(client.connection, "send", counting)
        # The shell channel stops reading (storing a cell's files) while the kernel
        # fills it: there is a backlog when it dies.
        await answered_while_storing(harness, client)
        frames = _flood_frames(kernel, kernel.identities["shell"], 30_000)
        stop, full = threading.Event(), threading.Event()
        shell = kernel.hand_to_thread("shell")
        flooding = threading.Thread(target=_flood, args=(shell, frames, stop, full), daemon=True)
        flooding.start()
        # What another task of the daemon sees: how far the relay got each time it ran.
        seen: list[int] = []

        async def tick() -> None:
            while True:
                if relay._draining:
                    seen.append(relayed)
                await asyncio.sleep(0)

        ticker: asyncio.Future[None] | None = None
        try:
            assert await asyncio.to_thread(full.wait, DEADLINE_S)
            # Started once the backlog is there (the relay drains only after the
            # death): spinning before, it took the GIL from the flooding thread.
            ticker = asyncio.ensure_future(tick())
            link.die()
            link.collect_gate.set()
            async with asyncio.timeout(3 * DEADLINE_S):
                await client.until(status_is("dead"))
        finally:
            stop.set()
            if ticker is not None:
                ticker.cancel()
            await asyncio.to_thread(flooding.join, DEADLINE_S)
        assert not flooding.is_alive()
        steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        assert max(steps, default=0) <= 20, "the drain held the event loop"
        if bound == "count":
            assert drained == cap


async def test_a_kernel_the_relay_kills_is_ended_before_it_is_drained() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        link = harness.link
        ended_while_draining: list[bool] = []
        end = link.end

        async def recording_end(reason: str) -> None:
            ended_while_draining.append(harness.relay._draining)
            await end(reason)

        link.end = recording_end  # type: ignore[method-assign]
        request = await client.execute("import time; time.sleep(60)")
        got = await harness.kernel.receive()
        harness.kernel.status("busy", got)
        await client.until(status_is("busy", got["header"]["msg_id"]))
        shutdown = await client.send(message("shutdown_request", {"restart": False}, "control"))
        await client.until(reply_to(shutdown))
        reply = await client.until(reply_to(request))
        assert reply.content["ename"] == "DeadKernelError"
        await client.until(status_is("dead"))
        assert ended_while_draining == [False]
        # What the cell wrote is stored before the end takes its workspace.
        assert link.collected == [False]


async def test_a_restart_racing_a_death_gets_a_working_fresh_kernel() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        link = harness.link
        request = await answered_while_storing(harness, client)
        # The client ends the kernel: its death is reported once the reply is out.
        shutdown = message("shutdown_request", {"restart": False}, "control")
        shutting = asyncio.ensure_future(client.send(shutdown))
        await client.until(reply_to(shutdown))
        restarting = asyncio.ensure_future(harness.relay.restart())
        await asyncio.sleep(0)  # the restart begins (not a wait for time)
        link.collect_gate.set()
        async with asyncio.timeout(DEADLINE_S):
            await restarting
            await shutting
        assert (await client.until(reply_to(request))).content["status"] == "ok"
        assert len(harness.kernels) == 2
        assert harness.relay.execution_state == "idle"
        info = await client.request("kernel_info_request")
        fresh = harness.kernel
        asked = await fresh.receive()
        await fresh.reply(asked, "kernel_info_reply", {"status": "ok"})
        assert (await client.until(reply_to(info))).content["status"] == "ok"
        assert not status_is("dead")(client.seen[-1])


async def test_a_reply_stuck_storing_its_files_past_the_drain_goes_out_as_the_kernel_sent_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_DRAIN_S", 0.5)
    async with fake_relay() as harness:
        client = harness.client()
        link = harness.link
        request = await answered_while_storing(harness, client)  # the gate is never set
        link.die()
        await client.until(status_is("dead"))
        [reply] = [m for m in client.seen if reply_to(request)(m)]
        assert reply.content["status"] == "ok"
        assert not any(m.content.get("ename") == "DeadKernelError" for m in client.seen)
        assert len(link.collected) == 1


# -- failures of the relay's own ------------------------------------------------------------


async def test_a_failure_relaying_a_kernel_message_is_logged_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_relay() as harness:
        client = harness.client()

        def broken(msg: WireMessage) -> None:
            raise RuntimeError("a bug in the relay")

        monkeypatch.setattr(harness.relay, "_track", broken)
        harness.kernel.publish("stream", {"name": "stdout", "text": "x"})
        request = await client.request("kernel_info_request")
        got = await harness.kernel.receive()
        await harness.kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        await client.until(reply_to(request))
        [record] = [r for r in caplog.records if "relaying a iopub message failed" in r.message]
        assert record.exc_info is not None


async def test_a_message_one_connection_cannot_take_still_reaches_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with fake_relay() as harness:
        encode = codec_encode

        def failing(msg: WireMessage, protocol: str | None) -> str | bytes:
            if protocol == V1_PROTOCOL:
                raise ValueError("cannot encode")
            return encode(msg, protocol)

        monkeypatch.setattr(relay_module, "encode", failing)
        harness.client(protocol=V1_PROTOCOL)
        away = harness.client(session_id="away")
        harness.relay.disconnect(away.connection)
        other = harness.client()
        harness.kernel.publish("stream", {"name": "stdout", "text": "for all"})
        assert (await other.until(lambda m: m.msg_type == "stream")).content["text"] == "for all"
        # ...and a client away at the time gets it when it is back.
        back = harness.client(session_id="away")
        assert (await back.until(lambda m: m.msg_type == "stream")).content["text"] == "for all"


class _SendFails(FakeWebSocket):
    async def send_text(self, text: str) -> None:
        raise ValueError("the server's send failed")


async def test_a_writer_whose_send_fails_logs_it_and_closes_as_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ws = _SendFails()
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    connection.send(_stream("x"))
    async with asyncio.timeout(DEADLINE_S):
        await writer
    assert ws.close_code == 1011
    [record] = [r for r in caplog.records if "sending to a WebSocket client failed" in r.message]
    assert record.exc_info is not None


class _SendingTracked(FakeWebSocket):
    """Records whether a send was still under way when the socket was closed."""

    def __init__(self) -> None:
        super().__init__(stuck=True)
        self.in_send = False
        self.closed_in_send: bool | None = None

    async def send_text(self, text: str) -> None:
        self.in_send = True
        try:
            await super().send_text(text)
        finally:
            self.in_send = False

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_in_send = self.in_send
        await super().close(code, reason)


async def test_a_socket_is_closed_only_once_its_send_is_over() -> None:
    ws = _SendingTracked()
    connection = Connection(cast(WebSocket, ws), None, None)
    writer = asyncio.ensure_future(connection.write_loop())
    connection.send(_stream("never read"))
    async with asyncio.timeout(DEADLINE_S):
        await ws.sending.wait()
    connection.close(flush=False)
    async with asyncio.timeout(DEADLINE_S):
        await writer
    assert ws.closed_in_send is False


async def test_a_restart_that_waited_behind_a_shutdown_brings_nothing_back() -> None:
    """A deleted kernel stays deleted: no fresh sandbox for a relay nobody holds."""
    from sandkernel.errors import SessionNotFound

    async with fake_relay() as harness:
        relay = harness.relay
        async with relay._lock:  # a shutdown under way holds it
            shutting = asyncio.ensure_future(relay.shutdown())
            restarting = asyncio.ensure_future(relay.restart())
            await asyncio.sleep(0)  # both wait for the lock (not a wait for time)
        async with asyncio.timeout(DEADLINE_S):
            await shutting
            with pytest.raises(SessionNotFound):
                await restarting
        assert len(harness.kernels) == 1 and relay.execution_state == "dead"


# -- every cell keeps the policy's wall timeout ------------------------------------------


def _refusal_to(request: dict[str, Any]) -> Callable[[WireMessage], bool]:
    """The error reply the relay itself sends for ``request`` (the kernel never saw it)."""
    return lambda m: reply_to(request)(m) and m.content.get("status") == "error"


async def _next_on(kernel: FakeKernel, channel: str) -> str:
    """The msg_type of the next message the kernel gets on ``channel``."""
    return str((await kernel.receive(channel))["header"]["msg_type"])


@pytest.mark.parametrize("channel", ["control", "stdin"])
async def test_an_execute_request_off_the_shell_channel_is_refused_to_its_sender_only(
    channel: str,
) -> None:
    """ipykernel runs one sent on control there, where no limit and no interrupt reach it."""
    async with fake_relay() as harness:
        client = harness.client(session_id="sender")
        bystander = harness.client(session_id="other")
        request = execute_request("while True: pass")
        request["channel"] = channel
        await client.send(request)
        after = "interrupt_request" if channel == "control" else "input_reply"
        await client.send(message(after, {"value": ""}, channel=channel))
        # The kernel never got the cell: the next thing it gets there is what came after.
        assert await _next_on(harness.kernel, channel) == after
        refused = await client.until(_refusal_to(request))
        assert refused.msg_type == "execute_reply"
        assert "shell" in refused.content["evalue"]
        await client.until(status_is("idle", request["header"]["msg_id"]))
        await _flushed(bystander, harness)
        assert not any(m.parent_id == request["header"]["msg_id"] for m in bystander.seen)


async def test_an_execute_request_reusing_a_pending_msg_id_is_refused() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        first = await client.execute("print('short')")
        second = execute_request("while True: pass")
        second["header"]["msg_id"] = first["header"]["msg_id"]
        await client.send(second)
        await client.request("kernel_info_request")
        kernel = harness.kernel
        got = await kernel.receive()
        assert got["content"]["code"] == "print('short')"
        # The second cell never reached the kernel, to run there untimed.
        assert await _next_on(kernel, "shell") == "kernel_info_request"
        refused = await client.until(_refusal_to(second))
        assert "msg_id" in refused.content["evalue"]
        kernel.status("busy", got)
        kernel.status("idle", got)
        await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        assert (await client.until(reply_to(first))).content["status"] == "ok"
        # Once answered, the id is free again.
        await client.send(second)
        assert (await kernel.receive())["header"]["msg_id"] == first["header"]["msg_id"]


def _tight_policy(wall_timeout_s: float) -> Policy:
    return load_policy("default").model_copy(
        update={"wall_timeout_s": wall_timeout_s, "interrupt_grace_s": DEADLINE_S}
    )


async def test_a_cell_keeps_its_deadline_while_another_cell_starts_and_ends() -> None:
    """Whatever the kernel says of other cells, a cell that started is interrupted in time."""
    async with fake_relay(policy=_tight_policy(0.5)) as harness:
        client = harness.client()
        kernel = harness.kernel
        long = await client.execute("while True: pass")
        short = await client.execute("1")
        got_long, got_short = await kernel.receive(), await kernel.receive()
        kernel.status("busy", got_long)
        await client.until(status_is("busy", long["header"]["msg_id"]))
        # As a kernel running the second cell beside the first (in a subshell) says it.
        kernel.status("busy", got_short)
        kernel.status("idle", got_short)
        await kernel.reply(got_short, "execute_reply", {"status": "ok", "execution_count": 2})
        await client.until(reply_to(short))
        assert await _next_on(kernel, "control") == "interrupt_request"
        note = await client.until(lambda m: m.msg_type == "stream")
        assert note.parent_id == long["header"]["msg_id"]
        assert "wall_timeout_s" in note.content["text"]
        kernel.status("idle", got_long)
        await kernel.reply(got_long, "execute_reply", {"status": "error", "ename": "KI"})
        await client.until(reply_to(long))


async def test_kernel_subshells_are_not_offered_and_not_made() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        kernel = harness.kernel
        info = await client.request("kernel_info_request")
        asked = await kernel.receive()
        await kernel.reply(
            asked,
            "kernel_info_reply",
            {"status": "ok", "supported_features": ["kernel subshells", "debugger"]},
        )
        reply = await client.until(reply_to(info))
        assert reply.content["supported_features"] == ["debugger"]
        create = await client.request("create_subshell_request", channel="control")
        in_subshell = execute_request("while True: pass")
        in_subshell["header"]["subshell_id"] = "made-up"
        await client.send(in_subshell)
        await client.request("interrupt_request", channel="control")
        await client.request("kernel_info_request")
        # Neither reached the kernel.
        assert await _next_on(kernel, "control") == "interrupt_request"
        assert await _next_on(kernel, "shell") == "kernel_info_request"
        refused = await client.until(_refusal_to(create))
        assert refused.msg_type == "create_subshell_reply"
        assert "subshell" in refused.content["evalue"]
        refused = await client.until(_refusal_to(in_subshell))
        assert refused.msg_type == "execute_reply"


async def test_a_made_up_reply_for_a_client_that_left_reaches_no_other_client() -> None:
    async with fake_relay() as harness:
        leaving = harness.client(session_id="leaving")
        anonymous = harness.client()
        bystander = harness.client(session_id="other")
        kept = await leaving.execute("while True: pass")
        lost = await anonymous.execute("while True: pass")
        await harness.kernel.receive()
        await harness.kernel.receive()
        harness.relay.disconnect(leaving.connection)
        harness.relay.disconnect(anonymous.connection)
        harness.link.die()
        await bystander.until(status_is("dead"))
        for request in (kept, lost):
            assert not any(reply_to(request)(m) for m in bystander.seen)
        # The client that can come back (it has a session_id) gets its reply then.
        back = harness.client(session_id="leaving")
        reply = await back.until(reply_to(kept))
        assert reply.content["ename"] == "DeadKernelError"


async def test_a_shutdown_request_on_shell_restarts_as_one_on_control() -> None:
    """jupyter_client before 7 sends it on shell, and ipykernel would end there for good."""
    async with fake_relay() as harness:
        client = harness.client()
        request = await client.send(message("shutdown_request", {"restart": True}, "shell"))
        assert (await client.until(reply_to(request))).content["restart"] is True
        await client.until(status_is("starting"))
        await client.until(status_is("idle"))
        # Done by the gateway, as on control: a fresh kernel, not one told to end.
        assert len(harness.kernels) == 2 and harness.relay.execution_state == "idle"


@pytest.mark.parametrize(
    "content",
    [{}, {"code": None}, {"code": 5}, {"code": "1", "user_expressions": ["x"]}],
    ids=["no-code", "null-code", "number-code", "list-expressions"],
)
async def test_an_execute_request_ipykernel_would_never_answer_is_refused(
    content: dict[str, Any],
) -> None:
    """ipykernel sends busy and idle and no reply: the cell would wait, kept, for ever."""
    async with fake_relay() as harness:
        client = harness.client()
        request = message("execute_request", content)
        await client.send(request)
        await client.request("kernel_info_request")
        assert await _next_on(harness.kernel, "shell") == "kernel_info_request"
        refused = await client.until(_refusal_to(request))
        assert "content." in refused.content["evalue"]
        assert harness.relay._cells == {}


async def test_a_waiting_cell_keeps_of_its_request_only_what_answers_it() -> None:
    async with fake_relay() as harness:
        client = harness.client()
        request = execute_request("x = '" + "a" * 100_000 + "'")
        request["header"]["junk"] = "b" * 100_000
        await client.send(request)
        await harness.kernel.receive()
        (cell,) = harness.relay._cells.values()
        assert cell.request.content == {} and "junk" not in cell.request.header
        assert cell.request.header["msg_id"] == request["header"]["msg_id"]


async def test_cells_waiting_on_a_kernel_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "_MAX_CELLS", 3)
    async with fake_relay() as harness:
        client = harness.client()
        for _ in range(3):
            await client.execute("1")
        over = await client.execute("1")
        refused = await client.until(_refusal_to(over))
        assert "3 cells are already waiting" in refused.content["evalue"]
        assert len(harness.relay._cells) == 3


async def test_a_request_reusing_another_clients_pending_msg_id_is_refused_to_it() -> None:
    """Every client sees the ids on IOPub: reused, the reply would go to the wrong client."""
    async with fake_relay() as harness:
        owner, thief = harness.client(session_id="owner"), harness.client(session_id="thief")
        cell = await owner.execute("1")
        got = await harness.kernel.receive()
        stolen = message("history_request", {})
        stolen["header"]["msg_id"] = cell["header"]["msg_id"]
        await thief.send(stolen)
        refused = await thief.until(_refusal_to(stolen))
        assert "another client's request" in refused.content["evalue"]
        await owner.request("kernel_info_request")
        assert await _next_on(harness.kernel, "shell") == "kernel_info_request"
        harness.kernel.status("busy", got)
        harness.kernel.status("idle", got)
        await harness.kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        assert (await owner.until(reply_to(cell))).content["status"] == "ok"
        await _flushed(thief, harness)
        assert not any(
            m.msg_type == "execute_reply" and m.parent_id == cell["header"]["msg_id"]
            for m in thief.seen
        )


# -- a cell's files are stored before clients see it end ----------------------------------


async def test_a_cells_idle_comes_after_its_reply_once_its_files_are_stored() -> None:
    """A client that takes the idle for the cell's end (Open WebUI) finds its files stored."""
    async with fake_relay() as harness:
        client = harness.client()
        kernel, link = harness.kernel, harness.link
        link.collect_gate.clear()
        first = await client.execute("open('/mnt/data/a.csv', 'w').write('a')")
        second = await client.execute("print('next')")
        got, got_next = await kernel.receive(), await kernel.receive()
        first_id = first["header"]["msg_id"]
        kernel.status("busy", got)
        kernel.status("idle", got)
        await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        # Storing begins once the cell's idle came: the relay has it by now.
        async with asyncio.timeout(DEADLINE_S):
            await link.collecting.wait()
        # The kernel goes on with the next cell meanwhile.
        kernel.status("busy", got_next)
        kernel.publish("stream", {"name": "stdout", "text": "next\n"}, got_next)
        harness.relay.broadcast(_stream("marker"))  # straight to the clients
        await client.until(lambda m: m.content.get("text") == "marker")
        assert not any(status_is("idle", first_id)(m) or reply_to(first)(m) for m in client.seen)
        link.collect_gate.set()
        await client.until(lambda m: m.content.get("text") == "next\n")
        assert link.stored == 1
        seen = client.seen
        [reply] = [i for i, m in enumerate(seen) if reply_to(first)(m)]
        [idle] = [i for i, m in enumerate(seen) if status_is("idle", first_id)(m)]
        [busy_next] = [
            i for i, m in enumerate(seen) if status_is("busy", got_next["header"]["msg_id"])(m)
        ]
        # In the order the kernel sent them: the reply, its idle, then the next cell.
        assert reply < idle < busy_next
        assert second["header"]["msg_id"] == got_next["header"]["msg_id"]


@pytest.mark.parametrize("end", ["shutdown", "restart"])
async def test_a_delete_or_restart_as_a_cell_ends_waits_for_its_files_to_be_stored(
    end: str,
) -> None:
    async with fake_relay() as harness:
        client = harness.client()
        link = harness.link
        request = await answered_while_storing(harness, client)
        ending = asyncio.ensure_future(getattr(harness.relay, end)())
        # Runs after the delete's (or restart's) first step: one that does not wait
        # for the cell would cancel storing its files before this lets it end.
        link.collect_gate.set()
        async with asyncio.timeout(DEADLINE_S):
            await ending
        assert link.stored == 1
        assert (await client.until(reply_to(request))).content["status"] == "ok"
        await client.until(status_is("idle", request["header"]["msg_id"]))
        if end == "restart":
            # ...all of it before the fresh kernel starts.
            await client.until(status_is("starting"))


async def test_output_held_behind_a_storing_cells_idle_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_MAX_HELD", 5)
    async with fake_relay() as harness:
        client = harness.client()
        kernel, link = harness.kernel, harness.link
        request = await answered_while_storing(harness, client)  # held: its files are storing
        for n in range(5):  # the idle and these make one more than the bound
            kernel.publish("stream", {"name": "stdout", "text": f"{n}"})
        # All of it goes out, though storing the cell's files has not ended.
        await client.until(lambda m: m.content.get("text") == "4")
        assert any(status_is("idle", request["header"]["msg_id"])(m) for m in client.seen)
        assert link.stored == 0
        link.collect_gate.set()
        await client.until(reply_to(request))


def _noting_replies(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once a reply (a shell message) is queued for ``connection``."""
    queued = asyncio.Event()
    send = connection.send

    def noting(msg: WireMessage) -> None:
        send(msg)
        if msg.channel == "shell":
            queued.set()

    monkeypatch.setattr(connection, "send", noting)
    return queued


# -- a client that comes back gets its answers ---------------------------------------------


async def test_a_client_closed_as_too_slow_gets_its_queued_reply_and_what_followed_on_return(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_CONNECTION_BYTES", 1 << 20)
    async with fake_relay() as harness:
        kernel = harness.kernel
        slow = harness.client(session_id="lab", stuck=True)
        watcher = harness.client()
        reply_queued = _noting_replies(slow.connection, monkeypatch)
        request = await slow.request("kernel_info_request")
        got = await kernel.receive()
        chunk = "x" * (600 << 10)
        kernel.publish("stream", {"name": "stdout", "text": "1" + chunk})
        await kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        async with asyncio.timeout(DEADLINE_S):
            await reply_queued.wait()  # behind output the client does not read
        assert not slow.connection.closed
        kernel.publish("stream", {"name": "stdout", "text": "2" + chunk})  # one too many
        assert await slow.closed() == CLOSE_TOO_SLOW
        # Until the socket's handler ends (later), what the kernel says is kept for it.
        kernel.status("busy")
        kernel.publish("stream", {"name": "stdout", "text": "after"})
        await watcher.until(lambda m: m.content.get("text") == "after")
        harness.relay.disconnect(slow.connection)
        back = harness.client(session_id="lab")
        assert (await back.until(reply_to(request))).content == {"status": "ok"}
        rest = [await back.next() for _ in range(3)]
        assert [m.content.get("text", "")[:1] for m in rest] == ["2", "", "a"]
        assert status_is("busy")(rest[1])
        assert back.ws.frames.empty()


async def test_what_a_gone_client_missed_keeps_its_reply_and_statuses_over_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "_MAX_MISSED_MESSAGES", 5)
    async with fake_relay() as harness:
        kernel = harness.kernel
        away = harness.client(session_id="away")
        watcher = harness.client()
        request = await away.execute("for i in range(20): display(i)")
        msg_id = request["header"]["msg_id"]
        got = await kernel.receive()
        harness.relay.disconnect(away.connection)
        kernel.status("busy", got)
        for n in range(20):
            kernel.publish("display_data", {"data": {"text/plain": str(n)}, "metadata": {}}, got)
        kernel.status("idle", got)
        await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        await watcher.until(status_is("idle", msg_id))  # the reply went before it
        back = harness.client(session_id="away")
        kept = [await back.next() for _ in range(8)]
        assert back.ws.frames.empty()
        assert status_is("busy", msg_id)(kept[0])
        # The latest output, as much as is kept; then what ends the cell, always.
        assert [m.content["data"]["text/plain"] for m in kept[1:6]] == [
            "15",
            "16",
            "17",
            "18",
            "19",
        ]
        assert reply_to(request)(kept[6]) and kept[6].content["status"] == "ok"
        assert status_is("idle", msg_id)(kept[7])


# -- the kernel's execution_state, as the REST model says it -------------------------------


@pytest.mark.parametrize(
    ("msg_type", "channel"),
    [("kernel_info_request", "control"), ("comm_info_request", "shell")],
)
async def test_a_request_not_tracked_by_jupyter_server_leaves_a_running_kernel_busy(
    msg_type: str, channel: str
) -> None:
    """JupyterLab asks for kernel_info on every connect, ipywidgets for comm_info."""
    async with fake_relay() as harness:
        kernel, relay = harness.kernel, harness.relay
        runner, other = harness.client(), harness.client()
        cell = await runner.execute("import time; time.sleep(60)")
        got = await kernel.receive()
        kernel.status("busy", got)
        await other.until(status_is("busy", cell["header"]["msg_id"]))
        assert GatewayKernels.model(relay)["execution_state"] == "busy"
        request = await other.request(msg_type, channel)
        asked = await kernel.receive(channel)
        kernel.status("busy", asked)
        kernel.status("idle", asked)
        await kernel.reply(asked, msg_type.replace("_request", "_reply"), {"status": "ok"}, channel)
        # Both relayed (the reply and the idle travel apart: either may come first).
        idle = status_is("idle", request["header"]["msg_id"])
        await other.until(reply_to(request))
        if not any(idle(m) for m in other.seen):
            await other.until(idle)
        assert GatewayKernels.model(relay)["execution_state"] == "busy"
        kernel.status("idle", got)
        await kernel.reply(got, "execute_reply", {"status": "ok", "execution_count": 1})
        await runner.until(status_is("idle", cell["header"]["msg_id"]))
        assert GatewayKernels.model(relay)["execution_state"] == "idle"


async def test_a_client_back_with_its_session_id_gets_the_replies_its_stale_socket_had_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with fake_relay() as harness:
        kernel = harness.kernel
        stale = harness.client(session_id="same", stuck=True)  # its network went away
        reply_queued = _noting_replies(stale.connection, monkeypatch)
        request = await stale.request("kernel_info_request")
        got = await kernel.receive()
        kernel.publish("stream", {"name": "stdout", "text": "never read"})
        await kernel.reply(got, "kernel_info_reply", {"status": "ok"})
        async with asyncio.timeout(DEADLINE_S):
            await reply_queued.wait()
        new = harness.client(session_id="same")
        assert await stale.closed() == 1000
        assert (await new.until(reply_to(request))).content == {"status": "ok"}
