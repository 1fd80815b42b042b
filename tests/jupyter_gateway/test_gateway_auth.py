"""The daemon's token, as Jupyter clients send it, on every /api route and on the WebSocket."""

from __future__ import annotations

import httpx
import pytest
import websockets

from tests.jupyter_gateway._support import (
    Gateway,
    GatewayClient,
    GatewayProcess,
    KernelSocket,
    ws_url,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

ROUTES = [
    ("GET", "/api"),
    ("GET", "/api/kernelspecs"),
    ("GET", "/api/kernelspecs/sandkernel-default"),
    ("GET", "/api/kernels"),
    ("POST", "/api/kernels"),
    ("GET", "/api/kernels/{id}"),
    ("DELETE", "/api/kernels/{id}"),
    ("POST", "/api/kernels/{id}/interrupt"),
    ("POST", "/api/kernels/{id}/restart"),
    ("GET", "/api/sessions"),
    ("POST", "/api/sessions"),
    ("GET", "/api/sessions/{id}"),
    ("PATCH", "/api/sessions/{id}"),
    ("DELETE", "/api/sessions/{id}"),
    ("GET", "/api/anything/else"),
]


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "token wrong"}, 403), ({"Authorization": "Bearer x"}, 403)],
)
async def test_every_route_refuses_without_the_token(
    gateway: Gateway, headers: dict[str, str], status: int
) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        async with httpx.AsyncClient(base_url=gateway.url, headers=headers) as anonymous:
            for method, path in ROUTES:
                response = await anonymous.request(method, path.format(id=kernel_id), json={})
                assert response.status_code == status, (method, path)
                assert "token" in response.json()["message"]
            wrong = await anonymous.get("/api/kernels", params={"token": "wrong"})
            assert wrong.status_code == 403
        # Nothing was done: the kernel is still there, idle.
        assert (await client.kernel(kernel_id))["execution_state"] == "idle"


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [({}, {}, 401), ({"Authorization": "token nope"}, {}, 403), ({}, {"token": "nope"}, 403)],
)
async def test_the_websocket_refuses_without_the_token(
    gateway: Gateway, headers: dict[str, str], query: dict[str, str], status: int
) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                ws_url(gateway, kernel_id, **query), additional_headers=headers
            ):
                pass
        assert refused.value.response.status_code == status
        assert (await client.kernel(kernel_id))["connections"] == 0


@pytest.mark.parametrize("form", ["token", "Bearer", "query"])
async def test_each_way_jupyter_clients_send_the_token_works(gateway: Gateway, form: str) -> None:
    headers = {} if form == "query" else {"Authorization": f"{form} {gateway.token}"}
    params = {"token": gateway.token} if form == "query" else {}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, params=params) as http:
        response = await http.post("/api/kernels", json={})
        assert response.status_code == 201
        kernel_id = response.json()["id"]
        try:
            query = {"token": gateway.token} if form == "query" else {}
            async with websockets.connect(
                ws_url(gateway, kernel_id, **query), additional_headers=headers
            ) as ws:
                assert ws.protocol.state.name == "OPEN"
        finally:
            assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204


async def test_the_rest_of_the_daemon_keeps_its_own_auth(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert (await http.get("/v1/health")).status_code == 401
        # The Jupyter forms are the gateway's: the daemon's own routes take Bearer only.
        token = {"Authorization": f"token {gateway.token}"}
        assert (await http.get("/v1/health", headers=token)).status_code == 401
        bearer = {"Authorization": f"Bearer {gateway.token}"}
        assert (await http.get("/v1/health", headers=bearer)).status_code == 200


async def test_a_token_in_the_query_string_never_reaches_the_log(
    gateway_process: GatewayProcess,
) -> None:
    """Open WebUI sends ``?token=`` on the WebSocket; the server logs each handshake's URL."""
    gateway = gateway_process.gateway
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        url = ws_url(gateway, kernel_id, token=gateway.token, session_id="webui")
        async with websockets.connect(url) as ws:
            sock = KernelSocket(ws)
            assert (await sock.execute("print('in')")).stdout == "in\n"
        # Refused handshakes are logged too: one whose token the real one begins.
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(gateway, kernel_id, token=gateway.token + "x")):
                pass
        assert refused.value.response.status_code == 403
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            response = await http.get(f"/api/kernels/{kernel_id}", params={"token": gateway.token})
            assert response.status_code == 200
    log = gateway_process.process.log_text()
    # The handshake is logged, its other parameters with it; the token is not.
    assert f"/api/kernels/{kernel_id}/channels?session_id=webui" in log
    assert gateway.token not in log


async def test_a_trailing_slash_is_served_in_place_with_a_token_in_the_query(
    gateway_process: GatewayProcess,
) -> None:
    """No redirect: one would have to carry the token, which is taken out of the URL."""
    gateway = gateway_process.gateway
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        async with httpx.AsyncClient(base_url=gateway.url, params={"token": gateway.token}) as http:
            for path in ("/api/", "/api/kernelspecs/", "/api/sessions/"):
                response = await http.get(path)
                assert response.status_code == 200, (path, response.status_code)
                assert response.json() == (await http.get(path.rstrip("/"))).json()
            listed = await http.get("/api/kernels/")
            assert listed.status_code == 200 and kernel_id in {k["id"] for k in listed.json()}
            one = await http.get(f"/api/kernels/{kernel_id}/")
            assert one.status_code == 200 and one.json()["id"] == kernel_id
            assert (await http.post(f"/api/kernels/{kernel_id}/interrupt/")).status_code == 204
            started = await http.post("/api/kernels/", json={})
            assert started.status_code == 201
            deleted = await http.delete(f"/api/kernels/{started.json()['id']}/")
            assert deleted.status_code == 204
        async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
            assert (await anonymous.get("/api/kernels/")).status_code == 401
        async with websockets.connect(
            ws_url(gateway, kernel_id).replace("/channels", "/channels/")
            + f"?token={gateway.token}"
        ) as ws:
            assert (await KernelSocket(ws).execute("print('in')")).stdout == "in\n"
    assert gateway.token not in gateway_process.process.log_text()
