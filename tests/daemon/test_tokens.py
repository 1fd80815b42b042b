"""The daemon's token over TCP: as clients send it, what a refusal says, kept out of the logs."""

from __future__ import annotations

import logging

import httpx
import pytest
import websockets

from sandkernel.daemon.errors import Unauthorized
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

#: As ``head -c 32 /dev/urandom | base64`` makes them: '+', '/' and '='.
BASE64_TOKEN = "q+Zt3/Lw+Rk9bX2+oP1sYw/N8e+Hv4uA5c7Dj0Fm+I="


async def test_a_query_token_whose_plus_signs_arrive_as_spaces_is_accepted(
    daemon_factory: DaemonFactory,
) -> None:
    """Open WebUI puts the token in its kernel WebSocket URL as ``?token={token}``, unencoded."""
    running = await daemon_factory(tcp=("127.0.0.1", 0), token=BASE64_TOKEN)
    as_header = {"Authorization": f"token {BASE64_TOKEN}"}
    async with httpx.AsyncClient(base_url=running.url) as http:
        unencoded = await http.get(f"/api/kernels?token={BASE64_TOKEN}")
        assert unencoded.status_code == 200, unencoded.text
        encoded = await http.get("/api/kernels", params={"token": BASE64_TOKEN})
        assert encoded.status_code == 200, encoded.text
        for wrong in (BASE64_TOKEN.replace("/", "+"), BASE64_TOKEN.replace("+", "-")):
            refused = await http.get(f"/api/kernels?token={wrong}")
            assert refused.status_code == 403, wrong
        # A header carries the token exactly: a space there is not a '+'.
        spaced = {"Authorization": f"token {BASE64_TOKEN.replace('+', ' ')}"}
        assert (await http.get("/api/kernels", headers=spaced)).status_code == 403
        started = await http.post("/api/kernels", json={}, headers=as_header)
        assert started.status_code == 201, started.text
    channels = running.url.replace("http://", "ws://", 1)
    channels += f"/api/kernels/{started.json()['id']}/channels?session_id=w&token={BASE64_TOKEN}"
    async with websockets.connect(channels) as ws:
        assert ws.response is not None and ws.response.status_code == 101


async def test_the_access_log_shows_no_query_token_on_any_path(
    daemon_factory: DaemonFactory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A daemon started in this process without an access log cut the logger off.
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "propagate", True)
    token = "secrettoken123"
    running = await daemon_factory(tcp=("127.0.0.1", 0), token=token, access_log=True)
    paths = ["/v1/stats", "/openai/v1/assistants", "/api/kernels", "/run_code", "/nowhere"]
    with caplog.at_level(logging.INFO, logger="uvicorn"):
        async with httpx.AsyncClient(base_url=running.url) as http:
            for path in paths:
                await http.get(f"{path}?limit=2&token={token}&x=1")
        # uvicorn logs each WebSocket handshake too, with or without --access-log.
        with pytest.raises(websockets.InvalidStatus):
            ws_url = running.url.replace("http://", "ws://", 1)
            async with websockets.connect(f"{ws_url}/v1/stats?token={token}"):
                pass
    logged = caplog.text
    assert token not in logged
    for path in paths:
        assert f"GET {path}?limit=2&" in logged and "x=1" in logged, logged
    assert "/v1/stats?token=" in logged  # the WebSocket's, its token hidden


async def test_a_refusal_names_every_way_to_give_the_daemon_its_token(
    daemon_factory: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SANDKERNEL_TOKEN", raising=False)
    running = await daemon_factory(tcp=("127.0.0.1", 0), token="s3cret-token")
    async with httpx.AsyncClient(base_url=running.url) as http:
        refused = await http.get("/v1/stats")
    assert refused.status_code == 401
    assert "--token-file" in refused.json()["error"]["message"]
    with pytest.raises(Unauthorized, match=r"token=") as tokenless:
        await running.client(url=running.url).stats()
    assert "SANDKERNEL_TOKEN" in str(tokenless.value)
    # A wrong token is not a missing one: no advice to pass one.
    with pytest.raises(Unauthorized) as wrong:
        await running.client(url=running.url, token="wrong").stats()
    assert "token=" not in str(wrong.value)


@pytest.mark.parametrize(
    ("token", "said"),
    [
        (None, "without a token: only /run_code, /run_jupyter, /v1/ping"),
        ("s3cret-token", "token required, except /run_code, /run_jupyter, /v1/ping"),
    ],
)
async def test_the_startup_log_says_what_tcp_serves_without_a_token(
    daemon_factory: DaemonFactory,
    caplog: pytest.LogCaptureFixture,
    token: str | None,
    said: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="sandkernel.daemon.server"):
        running = await daemon_factory(tcp=("127.0.0.1", 0), token=token, fusion_without_token=True)
    (line,) = [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()]
    assert said in line, line
    if token is None:
        assert "token required" not in line
    async with httpx.AsyncClient(base_url=running.url) as http:
        assert (await http.get("/v1/ping")).status_code == 200
        assert (await http.get("/v1/stats")).status_code == 401
