"""A thread outlives the daemon: its messages, runs and files; runs and responses a stop ends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest

from sandkernel.openai_api import responses as responses_module
from sandkernel.policy import load_policy
from tests._model import Reply, ScriptedModel, code_call, in_order
from tests.daemon.conftest import RunningDaemon
from tests.openai_api.conftest import ASSISTANTS_DEPRECATED, DEPLOYMENT, OpenAIDaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio, *ASSISTANTS_DEPRECATED]

FIRST = "x = 42\nopen('/mnt/data/kept.txt', 'w').write('kept across restarts')\nprint(x)"
SECOND = "print(open('/mnt/data/kept.txt').read())\nprint(x)"


async def stop(running: RunningDaemon) -> None:
    """Stop a daemon and its engine, as a daemon process ending would."""
    running.daemon.shutdown()
    async with asyncio.timeout(60):
        await running.task
    await running.engine.aclose()


async def test_a_thread_and_its_files_survive_a_restart_and_its_next_run_is_told(
    openai_daemon: OpenAIDaemonFactory, tmp_path: Path
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        arrived.set()
        await release.wait()

    script = in_order(
        Reply(None, [code_call("c1", FIRST)]),
        Reply("x is 42."),
        Reply(None, [code_call("c2", SECOND)]),
        Reply("The file is back; x is gone."),
        Reply("never sent", before=hold),
    )
    model = await ScriptedModel(script).__aenter__()
    try:
        await _restarts(openai_daemon, model, tmp_path, arrived, release)
    finally:
        release.set()
        await model.__aexit__(None, None, None)


async def _restarts(
    openai_daemon: OpenAIDaemonFactory,
    model: ScriptedModel,
    tmp_path: Path,
    arrived: asyncio.Event,
    release: asyncio.Event,
) -> None:
    store = tmp_path / "store"
    options: dict[str, Any] = {"engine_options": {"store_dir": store}, "model": model}
    first = await openai_daemon(**options)
    client = first.openai()

    def first_run() -> dict[str, str]:
        upload = client.files.create(file=("notes.txt", b"some notes\n"), purpose="assistants")
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code_interpreter": {"file_ids": [upload.id]}},
        )
        thread = client.beta.threads.create(
            messages=[{"role": "user", "content": "Remember 42.", "file_ids": [upload.id]}]  # type: ignore[typeddict-unknown-key]
        )
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert run.status == "completed", run.last_error
        return {"upload": upload.id, "assistant": assistant.id, "thread": thread.id, "run": run.id}

    ids = await anyio.to_thread.run_sync(first_run)
    await stop(first.running)

    second = await openai_daemon(**options)
    client = second.openai()

    def second_run() -> str:
        thread = client.beta.threads.retrieve(ids["thread"])
        before = client.beta.threads.messages.list(thread.id, order="asc")
        assert [m.role for m in before.data] == ["user", "assistant"]
        assert before.data[1].content[0].text.value == "x is 42."  # type: ignore[union-attr]
        assert client.files.retrieve(ids["upload"]).filename == "notes.txt"
        earlier = client.beta.threads.runs.retrieve(ids["run"], thread_id=thread.id)
        assert earlier.status == "completed"
        steps = client.beta.threads.runs.steps.list(ids["run"], thread_id=thread.id)
        assert len(steps.data) == 2
        assert client.beta.assistants.retrieve(ids["assistant"]).model == DEPLOYMENT
        client.beta.threads.messages.create(thread.id, role="user", content="What is x?")
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=ids["assistant"]
        )
        assert run.status == "completed", run.last_error
        (tools_step,) = [
            s
            for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id).data
            if s.type == "tool_calls"
        ]
        (call,) = tools_step.step_details.tool_calls  # type: ignore[union-attr]
        logs = call.code_interpreter.outputs[0].logs  # type: ignore[union-attr]
        assert "kept across restarts" in logs and "NameError" in logs
        # The next run starts and stays in its model call until the daemon stops.
        return client.beta.threads.runs.create(thread.id, assistant_id=ids["assistant"]).id

    interrupted = await anyio.to_thread.run_sync(second_run)
    told = model.requests[2]
    system = told["messages"][0]["content"]
    assert "restarted" in system and "variables" in system and "/mnt/data/kept.txt" in system
    assert "Remember 42." in str(told["messages"]) and "x is 42." in str(told["messages"])
    handed_back = model.requests[3]["messages"][-1]["content"]
    assert "NameError: name 'x' is not defined" in handed_back
    async with asyncio.timeout(60):
        await arrived.wait()
    await stop(second.running)
    release.set()

    third = await openai_daemon(**options)
    client = third.openai()
    failed = await anyio.to_thread.run_sync(
        lambda: client.beta.threads.runs.retrieve(interrupted, thread_id=ids["thread"])
    )
    assert failed.status == "failed" and failed.last_error is not None
    assert failed.last_error.code == "server_error"
    assert "shut down while this run was in progress" in failed.last_error.message
    assert len(model.requests) == 5


async def test_a_run_waiting_for_tool_outputs_takes_them_after_a_restart(
    openai_daemon: OpenAIDaemonFactory, tmp_path: Path
) -> None:
    weather: Any = {"type": "function", "function": {"name": "get_weather"}}
    script = in_order(Reply(None, [("call_w", "get_weather", "{}")]), Reply("Sunny, it says."))
    model = await ScriptedModel(script).__aenter__()
    try:
        options: dict[str, Any] = {
            "engine_options": {"store_dir": tmp_path / "store", "pool_size": 0},
            "model": model,
        }
        first = await openai_daemon(**options)
        client = first.openai()

        def ask() -> tuple[str, str]:
            assistant = client.beta.assistants.create(model=DEPLOYMENT, tools=[weather])
            thread = client.beta.threads.create(messages=[{"role": "user", "content": "Weather?"}])
            run = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id
            )
            assert run.status == "requires_action"
            return thread.id, run.id

        thread_id, run_id = await anyio.to_thread.run_sync(ask)
        await stop(first.running)
        second = await openai_daemon(**options)
        client = second.openai()
        done = await anyio.to_thread.run_sync(
            lambda: client.beta.threads.runs.submit_tool_outputs_and_poll(
                run_id=run_id,
                thread_id=thread_id,
                tool_outputs=[{"tool_call_id": "call_w", "output": "sunny"}],
            )
        )
        assert done.status == "completed", done.last_error
        assert model.requests[1]["messages"][-1] == {
            "role": "tool",
            "tool_call_id": "call_w",
            "content": "sunny",
        }
    finally:
        await model.__aexit__(None, None, None)


LIST_WITH_CONTENT = (
    "import os\nprint({n: open('/mnt/data/' + n).read() for n in sorted(os.listdir('/mnt/data'))})"
)


async def test_a_replaced_session_gets_the_latest_version_of_a_file_code_rewrote(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(None, [code_call("v1", "open('/mnt/data/out.csv', 'w').write('v1')")]),
        Reply("Wrote v1."),
        Reply(None, [code_call("v2", "open('/mnt/data/out.csv', 'w').write('v2')")]),
        Reply("Wrote v2."),
        Reply(None, [code_call("ls", LIST_WITH_CONTENT)]),
        Reply("Listed."),
    )
    daemon = await openai_daemon(script)
    assert daemon.model is not None
    client = daemon.openai()
    native = daemon.running.client()

    def run(thread_id: str, assistant_id: str, question: str) -> str:
        client.beta.threads.messages.create(thread_id, role="user", content=question)
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread_id, assistant_id=assistant_id
        )
        assert run.status == "completed", run.last_error
        (step,) = [
            s
            for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread_id).data
            if s.type == "tool_calls"
        ]
        (call,) = step.step_details.tool_calls  # type: ignore[union-attr]
        return call.code_interpreter.outputs[0].logs  # type: ignore[union-attr,no-any-return]

    def twice() -> tuple[str, str]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        thread = client.beta.threads.create()
        run(thread.id, assistant.id, "Write v1.")
        run(thread.id, assistant.id, "Now v2.")
        return thread.id, assistant.id

    thread_id, assistant_id = await anyio.to_thread.run_sync(twice)
    # The session ends (as when its time to live runs out): the next run gets a new one.
    await native.close_session(thread_id)
    listed = await anyio.to_thread.run_sync(run, thread_id, assistant_id, "What is there?")
    assert listed == "{'out.csv': 'v2'}\n"
    system = daemon.model.requests[4]["messages"][0]["content"]
    assert "restarted" in system and "put back: /mnt/data/out.csv." in system


async def test_a_session_that_did_not_get_its_files_is_made_again_by_the_next_run(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandkernel.errors import FileRejected
    from sandkernel.openai_api.placement import Placement

    script = in_order(
        Reply(None, [code_call("v1", "open('/mnt/data/out.csv', 'w').write('v1')")]),
        Reply("Wrote v1."),
        Reply(None, [code_call("ls", LIST_WITH_CONTENT)]),  # its session gets no files
        Reply(None, [code_call("ls", LIST_WITH_CONTENT)]),
        Reply("Listed."),
    )
    daemon = await openai_daemon(script)
    assert daemon.model is not None
    client = daemon.openai()
    native = daemon.running.client()

    def run(thread_id: str, assistant_id: str, question: str) -> Any:
        client.beta.threads.messages.create(thread_id, role="user", content=question)
        return client.beta.threads.runs.create_and_poll(
            thread_id=thread_id, assistant_id=assistant_id
        )

    def first() -> tuple[str, str]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        thread = client.beta.threads.create()
        assert run(thread.id, assistant.id, "Write v1.").status == "completed"
        return thread.id, assistant.id

    thread_id, assistant_id = await anyio.to_thread.run_sync(first)
    await native.close_session(thread_id)  # its time to live ran out

    async def refused(*args: Any, **kwargs: Any) -> dict[str, str]:
        raise FileRejected("no room for 'out.csv' in the workspace")

    with monkeypatch.context() as patched:
        patched.setattr(Placement, "_restore_outputs", refused)
        failed = await anyio.to_thread.run_sync(run, thread_id, assistant_id, "Again.")
    assert failed.status == "failed", failed
    assert "no room" in (failed.last_error.message if failed.last_error else "")

    def last() -> str:  # the next run makes the session again and puts the file back
        listed = run(thread_id, assistant_id, "What is there?")
        assert listed.status == "completed", listed.last_error
        (step,) = [
            s
            for s in client.beta.threads.runs.steps.list(listed.id, thread_id=thread_id).data
            if s.type == "tool_calls"
        ]
        (call,) = step.step_details.tool_calls  # type: ignore[union-attr]
        return call.code_interpreter.outputs[0].logs  # type: ignore[union-attr,no-any-return]

    assert await anyio.to_thread.run_sync(last) == "{'out.csv': 'v1'}\n"
    system = daemon.model.requests[3]["messages"][0]["content"]  # the last run's first
    assert "restarted" in system and "put back: /mnt/data/out.csv." in system


async def _stopped_while_streaming(
    openai_daemon: OpenAIDaemonFactory, stream: Any
) -> tuple[list[Any], float]:
    """What ``stream(client)`` saw, its model call held, of a daemon stopped meanwhile.

    With the seconds from the stop to the stream's end.
    """
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        arrived.set()
        await release.wait()

    daemon = await openai_daemon(in_order(Reply("never sent", before=hold)), graceful_timeout_s=3)
    client = daemon.openai()
    try:
        async with anyio.create_task_group() as tasks:
            seen: list[Any] = []

            async def streaming() -> None:
                seen.extend(await anyio.to_thread.run_sync(stream, client))

            tasks.start_soon(streaming)
            async with asyncio.timeout(60):
                await arrived.wait()
            stopped = time.monotonic()
            daemon.running.daemon.shutdown()
        took = time.monotonic() - stopped
        async with asyncio.timeout(60):
            await daemon.running.task
    finally:
        release.set()
    return seen, took


async def test_a_stop_ends_a_streamed_run_with_its_final_events_within_the_grace_time(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    def stream(client: Any) -> list[Any]:
        assistant = client.beta.assistants.create(model=DEPLOYMENT)
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi."}])
        with client.beta.threads.runs.create(
            thread_id=thread.id, assistant_id=assistant.id, stream=True
        ) as events:
            return list(events)  # ends at ``done``; a cut stream raises

    seen, took = await _stopped_while_streaming(openai_daemon, stream)
    assert [e.event for e in seen] == [
        "thread.run.created",
        "thread.run.queued",
        "thread.run.in_progress",
        "thread.run.failed",
    ]
    failed = seen[-1].data
    assert failed.status == "failed" and failed.last_error is not None
    assert "shut down while this run was in progress" in failed.last_error.message
    assert took < 3, "the stream was not ended before the grace time was up"


async def test_a_stop_ends_a_streamed_response_as_failed_within_the_grace_time(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    def stream(client: Any) -> list[Any]:
        with client.responses.create(model=DEPLOYMENT, input="hi", stream=True) as events:
            return list(events)

    seen, took = await _stopped_while_streaming(openai_daemon, stream)
    last = seen[-1]
    assert last.type == "response.failed", [e.type for e in seen]
    assert last.response.status == "failed" and last.response.error is not None
    assert "shut down while this response was in progress" in last.response.error.message
    assert took < 3, "the stream was not ended before the grace time was up"


# A cell an interrupt does not stop: it is killed once the policy's grace is up.
DEAF_TO_INTERRUPTS = (
    "import signal, time\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "print('running', flush=True)\n"
    "time.sleep(60)\n"
)


async def test_a_stop_leaves_a_cell_deaf_to_interrupts_its_grace_before_the_streams_deadline(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    # The run ends once its cell is killed, 1.5 s after the interrupt: the stop's
    # wind-down comes early enough for that, and the run's stream ends whole
    # within the 5 s grace time.
    policy = load_policy("default").model_copy(update={"interrupt_grace_s": 1.5})
    daemon = await openai_daemon(
        in_order(Reply(None, [code_call("c1", DEAF_TO_INTERRUPTS)]), Reply("never sent")),
        graceful_timeout_s=5,
        engine_options={"policy": policy},
    )
    client = daemon.openai()
    running = anyio.Event()
    token = anyio.lowlevel.current_token()

    def stream() -> list[Any]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi."}])
        seen = []
        with client.beta.threads.runs.create(
            thread_id=thread.id, assistant_id=assistant.id, stream=True
        ) as events:
            for event in events:  # a cut stream raises
                seen.append(event)
                if event.event == "thread.run.step.delta" and "running" in str(event.data):
                    anyio.from_thread.run_sync(running.set, token=token)
        return seen

    async with anyio.create_task_group() as tasks:
        seen: list[Any] = []

        async def streaming() -> None:
            seen.extend(await anyio.to_thread.run_sync(stream))

        tasks.start_soon(streaming)
        with anyio.fail_after(60):
            await running.wait()
        daemon.running.daemon.shutdown()
    async with asyncio.timeout(60):
        await daemon.running.task
    assert seen[-1].event == "thread.run.failed", [e.event for e in seen]
    assert "shut down while this run was in progress" in seen[-1].data.last_error.message


async def test_a_response_begun_once_the_daemon_winds_down_fails_as_it_begins(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request the daemon took before it stopped, answered after its wind-down.
    made = responses_module.Responses.__init__

    def wound_down(self: responses_module.Responses, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        self.wind_down()

    monkeypatch.setattr(responses_module.Responses, "__init__", wound_down)
    daemon = await openai_daemon(in_order(Reply("never sent")))
    client = daemon.openai()
    response = await anyio.to_thread.run_sync(
        lambda: client.responses.create(model=DEPLOYMENT, input="hi")
    )
    assert response.status == "failed" and response.error is not None
    assert "shut down while this response was in progress" in response.error.message
    assert daemon.model is not None and daemon.model.requests == []
