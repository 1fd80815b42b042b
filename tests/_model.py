"""A scripted chat model: an OpenAI-compatible ``/v1/chat/completions`` on loopback.

:class:`ScriptedModel` plays scripted replies (plain JSON, or streamed chunks
when asked to stream) and records every request, so a test sees what the
model loop or the daemon sent the model. Used by the model loop's tests and
the OpenAI-compatible API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    """One scripted assistant turn: text, and ``(call id, tool name, arguments)`` calls."""

    content: str | None = None
    calls: Sequence[tuple[str, str, str]] = ()
    finish_reason: str | None = None
    #: awaited before answering (to hold a reply until something else happened)
    before: Callable[[], Awaitable[None]] | None = None
    #: streamed: an error event after the text, in place of its end (a model failing mid-way)
    fails_with: str | None = None


def code_call(call_id: str, source: str) -> tuple[str, str, str]:
    return call_id, "python", json.dumps({"code": source})


Script = Callable[[dict[str, Any]], Reply]


def in_order(*replies: Reply) -> Script:
    """A script answering each request with the next reply."""
    queue = list(replies)

    def next_reply(request: dict[str, Any]) -> Reply:
        if not queue:
            raise LookupError("the script has no more replies")
        return queue.pop(0)

    return next_reply


def by_marker(scripts: dict[str, Script]) -> Script:
    """Scripts per conversation, chosen by a marker in its first user message."""

    def choose(request: dict[str, Any]) -> Reply:
        first = next(m for m in request["messages"] if m["role"] == "user")
        for marker, script in scripts.items():
            if marker in str(first["content"]):
                return script(request)
        raise LookupError(f"no script for {first['content']!r}")

    return choose


class ScriptedModel:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that plays a script.

    One request per connection, each bounded in time; a request the script
    has no reply for gets a 500. Streamed answers (``stream: true``) send the
    text in several chunks, then the tool calls, then the usage.
    """

    def __init__(self, script: Script, *, streams: bool = True) -> None:
        self.script = script
        self.streams = streams
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> ScriptedModel:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        async with asyncio.timeout(10):
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(60):
                await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The daemon went away while its call was held, or before it asked
            # anything (its caller gave up): nothing to answer.
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, value in (line.split(":", 1) for line in header_lines if ":" in line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if (method, path) != ("POST", "/v1/chat/completions"):
            _write_json(writer, "404 Not Found", {"error": {"message": f"no route {path}"}})
            return
        request = json.loads(body)
        self.requests.append(request)
        if request.get("stream") and not self.streams:
            error = {"message": "streaming is not supported", "type": "invalid_request_error"}
            _write_json(writer, "400 Bad Request", {"error": error})
            return
        try:
            reply = self.script(request)
        except LookupError as exc:
            error = {"message": str(exc), "type": "server_error"}
            _write_json(writer, "500 Internal Server Error", {"error": error})
            return
        if reply.before is not None:
            await reply.before()
        if request.get("stream"):
            await _write_stream(writer, reply)
        else:
            _write_json(writer, "200 OK", completion(reply))
        await writer.drain()


def completion(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": name, "arguments": args}}
            for i, name, args in reply.calls
        ]
    finish = reply.finish_reason or ("tool_calls" if reply.calls else "stop")
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "scripted",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _write_json(writer: asyncio.StreamWriter, status: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)


async def _write_stream(writer: asyncio.StreamWriter, reply: Reply) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> None:
        data = {
            "id": "chatcmpl-scripted",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "scripted",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta else [],
            "usage": usage,
        }
        writer.write(f"data: {json.dumps(data)}\n\n".encode())

    chunk({"role": "assistant", "content": ""})
    text = reply.content or ""
    for start in range(0, len(text), 8):
        chunk({"content": text[start : start + 8]})
        await writer.drain()
    if reply.fails_with is not None:
        error = {"error": {"message": reply.fails_with, "type": "server_error"}}
        writer.write(f"data: {json.dumps(error)}\n\n".encode())
        return
    for index, (call_id, name, args) in enumerate(reply.calls):
        half = len(args) // 2
        first = {"index": index, "id": call_id, "type": "function"}
        chunk({"tool_calls": [{**first, "function": {"name": name, "arguments": args[:half]}}]})
        chunk({"tool_calls": [{"index": index, "function": {"arguments": args[half:]}}]})
    chunk({}, None)  # no choices: skipped by the client
    finish = reply.finish_reason or ("tool_calls" if reply.calls else "stop")
    chunk({"content": ""}, finish)
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    data = {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "scripted",
        "choices": [],
        "usage": usage,
    }
    writer.write(f"data: {json.dumps(data)}\n\ndata: [DONE]\n\n".encode())


def error_body(message: str) -> bytes:
    """An OpenAI-shaped error answer's body."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()


class FailingModel(ScriptedModel):
    """A model server that fails: each model name gets its ``(status line, body)``."""

    def __init__(self, answers: dict[str, tuple[str, bytes]]) -> None:
        super().__init__(in_order())
        self.answers = answers

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = re.search(r"(?im)^content-length: *(\d+)", head)
        assert length is not None, head
        request = json.loads(await reader.readexactly(int(length.group(1))))
        self.requests.append(request)
        status, body = self.answers[request["model"]]
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
