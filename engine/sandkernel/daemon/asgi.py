"""ASGI helpers shared by the daemon's middleware and the OpenAI-compatible gate."""

from __future__ import annotations

from collections.abc import Callable

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
