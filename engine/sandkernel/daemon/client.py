"""Clients of the daemon whose methods mirror the embedded engine's.

Switching from the embedded engine to a running daemon is one line::

    async with Engine() as engine:                      # embedded
    async with AsyncClient() as engine:                 # the daemon at the default socket
        session = await engine.session("thread-42")
        result = await session.run("print(1 + 1)")      # the same ExecutionResult

:class:`AsyncClient` implements :class:`sandkernel.api.EngineAPI` (mypy checks
it): sessions, files and stats come back as the engine's own models
(:class:`~sandkernel.results.ExecutionResult`, :class:`~sandkernel.files.StoredFile`,
:class:`~sandkernel.session.SessionInfo`, :class:`~sandkernel.engine.EngineStats`),
and a refusal of the daemon is raised as the engine's exception class
(``SessionNotFound``, ``SessionExpired``, ``FileRejected``...): the class the
error body's ``type`` names, from the registry of :mod:`sandkernel.errors`.
Streamed outputs (``session.stream``, or ``on_output``) are ``{"msg_type",
"content"}`` (the message without its Jupyter header), see
:mod:`sandkernel.daemon.sse`.

:class:`Client` is the blocking facade of :mod:`sandkernel.sync` over it.
"""

from __future__ import annotations

import json
import os
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote

import anyio
import httpx
from pydantic import BaseModel

from sandkernel import __version__
from sandkernel.batch import RunRequest, RunResult
from sandkernel.daemon import sse
from sandkernel.daemon.paths import default_socket_path
from sandkernel.daemon.schemas import Extended, Health
from sandkernel.engine import EngineStats
from sandkernel.errors import (
    BadInput,
    DaemonError,
    DaemonUnavailable,
    EngineClosed,
    FileNotFoundInStore,
    SessionClosed,
    SessionExpired,
    SessionLost,
    SessionNotFound,
    error_from_wire,
)
from sandkernel.files import StoredFile, safe_name
from sandkernel.files._common import open_regular, remove_if_same_file
from sandkernel.files.store import upload_name
from sandkernel.limits import check_code_text
from sandkernel.results import ExecutionResult
from sandkernel.session import SessionInfo, SessionState, UploadSource
from sandkernel.streaming import StreamsFromRun
from sandkernel.sync import BlockingEngine

#: What ``on_output`` receives: ``{"msg_type": ..., "content": ...}``.
RemoteOutputCallback = Callable[[dict[str, Any]], None]
_CONNECT_TIMEOUT_S = 10.0


# -- the calls, described once for both clients ----------------------------------------


@dataclass(frozen=True)
class _Call[T]:
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, str] | None = None


def _model[M: BaseModel](cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate_json(response.content)


def _data[M: BaseModel](cls: type[M]) -> Callable[[httpx.Response], list[M]]:
    return lambda response: [cls.model_validate(item) for item in response.json()["data"]]


def _nothing(response: httpx.Response) -> None:
    return None


def _seg(value: str) -> str:
    return quote(value, safe="")


def _can_be_segment(value: str) -> bool:
    # A "/" reaches the router decoded, and httpx resolves "." and ".." segments:
    # the request would go to another route. No id of the engine's is one.
    return "/" not in value and value not in ("", ".", "..")


def _session_seg(session_id: str) -> str:
    """``session_id`` as a path segment; SessionNotFound, as the engine's, if it cannot be one."""
    if not _can_be_segment(session_id):
        raise SessionNotFound(f"no session with id {session_id[:80]!r}")
    return _seg(session_id)


def _file_seg(file_id: str) -> str:
    """``file_id`` as a path segment; FileNotFoundInStore, as the engine's, if it cannot be one."""
    if not _can_be_segment(file_id):
        raise FileNotFoundInStore(
            f"no file with id {file_id[:80]!r}: it was never stored here or has been deleted"
        )
    return _seg(file_id)


def _agent_seg(agent_id: str) -> str:
    if not _can_be_segment(agent_id):
        raise BadInput(f"invalid agent id {agent_id[:80]!r}")
    return _seg(agent_id)


def _without_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _create_session(
    session_id: str | None,
    agent_id: str | None,
    if_expired: str,
    ttl_s: float | None,
    policy: str | None,
) -> _Call[SessionInfo]:
    body = _without_none(
        id=session_id, agent_id=agent_id, ttl_s=ttl_s, policy=policy, if_expired=if_expired
    )
    return _Call("POST", "/v1/sessions", _model(SessionInfo), json=body)


def _session_info(session_id: str) -> _Call[SessionInfo]:
    return _Call("GET", f"/v1/sessions/{_session_seg(session_id)}", _model(SessionInfo))


def _sessions() -> _Call[list[SessionInfo]]:
    return _Call("GET", "/v1/sessions", _data(SessionInfo))


def _close_session(session_id: str) -> _Call[None]:
    return _Call("DELETE", f"/v1/sessions/{_session_seg(session_id)}", _nothing)


def _execute_body(
    code: str, timeout_s: float | None, restart: bool | None, file_ids: Sequence[str]
) -> dict[str, Any]:
    check_code_text(code)  # refused here as the engine refuses it (httpx cannot send it)
    return _without_none(
        code=code, timeout_s=timeout_s, restart=restart, file_ids=list(file_ids) or None
    )


def _execute(session_id: str, body: dict[str, Any]) -> _Call[ExecutionResult]:
    path = f"/v1/sessions/{_session_seg(session_id)}/execute"
    return _Call("POST", path, _model(ExecutionResult), json=body)


def _session_files(session_id: str) -> _Call[list[StoredFile]]:
    return _Call("GET", f"/v1/sessions/{_session_seg(session_id)}/files", _data(StoredFile))


def _attach(session_id: str, file_ids: Sequence[str]) -> _Call[list[str]]:
    path = f"/v1/sessions/{_session_seg(session_id)}/attach"
    return _Call("POST", path, lambda r: list(r.json()["data"]), json={"file_ids": list(file_ids)})


def _extend(session_id: str, ttl_s: float | None) -> _Call[float]:
    path = f"/v1/sessions/{_session_seg(session_id)}/extend"
    parse = _model(Extended)
    return _Call(
        "POST", path, lambda r: parse(r).expires_at.timestamp(), json=_without_none(ttl_s=ttl_s)
    )


def _interrupt(session_id: str) -> _Call[None]:
    return _Call("POST", f"/v1/sessions/{_session_seg(session_id)}/interrupt", _nothing)


def _stats() -> _Call[EngineStats]:
    return _Call("GET", "/v1/stats", _model(EngineStats))


def _health() -> _Call[Health]:
    return _Call("GET", "/v1/health", _model(Health))


def _file(file_id: str) -> _Call[StoredFile]:
    return _Call("GET", f"/v1/files/{_file_seg(file_id)}", _model(StoredFile))


def _list_files(session_id: str | None, agent_id: str | None) -> _Call[list[StoredFile]]:
    params = _without_none(session_id=session_id, agent_id=agent_id)
    return _Call("GET", "/v1/files", _data(StoredFile), params=params)


def _delete_file(file_id: str) -> _Call[None]:
    return _Call("DELETE", f"/v1/files/{_file_seg(file_id)}", _nothing)


def _attach_to_agent(agent_id: str, file_ids: Sequence[str]) -> _Call[list[StoredFile]]:
    path = f"/v1/agents/{_agent_seg(agent_id)}/files"
    return _Call("POST", path, _data(StoredFile), json={"file_ids": list(file_ids)})


def _run_once(request: RunRequest) -> _Call[RunResult]:
    return _Call("POST", "/v1/run", _model(RunResult), json=request.model_dump(mode="json"))


def _ndjson(request: RunRequest) -> bytes:
    return request.model_dump_json().encode() + b"\n"


async def _lines(response: httpx.Response) -> AsyncIterator[str]:
    """The body's lines, ended by ``\\n`` (and a ``\\r`` before it) only.

    Not ``aiter_lines``: it splits as ``str.splitlines`` does, also on
    U+2028 and the like, which a line of JSON may hold raw in a string
    (a daemon before it escaped them; a program's output).
    """
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()
    if pending:
        yield pending.removesuffix(b"\r").decode()


def _run_line(line: str) -> RunResult:
    """One line of ``/v1/runs``: a result, or the refusal of a run the daemon could not read."""
    raw = json.loads(line)
    if "error" in raw and "status" not in raw:
        error = raw["error"]
        raise error_from_wire(422, str(error["type"]), str(error["message"]))
    return RunResult.model_validate(raw)


def _check_live(info: SessionInfo) -> SessionInfo:
    """``get_session`` answers only live sessions, as the engine's does."""
    if info.state is SessionState.EXPIRED:
        raise SessionExpired(
            f"session {info.id!r} expired at {info.expires_at.isoformat(timespec='seconds')} "
            f"({info.ended_reason}); open a new session (its files stay downloadable by id)"
        )
    if info.state is SessionState.CLOSED:
        raise SessionClosed(f"session {info.id!r} was closed")
    return info


def _raise_for_error(response: httpx.Response) -> None:
    """Raise what the daemon's error body names (the body must have been read)."""
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        error_type, message = str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        error_type = f"HTTP{response.status_code}"
        message = response.text[:1000] or response.reason_phrase
    if response.status_code == 401 and "authorization" not in response.request.headers:
        # The daemon's message speaks HTTP; this caller holds a client, not a header.
        message += (
            "; this client sent no token: pass it as Client(url=..., token=...) "
            "(or AsyncClient), or set SANDKERNEL_TOKEN"
        )
    raise error_from_wire(response.status_code, error_type, message)


def _stream_event(event: sse.Event, on_output: RemoteOutputCallback) -> ExecutionResult | None:
    if event.event == sse.RESULT:
        return ExecutionResult.model_validate_json(event.data)
    if event.event == sse.ERROR:
        body = json.loads(event.data)
        error = body["error"]
        raise error_from_wire(int(body.get("status", 500)), error["type"], error["message"])
    on_output(json.loads(event.data))
    return None


def _upload_form(
    name: str | None,
    session_id: str | None = None,
    agent_id: str | None = None,
    retention_s: float | None = None,
) -> dict[str, str]:
    fields = _without_none(
        name=name, session_id=session_id, agent_id=agent_id, retention_s=retention_s
    )
    return {k: str(v) for k, v in fields.items()}


_FilePart = dict[str, tuple[str, bytes | IO[bytes], str]]


@asynccontextmanager
async def _upload_part(
    source: UploadSource, name: str | None
) -> AsyncIterator[tuple[str, _FilePart]]:
    """The name to store ``source`` under, and its multipart file part.

    The name goes to the daemon as the ``name`` form field: as the part's
    ``filename`` httpx would percent-escape a ``"`` in it, which the daemon
    then stores as it came. A path is opened here, and closed after.
    """
    chosen = upload_name(source, name)
    safe_name(chosen)  # refused here as the engine refuses it (httpx cannot send some)
    if isinstance(source, bytes | bytearray | memoryview):
        yield chosen, {"file": (chosen, bytes(source), "application/octet-stream")}
    elif isinstance(source, str | os.PathLike):
        # Opened as the engine's store opens a path: a symlink, a FIFO, a folder
        # or a missing file is the same FileRejected, and a FIFO is refused at
        # once rather than waited on. In a worker thread, as any open can stall.
        handle = await anyio.to_thread.run_sync(open_regular, source)
        try:
            yield chosen, {"file": (chosen, handle, "application/octet-stream")}
        finally:
            handle.close()
    else:
        yield chosen, {"file": (chosen, source, "application/octet-stream")}


@contextmanager
def _cut_short(where: str, file_id: str, response: httpx.Response) -> Iterator[None]:
    """A download's body that ends before its length as a :class:`DaemonError` that says so.

    The daemon stops a download it finds damaged once it has begun (see
    ``FileStore.open``); a daemon that went away midway stops it too.
    """
    try:
        yield
    except httpx.RemoteProtocolError as exc:
        raise DaemonError(
            f"the download of {file_id!r} from the daemon at {where} was cut short after "
            f"{response.num_bytes_downloaded} of {response.headers.get('content-length', '?')} "
            "bytes: its stored copy may be damaged or the daemon stopped (its log says which)"
        ) from exc


def _joined(chunks: list[bytes], max_bytes: int | None) -> bytes:
    data = b"".join(chunks)
    return data if max_bytes is None else data[:max_bytes]


def _headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"sandkernel/{__version__}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _where(socket: str | os.PathLike[str] | None, url: str | None) -> tuple[str, str | None]:
    """The base URL and the Unix socket path (None for TCP)."""
    if socket is not None and url is not None:
        raise ValueError("give socket or url, not both")
    if url is not None:
        return url.rstrip("/"), None
    return "http://sandkernel", str(socket if socket is not None else default_socket_path())


@contextmanager
def _transport_errors(where: str, http: httpx.AsyncClient) -> Iterator[None]:
    """httpx's errors as the tree's; a client closed before or during the call is EngineClosed."""
    if http.is_closed:
        raise EngineClosed("the client is closed")
    try:
        yield
    except httpx.TransportError as exc:
        if http.is_closed:  # closed (by another task or thread) while the call ran
            raise EngineClosed("the client was closed while the call ran") from exc
        if isinstance(exc, httpx.ConnectError):
            raise DaemonUnavailable(
                f"cannot reach the sandkernel daemon at {where} ({exc}): start it with "
                "`sandkernel serve`, or pass the socket it listens on"
            ) from exc
        if isinstance(exc, httpx.TimeoutException):
            raise DaemonError(
                f"the sandkernel daemon at {where} did not answer in time: {exc!r}"
            ) from exc
        raise DaemonError(f"the connection to the daemon at {where} failed: {exc!r}") from exc


# -- async -------------------------------------------------------------------------------


class AsyncClient:
    """The daemon's API with the embedded :class:`~sandkernel.Engine`'s methods.

    Args:
        socket: the daemon's Unix socket (default: ``sandkernel serve``'s default).
        url: instead of a socket, the daemon's TCP address (``http://127.0.0.1:8765``).
        token: the bearer token for TCP (default: ``$SANDKERNEL_TOKEN``).
        timeout_s: how long a request may take, on top of a cell's own timeout.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        base_url, uds = _where(socket, url)
        self.where = f"unix:{uds}" if uds is not None else base_url
        if url is not None and token is None:
            token = os.environ.get("SANDKERNEL_TOKEN")
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            base_url=base_url,
            transport=httpx.AsyncHTTPTransport(uds=uds) if uds is not None else None,
            headers=_headers(token),
            timeout=httpx.Timeout(timeout_s, connect=_CONNECT_TIMEOUT_S),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (sessions stay alive in the daemon)."""
        await self._http.aclose()

    async def _send[T](self, call: _Call[T], http_timeout: httpx.Timeout | None = None) -> T:
        with _transport_errors(self.where, self._http):
            response = await self._http.request(
                call.method,
                call.path,
                json=call.json,
                params=call.params,
                timeout=http_timeout or self._http.timeout,
            )
        _raise_for_error(response)
        return call.parse(response)

    def _run_timeout(self, timeout_s: float | None) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s + (timeout_s or 0), connect=_CONNECT_TIMEOUT_S)

    # one-shot runs

    async def run_once(
        self,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, bytes] | None = None,
        fetch_files: Sequence[str] = (),
        argv: Sequence[str] = (),
        timeout_s: float | None = None,
        memory_mb: int | None = None,
    ) -> RunResult:
        """Run ``code`` once as a program, statelessly (see :meth:`Engine.run_once`)."""
        request = RunRequest.program(
            code, stdin=stdin, files=files, fetch_files=fetch_files, argv=argv,
            timeout_s=timeout_s, memory_mb=memory_mb,
        )  # fmt: skip
        return await self._send(_run_once(request), self._run_timeout(timeout_s))

    async def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> AsyncIterator[RunResult]:
        """Run many requests, yielding results as they finish (see :meth:`Engine.run_many`).

        The requests go out as NDJSON on one HTTP request as they are
        produced; the daemon reads them all, then streams the results back
        as they finish (the request's body counts against its upload limit).
        """

        async def body() -> AsyncIterator[bytes]:
            if isinstance(requests, AsyncIterable):
                async for request in requests:
                    yield _ndjson(request)
            else:
                for request in requests:
                    yield _ndjson(request)

        params = {"concurrency": str(concurrency)} if concurrency is not None else None
        with _transport_errors(self.where, self._http):
            async with self._http.stream(
                "POST", "/v1/runs", content=body(), params=params,
                headers={"content-type": "application/x-ndjson"},
                timeout=httpx.Timeout(self.timeout_s, connect=_CONNECT_TIMEOUT_S, read=None),
            ) as response:  # fmt: skip
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async for line in _lines(response):
                    if line.strip():
                        yield _run_line(line)

    # sessions

    async def session(
        self,
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        if_expired: Literal["raise", "new"] = "raise",
        ttl_s: float | None = None,
        policy: str | None = None,
    ) -> RemoteSession:
        """Get the session for a conversation id, creating it if needed (see ``Engine.session``).

        Args:
            session_id: the conversation's id; ``None`` creates a new random one.
            agent_id: its agent (the agent's files appear read-only in ``/mnt/data``).
            if_expired: for an ended or lost session's id: raise, or start a new one.
            ttl_s: this session's TTL (default: the daemon's).
            policy: if given, must be the daemon's policy (else PolicyError).
        """
        call = _create_session(session_id, agent_id, if_expired, ttl_s, policy)
        info = await self._send(call)
        # The daemon's word: an existing session keeps the agent it was made for.
        return RemoteSession(self, info.id, info.agent_id)

    async def get_session(self, session_id: str) -> RemoteSession:
        """The live session with this id (never creates one)."""
        info = await self._send(_session_info(session_id))
        _check_live(info)
        return RemoteSession(self, session_id, info.agent_id)

    async def close_session(self, session_id: str) -> None:
        """Close a session by id (idempotent for ended sessions)."""
        await self._send(_close_session(session_id))

    async def sessions(self) -> list[SessionInfo]:
        """Every session the daemon's engine knows, alive or recently ended."""
        return await self._send(_sessions())

    async def stats(self) -> EngineStats:
        """Pool and session figures."""
        return await self._send(_stats())

    async def health(self) -> Health:
        """The daemon's version, policy and uptime."""
        return await self._send(_health())

    # files

    async def upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store a file and get its id (see ``Engine.upload``).

        Raises:
            FileRejected: as the engine does, also for a path that is a symlink,
                a FIFO, a folder or missing (checked here, before sending).
        """
        async with _upload_part(source, name) as (chosen, files):
            form = _upload_form(chosen, session_id, agent_id, retention_s)
            with _transport_errors(self.where, self._http):
                response = await self._http.post("/v1/files", data=form, files=files)
        _raise_for_error(response)
        return StoredFile.model_validate_json(response.content)

    async def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        """Give stored files to an agent (they appear in its sessions, read-only)."""
        return await self._send(_attach_to_agent(agent_id, file_ids))

    async def file(self, file_id: str) -> StoredFile:
        """A stored file's metadata."""
        return await self._send(_file(file_id))

    async def download(self, file_id: str, *, max_bytes: int | None = None) -> bytes:
        """A stored file's bytes (:meth:`download_to` streams large ones to disk).

        Args:
            file_id: the file's id.
            max_bytes: read only the first this many bytes.
        """
        chunks: list[bytes] = []
        size = 0
        with _transport_errors(self.where, self._http):
            content = f"/v1/files/{_file_seg(file_id)}/content"
            async with self._http.stream("GET", content) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                with _cut_short(self.where, file_id, response):
                    async for chunk in response.aiter_bytes():
                        chunks.append(chunk)
                        size += len(chunk)
                        if max_bytes is not None and size >= max_bytes:
                            break
        return _joined(chunks, max_bytes)

    async def download_to(self, file_id: str, path: str | os.PathLike[str]) -> Path:
        """Stream a stored file into ``path``; returns it."""
        target = Path(path)
        with _transport_errors(self.where, self._http):
            content = f"/v1/files/{_file_seg(file_id)}/content"
            async with self._http.stream("GET", content) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async with await anyio.open_file(target, "wb") as out:
                    written = os.fstat(out.wrapped.fileno())
                    try:
                        with _cut_short(self.where, file_id, response):
                            async for chunk in response.aiter_bytes():
                                await out.write(chunk)
                    except DaemonError:
                        # Not left as if it were the file: the regular file
                        # written only, never what a link or device there is.
                        await anyio.to_thread.run_sync(remove_if_same_file, target, written)
                        raise
        return target

    async def list_files(
        self, *, session_id: str | None = None, agent_id: str | None = None
    ) -> list[StoredFile]:
        """Stored files, optionally of one session or one agent."""
        return await self._send(_list_files(session_id, agent_id))

    async def delete_file(self, file_id: str) -> None:
        """Delete a stored file."""
        await self._send(_delete_file(file_id))

    # used by RemoteSession

    async def _upload_to_session(
        self, session_id: str, source: UploadSource, name: str | None
    ) -> StoredFile:
        async with _upload_part(source, name) as (chosen, files):
            with _transport_errors(self.where, self._http):
                response = await self._http.post(
                    f"/v1/sessions/{_session_seg(session_id)}/files",
                    data=_upload_form(chosen),
                    files=files,
                )
        _raise_for_error(response)
        return StoredFile.model_validate_json(response.content)

    async def _stream_execute(
        self,
        session_id: str,
        body: dict[str, Any],
        on_output: RemoteOutputCallback,
        http_timeout: httpx.Timeout,
    ) -> ExecutionResult:
        decoder = sse.Decoder()
        with _transport_errors(self.where, self._http):
            async with self._http.stream(
                "POST",
                f"/v1/sessions/{_session_seg(session_id)}/execute",
                json=body,
                params={"stream": "true"},
                headers={"Accept": "text/event-stream"},
                timeout=http_timeout,
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_error(response)
                async for line in _lines(response):
                    event = decoder.feed(line)
                    if event is not None:
                        result = _stream_event(event, on_output)
                        if result is not None:
                            return result
        raise DaemonError(f"the daemon at {self.where} ended the stream without a result")


class RemoteSession(StreamsFromRun):
    """A session in the daemon, with the methods of :class:`sandkernel.session.Session`."""

    def __init__(self, client: AsyncClient, session_id: str, agent_id: str | None) -> None:
        self._client = client
        self.id = session_id
        self.agent_id = agent_id

    def __repr__(self) -> str:
        return f"RemoteSession({self.id!r}, at={self._client.where!r})"

    async def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_output: RemoteOutputCallback | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> ExecutionResult:
        """Run one cell (see ``Session.run``); with ``on_output``, outputs stream as they come.

        Raises:
            SessionExpired, SessionClosed, SessionLost, KernelDead, SessionNotFound.
        """
        body = _execute_body(code, timeout_s, restart, file_ids)
        timeout = self._client._run_timeout(timeout_s)
        if on_output is None:
            return await self._client._send(_execute(self.id, body), timeout)
        return await self._client._stream_execute(self.id, body, on_output, timeout)

    async def upload(self, source: UploadSource, name: str | None = None) -> StoredFile:
        """Store a file for this session and copy it into ``/mnt/data``."""
        return await self._client._upload_to_session(self.id, source, name)

    async def attach(self, file_ids: Sequence[str]) -> list[str]:
        """Copy stored files into ``/mnt/data`` now; returns their paths there."""
        return await self._client._send(_attach(self.id, file_ids))

    async def files(self) -> list[StoredFile]:
        """Files uploaded to this session and produced by it."""
        return await self._client._send(_session_files(self.id))

    async def extend(self, ttl_s: float | None = None) -> float:
        """Keep the session alive; returns its new expiry as a Unix time."""
        return await self._client._send(_extend(self.id, ttl_s))

    async def interrupt(self) -> None:
        """Interrupt the running cell, if any."""
        await self._client._send(_interrupt(self.id))

    async def info(self) -> SessionInfo:
        """The session's state and times."""
        return await self._client._send(_session_info(self.id))

    async def close(self) -> None:
        """End the session and its kernel. Idempotent (also for a session lost in a
        restart of the daemon: its kernel ended with the daemon that ran it)."""
        with suppress(SessionLost):
            await self._client.close_session(self.id)


# -- blocking -----------------------------------------------------------------------------


class Client(BlockingEngine[AsyncClient]):
    """:class:`AsyncClient`, blocking: :mod:`sandkernel.sync`'s one facade over it.

    Takes :class:`AsyncClient`'s arguments; every method of the contract is
    here with the same parameters, plus the client's own extras.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(partial(AsyncClient, socket, url=url, token=token, timeout_s=timeout_s))

    @property
    def where(self) -> str:
        """The daemon's address, as errors name it."""
        return self.backend.where

    def health(self) -> Health:
        """The daemon's version, uptime and pool, without a token."""
        return self.call(self.backend.health)

    def download_to(self, file_id: str, path: str | os.PathLike[str]) -> Path:
        """Stream a stored file into ``path``; returns it."""
        return self.call(self.backend.download_to, file_id, path)
