"""A run: the model writes code, the thread's sandbox runs it, the model reads the result.

This is the model loop of :mod:`sandkernel.loop` as the Assistants API
shapes it: each model turn becomes a run step, kept in SQLite as it
happens; a turn that calls the caller's functions pauses the run
(``requires_action``) until the caller submits their outputs, which can
come after the daemon restarted; the run may force one tool on its first
turn (``tool_choice``) and has a token budget. The pieces the loop shares
are the loop's own: the ``python`` tool (:func:`~sandkernel.loop.python_tool`),
the text the model reads for a result (:func:`~sandkernel.loop.format_result`,
the error handed back so the model can fix its code), and its reply types.

::

    queued ─▶ in_progress ─┬─▶ completed | incomplete | failed
                ▲           ├─▶ requires_action ─(tool outputs)─▶ queued
                │           └─▶ cancelling ─▶ cancelled
      model turn: text ─▶ message_creation step (+ the images and files code made)
                  tool calls ─▶ tool_calls step: code runs in the session
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import anyio
from pydantic import BaseModel

from sandkernel.api import EngineAPI, SessionAPI
from sandkernel.errors import (
    BadInput,
    EngineClosed,
    KernelDead,
    KernelStartFailed,
    ModelCallFailed,
    PoolExhausted,
    SandkernelError,
    SessionError,
    SessionLimitReached,
)
from sandkernel.loop import ModelReply, ToolCall, format_result, python_tool, user_traceback
from sandkernel.openai_api.chat import AssistantModel, ChatRequest, run_error_code
from sandkernel.openai_api.events import RunEvents
from sandkernel.openai_api.keepalive import Renew, renewing
from sandkernel.openai_api.placement import Placement, Workspace
from sandkernel.openai_api.state import ApiState, RunState, ThreadState
from sandkernel.openai_api.wire import (
    ACTIVE_RUN_STATUSES,
    Attachment,
    AttachmentTool,
    CodeInterpreterCall,
    CodeInterpreterDetails,
    CodeInterpreterTool,
    FilePath,
    FilePathAnnotation,
    FunctionCall,
    FunctionCallDetails,
    FunctionTool,
    FunctionToolCall,
    ImageFileContent,
    ImageFileRef,
    ImageOutput,
    ImageRef,
    ImageUrlContent,
    IncompleteDetails,
    LastError,
    LogsOutput,
    Message,
    MessageContent,
    MessageCreationDetails,
    MessageCreationRef,
    RequiredAction,
    RequiredToolCall,
    Run,
    RunStep,
    SubmitToolOutputsAction,
    Text,
    TextContent,
    Thread,
    ToolCallsDetails,
    Usage,
    new_id,
)
from sandkernel.results import ExecutionResult

log = logging.getLogger(__name__)

PYTHON: Final = str(python_tool()["function"]["name"])
#: How long a run waits for tool outputs, as OpenAI's runs do.
REQUIRES_ACTION_TTL_S: Final = 600
_MAX_LOG_CHARS: Final = 20_000
#: The answer of a call the run ended before it began (its code never reached the kernel).
_MISSED_CALL: Final = "Not run: the run ended before this call was answered."
#: The answer of a code call until its result is known: what the model reads of it if the
#: run ends while the code runs (cancelled, the daemon stopped).
_CUT_SHORT_CALL: Final = (
    "Stopped while running: the run ended while this code was running, so it may have "
    "partly run; what it did before it stopped (variables set, files written) may remain."
)


#: What the engine raises before a cell is sent, never once it runs (its failures then
#: are the cell's result): a session gone, no kernel to start, input refused.
_REFUSED_BEFORE_RUNNING: Final = (
    SessionError, PoolExhausted, KernelStartFailed, KernelDead, EngineClosed, BadInput,
)  # fmt: skip


def now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class RunLimits:
    """Bounds of one run.

    Args:
        max_code_calls: code executions; past them the model is told to answer.
        max_model_calls: model turns; past them the run fails.
        budget_chars: the most characters of each result the model reads.
        stream_text: ask the model for its reply as a stream (text deltas as
            they are generated) when someone streams the run.
    """

    max_code_calls: int = 20
    max_model_calls: int = 50
    budget_chars: int = 8000
    stream_text: bool = True


class RunStopped(Exception):
    """Ends a run early with a status other than completed."""

    def __init__(
        self,
        status: Literal["failed", "incomplete"],
        message: str,
        *,
        code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"] = "server_error",
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Waiting:
    """A run waiting for tool outputs: what renews its thread's session, and until when.

    Args:
        renew: renews the session (its new expiry), None once it has ended.
        until: when the run's wait for tool outputs is over (a Unix time).
    """

    renew: Renew
    until: float


class RunDriver:
    """Drives runs through their steps; the service owns the tasks it runs in."""

    def __init__(
        self,
        engine: EngineAPI,
        state: ApiState,
        events: RunEvents,
        placement: Placement,
        model: AssistantModel | None,
        limits: RunLimits | None = None,
    ) -> None:
        self.engine = engine
        self.state = state
        self.events = events
        self.placement = placement
        self.model = model
        self.limits = limits or RunLimits()

    async def drive(self, run_id: str) -> Waiting | None:
        """Run a queued run until it completes, fails, or waits for tool outputs.

        Returns, for a run left waiting for tool outputs, what renews its
        thread's session and until when: the caller keeps the session alive
        while the run waits (:func:`~sandkernel.openai_api.keepalive.hold`).
        """
        progress = await _Progress.load(self, run_id)
        if progress.run.status not in ("queued", "in_progress"):
            return None  # settled meanwhile (cancelled while queued)
        # The thread's session stays alive while the run uses it, slow model turns included.
        try:
            async with renewing(progress.keep_alive if progress.has_code_interpreter else None):
                await progress.go()
            run = progress.run
            if run.status == "requires_action" and progress.has_code_interpreter:
                return Waiting(renew=progress.keep_alive, until=float(run.expires_at or 0))
        except RunStopped as stop:
            await progress.stop(stop)
        except ModelCallFailed as exc:
            await progress.stop(RunStopped("failed", str(exc), code=run_error_code(exc)))
        except (PoolExhausted, SessionLimitReached) as exc:
            await progress.stop(RunStopped("failed", str(exc), code="rate_limit_exceeded"))
        except SandkernelError as exc:
            await progress.stop(RunStopped("failed", f"{type(exc).__name__}: {exc}"))
        except Exception as exc:
            log.exception("run %s failed", run_id)
            await progress.stop(RunStopped("failed", f"internal error: {exc!r}"))
        return None

    async def settle_cancelled(self, run_id: str, *, by_caller: bool) -> None:
        """After the run's task was cancelled: cancelled (by the caller) or failed (shutdown)."""
        progress = await _Progress.load(self, run_id)
        if progress.run.status not in ACTIVE_RUN_STATUSES:
            return  # it ended before the cancellation reached it
        if by_caller:
            await progress.cancelled()
        else:
            await progress.stop(
                RunStopped(
                    "failed",
                    "the sandkernel daemon shut down while this run was in progress; "
                    "create a new run to continue",
                )
            )


class _Progress:
    """One run being driven: its objects, saved and announced as they change."""

    def __init__(self, driver: RunDriver, run: Run, run_state: RunState) -> None:
        self.driver = driver
        self.run = run
        self.rs = run_state
        self.step: RunStep | None = None
        self.message: Message | None = None
        self.turn_usage: Usage | None = None
        #: what the run's sandbox holds (with code_interpreter), once the run started
        self.space: Workspace | None = None

    @classmethod
    async def load(cls, driver: RunDriver, run_id: str) -> _Progress:
        state = driver.state
        run = await anyio.to_thread.run_sync(state.get, Run, run_id)
        if run is None:
            raise RuntimeError(f"run {run_id} is not in the state")
        run_state = await anyio.to_thread.run_sync(state.private, Run, run_id, RunState)
        progress = cls(driver, run, run_state)
        steps = await anyio.to_thread.run_sync(lambda: state.all(RunStep, run_id=run_id))
        progress.step = next((s for s in steps if s.status == "in_progress"), None)
        messages = await anyio.to_thread.run_sync(lambda: state.all(Message, run_id=run_id))
        progress.message = next((m for m in messages if m.status == "in_progress"), None)
        return progress

    # ------------------------------------------------------------------ saving

    async def save(self, *objects: Message | RunStep | Run, new_message: bool = False) -> None:
        """The run, its private state and ``objects``, in one transaction.

        Their metadata is the stored one: the caller may update it while the run
        goes on, and the run never changes it. A message is written only if it
        is still stored (``new_message``: it is being made): the caller may
        delete it while the run writes it, and it stays deleted.
        """
        run, rs, state = self.run, self.rs.model_copy(deep=True), self.driver.state
        only_stored = () if new_message else [o.id for o in objects if isinstance(o, Message)]

        def write() -> Run | None:
            state.save(
                *objects, run, private={run.id: rs}, keep_metadata=True, only_stored=only_stored
            )
            return state.get(Run, run.id)

        saved = await anyio.to_thread.run_sync(write)
        if saved is not None:
            self.run = self.run.model_copy(update={"metadata": saved.metadata})

    def emit(self, event: str, data: Any) -> None:
        self.driver.events.emit(self.run.id, event, data)

    async def keep_alive(self) -> float | None:
        """Renew the thread's session the run uses (see :meth:`Placement.keep_alive`)."""
        if self.space is None:
            return None
        return await self.driver.placement.keep_alive(self.space)

    async def set_run(self, event: str | None = None, **changes: Any) -> None:
        self.run = self.run.model_copy(update=changes)
        await self.save()
        if event is not None:
            self.emit(event, self.run)

    # ------------------------------------------------------------------ the run

    async def go(self) -> None:
        driver = self.driver
        if driver.model is None:
            raise RunStopped(
                "failed",
                "this daemon has no chat model: start it with `sandkernel serve --model-url URL`",
            )
        if self.run.status == "queued":
            await self.set_run(
                "thread.run.in_progress",
                status="in_progress",
                started_at=self.run.started_at or now(),
            )
        thread = await anyio.to_thread.run_sync(driver.state.get, Thread, self.run.thread_id)
        if thread is None:
            raise RunStopped("failed", f"the thread {self.run.thread_id} was deleted")
        messages = await anyio.to_thread.run_sync(
            lambda: driver.state.all(Message, thread_id=thread.id)
        )
        space: Workspace | None = None
        if self.has_code_interpreter:
            space = self.space = await driver.placement.workspace(thread, self.run, messages)
        if self.step is not None:
            # Tool outputs were submitted: the step that waited for them is done.
            await self.complete_step()
        while True:
            if self.rs.model_calls >= driver.limits.max_model_calls:
                raise RunStopped(
                    "failed",
                    f"the model made {self.rs.model_calls} calls in this run without answering",
                )
            context = await self.context(space)
            choice = self.tool_choice()
            reply = await self.model_turn(context, choice)
            if await self.handle(reply, choice, space):
                return

    @property
    def has_code_interpreter(self) -> bool:
        return any(isinstance(tool, CodeInterpreterTool) for tool in self.run.tools)

    @property
    def functions(self) -> dict[str, FunctionTool]:
        return {t.function.name: t for t in self.run.tools if isinstance(t, FunctionTool)}

    def tools(self) -> list[dict[str, Any]]:
        tools = [python_tool()] if self.has_code_interpreter else []
        for tool in self.functions.values():
            tools.append(
                {"type": "function", "function": tool.function.model_dump(exclude_none=True)}
            )
        return tools

    def tool_choice(self) -> str | dict[str, Any]:
        """The run's tool_choice for this turn: a forced tool only on the run's first turn."""
        choice = self.run.tool_choice
        if self.rs.code_calls >= self.driver.limits.max_code_calls:
            return "none"
        if isinstance(choice, str):
            return "auto" if choice == "required" and self.rs.model_calls else choice
        if self.rs.model_calls:
            return "auto"
        if choice.type == "code_interpreter":
            return {"type": "function", "function": {"name": PYTHON}}
        if choice.type == "function" and choice.function is not None:
            return {"type": "function", "function": {"name": choice.function.name}}
        return "auto"

    async def context(self, space: Workspace | None) -> list[dict[str, Any]]:
        state = self.driver.state
        timeline = await anyio.to_thread.run_sync(state.timeline, self.run.thread_id)
        return chat_context(self.run, self.rs, timeline, space)

    async def model_turn(
        self, context: list[dict[str, Any]], choice: str | dict[str, Any]
    ) -> ModelReply:
        driver = self.driver
        assert driver.model is not None
        run = self.run
        budget = run.max_completion_tokens
        used = run.usage.completion_tokens if run.usage else 0
        if budget is not None and used >= budget:
            raise RunStopped(
                "incomplete", "the run used its completion tokens", reason="max_completion_tokens"
            )
        request = ChatRequest(
            model=run.model,
            messages=context,
            tools=self.tools(),
            tool_choice=choice,
            max_completion_tokens=None if budget is None else budget - used,
            temperature=run.temperature,
            top_p=run.top_p,
            parallel_tool_calls=run.parallel_tool_calls,
            response_format=_chat_response_format(run.response_format),
        )
        streamed = driver.limits.stream_text and driver.events.watched(run.id)
        turn = await driver.model.turn(request, on_text=self.text_delta if streamed else None)
        self.rs.model_calls += 1
        self.turn_usage = Usage().plus(turn.prompt_tokens, turn.completion_tokens)
        self.run = run.model_copy(
            update={
                "usage": (run.usage or Usage()).plus(turn.prompt_tokens, turn.completion_tokens)
            }
        )
        if run.max_prompt_tokens is not None and turn.prompt_tokens > run.max_prompt_tokens:
            raise RunStopped(
                "incomplete",
                f"the prompt took {turn.prompt_tokens} tokens, over max_prompt_tokens",
                reason="max_prompt_tokens",
            )
        return turn.reply

    async def handle(
        self, reply: ModelReply, choice: str | dict[str, Any], space: Workspace | None
    ) -> bool:
        """Act on one model turn; True when the run stopped (completed or waiting)."""
        calls = [] if choice == "none" else reply.tool_calls
        text = reply.content or ""
        if reply.finish_reason == "length":
            if text or self.message is not None:
                await self.finish_message(text, status="incomplete")
            raise RunStopped(
                "incomplete",
                "the model reached its token limit",
                reason="max_completion_tokens",
            )
        if not calls:
            await self.finish_message(text)
            await self.set_run(
                "thread.run.completed",
                status="completed",
                completed_at=now(),
                expires_at=None,
            )
            return True
        # The model's words before its tool calls are in the transcript once, with the calls.
        self.rs.transcript.append(_assistant_message(reply))
        if text.strip() or self.message is not None:
            # The turn's usage goes on the tool step.
            await self.finish_message(text, usage=None, in_transcript=False)
        return await self.tool_calls(calls, space)

    # ------------------------------------------------------------------ messages

    async def text_delta(self, chunk: str) -> None:
        if self.message is None:
            await self.start_message()
        assert self.message is not None
        index = sum(1 for part in self.message.content if isinstance(part, ImageFileContent))
        self.emit(
            "thread.message.delta",
            _message_delta(self.message.id, index, {"type": "text", "text": {"value": chunk}}),
        )

    async def start_message(self) -> None:
        run = self.run
        message = Message(
            id=new_id("msg"),
            created_at=now(),
            thread_id=run.thread_id,
            status="in_progress",
            role="assistant",
            assistant_id=run.assistant_id,
            run_id=run.id,
        )
        step = self.new_step(
            MessageCreationDetails(message_creation=MessageCreationRef(message_id=message.id))
        )
        self.message, self.step = message, step
        await self.save(message, step, new_message=True)
        self.emit("thread.run.step.created", step)
        self.emit("thread.run.step.in_progress", step)
        self.emit("thread.message.created", message)
        self.emit("thread.message.in_progress", message)
        images = list(self.rs.pending_images)
        for index, file_id in enumerate(images):
            part = {"type": "image_file", "image_file": {"file_id": file_id}}
            self.emit("thread.message.delta", _message_delta(message.id, index, part))
        self.message = message.model_copy(
            update={
                "content": [ImageFileContent(image_file=ImageFileRef(file_id=i)) for i in images]
            }
        )

    async def finish_message(
        self,
        text: str,
        *,
        status: Literal["completed", "incomplete"] = "completed",
        usage: Usage | None | Literal["turn"] = "turn",
        in_transcript: bool = True,
    ) -> None:
        """The message of this turn (made now, unless its text was streamed), completed.

        ``in_transcript=False``: the text is in the transcript already.
        """
        streamed = self.message is not None
        if not streamed:
            await self.start_message()
            assert self.message is not None
            # Each part a delta, the empty text of a message with nothing else too:
            # the client's event handler takes a message's parts from its deltas.
            if text or not self.message.content:
                await self.text_delta(text)
        assert self.message is not None and self.step is not None
        files = list(self.rs.pending_files)
        content: list[MessageContent] = [
            part for part in self.message.content if isinstance(part, ImageFileContent)
        ]
        if text or not content:
            content.append(
                TextContent(text=Text(value=text, annotations=_annotations(text, files)))
            )
        done = now()
        message = self.message.model_copy(
            update={
                "content": content,
                "status": status,
                "completed_at": done if status == "completed" else None,
                "incomplete_at": done if status == "incomplete" else None,
                "incomplete_details": IncompleteDetails(reason="max_tokens")
                if status == "incomplete"
                else None,
                "attachments": [
                    Attachment(file_id=file_id, tools=[AttachmentTool(type="code_interpreter")])
                    for file_id, _ in files
                ],
            }
        )
        step = self.step.model_copy(
            update={
                "status": "completed",
                "completed_at": done,
                "usage": self.turn_usage if usage == "turn" else usage,
            }
        )
        self.rs.pending_images, self.rs.pending_files = [], []
        if in_transcript:
            self.rs.transcript.append({"role": "assistant", "content": text})
        # The turn that said it (appended just now, or with the turn's calls).
        self.rs.message_turns.append((message.id, len(self.rs.transcript) - 1))
        self.message, self.step = None, None
        await self.save(message, step)
        self.emit(
            "thread.message.completed" if status == "completed" else "thread.message.incomplete",
            message,
        )
        self.emit("thread.run.step.completed", step)

    # ------------------------------------------------------------------ tool calls

    def new_step(self, details: MessageCreationDetails | ToolCallsDetails) -> RunStep:
        run = self.run
        return RunStep(
            id=new_id("step"),
            created_at=now(),
            run_id=run.id,
            assistant_id=run.assistant_id,
            thread_id=run.thread_id,
            type=details.type,
            step_details=details,
        )

    async def tool_calls(self, calls: Sequence[ToolCall], space: Workspace | None) -> bool:
        functions = self.functions
        shown: list[tuple[ToolCall, CodeInterpreterCall | FunctionToolCall]] = []
        for call in calls:
            if call.name == PYTHON and space is not None:
                code, _ = code_argument(call.arguments)
                shown.append(
                    (
                        call,
                        CodeInterpreterCall(
                            id=call.id,
                            code_interpreter=CodeInterpreterDetails(
                                input=code if code is not None else call.arguments
                            ),
                        ),
                    )
                )
            elif call.name in functions:
                shown.append(
                    (
                        call,
                        FunctionToolCall(
                            id=call.id,
                            function=FunctionCallDetails(name=call.name, arguments=call.arguments),
                        ),
                    )
                )
            else:
                names = ", ".join([PYTHON] * (space is not None) + list(functions)) or "none"
                self.rs.transcript.append(
                    _tool_message(
                        call.id,
                        f"Error: there is no tool named {call.name!r}; the tools are: {names}.",
                    )
                )
        if not shown:
            await self.save()
            return False
        step = self.new_step(ToolCallsDetails()).model_copy(update={"usage": self.turn_usage})
        self.step = step
        await self.save(step)
        self.emit("thread.run.step.created", step)
        self.emit("thread.run.step.in_progress", step)
        tool_calls: list[CodeInterpreterCall | FunctionToolCall] = []
        pending: list[RequiredToolCall] = []
        for index, (call, shown_call) in enumerate(shown):
            if isinstance(shown_call, FunctionToolCall):
                tool_calls.append(shown_call)
                self.emit_tool_delta(index, shown_call.model_dump())
                pending.append(
                    RequiredToolCall(
                        id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments)
                    )
                )
                continue
            assert space is not None
            tool_calls.append(shown_call)
            self.step = step.model_copy(
                update={"step_details": ToolCallsDetails(tool_calls=list(tool_calls))}
            )
            # Stored before it runs: a run cancelled or stopped meanwhile shows it.
            await self.save(self.step)
            done = await self.run_code(index, call, shown_call, space)
            tool_calls[-1] = done
        self.step = step.model_copy(
            update={"step_details": ToolCallsDetails(tool_calls=tool_calls)}
        )
        if pending:
            expires = now() + REQUIRES_ACTION_TTL_S
            await self.save(self.step)
            await self.set_run(
                "thread.run.requires_action",
                status="requires_action",
                expires_at=expires,
                required_action=RequiredAction(
                    submit_tool_outputs=SubmitToolOutputsAction(tool_calls=pending)
                ),
            )
            return True
        await self.complete_step()
        return False

    async def complete_step(self) -> None:
        assert self.step is not None
        step = self.step.model_copy(update={"status": "completed", "completed_at": now()})
        self.step = None
        await self.save(step)
        self.emit("thread.run.step.completed", step)

    def emit_tool_delta(self, index: int, call: dict[str, Any]) -> None:
        assert self.step is not None
        if not self.driver.events.watched(self.run.id):
            return
        self.emit(
            "thread.run.step.delta",
            {
                "id": self.step.id,
                "object": "thread.run.step.delta",
                "delta": {
                    "step_details": {"type": "tool_calls", "tool_calls": [{"index": index, **call}]}
                },
            },
        )

    async def run_code(
        self, index: int, call: ToolCall, shown: CodeInterpreterCall, space: Workspace
    ) -> CodeInterpreterCall:
        """Run one code call in the session; the model gets the result as the tool's answer."""
        limits = self.driver.limits
        code, problem = code_argument(call.arguments)
        self.emit_tool_delta(
            index,
            {
                "id": call.id,
                "type": "code_interpreter",
                "code_interpreter": {"input": "", "outputs": []},
            },
        )
        self.emit_tool_delta(
            index,
            {
                "type": "code_interpreter",
                "code_interpreter": {"input": shown.code_interpreter.input},
            },
        )
        if code is None:
            self.rs.transcript.append(_tool_message(call.id, problem))
            await self.save()
            return shown
        self.rs.code_calls += 1
        last = self.rs.code_calls >= limits.max_code_calls
        logs = _Logs(self, index)
        # The thread's session is made (or taken up again) when code first runs in the run.
        session = await self.driver.placement.ready(space)
        answer_at = len(self.rs.transcript)
        self.rs.transcript.append(_tool_message(call.id, _CUT_SHORT_CALL))
        await self.save()
        try:
            result = await _execute(session, code, logs)
        except _REFUSED_BEFORE_RUNNING:
            # The code never reached a kernel: the call stays unanswered ("Not run").
            del self.rs.transcript[answer_at]
            raise
        logs.add(result_tail(result))
        outputs: list[LogsOutput | ImageOutput] = []
        if logs.text:
            outputs.append(LogsOutput(logs=logs.text))
        for produced in result.files:
            if produced.source == "display":
                outputs.append(ImageOutput(image=ImageRef(file_id=produced.id)))
                self.emit_tool_delta(
                    index,
                    {
                        "type": "code_interpreter",
                        "code_interpreter": {
                            "outputs": [
                                {
                                    "index": len(outputs) - 1,
                                    "type": "image",
                                    "image": {"file_id": produced.id},
                                }
                            ]
                        },
                    },
                )
                self.rs.pending_images.append(produced.id)
            else:
                self.rs.pending_files.append((produced.id, produced.path))
        text = format_result(
            result,
            budget_chars=limits.budget_chars,
            after_restart=space.replaced or result.state_lost,
        )
        if last:
            text += (
                f"\n[That was the last code execution allowed in this run "
                f"({limits.max_code_calls}); answer now with what you have.]"
            )
        self.rs.transcript[answer_at] = _tool_message(call.id, text)
        done = shown.model_copy(
            update={
                "code_interpreter": CodeInterpreterDetails(
                    input=shown.code_interpreter.input, outputs=outputs
                )
            }
        )
        assert self.step is not None
        details = self.step.step_details
        assert isinstance(details, ToolCallsDetails)
        calls = [*details.tool_calls[:-1], done]
        self.step = self.step.model_copy(
            update={"step_details": ToolCallsDetails(tool_calls=calls)}
        )
        thread_state = ThreadState(session_agent_id=self.run.assistant_id, ran_code=True)
        await self.save(self.step)
        await anyio.to_thread.run_sync(
            lambda: self.driver.state.save(private={self.run.thread_id: thread_state})
        )
        return done

    # ------------------------------------------------------------------ endings

    async def stop(self, stop: RunStopped) -> None:
        """End the run as failed or incomplete; a step or message in progress ends with it."""
        at = now()
        error = LastError(code=stop.code, message=stop.message)
        if self.message is not None:
            message = self.message.model_copy(
                update={
                    "status": "incomplete",
                    "incomplete_at": at,
                    "incomplete_details": IncompleteDetails(
                        reason="run_failed" if stop.status == "failed" else "max_tokens"
                    ),
                }
            )
            self.message = None
            await self.save(message)
            self.emit("thread.message.incomplete", message)
        if self.step is not None:
            status: Literal["failed", "completed"] = (
                "failed" if stop.status == "failed" else "completed"
            )
            step = self.step.model_copy(
                update={
                    "status": status,
                    "failed_at": at if status == "failed" else None,
                    "completed_at": at if status == "completed" else None,
                    "last_error": error if status == "failed" else None,
                }
            )
            self.step = None
            await self.save(step)
            self.emit(f"thread.run.step.{status}", step)
        if stop.status == "failed":
            await self.set_run(
                "thread.run.failed",
                status="failed",
                failed_at=at,
                last_error=error,
                expires_at=None,
                required_action=None,
            )
        else:
            await self.set_run(
                "thread.run.incomplete",
                status="incomplete",
                completed_at=at,
                incomplete_details=IncompleteDetails(reason=stop.reason or "max_completion_tokens"),
                expires_at=None,
                required_action=None,
            )

    async def cancelled(self) -> None:
        at = now()
        if self.message is not None:
            message = self.message.model_copy(
                update={
                    "status": "incomplete",
                    "incomplete_at": at,
                    "incomplete_details": IncompleteDetails(reason="run_cancelled"),
                }
            )
            self.message = None
            await self.save(message)
            self.emit("thread.message.incomplete", message)
        if self.step is not None:
            step = self.step.model_copy(update={"status": "cancelled", "cancelled_at": at})
            self.step = None
            await self.save(step)
            self.emit("thread.run.step.cancelled", step)
        await self.set_run(
            "thread.run.cancelled",
            status="cancelled",
            cancelled_at=at,
            expires_at=None,
            required_action=None,
        )


class _Logs:
    """A code call's logs, streamed to the run's watchers as the kernel writes them."""

    def __init__(self, progress: _Progress, index: int) -> None:
        self.progress = progress
        self.index = index
        self.parts: list[str] = []
        self.size = 0
        self.cut = False

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, text: str) -> None:
        if not text or self.cut:
            return
        if self.size + len(text) > _MAX_LOG_CHARS:
            text = (
                text[: max(0, _MAX_LOG_CHARS - self.size)] + "\n[... more output not shown ...]\n"
            )
            self.cut = True
        self.parts.append(text)
        self.size += len(text)
        self.progress.emit_tool_delta(
            self.index,
            {
                "type": "code_interpreter",
                "code_interpreter": {"outputs": [{"index": 0, "type": "logs", "logs": text}]},
            },
        )


async def _execute(session: SessionAPI, code: str, logs: _Logs) -> ExecutionResult:
    # A dead kernel is replaced (restart=True): the model is better served by a fresh
    # kernel, and told its variables are gone, than by an error.
    events = session.stream(code, restart=True)
    try:
        async for event in events:
            if isinstance(event, ExecutionResult):
                return event
            if event.get("msg_type") == "stream":
                text = (event.get("content") or {}).get("text")
                if isinstance(text, str):
                    logs.add(text)
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]  # an async generator
    raise SandkernelError("the session's stream ended without a result")


def result_tail(result: ExecutionResult) -> str:
    """What the logs show after the streamed output: the value, the error, why it stopped."""
    tail = []
    if result.value is not None:
        plain = result.value.data.get("text/plain")
        if isinstance(plain, str):
            tail.append(plain + "\n")
    if result.error is not None:
        traceback = user_traceback(result.error.traceback) if result.error.traceback else ""
        tail.append((traceback or f"{result.error.name}: {result.error.value}") + "\n")
    if result.status not in ("ok", "error"):
        tail.append(f"[{result.status}: {result.message or 'no details'}]\n")
    return "".join(tail)


def code_argument(arguments: str) -> tuple[str | None, str]:
    """The ``code`` argument of a python call, or what to tell the model instead."""
    expected = 'Call the python tool with JSON arguments like {"code": "print(1 + 1)"}.'
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        return None, f"Error: the arguments are not valid JSON ({exc.msg} at {exc.pos}). {expected}"
    code = parsed.get("code") if isinstance(parsed, dict) else None
    if not isinstance(code, str) or not code.strip():
        return None, f'Error: the "code" argument (a non-empty string) is missing. {expected}'
    return code, ""


def _chat_response_format(response_format: str | BaseModel | None) -> str | dict[str, Any] | None:
    """The run's ``response_format`` as the chat endpoint takes it (OpenAI's JSON)."""
    if response_format is None or isinstance(response_format, str):
        return response_format
    return response_format.model_dump(by_alias=True, exclude_none=True)


def _assistant_message(reply: ModelReply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls
        ]
    return message


def _tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _message_delta(message_id: str, index: int, part: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": message_id,
        "object": "thread.message.delta",
        "delta": {"content": [{"index": index, **part}]},
    }


def whole_mentions(text: str, path: str) -> Iterator[int]:
    """Where ``text`` names ``path`` whole: not as the start of a longer name (``x.csv.bak``)."""
    start = text.find(path)
    while start >= 0:
        rest = text[start + len(path) : start + len(path) + 2]
        if not rest or not _goes_on(rest):
            yield start
        start = text.find(path, start + 1)


def _goes_on(rest: str) -> bool:
    """The characters after a path continue its name (``.bak``, ``-2``), not the sentence."""
    if rest[0].isalnum() or rest[0] in "_-/~":
        return True
    return rest[0] == "." and len(rest) > 1 and (rest[1].isalnum() or rest[1] in "_-")


def _annotations(text: str, files: Sequence[tuple[str, str]]) -> list[FilePathAnnotation]:
    """``file_path`` annotations where the text names a file code wrote (``sandbox:/mnt/…``)."""
    found: list[FilePathAnnotation] = []
    for file_id, path in files:
        for needle in (f"sandbox:{path}", path):
            taken = False
            for start in whole_mentions(text, needle):
                end = start + len(needle)
                if not any(a.start_index <= start < a.end_index for a in found):
                    found.append(
                        FilePathAnnotation(
                            text=needle,
                            start_index=start,
                            end_index=end,
                            file_path=FilePath(file_id=file_id),
                        )
                    )
                    taken = True
            if taken:
                break
    return sorted(found, key=lambda a: a.start_index)


# --------------------------------------------------------------------------- the context


def chat_context(
    run: Run,
    current: RunState,
    timeline: Sequence[tuple[Message | Run, RunState | None]],
    space: Workspace | None,
) -> list[dict[str, Any]]:
    """The chat messages for the run's next turn: instructions, the thread, this run so far.

    The thread is its messages, as OpenAI's runs read it: a deleted message is
    not in it, and ``last_messages`` keeps that many of them. A message a run
    made is the turns of the run's transcript that led to it (see
    :class:`_RunTurns`), so its code and the code's results go with it. A run
    that stopped before it said anything (cancelled while its code ran, say)
    has its turns where it is in the thread, so the model knows what it began.
    """
    paths = space.paths if space is not None else {}
    unplaced = space.unplaced if space is not None else {}
    turns = {
        obj.id: _RunTurns(private)
        for obj, private in timeline
        if isinstance(obj, Run) and private is not None and obj.id != run.id
    }
    messages = [obj for obj, _ in timeline if isinstance(obj, Message)]
    last_of_run = {m.run_id: m.id for m in messages if m.run_id is not None}
    #: the last message of each run, which the rest of its turns follows
    ends = set(last_of_run.values())
    #: runs that never made a message: the rest of their turns is where they are
    silent = {
        run_id for run_id, made in turns.items() if not made.said and run_id not in last_of_run
    }
    strategy = run.truncation_strategy
    keep = strategy.last_messages if strategy.type == "last_messages" else None
    if keep is not None:
        messages = messages[-keep:]
    kept = {m.id for m in messages}
    turns[run.id] = _RunTurns(current)
    history: list[dict[str, Any]] = []
    started = keep is None  # past the first message kept: what is before it is cut
    for obj, _ in timeline:
        if isinstance(obj, Run):
            if started and obj.id in silent:
                turns[obj.id].add_rest(history)
            continue
        if obj.id not in kept:
            continue
        started = True
        made_by = turns.get(obj.run_id) if obj.run_id is not None else None
        if made_by is None:
            history.append(_chat_message(obj, paths, unplaced))
            continue
        made_by.add(obj.id, history)
        if obj.run_id != run.id and obj.id in ends:
            made_by.add_rest(history)
    turns[run.id].add_rest(history)  # this run so far, all of it
    system = _system_prompt(run, space)
    return ([{"role": "system", "content": system}] if system else []) + _answered(history)


@dataclass
class _Part:
    """The turns of a run that go with one of its messages (or follow its last one)."""

    #: the previous message's words and their whole turn, when calls were made with them:
    #: those calls led here
    after: tuple[dict[str, Any], dict[str, Any]] | None
    #: tool calls and results
    turns: list[dict[str, Any]]
    #: the message's words
    words: dict[str, Any] | None


class _RunTurns:
    """A run's transcript cut at the messages it made.

    A message is the turn that said its words and the tool calls and results
    since the run's previous message, with the calls said with that message's
    words: what the message came of. What follows the run's last message (a
    run that stopped, or this run so far) is its rest. A run's messages are
    one after another in the thread (no message is added while it runs). A
    run stored before its messages' turns were recorded is all rest.
    """

    def __init__(self, state: RunState) -> None:
        transcript = state.transcript
        #: the run made messages (the thread may have none of them now)
        self.said = bool(state.message_turns)
        self.parts: dict[str, _Part] = {}
        start = 0
        with_calls: tuple[dict[str, Any], dict[str, Any]] | None = None
        for message_id, index in sorted(state.message_turns, key=lambda turn: turn[1]):
            if not start <= index < len(transcript):
                continue
            turn = transcript[index]
            words = {"role": "assistant", "content": turn.get("content") or ""}
            self.parts[message_id] = _Part(with_calls, transcript[start:index], words)
            with_calls = (words, turn) if turn.get("tool_calls") else None
            start = index + 1
        self.rest = _Part(with_calls, transcript[start:], None)

    def add(self, message_id: str, history: list[dict[str, Any]]) -> None:
        """A message's turns (none for a message no turn said: one the run left incomplete)."""
        part = self.parts.get(message_id)
        if part is not None:
            _add_part(part, history)

    def add_rest(self, history: list[dict[str, Any]]) -> None:
        _add_part(self.rest, history)


def _add_part(part: _Part, history: list[dict[str, Any]]) -> None:
    if part.after is not None:
        words, turn = part.after
        if history and history[-1] is words:
            history[-1] = turn  # the words and the calls made with them: one turn, as said
        else:
            history.append({"role": "assistant", "content": None, "tool_calls": turn["tool_calls"]})
    history.extend(part.turns)
    if part.words is not None:
        history.append(part.words)


def _chat_message(
    message: Message, paths: dict[str, str], unplaced: dict[str, str]
) -> dict[str, Any]:
    parts = []
    for part in message.content:
        if isinstance(part, TextContent):
            parts.append(part.text.value)
        elif isinstance(part, ImageFileContent):
            parts.append(f"[image: file {part.image_file.file_id}]")
        elif isinstance(part, ImageUrlContent):
            parts.append(f"[image: {part.image_url.url}]")
    text = "\n".join(parts)
    attached = [
        _told_path(a.file_id, paths, unplaced)
        for a in message.attachments
        if a.file_id in paths
        or a.file_id in unplaced
        or any(t.type == "code_interpreter" for t in a.tools)
    ]
    if attached:
        text += "\n\n[Files attached to this message, in the sandbox: " + ", ".join(attached) + "]"
    return {"role": message.role, "content": text}


#: Said of a file whose path is known only once the session has placed it.
_PATH_AFTER_CODE: Final = "its path is given after the first code call"


def _told_path(file_id: str, paths: dict[str, str], unplaced: dict[str, str]) -> str:
    if file_id in paths:
        return paths[file_id]
    if file_id in unplaced:
        return f"{unplaced[file_id]} ({_PATH_AFTER_CODE})"
    return f"{file_id} (not available)"


def _answered(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every tool call answered right after it, and no answer without its call.

    A run that stopped may not have answered its calls; the turns of a deleted
    message go with it.
    """
    out: list[dict[str, Any]] = []
    open_ids: list[str] = []
    for message in history:
        if message.get("role") == "tool":
            if message.get("tool_call_id") in open_ids:
                open_ids.remove(message["tool_call_id"])
                out.append(message)
            continue
        out += [_tool_message(i, _MISSED_CALL) for i in open_ids]
        out.append(message)
        open_ids = [c["id"] for c in message.get("tool_calls") or []]
    out += [_tool_message(i, _MISSED_CALL) for i in open_ids]
    return out


def _system_prompt(run: Run, space: Workspace | None) -> str:
    parts = [run.instructions.strip()] if run.instructions.strip() else []
    if space is None:
        return "\n\n".join(parts)
    listed = dict.fromkeys(space.assistant_paths, " (read-only)")
    for path in [*space.paths.values(), *space.restored.values()]:
        listed.setdefault(path, "")
    files = [f"- {path}{note}" for path, note in listed.items()]
    # Its own name is taken there, and the one it gets is known only once it is placed.
    files += [f"- {name} ({_PATH_AFTER_CODE})" for name in space.unplaced.values()]
    if files:
        parts.append(
            "Files in the sandbox (use the python tool to read them):\n" + "\n".join(files)
        )
    if space.replaced:
        note = (
            "Note: the Python kernel of this conversation was restarted since the code above "
            "ran, so the variables, imports and functions it defined are gone: run again "
            "what you need."
        )
        if space.restored:
            note += " Files that code wrote were put back: " + ", ".join(
                sorted(space.restored.values())
            )
            note += "."
        parts.append(note)
    if space.missing:
        parts.append(
            "These files of the conversation were deleted and are not in the sandbox: "
            + ", ".join(space.missing)
        )
    return "\n\n".join(parts)
