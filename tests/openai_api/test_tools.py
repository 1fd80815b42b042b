"""Caller-defined function tools, tool_choice, instructions and token budgets of runs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import openai
import pytest

from sandkernel.openai_api import runs as runs_module
from tests._model import Reply, code_call, in_order
from tests.openai_api.conftest import ASSISTANTS_DEPRECATED, DEPLOYMENT, OpenAIDaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio, *ASSISTANTS_DEPRECATED]

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CITY = json.dumps({"city": "Paris"})


async def test_a_function_call_waits_for_its_output_then_the_run_completes(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(None, [("call_weather", "get_weather", CITY), code_call("call_sum", "print(2 + 3)")]),
        Reply("It is sunny in Paris, and 2 + 3 = 5."),
    )
    daemon = await openai_daemon(script)
    assert daemon.model is not None
    client = daemon.openai()

    def flow() -> None:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}, WEATHER]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Weather?"}])
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert run.status == "requires_action" and run.required_action is not None
        assert run.expires_at is not None
        (call,) = run.required_action.submit_tool_outputs.tool_calls
        assert (call.id, call.function.name, call.function.arguments) == (
            "call_weather",
            "get_weather",
            CITY,
        )
        with pytest.raises(openai.BadRequestError) as busy:
            client.beta.threads.messages.create(thread.id, role="user", content="hurry")
        assert busy.value.code == "thread_busy"
        with pytest.raises(openai.BadRequestError) as busy_run:
            client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
        assert run.id in busy_run.value.message
        with pytest.raises(openai.BadRequestError) as wrong:
            client.beta.threads.runs.submit_tool_outputs(
                run.id,
                thread_id=thread.id,
                tool_outputs=[{"tool_call_id": "call_other", "output": "?"}],
            )
        assert wrong.value.param == "tool_outputs" and "call_weather" in wrong.value.message
        steps = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
        (waiting,) = steps.data
        assert waiting.status == "in_progress"
        done = client.beta.threads.runs.submit_tool_outputs_and_poll(
            run_id=run.id,
            thread_id=thread.id,
            tool_outputs=[{"tool_call_id": "call_weather", "output": "sunny, 21 C"}],
        )
        assert done.status == "completed" and done.required_action is None
        steps = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc")
        tools_step, message_step = steps.data
        assert tools_step.status == "completed" and message_step.type == "message_creation"
        function_call, code = tools_step.step_details.tool_calls  # type: ignore[union-attr]
        assert function_call.type == "function" and function_call.function.output == "sunny, 21 C"
        assert code.type == "code_interpreter"
        assert code.code_interpreter.outputs[0].logs == "5\n"  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError):
            client.beta.threads.runs.submit_tool_outputs(
                run.id,
                thread_id=thread.id,
                tool_outputs=[{"tool_call_id": "call_weather", "output": "again"}],
            )

    await anyio.to_thread.run_sync(flow)
    first, second = daemon.model.requests
    assert [t["function"]["name"] for t in first["tools"]] == ["python", "get_weather"]
    assert first["tools"][1]["function"]["parameters"] == WEATHER["function"]["parameters"]
    answers = {m["tool_call_id"]: m["content"] for m in second["messages"] if m["role"] == "tool"}
    assert answers["call_weather"] == "sunny, 21 C"
    assert answers["call_sum"].startswith("Status: ok")


async def test_tool_choice_instructions_and_budgets_reach_the_model(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(None, [code_call("c1", "print(1)")]),  # run 1, tool_choice required
        Reply("one"),
        Reply(None, [code_call("c2", "print(2)")]),  # run 2, code_interpreter forced
        Reply("two"),
        Reply(None, [("w1", "get_weather", CITY)]),  # run 3, get_weather forced
        Reply("three"),
        Reply("four"),  # run 4, none
    )
    daemon = await openai_daemon(script)
    assert daemon.model is not None
    client = daemon.openai()

    def runs() -> None:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            instructions="Use tools.",
            tools=[{"type": "code_interpreter"}, WEATHER],
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Go."}])

        def run(**options: Any) -> Any:
            return client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id, **options
            )

        assert (
            run(
                tool_choice="required",
                instructions="Only numbers.",
                additional_instructions="Be brief.",
                max_completion_tokens=500,
            ).status
            == "completed"
        )
        assert run(tool_choice={"type": "code_interpreter"}, model="other-deployment").status == (
            "completed"
        )
        waiting = run(tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert waiting.status == "requires_action"
        assert (
            client.beta.threads.runs.submit_tool_outputs_and_poll(
                run_id=waiting.id,
                thread_id=thread.id,
                tool_outputs=[{"tool_call_id": "w1", "output": "rain"}],
            ).status
            == "completed"
        )
        assert run(tool_choice="none").status == "completed"
        with pytest.raises(openai.BadRequestError) as unknown:
            run(tool_choice={"type": "function", "function": {"name": "nope"}})
        assert unknown.value.param == "tool_choice.function.name"
        with pytest.raises(openai.BadRequestError) as no_code:
            run(tools=[WEATHER], tool_choice={"type": "code_interpreter"})
        assert no_code.value.param == "tool_choice"
        with pytest.raises(openai.BadRequestError) as search:
            run(tools=[{"type": "file_search"}])
        assert search.value.param == "tools[0]"
        texts = [
            m.content[0].text.value  # type: ignore[union-attr]
            for m in client.beta.threads.messages.list(thread.id, order="asc")
            if m.role == "assistant"
        ]
        assert texts == ["one", "two", "three", "four"]

    await anyio.to_thread.run_sync(runs)
    requests = daemon.model.requests
    assert [r["tool_choice"] for r in requests] == [
        "required",
        "auto",
        {"type": "function", "function": {"name": "python"}},
        "auto",
        {"type": "function", "function": {"name": "get_weather"}},
        "auto",
        "none",
    ]
    assert requests[0]["messages"][0] == {
        "role": "system",
        "content": requests[0]["messages"][0]["content"],
    }
    assert requests[0]["messages"][0]["content"].startswith("Only numbers.\n\nBe brief.")
    assert requests[2]["messages"][0]["content"].startswith("Use tools.")
    assert [r.get("max_completion_tokens") for r in requests[:3]] == [500, 495, None]
    assert [r["model"] for r in requests] == [DEPLOYMENT] * 2 + ["other-deployment"] * 2 + [
        DEPLOYMENT
    ] * 3
    # Later runs see the earlier runs' code and results, as the model wrote and read them.
    history = requests[-1]["messages"]
    calls = [c["id"] for m in history if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert calls == ["c1", "c2", "w1"]
    assert [m["content"] for m in history if m["role"] == "tool"][-1] == "rain"


async def test_words_said_with_tool_calls_are_in_later_turns_once(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply("Let me compute.", [code_call("c1", "print(6 * 7)")]),
        Reply("It is 42."),
        Reply("Still 42."),  # a second run on the thread
    )
    daemon = await openai_daemon(script)
    assert daemon.model is not None
    client = daemon.openai()

    def runs() -> list[str]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "6 * 7?"}])
        for _ in range(2):
            run = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id
            )
            assert run.status == "completed"
        return [
            m.content[0].text.value  # type: ignore[union-attr]
            for m in client.beta.threads.messages.list(thread.id, order="asc")
            if m.role == "assistant"
        ]

    assert await anyio.to_thread.run_sync(runs) == ["Let me compute.", "It is 42.", "Still 42."]
    for request in daemon.model.requests[1:]:
        said = [m for m in request["messages"] if m.get("content") == "Let me compute."]
        assert len(said) == 1, request["messages"]
        assert [c["id"] for c in said[0]["tool_calls"]] == ["c1"]


async def test_a_run_waiting_past_its_expiry_frees_its_thread_unretrieved(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs wait no time for tool outputs: each is overdue once it waits.
    monkeypatch.setattr(runs_module, "REQUIRES_ACTION_TTL_S", -1)
    script = in_order(
        Reply(None, [("w1", "get_weather", CITY)]),
        Reply(None, [("w2", "get_weather", CITY)]),
        Reply("A new run."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def flow() -> None:
        assistant = client.beta.assistants.create(model=DEPLOYMENT, tools=[WEATHER])

        def waiting_thread() -> tuple[str, str]:
            thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi"}])
            # Streamed, so the run is never retrieved: its events say it waits.
            with client.beta.threads.runs.create(
                thread_id=thread.id, assistant_id=assistant.id, stream=True
            ) as events:
                last = [e for e in events][-1]
            assert last.event == "thread.run.requires_action"
            return thread.id, last.data.id

        listed_thread, listed_run = waiting_thread()
        busy_thread, _ = waiting_thread()
        (run,) = client.beta.threads.runs.list(listed_thread)
        assert (run.id, run.status, run.required_action) == (listed_run, "expired", None)
        (step,) = client.beta.threads.runs.steps.list(listed_run, thread_id=listed_thread)
        assert step.status == "expired" and step.expired_at is not None
        client.beta.threads.messages.create(busy_thread, role="user", content="Still there?")
        again = client.beta.threads.runs.create_and_poll(
            thread_id=busy_thread, assistant_id=assistant.id
        )
        assert again.status == "completed"
        assert [r.status for r in client.beta.threads.runs.list(busy_thread)] == [
            "completed",
            "expired",
        ]

    await anyio.to_thread.run_sync(flow)


async def test_metadata_set_while_a_run_is_in_progress_outlasts_its_completion(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    answering, answer = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        answering.set()
        await answer.wait()

    daemon = await openai_daemon(in_order(Reply("Done.", before=hold)))
    client = daemon.openai()

    def start() -> tuple[str, str, str]:
        assistant = client.beta.assistants.create(model=DEPLOYMENT)
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi"}])
        run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        (message,) = client.beta.threads.messages.list(thread.id)
        return thread.id, run.id, message.id

    thread_id, run_id, message_id = await anyio.to_thread.run_sync(start)
    async with asyncio.timeout(60):
        await answering.wait()

    def update() -> None:
        updated = client.beta.threads.runs.update(
            run_id, thread_id=thread_id, metadata={"tag": "mid-run"}
        )
        assert (updated.status, updated.metadata) == ("in_progress", {"tag": "mid-run"})
        client.beta.threads.messages.update(
            message_id, thread_id=thread_id, metadata={"tag": "read"}
        )

    await anyio.to_thread.run_sync(update)
    answer.set()

    def finish() -> None:
        run = client.beta.threads.runs.poll(run_id, thread_id=thread_id)
        assert (run.status, run.metadata) == ("completed", {"tag": "mid-run"})
        first, answered = client.beta.threads.messages.list(thread_id, order="asc")
        assert first.metadata == {"tag": "read"}
        assert answered.content[0].text.value == "Done."  # type: ignore[union-attr]
        # An update without metadata leaves it as it is, a run's and a message's.
        kept = client.beta.threads.runs.update(run_id, thread_id=thread_id)
        assert (kept.status, kept.metadata) == ("completed", {"tag": "mid-run"})
        read = client.beta.threads.messages.update(message_id, thread_id=thread_id)
        assert read.metadata == {"tag": "read"}
        # A later update changes the metadata only: the run stays completed.
        later = client.beta.threads.runs.update(run_id, thread_id=thread_id, metadata={})
        assert (later.status, later.metadata) == ("completed", {})

    await anyio.to_thread.run_sync(finish)


async def test_a_run_without_a_model_endpoint_is_refused_saying_how_to_give_one(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options={"pool_size": 0})
    client = daemon.openai()

    def refused() -> None:
        assistant = client.beta.assistants.create(model=DEPLOYMENT)
        thread = client.beta.threads.create()
        with pytest.raises(openai.BadRequestError) as refused:
            client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
        assert "--model-url" in refused.value.message
        with pytest.raises(openai.NotFoundError) as no_assistant:
            client.beta.threads.runs.create(thread.id, assistant_id="asst-nope")
        assert no_assistant.value.param == "assistant_id"

    await anyio.to_thread.run_sync(refused)


async def test_run_endings_incomplete_failed_and_create_and_run(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply("Cut sh", finish_reason="length"),  # the model ran out of tokens
        Reply("Hello from a new thread."),  # threads.create_and_run
    )  # then nothing: the next model call fails
    daemon = await openai_daemon(script, engine_options={"pool_size": 0})
    client = daemon.openai()

    def endings() -> None:
        assistant = client.beta.assistants.create(model=DEPLOYMENT)
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Long story"}])
        cut = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id, max_completion_tokens=5
        )
        assert cut.status == "incomplete" and cut.incomplete_details is not None
        assert cut.incomplete_details.reason == "max_completion_tokens"
        (partial,) = client.beta.threads.messages.list(thread.id, run_id=cut.id).data
        assert partial.status == "incomplete" and partial.content[0].text.value == "Cut sh"  # type: ignore[union-attr]
        both = client.beta.threads.create_and_run_poll(
            assistant_id=assistant.id,
            thread={"messages": [{"role": "user", "content": "Hi"}], "metadata": {"k": "v"}},
        )
        assert both.status == "completed"
        assert client.beta.threads.retrieve(both.thread_id).metadata == {"k": "v"}
        (hello,) = [
            m
            for m in client.beta.threads.messages.list(both.thread_id).data
            if m.role == "assistant"
        ]
        assert hello.content[0].text.value == "Hello from a new thread."  # type: ignore[union-attr]
        failed = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert failed.status == "failed" and failed.last_error is not None
        assert failed.last_error.code == "server_error"
        assert (
            DEPLOYMENT in failed.last_error.message
            and "Error code: 500" in failed.last_error.message
        )
        assert failed.failed_at is not None and failed.expires_at is None

    await anyio.to_thread.run_sync(endings)
