"""Chat models: the OpenAI-compatible adapter."""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest

from sandkernel.loop import ModelCallFailed, OpenAIChatModel, run_loop
from tests.loop._support import StubSession, scripted_model


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


def _answering(body: bytes) -> OpenAIChatModel:
    """The adapter on a server that answers every request 200 with ``body``."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

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
