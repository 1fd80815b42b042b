"""OpenAI's Containers API: a container is a sandkernel session, its files the session's.

A container's id is its session's id. ``expires_after`` (anchor
``last_active_at``, in minutes) is the session's time to live, renewed with
``extend`` on every use (a file added, a response that runs code in it); a
container whose session has ended (expired, closed, lost) is ``expired``
and answers as OpenAI's do: it is listed and retrieved, but using it is a
400 naming it. Unlike OpenAI's, an expired container's files are not
deleted with it: they stay in the engine's store, listed and downloadable
under the container, until the container (or the file) is deleted.

Container files are the session's files in the engine's store, by their
store ids: what the caller put there is ``source: user``, what code wrote
is ``source: assistant``; ``path`` is where the file is in ``/mnt/data``
(an upload whose name was taken is placed at a suffixed name, and says so).
A path code wrote again is one container file, its last version (the store
keeps the earlier ones, downloadable by id); an upload is never one of those
versions, so what the code writes neither hides nor deletes it. Deleting a
container file deletes it from the store; unlike OpenAI's, a copy already in
a running container's ``/mnt/data`` stays there until the container ends:
the engine's contract reaches a running kernel's files only through a cell,
which would count in the user's execution count and history.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable
from functools import partial
from itertools import islice
from typing import BinaryIO, Literal

import anyio

from sandkernel.api import EngineAPI, SessionAPI
from sandkernel.errors import FileNotFoundInStore, SandkernelError, SessionError
from sandkernel.files import StoredFile
from sandkernel.openai_api.errors import APIError, bad_request, from_engine_error, not_found
from sandkernel.openai_api.placement import uploaded_file
from sandkernel.openai_api.state import ApiState, UnknownCursor
from sandkernel.openai_api.wire import (
    Container,
    ContainerCreate,
    ContainerFile,
    Deleted,
    Page,
    new_id,
)
from sandkernel.workspace.place import candidate_names

MNT_DATA = "/mnt/data"
#: The only memory limit offered: the daemon's policy sets every session's memory.
MEMORY_LIMIT = "1g"


def _now() -> int:
    return int(time.time())


def check_memory_limit(memory_limit: object, param: str) -> None:
    """Refuse a container ``memory_limit`` other than the one every container runs with."""
    if memory_limit is not None and memory_limit != MEMORY_LIMIT:
        raise bad_request(
            f"memory_limit {memory_limit!r} is not offered here: every container runs "
            f"under the daemon's sandbox policy ({MEMORY_LIMIT!r}; `sandkernel serve "
            "--policy` chooses the policy). Leave memory_limit out or give '1g'.",
            param,
        )


class Containers:
    """Containers and their files on an engine, kept in the API's state.

    Args:
        engine: whose sessions are the containers.
        state: where the containers' records are kept.
        minute_s: how many seconds one of ``expires_after``'s minutes lasts
            (60; shorter only to test expiry without waiting for minutes).
    """

    #: The default of ``minute_s``.
    minute_s: float = 60.0

    def __init__(
        self, engine: EngineAPI, state: ApiState, *, minute_s: float | None = None
    ) -> None:
        self.engine = engine
        self.state = state
        if minute_s is not None:
            self.minute_s = minute_s

    async def _db[**P, R](self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await anyio.to_thread.run_sync(partial(function, *args, **kwargs))

    # ------------------------------------------------------------------ containers

    async def create(self, body: ContainerCreate) -> Container:
        container, _ = await self.create_with_files(body)
        return container

    async def create_with_files(
        self, body: ContainerCreate
    ) -> tuple[Container, builtins.list[ContainerFile]]:
        """A new container with ``body.file_ids`` put in it; also where each of those is."""
        check_memory_limit(body.memory_limit, "memory_limit")
        file_ids = list(body.file_ids or [])
        stored = [
            await self.uploaded(file_id, f"file_ids[{i}]") for i, file_id in enumerate(file_ids)
        ]
        container = Container(
            id=_new_container_id(),
            created_at=_now(),
            name=body.name,
            status="running",
            expires_after=body.expires_after,
            last_active_at=_now(),
            memory_limit=MEMORY_LIMIT,
        )
        try:
            session = await self.engine.session(container.id)
        except SandkernelError as exc:
            raise from_engine_error(exc) from exc
        try:
            await self._db(self.state.save, container)
            await session.extend(self.ttl_s(container))
            placed = await self.add_files(session, stored)
        except BaseException:
            # Refused (a file that does not fit...) or cancelled: no container is left running.
            with anyio.CancelScope(shield=True):
                await self._discard(container.id)
            raise
        return container, placed

    def ttl_s(self, container: Container) -> float:
        """The session's time to live: ``expires_after.minutes``, in seconds."""
        return container.expires_after.minutes * self.minute_s

    async def get(self, container_id: str, param: str | None = None) -> Container:
        found = await self._db(self.state.get, Container, container_id)
        if found is None:
            raise not_found("container", container_id, param)
        if found.status == "running" and await self._live(container_id) is None:
            found = found.model_copy(update={"status": "expired"})
            if not await self._db(self.state.replace, found):  # deleted meanwhile: stays so
                raise not_found("container", container_id, param)
        return found

    async def session(self, container_id: str, param: str | None = None) -> SessionAPI:
        """The running container's session, its lifetime renewed (400 if it expired)."""
        container = await self.get(container_id, param)
        session = await self._live(container_id) if container.status == "running" else None
        if session is None:
            raise APIError(
                400,
                f"Container '{container_id}' has expired (it was unused for "
                f"{container.expires_after.minutes} minutes, or it ended): create a new one.",
                param=param,
                code="container_expired",
            )
        if not await self._renew(container, session):
            raise not_found("container", container_id, param)
        return session

    async def keep_active(self, session: SessionAPI) -> float | None:
        """Renew the container a response uses: its new expiry (a Unix time).

        Its ``expires_after`` minutes count again from now, and it was last
        active now. None if it ended or was deleted meanwhile (nothing to renew).
        """
        container = await self._db(self.state.get, Container, session.id)
        if container is None or container.status != "running":
            return None
        try:
            return await self._renew(container, session)
        except SessionError:
            return None

    async def _renew(self, container: Container, session: SessionAPI) -> float | None:
        """Extend the session by the container's minutes and record the use.

        Returns:
            The session's new expiry; None if the container was deleted meanwhile.
        """
        expiry = await session.extend(self.ttl_s(container))
        used = container.model_copy(update={"last_active_at": _now()})
        return expiry if await self._db(self.state.replace, used) else None

    async def _live(self, container_id: str) -> SessionAPI | None:
        try:
            return await self.engine.get_session(container_id)
        except SessionError:
            return None

    async def list(
        self,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
        name: str | None = None,
    ) -> Page:
        try:
            items, more = await self._db(
                self.state.page, Container, name=name, order=order, after=after, limit=limit
            )
        except UnknownCursor:
            raise bad_request(
                f"No container found with id '{after}' in this list.", "after"
            ) from None
        items = [await self.get(c.id) for c in items]
        return _page(items, has_more=more)

    async def delete(self, container_id: str) -> Deleted:
        await self.get(container_id)
        if not await self._discard(container_id):  # a delete that came at the same time took it
            raise not_found("container", container_id)
        return Deleted(id=container_id, object="container.deleted")

    async def _discard(self, container_id: str) -> bool:
        """End the container's session, delete its files and its record; whether it was there."""
        try:
            await self.engine.close_session(container_id)
        except SessionError:
            pass
        for file in await self.engine.list_files(session_id=container_id):
            try:
                await self.engine.delete_file(file.id)
            except FileNotFoundInStore:
                pass
        return await self._db(self.state.delete, Container, container_id)

    # ------------------------------------------------------------------ files

    async def add_upload(self, container_id: str, source: BinaryIO, filename: str) -> ContainerFile:
        session = await self.session(container_id)
        try:
            stored = await session.upload(source, filename)
        except SandkernelError as exc:
            raise from_engine_error(exc, param="file") from exc
        return container_file(container_id, stored)

    async def add_file_id(self, container_id: str, file_id: str) -> ContainerFile:
        stored = await self.uploaded(file_id, "file_id")
        session = await self.session(container_id)
        return await self._add(session, stored)

    async def add_files(
        self, session: SessionAPI, files: builtins.list[StoredFile]
    ) -> builtins.list[ContainerFile]:
        """Put copies of uploaded files, given together, in the session; where each is, in order.

        An upload of a name the session uploaded before replaces that one (a
        corrected file, read where the old one was), but files given together
        are each wanted: a later one whose name an earlier one of them took is
        put in beside it, under its name suffixed with its id as the engine
        suffixes a taken name. A file given twice is one copy.
        """
        placed: dict[str, ContainerFile] = {}
        names: set[str] = set()
        for stored in files:
            if stored.id in placed:
                continue
            copy = stored
            if stored.name in names:
                suffixed = next(islice(candidate_names(stored), 1, None))
                copy = stored.model_copy(update={"name": suffixed})
            placed[stored.id] = await self._add(session, copy)
            names.add(stored.name)
        return [placed[stored.id] for stored in files]

    async def _add(self, session: SessionAPI, stored: StoredFile) -> ContainerFile:
        """Put a copy of an uploaded file in the session (its content is stored once).

        A copy, as OpenAI's container files are: deleting it, or the container,
        leaves the uploaded file as it was.
        """
        content = await self.engine.download(stored.id)
        try:
            local = await session.upload(content, stored.name)
        except SandkernelError as exc:
            raise from_engine_error(exc, param="file_id") from exc
        return container_file(session.id, local)

    async def uploaded(self, file_id: str, param: str) -> StoredFile:
        """The stored file a request names by id (a 400 naming ``param`` if there is none)."""
        try:
            return await uploaded_file(self.engine, self.state, file_id)
        except FileNotFoundInStore:
            raise bad_request(f"No file found with id '{file_id}'.", param) from None

    async def files(
        self, container_id: str, *, limit: int, order: Literal["asc", "desc"], after: str | None
    ) -> Page:
        await self.get(container_id)
        stored = await self.current_files(container_id)
        if order == "desc":
            stored.reverse()
        objects = [container_file(container_id, f) for f in stored]
        if after is not None:
            ids = [f.id for f in objects]
            if after not in ids:
                raise bad_request(f"No file found with id '{after}' in this list.", "after")
            objects = objects[ids.index(after) + 1 :]
        return _page(objects[:limit], has_more=len(objects) > limit)

    async def current_files(self, container_id: str) -> builtins.list[StoredFile]:
        """The container's files, oldest first: one per path, the version there now.

        Each cell that changes a file stores a new version of it; the store
        keeps the earlier ones (a citation an earlier answer gave still
        downloads what it cited), but the container holds one file at that
        path: its last version, which supersedes whatever was listed there
        before.
        """
        return _current(container_id, await self.engine.list_files(session_id=container_id))

    async def file(self, container_id: str, file_id: str) -> tuple[ContainerFile, StoredFile]:
        await self.get(container_id)
        try:
            stored = await self.engine.file(file_id)
        except FileNotFoundInStore:
            raise not_found("file", file_id) from None
        if stored.session_id != container_id:
            raise not_found("file", file_id)
        return container_file(container_id, stored), stored

    async def content(self, container_id: str, file_id: str) -> tuple[bytes, StoredFile]:
        _, stored = await self.file(container_id, file_id)
        try:
            return await self.engine.download(file_id), stored
        except FileNotFoundInStore:
            raise not_found("file", file_id) from None

    async def delete_file(self, container_id: str, file_id: str) -> Deleted:
        """Delete a container file; deleting what the code wrote deletes its earlier versions.

        Else the version it superseded would be listed at its path again. An
        earlier version is one the code wrote at the same path: an upload is
        never one (see :func:`_current`), and stays.
        """
        found, stored = await self.file(container_id, file_id)
        superseded: builtins.list[str] = []
        if written_by_code(stored):
            every = await self.engine.list_files(session_id=container_id)
            current = {f.id for f in _current(container_id, every)}
            if file_id in current:
                superseded = [
                    f.id
                    for f in every
                    if f.id not in current
                    and written_by_code(f)
                    and container_file(container_id, f).path == found.path
                ]
        try:
            await self.engine.delete_file(file_id)
        except FileNotFoundInStore:
            raise not_found("file", file_id) from None
        for earlier in superseded:
            try:
                await self.engine.delete_file(earlier)
            except FileNotFoundInStore:
                pass  # deleted meanwhile
        return Deleted(id=file_id, object="container.file.deleted")


def _new_container_id() -> str:
    return new_id("cntr")


def written_by_code(stored: StoredFile) -> bool:
    """A file code wrote in ``/mnt/data`` (not an upload, nor an image a cell showed)."""
    return stored.origin == "produced" and bool(stored.path)


def _replaced_upload(stored: StoredFile, ordered: list[StoredFile]) -> bool:
    """An upload a later upload of its name took the place of: it is no longer in the container.

    The engine records where each upload was placed, and clears that when a
    later upload of the session replaces it there. Not listed: its path holds
    the later upload (listed there), and a copy of it is nowhere in the
    container to read; it stays in the store, retrievable by id, until the
    container is deleted, as an earlier version of a file the code wrote does.
    An upload without a path and no later one in its place (stored before
    the engine recorded placements) is listed, as it was.
    """
    if stored.origin != "uploaded" or stored.path is not None:
        return False
    own_place = f"{MNT_DATA}/{stored.name}"
    return any(
        later.origin == "uploaded"
        and later.name == stored.name
        and later.path == own_place
        and (later.created_at, later.id) > (stored.created_at, stored.id)
        for later in ordered
    )


def _current(container_id: str, stored: list[StoredFile]) -> list[StoredFile]:
    """``stored`` oldest first, without what a later version written by code superseded.

    Only what the code wrote has earlier versions: a file it wrote again at
    the same path. An upload is the user's, never a version of the code's
    work: one the code rewrote in place stays listed beside the code's file
    (both at that path: what the user gave, and what the code made of it).
    """
    ordered = sorted(stored, key=lambda f: (f.created_at, f.id))
    paths = [container_file(container_id, f).path for f in ordered]
    last_written = {path: i for i, path in enumerate(paths) if written_by_code(ordered[i])}
    return [
        f
        for i, (f, path) in enumerate(zip(ordered, paths, strict=True))
        if not _replaced_upload(f, ordered) and (not written_by_code(f) or i >= last_written[path])
    ]


def container_file(container_id: str, stored: StoredFile) -> ContainerFile:
    """The container file ``stored`` is, at its path in the container.

    Where the engine placed it (an upload whose name was taken is at a
    suffixed name), or where the code wrote it; else (an image a cell showed,
    an upload replaced there later) ``/mnt/data`` and its name.
    """
    produced = stored.origin == "produced"
    path = stored.path or stored.name
    if not path.startswith("/"):
        path = f"{MNT_DATA}/{path}"
    return ContainerFile(
        id=stored.id,
        bytes=stored.size_bytes,
        container_id=container_id,
        created_at=int(stored.created_at),
        path=path,
        source="assistant" if produced else "user",
    )


def _page(items: list[Container] | list[ContainerFile], *, has_more: bool) -> Page:
    return Page(
        data=list(items),
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
        has_more=has_more,
    )
