"""JSON bodies every route refuses with a 400 before acting: not UTF-8, or nested too deep."""

from __future__ import annotations

import pytest

from tests.openai_api.conftest import OpenAIDaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
JSON = {"content-type": "application/json"}
#: Deeper than any body the API reads, and deeper than the JSON parser's recursion.
DEEP = "[" * 100_000 + "]" * 100_000


async def test_a_string_utf8_cannot_encode_is_a_400_naming_where_it_is(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    raw = daemon.running.raw()
    thread = (await raw.post("/openai/threads", json={}, headers=JSON)).json()
    refusals = [
        (f"/openai/threads/{thread['id']}/messages", r'{"role":"user","content":"hi \ud800"}',
         "content"),
        ("/openai/threads",
         r'{"messages":[{"role":"user","content":[{"type":"text","text":"\udc00"}]}]}',
         "messages[0].content[0].text"),
        ("/openai/assistants",
         r'{"model":"m","tools":[{"type":"function","function":{"name":"f",'
         r'"description":"\ud800"}}]}',
         "tools[0].function.description"),
        (f"/openai/threads/{thread['id']}/runs",
         r'{"assistant_id":"asst-x","additional_messages":[{"role":"user","content":"\ud800"}]}',
         "additional_messages[0].content"),
        (f"/openai/threads/{thread['id']}/runs/run-x/submit_tool_outputs",
         r'{"tool_outputs":[{"tool_call_id":"c","output":"\udfff"}]}',
         "tool_outputs[0].output"),
        ("/openai/assistants", r'{"model":"m","metadata":{"\ud800":"v"}}', "metadata"),
        ("/openai/containers", r'{"name":"\ud800"}', "name"),
    ]  # fmt: skip
    for path, body, param in refusals:
        answer = await raw.post(path, content=body.encode(), headers=JSON)
        assert answer.status_code == 400, (path, answer.text)
        error = answer.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param), path
        assert "UTF-8" in error["message"] and "body" in error["message"]
    assert (await raw.get("/openai/assistants")).json()["data"] == []
    assert (await raw.get("/openai/containers")).json()["data"] == []


async def test_a_body_nested_too_deep_is_a_400_on_every_json_route(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    raw = daemon.running.raw()
    # Parsed, but deeper than what is kept can be written back (pydantic stops at 255).
    parsed_deep = '{"a":' * 400 + "1" + "}" * 400
    bodies = [
        ("/openai/containers", '{"name":' + DEEP + "}"),
        ("/openai/assistants", '{"model":"m","metadata":' + DEEP + "}"),
        ("/openai/threads", '{"metadata":' + DEEP + "}"),
        ("/openai/responses", '{"model":"m","input":"hi","metadata":' + DEEP + "}"),
        ("/openai/assistants", '{"model":"m","tools":[{"type":"function","function":'
         '{"name":"f","parameters":' + parsed_deep + "}}]}"),
    ]  # fmt: skip
    for path, body in bodies:
        answer = await raw.post(path, content=body.encode(), headers=JSON)
        assert answer.status_code == 400, (path, answer.text[:300])
        assert "deep" in answer.json()["error"]["message"]
    assert (await raw.get("/openai/assistants")).json()["data"] == []
    assert (await raw.get("/openai/containers")).json()["data"] == []
