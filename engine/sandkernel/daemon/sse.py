"""Server-Sent Events of a streamed execution, encoded by the daemon and decoded by the client.

``POST /v1/sessions/{id}/execute?stream=true`` (or with ``Accept:
text/event-stream``) answers ``text/event-stream``. Each output of the cell is
sent the moment the kernel publishes it::

    event: stdout
    data: {"msg_type": "stream", "content": {"name": "stdout", "text": "tick 0\\n"}}

    event: result
    data: {"status": "ok", "stdout": "tick 0\\n", ...}

Events, in order:

- ``stdout``, ``stderr``: a chunk of a stream;
- ``display``: ``display_data`` or ``update_display_data`` (a MIME bundle);
- ``execute_result``: the cell's value;
- ``traceback``: the cell raised (Jupyter's ``error`` message);
- ``clear_output``;
- then exactly one of ``result`` (the :class:`~sandkernel.results.ExecutionResult`,
  as the non-streaming answer) or ``error`` (``{"error": {"type", "message"}}``:
  the engine refused the cell, e.g. ``KernelDead``).

The data of an output event is the Jupyter iopub message reduced to
``msg_type`` and ``content``; it is what ``on_output`` receives. Lines starting
with ``:`` are keep-alive comments sent while a cell is silent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

#: iopub message types forwarded to the client, and the event name of each.
OUTPUT_EVENTS: dict[str, str] = {
    "display_data": "display",
    "update_display_data": "display",
    "execute_result": "execute_result",
    "error": "traceback",
    "clear_output": "clear_output",
}
RESULT = "result"
ERROR = "error"
KEEPALIVE = b": keep-alive\n\n"


def output_event(message: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The event name and data for an iopub message, or None if it is not forwarded."""
    msg_type = message.get("msg_type") or message.get("header", {}).get("msg_type")
    content = message.get("content") or {}
    if msg_type == "stream":
        name = "stderr" if content.get("name") == "stderr" else "stdout"
    elif isinstance(msg_type, str) and msg_type in OUTPUT_EVENTS:
        name = OUTPUT_EVENTS[msg_type]
    else:
        return None
    return name, {"msg_type": msg_type, "content": content}


#: Line breaks to ``str.splitlines`` (and so to httpx's and requests' line readers)
#: that JSON may leave raw in a string: escaped, a line of JSON stays one line to all.
_LINE_BREAKS_IN_JSON: Final = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_line(text: str) -> str:
    """JSON text (pydantic's, which keeps these raw) with no character any reader splits on."""
    return text.translate(_LINE_BREAKS_IN_JSON)


def encode(event: str, data: str) -> bytes:
    """One event; ``data`` is one line of JSON (json.dumps never emits newlines)."""
    return f"event: {event}\ndata: {json_line(data)}\n\n".encode()


def encode_json(event: str, data: Any) -> bytes:
    return encode(event, json.dumps(data, default=str, separators=(",", ":")))


@dataclass(frozen=True)
class Event:
    event: str
    data: str


class Decoder:
    """Turns the lines of an event stream into events (the subset the daemon sends)."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        """Feed one line (without its newline); returns an event when one is complete."""
        if line == "":
            if not self._data:
                self._event = "message"
                return None
            event = Event(self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None
