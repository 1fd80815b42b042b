"""The daemon's error shape: what an unexpected failure tells a client, and what it does not."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from sandkernel.daemon.error_handlers import add_error_handlers

pytestmark = pytest.mark.anyio


async def test_an_unexpected_failure_is_a_500_that_keeps_its_details_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise OSError(28, "No space left on device", "/var/lib/sandkernel/store/ab/cdef")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="sandkernel.daemon.error_handlers"):
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon") as client:
            response = await client.get("/boom")
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "/var/lib" not in message and "No space" not in message
    assert "OSError" in message
    # The log has the whole error, under the id the client was given.
    incident = message.split()[2]
    (record,) = [r for r in caplog.records if incident in r.getMessage()]
    assert record.exc_info is not None and "/var/lib/sandkernel" in str(record.exc_info[1])


async def test_an_unexpected_failure_is_answered_on_a_connection_that_serves_the_next_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Answered in full, it is not raised on to the server, which would close the connection."""
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise FileExistsError(17, "File exists")

    @app.get("/port")
    async def port(request: Request) -> int:
        assert request.client is not None
        return request.client.port  # the client's end of the connection

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # connections wait in the backlog until the server accepts them
    host, number = listener.getsockname()
    config = uvicorn.Config(app, lifespan="off", ws="none", log_config=None)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with (
            asyncio.timeout(30),
            httpx.AsyncClient(base_url=f"http://{host}:{number}") as client,
        ):
            before = (await client.get("/port")).json()
            with caplog.at_level(logging.ERROR):
                failed = await client.get("/boom")
            after = (await client.get("/port")).json()
    finally:
        server.should_exit = True
        await serving
        listener.close()
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "InternalError"
    assert "FileExistsError" in failed.json()["error"]["message"]
    assert after == before  # the same connection
    assert "Exception in ASGI application" not in caplog.text
    assert "unexpected error" in caplog.text  # logged once, by the daemon, with its id


async def test_a_405_allows_exactly_the_methods_that_are_answered() -> None:
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/thing")
    async def thing() -> dict[str, str]:
        return {}

    @app.delete("/thing")
    async def drop() -> None:
        return None

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        refused = await client.post("/thing")
        assert refused.status_code == 405
        allowed = [m.strip() for m in refused.headers["allow"].split(",")]
        assert allowed == ["DELETE", "GET"]
        for method in allowed:
            assert (await client.request(method, "/thing")).status_code != 405
        assert (await client.head("/thing")).status_code == 405  # so not in Allow


async def test_a_client_gone_before_its_body_arrived_is_no_error_of_the_daemons(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    add_error_handlers(app)

    @app.post("/body")
    async def body(request: Request) -> int:
        return len(await request.body())

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/body", "raw_path": b"/body", "query_string": b"",
        "root_path": "", "headers": [(b"content-length", b"100")], "client": ("127.0.0.1", 1),
        "server": ("daemon", 80),
    }  # fmt: skip
    arrivals = [
        {"type": "http.request", "body": b"x" * 10, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return arrivals.pop(0) if arrivals else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO):
        await app(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_request_the_server_cancels_at_its_shutdown_is_answered_engine_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    add_error_handlers(app)
    running = asyncio.Event()

    @app.get("/long")
    async def long() -> None:
        running.set()
        await asyncio.Event().wait()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/long", "raw_path": b"/long", "query_string": b"",
        "root_path": "", "headers": [], "client": ("127.0.0.1", 1), "server": ("daemon", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    body_read = False

    async def receive() -> dict[str, object]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO):
        request = asyncio.ensure_future(app(scope, receive, send))  # type: ignore[arg-type]
        await asyncio.wait_for(running.wait(), 10)
        request.cancel()  # what uvicorn does at its graceful shutdown's deadline
        await asyncio.wait_for(request, 10)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert (
        body["error"]["type"] == "EngineClosed" and "graceful-timeout" in body["error"]["message"]
    )
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
