"""The REST API's shapes, as Jupyter Server and Kernel Gateway answer them, on real kernels."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from sandkernel.errors import SessionNotFound
from sandkernel.jupyter_gateway.kernels import GatewayKernels, JupyterSessions
from sandkernel.jupyter_gateway.relay import KernelRelay
from tests.jupyter_gateway._support import Gateway, GatewayClient, execute_request, is_status

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

_ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def _is_kernel_model(model: dict[str, Any]) -> None:
    assert set(model) == {"id", "name", "last_activity", "execution_state", "connections"}
    assert _ISO_UTC.match(model["last_activity"])
    assert isinstance(model["connections"], int)


async def test_api_and_kernelspecs(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        api = (await client.http.get("/api")).json()
        assert isinstance(api["version"], str)
        specs = (await client.http.get("/api/kernelspecs")).json()
        assert specs["default"] == "sandkernel-default"
        assert {"sandkernel-default", "sandkernel-strict", "sandkernel-networked"} <= set(
            specs["kernelspecs"]
        )
        one = (await client.http.get("/api/kernelspecs/sandkernel-strict")).json()
        assert one == specs["kernelspecs"]["sandkernel-strict"]
        assert one["spec"]["metadata"]["sandkernel"]["limits"]["wall_timeout_s"] > 0
        missing = await client.http.get("/api/kernelspecs/nope")
        assert missing.status_code == 404
        assert set(missing.json()) == {"message", "reason"}


async def test_start_get_list_delete_a_kernel(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        response = await client.http.post(
            "/api/kernels", json={"name": "sandkernel-default", "env": {"LD_PRELOAD": "/x.so"}}
        )
        assert response.status_code == 201
        model = response.json()
        _is_kernel_model(model)
        kernel_id = model["id"]
        assert response.headers["location"] == f"/api/kernels/{kernel_id}"
        assert model["name"] == "sandkernel-default"
        assert model["execution_state"] == "idle"
        assert model["connections"] == 0
        assert kernel_id in [k["id"] for k in (await client.http.get("/api/kernels")).json()]
        sock = await client.connect(kernel_id)
        # The env a client sent is not the kernel's: only the policy's reaches it.
        cell = await sock.execute("import os; print(os.environ.get('LD_PRELOAD'))")
        assert cell.stdout == "None\n"
        fetched = await client.kernel(kernel_id)
        _is_kernel_model(fetched)
        assert fetched["connections"] == 1
        assert fetched["last_activity"] >= model["last_activity"]
        assert (await client.http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        assert (await client.http.get(f"/api/kernels/{kernel_id}")).status_code == 404
        assert kernel_id not in [k["id"] for k in (await client.http.get("/api/kernels")).json()]
        # Its connection is closed with it.
        async with asyncio.timeout(10):
            await sock.ws.wait_closed()


async def test_the_kernel_is_a_sandkernel_session(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        bearer = {"Authorization": f"Bearer {gateway.token}"}
        session = (await client.http.get(f"/v1/sessions/{kernel_id}", headers=bearer)).json()
        assert session["state"] == "active"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"name": "sandkernel-strict"}, 400, "sandkernel serve --policy strict"),
        ({"name": "ruby"}, 400, "no kernel spec"),
        ({"name": 3}, 400, "string"),
    ],
)
async def test_a_kernel_the_daemon_does_not_serve_is_refused(
    gateway: Gateway, body: dict[str, Any], status: int, says: str
) -> None:
    async with GatewayClient(gateway) as client:
        response = await client.http.post("/api/kernels", json=body)
        assert response.status_code == status
        assert says in response.json()["message"]


async def test_python3_and_no_name_start_the_served_spec(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        for body in ({"name": "python3"}, {}):
            response = await client.http.post("/api/kernels", json=body)
            assert response.status_code == 201
            assert response.json()["name"] == "sandkernel-default"
            await client.http.delete(f"/api/kernels/{response.json()['id']}")


async def test_unknown_kernel_ids_are_404_on_every_kernel_route(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        for method, path in [
            ("GET", "/api/kernels/nope"),
            ("DELETE", "/api/kernels/nope"),
            ("POST", "/api/kernels/nope/interrupt"),
            ("POST", "/api/kernels/nope/restart"),
            ("GET", "/api/sessions/nope"),
            ("PATCH", "/api/sessions/nope"),
            ("DELETE", "/api/sessions/nope"),
        ]:
            response = await client.http.request(method, path)
            assert response.status_code == 404, (method, path)
            assert set(response.json()) == {"message", "reason"}


async def test_unknown_routes_and_methods_answer_in_jupyters_error_shape(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        for method, path, status in [
            ("GET", "/api/nothing", 404),
            ("GET", "/api/kernels/x/y", 404),
            ("PUT", "/api/kernels", 405),
        ]:
            response = await client.http.request(method, path)
            assert response.status_code == status, (method, path)
            body = response.json()
            assert set(body) == {"message", "reason"} and path in body["message"], body
        assert "GET" in response.headers["allow"]  # the 405 still says what is allowed


async def test_restart_is_a_fresh_sandbox_under_the_same_id(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        assert (
            await sock.execute("x = 5; open('/mnt/data/kept.txt', 'w').write('k')")
        ).status == "ok"
        response = await client.http.post(f"/api/kernels/{kernel_id}/restart")
        assert response.status_code == 200
        assert response.json()["id"] == kernel_id
        # What a fresh kernel publishes, not "restarting": Jupyter Server sends that
        # only after a kernel died and was restarted automatically, and JupyterLab
        # then tells its user the kernel died.
        await sock.until(is_status("starting"), timeout_s=5)
        await sock.until(is_status("idle"), timeout_s=5)
        assert not any(is_status("restarting")(m) for m in sock.seen)
        # The same WebSocket now reaches the fresh kernel: its variables are gone.
        cell = await sock.execute("print('x' in globals())")
        assert cell.stdout == "False\n"
        assert (await client.kernel(kernel_id))["execution_state"] == "idle"
        # Files the old sandbox produced stay in the store, under the kernel's id.
        bearer = {"Authorization": f"Bearer {gateway.token}"}
        files = (await client.http.get(f"/v1/sessions/{kernel_id}/files", headers=bearer)).json()
        assert "kept.txt" in [f["name"] for f in files["data"]]


async def test_sessions_crud_as_jupyter_server_defines_it(gateway: Gateway) -> None:
    async with GatewayClient(gateway) as client:
        created = await client.http.post(
            "/api/sessions",
            json={
                "path": "a.ipynb",
                "name": "a",
                "type": "notebook",
                "kernel": {"name": "python3"},
            },
        )
        assert created.status_code == 201
        session = created.json()
        assert set(session) >= {"id", "path", "name", "type", "kernel"}
        assert session["path"] == "a.ipynb"
        assert session["type"] == "notebook"
        assert session["kernel"]["name"] == "sandkernel-default"
        kernel_id = session["kernel"]["id"]
        client._kernels.append(kernel_id)
        again = await client.http.post("/api/sessions", json={"path": "a.ipynb"})
        assert again.json()["id"] == session["id"]
        listed = (await client.http.get("/api/sessions")).json()
        assert [s["id"] for s in listed] == [session["id"]]
        fetched = (await client.http.get(f"/api/sessions/{session['id']}")).json()
        assert fetched["kernel"]["id"] == kernel_id
        renamed = await client.http.patch(
            f"/api/sessions/{session['id']}", json={"path": "b.ipynb", "name": "b"}
        )
        assert renamed.status_code == 200
        assert (renamed.json()["path"], renamed.json()["name"]) == ("b.ipynb", "b")
        assert renamed.json()["kernel"]["id"] == kernel_id
        # A kernel with neither id nor name changes nothing (Jupyter Server's reading);
        # a refused part leaves every other part as it was.
        kept = await client.http.patch(f"/api/sessions/{session['id']}", json={"kernel": {}})
        assert kept.status_code == 200 and kept.json()["kernel"]["id"] == kernel_id
        refused = await client.http.patch(
            f"/api/sessions/{session['id']}",
            json={"path": "c.ipynb", "kernel": {"name": 7}},
        )
        assert refused.status_code == 400
        unknown = await client.http.patch(
            f"/api/sessions/{session['id']}", json={"kernel": {"id": "no-such-kernel"}}
        )
        assert unknown.status_code == 400 and "No such kernel" in unknown.json()["message"]
        fetched = (await client.http.get(f"/api/sessions/{session['id']}")).json()
        assert (fetched["path"], fetched["kernel"]["id"]) == ("b.ipynb", kernel_id)
        # A session on an existing kernel, by id.
        other = await client.http.post(
            "/api/sessions", json={"path": "c.py", "type": "console", "kernel": {"id": kernel_id}}
        )
        assert other.json()["kernel"]["id"] == kernel_id
        assert (await client.http.delete(f"/api/sessions/{session['id']}")).status_code == 204
        # The kernel stays while another session uses it, and goes with the last one.
        assert (await client.http.get(f"/api/kernels/{kernel_id}")).status_code == 200
        assert (await client.http.delete(f"/api/sessions/{other.json()['id']}")).status_code == 204
        assert (await client.http.get(f"/api/kernels/{kernel_id}")).status_code == 404
        assert (await client.http.get("/api/sessions")).json() == []
        bad = await client.http.post("/api/sessions", json={"kernel": {"name": "python3"}})
        assert bad.status_code == 400
        named = {"path": "d.ipynb", "name": 5, "kernel": {"name": "python3"}}
        refused = await client.http.post("/api/sessions", json=named)
        assert refused.status_code == 400 and "must be strings" in refused.json()["message"]
        assert (await client.http.get("/api/kernels")).json() == []  # none started for it


async def test_max_sessions_holds_for_gateway_kernels(gateway_factory: Any) -> None:
    process = gateway_factory(pool_size=1, extra=["--max-sessions", "1"])
    async with GatewayClient(process.gateway) as client:
        await client.start_kernel()
        refused = await client.http.post("/api/kernels", json={})
        assert refused.status_code == 429
        assert "max_sessions" in refused.json()["message"]
        assert refused.json()["reason"] == "SessionLimitReached"


async def test_the_unix_socket_needs_no_token(gateway_process: Any) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(gateway_process.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://sandkernel") as raw:
        assert (await raw.get("/api/kernelspecs")).status_code == 200


async def test_a_restarted_kernel_finds_the_files_its_sandbox_had(gateway: Gateway) -> None:
    """As on a Jupyter server's disk: a restart (also after a death) keeps /mnt/data."""
    async with GatewayClient(gateway) as client:
        kernel_id = await client.start_kernel()
        sock = await client.connect(kernel_id)
        wrote = await sock.execute(
            "import os\nos.makedirs('/mnt/data/cache', exist_ok=True)\n"
            "open('/mnt/data/cache/table.csv', 'w').write('a,b\\n1,2\\n')\n"
            "open('/mnt/data/notes.txt', 'w').write('first')\n"
            "open('/mnt/data/notes.txt', 'w').write('second')\nx = 1"
        )
        assert wrote.status == "ok", wrote.reply
        read = (
            "print(open('/mnt/data/cache/table.csv').read() + open('/mnt/data/notes.txt').read())"
        )
        assert (await client.http.post(f"/api/kernels/{kernel_id}/restart")).status_code == 200
        await sock.until(is_status("idle"), timeout_s=30)
        after = await sock.execute(read + "\nprint('x' in globals())")
        assert after.stdout == "a,b\n1,2\nsecond\nFalse\n", after.reply
        # A kernel that died (here killed by its own code) comes back with them too.
        await sock.send(execute_request("import os, signal\nos.kill(os.getpid(), 9)"))
        await sock.until(is_status("dead"), timeout_s=30)
        assert (await client.http.post(f"/api/kernels/{kernel_id}/restart")).status_code == 200
        assert (await sock.execute(read)).stdout == "a,b\n1,2\nsecond\n"


@pytest.mark.parametrize("path", ["/api/kernels", "/api/sessions"])
async def test_a_body_nested_too_deep_to_parse_is_a_bad_input(gateway: Gateway, path: str) -> None:
    async with GatewayClient(gateway) as client:
        response = await client.http.post(
            path, content=b"[" * 200_000, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json() == {"message": "the body is not JSON", "reason": "BadInput"}


class _StartingKernels:
    """GatewayKernels as JupyterSessions uses it, each start held until ``go`` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started: list[str] = []
        self.live: dict[str, KernelRelay] = {}

    async def start(self, name: str | None) -> KernelRelay:
        kernel_id = f"k{len(self.started)}"
        self.started.append(kernel_id)
        await self.go.wait()
        relay = cast(KernelRelay, SimpleNamespace(id=kernel_id))
        self.live[kernel_id] = relay
        return relay

    def get(self, kernel_id: str) -> KernelRelay:
        if kernel_id not in self.live:
            raise SessionNotFound(kernel_id)
        return self.live[kernel_id]

    def all(self) -> list[KernelRelay]:
        return list(self.live.values())

    async def delete(self, kernel_id: str) -> None:
        self.get(kernel_id)
        del self.live[kernel_id]


async def test_two_requests_for_one_path_at_once_make_one_session_and_one_kernel() -> None:
    kernels = _StartingKernels()
    sessions = JupyterSessions(cast(GatewayKernels, kernels))
    body = {"path": "a.ipynb", "kernel": {"name": "python3"}}
    first = asyncio.ensure_future(sessions.create(body))
    second = asyncio.ensure_future(sessions.create(body))
    await asyncio.sleep(0)  # both are in, the first starting its kernel
    kernels.go.set()
    async with asyncio.timeout(10):
        one, other = await asyncio.gather(first, second)
    assert one is other and kernels.started == ["k0"]


async def test_a_session_deleted_while_its_new_kernel_starts_leaves_no_kernel() -> None:
    kernels = _StartingKernels()
    sessions = JupyterSessions(cast(GatewayKernels, kernels))
    kernels.go.set()
    session = await sessions.create({"path": "a.ipynb", "kernel": {"name": "python3"}})
    kernels.go.clear()
    change = asyncio.ensure_future(sessions.update(session.id, {"kernel": {"name": "python3"}}))
    await asyncio.sleep(0)  # its new kernel is starting
    await sessions.delete(session.id)
    kernels.go.set()
    with pytest.raises(SessionNotFound):
        async with asyncio.timeout(10):
            await change
    assert kernels.started == ["k0", "k1"] and kernels.live == {}
