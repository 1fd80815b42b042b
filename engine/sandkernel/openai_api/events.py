"""A run's stream events, as OpenAI's Assistants streaming sends them (Server-Sent Events).

``runs.create(stream=True)``, ``runs.stream(...)`` and
``submit_tool_outputs(stream=True)`` answer ``text/event-stream``::

    event: thread.run.created
    data: {"id": "run-…", "object": "thread.run", "status": "queued", …}

    event: thread.message.delta
    data: {"id": "msg-…", "object": "thread.message.delta", "delta": {"content": […]}}

    …
    event: thread.run.completed
    data: {…}

    event: done
    data: [DONE]

A run goes on whether anyone streams it or not: the run's task emits each
event to the streams subscribed to it (:class:`RunEvents`), and a stream ends
after the event that stops the run (completed, failed, cancelled, expired,
incomplete, or requires_action: submitting tool outputs streams the rest).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Final

from pydantic import BaseModel

#: Events after which a stream of the run ends (then ``done``).
CLOSING: Final = frozenset(
    {
        "thread.run.completed",
        "thread.run.failed",
        "thread.run.cancelled",
        "thread.run.expired",
        "thread.run.incomplete",
        "thread.run.requires_action",
    }
)
DONE: Final = b"event: done\ndata: [DONE]\n\n"
KEEPALIVE: Final = b": keep-alive\n\n"
_KEEPALIVE_S: Final = 15.0

Event = tuple[str, bytes]


def encode(event: str, data: BaseModel | dict[str, Any]) -> bytes:
    """One event; ``data`` is one line of JSON."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json()
    else:
        payload = json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n".encode()


class Subscription:
    """The events of one run, for one stream, from the moment it subscribed.

    Its :meth:`sse` is the response body; when that ends (or the client
    leaves), the subscription ends too.
    """

    def __init__(self, hub: RunEvents, run_id: str) -> None:
        self.run_id = run_id
        self._hub = hub
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: str, encoded: bytes) -> None:
        self._queue.put_nowait((event, encoded))

    def close(self) -> None:
        self._hub.unsubscribe(self)

    async def sse(self, *, keepalive_s: float = _KEEPALIVE_S) -> AsyncIterator[bytes]:
        """Events until one stops the run, then ``done``; keep-alive comments meanwhile."""
        try:
            while True:
                try:
                    event, encoded = await asyncio.wait_for(self._queue.get(), keepalive_s)
                except TimeoutError:
                    yield KEEPALIVE
                    continue
                yield encoded
                if event in CLOSING or event == "error":
                    break
            yield DONE
        finally:
            self.close()


class RunEvents:
    """Hands each event of a run to the streams subscribed to it (none: nothing is encoded)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Subscription]] = {}

    def subscribe(self, run_id: str) -> Subscription:
        """Start receiving a run's events (end with :meth:`Subscription.close`)."""
        subscription = Subscription(self, run_id)
        self._subscribers.setdefault(run_id, []).append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        run_id = subscription.run_id
        remaining = [s for s in self._subscribers.get(run_id, []) if s is not subscription]
        if remaining:
            self._subscribers[run_id] = remaining
        else:
            self._subscribers.pop(run_id, None)

    def watched(self, run_id: str) -> bool:
        return run_id in self._subscribers

    def emit(self, run_id: str, event: str, data: BaseModel | dict[str, Any]) -> None:
        subscribers = self._subscribers.get(run_id)
        if not subscribers:
            return
        encoded = encode(event, data)
        for subscription in list(subscribers):
            subscription.put(event, encoded)
            if event in CLOSING or event == "error":
                # Its last event is queued: a stream whose body never started
                # (its client left first) is not kept for a run that has ended.
                self.unsubscribe(subscription)
