"""Runs: the seed's samples verbatim, the model fixing its code, threads, tools, restarts.

The chat model is :class:`ScriptedModel` on loopback; the code runs in real
sandboxed sessions of the daemon's engine.
"""

from __future__ import annotations

import io
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
from openai.types.beta.threads import Run
from PIL import Image

from sandkernel.errors import SessionClosed
from sandkernel.openai_api.runs import _annotations, chat_context
from sandkernel.openai_api.state import RunState
from sandkernel.openai_api.wire import Message
from sandkernel.openai_api.wire import Run as StoredRun
from tests._model import FailingModel, Reply, by_marker, code_call, error_body, in_order
from tests.openai_api._objects import make_run
from tests.openai_api.conftest import (
    ASSISTANTS_DEPRECATED,
    DEPLOYMENT,
    TOKEN,
    OpenAIDaemon,
    OpenAIDaemonFactory,
    Rendezvous,
    outlast_expiry,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio, *ASSISTANTS_DEPRECATED]

SAMPLES = Path(__file__).with_name("seed_samples.txt")
SPEECH = "def speak(words):\n    print(words)\n\nspeak('3x + 11 = 14')\n"
INSTRUCTIONS = "You are an AI assistant that can write code to help answer math questions."
SEED_MODEL = "gpt-4-1106-preview"  # the second sample names this deployment itself
BROKEN = "print(open('/mnt/data/speech.txt').read())"
FIXED = (
    "import matplotlib.pyplot as plt\n"
    "source = open('/mnt/data/speech.py').read()\n"
    "x = (14 - 11) / 3\n"
    "print(f'{len(source.splitlines())} lines read; x = {x}')\n"
    "open('/mnt/data/solution.csv', 'w').write(f'x\\n{x}\\n')\n"
    "plt.figure(figsize=(3, 2))\n"
    "plt.plot([0, 1, 2], [11, 14, 17])\n"
    "plt.axvline(x)\n"
    "plt.show()\n"
)
ANSWER = "x = 1. The plot shows it; the table is [here](sandbox:/mnt/data/solution.csv)."
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def samples() -> dict[str, str]:
    """The code samples of the seed's page, verbatim, by name."""
    found: dict[str, str] = {}
    for block in SAMPLES.read_text(encoding="utf-8").split("### ")[1:]:
        name, _, code = block.partition("\n")
        found[name] = code
    return found


def fix_and_plot_script() -> list[Reply]:
    return [
        Reply("Let me look at the file.", [code_call("call_read", BROKEN)]),
        Reply(None, [code_call("call_fixed", FIXED)]),
        Reply(ANSWER),
    ]


def check_fixed_and_plotted(
    client: openai.OpenAI, run: Run, requests: list[dict[str, Any]], model: str
) -> str:
    """The run completed after a failed and a fixed code call; returns the image's id."""
    assert run.status == "completed", run.last_error
    assert run.usage is not None and run.usage.total_tokens == 45
    assert [r["model"] for r in requests] == [model] * 3
    assert requests[0]["messages"][0]["role"] == "system"
    assert INSTRUCTIONS in requests[0]["messages"][0]["content"]
    assert [t["function"]["name"] for t in requests[0]["tools"]] == ["python"]
    handed_back = requests[1]["messages"][-1]
    assert handed_back["role"] == "tool" and handed_back["tool_call_id"] == "call_read"
    assert handed_back["content"].startswith("Status: error: FileNotFoundError")
    steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")
    kinds = [s.step_details.type for s in steps.data]
    assert kinds == ["message_creation", "tool_calls", "tool_calls", "message_creation"]
    assert all(s.status == "completed" for s in steps.data)
    failed_call, fixed_call = (s.step_details.tool_calls[0] for s in steps.data[1:3])  # type: ignore[union-attr]
    assert failed_call.type == "code_interpreter" and fixed_call.type == "code_interpreter"
    assert failed_call.code_interpreter.input == BROKEN
    (failed_logs,) = failed_call.code_interpreter.outputs
    assert failed_logs.type == "logs" and "FileNotFoundError" in failed_logs.logs
    assert fixed_call.code_interpreter.input == FIXED
    logs, image = fixed_call.code_interpreter.outputs
    assert logs.type == "logs" and "lines read; x = 1.0" in logs.logs
    assert image.type == "image"
    messages = client.beta.threads.messages.list(run.thread_id, order="asc")
    answers = [m for m in messages.data if m.role == "assistant"]
    assert [m.run_id for m in answers] == [run.id, run.id]
    assert answers[0].content[0].type == "text"
    assert answers[0].content[0].text.value == "Let me look at the file."
    picture, text = answers[1].content
    assert picture.type == "image_file" and picture.image_file.file_id == image.image.file_id
    assert text.type == "text" and text.text.value == ANSWER
    (annotation,) = text.text.annotations
    assert annotation.type == "file_path" and annotation.text == "sandbox:/mnt/data/solution.csv"
    assert ANSWER[annotation.start_index : annotation.end_index] == annotation.text
    table = client.files.content(annotation.file_path.file_id).read()
    assert table == b"x\n1.0\n"
    assert client.files.retrieve(image.image.file_id).purpose == "assistants_output"
    return image.image.file_id


@pytest.mark.filterwarnings(
    "ignore:unclosed file <_io.BufferedReader name='speech.py'>:ResourceWarning"
)
async def test_the_seeds_samples_run_verbatim_and_the_model_fixes_its_code(
    openai_daemon: OpenAIDaemonFactory,
    checked_azure: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = await openai_daemon(in_order(*fix_and_plot_script()))
    assert daemon.model is not None
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", TOKEN)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", daemon.endpoint)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "speech.py").write_text(SPEECH)
    code = samples()

    def seed_flow() -> tuple[dict[str, Any], str]:
        names: dict[str, Any] = {"os": os}
        exec(  # noqa: S102 - the seed's own samples, verbatim but for the placeholders
            code["enable_code_interpreter"].replace(
                "<REPLACE WITH MODEL DEPLOYMENT NAME>", DEPLOYMENT
            ),
            names,
        )
        assert names["assistant"].model == DEPLOYMENT
        exec(code["upload_file_for_code_interpreter"], names)  # noqa: S102
        uploaded = names["file"]
        assistant = names["assistant"]
        assert assistant.tool_resources.code_interpreter.file_ids == [uploaded.id]
        exec(code["pass_file_to_thread"].replace('"file.id"', repr(uploaded.id)), names)  # noqa: S102
        thread = names["thread"]
        client = names["client"]
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        image_id = check_fixed_and_plotted(client, run, daemon.model.requests, SEED_MODEL)
        exec(code["download_generated_file"].replace("assistant-abc123", image_id), names)  # noqa: S102
        return names, image_id

    names, image_id = await anyio.to_thread.run_sync(seed_flow)
    saved = (tmp_path / "my-image.png").read_bytes()
    assert saved.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(saved)) as picture:
        picture.verify()
    # The first user message carried the uploaded file (v1's file_ids): the model was told.
    first_user = daemon.model.requests[0]["messages"][1]
    assert first_user["role"] == "user" and "3x + 11 = 14" in first_user["content"]
    assert "/mnt/data/speech" in first_user["content"]
    checked = checked_azure.checked
    assert {"assistant", "file", "thread", "thread.run", "thread.run.step", "list"} <= set(
        checked.bodies
    )
    assert saved == names["image_data_bytes"] and len(saved) > 1000


async def test_the_same_flow_with_openai_and_base_url(openai_daemon: OpenAIDaemonFactory) -> None:
    daemon = await openai_daemon(in_order(*fix_and_plot_script()))
    assert daemon.model is not None
    client = daemon.openai()

    def flow() -> None:
        speech = client.files.create(file=("speech.py", SPEECH.encode()), purpose="assistants")
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            instructions=INSTRUCTIONS,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code_interpreter": {"file_ids": [speech.id]}},
        )
        thread = client.beta.threads.create(
            messages=[{"role": "user", "content": "Solve `3x + 11 = 14` and plot it."}]
        )
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert daemon.model is not None
        image_id = check_fixed_and_plotted(client, run, daemon.model.requests, DEPLOYMENT)
        assert client.files.content(image_id).read().startswith(PNG_SIGNATURE)
        listed = client.beta.threads.runs.list(thread.id)
        assert [r.id for r in listed.data] == [run.id]

    await anyio.to_thread.run_sync(flow)
    assert "thread.run" in daemon.clients.checked.bodies


@dataclass(frozen=True)
class ModelFailure:
    """What the model server answers, and what the run's last_error says of it."""

    status: str
    body: bytes
    code: str
    cause: tuple[str, ...]
    advice: str | None  # None: no setting is at fault


MODEL_FAILURES = {
    "needs-a-key": ModelFailure(
        "401 Unauthorized", error_body("Incorrect API key provided"), "server_error",
        ("refused the call", "Incorrect API key provided"),
        "(check the key in the daemon's --model-key-file)"),
    "no-such-model": ModelFailure(
        "404 Not Found", error_body("The model does not exist"), "server_error",
        ("'no-such-model'", "The model does not exist"),
        "(check the daemon's --model-url and the model name)"),
    "rate-limited": ModelFailure(
        "429 Too Many Requests", error_body("Rate limit reached"), "rate_limit_exceeded",
        ("Error code: 429 - ", "Rate limit reached"), None),
    "too-long": ModelFailure(
        "400 Bad Request", error_body("maximum context length is 8192 tokens"), "invalid_prompt",
        ("Error code: 400 - ", "maximum context length"), None),
    "not-an-api": ModelFailure(
        "200 OK", b"<html>It works!</html>", "server_error",
        ("its reply is not JSON",), "check that the daemon's --model-url is the API root"),
}  # fmt: skip


async def test_a_run_the_model_fails_names_the_cause_and_the_setting_to_fix(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    async with FailingModel({n: (f.status, f.body) for n, f in MODEL_FAILURES.items()}) as model:
        daemon = await openai_daemon(model=model, engine_options={"pool_size": 0})
        client = daemon.openai()

        def fail_each() -> dict[str, Run]:
            assistant = client.beta.assistants.create(model=DEPLOYMENT)
            failed = {}
            for name in MODEL_FAILURES:
                thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi"}])
                run = client.beta.threads.runs.create_and_poll(
                    thread_id=thread.id, assistant_id=assistant.id, model=name
                )
                failed[name] = client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
            return failed

        failed = await anyio.to_thread.run_sync(fail_each)
    for name, failure in MODEL_FAILURES.items():
        run = failed[name]
        assert run.status == "failed" and run.last_error is not None, (name, run)
        assert run.last_error.code == failure.code, (name, run.last_error)
        message = run.last_error.message
        assert all(words in message for words in failure.cause), (name, message)
        # The cause's own advice and no other: no key blamed for a missing model...
        if failure.advice is None:
            assert "check" not in message and "--model" not in message, (name, message)
        else:
            assert failure.advice in message and message.count("check") == 1, (name, message)
            assert message.count("--model") == 1, (name, message)


async def test_a_run_whose_model_server_is_not_running_says_it_could_not_be_reached(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    with socket.socket() as probe:  # a port of ours that nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
        daemon = await openai_daemon(model_url=url, engine_options={"pool_size": 0})
        client = daemon.openai()

        def fail() -> Run:
            assistant = client.beta.assistants.create(model=DEPLOYMENT)
            thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hi"}])
            run = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id
            )
            return client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)

        run = await anyio.to_thread.run_sync(fail)
    assert run.status == "failed" and run.last_error is not None
    assert run.last_error.code == "server_error"
    message = run.last_error.message
    assert f"{url} could not be reached" in message, message
    assert "(check the daemon's --model-url and that the server is running)" in message
    assert "--model-key-file" not in message


LIST_FILES = "import os\nprint(sorted(os.listdir('/mnt/data')))"


def _run_with_code_calls(
    daemon: OpenAIDaemon, started: list[tuple[OpenAIDaemon, str]]
) -> tuple[Run, list[Any]]:
    """A run of a new thread, to completion: it and its code calls, in order.

    The thread's id goes into ``started`` as soon as the thread is made.
    """
    client = daemon.openai()
    tools: list[Any] = [{"type": "code_interpreter"}]
    assistant = client.beta.assistants.create(model=DEPLOYMENT, tools=tools)
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "Go."}])
    started.append((daemon, thread.id))
    run = client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=100
    )
    assert run.status == "completed", run.last_error
    steps = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc")
    calls = [s.step_details.tool_calls[0] for s in steps.data if s.type == "tool_calls"]  # type: ignore[union-attr]
    return run, calls


async def test_a_threads_session_lives_through_a_slow_model_turn_of_its_run(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    started: list[tuple[OpenAIDaemon, str]] = []

    async def slow_model() -> None:
        # The model takes longer than the session's time to live to answer.
        daemon, thread_id = started[0]
        await outlast_expiry(daemon.running.engine, thread_id)

    script = in_order(
        Reply(None, [code_call("call_set", "x = 41")]),
        Reply(None, [code_call("call_use", "print(x + 1)")], before=slow_model),
        Reply("It is 42."),
    )
    options = {"session_ttl_s": 2.0, "reap_interval_s": 0.1}
    daemon = await openai_daemon(script, engine_options=options)
    run, calls = await anyio.to_thread.run_sync(_run_with_code_calls, daemon, started)
    assert [c.id for c in calls] == ["call_set", "call_use"]
    assert calls[1].code_interpreter.outputs[0].logs == "42\n"
    # Its variables were there for the second call, and the model was told nothing else.
    assert daemon.model is not None
    sent = daemon.model.requests[-1]["messages"]
    assert not [m for m in sent if m["role"] == "system" and "restarted" in m["content"]]
    assert (await daemon.running.engine.session_info(run.thread_id)).state == "active"


async def test_a_threads_session_lives_while_its_run_waits_for_tool_outputs(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(None, [code_call("call_set", "x = 41")]),
        Reply("Checking.", [("w1", "get_weather", "{}")]),
        Reply(None, [code_call("call_use", "print(x + 1)")]),
        Reply("It is 42."),
    )
    options = {"session_ttl_s": 2.0, "reap_interval_s": 0.1}
    daemon = await openai_daemon(script, engine_options=options)
    client = daemon.openai()
    tools: list[Any] = [{"type": "code_interpreter"}, WEATHER]

    def until_it_waits() -> Run:
        assistant = client.beta.assistants.create(model=DEPLOYMENT, tools=tools)
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Go."}])
        return client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=100
        )

    waiting = await anyio.to_thread.run_sync(until_it_waits)
    assert waiting.status == "requires_action", waiting.last_error
    # The caller takes longer than the session's time to live to answer.
    await outlast_expiry(daemon.running.engine, waiting.thread_id)

    def answered() -> list[Any]:
        done = client.beta.threads.runs.submit_tool_outputs_and_poll(
            run_id=waiting.id,
            thread_id=waiting.thread_id,
            tool_outputs=[{"tool_call_id": "w1", "output": "sun"}],
            poll_interval_ms=100,
        )
        assert done.status == "completed", done.last_error
        steps = client.beta.threads.runs.steps.list(done.id, thread_id=done.thread_id, order="asc")
        return [s.step_details.tool_calls[0] for s in steps.data if s.type == "tool_calls"]  # type: ignore[union-attr]

    calls = await anyio.to_thread.run_sync(answered)
    assert [c.id for c in calls] == ["call_set", "w1", "call_use"]
    # Its variables were there after the wait, and the model was told nothing else.
    assert calls[2].code_interpreter.outputs[0].logs == "42\n"  # type: ignore[union-attr]
    assert daemon.model is not None
    sent = daemon.model.requests[-1]["messages"]
    assert not [m for m in sent if m["role"] == "system" and "restarted" in m["content"]]


async def test_a_cancelled_wait_for_tool_outputs_holds_its_session_no_longer(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = by_marker(
        {
            f"thread {name}": in_order(
                Reply(None, [code_call(f"set_{name}", "x = 1")]),
                Reply("Checking.", [(f"w_{name}", "get_weather", "{}")]),
            )
            for name in ("A", "B")
        }
    )
    options = {"session_ttl_s": 2.0, "reap_interval_s": 0.1, "pool_size": 2}
    daemon = await openai_daemon(script, engine_options=options)
    client = daemon.openai()
    tools: list[Any] = [{"type": "code_interpreter"}, WEATHER]

    def waiting_run(name: str) -> Run:
        assistant = client.beta.assistants.create(model=DEPLOYMENT, tools=tools)
        thread = client.beta.threads.create(
            messages=[{"role": "user", "content": f"thread {name}"}]
        )
        return client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=100
        )

    cancelled = await anyio.to_thread.run_sync(waiting_run, "A")
    assert cancelled.status == "requires_action", cancelled.last_error
    gone = await anyio.to_thread.run_sync(
        lambda: client.beta.threads.runs.cancel(cancelled.id, thread_id=cancelled.thread_id)
    )
    assert gone.status == "cancelled"
    # Nothing holds the session now: it ends on its time to live, as any idle session.
    engine = daemon.running.engine
    await outlast_expiry(engine, cancelled.thread_id)
    assert (await engine.session_info(cancelled.thread_id)).state == "expired"
    # A run left waiting when the daemon stops holds up nothing (the daemon stops here).
    left = await anyio.to_thread.run_sync(waiting_run, "B")
    assert left.status == "requires_action", left.last_error


async def test_a_session_ended_between_two_code_calls_of_a_run_is_replaced_saying_so(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    started: list[tuple[OpenAIDaemon, str]] = []

    async def session_ends() -> None:
        daemon, thread_id = started[0]
        await daemon.running.engine.close_session(thread_id)

    script = in_order(
        Reply(None, [code_call("call_set", "x = 41")]),
        Reply(None, [code_call("call_use", "print('x' in globals())")], before=session_ends),
        Reply("x is gone."),
    )
    daemon = await openai_daemon(script)
    _, calls = await anyio.to_thread.run_sync(_run_with_code_calls, daemon, started)
    assert calls[1].code_interpreter.outputs[0].logs == "False\n"
    assert daemon.model is not None
    # The model is told its variables are gone, as after any new session of the thread.
    system = daemon.model.requests[-1]["messages"][0]
    assert system["role"] == "system" and "was restarted" in system["content"]


async def test_a_code_call_refused_before_its_code_ran_is_told_as_not_run(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandkernel.openai_api import runs as runs_module

    async def refused(session: Any, code: str, logs: Any) -> Any:
        raise SessionClosed("session 'thread' was closed: its kernel is gone")

    monkeypatch.setattr(runs_module, "_execute", refused)
    script = in_order(Reply(None, [code_call("call_1", "x = 1")]), Reply("Next."))
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def flow() -> None:
        tools: list[Any] = [{"type": "code_interpreter"}]
        assistant = client.beta.assistants.create(model=DEPLOYMENT, tools=tools)
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Go."}])
        first = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=100
        )
        assert first.status == "failed" and first.last_error is not None
        assert "SessionClosed" in first.last_error.message
        client.beta.threads.messages.create(thread.id, role="user", content="Again.")
        second = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=100
        )
        assert second.status == "completed", second.last_error

    await anyio.to_thread.run_sync(flow)
    assert daemon.model is not None
    told = [m for m in daemon.model.requests[-1]["messages"] if m.get("tool_call_id") == "call_1"]
    assert [m["content"].split(":")[0] for m in told] == ["Not run"], told


async def test_two_threads_run_at_once_in_two_sessions_that_see_only_their_files(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    both = Rendezvous(2)
    script = by_marker(
        {
            f"thread {name}": in_order(
                Reply(None, [code_call(f"ls_{name}", LIST_FILES)], before=both.arrive),
                Reply(f"listed {name}"),
            )
            for name in ("A", "B")
        }
    )
    daemon = await openai_daemon(script, engine_options={"pool_size": 2})
    client = daemon.openai()

    def start_both() -> tuple[str, list[Run]]:
        shared = client.files.create(file=("shared.txt", b"for all\n"), purpose="assistants")
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code_interpreter": {"file_ids": [shared.id]}},
        )
        runs = []
        for name in ("A", "B"):
            own = client.files.create(
                file=(f"{name.lower()}.csv", f"n\n{name}\n".encode()), purpose="assistants"
            )
            thread = client.beta.threads.create(
                messages=[
                    {
                        "role": "user",
                        "content": f"thread {name}: list the files",
                        "attachments": [
                            {"file_id": own.id, "tools": [{"type": "code_interpreter"}]}
                        ],
                    }
                ]
            )
            # Not polled yet: both runs are under way before either is waited for.
            runs.append(client.beta.threads.runs.create(thread.id, assistant_id=assistant.id))
        return assistant.id, runs

    assistant_id, started = await anyio.to_thread.run_sync(start_both)
    assert [r.status for r in started] == ["queued", "queued"]
    done = await anyio.to_thread.run_sync(
        lambda: [client.beta.threads.runs.poll(r.id, thread_id=r.thread_id) for r in started]
    )
    assert both.arrived == 2  # each first model call waited for the other's: they overlapped
    seen = {}
    for run, name in zip(done, ("A", "B"), strict=True):
        assert run.status == "completed", run.last_error
        steps = await anyio.to_thread.run_sync(
            lambda run=run: client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id)
        )
        (call,) = next(s for s in steps.data if s.type == "tool_calls").step_details.tool_calls  # type: ignore[union-attr]
        assert call.type == "code_interpreter"
        seen[name] = call.code_interpreter.outputs[0].logs  # type: ignore[union-attr]
    assert seen == {"A": "['a.csv', 'shared.txt']\n", "B": "['b.csv', 'shared.txt']\n"}
    sessions = {s.id: s for s in await daemon.running.client().sessions()}
    for run in done:
        session = sessions[run.thread_id]  # one session per thread, named by the thread
        assert session.state == "active"
        assert (session.expires_at - session.last_active).total_seconds() == pytest.approx(3600)
    assert len({run.thread_id for run in done}) == 2
    agent_files = await daemon.running.client().list_files(agent_id=assistant_id)
    assert [f.name for f in agent_files] == ["shared.txt"]


async def test_runs_that_run_no_code_hold_no_session_and_the_first_cell_sees_the_files(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    chats = 3
    script = in_order(
        *[Reply(f"hello {i}") for i in range(chats)],
        Reply(None, [code_call("ls", LIST_FILES)]),
        Reply("listed"),
    )
    daemon = await openai_daemon(script, engine_options={"max_sessions": 1})
    assert daemon.model is not None
    client = daemon.openai()
    native = daemon.running.client()

    def chat_only() -> tuple[str, str]:
        shared = client.files.create(file=("shared.txt", b"for all\n"), purpose="assistants")
        own = client.files.create(file=("own.csv", b"n\n1\n"), purpose="assistants")
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code_interpreter": {"file_ids": [shared.id]}},
        )
        for i in range(chats):  # more conversations than max_sessions
            thread = client.beta.threads.create(
                messages=[
                    {
                        "role": "user",
                        "content": f"say hello {i}",
                        "attachments": [
                            {"file_id": own.id, "tools": [{"type": "code_interpreter"}]}
                        ],
                    }
                ]
            )
            run = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id
            )
            assert run.status == "completed", run.last_error
        return assistant.id, thread.id

    assistant_id, thread_id = await anyio.to_thread.run_sync(chat_only)
    assert await native.sessions() == []
    for request in daemon.model.requests:
        system = request["messages"][0]["content"]
        assert "/mnt/data/shared.txt (read-only)" in system and "/mnt/data/own.csv" in system

    def code() -> str:
        client.beta.threads.messages.create(thread_id, role="user", content="list the files")
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread_id, assistant_id=assistant_id
        )
        assert run.status == "completed", run.last_error
        steps = client.beta.threads.runs.steps.list(run.id, thread_id=thread_id)
        (call,) = next(s for s in steps.data if s.type == "tool_calls").step_details.tool_calls  # type: ignore[union-attr]
        return call.code_interpreter.outputs[0].logs  # type: ignore[union-attr,no-any-return]

    assert await anyio.to_thread.run_sync(code) == "['own.csv', 'shared.txt']\n"
    assert [s.id for s in await native.sessions()] == [thread_id]


def _said(request: dict[str, Any]) -> list[tuple[str, Any]]:
    """What a model request's messages said: (role, content), tool calls as their ids."""
    return [
        (m["role"], [c["id"] for c in m["tool_calls"]] if m.get("tool_calls") else m["content"])
        for m in request["messages"]
    ]


WEATHER: Any = {"type": "function", "function": {"name": "get_weather"}}


async def test_a_deleted_reply_and_the_tool_calls_it_came_from_leave_later_runs_context(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply("Checking.", [("w1", "get_weather", "{}")]),
        Reply("Sunny."),
        Reply("Still sunny."),
        Reply("No idea."),
    )
    daemon = await openai_daemon(script, engine_options={"pool_size": 0})
    assert daemon.model is not None
    client = daemon.openai()

    def runs() -> None:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, instructions="SYS", tools=[WEATHER]
        )
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "Weather?"}])

        def run(question: str) -> None:
            client.beta.threads.messages.create(thread.id, role="user", content=question)
            done = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id
            )
            assert done.status == "completed", done.last_error

        waiting = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert waiting.status == "requires_action"
        client.beta.threads.runs.submit_tool_outputs_and_poll(
            run_id=waiting.id,
            thread_id=thread.id,
            tool_outputs=[{"tool_call_id": "w1", "output": "sun"}],
        )
        run("And now?")
        replies = {
            m.content[0].text.value: m.id  # type: ignore[union-attr]
            for m in client.beta.threads.messages.list(thread.id)
            if m.role == "assistant"
        }
        client.beta.threads.messages.delete(replies["Sunny."], thread_id=thread.id)
        client.beta.threads.messages.delete(replies["Still sunny."], thread_id=thread.id)
        run("Tomorrow?")

    await anyio.to_thread.run_sync(runs)
    second_run, third_run = daemon.model.requests[2:]
    assert _said(second_run) == [
        ("system", "SYS"),
        ("user", "Weather?"),
        ("assistant", ["w1"]),
        ("tool", "sun"),
        ("assistant", "Sunny."),
        ("user", "And now?"),
    ]
    assert second_run["messages"][2]["content"] == "Checking."
    # The words said with the call stay; the call, its result and what came of them go.
    assert _said(third_run) == [
        ("system", "SYS"),
        ("user", "Weather?"),
        ("assistant", "Checking."),
        ("user", "And now?"),
        ("user", "Tomorrow?"),
    ]


async def test_last_messages_keeps_that_many_of_the_threads_messages(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(Reply("first answer"), Reply("second answer"), Reply("third answer"))
    daemon = await openai_daemon(script, engine_options={"pool_size": 0})
    assert daemon.model is not None
    client = daemon.openai()

    def runs() -> None:
        assistant = client.beta.assistants.create(model=DEPLOYMENT, instructions="SYS")
        thread = client.beta.threads.create()
        for question, keep in (("first?", None), ("second?", None), ("third?", 2)):
            client.beta.threads.messages.create(thread.id, role="user", content=question)
            truncation: Any = {"type": "last_messages", "last_messages": keep} if keep else None
            done = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id,
                assistant_id=assistant.id,
                **({"truncation_strategy": truncation} if truncation else {}),
            )
            assert done.status == "completed", done.last_error

    await anyio.to_thread.run_sync(runs)
    assert _said(daemon.model.requests[1]) == [
        ("system", "SYS"),
        ("user", "first?"),
        ("assistant", "first answer"),
        ("user", "second?"),
    ]
    assert _said(daemon.model.requests[2]) == [
        ("system", "SYS"),
        ("assistant", "second answer"),
        ("user", "third?"),
    ]


async def test_last_messages_keeps_the_tool_calls_a_kept_reply_came_of() -> None:
    def message(message_id: str, role: str, text: str, run_id: str | None = None) -> Message:
        return Message.model_validate(
            {
                "id": message_id,
                "created_at": 1,
                "thread_id": "thread-t",
                "role": role,
                "content": [{"type": "text", "text": {"value": text, "annotations": []}}],
                "run_id": run_id,
            }
        )

    calls = [{"id": "w1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]
    said = RunState(
        transcript=[
            {"role": "assistant", "content": "Checking.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "w1", "content": "sun"},
            {"role": "assistant", "content": "Sunny."},
        ],
        message_turns=[("msg-1", 0), ("msg-2", 2)],
    )
    now = StoredRun.model_validate(
        {
            **make_run("run-2", "thread-t", "in_progress").model_dump(),
            "truncation_strategy": {"type": "last_messages", "last_messages": 2},
        }
    )
    timeline: list[tuple[Message | StoredRun, RunState | None]] = [
        (message("msg-0", "user", "Weather?"), None),
        (make_run("run-1", "thread-t", "completed"), said),
        (message("msg-1", "assistant", "Checking.", "run-1"), None),
        (message("msg-2", "assistant", "Sunny.", "run-1"), None),
        (message("msg-3", "user", "And now?"), None),
        (now, RunState()),
    ]
    assert chat_context(now, RunState(), timeline, None) == [
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "w1", "content": "sun"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And now?"},
    ]


_ATTACHED = re.compile(r"\[Files attached to this message, in the sandbox: (.+)\]$")
_LOOK = "import os\nprint(sorted(os.listdir('/mnt/data')))"


def _attachments_told(request: dict[str, Any]) -> list[str]:
    """What the last message with attachments says of them, one entry per file."""
    notes = [
        found[1]
        for m in request["messages"]
        if m["role"] == "user" and (found := _ATTACHED.search(str(m["content"])))
    ]
    return notes[-1].split(", ")


def _reads_its_attachments(request: dict[str, Any]) -> Reply:
    """A model that reads each attached file where it is told it is, once told where."""
    messages = request["messages"]
    calls = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    if calls and calls[-1].startswith("read"):
        return Reply("read")
    told = _attachments_told(request)
    if not all(entry.startswith("/mnt/data/") for entry in told):
        return Reply(None, [code_call(f"look{len(calls)}", _LOOK)])
    source = "".join(f"print(open({path!r}).read())\n" for path in told)
    return Reply(None, [code_call(f"read{len(calls)}", source)])


def _code_logs(client: openai.OpenAI, run: Run) -> list[str]:
    steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")
    return [
        call.code_interpreter.outputs[0].logs  # type: ignore[union-attr]
        for step in steps.data
        if step.step_details.type == "tool_calls"
        for call in step.step_details.tool_calls  # type: ignore[union-attr]
    ]


async def test_before_code_runs_a_thread_file_is_told_where_it_will_be_beside_an_assistant_file(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(_reads_its_attachments)
    assert daemon.model is not None
    client = daemon.openai()

    def exercise() -> list[str]:
        reference = client.files.create(file=("data.csv", b"the assistant's"), purpose="assistants")
        data = client.files.create(file=("data.csv", b"the thread's"), purpose="assistants")
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code_interpreter": {"file_ids": [reference.id]}},
        )
        attachment: Any = {"file_id": data.id, "tools": [{"type": "code_interpreter"}]}
        thread = client.beta.threads.create(
            messages=[{"role": "user", "content": "my data", "attachments": [attachment]}]
        )
        run = client.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id
        )
        assert run.status == "completed", run.last_error
        return _code_logs(client, run)

    # The first turn, before any session, reads the thread's file where it was told it is.
    assert await anyio.to_thread.run_sync(exercise) == ["the thread's\n"]
    before, after = daemon.model.requests
    (told,) = _attachments_told(before)
    assert told != "/mnt/data/data.csv" and told.startswith("/mnt/data/data-")
    assert _attachments_told(after) == [told]
    # Told before the session exists what it is told once it does: where each file is.
    assert before["messages"][0] == after["messages"][0]
    system = before["messages"][0]["content"]
    assert f"- /mnt/data/data.csv (read-only)\n- {told}" in system


async def test_a_thread_file_whose_place_cannot_be_foreseen_is_told_after_the_first_code_call(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(_reads_its_attachments)
    assert daemon.model is not None
    client = daemon.openai()

    def exercise() -> list[str]:
        reference = client.files.create(file=("data.csv", b"the assistant's"), purpose="assistants")
        data = client.files.create(file=("data.csv", b"the threads'"), purpose="assistants")
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code_interpreter": {"file_ids": [reference.id]}},
        )
        attachment: Any = {"file_id": data.id, "tools": [{"type": "code_interpreter"}]}
        logs = []
        # The second thread gets a copy of the file the first one's session holds: the
        # copy's id, which names it where its own name is taken, exists once it is placed.
        for _ in range(2):
            thread = client.beta.threads.create(
                messages=[{"role": "user", "content": "my data", "attachments": [attachment]}]
            )
            run = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id
            )
            assert run.status == "completed", run.last_error
            logs += _code_logs(client, run)
        return logs

    first, listed, second = await anyio.to_thread.run_sync(exercise)
    assert first == second == "the threads'\n"
    _, _, looking, reading, _ = daemon.model.requests
    (unknown,) = _attachments_told(looking)
    assert not unknown.startswith("/") and "data.csv" in unknown and "code" in unknown
    assert "/mnt/data/data-" not in looking["messages"][0]["content"]
    (told,) = _attachments_told(reading)
    assert told.startswith("/mnt/data/data-") and told.removeprefix("/mnt/data/") in listed
    assert told in reading["messages"][0]["content"]


def test_a_path_is_annotated_only_where_the_text_names_it_whole() -> None:
    files = [("file-csv", "/mnt/data/report.csv"), ("file-bak", "/mnt/data/report.csv.bak")]
    text = "The backup is at sandbox:/mnt/data/report.csv.bak, the table at /mnt/data/report.csv."
    found = [
        (a.file_path.file_id, text[a.start_index : a.end_index]) for a in _annotations(text, files)
    ]
    assert found == [
        ("file-bak", "sandbox:/mnt/data/report.csv.bak"),
        ("file-csv", "/mnt/data/report.csv"),
    ]
    assert _annotations("Only sandbox:/mnt/data/report.csv-old here.", files[:1]) == []
