"""The WebSocket codec, the kernel specs and the gateway's answers without kernels (no sandbox)."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from sandkernel.api import ExposesKernels
from sandkernel.engine import Engine
from sandkernel.errors import BadInput
from sandkernel.jupyter_gateway.app import JupyterGate, create_gateway_app
from sandkernel.jupyter_gateway.codec import V1_PROTOCOL, WireMessage, decode, encode
from sandkernel.jupyter_gateway.kernels import iso
from sandkernel.jupyter_gateway.specs import KernelSpecs
from sandkernel.policy import load_policy, shipped_policy_names
from tests.jupyter_gateway._support import message


def _wire(**changes: Any) -> WireMessage:
    raw = message("comm_msg", {"comm_id": "c", "data": {"x": 1}})
    msg = WireMessage(
        channel="shell",
        header=raw["header"],
        parent_header={"msg_id": "p"},
        metadata={"m": 1},
        content=raw["content"],
    )
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


@pytest.mark.parametrize("protocol", [None, V1_PROTOCOL])
@pytest.mark.parametrize("buffers", [[], [b"\x00\x01", b"", b"buffer"]])
def test_a_message_survives_each_protocol(protocol: str | None, buffers: list[bytes]) -> None:
    msg = _wire(buffers=buffers)
    frame = encode(msg, protocol)
    assert isinstance(frame, bytes) == (protocol == V1_PROTOCOL or bool(buffers))
    back = decode(frame, protocol)
    assert back == msg


def test_the_json_protocol_is_what_jupyter_clients_read() -> None:
    frame = encode(_wire(), None)
    assert isinstance(frame, str)
    body = json.loads(frame)
    assert body["channel"] == "shell"
    assert set(body) >= {"header", "parent_header", "metadata", "content", "buffers"}


@pytest.mark.parametrize("protocol", [None, V1_PROTOCOL])
@pytest.mark.parametrize("buffers", [[], [b"buffer"]])
def test_text_no_utf8_encodes_goes_out_as_json_every_client_parses(
    protocol: str | None, buffers: list[bytes]
) -> None:
    # A kernel's text may hold lone surrogates: escaped (\ud800), it is still JSON.
    msg = _wire(content={"name": "stdout", "text": "odd \ud800 é"}, buffers=buffers)
    frame = encode(msg, protocol)
    if isinstance(frame, str):
        frame.encode()  # what a server does to send a text frame
    assert decode(frame, protocol).content == msg.content


def _without_channel(frame: dict[str, Any], value: Any) -> dict[str, Any]:
    frame = dict(frame)
    if value == "missing":
        del frame["channel"]
    else:
        frame["channel"] = value
    return frame


@pytest.mark.parametrize("value", ["missing", None])
def test_a_json_message_naming_no_channel_is_for_shell(value: Any) -> None:
    # As Jupyter Server takes it (with a warning).
    raw = _without_channel(message("kernel_info_request", {}), value)
    assert decode(json.dumps(raw), None).channel == "shell"
    body = json.dumps(raw).encode()
    binary = struct.pack(">III", 2, 12, 12 + len(body)) + body + b"buffer"
    assert decode(binary, None).channel == "shell"


BAD_FRAMES: list[tuple[str | bytes, str | None, str]] = [
    ("not json {", None, "not JSON"),
    ("[1, 2]", None, "JSON object"),
    (json.dumps({**message("execute_request", {}), "channel": "nope"}), None, "unknown channel"),
    # Not a string: refused as any unknown channel (a TypeError before, logged with its traceback).
    (json.dumps({**message("execute_request", {}), "channel": ["shell"]}), None, "unknown channel"),
    (json.dumps({**message("execute_request", {}), "channel": {"a": 1}}), None, "unknown channel"),
    (json.dumps({**message("x", {}), "header": {"msg_type": "x"}}), None, "msg_id"),
    (json.dumps({**message("x", {}), "header": "text"}), None, "header"),
    (json.dumps({**message("x", {}), "content": [1]}), None, "content"),
    (b"\x00", None, "too short"),
    (struct.pack(">I", 2_000_000) + b"x" * 8, None, "part count"),
    (struct.pack(">II", 1, 999), None, "offsets"),
    (b"\x00" * 7, V1_PROTOCOL, "too short"),
    ("text", V1_PROTOCOL, "binary"),
    (struct.pack("<QQQ", 2, 24, 24), V1_PROTOCOL, "needs header"),
    (struct.pack("<QQQ", 2, 5000, 24), V1_PROTOCOL, "offsets"),
]


def _v1_frame(parts: list[bytes]) -> bytes:
    """A ``v1.kernel.websocket.jupyter.org`` frame of raw parts (channel first)."""
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(parts)


#: JSON nested deeper than Python's parser goes (it raises RecursionError, not ValueError).
_DEEP = b"[" * 200_000
BAD_FRAMES += [
    ('{"header": ' + _DEEP.decode(), None, "not JSON"),
    (struct.pack(">II", 1, 8) + _DEEP, None, "not JSON"),
    (_v1_frame([b"shell", _DEEP, b"{}", b"{}", b"{}"]), V1_PROTOCOL, "header is not JSON"),
]


@pytest.mark.parametrize(("frame", "protocol", "says"), BAD_FRAMES)
def test_a_malformed_frame_is_refused_saying_why(
    frame: str | bytes, protocol: str | None, says: str
) -> None:
    with pytest.raises(BadInput, match=says):
        decode(frame, protocol)


def test_one_spec_per_shipped_policy_with_its_limits() -> None:
    specs = KernelSpecs(load_policy("default"))
    listed = specs.all()
    assert listed["default"] == "sandkernel-default"
    assert sorted(listed["kernelspecs"]) == [f"sandkernel-{n}" for n in shipped_policy_names()]
    strict = listed["kernelspecs"]["sandkernel-strict"]
    meta = strict["spec"]["metadata"]["sandkernel"]
    assert meta["limits"]["memory_mb"] == load_policy("strict").memory_mb
    assert meta["served"] is False
    assert listed["kernelspecs"]["sandkernel-default"]["spec"]["metadata"]["sandkernel"]["served"]
    assert strict["spec"]["language"] == "python"


def test_a_spec_name_resolves_to_the_served_policy_or_says_how_to_get_another() -> None:
    specs = KernelSpecs(load_policy("default"))
    for name in (None, "", "python3", "sandkernel-default"):
        assert specs.resolve(name) == "sandkernel-default"
    with pytest.raises(BadInput, match="sandkernel serve --policy strict"):
        specs.resolve("sandkernel-strict")
    with pytest.raises(BadInput, match="no kernel spec"):
        specs.resolve("julia-1.9")


def test_a_custom_served_policy_is_listed_and_default(tmp_path: Any) -> None:
    path = tmp_path / "tight.toml"
    path.write_text("memory_mb = 256\nwall_timeout_s = 5\n")
    specs = KernelSpecs(load_policy(path))
    assert specs.default == "sandkernel-tight"
    assert "sandkernel-tight" in specs.all()["kernelspecs"]


def test_the_embedded_engine_exposes_its_kernels() -> None:
    assert isinstance(Engine(handle_sigterm=False), ExposesKernels)
    assert not isinstance(object(), ExposesKernels)


TOKEN = "t0ken"


async def _gateway_without_kernels() -> httpx.AsyncClient:
    async def daemon_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the gateway's paths never reach the daemon's application")

    gate = JupyterGate(
        daemon_app,
        create_gateway_app(KernelSpecs(load_policy("default")), None),
        token=TOKEN,
        max_json_bytes=1024,
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://gw")


@pytest.mark.anyio
async def test_without_exposed_kernels_the_kernel_routes_answer_501() -> None:
    async with await _gateway_without_kernels() as client:
        headers = {"Authorization": "token t0ken"}
        assert (await client.get("/api/kernelspecs", headers=headers)).status_code == 200
        for method, path in [("GET", "/api/kernels"), ("POST", "/api/kernels"),
                             ("GET", "/api/sessions")]:  # fmt: skip
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 501
            assert "--ray" in response.json()["message"]


@pytest.mark.anyio
async def test_bodies_over_the_limit_are_refused_before_they_are_read() -> None:
    async with await _gateway_without_kernels() as client:
        response = await client.post(
            "/api/kernels", content=b"x" * 2048, headers={"Authorization": "Bearer t0ken"}
        )
        assert response.status_code == 413
        assert "--max-json-kb" in response.json()["message"]


@pytest.mark.anyio
async def test_an_engine_that_does_not_expose_its_kernels_gets_501_from_the_gate() -> None:
    from sandkernel.jupyter_gateway import jupyter_gate

    class ClusterLike:
        """What the gateway sees of a served engine without ``kernel_link`` (a cluster)."""

        policy = load_policy("default")

    async def daemon_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the gateway's paths never reach the daemon's application")

    engine: Any = ClusterLike()
    async with jupyter_gate(daemon_app, engine, token=TOKEN, max_json_bytes=1024) as gate:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            headers = {"Authorization": f"token {TOKEN}"}
            response = await client.post("/api/kernels", headers=headers)
            assert response.status_code == 501
            specs = await client.get("/api/kernelspecs", headers=headers)
            assert specs.json()["default"] == "sandkernel-default"


@pytest.mark.anyio
@pytest.mark.parametrize("microsecond", [0, 123_456])
async def test_last_activity_is_what_jupyter_servers_gateway_client_parses(
    microsecond: int,
) -> None:
    from jupyter_server.gateway.managers import GatewayKernelManager

    moment = datetime(2026, 1, 2, 3, 4, 5, microsecond, tzinfo=UTC)  # 0: on the second
    model = {"id": "k", "name": "sandkernel-default", "execution_state": "idle",
             "connections": 0, "last_activity": iso(moment)}  # fmt: skip
    manager = GatewayKernelManager(kernel_name="sandkernel-default")
    await manager.refresh_model(model)
    assert manager.last_activity == moment
