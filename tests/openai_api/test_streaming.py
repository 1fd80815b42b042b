"""Streamed runs: OpenAI's event sequence, so the client's stream helpers and handlers work."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.from_thread
import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta.threads import Message, Text, TextDelta
from openai.types.beta.threads.runs import RunStep, ToolCall, ToolCallDelta

from tests import _model
from tests._model import Reply, ScriptedModel, code_call, in_order
from tests.openai_api.conftest import ASSISTANTS_DEPRECATED, DEPLOYMENT, OpenAIDaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio, *ASSISTANTS_DEPRECATED]

# Prints, then runs until it is interrupted (or its 60 s are up): only logs that reach
# the caller while it runs let the caller interrupt it.
WAIT_FOR_INTERRUPT = (
    "import time\n"
    "try:\n"
    "    print('waiting', flush=True)\n"
    "    for _ in range(1200):\n"
    "        time.sleep(0.05)\n"
    "except KeyboardInterrupt:\n"
    "    print('interrupted')\n"
)
ANSWER = "The code printed while it ran, and stopped when asked."


class Recorder(AssistantEventHandler):
    """Records what the handler is told, and acts once the code's first logs arrive."""

    def __init__(self, on_waiting: Any) -> None:
        super().__init__()
        self.on_waiting = on_waiting
        self.events: list[str] = []
        self.text_deltas: list[str] = []
        self.texts: list[str] = []
        self.inputs: list[str] = []
        self.logs: list[str] = []
        self.calls_created: list[str] = []
        self.calls_done: list[ToolCall] = []
        self.messages: list[Message] = []
        self.steps: list[RunStep] = []
        self.acted = False

    def on_event(self, event: Any) -> None:
        self.events.append(event.event)

    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text_deltas.append(delta.value or "")

    def on_text_done(self, text: Text) -> None:
        self.texts.append(text.value)

    def on_tool_call_created(self, tool_call: ToolCall) -> None:
        self.calls_created.append(tool_call.type)

    def on_tool_call_delta(self, delta: ToolCallDelta, snapshot: ToolCall) -> None:
        if delta.type != "code_interpreter" or delta.code_interpreter is None:
            return
        if delta.code_interpreter.input:
            self.inputs.append(delta.code_interpreter.input)
        for output in delta.code_interpreter.outputs or []:
            if output.type == "logs" and output.logs:
                self.logs.append(output.logs)
                if "waiting" in output.logs and not self.acted:
                    self.acted = True
                    self.on_waiting()

    def on_tool_call_done(self, tool_call: ToolCall) -> None:
        self.calls_done.append(tool_call)

    def on_message_done(self, message: Message) -> None:
        self.messages.append(message)

    def on_run_step_done(self, run_step: RunStep) -> None:
        self.steps.append(run_step)


async def test_a_stream_hands_over_text_deltas_and_the_codes_input_and_logs_as_they_come(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply("Running it now.", [code_call("call_wait", WAIT_FOR_INTERRUPT)]),
        Reply(ANSWER),
    )
    daemon = await openai_daemon(script)
    assert daemon.model is not None
    client = daemon.openai()
    native = daemon.running.client()
    thread_ids: list[str] = []

    async def interrupt_the_cell() -> None:
        session = await native.get_session(thread_ids[0])
        await session.interrupt()

    def stream() -> tuple[Recorder, Any]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Run it."}])
        thread_ids.append(thread.id)
        handler = Recorder(lambda: anyio.from_thread.run(interrupt_the_cell))
        with client.beta.threads.runs.stream(
            thread_id=thread.id, assistant_id=assistant.id, event_handler=handler
        ) as events:
            events.until_done()
            final = events.get_final_run()
        return handler, final

    handler, final = await anyio.to_thread.run_sync(stream)
    assert final.status == "completed"
    assert handler.acted  # the first logs came while the code was still running
    assert "".join(handler.logs) == "waiting\ninterrupted\n"
    assert "".join(handler.inputs) == WAIT_FOR_INTERRUPT
    assert handler.calls_created == ["code_interpreter"]
    # (the client repeats on_tool_call_done at each later step's end; the call is one)
    assert {(c.id, c.type) for c in handler.calls_done} == {("call_wait", "code_interpreter")}
    assert len(handler.text_deltas) > 2  # the model's text, streamed in pieces
    assert "".join(handler.text_deltas) == "Running it now." + ANSWER
    assert handler.texts == ["Running it now.", ANSWER]
    assert [m.content[0].text.value for m in handler.messages] == handler.texts  # type: ignore[union-attr]
    assert [s.type for s in handler.steps] == ["message_creation", "tool_calls", "message_creation"]
    events = handler.events
    assert events[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert events[-1] == "thread.run.completed"
    step_delta = events.index("thread.run.step.delta")
    assert events.index("thread.message.delta") < step_delta < len(events) - 1
    # Every event, as it crossed the wire, validated as openai's AssistantStreamEvent.
    checked = daemon.clients.checked.events
    assert checked[: len(events)] == events and checked[-1] == "done"
    assert all(request.get("stream") for request in daemon.model.requests)
    # The stored run and its steps say the same as the stream did.
    steps = await anyio.to_thread.run_sync(
        lambda: client.beta.threads.runs.steps.list(final.id, thread_id=final.thread_id)
    )
    (tools_step,) = [s for s in steps.data if s.type == "tool_calls"]
    (stored_call,) = tools_step.step_details.tool_calls  # type: ignore[union-attr]
    assert stored_call.code_interpreter.outputs[0].logs == "waiting\ninterrupted\n"  # type: ignore[union-attr]


async def test_streamed_tool_outputs_and_a_cancelled_run(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    weather: Any = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    script = in_order(
        Reply(None, [("call_w", "get_weather", "{}")]),
        Reply("Sunny."),
        Reply(None, [code_call("call_wait", WAIT_FOR_INTERRUPT)]),  # cancelled while it runs
        Reply(None, [code_call("call_after", "print('after')")]),
        Reply("Still works."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def flow() -> None:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}, weather]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Go."}])
        first = Recorder(lambda: None)
        with client.beta.threads.runs.stream(
            thread_id=thread.id, assistant_id=assistant.id, event_handler=first
        ) as events:
            events.until_done()
            waiting = events.get_final_run()
        assert waiting.status == "requires_action" and first.events[-1] == (
            "thread.run.requires_action"
        )
        assert first.calls_created == ["function"]
        second = Recorder(lambda: None)
        with client.beta.threads.runs.submit_tool_outputs_stream(
            run_id=waiting.id,
            thread_id=thread.id,
            tool_outputs=[{"tool_call_id": "call_w", "output": "sunny"}],
            event_handler=second,
        ) as events:
            events.until_done()
            done = events.get_final_run()
        assert done.status == "completed" and second.texts == ["Sunny."]
        assert second.events[:3] == [
            "thread.run.queued",
            "thread.run.in_progress",
            "thread.run.step.completed",  # the step that waited for the output
        ]

        runs: list[str] = []

        def cancel() -> None:
            cancelling = client.beta.threads.runs.cancel(runs[0], thread_id=thread.id)
            assert cancelling.status == "cancelling"

        third = Recorder(cancel)
        with client.beta.threads.runs.stream(
            thread_id=thread.id, assistant_id=assistant.id, event_handler=third
        ) as events:
            for event in events:
                if event.event == "thread.run.created":
                    runs.append(event.data.id)
            cancelled = events.get_final_run()
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        assert third.events[-1] == "thread.run.cancelled"
        assert "thread.run.step.cancelled" in third.events
        steps = client.beta.threads.runs.steps.list(cancelled.id, thread_id=thread.id)
        assert [s.status for s in steps.data] == ["cancelled"]
        # The call it was running is in it.
        (stopped,) = steps.data[0].step_details.tool_calls  # type: ignore[union-attr]
        assert stopped.id == "call_wait"
        # The cell was stopped: the thread's next run runs code at once.
        after = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert after.status == "completed", after.last_error
        steps = client.beta.threads.runs.steps.list(after.id, thread_id=thread.id)
        (call,) = next(s for s in steps.data if s.type == "tool_calls").step_details.tool_calls  # type: ignore[union-attr]
        assert call.code_interpreter.outputs[0].logs == "after\n"  # type: ignore[union-attr]

    await anyio.to_thread.run_sync(flow)
    assert daemon.model is not None
    sent = daemon.model.requests[-2]["messages"]
    # Its code ran until it was stopped: the model is told what it did may remain.
    (cancelled_call,) = [m for m in sent if m.get("tool_call_id") == "call_wait"]
    assert cancelled_call["content"].startswith("Stopped while running")
    assert "may have partly run" in cancelled_call["content"]


async def test_a_message_deleted_while_its_run_writes_it_stays_deleted(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted = asyncio.Event()
    loop = asyncio.get_running_loop()
    write_stream = _model._write_stream

    async def held_after_its_first_part(writer: asyncio.StreamWriter, reply: Reply) -> None:
        # The model sends the first part of its text, then the rest once the message is deleted.
        drain = writer.drain

        async def drain_then_hold() -> None:
            await drain()
            async with asyncio.timeout(60):
                await deleted.wait()

        writer.drain = drain_then_hold  # type: ignore[method-assign]
        await write_stream(writer, reply)

    monkeypatch.setattr(_model, "_write_stream", held_after_its_first_part)
    daemon = await openai_daemon(in_order(Reply("This answer is written in several parts.")))
    client = daemon.openai()

    def flow() -> None:
        assistant = client.beta.assistants.create(model=DEPLOYMENT)
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Go."}])
        gone: list[str] = []
        with client.beta.threads.runs.stream(
            thread_id=thread.id, assistant_id=assistant.id
        ) as events:
            for event in events:
                if event.event == "thread.message.created":
                    answer = client.beta.threads.messages.delete(event.data.id, thread_id=thread.id)
                    assert answer.deleted
                    gone.append(answer.id)
                    loop.call_soon_threadsafe(deleted.set)
            run = events.get_final_run()
        assert run.status == "completed", run.last_error
        (message_id,) = gone
        # The run wrote the rest of it and completed it: it is not brought back.
        with pytest.raises(openai.NotFoundError):
            client.beta.threads.messages.retrieve(message_id, thread_id=thread.id)
        listed = client.beta.threads.messages.list(thread.id)
        assert [m.role for m in listed.data] == ["user"]

    await anyio.to_thread.run_sync(flow)


async def test_a_model_that_cannot_stream_still_serves_a_streamed_run(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    model = await ScriptedModel(
        in_order(Reply("Whole."), Reply("Again.")), streams=False
    ).__aenter__()
    try:
        daemon = await openai_daemon(model=model, engine_options={"pool_size": 0})
        client = daemon.openai()

        def stream_twice() -> list[Recorder]:
            assistant = client.beta.assistants.create(model=DEPLOYMENT)
            thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi"}])
            handlers = []
            for _ in range(2):
                handler = Recorder(lambda: None)
                with client.beta.threads.runs.stream(
                    thread_id=thread.id, assistant_id=assistant.id, event_handler=handler
                ) as events:
                    events.until_done()
                    assert events.get_final_run().status == "completed"
                handlers.append(handler)
            return handlers

        first, second = await anyio.to_thread.run_sync(stream_twice)
    finally:
        await model.__aexit__(None, None, None)
    assert first.text_deltas == ["Whole."] and second.text_deltas == ["Again."]
    # Refused once, asked again without streaming; not streamed after that.
    assert [bool(r.get("stream")) for r in model.requests] == [True, False, False]


class _Events(AssistantEventHandler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def on_event(self, event: Any) -> None:
        self.events.append(event.event)


async def test_an_empty_answer_after_a_message_with_an_image_streams_its_part_too(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    """The handler takes a message's parts from its deltas: one without any broke it."""
    plot = "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"
    daemon = await openai_daemon(
        in_order(
            Reply("Plotting.", [code_call("c1", plot)]),
            Reply("Here it is.", [code_call("c2", "print(1)")]),  # [image_file, text]
            Reply(""),  # an empty final answer
        )
    )
    client = daemon.openai()

    def flow() -> tuple[_Events, list[list[str]]]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "plot"}])
        handler = _Events()
        with client.beta.threads.runs.stream(
            thread_id=thread.id, assistant_id=assistant.id, event_handler=handler
        ) as stream:
            stream.until_done()
        listed = client.beta.threads.messages.list(thread.id, order="asc").data
        return handler, [[part.type for part in m.content] for m in listed]

    handler, parts = await anyio.to_thread.run_sync(flow)
    assert parts[-2:] == [["image_file", "text"], ["text"]]
    last = handler.events[-4:]
    assert last == ["thread.message.delta", "thread.message.completed", *last[2:]]
    assert handler.events[-1] == "thread.run.completed"
