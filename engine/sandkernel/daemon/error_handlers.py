"""How the daemon answers an exception, wherever it was raised: one place for all of them.

- a class of the tree (:mod:`sandkernel.errors`), or a foreign exception it maps
  (``FOREIGN_ERRORS``), with the status the class carries;
- an invalid body or parameter as ``InvalidRequest``: 400 for malformed JSON, else 422;
- Starlette's own refusals (no such route, wrong method, a body FastAPI could
  not parse, a :class:`~sandkernel.daemon.responses.Refusal`) in the same shape;
- a client gone before its body arrived as a 400 nobody reads, not logged;
- anything else as a logged 500, on a connection that stays open
  (:class:`_InternalErrorAnswered`); a request the server cancels at its
  shutdown's deadline as :class:`~sandkernel.errors.EngineClosed`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandkernel.daemon.responses import Refusal, error_body, error_response
from sandkernel.errors import (
    FOREIGN_ERRORS,
    INTERNAL_ERROR,
    EngineClosed,
    InvalidRequest,
    RequestTooLarge,
    SandkernelError,
    http_status_of,
)

log = logging.getLogger(__name__)


def _validation_details(exc: RequestValidationError) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the JSON itself was malformed, and each failure (without echoing input)."""
    details = []
    malformed = False
    for error in exc.errors():
        malformed = malformed or error.get("type") == "json_invalid"
        where = ".".join(str(part) for part in error.get("loc", ()))
        reason = str(error.get("msg", ""))
        if error.get("type") == "json_invalid":
            reason = f"malformed JSON: {error.get('ctx', {}).get('error', 'cannot be parsed')}"
        details.append({"loc": where, "msg": reason, "type": str(error.get("type", ""))})
    return malformed, details


#: Starlette's own refusals, by status: the ``type`` each is answered with.
_HTTP_ERROR_TYPES: Final = {
    400: InvalidRequest.__name__,  # a form or body FastAPI could not parse
    404: "NotFound",  # no such route
    405: "MethodNotAllowed",
    413: RequestTooLarge.__name__,
}


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of ``path`` answers (Starlette's 405 names one route's only).

    Not HEAD for a GET: FastAPI's routes do not answer it (a 405 of its own).
    """
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    return sorted(methods)


class _InternalErrorAnswered:
    """Answers an exception no handler took with ``answer`` (the logged 500), and ends it there.

    Starlette's outermost layer would answer it as well, then raise it on for
    the server to log; uvicorn, seeing an exception after a response began,
    closes the connection, and a client's next request on it (kept alive)
    fails. An exception after the response began is raised on as before: the
    connection closing is then the only way to say the response is cut short.
    """

    def __init__(
        self, app: ASGIApp, *, answer: Callable[[Request, Exception], Awaitable[Response]]
    ) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            response = await self.answer(Request(scope, receive), exc)
            await response(scope, receive, send)
        except asyncio.CancelledError:
            # Only the server cancels a request's own task: at the deadline of
            # its graceful shutdown. Said in the error shape, as the engine
            # closing; raised on, it would be answered with a bare 500 and a
            # traceback logged for each request still running.
            if started:
                raise
            closed = EngineClosed(
                "the daemon shut down before this request was done (it waits for "
                "requests up to `serve --graceful-timeout` seconds)"
            )
            log.info("%s %s cut short by the shutdown", scope.get("method"), scope.get("path"))
            await error_response(closed.http_status, error_body(closed))(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every exception in the daemon's error shape, with the status its class carries."""

    async def engine_error(request: Request, exc: Exception) -> Response:
        return error_response(http_status_of(exc), error_body(exc))

    async def invalid_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        malformed, details = _validation_details(exc)
        summary = "; ".join(f"{d['loc']}: {d['msg']}" for d in details[:5])
        body = {
            "error": {
                "type": InvalidRequest.__name__,
                "message": f"invalid request: {summary}",
                "details": details,
            }
        }
        return error_response(InvalidRequest.http_status if malformed else 422, body)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc, Refusal):
            return error_response(exc.error.http_status, error_body(exc.error))
        error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError")
        message = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        elif exc.status_code == 405:
            allowed = _allowed_methods(app, request.url.path)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not served at {request.url.path}: use " + ", ".join(
                allowed
            )
        body = {"error": {"type": error_type, "message": message}}
        response = error_response(exc.status_code, body)
        response.headers.update(headers)
        return response

    async def client_gone(request: Request, exc: Exception) -> Response:
        # A route reading its body itself finds the client gone: nobody reads
        # this answer, and nothing went wrong here (as FastAPI's own bodies).
        log.debug("%s %s: the client left before its body arrived", request.method, request.url)
        gone = InvalidRequest("the client went away before its request's body arrived")
        return error_response(gone.http_status, error_body(gone))

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Its details (paths, internals) go to the daemon's log, not to the client.
        incident = secrets.token_hex(4)
        log.error(
            "unexpected error %s on %s %s",
            incident,
            request.method,
            request.url.path,
            exc_info=exc,
        )
        message = f"internal error {incident} ({type(exc).__name__}): the daemon's log has it"
        return error_response(500, {"error": {"type": INTERNAL_ERROR, "message": message}})

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
        SandkernelError: engine_error,
        # Other libraries' errors that cross as a class of the tree (a ValueError).
        **{foreign: engine_error for foreign, _ in FOREIGN_ERRORS},
        RequestValidationError: invalid_request,
        HTTPException: http_error,
        ClientDisconnect: client_gone,
        Exception: internal_error,
    }
    for cls, handler in handlers.items():
        app.add_exception_handler(cls, handler)
    app.add_middleware(_InternalErrorAnswered, answer=internal_error)
