"""``sandkernel mcp``: the sandbox as Model Context Protocol tools, over stdio.

Tools:

- ``run_python``: run a cell in a session (one default session per server, or
  one of its own the model names with ``session_id``); answers the result as
  a model reads it, plus the images the cell displayed;
- ``upload_file``: put a file (base64 content, or a host path under a folder
  the server was given with ``--upload-dir``) into the session's ``/mnt/data``;
- ``list_files``: the session's files (uploaded and produced) with their ids;
- ``read_file``: a stored file by id, as text or base64.

The model reaches the sessions it works in and their files, nothing else:
the server runs as root (sandboxes need it), so a host path it may read is
the user's choice. A session name the model gives is a name within this
server (``mcp-<random>.<name>`` in the engine), so it cannot reach another
client's session of a shared daemon, and a file of a session it never used
is "not found". When the server exits it ends every session it began.

The tools work on an embedded engine, or on a running daemon (``--socket``):
the daemon's client has the engine's methods, so the code is the same.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import json
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Final

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ImageContent, TextContent
from pydantic import Field

from sandkernel import __version__
from sandkernel.api import EngineAPI, ManagedBackend, SessionAPI
from sandkernel.daemon.client import AsyncClient
from sandkernel.errors import FileNotFoundInStore, FileRejected, SandkernelError
from sandkernel.files import StoredFile
from sandkernel.files._common import open_regular
from sandkernel.limits import MAX_TIMEOUT_S
from sandkernel.loop import format_result
from sandkernel.results import ExecutionResult
from sandkernel.workspace.collect import shown_images

#: a session name the model gives: the engine's id syntax (its prefix added)
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_ID_LENGTH: Final = 128
_MAX_IMAGES: Final = 4
_READ_LIMIT: Final = 10 << 20
#: How long a SIGTERM waits for the sessions this server began to end.
_SIGTERM_CLOSE_S: Final = 10.0
#: images a model can be shown (MCP's ImageContent), in order of preference
_IMAGE_TYPES: Final = ("image/png", "image/jpeg", "image/gif", "image/webp")


INSTRUCTIONS = (
    "Run Python in a sandboxed, stateful Jupyter kernel (no network; numpy, pandas and "
    "matplotlib are installed). Variables persist between run_python calls of one session. "
    "Files are under /mnt/data; files a cell writes there, and figures it shows, are "
    "stored and listed with ids you can read back with read_file."
)


@contextmanager
def _anticipated() -> Iterator[None]:
    """Engine refusals reach the model with their message (the SDK hides other errors')."""
    try:
        yield
    except (SandkernelError, ValueError, OSError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from exc


class SandboxTools:
    """The tool implementations, on an engine or a daemon client.

    Args:
        backend: the engine, or a daemon's client.
        default_session_id: the session used when a tool names none (default:
            ``mcp-<random>``, this server's own). The application's choice: the
            model reaches it, and the server does not end it.
        upload_dirs: host folders ``upload_file`` may read files from (default:
            none; uploads then take base64 content only).
    """

    def __init__(
        self,
        backend: EngineAPI,
        *,
        default_session_id: str | None = None,
        upload_dirs: Sequence[Path] = (),
    ) -> None:
        self.backend = backend
        #: the prefix of the engine's ids of the sessions the model names
        self.namespace = f"mcp-{secrets.token_hex(6)}"
        self.default_session_id = default_session_id or self.namespace
        self.upload_dirs = [Path(d).resolve() for d in upload_dirs]
        #: the sessions the model used through this server: their files are its own
        #: (the application's default session's from the start: it is the model's too)
        self.used: set[str] = {default_session_id} if default_session_id else set()
        #: the sessions this server began, ended by :meth:`close_sessions`
        self.began: set[str] = set()

    def engine_id(self, session_id: str | None) -> str:
        """The engine's id of the session the model names (None: the default one)."""
        if session_id is None:
            return self.default_session_id
        longest = _ID_LENGTH - len(self.namespace) - 1
        if not _NAME.fullmatch(session_id) or len(session_id) > longest:
            raise ValueError(
                f"invalid session name {session_id[:40]!r}: 1-{longest} characters of "
                "letters, digits and ._:@- starting with a letter or digit"
            )
        return f"{self.namespace}.{session_id}"

    async def _session(self, session_id: str | None) -> SessionAPI:
        engine_id = self.engine_id(session_id)
        if session_id is None and self.default_session_id != self.namespace:
            session = await self.backend.session(engine_id)  # the application's session
        else:
            # Ours: it starts afresh if it expired, as the server outlives it.
            session = await self.backend.session(engine_id, if_expired="new")
            self.began.add(session.id)
        self.used.add(session.id)
        return session

    async def close_sessions(self) -> None:
        """End the sessions this server began (the daemon outlives it), all at once.

        Each close waits for its kernel to stop: one after another, a few
        sessions would outlast the time a SIGTERM gives them.
        """

        async def close(session_id: str) -> None:
            with contextlib.suppress(SandkernelError):
                await self.backend.close_session(session_id)

        async with anyio.create_task_group() as group:
            for session_id in sorted(self.began):
                group.start_soon(close, session_id)

    def _open_host_file(self, path: str) -> tuple[BinaryIO, str]:
        """``path`` opened, and its name, if it is a file under one of the upload folders
        (symlinks resolved).

        Where it is is checked again on the open file itself: a folder on the
        way swapped for a symlink between the check and the open (by anyone
        who can write in an upload folder) would otherwise lead outside them.
        """
        if not self.upload_dirs:
            raise ValueError(
                "this server reads no host files: send content_base64, or start it with "
                "--upload-dir FOLDER to allow files under FOLDER"
            )
        source = Path(path).expanduser().resolve()
        allowed = ", ".join(str(d) for d in self.upload_dirs)
        if not any(source.is_relative_to(d) for d in self.upload_dirs):
            raise ValueError(f"{path} is not under an upload folder ({allowed})")
        try:
            handle = open_regular(source)
        except FileRejected:
            raise ValueError(f"{path} is not a file") from None
        try:
            opened = Path(os.readlink(f"/proc/self/fd/{handle.fileno()}"))
        except OSError:
            opened = None
        if opened is None or not any(opened.is_relative_to(d) for d in self.upload_dirs):
            handle.close()
            raise ValueError(f"{path} is not under an upload folder ({allowed})")
        return handle, source.name

    async def run_python(
        self,
        code: Annotated[str, Field(description="Python source of one cell")],
        session_id: Annotated[
            str | None,
            Field(description="name of another session of yours to run in (default: your own)"),
        ] = None,
        timeout_s: Annotated[
            float | None,
            Field(gt=0, le=MAX_TIMEOUT_S, description="wall timeout (default: the policy's)"),
        ] = None,
    ) -> list[TextContent | ImageContent]:
        """Run Python code in a sandboxed Jupyter kernel; state persists across calls."""
        with _anticipated():
            session = await self._session(session_id)
            # A dead kernel is replaced: the result that said it died told the
            # model its next call starts a fresh one (and to redo its definitions).
            result = await session.run(code, timeout_s=timeout_s, restart=True)
            content: list[TextContent | ImageContent] = [
                TextContent(type="text", text=format_result(result))
            ]
            content += _images(result)[:_MAX_IMAGES]
            return content

    async def upload_file(
        self,
        path: Annotated[
            str | None,
            Field(
                description="a file on this machine to upload (under the server's upload folders)"
            ),
        ] = None,
        content_base64: Annotated[
            str | None, Field(description="or the file's content, base64-encoded")
        ] = None,
        name: Annotated[
            str | None, Field(description="its name in /mnt/data (required with content_base64)")
        ] = None,
        session_id: Annotated[
            str | None, Field(description="name of the session to give it to (default: your own)")
        ] = None,
    ) -> str:
        """Upload a file into the session's /mnt/data; answers its id and path."""
        with _anticipated():
            if (path is None) == (content_base64 is None):
                raise ValueError("give exactly one of path or content_base64")
            session = await self._session(session_id)
            if content_base64 is not None:
                try:
                    # Wrapped lines (base64's 76 columns) are base64 too.
                    data = base64.b64decode("".join(content_base64.split()), validate=True)
                except binascii.Error as exc:
                    raise ValueError(f"content_base64 is not valid base64: {exc}") from None
                if name is None:
                    raise ValueError("name is required with content_base64 (with its extension)")
                stored = await session.upload(data, name)
            else:
                assert path is not None
                handle, host_name = await anyio.to_thread.run_sync(self._open_host_file, path)
                with handle:
                    stored = await session.upload(handle, name or host_name)
            return json.dumps({**_describe(stored), "sandbox_path": f"/mnt/data/{stored.name}"})

    async def list_files(
        self,
        session_id: Annotated[
            str | None, Field(description="name of the session (default: your own)")
        ] = None,
    ) -> str:
        """List the session's files (uploaded and produced) with their ids."""
        with _anticipated():
            engine_id = self.engine_id(session_id)
            if engine_id not in self.used:
                if session_id is not None:
                    raise ValueError(
                        f"no session named {session_id!r} yet: run_python or upload_file "
                        "with that session_id begins it"
                    )
                return "[]"  # the default session, before its first use: no files
            files = await self.backend.list_files(session_id=engine_id)
            return json.dumps([_describe(f) for f in files], indent=1)

    async def read_file(
        self,
        file_id: Annotated[str, Field(description="the file's id, e.g. file-0123...")],
        max_bytes: Annotated[
            int, Field(gt=0, le=_READ_LIMIT, description="read at most this many bytes")
        ] = 1 << 20,
    ) -> str:
        """Read a stored file: text for text files, else base64."""
        with _anticipated():
            stored = await self.backend.file(file_id)
            if stored.session_id not in self.used:
                raise FileNotFoundInStore(f"no file {file_id!r} in the sessions used here")
            data = await self.backend.download(file_id, max_bytes=max_bytes)
            truncated = stored.size_bytes > len(data)
            answer: dict[str, Any] = {**_describe(stored), "truncated": truncated}
            text = _as_text(data, truncated=truncated)
            if text is not None:
                answer.update(encoding="text", content=text)
            else:
                answer.update(encoding="base64", content=base64.b64encode(data).decode())
            return json.dumps(answer)


def _images(result: ExecutionResult) -> list[TextContent | ImageContent]:
    """The images a cell showed, then the one it returned, as the store keeps them."""
    found: list[TextContent | ImageContent] = []
    for shown in shown_images(result):
        kind = next((t for t in _IMAGE_TYPES if isinstance(shown.data.get(t), str)), None)
        if kind is not None:
            found.append(ImageContent(type="image", data=shown.data[kind], mime_type=kind))
    return found


def _as_text(data: bytes, *, truncated: bool) -> str | None:
    """The bytes as text if they are UTF-8 without NULs (a cut last character is dropped)."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _describe(stored: StoredFile) -> dict[str, Any]:
    return {
        "id": stored.id,
        "name": stored.name,
        "mime_type": stored.mime_type,
        "size_bytes": stored.size_bytes,
        "origin": stored.origin,
        "path": stored.path,
    }


def build_mcp_server(tools: SandboxTools) -> MCPServer[Any]:
    """An MCP server exposing ``tools``."""
    server: MCPServer[Any] = MCPServer(
        name="sandkernel", version=__version__, instructions=INSTRUCTIONS
    )
    for fn in (tools.run_python, tools.upload_file, tools.list_files, tools.read_file):
        server.add_tool(fn, structured_output=False)
    return server


@contextmanager
def _sessions_closed_on_sigterm(tools: SandboxTools) -> Iterator[None]:
    """On SIGTERM, end the sessions this server began, then die of it, as asked.

    Over stdio the server waits in a thread reading stdin, which no
    cancellation interrupts: the sessions are closed from the handler itself.
    (With an embedded engine, the engine's own handler ends its kernels.)
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield  # the embedding program handles SIGTERM itself
        return
    loop = asyncio.get_running_loop()
    ending: set[asyncio.Task[None]] = set()

    async def close_then_exit() -> None:
        try:
            with anyio.move_on_after(_SIGTERM_CLOSE_S):
                await tools.close_sessions()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    loop.add_signal_handler(signal.SIGTERM, lambda: ending.add(loop.create_task(close_then_exit())))
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def run_mcp_server(
    *, socket: Path | None, engine: ManagedBackend | None, upload_dirs: Sequence[Path] = ()
) -> None:
    """Serve the tools over stdio until the client closes stdin.

    Args:
        socket: a running daemon's socket; or None to use ``engine``.
        engine: a not yet started engine (used when ``socket`` is None).
        upload_dirs: host folders ``upload_file`` may read files from.
    """
    if socket is not None:
        async with AsyncClient(socket) as client:
            await client.health()  # fail now, with the daemon's address, if it is not there
            tools = SandboxTools(client, upload_dirs=upload_dirs)
            with _sessions_closed_on_sigterm(tools):
                try:
                    await build_mcp_server(tools).run_stdio_async()
                finally:
                    await tools.close_sessions()  # the daemon outlives this server
        return
    if engine is None:
        raise ValueError("give a daemon socket or an engine")
    async with engine:  # leaving it ends every kernel
        await build_mcp_server(SandboxTools(engine, upload_dirs=upload_dirs)).run_stdio_async()
