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

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """A thread's session, ready for a run, and what the model should be told about it."""

    session: SessionAPI
    #: the session is not the one earlier code of this thread ran in: its variables are gone
    replaced: bool
    #: OpenAI file id -> path in the sandbox, for the thread's files
    paths: dict[str, str] = field(default_factory=dict)
    #: the assistant's files (read-only), by name
    assistant_files: list[str] = field(default_factory=list)
    #: files earlier code wrote, put back into a replaced session: name -> path
    restored: dict[str, str] = field(default_factory=dict)
    #: thread files that could not be placed (deleted since), by OpenAI id
    missing: list[str] = field(default_factory=list)


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
                found.append(await self.engine.file(file_id))
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
        """The thread's session for this run, with every file of the thread in place.

        The session (its id is the thread's) is reused while it lives and was
        made for this run's assistant; otherwise a new one is made, and if
        earlier code of the thread ran in another, the files that code wrote
        are put back and ``replaced`` says its variables are gone.
        """
        thread_state = await anyio.to_thread.run_sync(
            self.state.private, Thread, thread.id, ThreadState
        )
        session: SessionAPI | None = None
        try:
            session = await self.engine.get_session(thread.id)
        except SessionError:
            session = None
        if session is not None and thread_state.session_agent_id != run.assistant_id:
            # Agent files are given when a session starts: another assistant needs another.
            await self.engine.close_session(thread.id)
            session = None
        fresh = session is None
        if session is None:
            session = await self.engine.session(
                thread.id, agent_id=run.assistant_id, if_expired="new"
            )
            replaced = thread_state.ran_code
            thread_state = ThreadState(session_agent_id=run.assistant_id, ran_code=False)
            await anyio.to_thread.run_sync(
                lambda: self.state.save(private={thread.id: thread_state})
            )
        else:
            replaced = False
        space = Workspace(session=session, replaced=replaced)
        links = {link.file_id: link for link in await self._links(thread.id)}
        if replaced:
            space.restored = await self._restore_outputs(session, thread.id, links)
        for file_id in thread_files(thread, messages):
            link = links.get(file_id)
            if link is not None and link.path is not None and not fresh:
                space.paths[file_id] = link.path
                continue
            try:
                local_id = (
                    link.local_id if link is not None else await self._local(thread.id, file_id)
                )
                (path,) = await session.attach([local_id])
            except FileNotFoundInStore:
                space.missing.append(file_id)
                continue
            await anyio.to_thread.run_sync(
                self.state.link, FileLink(thread.id, file_id, local_id, path)
            )
            space.paths[file_id] = path
        assistant_links = await self._links(run.assistant_id)
        for link in assistant_links:
            try:
                space.assistant_files.append((await self.engine.file(link.local_id)).name)
            except FileNotFoundInStore:
                continue
        return space

    async def _local(self, thread_id: str, file_id: str) -> str:
        """The engine file the thread's session gets for an uploaded file: itself, or a copy."""
        stored = await self.engine.file(file_id)
        if stored.session_id == thread_id or (
            stored.session_id is None and stored.agent_id is None
        ):
            return file_id
        copy = await self.engine.upload(await self.engine.download(file_id), stored.name)
        return copy.id

    async def _restore_outputs(
        self, session: SessionAPI, thread_id: str, links: dict[str, FileLink]
    ) -> dict[str, str]:
        """Put back the latest version of each file earlier code of the thread wrote."""
        inputs = {link.local_id for link in links.values()}
        latest: dict[str, StoredFile] = {}
        for stored in await self.engine.list_files(session_id=thread_id):
            if stored.origin != "produced" or not stored.path or stored.id in inputs:
                continue
            known = latest.get(stored.path)
            if known is None or stored.created_at >= known.created_at:
                latest[stored.path] = stored
        restored = {}
        for stored in latest.values():
            try:
                (path,) = await session.attach([stored.id])
            except FileNotFoundInStore:
                continue
            restored[stored.name] = path
        return restored


def thread_files(thread: Thread, messages: Sequence[Message]) -> list[str]:
    """The thread's code interpreter files: its resources', then its messages' attachments."""
    found = dict.fromkeys(thread.tool_resources.file_ids())
    for message in messages:
        for attachment in message.attachments:
            if not attachment.tools or any(t.type == "code_interpreter" for t in attachment.tools):
                found.setdefault(attachment.file_id)
    return list(found)
