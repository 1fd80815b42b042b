"""The daemon's HTTP API: a FastAPI application over one running :class:`~sandkernel.Engine`.

Resources follow the OpenAI Containers / code-interpreter API where it fits
(a session is a container)::

    POST   /v1/sessions                       get or create a session
    GET    /v1/sessions                       every session the engine knows
    GET    /v1/sessions/{id}                  one session (also an ended one)
    DELETE /v1/sessions/{id}                  close it
    POST   /v1/sessions/{id}/execute          run a cell (?stream=true: Server-Sent Events)
    POST   /v1/sessions/{id}/files            upload into its /mnt/data (multipart)
    GET    /v1/sessions/{id}/files            its files (uploaded and produced)
    POST   /v1/sessions/{id}/attach           copy stored files into /mnt/data
    POST   /v1/sessions/{id}/extend           keep it alive
    POST   /v1/sessions/{id}/interrupt        interrupt the running cell
    POST   /v1/files                          upload (multipart: file, session_id | agent_id)
    GET    /v1/files                          list (?session_id=, ?agent_id=)
    GET    /v1/files/{id}                     metadata
    GET    /v1/files/{id}/content             the bytes, streamed
    DELETE /v1/files/{id}                     delete
    POST   /v1/agents/{id}/files              give stored files to an agent
    GET    /v1/agents/{id}/files              an agent's files
    POST   /v1/run                            one program, statelessly (Engine.run_once)
    POST   /v1/runs                           many programs, results as NDJSON (Engine.run_many)
    POST   /run_code, /run_jupyter            SandboxFusion's API (see sandkernel.daemon.runs)
    GET    /v1/stats                          pool and session figures
    GET    /v1/health                         liveness, version and policy
    GET    /openapi.json                      this API's schema

Every error is ``{"error": {"type": "<exception class>", "message": "..."}}``
with the status its class carries (:mod:`sandkernel.errors`, one registry for
the daemon and its client); 429 and 503 carry ``Retry-After``. Each route
declares the classes it may raise, and its OpenAPI ``responses`` are built
from them (:func:`~sandkernel.daemon.schemas.error_responses`). One-shot runs
are admitted before their bodies are read (:class:`RunAdmissionGate`), or
refused at once with 503. Nothing here
blocks the event loop: the engine does its file and database work in worker
threads, and so do the downloads and the session records here.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import quote

import anyio
from fastapi import FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandkernel import __version__
from sandkernel.api import ServedEngine, SessionAPI
from sandkernel.daemon import sse
from sandkernel.daemon.admission import (
    DEFAULT_MAX_QUEUED_BYTES,
    RETRY_AFTER_S,
    TICKET_SCOPE_KEY,
    RunAdmission,
    default_max_queued_runs,
)
from sandkernel.daemon.records import SessionRecords
from sandkernel.daemon.runs import FUSION_PATHS, RUN_PATHS, add_run_routes, document_run_bodies
from sandkernel.daemon.schemas import (
    ID_PATTERN,
    MAX_TTL_S,
    STREAM_EVENT_SCHEMA,
    CreateSession,
    Deleted,
    Execute,
    Extend,
    Extended,
    FileIds,
    FileList,
    Health,
    PathList,
    SessionList,
    error_responses,
)
from sandkernel.engine import EngineStats
from sandkernel.errors import (
    FOREIGN_ERRORS,
    INTERNAL_ERROR,
    EngineClosed,
    FileError,
    FileLost,
    FileNotFoundInStore,
    FileRejected,
    FileTooLarge,
    HostUnreachable,
    InvalidRequest,
    KernelDead,
    KernelStartFailed,
    PolicyError,
    PoolExhausted,
    RequestTooLarge,
    RunQueueFull,
    SandboxUnavailable,
    SandkernelError,
    SelfCheckFailed,
    SessionClosed,
    SessionExpired,
    SessionLimitReached,
    SessionLost,
    SessionNotFound,
    Unauthorized,
    error_class_of,
    error_type_of,
    http_status_of,
)
from sandkernel.files import StoredFile
from sandkernel.results import ExecutionResult
from sandkernel.session import SessionInfo
from sandkernel.streaming import StreamEvent

log = logging.getLogger(__name__)

DEFAULT_MAX_JSON_BYTES: Final = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES: Final = 600 << 20
_UPLOAD_PATH: Final = re.compile(r"^/v1/(?:sessions/[^/]+/)?files/?$")
_KEEPALIVE_S: Final = 15.0
#: An agent id in a path, checked as the engine checks it.
_AgentId = Annotated[str, Path(pattern=ID_PATTERN, description="the agent's id")]
_DOWNLOAD_CHUNK: Final = 1 << 20

# What the routes may raise, in groups (each route's OpenAPI answers are built from them).
#: A request with a body: malformed or invalid (400/422), or over the size limit.
_BODY: Final = (InvalidRequest, RequestTooLarge)
#: Any call into the engine: it is shutting down, or (on a cluster) a host did not answer.
_ENGINE: Final = (EngineClosed, HostUnreachable)
#: A session by id that is not live.
_SESSION: Final = (SessionNotFound, SessionExpired, SessionClosed, SessionLost)
#: A session that needs a new kernel.
_NEW_KERNEL: Final = (
    SessionLimitReached, PoolExhausted, KernelStartFailed, SelfCheckFailed, SandboxUnavailable,
)  # fmt: skip
#: Stored files by id.
_FILES: Final = (FileNotFoundInStore, FileLost, FileError)
#: An upload the store may refuse.
_UPLOAD: Final = (FileRejected, FileTooLarge, FileError)


def _json(model: BaseModel, status_code: int = 200) -> Response:
    # Serialised once by pydantic; FastAPI passes a Response through untouched.
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def error_body(
    exc: Exception, *, message: str | None = None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type_of(exc), "message": message or str(exc)}
    if details is not None:
        error["details"] = details
    return {"error": error}


def _error_response(status_code: int, body: dict[str, Any]) -> Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status_code in (429, 503) else None
    return Response(
        json.dumps(body), status_code=status_code, media_type="application/json", headers=headers
    )


async def _send_error(
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
        if scope["type"] == "http" and not _over_unix_socket(scope):
            if not (self._authorized(scope) or self._open(scope)):
                await _send_error(
                    send,
                    Unauthorized(
                        "this address needs `Authorization: Bearer <token>` with the daemon's "
                        "token (set by --token or SANDKERNEL_TOKEN when it started)"
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


def _over_unix_socket(scope: Scope) -> bool:
    server = scope.get("server")
    return server is not None and len(server) == 2 and server[1] is None


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
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            setting = "--max-upload-mb" if is_upload else "--max-json-kb"
            await _send_error(
                send,
                RequestTooLarge(
                    f"the request body is {declared} bytes; this daemon accepts at most {limit} "
                    f"bytes here (setting {setting})"
                ),
                [(b"connection", b"close")],
            )
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise Refusal(
                        RequestTooLarge(
                            f"the request body is larger than {limit} bytes, the limit here"
                        )
                    )
            return message

        await self.app(scope, limited_receive, send)


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
        declared = _content_length(scope)
        try:
            ticket = self.admission.admit(declared)
        except RunQueueFull as exc:
            await _error_response(exc.http_status, error_body(exc))(scope, receive, send)
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


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


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


def create_app(
    engine: ServedEngine,
    records: SessionRecords,
    *,
    token: str | None = None,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    fusion_without_token: bool = False,
    max_queued_runs: int | None = None,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
) -> FastAPI:
    """The daemon's application, serving ``engine``.

    Args:
        engine: a started engine; the application never starts or closes it.
        records: the session records, opened (they tell lost sessions from unknown ones).
        token: the bearer token required on TCP connections.
        max_json_bytes: largest JSON request body.
        max_upload_bytes: largest upload request body (multipart overhead included);
            also the limit of the one-shot runs' bodies, which carry files.
        fusion_without_token: serve SandboxFusion's routes to loopback TCP
            clients without a token (everything else still needs one).
        max_queued_runs: one-shot runs admitted and not finished; past it,
            503 with ``Retry-After`` (default: :func:`default_max_queued_runs`
            of the engine's batch workers).
        max_queued_bytes: bytes of request bodies those runs may hold.
    """
    started = time.time()
    # A cluster engine has no local batch workers: its default is then per local CPU.
    batch_workers: int | None = getattr(engine, "batch_workers", None)
    admission = RunAdmission(
        max_runs=default_max_queued_runs(batch_workers)
        if max_queued_runs is None
        else max_queued_runs,
        max_body_bytes=max_queued_bytes,
    )
    app = FastAPI(
        title="sandkernel daemon",
        version=__version__,
        description=(
            "Sandboxed, stateful Python sessions (warm Jupyter kernels in nsjail). "
            'Errors are `{"error": {"type", "message"}}`; streamed execution is '
            "Server-Sent Events (see `sandkernel.daemon.sse`)."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    # Added last = outermost: a request is authenticated, then checked against the
    # size limit (413 says more than 503 would), then admitted, before its body is read.
    app.add_middleware(RunAdmissionGate, admission=admission)
    app.add_middleware(BodyLimit, max_json_bytes=max_json_bytes, max_upload_bytes=max_upload_bytes)
    app.add_middleware(
        TokenAuth, token=token, open_paths=FUSION_PATHS if fusion_without_token else frozenset()
    )
    _add_error_handlers(app)
    _refine_openapi(app, policy=engine.policy.name)

    def lost_or_unknown(session_id: str) -> Exception:
        """The error for an id the engine does not know: lost in a restart (410), or 404."""
        lost = records.lost(session_id)
        return lost if lost is not None else SessionNotFound(f"no session {session_id!r}")

    async def live_session(session_id: str) -> SessionAPI:
        try:
            return await engine.get_session(session_id)
        except SessionNotFound:
            raise lost_or_unknown(session_id) from None

    async def session_info(session_id: str) -> SessionInfo:
        """A session the engine knows, alive or ended."""
        for info in await engine.sessions():
            if info.id == session_id:
                return info
        # Not listed: the engine says why (a cluster's session lost with its node is
        # SessionLost), or the records do (lost in a restart), or it is unknown.
        return await (await live_session(session_id)).info()

    # -- sessions --------------------------------------------------------------------

    @app.post(
        "/v1/sessions",
        response_model=SessionInfo,
        responses=error_responses(
            *_BODY,
            PolicyError,
            SessionExpired,
            SessionClosed,
            SessionLost,
            *_NEW_KERNEL,
            *_ENGINE,
            FileError,
        ),
        tags=["sessions"],
    )
    async def create_session(body: CreateSession) -> Response:
        """Get the session with this id, creating it (a fresh sandboxed kernel) if needed."""
        if body.policy is not None and body.policy != engine.policy.name:
            raise PolicyError(
                f"this daemon runs the policy {engine.policy.name!r}, not {body.policy!r}: "
                f"leave `policy` out, or start a daemon with `sandkernel serve --policy "
                f"{body.policy}` on another socket"
            )
        if body.id is not None and body.if_expired == "raise":
            lost = records.lost(body.id)
            if lost is not None:
                raise lost
        session = await engine.session(body.id, agent_id=body.agent_id, if_expired=body.if_expired)
        if session.id not in records:
            await anyio.to_thread.run_sync(records.record, session.id, session.agent_id)
        if body.ttl_s is not None:
            await session.extend(body.ttl_s)
        return _json(await session.info())

    @app.get(
        "/v1/sessions",
        response_model=SessionList,
        responses=error_responses(EngineClosed),
        tags=["sessions"],
    )
    async def list_sessions() -> Response:
        """Every session the engine knows: active, dead, and recently ended."""
        return _json(SessionList(data=await engine.sessions()))

    @app.get(
        "/v1/sessions/{session_id}",
        response_model=SessionInfo,
        responses=error_responses(SessionNotFound, SessionLost, *_ENGINE),
        tags=["sessions"],
    )
    async def get_session(session_id: str) -> Response:
        """A session's state and times; an ended one too (410 if the daemon restarted since)."""
        return _json(await session_info(session_id))

    @app.delete(
        "/v1/sessions/{session_id}",
        response_model=Deleted,
        responses=error_responses(SessionNotFound, SessionLost, *_ENGINE),
        tags=["sessions"],
    )
    async def close_session(session_id: str) -> Response:
        """Close a session and end its kernel (idempotent for ended sessions)."""
        try:
            await engine.close_session(session_id)
        except SessionNotFound:
            raise lost_or_unknown(session_id) from None
        return _json(Deleted(id=session_id))

    @app.post(
        "/v1/sessions/{session_id}/execute",
        response_model=ExecutionResult,
        responses={
            **error_responses(
                *_BODY,
                *_SESSION,
                KernelDead,
                *_FILES,
                PoolExhausted,
                KernelStartFailed,
                SelfCheckFailed,
                *_ENGINE,
            ),
            200: {
                "description": "the result; with `?stream=true` or `Accept: text/event-stream`, "
                "Server-Sent Events: the outputs as the kernel sends them, then `result` (the "
                "same ExecutionResult) or `error` (see `sandkernel.daemon.sse`)",
                "content": {"text/event-stream": {"itemSchema": STREAM_EVENT_SCHEMA}},
            },
        },
        tags=["sessions"],
    )
    async def execute(
        session_id: str,
        body: Execute,
        request: Request,
        stream: Annotated[bool, Query(description="stream outputs as Server-Sent Events")] = False,
    ) -> Response:
        """Run one cell; user code failing is a result with a status, not an HTTP error."""
        session = await live_session(session_id)
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(
                _stream_run(session, body),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await session.run(
            body.code, timeout_s=body.timeout_s, restart=body.restart, file_ids=body.file_ids
        )
        return _json(result)

    @app.post(
        "/v1/sessions/{session_id}/files",
        response_model=StoredFile,
        responses=error_responses(*_BODY, *_SESSION, *_UPLOAD, *_ENGINE),
        tags=["sessions"],
    )
    async def upload_to_session(
        session_id: str,
        file: Annotated[UploadFile, File(description="the file; its name needs an extension")],
        name: Annotated[str | None, Form(description="a name instead of the file's")] = None,
    ) -> Response:
        """Store a file for this session and copy it into its /mnt/data."""
        try:
            session = await live_session(session_id)
            stored = await session.upload(file.file, _upload_name(file, name))
        finally:
            await file.close()
        return _json(stored)

    @app.get(
        "/v1/sessions/{session_id}/files",
        response_model=FileList,
        responses=error_responses(SessionNotFound, FileError, *_ENGINE),
        tags=["sessions"],
    )
    async def session_files(session_id: str) -> Response:
        """Files uploaded to the session and produced by it (also after it ended or was lost)."""
        if records.lost(session_id) is None:
            await session_info(session_id)  # 404 for an id never seen
        return _json(FileList(data=await engine.list_files(session_id=session_id)))

    @app.post(
        "/v1/sessions/{session_id}/attach",
        response_model=PathList,
        responses=error_responses(*_BODY, *_SESSION, *_FILES, *_ENGINE),
        tags=["sessions"],
    )
    async def attach(session_id: str, body: FileIds) -> Response:
        """Copy stored files into the session's /mnt/data now; answers their paths there."""
        paths = await (await live_session(session_id)).attach(body.file_ids)
        return _json(PathList(data=paths))

    @app.post(
        "/v1/sessions/{session_id}/extend",
        response_model=Extended,
        responses=error_responses(*_BODY, *_SESSION, *_ENGINE),
        tags=["sessions"],
    )
    async def extend(session_id: str, body: Extend) -> Response:
        """Keep the session alive: its TTL counts again from now."""
        session = await live_session(session_id)
        await session.extend(body.ttl_s)
        return _json(Extended(id=session_id, expires_at=(await session.info()).expires_at))

    @app.post(
        "/v1/sessions/{session_id}/interrupt",
        response_model=SessionInfo,
        responses=error_responses(*_SESSION, *_ENGINE),
        tags=["sessions"],
    )
    async def interrupt(session_id: str) -> Response:
        """Interrupt the session's running cell, if any (it ends with KeyboardInterrupt)."""
        session = await live_session(session_id)
        await session.interrupt()
        return _json(await session.info())

    # -- files -------------------------------------------------------------------------

    @app.post(
        "/v1/files",
        response_model=StoredFile,
        responses=error_responses(*_BODY, *_SESSION, *_UPLOAD, *_ENGINE),
        tags=["files"],
    )
    async def upload(
        file: Annotated[UploadFile, File(description="the file; its name needs an extension")],
        name: Annotated[str | None, Form(description="a name instead of the file's")] = None,
        session_id: Annotated[str | None, Form(description="give it to this live session")] = None,
        agent_id: Annotated[
            str | None,
            Form(
                pattern=ID_PATTERN, description="give it to this agent (read-only in its sessions)"
            ),
        ] = None,
        retention_s: Annotated[
            float | None,
            Form(gt=0, le=MAX_TTL_S, description="delete it after this long (at most 30 days)"),
        ] = None,
    ) -> Response:
        """Store a file and get its id; with no owner it can be attached to a session later."""
        try:
            if session_id is not None and agent_id is not None:
                raise ValueError("give session_id or agent_id, not both")
            if session_id is not None:
                await live_session(session_id)
            stored = await engine.upload(
                file.file,
                _upload_name(file, name),
                session_id=session_id,
                agent_id=agent_id,
                retention_s=retention_s,
            )
        finally:
            await file.close()
        return _json(stored)

    @app.get(
        "/v1/files",
        response_model=FileList,
        responses=error_responses(
            InvalidRequest, SessionNotFound, SessionLost, FileError, *_ENGINE
        ),
        tags=["files"],
    )
    async def list_files(
        session_id: Annotated[str | None, Query(description="only this session's")] = None,
        agent_id: Annotated[
            str | None, Query(pattern=ID_PATTERN, description="only this agent's")
        ] = None,
    ) -> Response:
        """Stored files, optionally of one session or one agent."""
        return _json(
            FileList(data=await engine.list_files(session_id=session_id, agent_id=agent_id))
        )

    @app.get(
        "/v1/files/{file_id}",
        response_model=StoredFile,
        responses=error_responses(*_FILES, *_ENGINE),
        tags=["files"],
    )
    async def file_info(file_id: str) -> Response:
        """A stored file's metadata."""
        return _json(await engine.file(file_id))

    @app.get(
        "/v1/files/{file_id}/content",
        responses={
            **error_responses(*_FILES, *_ENGINE),
            200: {
                "description": "the file's bytes, with its MIME type",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
        },
        tags=["files"],
    )
    async def file_content(file_id: str) -> Response:
        """A stored file's bytes, streamed, with its MIME type."""
        stored = await engine.file(file_id)
        return StreamingResponse(
            _read_file(engine, file_id),
            media_type=stored.mime_type,
            headers={
                "Content-Length": str(stored.size_bytes),
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(stored.name)}",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.delete(
        "/v1/files/{file_id}",
        response_model=Deleted,
        responses=error_responses(*_FILES, *_ENGINE),
        tags=["files"],
    )
    async def delete_file(file_id: str) -> Response:
        """Delete a stored file (copies already in workspaces stay there)."""
        await engine.file(file_id)  # 404 for an unknown id, as for the other file routes
        await engine.delete_file(file_id)
        return _json(Deleted(id=file_id))

    # -- agents ------------------------------------------------------------------------

    @app.post(
        "/v1/agents/{agent_id}/files",
        response_model=FileList,
        responses=error_responses(*_BODY, *_FILES, *_ENGINE),
        tags=["agents"],
    )
    async def attach_to_agent(agent_id: _AgentId, body: FileIds) -> Response:
        """Give stored files to an agent: they appear read-only in its sessions, live ones too."""
        return _json(FileList(data=await engine.attach_to_agent(agent_id, body.file_ids)))

    @app.get(
        "/v1/agents/{agent_id}/files",
        response_model=FileList,
        responses=error_responses(InvalidRequest, FileError, *_ENGINE),
        tags=["agents"],
    )
    async def agent_files(agent_id: _AgentId) -> Response:
        """The files every session of this agent sees."""
        return _json(FileList(data=await engine.list_files(agent_id=agent_id)))

    # -- one-shot runs ------------------------------------------------------------------

    # A batch that names no concurrency keeps each worker busy with one run and
    # the next one queued, as the batch pool's own default does.
    add_run_routes(
        app, engine, default_batch_concurrency=2 * (batch_workers or os.cpu_count() or 1)
    )

    # -- reporting -----------------------------------------------------------------------

    @app.get(
        "/v1/stats",
        response_model=EngineStats,
        responses=error_responses(EngineClosed),
        tags=["daemon"],
    )
    async def stats() -> Response:
        """Pool and session figures."""
        return _json(await engine.stats())

    @app.get("/v1/health", response_model=Health, responses=error_responses(), tags=["daemon"])
    async def health() -> Response:
        """The daemon is up: its version, policy and uptime."""
        return _json(
            Health(
                version=__version__,
                policy=engine.policy.name,
                pid=os.getpid(),
                started_at=datetime.fromtimestamp(started, tz=UTC),
                uptime_s=round(time.time() - started, 3),
            )
        )

    return app


def _upload_name(file: UploadFile, name: str | None) -> str:
    chosen = name or file.filename
    if not chosen:
        raise ValueError("the upload has no file name: send one with the file part or `name`")
    return chosen


async def _read_file(engine: ServedEngine, file_id: str) -> AsyncIterator[bytes]:
    # Opened here, on the first chunk, so a response never sent leaves nothing open.
    handle = await anyio.to_thread.run_sync(engine.open_file, file_id)
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, _DOWNLOAD_CHUNK):
            yield chunk
    finally:
        handle.close()


async def _stream_run(session: SessionAPI, body: Execute) -> AsyncIterator[bytes]:
    """Run the cell, yielding each output as an event the moment the kernel sends it.

    The cell's outputs come from the session's own :meth:`stream`; this adds
    the SSE encoding and a keep-alive comment while the cell is quiet. A client
    that goes away closes this generator, which closes the stream: the cell is
    interrupted.
    """
    events = session.stream(
        body.code, timeout_s=body.timeout_s, restart=body.restart, file_ids=body.file_ids
    )
    upcoming: asyncio.Future[StreamEvent] | None = None
    try:
        while True:
            if upcoming is None:
                upcoming = asyncio.ensure_future(anext(events))
            # Waited on without cancelling it: a quiet cell gets keep-alives.
            done, _ = await asyncio.wait({upcoming}, timeout=_KEEPALIVE_S)
            if not done:
                yield sse.KEEPALIVE
                continue
            try:
                event = upcoming.result()
            except Exception as exc:
                if error_class_of(exc) is None:
                    log.exception("session %s: the streamed run failed", session.id)
                yield sse.encode_json(sse.ERROR, {**error_body(exc), "status": http_status_of(exc)})
                return
            upcoming = None
            if isinstance(event, ExecutionResult):
                yield sse.encode(sse.RESULT, event.model_dump_json())
                return
            encoded = sse.output_event(event)
            if encoded is not None:
                yield sse.encode_json(*encoded)
    finally:
        with anyio.CancelScope(shield=True):
            if upcoming is not None and not upcoming.done():
                upcoming.cancel()
                await asyncio.wait({upcoming})
            await events.aclose()  # type: ignore[attr-defined]  # an async generator


def _refine_openapi(app: FastAPI, *, policy: str) -> None:
    """What the generated OpenAPI schema cannot say by itself, added once it is built.

    - ``policy`` of ``POST /v1/sessions`` can only name this daemon's policy;
    - a multipart form field is absent or a string: never ``null``; an upload names
      a session or an agent, not both;
    - the bodies of the one-shot routes, which read them themselves.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["CreateSession"]["properties"]["policy"]["anyOf"] = [
            {"type": "string", "enum": [policy]},
            {"type": "null"},
        ]
        for name, body in components.items():
            if name.startswith("Body_"):  # FastAPI's name for a form's fields
                for field in body.get("properties", {}).values():
                    alternatives = field.pop("anyOf", None)
                    if alternatives is not None:
                        field.update(next(a for a in alternatives if a.get("type") != "null"))
        # `give session_id or agent_id, not both`
        components["Body_upload_v1_files_post"]["not"] = {"required": ["session_id", "agent_id"]}
        document_run_bodies(components)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


#: Starlette's own refusals, by status: the ``type`` each is answered with.
_HTTP_ERROR_TYPES: Final = {
    400: InvalidRequest.__name__,  # a form or body FastAPI could not parse
    404: "NotFound",  # no such route
    405: "MethodNotAllowed",
    413: RequestTooLarge.__name__,
}


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of ``path`` answers (Starlette's 405 names one route's only)."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _add_error_handlers(app: FastAPI) -> None:
    async def engine_error(request: Request, exc: Exception) -> Response:
        return _error_response(http_status_of(exc), error_body(exc))

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
        return _error_response(InvalidRequest.http_status if malformed else 422, body)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc, Refusal):
            return _error_response(exc.error.http_status, error_body(exc.error))
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
        response = _error_response(exc.status_code, body)
        response.headers.update(headers)
        return response

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(
            500, {"error": {"type": INTERNAL_ERROR, "message": f"internal error: {exc!r}"}}
        )

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
        SandkernelError: engine_error,
        # Other libraries' errors that cross as a class of the tree (a ValueError).
        **{foreign: engine_error for foreign, _ in FOREIGN_ERRORS},
        RequestValidationError: invalid_request,
        HTTPException: http_error,
        Exception: internal_error,
    }
    for cls, handler in handlers.items():
        app.add_exception_handler(cls, handler)
