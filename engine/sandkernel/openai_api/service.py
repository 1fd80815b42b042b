"""The Files and Assistants API over any engine: what each request does, without HTTP.

:class:`AssistantsService` is typed against :class:`~sandkernel.api.EngineAPI`
only, so it serves a local engine or a cluster alike. It owns the runs'
tasks (one task group, entered with ``async with``; leaving it fails the
runs still going, saying the daemon shut down) and the state file.
Every method raises :class:`~sandkernel.openai_api.errors.APIError` for
what the caller got wrong, in OpenAI's words and status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Literal, Self

import anyio
import anyio.abc

from sandkernel.api import EngineAPI
from sandkernel.errors import FileNotFoundInStore, SandkernelError, SessionError
from sandkernel.files import StoredFile
from sandkernel.openai_api.chat import AssistantModel
from sandkernel.openai_api.containers import Containers
from sandkernel.openai_api.errors import APIError, bad_request, from_engine_error, not_found
from sandkernel.openai_api.events import RunEvents, Subscription
from sandkernel.openai_api.keepalive import Renew, hold
from sandkernel.openai_api.placement import Placement, uploaded_file
from sandkernel.openai_api.responses import Responses
from sandkernel.openai_api.runs import PYTHON, RunDriver, RunLimits, Waiting, now
from sandkernel.openai_api.state import ApiState, NotStored, RunState, ThreadBusy, UnknownCursor
from sandkernel.openai_api.wire import (
    ACTIVE_RUN_STATUSES,
    Assistant,
    AssistantCreate,
    AssistantUpdate,
    Attachment,
    AttachmentTool,
    CodeInterpreterTool,
    Deleted,
    FileObject,
    FileSearchTool,
    FunctionTool,
    ImageFileContent,
    ImageFileIn,
    ImageUrlContent,
    ImageUrlIn,
    Message,
    MessageContent,
    MessageCreate,
    MessageUpdate,
    Page,
    Run,
    RunCreate,
    RunStep,
    RunUpdate,
    SubmitToolOutputs,
    Text,
    TextContent,
    Thread,
    ThreadAndRunCreate,
    ThreadCreate,
    ThreadUpdate,
    Tool,
    ToolCallsDetails,
    ToolChoiceObject,
    ToolIn,
    ToolResources,
    TruncationStrategy,
    new_id,
)

log = logging.getLogger(__name__)

Order = Literal["asc", "desc"]
_FILE_SEARCH = (
    "file_search is not supported here: sandkernel runs code (code_interpreter) and calls "
    "your functions. Remove it, and give the files to code_interpreter instead (its code "
    "can read and search them)."
)


class AssistantsService:
    """OpenAI's Files and Assistants v2 resources on an engine.

    Args:
        engine: the engine whose sessions run the threads' code and whose store
            keeps the files.
        state_path: the SQLite file of assistants, threads, messages, runs, steps.
        model: the chat model runs call (``None``: runs are refused, saying how
            to give one).
        limits: of each run.
        container_minute_s: seconds in one of a container's ``expires_after``
            minutes (default 60; shorter only in tests of expiry).
    """

    def __init__(
        self,
        engine: EngineAPI,
        state_path: str | Path,
        *,
        model: AssistantModel | None,
        limits: RunLimits | None = None,
        container_minute_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.state = ApiState(state_path)
        self.events = RunEvents()
        self.placement = Placement(engine, self.state)
        self.containers = Containers(engine, self.state, minute_s=container_minute_s)
        self.responses = Responses(self.state, self.containers, model)
        self.model = model
        self.driver = RunDriver(engine, self.state, self.events, self.placement, model, limits)
        self._tasks: anyio.abc.TaskGroup | None = None
        self._scopes: dict[str, anyio.CancelScope] = {}
        #: runs waiting for tool outputs -> the scope of the task holding their thread's session
        self._holds: dict[str, anyio.CancelScope] = {}
        self._cancelling: set[str] = set()
        self._finished: dict[str, anyio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopping = False

    async def __aenter__(self) -> Self:
        failed = await anyio.to_thread.run_sync(self.state.open)
        if failed:
            log.warning(
                "runs interrupted by the previous daemon, now failed: %s", ", ".join(failed)
            )
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True  # a run task not begun yet fails as it begins, holding nothing
        try:
            if self._tasks is not None:
                self._cancel_all()
                await self._tasks.__aexit__(None, None, None)
                self._tasks = None
        finally:
            with anyio.CancelScope(shield=True):
                if self.model is not None:
                    await self.model.aclose()
                await anyio.to_thread.run_sync(self.state.close)

    async def wind_down(self) -> None:
        """Fail the runs and responses still going, while their streams can still say so.

        For a daemon that stops: called once its grace time is nearly over,
        with the streams still open, so that each ends with its final event
        (``thread.run.failed`` then ``done``, ``response.failed``) rather than
        being cut. A run started from now on fails as it starts. Leaving the
        service fails what is left the same way, streams or not.
        """
        self._stopping = True
        self._cancel_all()
        self.responses.wind_down()
        for finished in list(self._finished.values()):
            await finished.wait()

    def _cancel_all(self) -> None:
        """Cancel every run's task and every hold on a waiting run's session."""
        for scope in [*self._scopes.values(), *self._holds.values()]:
            scope.cancel()

    async def _db[**P, R](self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``function`` (a blocking state call) in a worker thread."""
        return await anyio.to_thread.run_sync(partial(function, *args, **kwargs))

    def _lock(self, thread_id: str) -> asyncio.Lock:
        return self._locks.setdefault(thread_id, asyncio.Lock())

    # ------------------------------------------------------------------ files

    async def upload_file(
        self, source: BinaryIO, filename: str, purpose: str, *, retention_s: float | None = None
    ) -> FileObject:
        if purpose != "assistants":
            raise bad_request(
                f"purpose {purpose!r} is not supported here; use 'assistants'", "purpose"
            )
        try:
            stored = await self.engine.upload(source, filename, retention_s=retention_s)
        except SandkernelError as exc:
            raise from_engine_error(exc, param="file") from exc
        return file_object(stored)

    async def list_files(
        self, *, purpose: str | None, limit: int, order: Order, after: str | None
    ) -> Page:
        check_limit(limit, 10_000)
        files = await self.engine.list_files()
        own = await self._db(self.state.own_files, [(f.id, f.session_id) for f in files])
        files = [f for f in files if f.id not in own]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        objects = [file_object(f) for f in files]
        if purpose is not None:
            objects = [f for f in objects if f.purpose == purpose]
        if after is not None:
            ids = [f.id for f in objects]
            if after not in ids:
                raise bad_request(f"No file found with id '{after}' in this list.", "after")
            objects = objects[ids.index(after) + 1 :]
        return page(objects[:limit], has_more=len(objects) > limit)

    async def file(self, file_id: str) -> FileObject:
        return file_object(await self._stored(file_id))

    async def file_content(self, file_id: str) -> tuple[bytes, StoredFile]:
        stored = await self._stored(file_id)
        try:
            return await self.engine.download(file_id), stored
        except FileNotFoundInStore:
            raise not_found("file", file_id) from None

    async def delete_file(self, file_id: str) -> Deleted:
        await self._stored(file_id)
        await self.placement.drop_file(file_id)
        try:
            await self.engine.delete_file(file_id)
        except FileNotFoundInStore:
            raise not_found("file", file_id) from None
        return Deleted(id=file_id, object="file")

    async def _stored(self, file_id: str) -> StoredFile:
        try:
            return await uploaded_file(self.engine, self.state, file_id)
        except FileNotFoundInStore:
            raise not_found("file", file_id) from None

    # ------------------------------------------------------------------ assistants

    async def create_assistant(self, body: AssistantCreate) -> Assistant:
        tools = checked_tools(body.tools)
        resources = checked_resources(body.tool_resources)
        file_ids = resources.file_ids()
        await self.placement.check_files(file_ids, "tool_resources.code_interpreter.file_ids")
        assistant = Assistant(
            id=new_id("asst"),
            created_at=now(),
            name=body.name,
            description=body.description,
            model=body.model,
            instructions=body.instructions,
            tools=tools,
            tool_resources=resources,
            metadata=body.metadata or {},
            temperature=body.temperature,
            top_p=body.top_p,
            response_format=body.response_format or "auto",
        )
        await self._give_assistant_files(assistant.id, file_ids)
        await self._db(self.state.save, assistant)
        return assistant

    async def _give_assistant_files(self, assistant_id: str, file_ids: Sequence[str]) -> None:
        try:
            await self.placement.set_assistant_files(assistant_id, file_ids)
        except SandkernelError as exc:
            raise from_engine_error(exc, param="tool_resources.code_interpreter.file_ids") from exc

    async def assistant(self, assistant_id: str, param: str | None = None) -> Assistant:
        found = await self._db(self.state.get, Assistant, assistant_id)
        if found is None:
            raise not_found("assistant", assistant_id, param)
        return found

    async def list_assistants(
        self, *, limit: int, order: Order, after: str | None, before: str | None
    ) -> Page:
        return await self._page(Assistant, limit=limit, order=order, after=after, before=before)

    async def update_assistant(self, assistant_id: str, body: AssistantUpdate) -> Assistant:
        assistant = await self.assistant(assistant_id)
        changes: dict[str, Any] = {
            name: getattr(body, name)
            for name in body.model_fields_set
            if name not in ("tools", "tool_resources", "reasoning_effort")
        }
        if "model" in changes and changes["model"] is None:
            raise bad_request("model cannot be null", "model")
        if body.tools is not None:
            changes["tools"] = checked_tools(body.tools)
        if "metadata" in changes and changes["metadata"] is None:
            changes["metadata"] = {}
        if body.tool_resources is not None:
            resources = checked_resources(body.tool_resources)
            file_ids = resources.file_ids()
            await self.placement.check_files(file_ids, "tool_resources.code_interpreter.file_ids")
            await self._give_assistant_files(assistant_id, file_ids)
            changes["tool_resources"] = resources
        updated = assistant.model_copy(update=changes)
        await self._db(self.state.save, updated)
        return updated

    async def delete_assistant(self, assistant_id: str) -> Deleted:
        await self.assistant(assistant_id)
        await self.placement.drop_owner(assistant_id)
        await self._db(self.state.delete, Assistant, assistant_id)
        return Deleted(id=assistant_id, object="assistant.deleted")

    # ------------------------------------------------------------------ threads

    async def create_thread(self, body: ThreadCreate, param: str = "") -> Thread:
        resources = checked_resources(body.tool_resources, f"{param}tool_resources")
        await self.placement.check_files(
            resources.file_ids(), f"{param}tool_resources.code_interpreter.file_ids"
        )
        thread = Thread(
            id=new_id("thread"),
            created_at=now(),
            metadata=body.metadata or {},
            tool_resources=resources,
        )
        messages = [
            await self._message(thread.id, item, f"{param}messages[{i}]")
            for i, item in enumerate(body.messages)
        ]
        await self._db(self.state.save, thread, *messages)
        return thread

    async def thread(self, thread_id: str) -> Thread:
        found = await self._db(self.state.get, Thread, thread_id)
        if found is None:
            raise not_found("thread", thread_id)
        return found

    async def update_thread(self, thread_id: str, body: ThreadUpdate) -> Thread:
        thread = await self.thread(thread_id)
        changes: dict[str, Any] = {}
        if "metadata" in body.model_fields_set:
            changes["metadata"] = body.metadata or {}
        if body.tool_resources is not None:
            resources = checked_resources(body.tool_resources)
            await self.placement.check_files(
                resources.file_ids(), "tool_resources.code_interpreter.file_ids"
            )
            changes["tool_resources"] = resources
        updated = thread.model_copy(update=changes)
        if not await self._db(self.state.replace, updated):  # deleted meanwhile: stays so
            raise not_found("thread", thread_id)
        return updated

    async def delete_thread(self, thread_id: str) -> Deleted:
        await self.thread(thread_id)
        async with self._lock(thread_id):
            active = await self._db(self.state.active_run, thread_id)
            if active is not None:
                self._release(active.id)
                await self._cancel_task(active.id, wait=True)
            try:
                await self.engine.close_session(thread_id)
            except SessionError:
                pass
            await self.placement.drop_owner(thread_id)
            deleted = await self._db(self.state.delete_thread, thread_id)
        self._locks.pop(thread_id, None)
        if not deleted:  # a delete that came at the same time took it
            raise not_found("thread", thread_id)
        return Deleted(id=thread_id, object="thread.deleted")

    # ------------------------------------------------------------------ messages

    async def _message(
        self, thread_id: str, body: MessageCreate, param: str, *, run_id: str | None = None
    ) -> Message:
        content: list[MessageContent] = []
        if isinstance(body.content, str):
            content.append(TextContent(text=Text(value=body.content)))
        else:
            for i, part in enumerate(body.content):
                if isinstance(part, ImageFileIn):
                    await self.placement.check_files(
                        [part.image_file.file_id], _field(param, f"content[{i}].image_file.file_id")
                    )
                    content.append(ImageFileContent(image_file=part.image_file))
                elif isinstance(part, ImageUrlIn):
                    content.append(ImageUrlContent(image_url=part.image_url))
                else:
                    content.append(TextContent(text=Text(value=part.text)))
        attachments = list(body.attachments or [])
        for i, attachment in enumerate(attachments):
            if any(tool.type == "file_search" for tool in attachment.tools):
                raise bad_request(_FILE_SEARCH, _field(param, f"attachments[{i}].tools"))
        for i, attachment in enumerate(attachments):
            await self.placement.check_files(
                [attachment.file_id], _field(param, f"attachments[{i}].file_id")
            )
        legacy = list(body.file_ids or [])
        await self.placement.check_files(legacy, _field(param, "file_ids"))
        code = [AttachmentTool(type="code_interpreter")]
        attachments += [Attachment(file_id=file_id, tools=code) for file_id in legacy]
        return Message(
            id=new_id("msg"),
            created_at=now(),
            thread_id=thread_id,
            role=body.role,
            content=content,
            attachments=attachments,
            metadata=body.metadata or {},
            completed_at=now(),
            run_id=run_id,
        )

    async def create_message(self, thread_id: str, body: MessageCreate) -> Message:
        await self.thread(thread_id)
        message = await self._message(thread_id, body, "")
        try:
            await self._db(self.state.add_messages, thread_id, [message])
        except NotStored:
            raise not_found("thread", thread_id) from None
        except ThreadBusy as busy:
            raise bad_request(
                f"Can't add messages to {thread_id} while a run {busy.run.id} is active.",
                code="thread_busy",
            ) from None
        return message

    async def message(self, thread_id: str, message_id: str) -> Message:
        found: Message | None = await self._db(self.state.get, Message, message_id)
        if found is None or found.thread_id != thread_id:
            raise not_found("message", message_id)
        return found

    async def list_messages(
        self,
        thread_id: str,
        *,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
        run_id: str | None,
    ) -> Page:
        await self.thread(thread_id)
        return await self._page(
            Message,
            thread_id=thread_id,
            run_id=run_id,
            limit=limit,
            order=order,
            after=after,
            before=before,
        )

    async def update_message(self, thread_id: str, message_id: str, body: MessageUpdate) -> Message:
        message = await self.message(thread_id, message_id)
        if "metadata" not in body.model_fields_set:
            return message  # nothing to change: a left-out field is left as it is
        # Metadata alone: a run may be writing this message's content meanwhile.
        updated = await self._db(
            self.state.update_metadata, Message, message_id, body.metadata or {}
        )
        if updated is None:
            raise not_found("message", message_id)
        return updated

    async def delete_message(self, thread_id: str, message_id: str) -> Deleted:
        await self.message(thread_id, message_id)
        await self._db(self.state.delete, Message, message_id)
        return Deleted(id=message_id, object="thread.message.deleted")

    # ------------------------------------------------------------------ runs

    async def create_run(
        self, thread_id: str, body: RunCreate, *, stream: bool = False
    ) -> tuple[Run, Subscription | None]:
        """Store a queued run and start it; with ``stream``, its events from the start."""
        await self.thread(thread_id)
        run = await self._new_run(thread_id, body)
        messages = [
            await self._message(thread_id, item, f"additional_messages[{i}]")
            for i, item in enumerate(body.additional_messages or [])
        ]
        async with self._lock(thread_id):
            try:
                await self._db(self.state.create_run, run, RunState(), messages)
            except NotStored:
                raise not_found("thread", thread_id) from None
            except ThreadBusy as busy:
                raise bad_request(
                    f"Thread {thread_id} already has an active run {busy.run.id}.",
                    code="thread_busy",
                ) from None
        return run, self._start(run, stream=stream, created=True)

    async def create_thread_and_run(
        self, body: ThreadAndRunCreate, *, stream: bool = False
    ) -> tuple[Thread, Run, Subscription | None]:
        thread_body = body.thread or ThreadCreate()
        if body.tool_resources is not None:
            thread_body = thread_body.model_copy(update={"tool_resources": body.tool_resources})
        options = body.model_dump(exclude={"thread", "tool_resources"}, exclude_unset=True)
        run_body = RunCreate.model_validate(options)
        run = await self._new_run("", run_body)  # checked before the thread is made
        thread = await self.create_thread(thread_body, "thread.")
        run = run.model_copy(update={"thread_id": thread.id})
        try:
            await self._db(self.state.create_run, run, RunState(), [])
        except NotStored:  # deleted as soon as it was made
            raise not_found("thread", thread.id) from None
        subscription = self._start(run, stream=stream, created=True, thread=thread)
        return thread, run, subscription

    async def _new_run(self, thread_id: str, body: RunCreate) -> Run:
        assistant = await self.assistant(body.assistant_id, "assistant_id")
        if self.model is None:
            raise bad_request(
                "this sandkernel daemon has no chat model to run assistants with: start it "
                "with `sandkernel serve --model-url URL` (an OpenAI-compatible endpoint)",
                "model",
                code="model_not_configured",
            )
        tools = checked_tools(body.tools) if body.tools is not None else list(assistant.tools)
        instructions = (
            body.instructions if body.instructions is not None else assistant.instructions or ""
        )
        if body.additional_instructions:
            instructions = f"{instructions}\n\n{body.additional_instructions}".strip()
        choice = body.tool_choice if body.tool_choice is not None else "auto"
        check_tool_choice(choice, tools)
        created = now()
        return Run(
            id=new_id("run"),
            created_at=created,
            thread_id=thread_id,
            assistant_id=assistant.id,
            model=body.model or assistant.model,
            instructions=instructions,
            tools=tools,
            metadata=body.metadata or {},
            temperature=body.temperature if body.temperature is not None else assistant.temperature,
            top_p=body.top_p if body.top_p is not None else assistant.top_p,
            max_prompt_tokens=body.max_prompt_tokens,
            max_completion_tokens=body.max_completion_tokens,
            truncation_strategy=body.truncation_strategy or TruncationStrategy(),
            response_format=body.response_format or assistant.response_format or "auto",
            tool_choice=choice,
            parallel_tool_calls=True
            if body.parallel_tool_calls is None
            else body.parallel_tool_calls,
            expires_at=created + 600,
        )

    def _start(
        self, run: Run, *, stream: bool, created: bool = False, thread: Thread | None = None
    ) -> Subscription | None:
        if self._tasks is None:
            raise RuntimeError("the assistants service is not running")
        subscription = self.events.subscribe(run.id) if stream else None
        if thread is not None:
            self.events.emit(run.id, "thread.created", thread)
        if created:
            self.events.emit(run.id, "thread.run.created", run)
        self.events.emit(run.id, "thread.run.queued", run)
        self._finished[run.id] = anyio.Event()
        self._tasks.start_soon(self._run_task, run.id, name=f"run {run.id}")
        return subscription

    async def _run_task(self, run_id: str) -> None:
        finished = self._finished.setdefault(run_id, anyio.Event())
        scope = anyio.CancelScope()
        # The run's task until its end is recorded: a cancel meanwhile (its scope
        # cancelled again, to no effect) is not taken for a run waiting for tool
        # outputs, which the caller's cancel settles itself, a second time.
        self._scopes[run_id] = scope
        waiting: Waiting | None = None
        try:
            with scope:
                if self._stopping:
                    scope.cancel()  # failed at once, as the runs going were
                waiting = await self.driver.drive(run_id)
            if scope.cancelled_caught:
                with anyio.CancelScope(shield=True):
                    await self.driver.settle_cancelled(run_id, by_caller=run_id in self._cancelling)
            elif waiting is not None:
                self._hold_while_waiting(run_id, waiting, finished)
        except Exception:
            log.exception("run %s: could not record how it ended", run_id)
        finally:
            # The run's next task (after its tool outputs) may be known already:
            # only this task's own entries are removed.
            if self._scopes.get(run_id) is scope:
                del self._scopes[run_id]
            if self._finished.get(run_id) is finished:
                del self._finished[run_id]
                self._cancelling.discard(run_id)
            finished.set()

    def _hold_while_waiting(self, run_id: str, waiting: Waiting, finished: anyio.Event) -> None:
        """Keep the session of a run waiting for tool outputs alive while it waits.

        Until the outputs come (:meth:`submit_tool_outputs`), the run is
        cancelled, its thread deleted, its wait over or its session ended,
        or the service winds down. Without this, a session whose time to
        live is shorter than the wait (10 minutes) would end meanwhile, and
        the run's next code call find a new one.
        ``finished``: the event of the task that drove the run this far.
        """
        if self._tasks is None or self._stopping or run_id in self._cancelling:
            return
        if self._finished.get(run_id) is not finished:
            return  # its outputs came already, and its next task was started
        scope = anyio.CancelScope(
            deadline=anyio.current_time() + max(0.0, waiting.until - time.time())
        )
        # Known at once, not once the task starts: outputs that come before it release it.
        self._holds[run_id] = scope
        self._tasks.start_soon(self._hold, run_id, waiting.renew, scope, name=f"hold {run_id}")

    async def _hold(self, run_id: str, renew: Renew, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await hold(renew)
        finally:
            if self._holds.get(run_id) is scope:
                del self._holds[run_id]

    def _release(self, run_id: str) -> None:
        """Stop holding the session of a run that waited for tool outputs."""
        scope = self._holds.pop(run_id, None)
        if scope is not None:
            scope.cancel()

    async def _cancel_task(self, run_id: str, *, wait: bool = False) -> None:
        scope = self._scopes.get(run_id)
        finished = self._finished.get(run_id)
        if scope is not None:
            self._cancelling.add(run_id)
            scope.cancel()
        if wait and finished is not None:
            await finished.wait()

    async def run(self, thread_id: str, run_id: str) -> Run:
        found: Run | None = await self._db(self.state.get, Run, run_id)
        if found is None or found.thread_id != thread_id:
            raise not_found("run", run_id)
        if found.status == "requires_action" and (found.expires_at or 0) < now():
            await self._expire_overdue(thread_id)
            found = await self._db(self.state.get, Run, run_id) or found
        return self._shown(found)

    def _shown(self, run: Run) -> Run:
        """The run as stored, ``cancelling`` while its cancellation reaches its task."""
        if run.id in self._cancelling and run.status in ("queued", "in_progress"):
            return run.model_copy(update={"status": "cancelling"})
        return run

    async def _expire_overdue(self, thread_id: str) -> list[Run]:
        """Expire the thread's runs whose wait for tool outputs is over (announced)."""
        expired: list[Run] = await self._db(self.state.expire_overdue, thread_id)
        for run in expired:
            self.events.emit(run.id, "thread.run.expired", run)
        return expired

    async def list_runs(
        self, thread_id: str, *, limit: int, order: Order, after: str | None, before: str | None
    ) -> Page:
        await self.thread(thread_id)
        await self._expire_overdue(thread_id)
        listed = await self._page(
            Run, thread_id=thread_id, limit=limit, order=order, after=after, before=before
        )
        listed.data = [self._shown(r) for r in listed.data]
        return listed

    async def update_run(self, thread_id: str, run_id: str, body: RunUpdate) -> Run:
        run = await self.run(thread_id, run_id)
        if "metadata" not in body.model_fields_set:
            return run  # nothing to change: a left-out field is left as it is
        # Metadata alone, read and written at once: the run's task saves its status meanwhile.
        updated = await self._db(self.state.update_metadata, Run, run_id, body.metadata or {})
        if updated is None:
            raise not_found("run", run_id)
        return self._shown(updated)

    async def cancel_run(self, thread_id: str, run_id: str) -> Run:
        async with self._lock(thread_id):
            run = await self.run(thread_id, run_id)
            if run.status not in ACTIVE_RUN_STATUSES:
                raise bad_request(f"Cannot cancel run with status '{run.status}'.")
            if run.status == "cancelling":
                return run
            if run.id in self._scopes:
                await self._cancel_task(run.id)
                cancelling = run.model_copy(update={"status": "cancelling"})
                self.events.emit(run.id, "thread.run.cancelling", cancelling)
                return cancelling
            # Not running here (waiting for tool outputs): cancelled at once.
            self._release(run.id)
            await self.driver.settle_cancelled(run.id, by_caller=True)
            return await self.run(thread_id, run_id)

    async def submit_tool_outputs(
        self, thread_id: str, run_id: str, body: SubmitToolOutputs, *, stream: bool = False
    ) -> tuple[Run, Subscription | None]:
        async with self._lock(thread_id):
            run = await self.run(thread_id, run_id)
            if run.status != "requires_action" or run.required_action is None:
                raise _no_tool_outputs(run)
            expected = [call.id for call in run.required_action.submit_tool_outputs.tool_calls]
            given = {output.tool_call_id: output.output for output in body.tool_outputs}
            unknown = sorted(set(given) - set(expected))
            missing = [i for i in expected if i not in given]
            if unknown or missing or len(given) != len(body.tool_outputs):
                raise bad_request(
                    f"Expected one output for each of the tool calls {expected}; "
                    f"missing: {missing}, not expected: {unknown}.",
                    "tool_outputs",
                )
            steps: list[RunStep] = await self._db(self.state.all, RunStep, run_id=run_id)
            step = next((s for s in steps if s.status == "in_progress"), None)
            if step is None:  # its wait ran out since the run was read
                raise _no_tool_outputs(await self.run(thread_id, run_id))
            details = step.step_details
            assert isinstance(details, ToolCallsDetails)
            calls = [
                call.model_copy(
                    update={"function": call.function.model_copy(update={"output": given[call.id]})}
                )
                if call.type == "function" and call.id in given
                else call
                for call in details.tool_calls
            ]
            step = step.model_copy(update={"step_details": ToolCallsDetails(tool_calls=calls)})
            run_state: RunState = await self._db(self.state.private, Run, run_id, RunState)
            run_state.transcript += [
                {"role": "tool", "tool_call_id": call_id, "content": given[call_id]}
                for call_id in expected
            ]
            queued = run.model_copy(
                update={"status": "queued", "required_action": None, "expires_at": None}
            )
            taken, stored, expired = await self._db(
                self.state.accept_tool_outputs, step, queued, run_state
            )
            for ended in expired:
                self.events.emit(ended.id, "thread.run.expired", ended)
            if stored is None:
                raise not_found("run", run_id)
            if not taken:  # its wait ran out since it was read: it stays expired
                raise _no_tool_outputs(stored)
            queued = stored
            self._release(run_id)  # the run's own task renews its session from here
        return queued, self._start(queued, stream=stream)

    async def step(self, thread_id: str, run_id: str, step_id: str) -> RunStep:
        await self.run(thread_id, run_id)
        found: RunStep | None = await self._db(self.state.get, RunStep, step_id)
        if found is None or found.run_id != run_id:
            raise not_found("run step", step_id)
        return found

    async def list_steps(
        self,
        thread_id: str,
        run_id: str,
        *,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
    ) -> Page:
        await self.run(thread_id, run_id)
        return await self._page(
            RunStep, run_id=run_id, limit=limit, order=order, after=after, before=before
        )

    # ------------------------------------------------------------------ lists

    async def _page(
        self,
        cls: type[Assistant] | type[Message] | type[Run] | type[RunStep],
        *,
        thread_id: str | None = None,
        run_id: str | None = None,
        limit: int,
        order: Order,
        after: str | None,
        before: str | None,
    ) -> Page:
        check_limit(limit, 100)
        try:
            items, more = await self._db(
                self.state.page,
                cls,
                thread_id=thread_id,
                run_id=run_id,
                order=order,
                after=after,
                before=before,
                limit=limit,
            )
        except UnknownCursor as exc:
            message = f"No object with id '{exc.cursor}' in this list."
            raise bad_request(message, exc.param) from None
        return page(items, has_more=more)


def _field(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def page(items: Sequence[Any], *, has_more: bool) -> Page:
    return Page(
        data=list(items),
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
        has_more=has_more,
    )


def check_limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise bad_request(f"limit must be between 1 and {most} (got {limit})", "limit")


def file_object(stored: StoredFile) -> FileObject:
    return FileObject(
        id=stored.id,
        bytes=stored.size_bytes,
        created_at=int(stored.created_at),
        filename=stored.name,
        purpose="assistants_output" if stored.origin == "produced" else "assistants",
        expires_at=None if stored.expires_at is None else int(stored.expires_at),
    )


def checked_tools(tools: Sequence[ToolIn], param: str = "tools") -> list[Tool]:
    """The tools, or a 400 for file_search, a repeated function, or one named like ours."""
    checked: list[Tool] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if isinstance(tool, FileSearchTool):
            raise bad_request(_FILE_SEARCH, f"{param}[{i}]")
        if isinstance(tool, FunctionTool):
            name = tool.function.name
            if name in names:
                raise bad_request(
                    f"Two functions are named {name!r}.", f"{param}[{i}].function.name"
                )
            names.add(name)
        checked.append(tool)
    if PYTHON in names and any(isinstance(t, CodeInterpreterTool) for t in checked):
        raise bad_request(
            f"A function named {PYTHON!r} cannot be used with code_interpreter, whose tool has "
            "that name for the model: rename the function.",
            param,
        )
    return checked


def checked_resources(
    resources: ToolResources | None, param: str = "tool_resources"
) -> ToolResources:
    if resources is None:
        return ToolResources()
    if resources.file_search is not None:
        raise bad_request(_FILE_SEARCH, f"{param}.file_search")
    return resources


def check_tool_choice(choice: str | ToolChoiceObject, tools: Sequence[Tool]) -> None:
    code = any(isinstance(t, CodeInterpreterTool) for t in tools)
    functions = {t.function.name for t in tools if isinstance(t, FunctionTool)}
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise bad_request("tool_choice 'required' needs at least one tool", "tool_choice")
        return
    if choice.type == "file_search":
        raise bad_request(_FILE_SEARCH, "tool_choice")
    if choice.type == "code_interpreter" and not code:
        raise bad_request(
            "tool_choice names code_interpreter, which is not among the run's tools",
            "tool_choice",
        )
    if choice.type == "function":
        name = choice.function.name if choice.function is not None else None
        if name is None:
            raise bad_request("tool_choice of type 'function' needs function.name", "tool_choice")
        if name not in functions:
            raise bad_request(
                f"tool_choice names the function {name!r}, which is not among the run's tools",
                "tool_choice.function.name",
            )


def _no_tool_outputs(run: Run) -> APIError:
    """OpenAI's 400 for tool outputs sent to a run that does not wait for them."""
    return bad_request(f"Runs in status '{run.status}' do not accept tool outputs.", "run_id")
