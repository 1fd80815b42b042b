"""Assistants, threads and messages under /openai, with the real openai clients."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import openai
import pytest
from openai.types.beta import Assistant as OpenAIAssistant

from sandkernel.openai_api.wire import Assistant as StoredAssistant
from tests._model import Reply, in_order
from tests.openai_api.conftest import (
    ASSISTANTS_DEPRECATED,
    DEPLOYMENT,
    TOKEN,
    OpenAIDaemonFactory,
    deleted_once_each,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio, *ASSISTANTS_DEPRECATED]
NO_KERNELS = {"pool_size": 0}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_assistants_crud_with_tools_files_and_metadata(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    native = daemon.running.client()
    client = daemon.azure()

    def crud() -> tuple[str, str, str]:
        data = client.files.create(file=("data.csv", b"x\n1\n"), purpose="assistants")
        extra = client.files.create(file=("extra.txt", b"more\n"), purpose="assistants")
        made = client.beta.assistants.create(
            model=DEPLOYMENT,
            name="Analyst",
            instructions="Answer with code.",
            tools=[{"type": "code_interpreter"}, WEATHER],  # type: ignore[list-item]
            tool_resources={"code_interpreter": {"file_ids": [data.id]}},
            metadata={"team": "data"},
        )
        assert made.model == DEPLOYMENT and made.name == "Analyst"
        assert [t.type for t in made.tools] == ["code_interpreter", "function"]
        assert made.tool_resources is not None and made.tool_resources.code_interpreter
        assert made.tool_resources.code_interpreter.file_ids == [data.id]
        assert made.metadata == {"team": "data"}
        got = client.beta.assistants.retrieve(made.id)
        assert got.model_dump() == made.model_dump()
        changed = client.beta.assistants.update(
            made.id,
            instructions="Be brief.",
            tool_resources={"code_interpreter": {"file_ids": [extra.id]}},
        )
        assert changed.instructions == "Be brief." and changed.name == "Analyst"
        assert changed.tool_resources and changed.tool_resources.code_interpreter
        assert changed.tool_resources.code_interpreter.file_ids == [extra.id]
        return made.id, data.id, extra.id

    assistant_id, data_id, extra_id = await anyio.to_thread.run_sync(crud)
    # The assistant's files are the agent's copies: the uploads stay free for others.
    agent_files = await native.list_files(agent_id=assistant_id)
    assert [f.name for f in agent_files] == ["extra.txt"]
    assert agent_files[0].id not in (data_id, extra_id)
    assert (await native.file(extra_id)).scope == "none"

    def delete() -> None:
        listed = client.files.list()
        assert {f.id for f in listed} == {data_id, extra_id}  # copies are not listed
        gone = client.beta.assistants.delete(assistant_id)
        assert gone.deleted and gone.id == assistant_id
        with pytest.raises(openai.NotFoundError) as missing:
            client.beta.assistants.retrieve(assistant_id)
        assert assistant_id in missing.value.message

    await anyio.to_thread.run_sync(delete)
    assert await native.list_files(agent_id=assistant_id) == []


async def test_assistants_list_pages_in_either_order(openai_daemon: OpenAIDaemonFactory) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    client = daemon.openai()

    def pages() -> None:
        ids = [client.beta.assistants.create(model=DEPLOYMENT, name=f"a{i}").id for i in range(5)]
        first = client.beta.assistants.list(limit=2)
        assert [a.id for a in first.data] == ids[:-3:-1] and first.has_more
        assert [a.id for a in client.beta.assistants.list()] == ids[::-1]
        ascending = client.beta.assistants.list(order="asc", limit=2, after=ids[1])
        assert [a.id for a in ascending.data] == ids[2:4] and ascending.has_more
        before = client.beta.assistants.list(order="asc", before=ids[2])
        assert [a.id for a in before.data] == ids[:2] and not before.has_more
        # The page just before the cursor, however far from the list's start it is.
        back = client.beta.assistants.list(limit=2, before=ids[1])
        assert [a.id for a in back.data] == [ids[3], ids[2]] and back.has_more
        back_asc = client.beta.assistants.list(order="asc", limit=2, before=ids[4])
        assert [a.id for a in back_asc.data] == ids[2:4] and back_asc.has_more
        with pytest.raises(openai.BadRequestError) as bad:
            client.beta.assistants.list(limit=101)
        assert bad.value.param == "limit"

    await anyio.to_thread.run_sync(pages)


async def test_bad_bodies_are_400_naming_the_field(openai_daemon: OpenAIDaemonFactory) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    client = daemon.openai()

    def refused() -> None:
        with pytest.raises(openai.BadRequestError) as search:
            client.beta.assistants.create(model=DEPLOYMENT, tools=[{"type": "file_search"}])
        assert search.value.param == "tools[0]" and "file_search" in search.value.message
        with pytest.raises(openai.BadRequestError) as search_files:
            client.beta.assistants.create(
                model=DEPLOYMENT, tool_resources={"file_search": {"vector_store_ids": ["vs"]}}
            )
        assert search_files.value.param == "tool_resources.file_search"
        with pytest.raises(openai.BadRequestError) as unknown:
            client.beta.assistants.create(model=DEPLOYMENT, extra_body={"colour": "blue"})
        assert unknown.value.param == "colour" and "colour" in unknown.value.message
        with pytest.raises(openai.BadRequestError) as tool_type:
            client.beta.assistants.create(model=DEPLOYMENT, tools=[{"type": "browser"}])  # type: ignore[list-item]
        assert tool_type.value.param is not None and tool_type.value.param.startswith("tools[0]")
        with pytest.raises(openai.BadRequestError) as no_file:
            client.beta.assistants.create(
                model=DEPLOYMENT,
                tool_resources={"code_interpreter": {"file_ids": ["file-nope"]}},
            )
        assert no_file.value.param == "tool_resources.code_interpreter.file_ids[0]"
        with pytest.raises(openai.BadRequestError) as python_name:
            client.beta.assistants.create(
                model=DEPLOYMENT,
                tools=[
                    {"type": "code_interpreter"},
                    {"type": "function", "function": {"name": "python"}},
                ],
            )
        assert python_name.value.param == "tools"
        with pytest.raises(openai.NotFoundError):
            client.beta.threads.retrieve("thread-nope")
        with pytest.raises(openai.NotFoundError):
            client.beta.threads.messages.list("thread-nope")

    await anyio.to_thread.run_sync(refused)
    async with httpx.AsyncClient(base_url=daemon.endpoint + "/openai") as raw:
        broken = await raw.post("/assistants", content=b"{not json", headers={"api-key": TOKEN})
        assert broken.status_code == 400
        assert broken.json()["error"]["type"] == "invalid_request_error"
        no_model = await raw.post("/assistants", json={"name": "x"}, headers={"api-key": TOKEN})
        assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
        nowhere = await raw.get("/no-such-thing", headers={"api-key": TOKEN})
        assert nowhere.status_code == 404 and nowhere.json()["error"]["message"]
        wrong_method = await raw.put("/assistants", json={}, headers={"api-key": TOKEN})
        assert wrong_method.status_code == 405  # the client's mistake, not the server's
        assert wrong_method.json()["error"]["type"] == "invalid_request_error"


async def test_threads_and_messages_with_attachments_and_the_seeds_spellings(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    client = daemon.azure()

    def threads() -> None:
        csv = client.files.create(file=("a.csv", b"k\n1\n"), purpose="assistants")
        txt = client.files.create(file=("b.txt", b"hello\n"), purpose="assistants")
        # Azure's page spells the key "code interpreter" and still shows v1's file_ids.
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT,
            tools=[{"type": "code_interpreter"}],
            tool_resources={"code interpreter": {"file_ids": [csv.id]}},  # type: ignore[typeddict-unknown-key]
        )
        assert assistant.tool_resources and assistant.tool_resources.code_interpreter
        assert assistant.tool_resources.code_interpreter.file_ids == [csv.id]
        thread = client.beta.threads.create(
            messages=[
                {"role": "user", "content": "first", "file_ids": [csv.id]},  # type: ignore[typeddict-unknown-key]
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "second"}],
                    "attachments": [{"file_id": txt.id, "tools": [{"type": "code_interpreter"}]}],
                },
            ],
            metadata={"user": "u1"},
        )
        assert thread.metadata == {"user": "u1"}
        assert client.beta.threads.retrieve(thread.id).id == thread.id
        updated = client.beta.threads.update(thread.id, metadata={"user": "u2"})
        assert updated.metadata == {"user": "u2"}
        messages = client.beta.threads.messages.list(thread.id, order="asc")
        first, second = messages.data
        assert first.content[0].type == "text" and first.content[0].text.value == "first"
        assert first.attachments and first.attachments[0].file_id == csv.id
        assert second.attachments and second.attachments[0].file_id == txt.id
        third = client.beta.threads.messages.create(thread.id, role="user", content="third")
        assert third.thread_id == thread.id and third.role == "user" and third.status == "completed"
        newest = client.beta.threads.messages.list(thread.id, limit=1)
        assert [m.id for m in newest.data] == [third.id] and newest.has_more
        before = client.beta.threads.messages.list(thread.id, order="asc", before=third.id)
        assert [m.id for m in before.data] == [first.id, second.id]
        after = client.beta.threads.messages.list(thread.id, order="desc", after=third.id)
        assert [m.id for m in after.data] == [second.id, first.id]
        assert client.beta.threads.messages.retrieve(second.id, thread_id=thread.id).id == second.id
        other = client.beta.threads.create()
        with pytest.raises(openai.NotFoundError):
            client.beta.threads.messages.retrieve(second.id, thread_id=other.id)
        with pytest.raises(openai.BadRequestError) as searched:
            client.beta.threads.messages.create(
                thread.id,
                role="user",
                content="x",
                attachments=[{"file_id": txt.id, "tools": [{"type": "file_search"}]}],
            )
        assert searched.value.param == "attachments[0].tools"
        with pytest.raises(openai.BadRequestError) as unknown_file:
            client.beta.threads.create(
                messages=[
                    {
                        "role": "user",
                        "content": "x",
                        "attachments": [{"file_id": "file-nope", "tools": []}],
                    }
                ]
            )
        assert unknown_file.value.param == "messages[0].attachments[0].file_id"
        gone = client.beta.threads.delete(thread.id)
        assert gone.deleted
        with pytest.raises(openai.NotFoundError):
            client.beta.threads.messages.list(thread.id)

    await anyio.to_thread.run_sync(threads)


JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "description": "The answer",
        "schema": {"type": "object", "properties": {"x": {"type": "number"}}},
        "strict": True,
    },
}


async def test_response_format_takes_what_openai_takes_and_refuses_the_rest(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    script = in_order(Reply('{"x": 1}'), Reply('{"x": 2}'), Reply('{"x": 3}'))
    daemon = await openai_daemon(script, engine_options=NO_KERNELS)
    assert daemon.model is not None
    client = daemon.openai()
    bad: list[Any] = [
        "banana",
        {"type": "xml"},
        {"type": "text", "junk": 1},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "has space"}},
    ]

    def check() -> None:
        for given in ("auto", {"type": "text"}, {"type": "json_object"}, JSON_SCHEMA):
            made = client.beta.assistants.create(model=DEPLOYMENT, response_format=given)  # type: ignore[arg-type]
            shown: Any = made.response_format
            if not isinstance(shown, str):
                shown = shown.model_dump(by_alias=True, exclude_none=True)
            assert shown == given
        assistant = client.beta.assistants.create(model=DEPLOYMENT)
        thread = client.beta.threads.create()
        for given in bad:
            with pytest.raises(openai.BadRequestError) as created:
                client.beta.assistants.create(model=DEPLOYMENT, response_format=given)
            assert created.value.param == "response_format", given
            with pytest.raises(openai.BadRequestError) as updated:
                client.beta.assistants.update(assistant.id, response_format=given)
            assert updated.value.param == "response_format", given
            with pytest.raises(openai.BadRequestError) as run:
                client.beta.threads.runs.create(
                    thread.id, assistant_id=assistant.id, response_format=given
                )
            assert run.value.param == "response_format", given
            with pytest.raises(openai.BadRequestError) as thread_and_run:
                client.beta.threads.create_and_run(assistant_id=assistant.id, response_format=given)
            assert thread_and_run.value.param == "response_format", given
        for given in ({"type": "json_object"}, JSON_SCHEMA):
            done = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id,
                assistant_id=assistant.id,
                response_format=given,  # type: ignore[arg-type]
            )
            assert done.status == "completed", done.last_error
        both = client.beta.threads.create_and_run_poll(
            assistant_id=assistant.id,
            response_format=JSON_SCHEMA,  # type: ignore[arg-type]
        )
        assert both.status == "completed", both.last_error

    await anyio.to_thread.run_sync(check)
    sent = [request.get("response_format") for request in daemon.model.requests]
    assert sent == [{"type": "json_object"}, JSON_SCHEMA, JSON_SCHEMA]


async def test_a_stored_response_format_openai_would_refuse_is_read_as_auto() -> None:
    # What a daemon that did not check response_format may have stored.
    stored = {"id": "asst-a", "created_at": 1, "model": DEPLOYMENT, "response_format": "banana"}
    assistant = StoredAssistant.model_validate(stored)
    assert assistant.response_format == "auto"
    OpenAIAssistant.model_validate(assistant.model_dump(mode="json"))


async def test_a_thread_deleted_twice_at_once_is_deleted_once(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    client = daemon.openai()

    def exercise() -> None:
        ids = [client.beta.threads.create().id for _ in range(5)]
        deleted_once_each(client.beta.threads.delete, ids)

    await anyio.to_thread.run_sync(exercise)


async def test_an_unknown_cursor_is_a_400_naming_that_cursor_even_when_empty(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    client = daemon.openai()

    def check() -> None:
        thread = client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
        (message,) = client.beta.threads.messages.list(thread.id).data
        cursors: list[dict[str, str]] = [
            {"after": ""},
            {"before": ""},
            {"after": message.id, "before": "msg_unknown"},
        ]
        for cursor in cursors:
            with pytest.raises(openai.BadRequestError) as refused:
                client.beta.threads.messages.list(thread.id, **cursor)  # type: ignore[arg-type]
            unknown = "before" if "before" in cursor else "after"
            assert refused.value.param == unknown, cursor
            assert f"'{cursor[unknown]}'" in refused.value.message

    await anyio.to_thread.run_sync(check)
