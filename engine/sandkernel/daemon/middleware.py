"""What every request passes before a route sees it: token, body size, run admission.

::

    TokenAuth         a bearer token on TCP (the Unix socket's 0600 mode is its access control)
    BodyLimit         413 past the body size limit, before or while the body is read
    RunAdmissionGate  a one-shot run admitted before its body is read, or 503 at once

:func:`add_middleware` installs them in that order, outermost first. Their
refusals have the daemon's error shape (:mod:`sandkernel.daemon.responses`).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Final

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandkernel.daemon.admission import TICKET_SCOPE_KEY, RunAdmission
from sandkernel.daemon.asgi import content_length, limit_body, over_unix_socket
from sandkernel.daemon.responses import Refusal, error_body, error_response, send_error
from sandkernel.daemon.routes.runs import RUN_PATHS
from sandkernel.errors import RequestTooLarge, RunQueueFull, Unauthorized

DEFAULT_MAX_JSON_BYTES: Final = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES: Final = 600 << 20
_UPLOAD_PATH: Final = re.compile(r"^/v1/(?:sessions/[^/]+/)?files/?$")


def add_middleware(
    app: FastAPI,
    *,
    token: str | None,
    open_paths: frozenset[str],
    max_json_bytes: int,
    max_upload_bytes: int,
    admission: RunAdmission,
) -> None:
    """Authenticate, then limit the body, then admit one-shot runs (see the classes)."""
    # Added last = outermost: a request is authenticated, then checked against the
    # size limit (413 says more than 503 would), then admitted, before its body is read.
    app.add_middleware(RunAdmissionGate, admission=admission)
    app.add_middleware(BodyLimit, max_json_bytes=max_json_bytes, max_upload_bytes=max_upload_bytes)
    app.add_middleware(TokenAuth, token=token, open_paths=open_paths)


class TokenAuth:
    """Requires ``Authorization: Bearer <token>`` on every request that did not come
    over the Unix socket (whose 0600 mode is its access control).

    A connection counts as Unix-socket only when the server address has no port,
    as uvicorn reports for ``AF_UNIX``; anything else must authenticate, except,
    when ``open_paths`` is given, requests for those paths from a loopback
    client to a loopback address (SandboxFusion's clients send no token).
    """

    def __init__(
        self, app: ASGIApp, *, token: str | None, open_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self._open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not over_unix_socket(scope):
            if not (self._authorized(scope) or self._open(scope)):
                await send_error(
                    send,
                    Unauthorized(
                        "this address needs `Authorization: Bearer <token>` with the daemon's "
                        "token (set by --token, --token-file or SANDKERNEL_TOKEN when it started)"
                    ),
                    [(b"www-authenticate", b'Bearer realm="sandkernel"')],
                )
                return
        await self.app(scope, receive, send)

    def _open(self, scope: Scope) -> bool:
        if scope.get("path") not in self._open_paths:
            return False
        client, server = scope.get("client"), scope.get("server")
        return bool(client and server and _loopback(client[0]) and _loopback(server[0]))

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return False
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(given.strip(), self._token)
        return False


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """Caps request bodies: ``max_upload_bytes`` for uploads, ``max_json_bytes`` elsewhere.

    A declared Content-Length over the cap is refused before the body is read; a
    body that grows past it (chunked) is cut off with the same 413. Written here
    rather than taken from Starlette so the refusal has the daemon's error shape.
    """

    def __init__(self, app: ASGIApp, *, max_json_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["method"] == "POST" and (
            _UPLOAD_PATH.match(scope["path"]) is not None or scope["path"] in RUN_PATHS
        )
        limit = self.max_upload_bytes if is_upload else self.max_json_bytes
        declared = content_length(scope)
        if declared is not None and declared > limit:
            setting = "--max-upload-mb" if is_upload else "--max-json-kb"
            await send_error(
                send,
                RequestTooLarge(
                    f"the request body is {declared} bytes; this daemon accepts at most {limit} "
                    f"bytes here (setting {setting})"
                ),
                [(b"connection", b"close")],
            )
            return

        def too_large() -> Exception:
            return Refusal(
                RequestTooLarge(f"the request body is larger than {limit} bytes, the limit here")
            )

        await self.app(scope, limit_body(receive, limit, too_large), send)


class RunAdmissionGate:
    """Admits each one-shot run request before its body is read, or refuses it at once.

    The refusal is a 503 with ``Retry-After`` and a ``RunQueueFull`` error. It
    leaves the connection open: the server discards the unread body, and the
    client's retry reuses the connection instead of opening another. An
    admitted request's :class:`~sandkernel.daemon.admission.RunTicket` is in
    the scope (``/v1/runs`` takes more slots with it). It is released just
    before the last part of the response is sent, its runs being over then
    (streamed results too), so a client that has its answer finds the place
    free for its next request; or, if no response completes (the client left,
    an error), when the application returns.
    """

    def __init__(self, app: ASGIApp, *, admission: RunAdmission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in RUN_PATHS:
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        try:
            ticket = self.admission.admit(declared)
        except RunQueueFull as exc:
            await error_response(exc.http_status, error_body(exc))(scope, receive, send)
            return
        counted = receive
        if declared is None:
            # A chunked body: its bytes are counted as they arrive.
            async def counted_receive() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    try:
                        ticket.hold_body_bytes(len(message.get("body", b"")))
                    except RunQueueFull as exc:
                        raise Refusal(exc) from None
                return message

            counted = counted_receive

        async def send_then_release(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ticket.release()
            await send(message)

        scope[TICKET_SCOPE_KEY] = ticket
        try:
            await self.app(scope, counted, send_then_release)
        finally:
            ticket.release()
