"""The Responses API's code_interpreter tool under /openai, with the real openai client."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import anyio
import openai
import pydantic
import pytest
from openai.types.responses import (
    FunctionToolParam,
    Response,
    ResponseCodeInterpreterToolCall,
    ResponseOutputMessage,
    ToolParam,
)
from openai.types.responses.response_output_text import AnnotationContainerFileCitation

from sandkernel.openai_api import responses as responses_module
from sandkernel.openai_api.containers import Containers
from sandkernel.openai_api.state import ApiState
from sandkernel.openai_api.wire import ResponseObject
from tests._model import FailingModel, Reply, code_call, error_body, in_order
from tests.openai_api.conftest import (
    DEPLOYMENT,
    OpenAIDaemon,
    OpenAIDaemonFactory,
    outlast_expiry,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
AUTO: list[ToolParam] = [{"type": "code_interpreter", "container": {"type": "auto"}}]
OUTPUTS: list[Any] = ["code_interpreter_call.outputs"]


def _code_calls(response: Response) -> list[ResponseCodeInterpreterToolCall]:
    return [i for i in response.output if isinstance(i, ResponseCodeInterpreterToolCall)]


def _message(response: Response) -> ResponseOutputMessage:
    (message,) = [i for i in response.output if isinstance(i, ResponseOutputMessage)]
    return message


async def test_code_runs_in_an_auto_container_and_its_file_is_cited(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(
            calls=[
                code_call(
                    "c1",
                    "open('/mnt/data/report.txt', 'w').write('hello report')\nprint('written')",
                )
            ]
        ),
        Reply(content="Done: sandbox:/mnt/data/report.txt"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        response = client.responses.create(
            model=DEPLOYMENT, tools=AUTO, input="Write a report", include=OUTPUTS
        )
        assert response.status == "completed"
        assert response.completed_at is not None
        assert response.created_at <= response.completed_at <= time.time()
        (call,) = _code_calls(response)
        assert call.status == "completed" and "report.txt" in (call.code or "")
        assert call.outputs is not None
        assert [o.type for o in call.outputs] == ["logs"]
        assert "written" in call.outputs[0].logs  # type: ignore[union-attr]
        text = _message(response).content[0]
        assert text.type == "output_text" and text.text == "Done: sandbox:/mnt/data/report.txt"
        (citation,) = text.annotations
        assert citation.type == "container_file_citation"
        assert (citation.container_id, citation.filename) == (call.container_id, "report.txt")
        assert text.text[citation.start_index : citation.end_index] == "/mnt/data/report.txt"
        content = client.containers.files.content.retrieve(
            citation.file_id, container_id=call.container_id
        )
        assert content.read() == b"hello report"
        listed = {f.path: f.source for f in client.containers.files.list(call.container_id)}
        assert listed == {"/mnt/data/report.txt": "assistant"}
        assert response.usage is not None and response.usage.total_tokens == 30  # two turns
        assert client.responses.retrieve(response.id).output == response.output
        items = client.responses.input_items.list(response.id)
        assert [i.type for i in items] == ["message"]
        client.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)

    await anyio.to_thread.run_sync(exercise)
    assert daemon.clients.checked.bodies.count("response") >= 2
    assert "item:message" in daemon.clients.checked.bodies


async def test_tool_calls_a_model_sent_without_ids_get_ids_of_their_own(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    no_id = cast(str, None)  # as some servers send them
    script = in_order(
        Reply(
            calls=[(no_id, "python", json.dumps({"code": "print(1)"})), code_call("call_0", "2")]
        ),
        Reply(content="done"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> Response:
        return client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Run it")

    response = await anyio.to_thread.run_sync(exercise)
    assert response.status == "completed" and response.output_text == "done"
    assert daemon.model is not None
    answered = [
        m["tool_call_id"] for m in daemon.model.requests[1]["messages"] if m["role"] == "tool"
    ]
    assert len(answered) == 2 and len(set(answered)) == 2 and "call_0" in answered


async def test_previous_response_continues_in_the_same_container(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "x = 41")]),
        Reply(content="x is set"),
        Reply(calls=[code_call("c2", "print(x + 1)")]),
        Reply(content="42"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        first = client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Set x")
        assert _code_calls(first)[0].outputs is None  # not asked for with include
        second = client.responses.create(
            model=DEPLOYMENT,
            tools=AUTO,
            input="Add one",
            previous_response_id=first.id,
            include=OUTPUTS,
        )
        (call,) = _code_calls(second)
        assert call.container_id == _code_calls(first)[0].container_id
        assert call.outputs is not None and call.outputs[0].logs.strip() == "42"  # type: ignore[union-attr]

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    last = daemon.model.requests[-1]["messages"]
    users = [m["content"] for m in last if m["role"] == "user"]
    assert users == ["Set x", "Add one"]


async def test_a_caller_function_gives_a_function_call_item(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[("call-1", "get_weather", json.dumps({"city": "Paris"}))]),
        Reply(content="It is sunny in Paris."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()
    weather: FunctionToolParam = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    }

    def exercise() -> None:
        asked = client.responses.create(
            model=DEPLOYMENT,
            tools=[*AUTO, weather],
            tool_choice={"type": "function", "name": "get_weather"},
            input="Weather in Paris?",
        )
        (call,) = asked.output
        assert call.type == "function_call"
        assert (call.name, json.loads(call.arguments), call.call_id) == (
            "get_weather",
            {"city": "Paris"},
            "call-1",
        )
        answered = client.responses.create(
            model=DEPLOYMENT,
            tools=[*AUTO, weather],
            previous_response_id=asked.id,
            input=[{"type": "function_call_output", "call_id": "call-1", "output": "sunny"}],
        )
        assert answered.output_text == "It is sunny in Paris."

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    first, second = daemon.model.requests
    assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert {"role": "tool", "tool_call_id": "call-1", "content": "sunny"} in second["messages"]


async def test_an_answer_cut_off_by_max_output_tokens_is_incomplete_saying_why(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("call-1", "print(6 * 7)")]),
        Reply(content="The answer is", finish_reason="length"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> Response:
        return client.responses.create(
            model=DEPLOYMENT, tools=AUTO, input="Compute 6 * 7.", max_output_tokens=20
        )

    response = await anyio.to_thread.run_sync(exercise)
    assert response.status == "incomplete" and response.completed_at is None
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    message = _message(response)
    assert message.status == "incomplete" and response.output_text == "The answer is"
    # The bound is the response's: the second turn gets what the first left (5 used).
    assert daemon.model is not None
    first, second = daemon.model.requests
    assert (first["max_completion_tokens"], second["max_completion_tokens"]) == (20, 15)


async def test_going_on_from_an_unanswered_function_call_is_refused_as_openai_does(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(Reply(calls=[("call-1", "get_weather", json.dumps({"city": "Paris"}))]))
    daemon = await openai_daemon(script)
    client = daemon.openai()
    weather: FunctionToolParam = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {}},
        "strict": False,
    }

    def exercise() -> None:
        asked = client.responses.create(model=DEPLOYMENT, tools=[weather], input="Weather?")
        assert asked.output[0].type == "function_call"
        with pytest.raises(openai.BadRequestError, match="No tool output found for function call"):
            client.responses.create(
                model=DEPLOYMENT, tools=[weather], previous_response_id=asked.id, input="Well?"
            )
        with pytest.raises(openai.BadRequestError, match="No tool call found"):
            client.responses.create(
                model=DEPLOYMENT,
                tools=[weather],
                previous_response_id=asked.id,
                input=[{"type": "function_call_output", "call_id": "call-9", "output": "x"}],
            )

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    assert len(daemon.model.requests) == 1  # neither reached the model


async def test_an_expired_container_is_replaced_for_the_next_auto_response(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "x = 1")]),
        Reply(content="set"),
        Reply(calls=[code_call("c2", "print('x' in globals())")]),
        Reply(content="fresh"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()
    first = await anyio.to_thread.run_sync(
        lambda: client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Set x")
    )
    old = _code_calls(first)[0].container_id
    # The session ending is what its time to live running out does.
    await daemon.running.client().close_session(old)

    def exercise() -> None:
        assert client.containers.retrieve(old).status == "expired"
        second = client.responses.create(
            model=DEPLOYMENT,
            tools=AUTO,
            input="Is x there?",
            previous_response_id=first.id,
            include=OUTPUTS,
        )
        (call,) = _code_calls(second)
        assert call.container_id != old
        assert client.containers.retrieve(call.container_id).status == "running"
        assert call.outputs is not None and call.outputs[0].logs.strip() == "False"  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(
                model=DEPLOYMENT,
                tools=[{"type": "code_interpreter", "container": old}],
                input="again",
            )
        assert "expired" in refused.value.message

    await anyio.to_thread.run_sync(exercise)


async def test_a_container_lives_through_a_slow_model_turn_of_its_response(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Containers, "minute_s", 1.0)  # its 2 "minutes" last 2 s
    started: list[tuple[OpenAIDaemon, str]] = []

    async def slow_model() -> None:
        # The model takes longer than the container's expires_after to answer.
        daemon, container_id = started[0]
        await outlast_expiry(daemon.running.engine, container_id)

    script = in_order(
        Reply(calls=[code_call("c1", "x = 41")]),
        Reply(calls=[code_call("c2", "print(x + 1)")], before=slow_model),
        Reply(content="It is 42."),
    )
    daemon = await openai_daemon(script, engine_options={"reap_interval_s": 0.1})
    client = daemon.openai()

    def exercise() -> None:
        container = client.containers.create(
            name="short", expires_after={"anchor": "last_active_at", "minutes": 2}
        )
        started.append((daemon, container.id))
        response = client.responses.create(
            model=DEPLOYMENT,
            input="Go.",
            tools=[{"type": "code_interpreter", "container": container.id}],
            include=OUTPUTS,
        )
        assert response.status == "completed", response.error
        first, second = _code_calls(response)
        assert [first.status, second.status] == ["completed", "completed"]
        assert second.outputs is not None and second.outputs[0].logs == "42\n"  # type: ignore[union-attr]
        after = client.containers.retrieve(container.id)
        assert after.status == "running"
        # Its use while the model thought counts as activity, as OpenAI's containers count it.
        assert after.last_active_at is not None and container.last_active_at is not None
        assert after.last_active_at > container.last_active_at

    await anyio.to_thread.run_sync(exercise)


async def test_a_named_container_runs_the_code_and_sees_its_files(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "print(open('/mnt/data/data.csv').read().strip())")]),
        Reply(content="read it"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        container = client.containers.create(name="named")
        client.containers.files.create(container.id, file=("data.csv", b"a,b\n1,2\n"))
        response = client.responses.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter", "container": container.id}],
            input="Read data.csv",
            include=OUTPUTS,
        )
        (call,) = _code_calls(response)
        assert call.container_id == container.id
        assert call.outputs is not None and call.outputs[0].logs == "a,b\n1,2\n"  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(
                model=DEPLOYMENT, tools=[{"type": "web_search"}], input="search"
            )
        assert refused.value.body is not None and "web_search" in str(refused.value.body)
        with pytest.raises(openai.BadRequestError) as unknown:
            client.responses.create(
                model=DEPLOYMENT,
                tools=AUTO,
                tool_choice={"type": "function", "name": "missing"},
                input="call it",
            )
        assert unknown.value.param == "tool_choice.name"
        with pytest.raises(openai.NotFoundError):
            client.responses.create(
                model=DEPLOYMENT,
                tools=[{"type": "code_interpreter", "container": "cntr-nosuchcontainer"}],
                input="run",
            )

    await anyio.to_thread.run_sync(exercise)


async def test_streaming_sends_openai_event_sequence(openai_daemon: OpenAIDaemonFactory) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "open('/mnt/data/out.txt', 'w').write('streamed')")]),
        Reply(content="Saved to sandbox:/mnt/data/out.txt for you."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> list[Any]:
        with client.responses.create(
            model=DEPLOYMENT, tools=AUTO, input="Save it", include=OUTPUTS, stream=True
        ) as stream:
            return list(stream)

    events = await anyio.to_thread.run_sync(exercise)
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * kinds.count("response.output_text.delta"),
        "response.output_text.annotation.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert kinds.count("response.output_text.delta") > 1  # the text came as it was generated
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Saved to sandbox:/mnt/data/out.txt for you."
    completed = events[-1].response
    (citation,) = completed.output[-1].content[0].annotations
    assert citation.filename == "out.txt"
    (added,) = (e for e in events if e.type == "response.output_text.annotation.added")
    assert added.annotation is not None and added.annotation_index == 0
    assert added.annotation.model_dump() == citation.model_dump()
    assert (added.item_id, added.output_index, added.content_index) == (
        completed.output[-1].id,
        len(completed.output) - 1,
        0,
    )
    stored = await anyio.to_thread.run_sync(lambda: client.responses.retrieve(completed.id))
    assert stored.output_text == deltas
    assert len(daemon.clients.checked.events) == len(events)  # each one validated


async def test_a_shown_chart_is_an_image_output(openai_daemon: OpenAIDaemonFactory) -> None:
    chart = (
        "import matplotlib.pyplot as plt\n"
        "plt.figure(figsize=(3, 2))\n"
        "plt.plot([0, 1, 2], [11, 14, 17])\n"
        "plt.show()\n"
    )
    daemon = await openai_daemon(
        in_order(Reply(calls=[code_call("c1", chart)]), Reply(content="Here it is."))
    )
    client = daemon.openai()
    response = await anyio.to_thread.run_sync(
        lambda: client.responses.create(
            model=DEPLOYMENT, tools=AUTO, input="Plot it", include=OUTPUTS
        )
    )
    (call,) = _code_calls(response)
    assert call.outputs is not None
    (image,) = [o for o in call.outputs if o.type == "image"]
    head, _, encoded = image.url.partition(",")
    assert head == "data:image/png;base64"
    assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    text = _message(response).content[0]
    assert text.type == "output_text" and text.annotations == []  # a shown image is no file


async def test_streaming_a_function_call_and_a_failed_model_call(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    # One reply only: the second response's model call fails.
    daemon = await openai_daemon(
        in_order(Reply(calls=[("call-1", "lookup", json.dumps({"key": "a"}))]))
    )
    client = daemon.openai()
    lookup: FunctionToolParam = {
        "type": "function",
        "name": "lookup",
        "parameters": {"type": "object"},
        "strict": False,
    }

    def exercise(prompt: str) -> list[Any]:
        with client.responses.create(
            model=DEPLOYMENT, tools=[lookup], input=prompt, stream=True
        ) as stream:
            return list(stream)

    called = await anyio.to_thread.run_sync(exercise, "look it up")
    assert [e.type for e in called] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (item,) = called[-1].response.output
    assert (item.type, item.name, item.arguments) == ("function_call", "lookup", '{"key": "a"}')
    failed = await anyio.to_thread.run_sync(exercise, "again")
    assert [e.type for e in failed][-1] == "response.failed"
    assert failed[-1].response.status == "failed"
    assert failed[-1].response.error.code == "server_error"


async def test_a_response_is_retrievable_while_it_runs_and_not_continued_from_until_it_ends(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    held, release, created = anyio.Event(), anyio.Event(), anyio.Event()

    async def hold() -> None:
        held.set()
        with anyio.fail_after(60):
            await release.wait()

    daemon = await openai_daemon(in_order(Reply(content="Done.", before=hold)))
    client = daemon.openai()
    ids: list[str] = []
    seen: list[Any] = []

    def stream() -> None:
        with client.responses.create(model=DEPLOYMENT, input="hi", stream=True) as events:
            for event in events:
                seen.append(event)
                if event.type == "response.created":
                    ids.append(event.response.id)
                    anyio.from_thread.run_sync(created.set)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(anyio.to_thread.run_sync, stream)
        with anyio.fail_after(60):
            await created.wait()
            await held.wait()
        (response_id,) = ids
        during = await anyio.to_thread.run_sync(client.responses.retrieve, response_id)
        assert during.status == "in_progress" and during.output == []
        with pytest.raises(openai.BadRequestError, match="still in progress") as refused:

            def go_on() -> None:
                client.responses.create(
                    model=DEPLOYMENT, input="more", previous_response_id=response_id
                )

            await anyio.to_thread.run_sync(go_on)
        assert refused.value.param == "previous_response_id"
        release.set()
    assert seen[-1].type == "response.completed"
    after = await anyio.to_thread.run_sync(client.responses.retrieve, response_id)
    assert after.status == "completed" and after.output_text == "Done."


async def test_a_response_is_retrievable_as_soon_as_its_first_event_tells_its_id(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    told = threading.Event()
    save = ApiState.save

    def slow_save(self: ApiState, *objects: Any, **kwargs: Any) -> None:
        if any(isinstance(o, ResponseObject) and o.status == "in_progress" for o in objects):
            # A slow disk: a client that had its id before this returned would find nothing.
            told.wait(1.0)
        save(self, *objects, **kwargs)

    monkeypatch.setattr(ApiState, "save", slow_save)
    daemon = await openai_daemon(in_order(Reply(content="Hello.")))
    client = daemon.openai()

    def first_event_then_retrieve() -> tuple[str, Response]:
        with client.responses.create(model=DEPLOYMENT, input="hi", stream=True) as events:
            first = next(iter(events))
            assert first.type == "response.created"
            try:
                return first.response.id, client.responses.retrieve(first.response.id)
            finally:
                told.set()

    response_id, found = await anyio.to_thread.run_sync(first_event_then_retrieve)
    assert found.id == response_id
    assert found.status in ("in_progress", "completed", "cancelled")


async def test_a_stream_its_client_closes_leaves_its_response_cancelled(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    release = anyio.Event()

    async def hold() -> None:
        with anyio.fail_after(60):
            await release.wait()

    daemon = await openai_daemon(in_order(Reply(content="Not read by anyone.", before=hold)))
    client = daemon.openai()

    def stream_then_close() -> str:
        with client.responses.create(model=DEPLOYMENT, input="hi", stream=True) as events:
            for event in events:
                if event.type == "response.in_progress":
                    return str(event.response.id)  # leaving the block closes the stream
        raise AssertionError("the stream ended before the response was in progress")

    response_id = await anyio.to_thread.run_sync(stream_then_close)
    # If the model was called before the daemon saw the stream close, it answers
    # now: its first event finds the stream closed.
    release.set()
    with anyio.fail_after(60):
        # Observed as a client would, by retrieving the response: no event tells a
        # client when the daemon has seen the connection close.
        while True:
            found = await anyio.to_thread.run_sync(client.responses.retrieve, response_id)
            if found.status != "in_progress":
                break
            await anyio.sleep(0.05)
    assert found.status == "cancelled"
    assert all(item.status == "incomplete" for item in found.output), found.output


async def test_a_model_failing_mid_text_ends_its_message_with_the_text_it_streamed(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order(Reply(content="Hello, wor", fails_with="overloaded")))
    client = daemon.openai()

    def exercise() -> tuple[list[Any], Response]:
        events = list(client.responses.create(model=DEPLOYMENT, input="hi", stream=True))
        return events, client.responses.retrieve(events[-1].response.id)

    events, stored = await anyio.to_thread.run_sync(exercise)
    kinds = [e.type for e in events]
    # The message item ends before the response does, as every other item does.
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ], kinds
    assert events[-2].item.status == "incomplete"
    assert stored.status == "failed" and stored.error is not None
    assert "overloaded" in stored.error.message
    (message,) = stored.output
    assert message.type == "message" and message.status == "incomplete"
    assert [c.text for c in message.content if c.type == "output_text"] == ["Hello, wor"]


SALES = b"month,amount\nJan,10\nFeb,14\nMar,17\n"
READ_SALES_WRONG = (
    "import csv\n"
    "rows = list(csv.DictReader(open('/mnt/data/sales.csv')))\n"
    "print(sum(float(r['revenue']) for r in rows))\n"
)
PLOT_SALES = (
    "import csv, hashlib\n"
    "import matplotlib\n"
    "matplotlib.use('Agg')\n"
    "import matplotlib.pyplot as plt\n"
    "rows = list(csv.DictReader(open('/mnt/data/sales.csv')))\n"
    "fig, ax = plt.subplots(figsize=(3, 2))\n"
    "ax.bar([r['month'] for r in rows], [float(r['amount']) for r in rows])\n"
    "fig.savefig('/mnt/data/chart.png')\n"
    "plt.close(fig)\n"
    "print('sha256', hashlib.sha256(open('/mnt/data/chart.png', 'rb').read()).hexdigest())\n"
)


async def test_a_csv_is_read_an_error_fixed_and_the_saved_chart_cited_and_downloaded(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", READ_SALES_WRONG)]),
        Reply(calls=[code_call("c2", PLOT_SALES)]),
        Reply(content="The chart is at sandbox:/mnt/data/chart.png"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        uploaded = client.files.create(file=("sales.csv", SALES), purpose="assistants")
        response = client.responses.create(
            model=DEPLOYMENT,
            tools=[
                {
                    "type": "code_interpreter",
                    "container": {"type": "auto", "file_ids": [uploaded.id]},
                }
            ],
            input="Chart the sales in sales.csv",
            include=OUTPUTS,
        )
        assert response.status == "completed"
        failed, fixed = _code_calls(response)
        assert failed.container_id == fixed.container_id
        assert failed.outputs is not None and fixed.outputs is not None
        failed_logs = "".join(o.logs for o in failed.outputs if o.type == "logs")
        assert "KeyError" in failed_logs and "revenue" in failed_logs
        fixed_logs = "".join(o.logs for o in fixed.outputs if o.type == "logs")
        assert "Error" not in fixed_logs
        written_hash = fixed_logs.split("sha256", 1)[1].split()[0]
        text = _message(response).content[0]
        assert text.type == "output_text"
        (citation,) = text.annotations
        assert citation.type == "container_file_citation"
        assert (citation.container_id, citation.filename) == (fixed.container_id, "chart.png")
        assert text.text[citation.start_index : citation.end_index] == "/mnt/data/chart.png"
        png = client.containers.files.content.retrieve(
            citation.file_id, container_id=citation.container_id
        ).read()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert hashlib.sha256(png).hexdigest() == written_hash
        listed = {f.path: f.source for f in client.containers.files.list(citation.container_id)}
        assert listed == {"/mnt/data/sales.csv": "user", "/mnt/data/chart.png": "assistant"}

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    # The model was shown the error before it wrote the fix.
    shown = [m for m in daemon.model.requests[1]["messages"] if m["role"] == "tool"]
    assert len(shown) == 1 and "KeyError" in shown[0]["content"]


async def test_an_explicit_container_serves_two_responses_in_turn(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "total = 40")]),
        Reply(content="set"),
        Reply(calls=[code_call("c2", "print(total + 2)")]),
        Reply(content="42"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        container = client.containers.create(name="shared")
        tools: list[ToolParam] = [{"type": "code_interpreter", "container": container.id}]
        first = client.responses.create(model=DEPLOYMENT, tools=tools, input="Set total")
        second = client.responses.create(
            model=DEPLOYMENT, tools=tools, input="Print total + 2", include=OUTPUTS
        )
        assert second.previous_response_id is None  # only the container is shared
        assert [c.container_id for c in (*_code_calls(first), *_code_calls(second))] == [
            container.id,
            container.id,
        ]
        (call,) = _code_calls(second)
        assert call.outputs is not None and call.outputs[0].logs.strip() == "42"  # type: ignore[union-attr]
        again = client.containers.retrieve(container.id)
        assert again.last_active_at is not None and container.last_active_at is not None
        assert again.status == "running" and again.last_active_at >= container.last_active_at

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    # Two conversations: the second response's model call did not see the first's.
    last = daemon.model.requests[-1]["messages"]
    assert [m["content"] for m in last if m["role"] == "user"] == ["Print total + 2"]


async def test_the_clients_stream_helper_completes_with_a_valid_final_response(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "open('/mnt/data/out.txt', 'w').write('x')\nprint('ok')")]),
        Reply(content="Wrote sandbox:/mnt/data/out.txt as asked."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> tuple[list[Any], Response]:
        with client.responses.stream(
            model=DEPLOYMENT, tools=AUTO, input="Write it", include=OUTPUTS
        ) as stream:
            events = list(stream)
            final = stream.get_final_response()
        return events, final

    events, final = await anyio.to_thread.run_sync(exercise)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.index("response.code_interpreter_call.completed") < kinds.index(
        "response.output_text.done"
    )
    Response.model_validate(final.model_dump(mode="json"))
    assert final.status == "completed"
    assert final.output_text == "Wrote sandbox:/mnt/data/out.txt as asked."
    (call,) = _code_calls(final)
    assert call.outputs is not None and call.outputs[0].logs.strip() == "ok"  # type: ignore[union-attr]
    (citation,) = _message(final).content[0].annotations  # type: ignore[union-attr]
    assert isinstance(citation, AnnotationContainerFileCitation)
    assert citation.filename == "out.txt"
    stored = await anyio.to_thread.run_sync(lambda: client.responses.retrieve(final.id))
    # The helper's final response is its parsed subclass; the items are the stored ones.
    assert [i.id for i in stored.output] == [i.id for i in final.output]
    assert stored.output_text == final.output_text


async def test_responses_and_containers_answer_errors_in_openais_shape(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order())
    client = daemon.openai()
    stranger = daemon.openai(api_key="not-the-token")

    def exercise() -> None:
        container = client.containers.create(name="errors")
        missing: list[Callable[[], object]] = [
            lambda: client.responses.retrieve("resp_missing"),
            lambda: client.responses.delete("resp_missing"),
            lambda: client.responses.input_items.list("resp_missing"),
            lambda: client.containers.retrieve("cntr_missing"),
            lambda: client.containers.delete("cntr_missing"),
            lambda: client.containers.files.list("cntr_missing"),
            lambda: client.containers.files.retrieve("cfile_missing", container_id=container.id),
            lambda: client.containers.files.content.retrieve(
                "cfile_missing", container_id=container.id
            ),
            lambda: client.containers.files.delete("cfile_missing", container_id=container.id),
        ]
        for call in missing:
            with pytest.raises(openai.NotFoundError) as not_found:
                call()
            assert "missing" in not_found.value.message
        with pytest.raises(openai.BadRequestError) as no_previous:
            client.responses.create(
                model=DEPLOYMENT, input="go on", previous_response_id="resp_missing"
            )
        assert no_previous.value.param == "previous_response_id"
        assert no_previous.value.code == "previous_response_not_found"
        with pytest.raises(openai.BadRequestError) as bad_container:
            client.responses.create(
                model=DEPLOYMENT,
                tools=[{"type": "code_interpreter", "container": {"type": "fixed"}}],  # type: ignore[typeddict-item]
                input="run",
            )
        assert bad_container.value.param == "tools.container"
        with pytest.raises(openai.BadRequestError) as bad_limit:
            client.containers.create(name="big", memory_limit="64g")
        assert bad_limit.value.param == "memory_limit"
        twice: list[ToolParam] = [
            {"type": "function", "name": "f", "parameters": {}, "strict": False}
        ] * 2
        with pytest.raises(openai.BadRequestError) as repeated:
            client.responses.create(model=DEPLOYMENT, input="hi", tools=twice)
        assert repeated.value.param == "tools[1].name"
        for bad_body in (
            {"max_output_tokens": 0},
            {"max_output_tokens": -5},
            {"metadata": {f"k{i}": "v" for i in range(17)}},
            {"metadata": {"k": "v" * 513}},
        ):
            with pytest.raises(openai.BadRequestError) as refused_body:
                client.responses.create(model=DEPLOYMENT, input="hi", **bad_body)  # type: ignore[arg-type]
            assert refused_body.value.param is not None
            assert refused_body.value.param.startswith(next(iter(bad_body)))
        for refused in (
            lambda: stranger.containers.list(),
            lambda: stranger.containers.retrieve(container.id),
            lambda: stranger.containers.files.list(container.id),
            lambda: stranger.responses.create(model=DEPLOYMENT, input="hi"),
            lambda: stranger.responses.retrieve("resp_missing"),
        ):
            with pytest.raises(openai.AuthenticationError) as unauthorized:
                refused()
            assert unauthorized.value.code == "invalid_api_key"

    await anyio.to_thread.run_sync(exercise)
    errors = daemon.clients.checked.errors  # each one checked in OpenAI's shape
    assert len(errors) == 9 + 3 + 1 + 4 + 5
    assert {e["type"] for e in errors} == {"invalid_request_error"}


async def test_a_responses_output_sent_back_as_input_continues_the_conversation(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    # OpenAI's function-calling loop: no previous_response_id, `input += response.output`.
    script = in_order(
        Reply(
            content="Let me check.",
            calls=[code_call("c1", "print(6 * 7)"), ("call-1", "get_weather", '{"city": "Paris"}')],
        ),
        Reply(content="42, and sunny."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()
    weather: FunctionToolParam = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    }
    tools: list[ToolParam] = [*AUTO, weather]

    def exercise() -> str:
        conversation: list[Any] = [{"role": "user", "content": "Compute, then the weather"}]
        asked = client.responses.create(
            model=DEPLOYMENT, tools=tools, input=conversation, include=OUTPUTS
        )
        assert [i.type for i in asked.output] == [
            "message",
            "code_interpreter_call",
            "function_call",
        ]
        conversation += asked.output
        conversation.append(
            {"type": "function_call_output", "call_id": "call-1", "output": "sunny"}
        )
        answered = client.responses.create(model=DEPLOYMENT, tools=tools, input=conversation)
        assert answered.status == "completed" and answered.output_text == "42, and sunny."
        items = client.responses.input_items.list(answered.id, order="asc")
        assert [i.type for i in items] == [
            "message",
            "message",
            "code_interpreter_call",
            "function_call",
            "function_call_output",
        ]
        return _code_calls(asked)[0].id

    code_item = await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    sent = [m for m in daemon.model.requests[1]["messages"] if m["role"] != "system"]
    code = {"id": code_item, "type": "function", "function": {"name": "python"}}
    assert sent == [
        {"role": "user", "content": "Compute, then the weather"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {**code, "function": {**code["function"], "arguments": '{"code": "print(6 * 7)"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": code_item, "content": "42\n"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny"},
    ]


async def test_a_refused_request_leaves_no_container_behind(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order())
    client = daemon.openai()

    def exercise() -> None:
        refusals: list[tuple[Any, str]] = [
            ([{"type": "web_search_call", "id": "ws_1"}], "input[0]"),
            ([{"role": "user", "content": None}], "input[0].content"),
        ]
        for given, param in refusals:
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(model=DEPLOYMENT, tools=AUTO, input=given)
            assert refused.value.param == param
            assert client.containers.list().data == []

    await anyio.to_thread.run_sync(exercise)
    assert await daemon.running.client().sessions() == []  # no kernel left running either


async def test_an_input_message_without_text_or_parts_is_a_400(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order())
    client = daemon.openai()

    def exercise() -> None:
        refusals: list[tuple[Any, str]] = [
            ([{"role": "user", "content": None}], "input[0].content"),
            (
                [{"role": "user", "content": "hi"}, {"role": "user", "content": 7}],
                "input[1].content",
            ),
            ([{"type": "message", "role": "user", "content": [3]}], "input[0].content"),
            ([{"role": "tool", "content": "x"}], "input[0].role"),
            (
                [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
                "input",
            ),
        ]
        for given, param in refusals:
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(model=DEPLOYMENT, input=given)
            assert refused.value.param == param

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None and daemon.model.requests == []
    assert len(daemon.clients.checked.errors) == 5  # each in OpenAI's shape


async def test_a_deleted_auto_container_is_replaced_for_the_next_response(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "x = 1")]),
        Reply(content="set"),
        Reply(calls=[code_call("c2", "print('x' in globals())")]),
        Reply(content="fresh"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        first = client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Set x")
        old = _code_calls(first)[0].container_id
        client.containers.delete(old)
        second = client.responses.create(
            model=DEPLOYMENT,
            tools=AUTO,
            input="Is x there?",
            previous_response_id=first.id,
            include=OUTPUTS,
        )
        assert second.status == "completed"
        (call,) = _code_calls(second)
        assert call.container_id != old
        assert client.containers.retrieve(call.container_id).status == "running"
        assert call.outputs is not None and call.outputs[0].logs.strip() == "False"  # type: ignore[union-attr]

    await anyio.to_thread.run_sync(exercise)


async def test_malformed_bodies_are_400s_naming_the_field_and_leave_no_container(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order())
    raw = daemon.running.raw()
    code = '{"type":"code_interpreter","container":{"type":"auto"}}'
    refusals = [
        ('{"model":"m","input":"hi","tools":[{"type":"code_interpreter",'
         '"container":{"type":"auto","file_ids":7}}]}', "tools.container.file_ids"),
        ('{"model":"m","input":"hi","tools":[{"type":"code_interpreter",'
         '"container":{"type":"auto","file_ids":["file-000000000000000000000000"]}}]}',
         "tools.container.file_ids[0]"),
        ('{"model":"m","input":"hi","tools":[{"type":"code_interpreter",'
         '"container":{"type":"auto","memory_limit":"4g"}}]}', "tools.container.memory_limit"),
        ('{"model":"m","input":"hi","tools":[{"type":"function","name":"f"}],'
         '"tool_choice":{"type":"function","name":["f"]}}', "tool_choice.name"),
        ('{"model":"m","input":"hi","tools":[{"type":"function","name":"f","parameters":"zz"}]}',
         "tools[0].parameters"),
        ('{"model":"m","input":"hi","temperature":NaN,"tools":[' + code + "]}", "temperature"),
        ('{"model":"m","input":"hi","temperature":2.5,"tools":[' + code + "]}", "temperature"),
        ('{"model":"m","input":"hi","top_p":1.01,"tools":[' + code + "]}", "top_p"),
        ('{"model":"m","input":"\\ud800","tools":[' + code + "]}", "input"),
        ('{"model":"m","input":[{"role":"user","content":[{"type":"input_text",'
         '"text":"\\udc00"}]}],"tools":[' + code + "]}", "input[0].content[0].text"),
        ('{"model":"m","input":"hi","tools":[' + code + '],"metadata":'
         + "[" * 100_000 + "]" * 100_000 + "}", None),
    ]  # fmt: skip
    for body, param in refusals:
        answer = await raw.post(
            "/openai/responses", content=body.encode(), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 400, (body[:120], answer.text)
        assert answer.json()["error"]["param"] == param, body[:120]
    assert (await raw.get("/openai/containers")).json()["data"] == []
    assert await daemon.running.client().sessions() == []  # no kernel left running
    assert daemon.model is not None and daemon.model.requests == []


async def test_an_unexpected_error_after_the_container_is_made_fails_the_response_and_keeps_it(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(result: object) -> str:
        raise RuntimeError("the result could not be formatted")

    monkeypatch.setattr(responses_module, "format_result", broken)
    daemon = await openai_daemon(in_order(Reply(calls=[code_call("c1", "print(1)")])))
    client = daemon.openai()

    def exercise() -> None:
        response = client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Run it")
        assert response.status == "failed"
        assert response.error is not None and response.error.code == "server_error"
        assert "could not be formatted" in response.error.message
        stored = client.responses.retrieve(response.id)
        assert stored.status == "failed" and stored.output == response.output
        (call,) = _code_calls(response)
        assert client.containers.retrieve(call.container_id).status == "running"

    await anyio.to_thread.run_sync(exercise)


SALES_CSV = b"month,total\njan,3\n"


async def test_an_input_file_is_put_in_the_container_before_the_model_turn(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "import os\nprint(open('/mnt/data/sales.csv').read())")]),
        Reply(content="read it"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        uploaded = client.files.create(file=("sales.csv", SALES_CSV), purpose="assistants")
        response = client.responses.create(
            model=DEPLOYMENT,
            tools=AUTO,
            include=OUTPUTS,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Total the sales."},
                        {"type": "input_file", "file_id": uploaded.id},
                    ],
                }
            ],
        )
        (call,) = _code_calls(response)
        assert call.outputs is not None
        assert call.outputs[0].logs == SALES_CSV.decode() + "\n"  # type: ignore[union-attr]
        listed = {f.path: f.source for f in client.containers.files.list(call.container_id)}
        assert listed == {"/mnt/data/sales.csv": "user"}
        (item,) = client.responses.input_items.list(response.id)
        assert item.type == "message"
        parts = [(p.type, getattr(p, "file_id", None)) for p in item.content]
        assert parts == [("input_text", None), ("input_file", uploaded.id)]
        # A copy went in: the upload is still the Files API's.
        assert client.files.retrieve(uploaded.id).filename == "sales.csv"

    await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    # The model is told where the file is, and gets the user's words as they were sent.
    note, user = [m for m in daemon.model.requests[0]["messages"] if m["role"] == "user"]
    assert "/mnt/data/sales.csv" in note["content"] and user["content"] == "Total the sales."


def _told_paths(messages: list[dict[str, Any]]) -> list[str]:
    """The paths the latest input's file notes name, in order."""
    since_answer = messages
    for i, message in enumerate(messages):
        if message["role"] in ("assistant", "tool"):
            since_answer = messages[i + 1 :]
    notes = [m["content"] for m in since_answer if str(m["content"]).startswith("[Attached file")]
    return [re.search(r" at (/mnt/data/\S+)\]$", note)[1] for note in notes]  # type: ignore[index]


def _does_as_told(request: dict[str, Any]) -> Reply:
    """A model that trusts its file notes: reads (or, asked to clean, rewrites) each named path."""
    messages = request["messages"]
    if messages[-1]["role"] == "tool":
        return Reply(content="done")
    paths = _told_paths(messages)
    if messages[-1]["content"] == "clean":
        source = "".join(f"open({p!r}, 'w').write('cleaned')\n" for p in paths)
    else:
        source = "".join(f"print(open({p!r}).read())\n" for p in paths)
    return Reply(calls=[code_call(f"c{len(request['messages'])}", source)])


def _file_message(text: str, *file_ids: str) -> list[Any]:
    parts = [{"type": "input_file", "file_id": file_id} for file_id in file_ids]
    return [{"role": "user", "content": [*parts, {"type": "input_text", "text": text}]}]


async def test_an_input_file_whose_name_is_taken_is_named_where_it_was_placed(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(_does_as_told)
    client = daemon.openai()

    def exercise() -> tuple[str, str]:
        first = client.files.create(file=("data.csv", b"v1"), purpose="assistants")
        cleaned = client.responses.create(
            model=DEPLOYMENT, tools=AUTO, input=_file_message("clean", first.id)
        )
        container_id = _code_calls(cleaned)[0].container_id
        corrected = client.files.create(file=("data.csv", b"v2 corrected"), purpose="assistants")
        read = client.responses.create(
            model=DEPLOYMENT,
            tools=AUTO,
            include=OUTPUTS,
            previous_response_id=cleaned.id,
            input=_file_message("read", corrected.id),
        )
        (call,) = _code_calls(read)
        assert call.container_id == container_id
        assert call.outputs is not None
        # What the model was told to read is the corrected file, not the code's data.csv.
        assert call.outputs[0].logs == "v2 corrected\n"  # type: ignore[union-attr]
        uploads = [f.path for f in client.containers.files.list(container_id) if f.source == "user"]
        return container_id, uploads

    container_id, uploads = await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    (told,) = _told_paths(daemon.model.requests[-2]["messages"])
    assert told != "/mnt/data/data.csv" and told.startswith("/mnt/data/data-")
    assert told in uploads
    session = await daemon.running.client().get_session(container_id)
    seen = await session.run(f"print(open({told!r}).read())")
    assert seen.stdout == "v2 corrected\n"


@pytest.mark.parametrize("named", [True, False], ids=["named-container", "auto-container"])
async def test_input_files_of_one_name_in_one_request_are_each_named_at_their_own_path(
    openai_daemon: OpenAIDaemonFactory, named: bool
) -> None:
    daemon = await openai_daemon(_does_as_told)
    client = daemon.openai()

    def exercise() -> str:
        tools = AUTO
        if named:
            container = client.containers.create(name="same")
            tools = [{"type": "code_interpreter", "container": container.id}]
        a = client.files.create(file=("x.txt", b"A"), purpose="assistants")
        b = client.files.create(file=("x.txt", b"B"), purpose="assistants")
        response = client.responses.create(
            model=DEPLOYMENT,
            tools=tools,
            include=OUTPUTS,
            input=_file_message("read", a.id, b.id, a.id),
        )
        (call,) = _code_calls(response)
        assert call.outputs is not None
        # Each file where the model was told it is: the second did not take the first's place.
        assert call.outputs[0].logs == "A\nB\nA\n"  # type: ignore[union-attr]
        return call.container_id

    container_id = await anyio.to_thread.run_sync(exercise)
    assert daemon.model is not None
    told = _told_paths(daemon.model.requests[0]["messages"])
    assert len(told) == 3 and told[0] == told[2] != told[1]
    listed = await anyio.to_thread.run_sync(lambda: client.containers.files.list(container_id))
    assert sorted(f.path for f in listed) == sorted(told[:2])


async def test_input_parts_not_served_are_400s_saying_what_is_served(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order())
    client = daemon.openai()

    def exercise() -> None:
        uploaded = client.files.create(file=("a.csv", b"a\n1\n"), purpose="assistants")
        text = {"type": "input_text", "text": "look"}
        refusals: list[tuple[list[ToolParam], Any, str]] = [
            (AUTO, {"type": "input_file", "file_id": "file-000000000000000000000000"},
             "input[0].content[1].file_id"),
            (AUTO, {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
             "input[0].content[1]"),
            (AUTO, {"type": "input_file", "file_data": "data:text/csv;base64,YQ==",
                    "filename": "a.csv"}, "input[0].content[1]"),
            (AUTO, {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
             "input[0].content[1]"),
            (AUTO, {"type": "input_text", "text": 7}, "input[0].content[1].text"),
            ([], {"type": "input_file", "file_id": uploaded.id}, "input[0].content[1]"),
            ([], {"type": "input_file", "file_id": "file-000000000000000000000000"},
             "input[0].content[1].file_id"),
        ]  # fmt: skip
        for tools, part, param in refusals:
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.create(
                    model=DEPLOYMENT,
                    tools=tools,
                    input=[{"role": "user", "content": [text, part]}],
                )
            assert refused.value.param == param, part
            if param == "input[0].content[1]":
                assert "input_text" in refused.value.message, refused.value.message
            assert client.containers.list().data == []

    await anyio.to_thread.run_sync(exercise)
    assert await daemon.running.client().sessions() == []
    assert daemon.model is not None and daemon.model.requests == []


async def test_a_file_written_twice_is_one_container_file_cited_once_at_its_last_version(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "open('/mnt/data/report.txt', 'w').write('draft')")]),
        Reply(calls=[code_call("c2", "open('/mnt/data/report.txt', 'w').write('final')")]),
        Reply(content="Your report: /mnt/data/report.txt"),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        response = client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Write it twice")
        container_id = _code_calls(response)[0].container_id
        (listed,) = client.containers.files.list(container_id)
        assert listed.path == "/mnt/data/report.txt"
        (citation,) = _message(response).content[0].annotations  # type: ignore[union-attr]
        assert isinstance(citation, AnnotationContainerFileCitation)
        assert citation.file_id == listed.id
        content = client.containers.files.content.retrieve(
            citation.file_id, container_id=container_id
        )
        assert content.read() == b"final"

    await anyio.to_thread.run_sync(exercise)


async def test_input_items_are_paged_with_limit_and_cursors(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order(Reply(content="ok")))
    client = daemon.openai()

    def exercise() -> None:
        response = client.responses.create(
            model=DEPLOYMENT, input=[{"role": "user", "content": f"m{i}"} for i in range(5)]
        )
        every = [i.id for i in client.responses.input_items.list(response.id, order="asc").data]
        assert len(every) == 5
        page = client.responses.input_items.list(response.id, limit=2, order="asc")
        assert [i.id for i in page.data] == every[:2] and page.has_more
        following = client.responses.input_items.list(
            response.id, limit=2, order="asc", after=every[1]
        )
        assert [i.id for i in following.data] == every[2:4] and following.has_more
        last = client.responses.input_items.list(response.id, limit=2, order="asc", after=every[3])
        assert [i.id for i in last.data] == every[4:] and not last.has_more
        # The client's own paging walks every page.
        paged = client.responses.input_items.list(response.id, limit=2, order="asc")
        assert [i.id for i in paged] == every
        newest = client.responses.input_items.list(response.id, limit=2)
        assert [i.id for i in newest.data] == every[::-1][:2]
        before = client.responses.input_items.list(
            response.id, limit=2, order="asc", extra_query={"before": every[4]}
        )
        assert [i.id for i in before.data] == every[2:4] and before.has_more
        for query, param in (
            ({"after": "msg_unknown"}, "after"),
            ({"before": "msg_unknown"}, "before"),
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                client.responses.input_items.list(response.id, extra_query=query)
            assert refused.value.param == param

    await anyio.to_thread.run_sync(exercise)


async def test_input_items_between_after_and_before_stop_at_before(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(in_order(Reply(content="ok")))
    client = daemon.openai()

    def exercise() -> None:
        response = client.responses.create(
            model=DEPLOYMENT, input=[{"role": "user", "content": f"m{i}"} for i in range(6)]
        )
        every = [i.id for i in client.responses.input_items.list(response.id, order="asc").data]
        assert len(every) == 6

        def page(order: Any, after: str, before: str, limit: int = 20) -> tuple[list[str], bool]:
            got = client.responses.input_items.list(
                response.id, order=order, after=after, limit=limit, extra_query={"before": before}
            )
            return [i.id for i in got.data], got.has_more

        assert page("asc", every[0], every[3]) == (every[1:3], False)
        assert page("asc", every[0], every[4], limit=2) == (every[1:3], True)
        assert page("asc", every[0], every[3], limit=2) == (every[1:3], False)
        newest_first = every[::-1]
        assert page("desc", newest_first[0], newest_first[3]) == (newest_first[1:3], False)
        # Cursors the wrong way round leave nothing between them.
        assert page("asc", every[3], every[1]) == ([], False)

    await anyio.to_thread.run_sync(exercise)


async def test_files_written_before_a_function_call_or_earlier_in_the_chain_are_cited(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(
            calls=[
                code_call("c1", "open('/mnt/data/chart.csv', 'w').write('a,b')"),
                ("call-1", "get_rate", "{}"),
            ]
        ),
        Reply(content="Here is your file: /mnt/data/chart.csv"),
        Reply(content="Not /mnt/data/chart.csv.bak: it is at sandbox:/mnt/data/chart.csv."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()
    rate: FunctionToolParam = {
        "type": "function",
        "name": "get_rate",
        "parameters": {"type": "object", "properties": {}},
        "strict": False,
    }
    tools: list[ToolParam] = [*AUTO, rate]

    def exercise() -> None:
        asked = client.responses.create(model=DEPLOYMENT, tools=tools, input="Chart, then rate")
        container_id = _code_calls(asked)[0].container_id
        (written,) = client.containers.files.list(container_id)
        answered = client.responses.create(
            model=DEPLOYMENT,
            tools=tools,
            previous_response_id=asked.id,
            input=[{"type": "function_call_output", "call_id": "call-1", "output": "1.1"}],
        )
        text = _message(answered).content[0]
        assert text.type == "output_text"
        (citation,) = text.annotations
        assert isinstance(citation, AnnotationContainerFileCitation)
        assert (citation.file_id, citation.container_id) == (written.id, container_id)
        assert text.text[citation.start_index : citation.end_index] == "/mnt/data/chart.csv"
        later = client.responses.create(
            model=DEPLOYMENT, tools=tools, previous_response_id=answered.id, input="Where?"
        )
        text = _message(later).content[0]
        assert text.type == "output_text"
        (again,) = text.annotations
        assert isinstance(again, AnnotationContainerFileCitation)
        assert again.file_id == written.id
        start = text.text.rindex("/mnt/data/chart.csv")  # the whole path, not the .bak
        assert (again.start_index, again.end_index) == (start, start + len("/mnt/data/chart.csv"))

    await anyio.to_thread.run_sync(exercise)


async def test_a_file_the_code_wrote_that_the_answer_does_not_name_is_cited_at_its_end(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(
        Reply(calls=[code_call("c1", "open('/mnt/data/plot.png', 'wb').write(b'png')")]),
        Reply(content="Here is the plot."),
        Reply(content="Nothing new."),
    )
    daemon = await openai_daemon(script)
    client = daemon.openai()

    def exercise() -> None:
        response = client.responses.create(model=DEPLOYMENT, tools=AUTO, input="Plot it")
        text = _message(response).content[0]
        assert text.type == "output_text"
        (citation,) = text.annotations
        assert isinstance(citation, AnnotationContainerFileCitation)
        assert citation.filename == "plot.png"
        assert citation.start_index == citation.end_index == len(text.text)
        content = client.containers.files.content.retrieve(
            citation.file_id, container_id=citation.container_id
        )
        assert content.read() == b"png"
        # A later answer that writes nothing and names nothing cites nothing.
        later = client.responses.create(
            model=DEPLOYMENT, tools=AUTO, previous_response_id=response.id, input="More?"
        )
        later_text = _message(later).content[0]
        assert later_text.type == "output_text" and later_text.annotations == []

    await anyio.to_thread.run_sync(exercise)


async def test_an_item_sent_twice_in_one_input_is_a_400_as_openais(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    """Its input items are listed by id: twice the same id, and the cursor never moves on."""
    daemon = await openai_daemon(in_order(Reply(content="Hello.")))
    client = daemon.openai()

    def exercise() -> None:
        first = client.responses.create(model=DEPLOYMENT, input="hi")
        (answer,) = first.output
        again: Any = [
            {"role": "user", "content": "hi"},
            answer.model_dump(),
            answer.model_dump(),
            {"role": "user", "content": "again"},
        ]
        with pytest.raises(openai.BadRequestError, match="Duplicate item") as refused:
            client.responses.create(model=DEPLOYMENT, input=again)
        assert refused.value.param == "input[2]"

    await anyio.to_thread.run_sync(exercise)


class _Answer(pydantic.BaseModel):
    city: str
    population: int


async def test_the_clients_parse_helper_gets_a_structured_answer(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    """text.format goes to the model as the chat endpoint's response_format; echoed back."""
    daemon = await openai_daemon(in_order(Reply(content='{"city": "Lyon", "population": 522250}')))
    client = daemon.openai()

    def exercise() -> Any:
        return client.responses.parse(
            model=DEPLOYMENT, input="Lyon?", text_format=_Answer, truncation="auto", user="u-1"
        )

    parsed = await anyio.to_thread.run_sync(exercise)
    assert parsed.output_parsed == _Answer(city="Lyon", population=522250)
    assert (parsed.truncation, parsed.user) == ("auto", "u-1")
    assert parsed.text is not None and parsed.text.format.type == "json_schema"
    assert daemon.model is not None
    (asked,) = daemon.model.requests
    sent = asked["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "_Answer"
    assert sent["json_schema"]["schema"]["required"] == ["city", "population"]


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ({"format": {"type": "xml"}}, "text.format.type"),
        ({"format": {"type": "json_schema", "name": "x"}}, "text.format"),
        ({"format": "json"}, "text.format"),
    ],
)
async def test_a_text_format_the_model_cannot_be_asked_for_is_a_400(
    openai_daemon: OpenAIDaemonFactory, text: Any, param: str
) -> None:
    daemon = await openai_daemon(in_order())
    client = daemon.openai()

    def exercise() -> None:
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=DEPLOYMENT, input="hi", text=text)
        assert refused.value.param == param

    await anyio.to_thread.run_sync(exercise)


async def test_a_response_the_model_fails_has_openais_error_code_and_says_why(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    answers = {
        "rate-limited": ("429 Too Many Requests", error_body("Rate limit reached")),
        "needs-a-key": ("401 Unauthorized", error_body("Incorrect API key provided")),
    }
    async with FailingModel(answers) as model:
        daemon = await openai_daemon(model=model, engine_options={"pool_size": 0})
        client = daemon.openai()

        def fail() -> dict[str, Response]:
            return {name: client.responses.create(model=name, input="Hi") for name in answers}

        failed = await anyio.to_thread.run_sync(fail)
    limited, refused = failed["rate-limited"].error, failed["needs-a-key"].error
    assert failed["rate-limited"].status == failed["needs-a-key"].status == "failed"
    assert limited is not None and limited.code == "rate_limit_exceeded"
    assert "Rate limit reached" in limited.message and "check" not in limited.message
    assert refused is not None and refused.code == "server_error"
    assert refused.message.endswith("(check the key in the daemon's --model-key-file)")
