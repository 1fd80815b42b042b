"""Files across nodes: each lives on the node that stored it; copied host to host when needed."""

from __future__ import annotations

import asyncio
import errno
import io
import random
from collections.abc import Sequence
from typing import Any, BinaryIO

import ray

from sandkernel.errors import (
    BadInput,
    FileNotFoundInStore,
    SandboxUnavailable,
    SessionNotFound,
)
from sandkernel.files import StoredFile
from sandkernel.limits import check_id
from sandkernel.ray._handle import HostGone, HostHandle
from sandkernel.ray._protocol import Raised, file_tag, session_id_of
from sandkernel.ray._routing import SessionRouting
from sandkernel.ray._uploads import read_upload
from sandkernel.ray.errors import FileLost, SessionLost
from sandkernel.session import UploadSource

_READ_CHUNK = 1 << 20


class ClusterFiles(SessionRouting):
    """The engine's file methods, routed by the node tag in each file id."""

    def _file_host(self, file_id: str) -> HostHandle:
        tag = file_tag(file_id)
        if tag is None:
            raise FileNotFoundInStore(f"no file with id {file_id!r}: not a file id of a cluster")
        host = self._by_tag.get(tag)
        if host is not None and not host.gone:
            return host
        lost = self._lost_at(tag)
        if lost is not None:
            raise FileLost(f"file {file_id!r} was stored on {lost.where}, which {lost.reason}")
        raise FileNotFoundInStore(f"no file with id {file_id!r}: no node of the cluster has it")

    async def _file_call(self, method: str, file_id: str, *args: Any) -> Any:
        self._require_running()
        host = self._file_host(file_id)
        try:
            return await host.call(method, file_id, *args)
        except HostGone:
            raise FileLost(
                f"file {file_id!r} was stored on {host.describe()}, which {host.lost_reason}"
            ) from None

    async def _bring_files(
        self, target: HostHandle, session_name: str, file_ids: Sequence[str]
    ) -> None:
        """Copy other nodes' files to ``target`` for session ``session_name``."""
        sources = {f: self._file_host(f).actor for f in file_ids}
        try:
            await target.call("import_files", sources, session_name)
        except HostGone:
            raise SessionLost(
                f"session {session_id_of(target.tag, session_name)!r} was on "
                f"{target.describe()}, which {target.lost_reason}"
            ) from None

    def _home(self) -> HostHandle:
        """Where a fresh upload goes: this driver's node if it has a host, else the emptiest."""
        hosts = self._alive()
        if not hosts:
            raise SandboxUnavailable(self._no_hosts_message())
        here = ray.get_runtime_context().get_node_id()
        for host in hosts:
            if host.node_id == here:
                return host
        return max(hosts, key=lambda h: (h.free_slots, random.random()))  # noqa: S311

    async def upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store a file and get its id (which names its node). See ``Engine.upload``.

        An agent's file is also copied to every node running a session of the
        agent (and to any node that starts one later).
        """
        self._require_running()
        if session_id is not None:
            if agent_id is not None:
                raise BadInput("a file goes to a session or to an agent, not both")
            session = await self._lookup(session_id)
            return await session._store_upload(source, name, retention_s=retention_s)
        if agent_id is not None:
            check_id(agent_id, "agent")
        data, filename = await read_upload(source, name, self.max_upload_bytes)
        home = self._home()
        try:
            stored: StoredFile = await home.call("store", data, filename, agent_id, retention_s)
        except HostGone:
            raise SandboxUnavailable(
                f"{home.describe()}, where the file was being stored, {home.lost_reason}; "
                "upload it again"
            ) from None
        if agent_id is not None:
            await self._spread_agent_files(agent_id, [stored], home)
        return stored

    async def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        """Give stored files to an agent: they appear, read-only, in its sessions on every node."""
        self._require_running()
        check_id(agent_id, "agent")
        attached: dict[str, StoredFile] = {}
        by_host: dict[str, tuple[HostHandle, list[str]]] = {}
        for file_id in file_ids:
            host = self._file_host(file_id)
            by_host.setdefault(host.node_id, (host, []))[1].append(file_id)
        # All checked before any is given, as the local engine does: a refused id on
        # one node leaves the agent's files on the others as they were.
        for file_id in file_ids:
            stored = await self.file(file_id)
            if stored.session_id is not None or stored.agent_id not in (None, agent_id):
                raise FileNotFoundInStore(f"no file {file_id!r} that can be given to an agent")
        for host, ids in by_host.values():
            try:
                files: list[StoredFile] = await host.call("attach_to_agent", agent_id, ids)
            except HostGone:
                raise FileLost(
                    f"file {ids[0]!r} was stored on {host.describe()}, which {host.lost_reason}"
                ) from None
            attached.update(zip(ids, files, strict=True))
            await self._spread_agent_files(agent_id, files, host)
        return [attached[f] for f in file_ids]

    async def _spread_agent_files(
        self, agent_id: str, files: list[StoredFile], source: HostHandle
    ) -> None:
        others = [h for h in self._alive() if h is not source]
        flags = await asyncio.gather(
            *(h.call("has_agent_sessions", agent_id) for h in others), return_exceptions=True
        )
        targets = [h for h, flag in zip(others, flags, strict=True) if flag is True]
        sources = {f.id: source.actor for f in files}
        await asyncio.gather(
            *(h.call("import_files", sources, None) for h in targets), return_exceptions=True
        )

    async def _sync_agent_files(self, agent_id: str, target: HostHandle) -> None:
        """Copy to ``target`` the agent's files it lacks (same name and content)."""
        hosts = self._alive()
        manifests = await asyncio.gather(
            *(h.call("agent_files", agent_id) for h in hosts), return_exceptions=True
        )
        have: set[tuple[str, str]] = set()
        for host, files in zip(hosts, manifests, strict=True):
            if host is target and isinstance(files, list):
                have = {(f.name, f.sha256) for f in files}
        wanted: dict[tuple[str, str], tuple[str, HostHandle]] = {}
        for host, files in zip(hosts, manifests, strict=True):
            if host is target or not isinstance(files, list):
                continue
            for f in files:
                key = (f.name, f.sha256)
                if key not in have and key not in wanted:
                    wanted[key] = (f.id, host)
        if wanted:
            sources = {file_id: host.actor for file_id, host in wanted.values()}
            await target.call("import_files", sources, None)

    async def file(self, file_id: str) -> StoredFile:
        """A stored file's metadata, from the node that holds it. Raises FileNotFoundInStore."""
        stored: StoredFile = await self._file_call("file", file_id)
        return stored

    async def download(self, file_id: str, *, max_bytes: int | None = None) -> bytes:
        """A stored file's bytes (or its first ``max_bytes``), from the node that holds it."""
        if max_bytes is None:
            data: bytes = await self._file_call("download", file_id)
            return data

        def head() -> bytes:
            with self.open_file(file_id) as handle:
                return handle.read(max_bytes)

        return await asyncio.to_thread(head)

    def open_file(self, file_id: str) -> BinaryIO:
        """A stored file as a binary stream, read from its node in 1 MiB chunks.

        Blocking, as ``Engine.open_file``: call it (and read) from a worker thread.
        """
        self._require_running()
        host = self._file_host(file_id)
        try:
            reply = ray.get(host.submit("file", file_id))
        except (ray.exceptions.RayActorError, HostGone):
            raise FileLost(f"file {file_id!r} was stored on {host.describe()}") from None
        if isinstance(reply, Raised):
            raise reply.error
        raw = RemoteFile(host, file_id, reply.size_bytes)
        return io.BufferedReader(raw, buffer_size=_READ_CHUNK)

    async def list_files(
        self, *, session_id: str | None = None, agent_id: str | None = None
    ) -> list[StoredFile]:
        """Stored files of every node, optionally of one session or one agent.

        Each upload is listed, as by ``Engine.list_files``; a file copied to
        other nodes (an agent's, or an upload attached to a session elsewhere)
        is listed once, as its original.
        """
        self._require_running()
        if session_id is not None:
            try:
                session = await self._lookup(session_id)
            except SessionNotFound:
                return []  # as the local store answers for a session it has no files of
            files: list[StoredFile] = await session._call(
                "list_files", session.name, agent_id, usable=False
            )
            return files
        replies = await asyncio.gather(
            *(h.call("catalog", agent_id) for h in self._alive()), return_exceptions=True
        )
        merged: dict[str, StoredFile] = {}  # original's id -> the file listed for it
        for reply in replies:
            if not isinstance(reply, list):
                continue
            for f, origin in reply:
                kept = merged.get(origin)
                # The original if its node answered, else the earliest of its copies.
                if (
                    kept is None
                    or f.id == origin
                    or (kept.id != origin and f.created_at < kept.created_at)
                ):
                    merged[origin] = f
        return sorted(merged.values(), key=lambda f: (f.created_at, f.id))

    async def delete_file(self, file_id: str) -> None:
        """Delete a stored file, and the copies nodes made of it to run sessions."""
        stored: StoredFile = await self._file_call("delete_file", file_id)
        owner = self._file_host(file_id)
        agent_file = None
        if stored.agent_id is not None and stored.session_id is None:
            agent_file = (stored.agent_id, stored.name, stored.sha256)
        await asyncio.gather(
            *(
                # Its own node keeps its other files of that name and content.
                h.call("drop_copies", file_id, None if h is owner else agent_file)
                for h in self._alive()
            ),
            return_exceptions=True,
        )


class RemoteFile(io.RawIOBase):
    """A stored file of some node, read in chunks with blocking Ray calls."""

    def __init__(self, host: HostHandle, file_id: str, size: int) -> None:
        super().__init__()
        self._host = host
        self._file_id = file_id
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:  # as a local file's seek
            raise OSError(errno.EINVAL, f"seek to {base + offset}: before the file's start")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size = min(len(view), _READ_CHUNK, self._size - self._pos)
        if size <= 0:
            return 0
        try:
            reply = ray.get(self._host.actor.read_chunk.remote(self._file_id, self._pos, size))
        except ray.exceptions.RayActorError:
            raise FileLost(
                f"file {self._file_id!r}: {self._host.describe()} left while it was read"
            ) from None
        if isinstance(reply, Raised):
            raise reply.error
        view[: len(reply)] = reply
        self._pos += len(reply)
        return len(reply)
