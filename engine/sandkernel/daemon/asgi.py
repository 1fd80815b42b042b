"""ASGI helpers shared by the daemon's middleware and the OpenAI-compatible gate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from starlette.requests import Request
from starlette.types import Message, Receive, Scope


def over_unix_socket(scope: Scope) -> bool:
    """Whether the request came over the daemon's Unix socket (uvicorn gives it no port)."""
    server = scope.get("server")
    return server is not None and len(server) == 2 and server[1] is None


def content_length(scope: Scope) -> int | None:
    """The request's declared Content-Length, or None if absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def limit_body(receive: Receive, limit: int, too_large: Callable[[], Exception]) -> Receive:
    """``receive``, raising ``too_large()`` once the body read so far exceeds ``limit`` bytes.

    The declared length is checked before the body is read; this catches a
    body sent without one (chunked) or longer than it said.
    """
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large()
        return message

    return limited


async def unless_gone[T](request: Request, run: Callable[[], Awaitable[T]]) -> T | None:
    """``run()``'s result; None if the client went first, the run then cancelled.

    As the embedded engine does for a caller that gives up: a cell is
    interrupted (cancelling a run interrupts its cell), a queued run given
    up, not left to hold a kernel, a session or a slot until it ends. A
    streamed run is ended the same way by its response, which watches for
    the disconnect.
    """
    result: T | None = None
    failed: Exception | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            # The body was read: what comes next is the client's disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            result = await run()
        except Exception as exc:  # noqa: BLE001 - raised below, as itself, not in a group
            failed = exc
        group.cancel_scope.cancel()
    if failed is not None:
        raise failed
    return result
