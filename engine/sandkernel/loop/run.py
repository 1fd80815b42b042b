"""The loop itself: the model writes code, the session runs it, the model reads the result.

When the code fails the model sees the error, changes the code and runs it
again, until it answers or runs out of attempts (:func:`run_loop`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from sandkernel.loop.formatting import format_result
from sandkernel.loop.models import ChatModel, ModelReply, ToolCall, ToolChoice
from sandkernel.loop.tool import DEFAULT_AVAILABLE_MODULES, TOOL_NAME, python_tool
from sandkernel.results import ExecutionResult, ProducedFile

Outcome = Literal["answered", "max_attempts", "tool_forbidden"]


class CodeRunner(Protocol):
    """Where :func:`run_loop` runs code; a :class:`~sandkernel.session.Session` is one."""

    async def run(
        self, code: str, *, timeout_s: float | None = None, restart: bool | None = None
    ) -> ExecutionResult: ...


class LoopEvent(BaseModel):
    """A step of :func:`run_loop`, as ``on_event`` receives it.

    ``kind`` is ``model_reply`` (``reply`` set), ``code`` (``code`` is about to
    run), ``result`` (``result`` and the ``tool_message`` the model will read)
    or ``rejected_call`` (a tool call that was not run; ``tool_message`` says why).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_reply", "code", "result", "rejected_call"]
    attempt: int = Field(description="code executions counted so far, this one included")
    reply: ModelReply | None = None
    call_id: str | None = None
    code: str | None = None
    result: ExecutionResult | None = None
    tool_message: str | None = None


class LoopResult(BaseModel):
    """How :func:`run_loop` ended and everything that happened on the way."""

    model_config = ConfigDict(extra="forbid")

    outcome: Outcome = Field(
        description="answered: the model replied without a tool call; max_attempts: it still "
        "wanted to run code after the last allowed execution; tool_forbidden: it called the "
        "tool although tool_choice='none' (nothing was run)"
    )
    final_answer: str | None = Field(description="the model's last text, if any")
    message: str | None = Field(default=None, description="why the loop stopped, in words")
    transcript: list[dict[str, Any]] = Field(description="every message, the input included")
    executions: list[ExecutionResult] = Field(default_factory=list)
    files: list[ProducedFile] = Field(default_factory=list, description="from every execution")
    attempts: int = Field(description="tool calls counted against max_attempts")
    model_calls: int = 0

    @property
    def answered(self) -> bool:
        return self.outcome == "answered"


EventCallback = Callable[[LoopEvent], Awaitable[None] | None]


async def run_loop(
    model: ChatModel,
    messages: str | Sequence[Mapping[str, Any]],
    session: CodeRunner,
    *,
    max_attempts: int = 5,
    tool_choice: ToolChoice = "auto",
    budget_chars: int = 8000,
    timeout_s: float | None = None,
    available_modules: Sequence[str] = DEFAULT_AVAILABLE_MODULES,
    on_event: EventCallback | None = None,
) -> LoopResult:
    """Let ``model`` write and run code in ``session`` until it answers.

    Each reply's tool calls run in order in the session; each gets a ``tool``
    message with :func:`format_result`'s text, so a model whose code failed
    reads the error and tries again. The loop ends when the model replies
    without a tool call (``answered``). Every tool call counts as an attempt,
    malformed ones included (they get a message explaining the expected
    arguments). After the last allowed attempt the model is asked once more,
    with ``tool_choice="none"``, so it answers; if it asks to run code again,
    the loop ends with ``max_attempts``, so the model is called at most
    ``max_attempts + 1`` times.

    A kernel that dies (out of memory, killed) is replaced on the next run and
    the model is told its variables are gone.

    Args:
        model: the chat model (:class:`OpenAIChatModel` or any :class:`ChatModel`).
        messages: the conversation so far (chat-completions dicts), or a task as text.
        session: where code runs, usually an engine :class:`~sandkernel.session.Session`.
        max_attempts: tool calls allowed (at least 1).
        tool_choice: as in OpenAI's API. ``"required"`` forces a tool call on the
            first model call only, then becomes ``"auto"`` so the model can
            answer. ``"none"`` forbids tool calls; if the model sends some
            anyway they are not run and the outcome is ``tool_forbidden``.
        budget_chars: the most characters of each tool message.
        timeout_s: wall timeout of each execution (default: the policy's).
        available_modules: named to the model when an import fails.
        on_event: called with a :class:`LoopEvent` at each step (may be async).

    Raises:
        ModelCallFailed: the model could not be called.
        SessionExpired, SessionClosed: the session ended under the loop.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if tool_choice not in ("auto", "required", "none"):
        raise ValueError(f"tool_choice must be 'auto', 'required' or 'none', not {tool_choice!r}")
    if isinstance(messages, str):
        transcript: list[dict[str, Any]] = [{"role": "user", "content": messages}]
    else:
        transcript = [dict(m) for m in messages]
    tools = [python_tool(available_modules=available_modules)]
    executions: list[ExecutionResult] = []
    attempts = 0
    model_calls = 0
    restarted = False
    choice: ToolChoice = tool_choice

    async def emit(event: LoopEvent) -> None:
        if on_event is not None:
            maybe = on_event(event)
            if inspect.isawaitable(maybe):
                await maybe

    def finish(outcome: Outcome, answer: str | None, message: str | None) -> LoopResult:
        return LoopResult(
            outcome=outcome,
            final_answer=answer,
            message=message,
            transcript=transcript,
            executions=executions,
            files=[f for r in executions for f in r.files],
            attempts=attempts,
            model_calls=model_calls,
        )

    async def reject(call: ToolCall, why: str) -> None:
        transcript.append(_tool_message(call.id, why))
        await emit(
            LoopEvent(kind="rejected_call", attempt=attempts, call_id=call.id, tool_message=why)
        )

    while True:
        reply = await model.complete(transcript, tools, choice)
        model_calls += 1
        transcript.append(_assistant_message(reply))
        await emit(LoopEvent(kind="model_reply", attempt=attempts, reply=reply))
        if not reply.tool_calls:
            note = None
            if tool_choice == "required" and attempts == 0:
                note = "the model answered without running code although tool_choice='required'"
            return finish("answered", reply.content, note)
        if tool_choice == "none":
            for call in reply.tool_calls:
                await reject(call, "Not run: code execution is disabled for this reply.")
            return finish(
                "tool_forbidden",
                reply.content,
                "the model called the python tool although tool_choice='none'; nothing was run",
            )
        if attempts >= max_attempts:
            for call in reply.tool_calls:
                await reject(
                    call, f"Not run: the limit of {max_attempts} code executions was reached."
                )
            return finish(
                "max_attempts",
                reply.content,
                f"stopped after {max_attempts} code executions: the model still wanted to run "
                "code instead of answering",
            )
        for call in reply.tool_calls:
            if attempts >= max_attempts:
                await reject(
                    call, f"Not run: the limit of {max_attempts} code executions was reached."
                )
                continue
            attempts += 1
            last = (
                f"\n[That was the last code execution allowed ({max_attempts}); answer now "
                "with what you have.]"
                if attempts == max_attempts
                else ""
            )
            code, problem = _code_of(call)
            if code is None:
                await reject(call, problem + last)
                continue
            await emit(LoopEvent(kind="code", attempt=attempts, call_id=call.id, code=code))
            # A dead kernel is replaced: the model is better served by a fresh kernel
            # (and being told its variables are gone) than by an engine error.
            result = await session.run(code, timeout_s=timeout_s, restart=True)
            executions.append(result)
            text = format_result(
                result,
                budget_chars=max(0, budget_chars - len(last)),  # the note is within the budget
                available_modules=available_modules,
                after_restart=restarted,
            )
            # Its variables go with its kernel only (a process of the cell killed for
            # memory leaves them).
            restarted = restarted or result.state_lost or not result.kernel_alive
            transcript.append(_tool_message(call.id, text + last))
            await emit(
                LoopEvent(
                    kind="result",
                    attempt=attempts,
                    call_id=call.id,
                    code=code,
                    result=result,
                    tool_message=text + last,
                )
            )
        if choice == "required":
            choice = "auto"
        if attempts >= max_attempts:
            # The call after the last execution is for the answer: told so (a model
            # that calls the tool all the same still ends the loop, above).
            choice = "none"


def _code_of(call: ToolCall) -> tuple[str | None, str]:
    """The ``code`` argument of a tool call, or why there is none."""
    expected = 'Call the python tool with JSON arguments like {"code": "print(1 + 1)"}.'
    if call.name != TOOL_NAME:
        return (
            None,
            f"Error: there is no tool named {call.name!r}; the only tool is python. {expected}",
        )
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return None, f"Error: the arguments are not valid JSON ({exc.msg} at {exc.pos}). {expected}"
    if not isinstance(arguments, dict):
        return None, f"Error: the arguments must be a JSON object. {expected}"
    code = arguments.get("code")
    if not isinstance(code, str):
        got = ", ".join(sorted(arguments)) or "none"
        return None, f'Error: the "code" argument (a string) is missing (got: {got}). {expected}'
    if not code.strip():
        return None, f'Error: the "code" argument is empty. {expected}'
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Valid JSON (a "\\ud83d" escape alone), but no text a kernel can be sent.
        return None, (
            f'Error: the "code" argument holds half of a character (the lone surrogate '
            f"{code[exc.start]!r} at position {exc.start}); write the whole character or "
            f"an escape such as \\N{{...}} or \\U0001F600 in the code. {expected}"
        )
    return code, ""


def _assistant_message(reply: ModelReply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in reply.tool_calls
        ]
    return message


def _tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}
