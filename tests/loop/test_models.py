"""Chat models: the OpenAI-compatible adapter."""

from __future__ import annotations

import json
import re
import socket
import sys

import httpx
import pytest

from sandkernel.loop import ModelCallFailed, ModelReply, OpenAIChatModel, ToolCall, run_loop
from tests._model import Reply, code_call
from tests.loop._support import ListModel, StubSession, code, scripted_model, tool_messages


def test_openai_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r"pip install 'sandkernel\[openai\]'"):
        OpenAIChatModel(model="m")


def test_a_model_without_a_key_or_server_is_model_call_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ModelCallFailed, match="cannot be called"):
        OpenAIChatModel(model="m")


@pytest.mark.anyio
async def test_model_errors_are_mapped_to_model_call_failed() -> None:
    async with scripted_model([]) as (server, model):
        with pytest.raises(ModelCallFailed, match=re.escape(server.base_url)):
            await run_loop(model, "Hello?", StubSession())
    assert len(server.requests) == 1  # no retries behind our back


def _answering(body: bytes, status: int = 200) -> OpenAIChatModel:
    """The adapter on a server that answers every request ``status`` with ``body``."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    transport = httpx.MockTransport(answer)
    return OpenAIChatModel(
        model="m", base_url="http://model.test/v1", api_key="sk-test", max_retries=0,
        http_client=httpx.AsyncClient(transport=transport),
    )  # fmt: skip


def _completion(message: object) -> bytes:
    choice = {"index": 0, "finish_reason": "stop", "message": message}
    body = {"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]}
    return json.dumps(body).encode()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "why"),
    [(b"<html>not a model</html>", "failed: Expecting value"),
     (_completion(None), "no usable choice: ValueError: the reply's choice has no message"),
     # A 200 with an error body: its message is what the user needs.
     (b'{"error": {"message": "model overloaded"}}', "no choices: model overloaded")],
)  # fmt: skip
async def test_a_reply_that_is_no_chat_completion_is_model_call_failed(
    body: bytes, why: str
) -> None:
    async with _answering(body) as model:
        with pytest.raises(ModelCallFailed, match=re.escape(why)):
            await model.complete([{"role": "user", "content": "hi"}], [], "auto")


@pytest.mark.anyio
async def test_a_tool_call_without_an_id_gets_one() -> None:
    call = {"type": "function", "function": {"name": "python", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call, {**call, "id": None}]}
    async with _answering(_completion(message)) as model:
        reply = await model.complete([{"role": "user", "content": "hi"}], [], "auto")
    assert [c.id for c in reply.tool_calls] == ["call_0", "call_1"]


@pytest.mark.anyio
async def test_a_made_up_call_id_is_none_of_the_replys_others() -> None:
    call = {"type": "function", "function": {"name": "python", "arguments": "{}"}}
    calls = [{**call, "id": "call_1"}, call, {**call, "id": "call_1_2"}, {**call, "id": None}]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    async with _answering(_completion(message)) as model:
        reply = await model.complete([{"role": "user", "content": "hi"}], [], "auto")
    assert [c.id for c in reply.tool_calls] == ["call_1", "call_1_3", "call_1_2", "call_3"]


@pytest.mark.anyio
async def test_a_call_without_an_id_beside_one_named_like_it_gets_its_own_answer() -> None:
    first = Reply(
        None, [("call_1", "python", code("print(1)")), (None, "python", code("print(2)"))]
    )
    async with scripted_model([first, Reply("done")]) as (server, model):
        await run_loop(model, "Print.", StubSession())
    answered = [m["tool_call_id"] for m in server.requests[1]["messages"] if m["role"] == "tool"]
    asked = [c["id"] for c in server.requests[1]["messages"][1]["tool_calls"]]
    assert answered == asked and len(set(answered)) == 2


@pytest.mark.anyio
async def test_half_a_character_in_a_reply_is_escaped_and_the_next_call_works() -> None:
    """A lone surrogate (a JSON "\\ud83d" escape alone) in the text or a tool's name."""
    script = [
        Reply("Let me compute \ud83d", [code_call("c1", "print(1)")]),
        Reply(None, [("c2", "python\ud83d", code("print(2)"))]),
        Reply("done \ud83d\ude00"),  # a whole character, in two escapes
    ]
    session = StubSession()
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "Print.", session)
    assert result.outcome == "answered" and result.final_answer == "done \U0001f600"
    assert session.ran == ["print(1)"] and len(server.requests) == 3
    sent = server.requests[2]["messages"]
    assert sent[1]["content"] == "Let me compute \\ud83d"
    assert sent[3]["tool_calls"][0]["function"]["name"] == "python\\ud83d"
    assert "no tool named 'python\\\\ud83d'" in sent[4]["content"]


@pytest.mark.anyio
async def test_half_a_character_in_the_arguments_keeps_its_meaning() -> None:
    raw = '{"code": "print(\'\ud83d\')"}'  # the surrogate itself, not a JSON escape of it
    call = ToolCall(id="c1", name="python", arguments=raw)
    assert call.arguments == '{"code": "print(\'\\ud83d\')"}'  # the same JSON value
    model = ListModel([ModelReply(tool_calls=[call]), ModelReply(content="ok")])
    result = await run_loop(model, "Print.", StubSession())
    (message,) = tool_messages(result.transcript)
    assert message.startswith('Error: the "code" argument holds half of a character')
    json.dumps(result.transcript, ensure_ascii=False).encode()  # can be sent as it is


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "advice"),
    [(401, "(check the API key)"),
     (404, "(check the base URL and the model name)"),
     (400, None),  # the server read the request and refused it: no setting is at fault
     (500, None)],
)  # fmt: skip
async def test_the_advice_fits_the_failure(status: int, advice: str | None) -> None:
    body = json.dumps({"error": {"message": "it went wrong", "type": "x"}}).encode()
    async with _answering(body, status) as model:
        with pytest.raises(ModelCallFailed, match=f"Error code: {status}") as failed:
            await model.complete([{"role": "user", "content": "hi"}], [], "auto")
    message = str(failed.value)
    assert "http://model.test/v1" in message
    if advice is None:
        assert "check the" not in message, message
    else:
        assert message.endswith(advice), message


@pytest.mark.anyio
async def test_text_no_request_can_carry_is_not_blamed_on_the_settings() -> None:
    async with _answering(_completion({"role": "assistant", "content": "hi"})) as model:
        with pytest.raises(ModelCallFailed, match="not valid Unicode") as failed:
            await model.complete([{"role": "user", "content": "half \ud83d"}], [], "auto")
    assert "check the" not in str(failed.value)


@pytest.mark.anyio
async def test_a_server_not_listening_is_said_to_be_unreachable() -> None:
    with socket.socket() as probe:  # a port of ours that nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
        async with OpenAIChatModel(model="m", base_url=url, max_retries=0) as model:
            with pytest.raises(ModelCallFailed, match="could not be reached") as failed:
                await model.complete([{"role": "user", "content": "hi"}], [], "auto")
    assert str(failed.value).endswith("(check the base URL and that the server is running)")


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8o80/v1", "http://127.0.0.1:99999/v1", "localhost:8080/v1",
     "http:///v1", "http://127.0.0.1:8080/v1 "],
)  # fmt: skip
def test_a_base_url_that_is_no_url_is_said_to_be_one(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelCallFailed, match=f"base URL {re.escape(repr(url))} is not a valid"):
        OpenAIChatModel(model="m", base_url=url)
    monkeypatch.setenv("OPENAI_BASE_URL", url)  # the client's default: checked the same way
    with pytest.raises(ModelCallFailed, match=f"base URL {re.escape(repr(url))} is not a valid"):
        OpenAIChatModel(model="m", api_key="sk-test")
