"""OpenAI's Responses API with the ``code_interpreter`` tool, over containers.

A response asks the chat model for turns until it answers in text or calls
one of the caller's functions. Code it writes runs in the response's
container (:mod:`~sandkernel.openai_api.containers`): the one named by the
tool's ``container``, or for ``{"type": "auto"}`` the container of the
``previous_response_id`` while it runs, else a new one. Files given as
``input_file`` parts (by ``file_id``) are put in it before the model's first
turn. Each code call is a ``code_interpreter_call`` item; a function call is
a ``function_call`` item, answered by a ``function_call_output`` input item of
the next response; the answer is a ``message`` whose text cites the files
code wrote in the container, at their last version, wherever the text names
their path, as ``container_file_citation`` annotations.

The chat turns of a response (and of the responses it continues) are kept
with it, so ``previous_response_id`` continues the conversation, and in the
same container its variables are still there.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from sandkernel.api import SessionAPI
from sandkernel.errors import ModelCallFailed, SandkernelError
from sandkernel.files import StoredFile
from sandkernel.loop import format_result, python_tool
from sandkernel.openai_api.chat import AssistantModel, ChatRequest, run_error_code
from sandkernel.openai_api.containers import (
    MNT_DATA,
    Containers,
    check_memory_limit,
    written_by_code,
)
from sandkernel.openai_api.errors import APIError, bad_request, not_found
from sandkernel.openai_api.keepalive import renewing
from sandkernel.openai_api.runs import code_argument, result_tail, whole_mentions
from sandkernel.openai_api.state import ApiState, ResponseState
from sandkernel.openai_api.wire import (
    Container,
    ContainerCreate,
    Deleted,
    Metadata,
    Page,
    ResponseObject,
    end_items,
    new_id,
)
from sandkernel.results import ProducedFile

log = logging.getLogger(__name__)

PYTHON: Final = str(python_tool()["function"]["name"])
#: Model turns one response may take (each code call is one).
MAX_TURNS: Final = 16
_OUTPUTS: Final = "code_interpreter_call.outputs"


class ResponseCreate(BaseModel):
    """The body of ``POST /responses`` (what sandkernel acts on; the rest is refused)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    previous_response_id: str | None = None
    include: list[str] = Field(default_factory=list)
    store: bool = True
    stream: bool = False
    metadata: Metadata | None = None
    # OpenAI's bounds; a NaN would only fail later, at the model call.
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_output_tokens: int | None = Field(default=None, ge=1)
    parallel_tool_calls: bool = True
    #: the answer's format: ``{"format": {"type": "text" | "json_object" | "json_schema", ...}}``
    text: dict[str, Any] | None = None
    #: never truncated here: ``auto`` too sends the whole conversation (the model refuses
    #: one over its context, as with ``disabled``)
    truncation: Literal["auto", "disabled"] | None = None
    #: the end user's id, kept with the response
    user: str | None = Field(default=None, max_length=256)


def _text_format(text: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The response's ``text`` as stored, and the chat endpoint's ``response_format``.

    ``json_schema`` is the Responses API's flat form (``name``, ``schema``,
    ``strict``, ``description`` beside ``type``); the chat endpoint nests them.
    """
    if text is None:
        return {"format": {"type": "text"}}, None
    fmt = text.get("format", {"type": "text"})
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object with a type", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return {**text, "format": fmt}, None
    if kind == "json_object":
        return {**text, "format": fmt}, {"type": "json_object"}
    if kind == "json_schema":
        name, schema = fmt.get("name"), fmt.get("schema")
        if not isinstance(name, str) or not name or not isinstance(schema, dict):
            raise bad_request(
                "text.format of type json_schema needs a name (a string) and a schema (an object)",
                "text.format",
            )
        nested = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {**text, "format": fmt}, {"type": "json_schema", "json_schema": nested}
    raise bad_request(
        f"text.format of type {kind!r} is not one of text, json_object, json_schema",
        "text.format.type",
    )


@dataclass
class _Prepared:
    """A checked request, its container ready: what answering it needs."""

    body: ResponseCreate
    response: ResponseObject
    session: SessionAPI | None
    functions: dict[str, dict[str, Any]]
    code: bool
    transcript: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    container_id: str | None
    #: the chat endpoint's response_format for the body's ``text.format`` (None: text)
    response_format: dict[str, Any] | None


#: A response cut short by the daemon's stop (:meth:`Responses.wind_down`).
_SHUT_DOWN = (
    "the sandkernel daemon shut down while this response was in progress; "
    "create a new response to continue"
)


def _now() -> int:
    return int(time.time())


class Responses:
    """``/responses`` on the containers and a chat model.

    Args:
        state: where responses are kept.
        containers: whose sessions run the code.
        model: the chat model (``None``: responses are refused, saying how to give one).
    """

    def __init__(
        self, state: ApiState, containers: Containers, model: AssistantModel | None
    ) -> None:
        self.state = state
        self.containers = containers
        self.model = model
        self._answering: set[anyio.CancelScope] = set()
        self._stopping = False

    def wind_down(self) -> None:
        """End the responses being answered as failed, and those to come: the daemon stops."""
        self._stopping = True
        for scope in list(self._answering):
            scope.cancel()

    async def _db[**P, R](self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await anyio.to_thread.run_sync(partial(function, *args, **kwargs))

    async def get(self, response_id: str) -> ResponseObject:
        found = await self._db(self.state.get, ResponseObject, response_id)
        if found is None:
            raise not_found("response", response_id)
        return found

    async def delete(self, response_id: str) -> Deleted:
        await self.get(response_id)
        await self._db(self.state.delete, ResponseObject, response_id)
        return Deleted(id=response_id, object="response.deleted")

    async def input_items(
        self,
        response_id: str,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
        before: str | None,
    ) -> Page:
        """One page of a response's input items, with the other lists' cursors."""
        saved = await self._saved(response_id)
        items, more = _page(saved.input_items, limit=limit, order=order, after=after, before=before)
        return Page(
            data=items,
            first_id=items[0]["id"] if items else None,
            last_id=items[-1]["id"] if items else None,
            has_more=more,
        )

    async def _saved(self, response_id: str) -> ResponseState:
        await self.get(response_id)
        saved: ResponseState = await self._db(
            self.state.private, ResponseObject, response_id, ResponseState
        )
        return saved

    async def _previous(self, response_id: str) -> ResponseState:
        """The state of the response continued: a 400 naming it if there is none, as OpenAI's."""
        try:
            found = await self.get(response_id)
        except APIError as exc:
            if exc.status != 404:
                raise
            raise APIError(
                400,
                f"Previous response with id '{response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            ) from None
        if found.status == "in_progress":
            raise bad_request(
                f"Previous response with id '{response_id}' is still in progress: continue "
                "from it once it has ended.",
                "previous_response_id",
            )
        saved: ResponseState = await self._db(
            self.state.private, ResponseObject, response_id, ResponseState
        )
        return saved

    async def create(self, body: ResponseCreate) -> ResponseObject:
        """Answer ``body`` (without streaming)."""
        prepared = await self._prepare(body)
        return await self._answer(prepared, _no_events)

    async def stream(self, body: ResponseCreate) -> AsyncIterator[bytes]:
        """Answer ``body`` as OpenAI's Server-Sent Events.

        What the caller got wrong is raised here, before any event is sent.
        """
        prepared = await self._prepare(body)
        return self._events(prepared)

    async def _events(self, prepared: _Prepared) -> AsyncIterator[bytes]:
        sent, received = anyio.create_memory_object_stream[bytes](64)
        sequence = 0

        async def emit(kind: str, data: dict[str, Any]) -> None:
            nonlocal sequence
            event = {"type": kind, "sequence_number": sequence, **data}
            sequence += 1
            await sent.send(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())

        async def answer() -> None:
            async with sent:
                try:
                    await self._answer(prepared, emit)
                except Exception as exc:
                    # The status line is sent: what went wrong can only be an event now.
                    log.exception("response %s failed", prepared.response.id)
                    message = f"The server had an error processing your request: {exc!r}"
                    await emit("error", {"code": "server_error", "message": message, "param": None})

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(answer)
            async with received:
                async for chunk in received:
                    yield chunk

    async def _prepare(self, body: ResponseCreate) -> _Prepared:
        if self.model is None:
            raise bad_request(
                "this sandkernel daemon has no chat model to answer with: start it with "
                "`sandkernel serve --model-url URL` (an OpenAI-compatible endpoint)",
                "model",
                code="model_not_configured",
            )
        history = ResponseState()
        if body.previous_response_id is not None:
            history = await self._previous(body.previous_response_id)
        functions, code_tool = _tools(body.tools)
        text, response_format = _text_format(body.text)  # checked before any container
        _check_tool_choice(body.tool_choice, functions, code=code_tool is not None)
        input_items, messages, given_files = _input(body.input)
        _check_answers([*history.transcript, *messages])
        listed: list[StoredFile] = []
        named: str | None = None
        if code_tool is not None:
            named, listed_ids = _container_spec(code_tool)
            for i, file_id in enumerate(listed_ids):
                where = f"tools.container.file_ids[{i}]"
                listed.append(await self.containers.uploaded(file_id, where))
        given_stored: list[StoredFile] = []
        for given in given_files:
            where = f"{given.where}.file_id"
            given_stored.append(await self.containers.uploaded(given.file_id, where))
            if code_tool is None:
                raise bad_request(
                    "An input_file part needs the code_interpreter tool here: its file is put "
                    f"in the tool's container. Add the tool, or send the text; {_SERVED_PARTS}.",
                    given.where,
                )
        # Last: a container made for a request refused afterwards would be left running.
        session = None
        if code_tool is not None:
            files = [*listed, *given_stored]
            session, placed = await self._container(named, history.container_id, files)
            # Each named where the container put it, which is not its own name when that
            # was taken there (by a file the code wrote, an earlier file of this request).
            at = {f.id: path for f, path in zip(files, placed, strict=True)}
            for given, stored in zip(given_files, given_stored, strict=True):
                given.placed(stored, at[stored.id])
        response = ResponseObject(
            id=new_id("resp"),
            created_at=_now(),
            status="in_progress",
            model=body.model,
            output=[],
            instructions=body.instructions,
            tools=body.tools,
            tool_choice=body.tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            metadata=body.metadata or {},
            temperature=body.temperature,
            top_p=body.top_p,
            max_output_tokens=body.max_output_tokens,
            text=text,
            truncation=body.truncation or "disabled",
            user=body.user,
        )
        return _Prepared(
            body=body,
            response=response,
            session=session,
            functions=functions,
            code=code_tool is not None,
            transcript=[*history.transcript, *messages],
            input_items=input_items,
            container_id=session.id if session is not None else history.container_id,
            response_format=response_format,
        )

    async def _answer(self, prepared: _Prepared, emit: Emit) -> ResponseObject:
        assert self.model is not None
        turn = _Turn(
            prepared.body,
            prepared.session,
            prepared.functions,
            prepared.code,
            emit,
            self.containers.engine.download,
            container_id=prepared.container_id,
            container_files=self.containers.current_files,
            response_format=prepared.response_format,
        )
        answered = len(prepared.transcript)
        store = prepared.body.store

        def saved(kept: int) -> ResponseState:
            return ResponseState(
                transcript=prepared.transcript[:kept],
                input_items=prepared.input_items,
                container_id=prepared.container_id,
            )

        def ended() -> ResponseObject:
            return prepared.response.model_copy(
                update={
                    "status": turn.status,
                    "completed_at": _now() if turn.status == "completed" else None,
                    "output": turn.output,
                    "usage": turn.usage(),
                    "error": turn.error,
                    "incomplete_details": turn.incomplete_details,
                }
            )

        if store:
            # Stored as it starts, in progress, before its first event tells a client
            # its id: it can be retrieved from then on, while it runs.
            await self._db(
                self.state.save, prepared.response, private={prepared.response.id: saved(answered)}
            )
        started = {"response": prepared.response.model_dump(mode="json")}
        session = prepared.session
        # The container stays alive while the response uses it, slow model turns included.
        keep_active = None if session is None else partial(self.containers.keep_active, session)
        answered_whole = False
        try:
            await emit("response.created", started)
            await emit("response.in_progress", started)
            with anyio.CancelScope() as stopping:
                self._answering.add(stopping)
                if self._stopping:
                    stopping.cancel()
                try:
                    async with renewing(keep_active):
                        await turn.run(self.model, prepared.transcript)
                        answered_whole = True
                finally:
                    self._answering.discard(stopping)
            # Not a response already answered, the stop reaching it as its
            # container's renewals ended.
            if stopping.cancelled_caught and not answered_whole:
                turn.failed(_SHUT_DOWN)
                del prepared.transcript[answered:]
        except Exception as exc:
            # Its container is made and may have run code: the response is kept, failed,
            # rather than lost with a 500.
            log.exception("response %s failed", prepared.response.id)
            turn.failed(f"The server had an error while answering: {exc!r}")
            # Turns cut off mid-way (a call with no output) would refuse the next response.
            del prepared.transcript[answered:]
        except BaseException:
            # Cancelled: its client went (a stream closed, a request given up).
            if store:
                turn.cancelled()
                with anyio.CancelScope(shield=True):
                    await self._db(self.state.replace, ended(), private=saved(answered))
            raise
        response = ended()
        if store:
            # Not brought back if it was deleted meanwhile.
            await self._db(self.state.replace, response, private=saved(len(prepared.transcript)))
        kind = "response.completed" if turn.status == "completed" else f"response.{turn.status}"
        await emit(kind, {"response": response.model_dump(mode="json")})
        return response

    async def _container(
        self, named: str | None, previous: str | None, files: list[StoredFile]
    ) -> tuple[SessionAPI, list[str]]:
        """The session of the response's container, with ``files`` put in it.

        ``named``: the tool's container id (else ``{"type": "auto"}``).

        Returns:
            The session, and where in it each of ``files`` is, in their order.
        """
        session: SessionAPI | None = None
        if named is not None:
            session = await self.containers.session(named, "tools.container")
        elif previous is not None:
            try:
                container: Container | None = await self.containers.get(previous)
            except APIError as exc:
                if exc.status != 404:
                    raise
                container = None  # deleted since: replaced, as an expired one is
            if container is not None and container.status == "running":
                session = await self.containers.session(previous)
        if session is not None:
            placed = await self.containers.add_files(session, files)
            return session, [f.path for f in placed]
        created, placed = await self.containers.create_with_files(
            ContainerCreate(name="code interpreter (auto)", file_ids=[f.id for f in files])
        )
        return await self.containers.session(created.id), [f.path for f in placed]


Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


async def _no_events(kind: str, data: dict[str, Any]) -> None:
    return None


def _container_spec(tool: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The code_interpreter tool's container: its id if it names one, and the file ids to add."""
    spec = tool.get("container")
    if isinstance(spec, str):
        return spec, []
    if not isinstance(spec, dict) or spec.get("type") != "auto":
        raise bad_request(
            "code_interpreter needs container: a container id, or {'type': 'auto'}",
            "tools.container",
        )
    check_memory_limit(spec.get("memory_limit"), "tools.container.memory_limit")
    file_ids = spec.get("file_ids")
    if file_ids is None:
        return None, []
    if not isinstance(file_ids, list) or not all(isinstance(f, str) for f in file_ids):
        raise bad_request(
            "container.file_ids must be a list of file ids (strings)", "tools.container.file_ids"
        )
    return None, file_ids


def _page(
    items: list[dict[str, Any]],
    *,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None,
    before: str | None,
) -> tuple[list[dict[str, Any]], bool]:
    """One page of ``items`` (oldest first), as the stored lists page: also whether more follow.

    ``after`` starts the page after that item, in ``order``; ``before`` alone
    gives the page just before that item, and with ``after`` ends the list
    there (the items strictly between the two); an id not in the list is a 400.
    """
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    start, end = 0, len(ordered)
    for cursor, param in ((after, "after"), (before, "before")):
        if cursor is not None and cursor not in ids:
            raise bad_request(f"No input item found with id '{cursor}' in this list.", param)
    if after is not None:
        start = ids.index(after) + 1
    if before is not None:
        end = max(start, ids.index(before))
    if before is not None and after is None:
        # The page just before ``before``: more follow if any precede it.
        first = max(0, end - limit)
        return ordered[first:end], first > 0
    between = ordered[start:end]
    return between[:limit], len(between) > limit


class _Turn:
    """One response's model turns and code calls, telling ``emit`` each step as it happens."""

    def __init__(
        self,
        body: ResponseCreate,
        session: SessionAPI | None,
        functions: dict[str, dict[str, Any]],
        code: bool,
        emit: Emit = _no_events,
        download: Callable[[str], Awaitable[bytes]] | None = None,
        *,
        container_id: str | None = None,
        container_files: Callable[[str], Awaitable[list[StoredFile]]] | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> None:
        self.body = body
        self.response_format = response_format
        self.session = session
        self.functions = functions
        self.code = code
        self.emit = emit
        self.download = download
        self.output: list[dict[str, Any]] = []
        self.status: Literal["completed", "failed", "incomplete", "cancelled"] = "completed"
        self.error: dict[str, Any] | None = None
        self.incomplete_details: dict[str, Any] | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        #: the container whose files the answer cites (this response's, or its chain's)
        self.container_id = session.id if session is not None else container_id
        self.container_files = container_files
        #: paths in the sandbox the code wrote in this response
        self.written: set[str] = set()

    def _cut_off(self) -> _Turn:
        self.status = "incomplete"
        self.incomplete_details = {"reason": "max_output_tokens"}
        return self

    def failed(self, message: str, code: str = "server_error") -> None:
        """End as failed: items still going end too (as failed code calls, else incomplete)."""
        self.status = "failed"
        self.error = {"code": code, "message": message}
        end_items(self.output)

    def cancelled(self) -> None:
        """End as cancelled (its client went): items still going end too."""
        self.status = "cancelled"
        end_items(self.output)

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def _chat_tools(self) -> list[dict[str, Any]]:
        tools = [python_tool()] if self.code else []
        tools += [{"type": "function", "function": f} for f in self.functions.values()]
        return tools

    def _tool_choice(self, first: bool) -> str | dict[str, Any]:
        choice = self.body.tool_choice
        if isinstance(choice, str):
            return choice if first or choice != "required" else "auto"
        if not first:
            return "auto"
        if choice.get("type") == "code_interpreter":
            return {"type": "function", "function": {"name": PYTHON}}
        if choice.get("type") == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        return "auto"

    async def _add_item(self, item: dict[str, Any]) -> int:
        self.output.append(item)
        index = len(self.output) - 1
        await self.emit("response.output_item.added", {"output_index": index, "item": item})
        return index

    async def _item_done(self, index: int) -> None:
        item = self.output[index]
        await self.emit("response.output_item.done", {"output_index": index, "item": item})

    async def run(self, model: AssistantModel, transcript: list[dict[str, Any]]) -> _Turn:
        system = [{"role": "system", "content": self._system()}]
        limit = self.body.max_output_tokens
        for index in range(MAX_TURNS):
            # The response's bound, over all its model turns, as OpenAI counts it.
            left = None if limit is None else limit - self.output_tokens
            if left is not None and left <= 0:
                return self._cut_off()
            request = ChatRequest(
                model=self.body.model,
                messages=[*system, *transcript],
                tools=self._chat_tools(),
                tool_choice=self._tool_choice(index == 0) if self._chat_tools() else "auto",
                max_completion_tokens=left,
                temperature=self.body.temperature,
                top_p=self.body.top_p,
                parallel_tool_calls=self.body.parallel_tool_calls,
                response_format=self.response_format,
            )
            text = _TextItem(self)
            try:
                chat = await model.turn(
                    request, on_text=text.delta if self.emit is not _no_events else None
                )
            except ModelCallFailed as exc:
                if text.opened:  # what the model streamed before it failed ends with it
                    await text.done(text.streamed, final=False, status="incomplete")
                self.failed(str(exc), run_error_code(exc))
                return self
            self.input_tokens += chat.prompt_tokens
            self.output_tokens += chat.completion_tokens
            reply = chat.reply
            assistant: dict[str, Any] = {"role": "assistant", "content": reply.content}
            if reply.tool_calls:
                assistant["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in reply.tool_calls
                ]
            transcript.append(assistant)
            if reply.finish_reason == "length":
                # Cut off by the token bound: what it said so far, and no call
                # (its arguments may be cut too).
                transcript[-1] = {"role": "assistant", "content": reply.content or ""}
                if reply.content:
                    await text.done(reply.content, final=True, status="incomplete")
                return self._cut_off()
            if reply.content or not reply.tool_calls:
                await text.done(reply.content or "", final=not reply.tool_calls)
            if not reply.tool_calls:
                return self
            waiting = False
            for call in reply.tool_calls:
                if call.name == PYTHON and self.code:
                    transcript.append(await self._run_code(call.id, call.arguments))
                elif call.name in self.functions:
                    await self._function_call(call.id, call.name, call.arguments)
                    waiting = True
                else:
                    transcript.append(
                        {
                            "role": "tool",
                            "tool_call_id": call.id,
                            "content": f"Error: there is no tool named {call.name!r}.",
                        }
                    )
            if waiting:  # the caller runs its functions and sends their outputs
                return self
        self.status = "incomplete"
        return self

    async def _function_call(self, call_id: str, name: str, arguments: str) -> None:
        item = {
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": call_id,
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        index = await self._add_item(item)
        where = {"item_id": item["id"], "output_index": index}
        await self.emit("response.function_call_arguments.delta", {**where, "delta": arguments})
        await self.emit("response.function_call_arguments.done", {**where, "arguments": arguments})
        item.update(arguments=arguments, status="completed")
        await self._item_done(index)

    def _system(self) -> str:
        parts = [self.body.instructions.strip()] if self.body.instructions else []
        if self.code:
            parts.append(
                f"Run Python with the {PYTHON} tool; files are in {MNT_DATA}, and files "
                f"you write there are given to the user."
            )
        return "\n\n".join(parts)

    async def _run_code(self, call_id: str, arguments: str) -> dict[str, Any]:
        assert self.session is not None
        code, problem = code_argument(arguments)
        item: dict[str, Any] = {
            "type": "code_interpreter_call",
            "id": new_id("ci"),
            "code": "",
            "container_id": self.session.id,
            "status": "in_progress",
            "outputs": None,
        }
        index = await self._add_item(item)
        where = {"item_id": item["id"], "output_index": index}
        await self.emit("response.code_interpreter_call.in_progress", where)
        if code is not None:
            await self.emit("response.code_interpreter_call_code.delta", {**where, "delta": code})
        item["code"] = code or ""
        await self.emit("response.code_interpreter_call_code.done", {**where, "code": item["code"]})
        if code is None:
            item["status"] = "failed"
            await self._item_done(index)
            return {"role": "tool", "tool_call_id": call_id, "content": problem}
        item["status"] = "interpreting"
        await self.emit("response.code_interpreter_call.interpreting", where)
        try:
            result = await self.session.run(code)
        except SandkernelError as exc:
            item["status"] = "failed"
            await self._item_done(index)
            return {"role": "tool", "tool_call_id": call_id, "content": f"Error: {exc}"}
        outputs: list[dict[str, Any]] = []
        logs = result.stdout + result.stderr + result_tail(result)
        if logs:
            outputs.append({"type": "logs", "logs": logs})
        for produced in result.files:
            if produced.source == "display":
                outputs.append({"type": "image", "url": await self._image_url(produced)})
            else:
                path = produced.path
                self.written.add(path if path.startswith("/") else f"{MNT_DATA}/{path}")
        if _OUTPUTS in self.body.include:
            item["outputs"] = outputs
        item["status"] = "completed" if result.status in ("ok", "error") else "incomplete"
        await self.emit("response.code_interpreter_call.completed", where)
        await self._item_done(index)
        return {"role": "tool", "tool_call_id": call_id, "content": format_result(result)}

    async def _image_url(self, produced: ProducedFile) -> str:
        """A ``data:`` URL of a displayed image: usable as is, with no second request."""
        if self.download is None:
            return f"sandbox:{produced.path}"
        content = await self.download(produced.id)
        return f"data:{produced.mime_type};base64,{base64.b64encode(content).decode()}"

    async def citations(self, text: str) -> list[dict[str, Any]]:
        """``container_file_citation`` annotations for the container's files ``text`` names.

        The files code wrote in the container, in this response or before it
        (before a function call, in an earlier response of the chain), at
        their last version: one per path the text names, at its first mention.
        A file this response's code wrote that the text does not name is cited
        at the text's end (an empty span), so the caller still finds it.
        """
        if self.container_id is None or self.container_files is None:
            return []
        annotations: list[dict[str, Any]] = []
        for stored in await self.container_files(self.container_id):
            if not written_by_code(stored):
                continue
            path = str(stored.path)
            full = path if path.startswith("/") else f"{MNT_DATA}/{path}"
            start = next(whole_mentions(text, full), -1)
            end = start + len(full)
            if start < 0:
                if full not in self.written:
                    continue
                start = end = len(text)
            annotations.append(
                {
                    "type": "container_file_citation",
                    "container_id": self.container_id,
                    "file_id": stored.id,
                    "filename": full.rsplit("/", 1)[-1],
                    "start_index": start,
                    "end_index": end,
                }
            )
        annotations.sort(key=lambda a: a["start_index"])
        return annotations


class _TextItem:
    """A message item of the model's text: opened at its first delta, closed with ``done``."""

    def __init__(self, turn: _Turn) -> None:
        self.turn = turn
        self.index: int | None = None
        self.item: dict[str, Any] = {
            "type": "message",
            "id": new_id("msg"),
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self._deltas: list[str] = []

    @property
    def opened(self) -> bool:
        return self.index is not None

    @property
    def streamed(self) -> str:
        """The text of the deltas so far."""
        return "".join(self._deltas)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item["id"], "output_index": self.index, "content_index": 0}

    async def _open(self) -> None:
        if self.index is None:
            self.index = await self.turn._add_item(self.item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            await self.turn.emit("response.content_part.added", {**self._where(), "part": part})

    async def delta(self, text: str) -> None:
        await self._open()
        self._deltas.append(text)
        await self.turn.emit(
            "response.output_text.delta", {**self._where(), "delta": text, "logprobs": []}
        )

    async def done(self, text: str, *, final: bool, status: str = "completed") -> None:
        await self._open()
        assert self.index is not None
        annotations = await self.turn.citations(text) if final else []
        part = {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}
        where = self._where()
        for i, annotation in enumerate(annotations):
            await self.turn.emit(
                "response.output_text.annotation.added",
                {**where, "annotation_index": i, "annotation": annotation},
            )
        await self.turn.emit("response.output_text.done", {**where, "text": text, "logprobs": []})
        await self.turn.emit("response.content_part.done", {**where, "part": part})
        self.item.update(content=[part], status=status)
        await self.turn._item_done(self.index)


def _tools(
    tools: list[dict[str, Any]],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    functions: dict[str, dict[str, Any]] = {}
    code: dict[str, Any] | None = None
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "code_interpreter":
            code = tool
        elif kind == "function":
            name = tool.get("name")
            if not isinstance(name, str) or name == PYTHON:
                raise bad_request(
                    f"A function needs a name other than {PYTHON!r}.", f"tools[{i}].name"
                )
            if name in functions:  # as an assistant's tools are checked
                raise bad_request(f"Two functions are named {name!r}.", f"tools[{i}].name")
            for key, kind_of, what in (
                ("parameters", dict, "a JSON schema object"),
                ("description", str, "a string"),
            ):
                if tool.get(key) is not None and not isinstance(tool[key], kind_of):
                    raise bad_request(f"A function's {key} must be {what}.", f"tools[{i}].{key}")
            functions[name] = {
                k: tool[k] for k in ("name", "description", "parameters") if k in tool
            }
        else:
            raise bad_request(
                f"Tool type {kind!r} is not supported here: sandkernel serves "
                "code_interpreter and your functions.",
                f"tools[{i}].type",
            )
    return functions, code


def _check_tool_choice(
    choice: str | dict[str, Any], functions: dict[str, dict[str, Any]], *, code: bool
) -> None:
    """A 400 for a tool_choice that names a tool the request does not give."""
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(
                f"tool_choice {choice!r} is not one of auto, none, required", "tool_choice"
            )
        if choice == "required" and not (functions or code):
            raise bad_request("tool_choice 'required' needs at least one tool", "tool_choice")
        return
    kind = choice.get("type")
    if kind == "code_interpreter" and not code:
        raise bad_request(
            "tool_choice names code_interpreter, which is not among the tools", "tool_choice"
        )
    name = choice.get("name")
    if kind == "function" and not isinstance(name, str):
        raise bad_request("tool_choice.name must be a function name (a string)", "tool_choice.name")
    if kind == "function" and name not in functions:
        raise bad_request(
            f"tool_choice names the function {name!r}, which is not among the tools",
            "tool_choice.name",
        )
    if kind not in ("code_interpreter", "function"):
        raise bad_request(f"tool_choice of type {kind!r} is not supported here", "tool_choice")


def _input(
    given: str | list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[_GivenFile]]:
    """The input items as stored, as chat messages, and the files they give.

    A 400 names the first bad one. Besides messages and function outputs, the
    items a response gave are taken back (OpenAI's function-calling loop sends
    ``input += response.output``): its assistant messages, its
    ``function_call`` items, its ``code_interpreter_call`` items.
    """
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    items: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    files: list[_GivenFile] = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message_item(item, where, messages, files))
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise bad_request("function_call_output needs call_id and output", where)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            items.append(
                {
                    "type": "function_call_output",
                    "id": _item_id(item, "fco"),
                    "call_id": call_id,
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind == "function_call":
            call_id, name, arguments = (item.get(k) for k in ("call_id", "name", "arguments"))
            if not all(isinstance(v, str) for v in (call_id, name, arguments)):
                raise bad_request(
                    "function_call needs call_id, name and arguments (strings)", where
                )
            _add_call(messages, str(call_id), str(name), str(arguments))
            items.append(
                {
                    "type": "function_call",
                    "id": _item_id(item, "fc"),
                    "call_id": call_id,
                    "name": name,
                    "arguments": arguments,
                    "status": "completed",
                }
            )
        elif kind == "code_interpreter_call":
            items.append(_code_item(item, where, messages))
        else:
            raise APIError(
                400, f"Input items of type {kind!r} are not supported here.", param=where
            )
        item_id = items[-1]["id"]
        if any(earlier["id"] == item_id for earlier in items[:-1]):
            # As OpenAI's: the items are listed (and paged) by their ids.
            raise bad_request(f"Duplicate item found with id {item_id}.", where)
    answered = {m["tool_call_id"] for m in messages if m["role"] == "tool"}
    for item in items:
        if item["type"] == "function_call" and item["call_id"] not in answered:
            # The model would be asked to go on from a call with no answer: its endpoint refuses.
            raise bad_request(f"No tool output found for function call {item['call_id']}.", "input")
    return items, messages, files


def _check_answers(transcript: list[dict[str, Any]]) -> None:
    """Every function call answered, every output answering a call: else OpenAI's 400.

    Over the previous responses' transcript too: a response that ended
    waiting for a function's output goes on only with that output.
    """
    calls = [
        c["id"] for m in transcript if m["role"] == "assistant" for c in m.get("tool_calls") or ()
    ]
    answered = {m["tool_call_id"] for m in transcript if m["role"] == "tool"}
    for call_id in answered - set(calls):
        raise bad_request(
            f"No tool call found for function call output with call_id {call_id}.", "input"
        )
    for call_id in calls:
        if call_id not in answered:
            raise bad_request(f"No tool output found for function call {call_id}.", "input")


def _item_id(item: dict[str, Any], prefix: str) -> str:
    given = item.get("id")
    return given if isinstance(given, str) and given else new_id(prefix)


def _add_call(messages: list[dict[str, Any]], call_id: str, name: str, arguments: str) -> None:
    """A tool call in the transcript: on the assistant turn just before it, if there is one.

    Calls a model made in one turn come as items one after the other; joined,
    they are that turn again, and their outputs, which follow, answer it.
    """
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


_ROLES: Final = ("user", "assistant", "system", "developer")


class _GivenFile:
    """An ``input_file`` part's file: looked up, then put in the container and named to the model.

    The model is told of it in a message of its own, just before the text of
    the message that gave it (whose words stay as they were sent). Until
    :meth:`placed`, that note and the part as stored lack what only the stored
    file and its placing tell: its name, and its path in the container.
    """

    def __init__(self, file_id: str, where: str, part: dict[str, Any], note: dict[str, Any]):
        self.file_id = file_id
        #: the part's name in the request (``input[0].content[1]``)
        self.where = where
        self.part = part
        self.note = note

    def placed(self, stored: StoredFile, path: str) -> None:
        """Name the file, put in the container at ``path`` (not always its own name)."""
        self.part["filename"] = stored.name
        self.note["content"] = f"[Attached file {stored.name}: it is in the container at {path}]"


_SERVED_PARTS: Final = (
    "sandkernel serves input_text parts (output_text and refusal in assistant messages) and "
    "input_file parts with a file_id, whose file is put in the code_interpreter container"
)


def _message_item(
    item: dict[str, Any],
    where: str,
    messages: list[dict[str, Any]],
    files: list[_GivenFile],
) -> dict[str, Any]:
    """A message input item as stored; its chat message is added to ``messages``.

    Its ``input_file`` parts are added to ``files``; a part of a type not
    served is a 400 saying what is, never dropped.
    """
    role = item.get("role", "user")
    if role not in _ROLES:
        raise bad_request(
            f"role must be one of {', '.join(_ROLES)} (got {role!r})", f"{where}.role"
        )
    content = item.get("content", "")
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": "input_text", "text": content}]
    elif isinstance(content, list) and all(isinstance(part, dict) for part in content):
        parts = content
    else:
        raise bad_request("content must be a string or a list of content parts", f"{where}.content")
    # Chat endpoints know "system"; the Responses API's "developer" is the same thing.
    chat_role = "system" if role == "developer" else role
    notes: list[dict[str, Any]] = []
    texts: list[str] = []
    stored: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind in ("input_text", "output_text", "refusal"):
            key = "refusal" if kind == "refusal" else "text"
            text = part.get(key)
            if not isinstance(text, str):
                raise bad_request(f"a {kind} part needs {key} (a string)", f"{at}.{key}")
            texts.append(text)
            if role != "assistant":
                stored.append({"type": "input_text", "text": text})
            elif kind == "refusal":
                stored.append({"type": "refusal", "refusal": text})
            else:
                stored.append({"type": "output_text", "text": text, "annotations": []})
        elif kind == "input_file" and part.get("file_id") is not None and role != "assistant":
            file_id = part["file_id"]
            if not isinstance(file_id, str):
                raise bad_request("file_id must be a file's id (a string)", f"{at}.file_id")
            file_part = {"type": "input_file", "file_id": file_id}
            stored.append(file_part)
            notes.append({"role": chat_role, "content": ""})
            files.append(_GivenFile(file_id, at, file_part, notes[-1]))
        else:
            detail = " without a file_id" if kind == "input_file" else ""
            raise bad_request(
                f"Content parts of type {kind!r}{detail} are not served in {role} messages "
                f"here: {_SERVED_PARTS}.",
                at,
            )
    messages.extend(notes)
    if texts or not notes:
        messages.append({"role": chat_role, "content": "".join(texts)})
    if role == "assistant":
        return {
            "type": "message",
            "id": _item_id(item, "msg"),
            "role": "assistant",
            "status": "completed",
            "content": stored,
        }
    return {
        "type": "message",
        "id": new_id("msg"),
        "role": role,
        "status": "completed",
        "content": stored,
    }


def _code_item(item: dict[str, Any], where: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A code_interpreter_call input item as stored; its call and result go in ``messages``.

    The call is kept (rather than left out) so the model sees the code that
    ran. What it was told of the result then is not in the item; the logs the
    item carries are what the caller was shown, so they stand for it, or a
    note that the item has none (``include`` did not ask for them). An item
    whose code is null shows the model nothing, so it is only stored.
    """
    item_id, code, container_id = (item.get(k) for k in ("id", "code", "container_id"))
    outputs = item.get("outputs")
    if not isinstance(item_id, str) or not isinstance(container_id, str):
        raise bad_request("code_interpreter_call needs id and container_id", where)
    if code is not None and not isinstance(code, str):
        raise bad_request("code must be a string or null", f"{where}.code")
    if outputs is not None and not (
        isinstance(outputs, list)
        and all(
            isinstance(o, dict)
            and (
                (o.get("type") == "logs" and isinstance(o.get("logs"), str))
                or (o.get("type") == "image" and isinstance(o.get("url"), str))
            )
            for o in outputs
        )
    ):
        raise bad_request(
            "outputs must be null or a list of logs and image outputs", f"{where}.outputs"
        )
    status = item.get("status", "completed")
    if status not in _CODE_STATUSES:
        raise bad_request(f"status {status!r} is not a code_interpreter_call status", where)
    if code:
        _add_call(messages, item_id, PYTHON, json.dumps({"code": code}))
        if outputs is None:
            result = "[The output of this code is not available.]"
        else:
            result = "".join(o["logs"] if o["type"] == "logs" else "[image]\n" for o in outputs)
        messages.append({"role": "tool", "tool_call_id": item_id, "content": result})
    return {
        "type": "code_interpreter_call",
        "id": item_id,
        "code": code,
        "container_id": container_id,
        "outputs": outputs,
        "status": status,
    }


_CODE_STATUSES: Final = ("in_progress", "completed", "incomplete", "interpreting", "failed")
