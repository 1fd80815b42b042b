"""File store routes.

::

    POST   /v1/files                          upload (multipart: file, session_id | agent_id)
    GET    /v1/files                          list (?session_id=, ?agent_id=)
    GET    /v1/files/{id}                     metadata
    GET    /v1/files/{id}/content             the bytes, streamed
    DELETE /v1/files/{id}                     delete

Downloads read the file in a worker thread, a chunk at a time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Final
from urllib.parse import quote

import anyio
from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import Response, StreamingResponse

from sandkernel.api import ServedEngine
from sandkernel.daemon.responses import json_response
from sandkernel.daemon.routes.lookup import SessionLookup
from sandkernel.daemon.routes.raises import BODY, ENGINE, FILES, SESSION, UPLOAD
from sandkernel.daemon.schemas import ID_PATTERN, MAX_TTL_S, Deleted, FileList, error_responses
from sandkernel.errors import FileError, InvalidRequest, SessionLost, SessionNotFound
from sandkernel.files import StoredFile

log = logging.getLogger(__name__)

_DOWNLOAD_CHUNK: Final = 1 << 20


def add_file_routes(app: FastAPI, engine: ServedEngine, lookup: SessionLookup) -> None:
    """Add the file store's routes; an upload to a session needs it live (``lookup``)."""

    @app.post(
        "/v1/files",
        response_model=StoredFile,
        responses=error_responses(*BODY, *SESSION, *UPLOAD, *ENGINE),
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
                await lookup.live(session_id)
            stored = await engine.upload(
                file.file,
                upload_name(file, name),
                session_id=session_id,
                agent_id=agent_id,
                retention_s=retention_s,
            )
        finally:
            await file.close()
        return json_response(stored)

    @app.get(
        "/v1/files",
        response_model=FileList,
        responses=error_responses(InvalidRequest, SessionNotFound, SessionLost, FileError, *ENGINE),
        tags=["files"],
    )
    async def list_files(
        session_id: Annotated[str | None, Query(description="only this session's")] = None,
        agent_id: Annotated[
            str | None, Query(pattern=ID_PATTERN, description="only this agent's")
        ] = None,
    ) -> Response:
        """Stored files, optionally of one session or one agent."""
        return json_response(
            FileList(data=await engine.list_files(session_id=session_id, agent_id=agent_id))
        )

    @app.get(
        "/v1/files/{file_id}",
        response_model=StoredFile,
        responses=error_responses(*FILES, *ENGINE),
        tags=["files"],
    )
    async def file_info(file_id: str) -> Response:
        """A stored file's metadata."""
        return json_response(await engine.file(file_id))

    @app.get(
        "/v1/files/{file_id}/content",
        responses={
            **error_responses(*FILES, *ENGINE),
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
        body = _read_file(engine, file_id)
        # Opened before the status is sent: a file deleted (or expired) meanwhile is
        # its 404 or 410, not a 200 cut short. Once open, it reads to its end.
        await anext(body)
        return StreamingResponse(
            body,
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
        responses=error_responses(*FILES, *ENGINE),
        tags=["files"],
    )
    async def delete_file(file_id: str) -> Response:
        """Delete a stored file (copies already in workspaces stay there)."""
        # An unknown id is a 404 (FileNotFoundInStore); an expired one can still be deleted.
        await engine.delete_file(file_id)
        return json_response(Deleted(id=file_id))


def upload_name(file: UploadFile, name: str | None) -> str:
    """The name an upload is stored under: ``name`` if given, else the file part's."""
    chosen = name or file.filename
    if not chosen:
        raise ValueError("the upload has no file name: send one with the file part or `name`")
    return chosen


async def _read_file(engine: ServedEngine, file_id: str) -> AsyncIterator[bytes]:
    """The file's bytes, after one empty chunk once it is open.

    Opened inside the generator, so that closing it (as the server does with a
    response it stops sending) closes the file.
    """
    handle = await anyio.to_thread.run_sync(engine.open_file, file_id)
    try:
        # Its first chunk is read before the status is sent too: a file of
        # one chunk whose stored copy is damaged (which the read that ends
        # it finds) is its 404, not a 200 cut short.
        chunk = await anyio.to_thread.run_sync(handle.read, _DOWNLOAD_CHUNK)
    except BaseException:
        handle.close()
        raise
    try:
        yield b""
        while chunk:
            yield chunk
            chunk = await anyio.to_thread.run_sync(handle.read, _DOWNLOAD_CHUNK)
    except FileError as exc:
        # Found once the status was sent (a damaged copy's end): the body
        # stops short of its Content-Length, which the client sees.
        log.error("the download of %s was cut short: %s", file_id, exc)
        raise
    finally:
        handle.close()
