"""The daemon's error shape: what an unexpected failure tells a client, and what it does not."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI

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
