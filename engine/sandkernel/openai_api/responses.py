"""OpenAI's Responses API with the ``code_interpreter`` tool, over containers.

A response asks the chat model for turns until it answers in text or calls
one of the caller's functions. Code it writes runs in the response's
container (:mod:`~sandkernel.openai_api.containers`): the one named by the
tool's ``container``, or for ``{"type": "auto"}`` the container of the
``previous_response_id`` while it runs, else a new one. Each code call is a
``code_interpreter_call`` item; a function call is a ``function_call`` item,
answered by a ``function_call_output`` input item of the next response; the
answer is a ``message`` whose text cites the files the code wrote as
``container_file_citation`` annotations.

The chat turns of a response (and of the responses it continues) are kept
with it, so ``previous_response_id`` continues the conversation, and in the
same container its variables are still there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from sandkernel.api import SessionAPI
from sandkernel.errors import ModelCallFailed, SandkernelError
from sandkernel.loop import format_result, python_tool
from sandkernel.openai_api.chat import AssistantModel, ChatRequest
from sandkernel.openai_api.containers import MNT_DATA, Containers
from sandkernel.openai_api.errors import APIError, bad_request, not_found
from sandkernel.openai_api.runs import _code_argument, _result_tail
from sandkernel.openai_api.state import ApiState, ResponseState
from sandkernel.openai_api.wire import ContainerCreate, Deleted, Page, ResponseObject, new_id

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
    metadata: dict[str, str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True


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

    async def input_items(self, response_id: str, *, order: Literal["asc", "desc"]) -> Page:
        saved = await self._saved(response_id)
        items = list(saved.input_items)
        if order == "desc":
            items.reverse()
        return Page(
            data=items,
            first_id=items[0]["id"] if items else None,
            last_id=items[-1]["id"] if items else None,
        )

    async def _saved(self, response_id: str) -> ResponseState:
        await self.get(response_id)
        saved: ResponseState = await self._db(
            self.state.private, ResponseObject, response_id, ResponseState
        )
        return saved

    async def create(self, body: ResponseCreate) -> ResponseObject:
        if self.model is None:
            raise bad_request(
                "this sandkernel daemon has no chat model to answer with: start it with "
                "`sandkernel serve --model-url URL` (an OpenAI-compatible endpoint)",
                "model",
                code="model_not_configured",
            )
        if body.stream:
            raise bad_request(
                "stream: true is not served for responses yet; ask without it.", "stream"
            )
        history = ResponseState()
        if body.previous_response_id is not None:
            history = await self._saved(body.previous_response_id)
        functions, code_tool = _tools(body.tools)
        session = None
        if code_tool is not None:
            session = await self._container(code_tool, history.container_id)
        input_items, messages = _input(body.input)
        transcript = [*history.transcript, *messages]
        turn = _Turn(body, session, functions, code_tool is not None)
        run = await turn.run(self.model, transcript)
        response = ResponseObject(
            id=new_id("resp"),
            created_at=_now(),
            status=run.status,
            model=body.model,
            output=run.output,
            instructions=body.instructions,
            tools=body.tools,
            tool_choice=body.tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            usage=run.usage(),
            error=run.error,
            metadata=body.metadata or {},
            temperature=body.temperature,
            top_p=body.top_p,
            max_output_tokens=body.max_output_tokens,
        )
        if body.store:
            saved = ResponseState(
                transcript=transcript,
                input_items=input_items,
                container_id=session.id if session is not None else history.container_id,
            )
            await self._db(self.state.save, response, private={response.id: saved})
        return response

    async def _container(self, tool: dict[str, Any], previous: str | None) -> SessionAPI:
        spec = tool.get("container")
        if isinstance(spec, str):
            return await self.containers.session(spec, "tools.container")
        if not isinstance(spec, dict) or spec.get("type") != "auto":
            raise bad_request(
                "code_interpreter needs container: a container id, or {'type': 'auto'}",
                "tools.container",
            )
        file_ids = [str(f) for f in spec.get("file_ids") or []]
        if previous is not None:
            container = await self.containers.get(previous)
            if container.status == "running":
                session = await self.containers.session(previous)
                for file_id in file_ids:
                    await self.containers.add_file_id(previous, file_id)
                return session
        created = await self.containers.create(
            ContainerCreate(name="code interpreter (auto)", file_ids=file_ids)
        )
        return await self.containers.session(created.id)


class _Turn:
    """One response's model turns and code calls."""

    def __init__(
        self,
        body: ResponseCreate,
        session: SessionAPI | None,
        functions: dict[str, dict[str, Any]],
        code: bool,
    ) -> None:
        self.body = body
        self.session = session
        self.functions = functions
        self.code = code
        self.output: list[dict[str, Any]] = []
        self.status: Literal["completed", "failed", "incomplete"] = "completed"
        self.error: dict[str, Any] | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        #: (file id, path) of files the code wrote, to cite in the answer
        self.written: list[tuple[str, str]] = []

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

    async def run(self, model: AssistantModel, transcript: list[dict[str, Any]]) -> _Turn:
        system = [{"role": "system", "content": self._system()}]
        for index in range(MAX_TURNS):
            request = ChatRequest(
                model=self.body.model,
                messages=[*system, *transcript],
                tools=self._chat_tools(),
                tool_choice=self._tool_choice(index == 0) if self._chat_tools() else "auto",
                max_completion_tokens=self.body.max_output_tokens,
                temperature=self.body.temperature,
                top_p=self.body.top_p,
                parallel_tool_calls=self.body.parallel_tool_calls,
            )
            try:
                chat = await model.turn(request)
            except ModelCallFailed as exc:
                self.status = "failed"
                self.error = {"code": "server_error", "message": str(exc)}
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
            if not reply.tool_calls:
                self.output.append(self._message(reply.content or ""))
                return self
            waiting = False
            for call in reply.tool_calls:
                if call.name == PYTHON and self.code:
                    transcript.append(await self._run_code(call.id, call.arguments))
                elif call.name in self.functions:
                    self.output.append(
                        {
                            "type": "function_call",
                            "id": new_id("fc"),
                            "call_id": call.id,
                            "name": call.name,
                            "arguments": call.arguments,
                            "status": "completed",
                        }
                    )
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
        code, problem = _code_argument(arguments)
        item: dict[str, Any] = {
            "type": "code_interpreter_call",
            "id": new_id("ci"),
            "code": code or "",
            "container_id": self.session.id,
            "status": "completed",
            "outputs": None,
        }
        self.output.append(item)
        if code is None:
            item["status"] = "failed"
            return {"role": "tool", "tool_call_id": call_id, "content": problem}
        try:
            result = await self.session.run(code)
        except SandkernelError as exc:
            item["status"] = "failed"
            return {"role": "tool", "tool_call_id": call_id, "content": f"Error: {exc}"}
        outputs: list[dict[str, Any]] = []
        logs = result.stdout + result.stderr + _result_tail(result)
        if logs:
            outputs.append({"type": "logs", "logs": logs})
        for produced in result.files:
            if produced.source == "display":
                outputs.append({"type": "image", "url": f"/files/{produced.id}/content"})
            else:
                self.written.append((produced.id, produced.path))
        if _OUTPUTS in self.body.include:
            item["outputs"] = outputs
        if result.status not in ("ok", "error"):
            item["status"] = "incomplete"
        return {"role": "tool", "tool_call_id": call_id, "content": format_result(result)}

    def _message(self, text: str) -> dict[str, Any]:
        assert self.session is not None or not self.written
        annotations = []
        seen: set[str] = set()
        for file_id, path in self.written:
            if file_id in seen:
                continue
            seen.add(file_id)
            full = path if path.startswith("/") else f"{MNT_DATA}/{path}"
            name = full.rsplit("/", 1)[-1]
            start = text.find(full)
            end = start + len(full)
            if start < 0:
                start = end = len(text)
            annotations.append(
                {
                    "type": "container_file_citation",
                    "container_id": self.session.id if self.session else "",
                    "file_id": file_id,
                    "filename": name,
                    "start_index": start,
                    "end_index": end,
                }
            )
        return {
            "type": "message",
            "id": new_id("msg"),
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": text, "annotations": annotations, "logprobs": []}
            ],
        }


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


def _input(given: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input items as stored, and as chat messages."""
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    items: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise bad_request("function_call_output needs call_id and output", f"input[{i}]")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            items.append(
                {
                    "type": "function_call_output",
                    "id": new_id("fco"),
                    "call_id": call_id,
                    "output": output,
                    "status": "completed",
                }
            )
            continue
        if kind != "message":
            raise APIError(
                400, f"Input items of type {kind!r} are not supported here.", param=f"input[{i}]"
            )
        role = item.get("role", "user")
        content = item.get("content", "")
        if isinstance(content, str):
            text = content
        else:
            text = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        messages.append({"role": role, "content": text})
        items.append(
            {
                "type": "message",
                "id": new_id("msg"),
                "role": role,
                "status": "completed",
                "content": [{"type": "input_text", "text": text}],
            }
        )
    return items, messages
