"""The daemon's answers: JSON bodies and the one error shape every route and middleware uses.

Every error is ``{"error": {"type": "<exception class>", "message": "..."}}``
with the status its class carries (:mod:`sandkernel.errors`); 429 and 503
carry ``Retry-After``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

from sandkernel.daemon.admission import RETRY_AFTER_S
from sandkernel.errors import SandkernelError, error_type_of


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as the JSON answer."""
    # Serialised once by pydantic; FastAPI passes a Response through untouched.
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def json_or_gone(model: BaseModel | None) -> Response:
    """``model`` as the JSON answer, or an empty 499 for None: its client went, nobody reads it.

    For a route that gave up its run when the client left (``asgi.unless_gone``).
    """
    return Response(status_code=499) if model is None else json_response(model)


def error_body(
    exc: Exception, *, message: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The body of the answer to ``exc``: its class in the tree and its message."""
    error: dict[str, Any] = {"type": error_type_of(exc), "message": message or str(exc)}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(status_code: int, body: dict[str, Any]) -> Response:
    """An error answer; 429 and 503 say when to retry."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status_code in (429, 503) else None
    return Response(
        json.dumps(body), status_code=status_code, media_type="application/json", headers=headers
    )


async def send_error(
    send: Send, error: SandkernelError, headers: list[tuple[bytes, bytes]]
) -> None:
    """An error answer from an ASGI middleware, before the application saw the request."""
    body = json.dumps(error_body(error)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Refusal(HTTPException):
    """A refusal raised while a body is read (past its size limit, or the run queue's room).

    An HTTPException because FastAPI lets those through its body parsing (it
    answers 400 for anything else); answered as the error it carries.
    """

    def __init__(self, error: SandkernelError) -> None:
        super().__init__(error.http_status, str(error))
        self.error = error
