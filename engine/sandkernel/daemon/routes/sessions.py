"""Session routes: a session is a container, as in the OpenAI Containers API.

::

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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Final

import anyio
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from sandkernel.api import ServedEngine, SessionAPI
from sandkernel.daemon import sse
from sandkernel.daemon.asgi import unless_gone
from sandkernel.daemon.responses import error_body, json_or_gone, json_response
from sandkernel.daemon.routes.files import upload_name
from sandkernel.daemon.routes.lookup import SessionLookup
from sandkernel.daemon.routes.raises import BODY, ENGINE, FILES, NEW_KERNEL, SESSION, UPLOAD
from sandkernel.daemon.schemas import (
    STREAM_EVENT_SCHEMA,
    CreateSession,
    Deleted,
    Execute,
    Extend,
    Extended,
    FileIds,
    FileList,
    PathList,
    SessionList,
    error_responses,
)
from sandkernel.errors import (
    EngineClosed,
    FileError,
    KernelDead,
    KernelStartFailed,
    PolicyError,
    PoolExhausted,
    SelfCheckFailed,
    SessionClosed,
    SessionExpired,
    SessionLost,
    SessionNotFound,
    error_class_of,
    http_status_of,
)
from sandkernel.files import StoredFile
from sandkernel.results import ExecutionResult
from sandkernel.session import SessionInfo
from sandkernel.streaming import StreamEvent

log = logging.getLogger(__name__)

_KEEPALIVE_S: Final = 15.0


def add_session_routes(app: FastAPI, engine: ServedEngine, lookup: SessionLookup) -> None:
    """Add the session routes; ``lookup`` finds sessions by id and records new ones."""
    records = lookup.records

    @app.post(
        "/v1/sessions",
        response_model=SessionInfo,
        responses=error_responses(
            *BODY,
            PolicyError,
            SessionExpired,
            SessionClosed,
            SessionLost,
            *NEW_KERNEL,
            *ENGINE,
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
            lost = lookup.lost(body.id)
            if lost is not None:
                raise lost
        session = await engine.session(body.id, agent_id=body.agent_id, if_expired=body.if_expired)
        if session.id not in records:
            await anyio.to_thread.run_sync(records.record, session.id, session.agent_id)
        if body.ttl_s is not None:
            await session.extend(body.ttl_s)
        return json_response(await session.info())

    @app.get(
        "/v1/sessions",
        response_model=SessionList,
        responses=error_responses(EngineClosed),
        tags=["sessions"],
    )
    async def list_sessions() -> Response:
        """Every session the engine knows: active, dead, and recently ended."""
        return json_response(SessionList(data=await engine.sessions()))

    @app.get(
        "/v1/sessions/{session_id}",
        response_model=SessionInfo,
        responses=error_responses(SessionNotFound, SessionLost, *ENGINE),
        tags=["sessions"],
    )
    async def get_session(session_id: str) -> Response:
        """A session's state and times; an ended one too (410 if the daemon restarted since)."""
        return json_response(await lookup.info(session_id))

    @app.delete(
        "/v1/sessions/{session_id}",
        response_model=Deleted,
        responses=error_responses(SessionNotFound, SessionLost, *ENGINE),
        tags=["sessions"],
    )
    async def close_session(session_id: str) -> Response:
        """Close a session and end its kernel (idempotent for ended sessions)."""
        try:
            await engine.close_session(session_id)
        except SessionNotFound:
            raise lookup.lost_or_unknown(session_id) from None
        return json_response(Deleted(id=session_id))

    @app.post(
        "/v1/sessions/{session_id}/execute",
        response_model=ExecutionResult,
        responses={
            **error_responses(
                *BODY,
                *SESSION,
                KernelDead,
                *FILES,
                PoolExhausted,
                KernelStartFailed,
                SelfCheckFailed,
                *ENGINE,
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
        session = await lookup.live(session_id)
        if stream or "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(
                _stream_run(session, body),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await unless_gone(
            request,
            lambda: session.run(
                body.code, timeout_s=body.timeout_s, restart=body.restart, file_ids=body.file_ids
            ),
        )
        return json_or_gone(result)

    @app.post(
        "/v1/sessions/{session_id}/files",
        response_model=StoredFile,
        responses=error_responses(*BODY, *SESSION, *UPLOAD, *ENGINE),
        tags=["sessions"],
    )
    async def upload_to_session(
        session_id: str,
        file: Annotated[UploadFile, File(description="the file; its name needs an extension")],
        name: Annotated[str | None, Form(description="a name instead of the file's")] = None,
    ) -> Response:
        """Store a file for this session and copy it into its /mnt/data."""
        try:
            session = await lookup.live(session_id)
            stored = await session.upload(file.file, upload_name(file, name))
        finally:
            await file.close()
        return json_response(stored)

    @app.get(
        "/v1/sessions/{session_id}/files",
        response_model=FileList,
        responses=error_responses(SessionNotFound, FileError, *ENGINE),
        tags=["sessions"],
    )
    async def session_files(session_id: str) -> Response:
        """Files uploaded to the session and produced by it (also after it ended or was lost)."""
        if lookup.lost(session_id) is None:
            await lookup.info(session_id)  # 404 for an id never seen
        return json_response(FileList(data=await engine.list_files(session_id=session_id)))

    @app.post(
        "/v1/sessions/{session_id}/attach",
        response_model=PathList,
        responses=error_responses(*BODY, *SESSION, *FILES, *ENGINE),
        tags=["sessions"],
    )
    async def attach(session_id: str, body: FileIds) -> Response:
        """Copy stored files into the session's /mnt/data now; answers their paths there."""
        paths = await (await lookup.live(session_id)).attach(body.file_ids)
        return json_response(PathList(data=paths))

    @app.post(
        "/v1/sessions/{session_id}/extend",
        response_model=Extended,
        responses=error_responses(*BODY, *SESSION, *ENGINE),
        tags=["sessions"],
    )
    async def extend(session_id: str, body: Extend) -> Response:
        """Keep the session alive: its TTL counts again from now."""
        session = await lookup.live(session_id)
        await session.extend(body.ttl_s)
        return json_response(Extended(id=session_id, expires_at=(await session.info()).expires_at))

    @app.post(
        "/v1/sessions/{session_id}/interrupt",
        response_model=SessionInfo,
        responses=error_responses(*SESSION, *ENGINE),
        tags=["sessions"],
    )
    async def interrupt(session_id: str) -> Response:
        """Interrupt the session's running cell, if any (it ends with KeyboardInterrupt)."""
        session = await lookup.live(session_id)
        await session.interrupt()
        return json_response(await session.info())


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
