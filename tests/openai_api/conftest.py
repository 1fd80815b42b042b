"""A daemon serving the OpenAI-compatible API, a scripted chat model, and checked clients.

- :class:`~tests._model.ScriptedModel` (re-exported) is an OpenAI-compatible
  ``/v1/chat/completions`` on loopback that plays scripted replies and
  records every request, so a test sees what the daemon sent the model.
- Every ``openai`` client made here (the seed's ``AzureOpenAI`` included,
  through :class:`CheckedAzureOpenAI`) goes through :class:`CheckingTransport`,
  which validates every JSON answer with the ``openai`` package's own pydantic
  types, and every streamed event with its ``AssistantStreamEvent``; a body
  that does not validate fails the request, hence the test.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import pydantic
import pytest
from openai.types import FileDeleted, FileObject
from openai.types.beta import (
    Assistant,
    AssistantDeleted,
    AssistantStreamEvent,
    Thread,
    ThreadDeleted,
)
from openai.types.beta.threads import Message, MessageDeleted, Run
from openai.types.beta.threads.runs import RunStep
from openai.types.container_retrieve_response import ContainerRetrieveResponse
from openai.types.containers.file_retrieve_response import FileRetrieveResponse
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent

from sandkernel.engine import Engine
from sandkernel.session import SessionState
from tests._model import Script, ScriptedModel
from tests.daemon.conftest import DaemonFactory, RunningDaemon
from tests.daemon.conftest import daemon_factory as daemon_factory  # noqa: F401 - a fixture

TOKEN = "openai-api-test-token"
DEPLOYMENT = "gpt-4o-deployment"
API_VERSION = "2024-05-01-preview"

# The openai package marks the Assistants API deprecated; these tests use it on purpose.
ASSISTANTS_DEPRECATED = [
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The Assistants API is deprecated:DeprecationWarning"),
]


# --------------------------------------------------------------------------- the model
# (tests/_model.py, shared with the model loop's tests)


class Rendezvous:
    """Holds each arrival until ``count`` have arrived (or the deadline passes)."""

    def __init__(self, count: int, *, deadline_s: float = 90) -> None:
        self.count = count
        self.arrived = 0
        self.deadline_s = deadline_s
        self._all = asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.count:
            self._all.set()
        async with asyncio.timeout(self.deadline_s):
            await self._all.wait()


async def outlast_expiry(engine: Engine, session_id: str, *, deadline_s: float = 30) -> None:
    """Hold (a slow model turn) past the expiry the session has now, and as long again.

    Returns as soon as the session ends (nothing kept it alive), or once it
    lived that long (something did); fails past ``deadline_s``.
    """
    expires_at = (await engine.session_info(session_id)).expires_at.timestamp()
    kept_until = expires_at + max(0.0, expires_at - time.time())
    give_up = time.monotonic() + deadline_s
    while True:
        info = await engine.session_info(session_id)
        if info.state in (SessionState.EXPIRED, SessionState.CLOSED):
            return
        if time.time() >= kept_until:
            return
        assert time.monotonic() < give_up, f"session {session_id} neither ended nor lived on"
        await asyncio.sleep(0.05)  # the poll's pace: the engine announces neither outcome


# --------------------------------------------------------------------------- checked clients

_BY_OBJECT: dict[str, type[pydantic.BaseModel]] = {
    "assistant": Assistant,
    "assistant.deleted": AssistantDeleted,
    "thread": Thread,
    "thread.deleted": ThreadDeleted,
    "thread.message": Message,
    "thread.message.deleted": MessageDeleted,
    "thread.run": Run,
    "thread.run.step": RunStep,
    "container": ContainerRetrieveResponse,
    "container.file": FileRetrieveResponse,
    "response": Response,
}
_RESPONSE_ITEM: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseItem)
_RESPONSE_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
#: Deleted objects the openai package has no type for (its delete methods return None).
_DELETED = ("container.deleted", "container.file.deleted", "response.deleted")
_STREAM_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(AssistantStreamEvent)


@dataclass
class Checked:
    """What the checking transport validated (so a test can see that it did)."""

    bodies: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def check_body(data: Any, checked: Checked, status: int) -> None:
    """Validate one JSON answer with the openai package's types (AssertionError if not)."""
    if status >= 400:
        assert isinstance(data, dict) and set(data) == {"error"}, data
        assert set(data["error"]) == {"message", "type", "param", "code"}, data
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]
        checked.errors.append(data["error"])
        return
    kind = data.get("object")
    if kind is None and "type" in data:  # a response's input item
        _RESPONSE_ITEM.validate_python(data)
        checked.bodies.append(f"item:{data['type']}")
        return
    if kind == "list":
        assert set(data) == {"object", "data", "first_id", "last_id", "has_more"}, data
        for item in data["data"]:
            check_body(item, checked, status)
        checked.bodies.append("list")
        return
    if kind in _DELETED:
        assert set(data) == {"id", "object", "deleted"} and data["deleted"] is True, data
        checked.bodies.append(str(kind))
        return
    if kind == "file":
        model: type[pydantic.BaseModel] = FileDeleted if "deleted" in data else FileObject
    else:
        assert kind in _BY_OBJECT, f"an answer of unknown object {kind!r}: {data}"
        model = _BY_OBJECT[kind]
    model.model_validate(data)
    _no_extra_fields(model, data)
    checked.bodies.append(str(kind))


def _no_extra_fields(model: type[pydantic.BaseModel], data: dict[str, Any]) -> None:
    extra = set(data) - set(model.model_fields)
    assert not extra, f"{model.__name__} has no fields {sorted(extra)}: {data}"


def check_event(event: str, data: str, checked: Checked) -> None:
    if event == "done":
        assert data == "[DONE]"
    elif event.startswith("response.") or "sequence_number" in json.loads(data):
        parsed = json.loads(data)
        assert parsed["type"] == event, (event, parsed)
        _RESPONSE_EVENT.validate_python(parsed)
    else:
        _STREAM_EVENT.validate_python({"event": event, "data": json.loads(data)})
    checked.events.append(event)


class _CheckedStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, response: httpx2.Response, checked: Checked):
        self.inner = inner
        self.checked = checked
        self.status = response.status_code
        content_type = response.headers.get("content-type", "")
        self.sse = content_type.startswith("text/event-stream")
        self.json = content_type.startswith("application/json")
        self.buffer = b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            if self.sse:
                self.buffer += chunk
                while b"\n\n" in self.buffer:
                    raw, self.buffer = self.buffer.split(b"\n\n", 1)
                    self._event(raw.decode())
            elif self.json:
                self.buffer += chunk
            yield chunk
        if self.json:
            check_body(json.loads(self.buffer), self.checked, self.status)

    def _event(self, raw: str) -> None:
        event, data = "message", []
        for line in raw.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        if data:
            check_event(event, "\n".join(data), self.checked)

    def close(self) -> None:
        self.inner.close()


class CheckingTransport(httpx2.HTTPTransport):
    """An HTTP transport that validates every answer as it is read (see the module doc)."""

    def __init__(self, checked: Checked) -> None:
        super().__init__()
        self.checked = checked

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_CheckedStream(response.stream, response, self.checked),
            extensions=response.extensions,
            request=request,
        )


@dataclass
class Clients:
    """Checked openai clients; closed by the fixture."""

    checked: Checked = field(default_factory=Checked)
    made: list[openai.OpenAI] = field(default_factory=list)

    def http_client(self) -> httpx2.Client:
        return httpx2.Client(transport=CheckingTransport(self.checked), timeout=120)

    def close(self) -> None:
        for client in self.made:
            client.close()


# --------------------------------------------------------------------------- the daemon


@dataclass
class OpenAIDaemon:
    """A daemon on loopback TCP with its token, the scripted model, and client makers."""

    running: RunningDaemon
    model: ScriptedModel | None
    clients: Clients

    @property
    def endpoint(self) -> str:
        return self.running.url

    def azure(self, **kwargs: Any) -> openai.AzureOpenAI:
        kwargs.setdefault("azure_endpoint", self.endpoint)
        kwargs.setdefault("api_key", TOKEN)
        kwargs.setdefault("api_version", API_VERSION)
        kwargs.setdefault("max_retries", 0)
        client = openai.AzureOpenAI(http_client=self.clients.http_client(), **kwargs)
        self.clients.made.append(client)
        return client

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("base_url", self.endpoint + "/openai")
        kwargs.setdefault("api_key", TOKEN)
        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(http_client=self.clients.http_client(), **kwargs)
        self.clients.made.append(client)
        return client


OpenAIDaemonFactory = Callable[..., Awaitable[OpenAIDaemon]]


@pytest.fixture
async def openai_daemon(
    daemon_factory: DaemonFactory,  # noqa: F811 - the fixture imported above
) -> AsyncIterator[OpenAIDaemonFactory]:
    """Start a daemon (and, given a script, its scripted model); all stopped after the test."""
    clients = Clients()
    models: list[ScriptedModel] = []
    try:

        async def start(
            script: Script | None = None,
            *,
            model: ScriptedModel | None = None,
            engine_options: dict[str, Any] | None = None,
            **config: Any,
        ) -> OpenAIDaemon:
            if model is None and script is not None:
                model = await ScriptedModel(script).__aenter__()
                models.append(model)
            config.setdefault("tcp", ("127.0.0.1", 0))
            config.setdefault("token", TOKEN)
            if model is not None:
                config.setdefault("model_url", model.base_url)
            running = await daemon_factory(engine_options=engine_options, **config)
            return OpenAIDaemon(running, model, clients)

        yield start
    finally:
        clients.close()
        for model in models:
            await model.__aexit__(None, None, None)


@pytest.fixture
def checked_azure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clients]:
    """``openai.AzureOpenAI`` replaced by a subclass whose clients are checked and closed.

    So code that does ``from openai import AzureOpenAI`` (the seed's samples,
    run verbatim) talks through :class:`CheckingTransport`.
    """
    clients = Clients()

    class CheckedAzureOpenAI(openai.AzureOpenAI):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("http_client", clients.http_client())
            kwargs.setdefault("max_retries", 0)
            super().__init__(**kwargs)
            clients.made.append(self)

    monkeypatch.setattr(openai, "AzureOpenAI", CheckedAzureOpenAI)
    try:
        yield clients
    finally:
        clients.close()


def deleted_once_each(delete: Callable[[str], object], ids: list[str]) -> None:
    """Two DELETEs of each id at once: one answers it deleted, the other 404."""
    with ThreadPoolExecutor(2) as both:
        for object_id in ids:
            start = threading.Barrier(2)

            def once(object_id: str = object_id, start: threading.Barrier = start) -> str:
                start.wait(10)
                try:
                    delete(object_id)
                except openai.NotFoundError:
                    return "404"
                return "deleted"

            answers = [both.submit(once) for _ in range(2)]
            assert sorted(a.result(30) for a in answers) == ["404", "deleted"]
