"""Which files a thread's sandbox sees, and the thread's one session.

OpenAI lets one uploaded file serve any number of assistants and threads;
the engine's store gives a file at most one session and one agent. So:

- an assistant's ``code_interpreter`` files are copies in the store, given
  to the agent named by the assistant's id (the content is stored once).
  Every session of that agent sees them read-only in ``/mnt/data``; taking a
  file off the assistant deletes its copy, so new sessions no longer see it.
- a thread's files (its ``tool_resources`` and its messages' attachments)
  are given to its session when a run starts: the uploaded file itself if
  no one else has it, otherwise a copy.

``file_links`` in the state remembers which engine file stands for which
OpenAI id, and where it is in the sandbox.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from sandkernel.api import EngineAPI, SessionAPI
from sandkernel.errors import FileNotFoundInStore, SessionError
from sandkernel.files import StoredFile
from sandkernel.openai_api.errors import bad_request
from sandkernel.openai_api.state import ApiState, FileLink, ThreadState
from sandkernel.openai_api.wire import Message, Run, Thread
from sandkernel.sandbox import WORKSPACE_IN_JAIL
from sandkernel.workspace.place import candidate_names

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """What a run's sandbox holds, told to the model, and the thread's session once code runs.

    Made when the run starts from what is stored, without a session: one is
    only made (or taken up again) when the run first calls the interpreter
    (:meth:`Placement.ready`), which puts the files in place and makes the
    paths here the ones they got.
    """

    thread_id: str
    assistant_id: str
    #: the session earlier code of this thread ran in is gone: its variables are gone
    replaced: bool
    #: the thread's code interpreter files (OpenAI ids), in the order they are placed
    file_ids: list[str] = field(default_factory=list)
    #: OpenAI file id -> path in the sandbox, for the thread's files
    paths: dict[str, str] = field(default_factory=dict)
    #: OpenAI file id -> name, for thread files whose path is known only once placed
    unplaced: dict[str, str] = field(default_factory=dict)
    #: where the assistant's files (read-only) are
    assistant_paths: list[str] = field(default_factory=list)
    #: files earlier code wrote, put back into a new session: name -> path
    restored: dict[str, str] = field(default_factory=dict)
    #: thread files that could not be placed (deleted since), by OpenAI id
    missing: list[str] = field(default_factory=list)
    #: the thread's session, once the run called the interpreter
    session: SessionAPI | None = None
    #: the thread's session that lived when the run started (its variables are told of)
    live: SessionAPI | None = None


async def uploaded_file(engine: EngineAPI, state: ApiState, file_id: str) -> StoredFile:
    """The file a caller uploaded to ``/files`` with this id.

    Raises:
        FileNotFoundInStore: there is none, or the id is one of this API's
            own files (:meth:`ApiState.own_files`), which ``/files`` does not have.
    """
    stored = await engine.file(file_id)
    if await anyio.to_thread.run_sync(state.own_files, [(stored.id, stored.session_id)]):
        raise FileNotFoundInStore(f"no uploaded file has the id {file_id}")
    return stored


class Placement:
    """Gives assistants and threads their files, through the engine contract."""

    def __init__(self, engine: EngineAPI, state: ApiState) -> None:
        self.engine = engine
        self.state = state

    async def check_files(self, file_ids: Sequence[str], param: str) -> list[StoredFile]:
        """The stored files, or a 400 naming the first unknown id."""
        found = []
        for i, file_id in enumerate(file_ids):
            try:
                found.append(await uploaded_file(self.engine, self.state, file_id))
            except FileNotFoundInStore:
                where = (
                    param if len(file_ids) == 1 and not param.endswith("ids") else f"{param}[{i}]"
                )
                raise bad_request(f"No file found with id '{file_id}'.", where) from None
        return found

    # ------------------------------------------------------------------ assistants

    async def set_assistant_files(self, assistant_id: str, file_ids: Sequence[str]) -> None:
        """Make the assistant's agent files exactly copies of ``file_ids``."""
        links = {link.file_id: link for link in await self._links(assistant_id)}
        for file_id in file_ids:
            if file_id in links:
                continue
            stored = await self.engine.file(file_id)
            content = await self.engine.download(file_id)
            copy = await self.engine.upload(content, stored.name, agent_id=assistant_id)
            await anyio.to_thread.run_sync(
                self.state.link, FileLink(assistant_id, file_id, copy.id, None)
            )
        gone = [link for file_id, link in links.items() if file_id not in file_ids]
        await self._delete_copies(gone)
        if gone:
            await anyio.to_thread.run_sync(
                self.state.unlink, assistant_id, [link.file_id for link in gone]
            )

    async def drop_owner(self, owner_id: str) -> None:
        """Delete the copies an assistant or thread had (before its links are deleted)."""
        await self._delete_copies(await self._links(owner_id))

    async def drop_file(self, file_id: str) -> None:
        """An uploaded file is being deleted: delete its copies and links too."""
        links = await anyio.to_thread.run_sync(self.state.links_to, file_id)
        await self._delete_copies(links)
        for link in links:
            await anyio.to_thread.run_sync(self.state.unlink, link.owner_id, [file_id])

    async def _delete_copies(self, links: Sequence[FileLink]) -> None:
        for link in links:
            if link.local_id != link.file_id:
                try:
                    await self.engine.delete_file(link.local_id)
                except FileNotFoundInStore:
                    pass

    async def _links(self, owner_id: str) -> list[FileLink]:
        return await anyio.to_thread.run_sync(self.state.links, owner_id)

    # ------------------------------------------------------------------ threads

    async def workspace(self, thread: Thread, run: Run, messages: Sequence[Message]) -> Workspace:
        """What the run's sandbox will hold, from the stored files alone (no session is made).

        The thread's session (its id is the thread's) is taken up again if it
        lives and was made for this run's assistant; otherwise the first code
        call makes a new one, which gets the files earlier code wrote back, and
        ``replaced`` says the variables of that code are gone.

        The paths are the ones :meth:`ready` will give the files: a new session
        is filled as the engine fills it (the assistant's files, then what
        earlier code wrote, then the thread's files, each under the first of
        its names that is free), foreseen by :class:`_NewWorkspace`. A file
        whose path cannot be foreseen is in ``unplaced``: the model is told
        its path once code has run.
        """
        thread_state = await self._thread_state(thread.id)
        live = await self._session_of(thread.id)
        if thread_state.session_agent_id != run.assistant_id:
            live = None  # made for another assistant: the first code call replaces it
        elif live is not None and await _renewed(live) is None:
            live = None  # ended just now: as if it had not lived
        space = Workspace(
            thread_id=thread.id,
            assistant_id=run.assistant_id,
            replaced=live is None and thread_state.ran_code,
            file_ids=thread_files(thread, messages),
            live=live,
        )
        links = {link.file_id: link for link in await self._links(thread.id)}
        names = _NewWorkspace()
        # Placed first when a session starts, so where this says in a live one too (unless
        # its kernel was restarted: the session's own files go back before them then).
        for stored in await self.engine.list_files(agent_id=run.assistant_id):
            if stored.session_id is None:
                space.assistant_paths.append(names.place(stored) or stored.name)
        taken: set[str] = set()
        if live is None:
            for stored in await self._outputs(thread.id, links, space.file_ids):
                space.restored[stored.name] = names.place(stored) or stored.name
        else:
            taken = {*names.paths(), *(link.path for link in links.values() if link.path)}
            taken |= {f.path for f in await self.engine.list_files(session_id=thread.id) if f.path}
        for file_id in space.file_ids:
            link = links.get(file_id)
            try:
                stored = await self.engine.file(link.local_id if link is not None else file_id)
            except FileNotFoundInStore:
                space.missing.append(file_id)
                continue
            path: str | None
            if live is None:
                # A file another session holds is placed as a copy, made then: its id,
                # which names it where its own name is taken, is not known yet.
                itself = link is not None or self._given_itself(thread.id, stored)
                path = names.place(stored, known_id=itself)
            elif link is not None and link.path is not None:
                path = link.path
            else:
                # Added to a live session: what it holds is only partly known here
                # (the code may have made files), so a name seen taken is not foreseen.
                path = f"{WORKSPACE_IN_JAIL}/{stored.name}"
                path = None if path in taken else path
            if path is None:
                space.unplaced[file_id] = stored.name
            else:
                space.paths[file_id] = path
        return space

    async def ready(self, space: Workspace) -> SessionAPI:
        """The thread's session for the run's code, with every file of the thread in place.

        Made now if the thread has none (or one made for another assistant,
        which is closed): the files earlier code of the thread wrote are put
        back, and if code ran in the session it replaces, ``space.replaced``
        says so. The thread's files are placed (again, in a new session) and
        ``space`` gets the paths they have.

        The session an earlier call of the run used is renewed; if it ended
        since (its time to live ran out, it was closed), a new one replaces it
        as above.
        """
        if space.session is not None:
            if await _renewed(space.session) is not None:
                return space.session
            space.session = space.live = None
        thread_id = space.thread_id
        thread_state = await self._thread_state(thread_id)
        session = await self._session_of(thread_id)
        if session is not None and thread_state.session_agent_id != space.assistant_id:
            # Agent files are given when a session starts: another assistant needs another.
            await self.engine.close_session(thread_id)
            session = None
        links = {link.file_id: link for link in await self._links(thread_id)}
        if session is None:
            session = await self.engine.session(
                thread_id, agent_id=space.assistant_id, if_expired="new"
            )
            try:
                await self._fill(space, session, thread_state, links)
            except BaseException:
                # A session that did not get its files is not the thread's: closed,
                # the next run makes it again, puts the files back and says so.
                with anyio.CancelScope(shield=True), contextlib.suppress(SessionError):
                    await self.engine.close_session(thread_id)
                raise
            space.session = session
            return session
        await self._place_thread_files(space, session, links, fresh=False)
        space.session = session
        return session

    async def keep_alive(self, space: Workspace) -> float | None:
        """Renew the thread's session the run uses: its new expiry (a Unix time).

        None if there is none: no code ran yet and none lived when the run
        started, or it ended (the run's next code call makes a new one).
        """
        session = space.session or space.live
        return None if session is None else await _renewed(session)

    async def _fill(
        self,
        space: Workspace,
        session: SessionAPI,
        thread_state: ThreadState,
        links: dict[str, FileLink],
    ) -> None:
        """Put a new session's files in: what earlier code wrote, then the thread's."""
        thread_id = space.thread_id
        space.replaced = space.replaced or thread_state.ran_code
        space.restored = await self._restore_outputs(session, thread_id, links, space.file_ids)
        await self._place_thread_files(space, session, links, fresh=True)
        # The thread's state names this session once it holds what it should.
        new_state = ThreadState(session_agent_id=space.assistant_id, ran_code=False)
        await anyio.to_thread.run_sync(lambda: self.state.save(private={thread_id: new_state}))

    async def _place_thread_files(
        self, space: Workspace, session: SessionAPI, links: dict[str, FileLink], *, fresh: bool
    ) -> None:
        """Attach the thread's files to ``session`` (a live one keeps those it has)."""
        thread_id = space.thread_id
        space.paths, space.unplaced, space.missing = {}, {}, []
        for file_id in space.file_ids:
            link = links.get(file_id)
            if link is not None and link.path is not None and not fresh:
                space.paths[file_id] = link.path
                continue
            try:
                local_id = (
                    link.local_id if link is not None else await self._local(thread_id, file_id)
                )
                (path,) = await session.attach([local_id])
            except FileNotFoundInStore:
                space.missing.append(file_id)
                continue
            await anyio.to_thread.run_sync(
                self.state.link, FileLink(thread_id, file_id, local_id, path)
            )
            space.paths[file_id] = path

    async def _thread_state(self, thread_id: str) -> ThreadState:
        return await anyio.to_thread.run_sync(self.state.private, Thread, thread_id, ThreadState)

    async def _session_of(self, thread_id: str) -> SessionAPI | None:
        """The thread's session if it lives (never makes one)."""
        try:
            return await self.engine.get_session(thread_id)
        except SessionError:
            return None

    async def _local(self, thread_id: str, file_id: str) -> str:
        """The engine file the thread's session gets for an uploaded file: itself, or a copy."""
        stored = await self.engine.file(file_id)
        if self._given_itself(thread_id, stored):
            return file_id
        copy = await self.engine.upload(await self.engine.download(file_id), stored.name)
        return copy.id

    @staticmethod
    def _given_itself(thread_id: str, stored: StoredFile) -> bool:
        """The thread's session is given the file itself: it is the thread's, or no one's yet."""
        return stored.session_id == thread_id or (
            stored.session_id is None and stored.agent_id is None
        )

    async def _outputs(
        self, thread_id: str, links: dict[str, FileLink], file_ids: Sequence[str]
    ) -> list[StoredFile]:
        """The latest version of each file earlier code of the thread wrote, by path.

        A file code wrote that is also one of the thread's files (attached to a
        message since) is placed as a thread file, not here.
        """
        inputs = {links[f].local_id if f in links else f for f in file_ids}
        latest: dict[str, StoredFile] = {}
        for stored in await self.engine.list_files(session_id=thread_id):
            if stored.origin != "produced" or not stored.path or stored.id in inputs:
                continue
            known = latest.get(stored.path)
            if known is None or stored.created_at >= known.created_at:
                latest[stored.path] = stored
        return list(latest.values())

    async def _restore_outputs(
        self,
        session: SessionAPI,
        thread_id: str,
        links: dict[str, FileLink],
        file_ids: Sequence[str],
    ) -> dict[str, str]:
        """Put back the latest version of each file earlier code of the thread wrote."""
        restored = {}
        for stored in await self._outputs(thread_id, links, file_ids):
            try:
                (path,) = await session.attach([stored.id])
            except FileNotFoundInStore:
                continue
            restored[stored.name] = path
        return restored


async def _renewed(session: SessionAPI) -> float | None:
    """Its time to live counted again from now: its new expiry; None if it has ended."""
    try:
        return await session.extend()
    except SessionError:
        return None


class _NewWorkspace:
    """A new session's ``/mnt/data`` as the engine fills it, foreseen from the stored files.

    Each file is placed under the first of its names
    (:func:`~sandkernel.workspace.place.candidate_names`) that is free or
    already holds the same content, as the engine places a file it is given;
    placing the files in the order the engine does gives the paths the engine
    will give them.
    """

    def __init__(self) -> None:
        #: name -> the file placed there
        self._held: dict[str, StoredFile] = {}

    def paths(self) -> list[str]:
        return [f"{WORKSPACE_IN_JAIL}/{name}" for name in self._held]

    def place(self, stored: StoredFile, *, known_id: bool = True) -> str | None:
        """Where ``stored`` goes; None if that depends on an id not known yet.

        Args:
            known_id: ``stored`` is the file placed; else a copy of it made
                then, whose id (and so any name but its own) is not known.
        """
        names = candidate_names(stored) if known_id else iter([stored.name])
        for name in names:
            there = self._held.get(name)
            if there is None or _same_content(there, stored):
                self._held[name] = stored
                return f"{WORKSPACE_IN_JAIL}/{name}"
        return None


def _same_content(a: StoredFile, b: StoredFile) -> bool:
    return (a.size_bytes, a.sha256) == (b.size_bytes, b.sha256)


def thread_files(thread: Thread, messages: Sequence[Message]) -> list[str]:
    """The thread's code interpreter files: its resources', then its messages' attachments.

    The attachments of the answers runs gave are files the code wrote: those
    are put back as such (the latest version of each, see
    :meth:`Placement.ready`), not as files given to the thread.
    """
    found = dict.fromkeys(thread.tool_resources.file_ids())
    for message in messages:
        if message.run_id is not None:
            continue
        for attachment in message.attachments:
            if not attachment.tools or any(t.type == "code_interpreter" for t in attachment.tools):
                found.setdefault(attachment.file_id)
    return list(found)
