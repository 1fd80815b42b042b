"""One session's files: its view of the store and of its kernel's workspace.

The engine gives each session a :class:`SessionWorkspace` built from exactly
what it needs (the store, the output caps, the session's and agent's ids);
the session asks it to fill a new kernel's workspace, to place files, and to
collect what a cell produced. It knows nothing of the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from sandkernel.errors import EngineClosed, FileNotFoundInStore, FileRejected, SandkernelError
from sandkernel.files import FileStore, StoredFile, UploadSource, listed_file_name
from sandkernel.results import ExecutionResult
from sandkernel.sandbox import WORKSPACE_IN_JAIL
from sandkernel.workspace.collect import (
    OutputCaps,
    ProducedVersions,
    collect_outputs,
    shown_images,
)
from sandkernel.workspace.place import (
    WorkspaceState,
    candidate_names,
    place_file,
    restore_files,
)
from sandkernel.workspace.scan import empty_workspace_stamps, workspace_unchanged

log = logging.getLogger(__name__)


class SessionWorkspace:
    """What one session may do with the store, and what its workspace holds.

    A session may use files uploaded to it, files it produced, files of its
    agent, and fresh uploads nobody owns yet (which then become its own);
    never another session's or another agent's: those ids are "not found".

    A session's kernel, and so its workspace folder, is replaced when the
    kernel dies; each method takes the folder it works on (the host path of
    the kernel's ``/mnt/data``). The methods run the blocking store and file
    work in a worker thread.

    Args:
        store: where files are kept; the engine closes it when it stops.
        caps: bounds on what one cell, and the session, may add to the store.
        session_id: the session's id; files it uploads or produces are its own.
        agent_id: the agent the session works for: its files are placed read-only.
    """

    def __init__(
        self,
        store: FileStore,
        caps: OutputCaps,
        *,
        session_id: str,
        agent_id: str | None = None,
    ) -> None:
        self._store = store
        self.caps = caps
        self.session_id = session_id
        self.agent_id = agent_id
        self.state = WorkspaceState()
        #: what the session produced, over all its kernels: what its byte cap counts
        self.versions = ProducedVersions()
        #: the session's own uploads as placed, by id: what an upload of the name
        #: replaces, even once deleted from the store (see :meth:`_replaced`)
        self._uploads: dict[str, StoredFile] = {}
        #: paths the last restart could not put back (deleted or expired, or their
        #: place taken); the restart's first result says so
        self.not_restored: list[str] = []

    def forget(self) -> None:
        """Drop what is known of the workspace, once the session has ended.

        Its kernel and folder are gone; an ended session is kept a while for
        its info, and its workspace's snapshot (an entry per file it held)
        would be kept with it. Its files stay in the store.
        """
        self.state = WorkspaceState()
        self.versions = ProducedVersions()
        self._uploads = {}
        self.not_restored = []

    def _open_store(self) -> FileStore:
        if self._store.closed:
            # The engine closes its store as it stops: to the caller, the engine is gone.
            raise EngineClosed("the engine is not running: its file store is closed")
        return self._store

    async def prepare(self, folder: Path, *, restart: bool) -> None:
        """Fill a new kernel's workspace: after a restart, the session's files; the agent's.

        The session's own files go back first, each at its path, so that an
        agent file whose name one of them took is again the one suffixed. A
        file given to the agent meanwhile may be missed: once the kernel is the
        session's, :meth:`give_missed_agent_files` places it.
        """
        store = self._open_store()
        previous, self.state = dict(self.state.latest), WorkspaceState()
        # A fresh workspace is empty: proved so now, its first cell needs no scan.
        self.state.dirs = empty_workspace_stamps(folder)
        self.not_restored = []
        if restart and previous:
            self.not_restored = await asyncio.to_thread(
                restore_files, store, previous, folder, self.state
            )
        await self.place_agent_files(folder, await self._missed_agent_files(store))

    async def place_agent_files(self, folder: Path, files: Sequence[StoredFile]) -> None:
        """Copy files of the session's agent into the workspace, read-only."""
        store = self._open_store()
        for stored in files:
            await asyncio.to_thread(place_file, store, stored, folder, self.state, read_only=True)

    async def give_agent_file(self, folder: Path, stored: StoredFile) -> None:
        """Place a file given to the agent in the live session's workspace, or log why not.

        One session's full (or vanishing) workspace is not the file's failure:
        the file is the agent's, and its other sessions get it.
        """
        try:
            await self.place_agent_files(folder, [stored])
        except (SandkernelError, OSError) as exc:
            log.warning(
                "agent %s's session %s did not get %s: %s",
                self.agent_id, self.session_id, stored.name, exc,
            )  # fmt: skip

    async def give_missed_agent_files(self, folder: Path) -> None:
        """Place the files given to the agent while this workspace was being filled.

        The engine gives a new agent file to the sessions that have a kernel;
        a session whose workspace is being filled (for its first kernel, or
        after a restart) is not one of them yet. Called once the new kernel is
        the session's, after which every file given reaches it, this places
        those given before.
        """
        for stored in await self._missed_agent_files(self._open_store()):
            await self.give_agent_file(folder, stored)

    async def _missed_agent_files(self, store: FileStore) -> list[StoredFile]:
        """The files of the session's agent the workspace does not hold (a fresh one: all)."""
        if self.agent_id is None:
            return []
        listed = await asyncio.to_thread(store.list, agent_id=self.agent_id)
        # A copy, taken at once: an agent's file may be placed meanwhile, from another thread.
        held = set(dict(self.state.latest).values())
        return [f for f in listed if f.session_id is None and f.id not in held]

    async def attach(self, folder: Path, file_ids: Sequence[str]) -> list[str]:
        """Copy stored files into the workspace; return their paths in the sandbox.

        A file whose copy is still there unchanged is where it is. One the
        code changed since (or whose name something else took) is copied
        again under a free name: the path returned holds exactly the stored
        file, and nothing in the workspace is written over, the session's
        later upload of the same name included (only :meth:`upload` replaces).

        Raises:
            FileNotFoundInStore: an id this session may not use (or none at all).
            FileRejected: no free name for it, or the workspace refused the copy
                (FileTooLarge: no room for it).
        """
        store = self._open_store()
        return [
            await asyncio.to_thread(self._attach_one, store, folder, file_id)
            for file_id in file_ids
        ]

    def _attach_one(self, store: FileStore, folder: Path, file_id: str) -> str:
        stored = self._usable(store, file_id)
        if stored.session_id is None and stored.agent_id is not None:
            return listed_file_name(place_file(store, stored, folder, self.state, read_only=True))
        if stored.session_id is None:
            stored = store.attach(file_id, session_id=self.session_id)
        # Never replacing: an attach names a file the client already has, maybe
        # an upload a newer one replaced (clients send all their ids again with
        # each run); written over that newer one, it would undo the correction.
        path = place_file(store, stored, folder, self.state, read_only=False)
        if stored.origin == "uploaded":
            # A produced file's path is where the code wrote it; it keeps that.
            self._remember_upload(_record_placement(store, stored, path, None))
        return listed_file_name(path)  # as a produced file's path is listed

    def _replaced(self, store: FileStore, new: StoredFile) -> StoredFile | None:
        """The session's own upload that the new upload ``new``, of its name, supersedes, if any.

        Users upload a corrected file under the same name, and the code must
        find the new content where it read the old. Only the session's own
        uploads give their name up: an agent's file is shared and read-only,
        and a file the code produced (or changed: it is then a produced file)
        is the code's work; ``new`` is placed beside those, suffixed.

        An upload deleted from the store (or expired) since it was placed is
        replaced too, as it was placed: clients delete a file, then upload
        the corrected one. Its copy in the workspace, still unchanged, is the
        deleted file, and the code must find the new content where it read it.
        """
        if new.origin != "uploaded":
            return None
        held = self.state.latest.get(f"{WORKSPACE_IN_JAIL}/{new.name}")
        if held is None or held == new.id:
            return None
        try:
            earlier = store.get(held)
        except SandkernelError:
            # Only its metadata is gone: as it was placed (its size and hash),
            # it tells whether the workspace still holds it unchanged.
            return self._uploads.get(held)
        if earlier.origin == "uploaded" and earlier.session_id == self.session_id:
            return earlier
        return None

    def _remember_upload(self, placed: StoredFile) -> None:
        """Keep the session's upload as placed; forget those the workspace no longer holds."""
        held = set(dict(self.state.latest).values())
        self._uploads = {i: f for i, f in self._uploads.items() if i in held}
        if placed.id in held:
            self._uploads[placed.id] = placed

    def _usable(self, store: FileStore, file_id: str) -> StoredFile:
        stored = store.get(file_id)
        if stored.session_id not in (None, self.session_id) or (
            stored.session_id is None and stored.agent_id not in (None, self.agent_id)
        ):
            raise FileNotFoundInStore(f"no file {file_id!r} for session {self.session_id!r}")
        return stored

    async def upload(
        self,
        folder: Path | None,
        source: UploadSource,
        name: str | None,
        *,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store a file for this session and place it in the workspace.

        Without a workspace (the session's kernel died) the file is placed in
        the next one, with the session's other files, when a restart makes it.

        A file of the same name the session uploaded earlier, still there
        unchanged, is replaced; any other file of that name stays, and the
        upload gets a suffixed name (see :func:`~sandkernel.workspace.place.place_file`).
        The returned file's ``path`` says where it is.

        Raises:
            FileRejected: unsupported type, mislabelled content, over the size cap,
                no free name for it; FileTooLarge when the workspace has no room left.
        """
        store = self._open_store()
        stored = await asyncio.to_thread(
            store.add_upload, source, name, session_id=self.session_id, retention_s=retention_s
        )
        try:
            return await asyncio.to_thread(self._place_upload, store, folder, stored)
        except BaseException:
            # Not in the workspace: not the session's either (nothing to list or restore).
            with contextlib.suppress(SandkernelError):
                await asyncio.to_thread(store.delete, stored.id)
            raise

    def _place_upload(
        self, store: FileStore, folder: Path | None, stored: StoredFile
    ) -> StoredFile:
        replaced = self._replaced(store, stored)
        if folder is not None:
            path = place_file(
                store, stored, folder, self.state, read_only=False, replacing=replaced
            )
        else:
            path = self._path_after_restart(stored, replaced)
            self.state.latest[path] = stored.id
        placed = _record_placement(store, stored, path, replaced)
        self._remember_upload(placed)
        return placed

    def _path_after_restart(self, stored: StoredFile, replaced: StoredFile | None) -> str:
        """Where an upload made while the kernel is dead will be in the next workspace.

        A restart puts the session's files back at their paths (see
        :meth:`prepare`): the upload takes the path of the one it replaces,
        else the first of its names no other file of the session holds.
        """
        held_by_replaced = replaced.id if replaced is not None else None
        for name in candidate_names(stored):
            path = f"{WORKSPACE_IN_JAIL}/{name}"
            if self.state.latest.get(path) in (None, held_by_replaced):
                return path
        raise FileRejected(
            f"cannot place {stored.name!r} in {WORKSPACE_IN_JAIL}: that name and its suffixed "
            "forms are all taken by the session's files; delete some of them"
        )

    async def collect(self, folder: Path, result: ExecutionResult) -> ExecutionResult:
        """Register what the cell produced; return the result with its files.

        A cell that displayed no image and left the workspace as the last scan
        saw it (proved by :func:`~sandkernel.workspace.scan.workspace_unchanged`:
        a few ``stat`` calls, made here) produced nothing: no worker thread,
        no scan, no store. Anything else is scanned and stored in a worker
        thread.
        """
        self._open_store()
        dirs = self.state.dirs
        if (
            dirs is not None
            and not shown_images(result)
            and workspace_unchanged(folder, self.state.snapshot, dirs)
        ):
            return result
        return await asyncio.to_thread(
            collect_outputs,
            self._open_store(),
            folder,
            self.state,
            result,
            session_id=self.session_id,
            caps=self.caps,
            versions=self.versions,
        )

    async def list(self) -> list[StoredFile]:
        """The session's files (uploaded to it and produced by it)."""
        return await asyncio.to_thread(self._open_store().list, session_id=self.session_id)


def _record_placement(
    store: FileStore, stored: StoredFile, path: str, replaced: StoredFile | None
) -> StoredFile:
    """Record where an upload is in the sandbox; one it replaced there is nowhere now."""
    if replaced is not None and path == f"{WORKSPACE_IN_JAIL}/{stored.name}":
        with contextlib.suppress(FileNotFoundInStore):  # deleted (or expired): nothing to say
            store.set_path(replaced.id, None)
    return store.set_path(stored.id, path)
