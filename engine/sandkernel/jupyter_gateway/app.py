"""The Kernel Gateway routes under ``/api``, and the gate that puts them before the daemon.

::

    GET    /api                               version
    GET    /api/kernelspecs                   one spec per shipped policy
    GET    /api/kernelspecs/{name}
    GET    /api/kernels                       the gateway's kernels
    POST   /api/kernels                       {"name"}: a warm sandboxed kernel (201)
    GET    /api/kernels/{id}                  id, name, last_activity, execution_state, connections
    DELETE /api/kernels/{id}                  end it (204)
    POST   /api/kernels/{id}/interrupt        (204)
    POST   /api/kernels/{id}/restart          a fresh sandbox under the same id
    GET    /api/kernels/{id}/channels         WebSocket: Jupyter messages (JSON, or v1 binary)
    GET    /api/sessions, POST /api/sessions, GET/PATCH/DELETE /api/sessions/{id}

Errors are Jupyter Server's ``{"message", "reason"}`` with the status of the
error's class in :mod:`sandkernel.errors`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import unquote_plus

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from sandkernel import __version__
from sandkernel.daemon.asgi import content_length, limit_body, over_unix_socket
from sandkernel.errors import BadInput, RequestTooLarge, SandkernelError, error_type_of
from sandkernel.jupyter_gateway.codec import V1_PROTOCOL
from sandkernel.jupyter_gateway.kernels import GatewayKernels, JupyterSessions
from sandkernel.jupyter_gateway.relay import Connection
from sandkernel.jupyter_gateway.specs import KernelSpecs

log = logging.getLogger(__name__)

#: What ``GET /api`` reports as the Jupyter Server API it speaks.
JUPYTER_SERVER_API: Final = "2.14.0"
_NOT_SERVED: Final = (
    "this daemon serves a Ray cluster, whose kernels the Jupyter gateway cannot reach yet; "
    "serve an embedded engine (sandkernel serve without --ray) for /api/kernels"
)


def is_gateway_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def _error(status: int, message: str, reason: str | None = None) -> JSONResponse:
    return JSONResponse({"message": message, "reason": reason}, status_code=status)


def _error_of(exc: SandkernelError) -> JSONResponse:
    return _error(exc.http_status, str(exc), error_type_of(exc))


Handler = Callable[[Request], Awaitable[Response]]


class _NotServed(Exception):  # noqa: N818 - a signal inside this module, answered 501
    """The engine behind the daemon does not expose its kernels (``serve --ray``)."""


def _answers_errors(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except SandkernelError as exc:
            return _error_of(exc)
        except _NotServed:
            return _error(501, _NOT_SERVED, "NotImplemented")

    wrapped.__name__ = handler.__name__
    return wrapped


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
        raise BadInput("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body


def create_gateway_app(specs: KernelSpecs, kernels: GatewayKernels | None) -> Starlette:
    """The ``/api`` routes over ``kernels`` (``None``: kernel routes answer 501)."""
    sessions = JupyterSessions(kernels) if kernels is not None else None

    def need_kernels() -> GatewayKernels:
        if kernels is None:
            raise _NotServed
        return kernels

    def need_sessions() -> JupyterSessions:
        if sessions is None:
            raise _NotServed
        return sessions

    async def api(request: Request) -> Response:
        return JSONResponse({"version": JUPYTER_SERVER_API, "sandkernel": __version__})

    async def kernelspecs(request: Request) -> Response:
        return JSONResponse(specs.all())

    async def kernelspec(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            return JSONResponse(specs.model(name))
        except KeyError:
            return _error(404, f"Kernel spec {name[:80]} not found", "SessionNotFound")

    async def list_kernels(request: Request) -> Response:
        return JSONResponse([GatewayKernels.model(r) for r in need_kernels().all()])

    async def start_kernel(request: Request) -> Response:
        body = await _json_body(request)
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise BadInput("name must be a string")
        # ``env`` is ignored: a kernel's environment is its policy's, nothing else.
        relay = await need_kernels().start(name)
        return JSONResponse(
            GatewayKernels.model(relay),
            status_code=201,
            headers={"Location": f"/api/kernels/{relay.id}"},
        )

    async def get_kernel(request: Request) -> Response:
        relay = need_kernels().get(request.path_params["kernel_id"])
        return JSONResponse(GatewayKernels.model(relay))

    async def delete_kernel(request: Request) -> Response:
        await need_kernels().delete(request.path_params["kernel_id"])
        return Response(status_code=204)

    async def interrupt_kernel(request: Request) -> Response:
        await need_kernels().get(request.path_params["kernel_id"]).interrupt()
        return Response(status_code=204)

    async def restart_kernel(request: Request) -> Response:
        relay = need_kernels().get(request.path_params["kernel_id"])
        await relay.restart()
        return JSONResponse(GatewayKernels.model(relay))

    async def list_sessions(request: Request) -> Response:
        return JSONResponse(need_sessions().all())

    async def create_session(request: Request) -> Response:
        jupyter = need_sessions()
        session = await jupyter.create(await _json_body(request))
        return JSONResponse(
            jupyter.model(session),
            status_code=201,
            headers={"Location": f"/api/sessions/{session.id}"},
        )

    async def get_session(request: Request) -> Response:
        jupyter = need_sessions()
        return JSONResponse(jupyter.model(jupyter.get(request.path_params["session_id"])))

    async def update_session(request: Request) -> Response:
        jupyter = need_sessions()
        session_id = request.path_params["session_id"]
        session = await jupyter.update(session_id, await _json_body(request))
        return JSONResponse(jupyter.model(session))

    async def delete_session(request: Request) -> Response:
        await need_sessions().delete(request.path_params["session_id"])
        return Response(status_code=204)

    async def channels(websocket: WebSocket) -> None:
        if kernels is None:
            await websocket.send_denial_response(_error(501, _NOT_SERVED))
            return
        try:
            relay = kernels.get(websocket.path_params["kernel_id"])
        except SandkernelError as exc:
            await websocket.send_denial_response(_error_of(exc))
            return
        # The v1 binary protocol if the client offers it; otherwise (or when a
        # client offers only others) no subprotocol: the JSON protocol, which
        # every Jupyter client falls back to.
        protocol = V1_PROTOCOL if V1_PROTOCOL in websocket.scope.get("subprotocols", ()) else None
        await websocket.accept(subprotocol=protocol)
        session_id = websocket.query_params.get("session_id")
        connection = Connection(websocket, protocol, session_id)
        relay.connect(connection)
        writer = asyncio.ensure_future(connection.write_loop())
        receiving: asyncio.Future[Message] | None = None
        try:
            while True:
                # The writer ends once the relay closed the connection (or the client
                # is gone): then so does this handler, whatever the client sends.
                receiving = asyncio.ensure_future(websocket.receive())
                await asyncio.wait({receiving, writer}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    break
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    break
                frame = message.get("text")
                if frame is None:
                    frame = message.get("bytes")
                if frame is None:
                    continue
                try:
                    await relay.from_client(connection, frame)
                except BadInput as exc:
                    # Debug only: a client sending garbage must not flood the log.
                    log.debug("kernel %s: dropped a client's message: %s", relay.id, exc)
                except Exception:  # noqa: BLE001 - one bad message never ends the daemon
                    log.exception("kernel %s: relaying a client's message failed", relay.id)
        except WebSocketDisconnect:
            pass
        finally:
            if receiving is not None:
                receiving.cancel()
            relay.disconnect(connection)
            await writer

    routes = [
        Route("/api", _answers_errors(api), methods=["GET"]),
        Route("/api/kernelspecs", _answers_errors(kernelspecs), methods=["GET"]),
        Route("/api/kernelspecs/{name}", _answers_errors(kernelspec), methods=["GET"]),
        Route("/api/kernels", _answers_errors(list_kernels), methods=["GET"]),
        Route("/api/kernels", _answers_errors(start_kernel), methods=["POST"]),
        Route("/api/kernels/{kernel_id}", _answers_errors(get_kernel), methods=["GET"]),
        Route("/api/kernels/{kernel_id}", _answers_errors(delete_kernel), methods=["DELETE"]),
        Route(
            "/api/kernels/{kernel_id}/interrupt",
            _answers_errors(interrupt_kernel),
            methods=["POST"],
        ),
        Route(
            "/api/kernels/{kernel_id}/restart", _answers_errors(restart_kernel), methods=["POST"]
        ),
        WebSocketRoute("/api/kernels/{kernel_id}/channels", channels),
        Route("/api/sessions", _answers_errors(list_sessions), methods=["GET"]),
        Route("/api/sessions", _answers_errors(create_session), methods=["POST"]),
        Route("/api/sessions/{session_id}", _answers_errors(get_session), methods=["GET"]),
        Route("/api/sessions/{session_id}", _answers_errors(update_session), methods=["PATCH"]),
        Route("/api/sessions/{session_id}", _answers_errors(delete_session), methods=["DELETE"]),
    ]
    # No route, or not this method: in Jupyter's shape too (Starlette's default is text).
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = HTTPStatus(exc.status_code).phrase
    message = f"{reason}: {request.method} {request.url.path}"
    response = _error(exc.status_code, message, reason)
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


class JupyterGate:
    """Routes ``/api`` (HTTP and WebSocket) to the gateway, authenticated; the rest to ``app``.

    Over TCP a request must carry the daemon's token as Jupyter clients send
    it: ``Authorization: token T``, ``Authorization: Bearer T`` or ``?token=T``;
    none is 401, a wrong one 403. Over the Unix socket, as everywhere on the
    daemon, the socket's mode is the access control. A ``token`` query
    parameter is taken out of the request before anything answers it: the
    server logs the URL of every WebSocket handshake (and of every request,
    with ``--access-log``). A path's trailing slash is ignored (``/api/kernels/``
    is ``/api/kernels``), never redirected.

    Args:
        app: the daemon's application (every other path goes there).
        gateway_app: :func:`create_gateway_app`'s.
        token: the daemon's token (``None``: TCP is refused here).
        max_json_bytes: largest request body.
    """

    def __init__(
        self, app: ASGIApp, gateway_app: ASGIApp, *, token: str | None, max_json_bytes: int
    ) -> None:
        self.app = app
        self.gateway_app = gateway_app
        self._token = token.encode() if token else None
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not is_gateway_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        _drop_trailing_slash(scope)
        query_token = _take_query_token(scope)
        if scope["type"] == "websocket":
            # The handshake's first event; the answer (refusal or upgrade) follows it.
            connect = await receive()
            if connect["type"] != "websocket.connect":
                return
            receive = _replay(connect, receive)
        if not over_unix_socket(scope):
            given = self._given_token(scope, query_token)
            if given is None or not self._is_token(given, from_query=given is query_token):
                status = 401 if given is None else 403
                message = (
                    "this address needs the daemon's token: `Authorization: token <token>`, "
                    "`Authorization: Bearer <token>` or `?token=<token>` (--token, "
                    "--token-file or SANDKERNEL_TOKEN when it started)"
                    if given is None
                    else "the token is not the daemon's"
                )
                await _refuse(scope, send, status, message)
                return
        if scope["type"] == "http":
            declared = content_length(scope)
            limit = self.max_json_bytes
            if declared is not None and declared > limit:
                too_large = RequestTooLarge(
                    f"the request body is {declared} bytes; at most {limit} (setting --max-json-kb)"
                )
                await _error_of(too_large)(scope, receive, send)
                return

            def too_large_error() -> Exception:
                return RequestTooLarge(f"the request body is larger than {limit} bytes")

            receive = limit_body(receive, limit, too_large_error)
        await self.gateway_app(scope, receive, send)

    def _is_token(self, given: bytes, *, from_query: bool) -> bool:
        if self._token is None:
            return False
        if hmac.compare_digest(given, self._token):
            return True
        # A query string decodes '+' as a space, and a base64 token put in a
        # URL as it is (Open WebUI builds its kernel WebSocket URL as
        # `?token={token}`) arrives with spaces where it had '+'.
        return from_query and hmac.compare_digest(given.replace(b" ", b"+"), self._token)

    @staticmethod
    def _given_token(scope: Scope, query_token: bytes | None) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() in (b"token", b"bearer"):
                    return bytes(rest).strip()
        return query_token


def _drop_trailing_slash(scope: Scope) -> None:
    """Route ``/api/kernels/`` as ``/api/kernels``, in place: never a redirect.

    Jupyter clients may add a trailing slash, which Jupyter Server redirects
    away. A redirect from here would be built after the ``token`` query
    parameter has been taken out of the scope: the client would follow it
    without its token, and be refused.
    """
    path: str = scope["path"]
    if len(path) > 1 and path.endswith("/"):
        scope["path"] = path.rstrip("/")
        raw = scope.get("raw_path")
        if raw:
            scope["raw_path"] = bytes(raw).rstrip(b"/")


def _take_query_token(scope: Scope) -> bytes | None:
    """The ``token`` query parameter, removed from ``scope`` in place; the rest kept as sent.

    In place, not in a copy for the routes: the server logs the handshake's
    URL (and, with its access log, each request's) from this same scope.
    """
    raw = bytes(scope.get("query_string", b""))
    if not raw:
        return None
    token: bytes | None = None
    kept = []
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        if unquote_plus(name.decode("latin-1")) != "token":
            kept.append(pair)
        elif token is None and value:  # the first one given, as parse_qs takes it
            token = unquote_plus(value.decode("latin-1")).encode()
    scope["query_string"] = b"&".join(kept)
    return token


def _replay(first: Message, receive: Receive) -> Receive:
    pending: list[Message] = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    body = json.dumps({"message": message, "reason": "Unauthorized"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'token realm="sandkernel"'),
    ]
    prefix = "websocket.http.response" if scope["type"] == "websocket" else "http.response"
    await send({"type": f"{prefix}.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.body", "body": body})
