"""Jupyter messages on a WebSocket: the JSON protocol and ``v1.kernel.websocket.jupyter.org``.

Jupyter Server's two formats, both ways:

- the default ("legacy") protocol: a message is a JSON text frame with a
  ``channel`` field; a message with binary buffers is one binary frame: a
  count and offsets (32-bit big-endian), the JSON, then the buffers;
- ``v1.kernel.websocket.jupyter.org``: every message is one binary frame: a
  count and offsets (64-bit little-endian), the channel's name, then header,
  parent header, metadata and content as JSON, then the buffers.

Whatever a client sends is checked here before it goes near a kernel: a
frame that does not decode, or names a channel that is not Jupyter's, raises
:class:`~sandkernel.errors.BadInput`, which the connection answers without
closing.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, Final

from jupyter_client.jsonutil import json_default

from sandkernel.errors import BadInput

log = logging.getLogger(__name__)

V1_PROTOCOL: Final = "v1.kernel.websocket.jupyter.org"
CHANNELS: Final = frozenset({"shell", "iopub", "stdin", "control"})
_MAX_PARTS: Final = 1024  # header, parent, metadata, content and the buffers
_warned_no_channel = False


@dataclass
class WireMessage:
    """One Jupyter message and the channel it travels on."""

    channel: str
    header: dict[str, Any]
    parent_header: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def msg_id(self) -> str:
        return str(self.header.get("msg_id", ""))

    @property
    def parent_id(self) -> str:
        return str(self.parent_header.get("msg_id", ""))

    def parts(self) -> dict[str, Any]:
        """The message as jupyter_client's ``Session.send`` takes it."""
        return {
            "header": self.header,
            "parent_header": self.parent_header,
            "metadata": self.metadata,
            "content": self.content,
            "buffers": self.buffers,
        }


def _dumps(value: Any) -> str:
    """``value`` as JSON text that is valid UTF-8, as a WebSocket frame must be.

    A kernel's text may hold lone surrogates, which UTF-8 cannot encode: such
    text is written with ``\\u`` escapes (``"\\ud800"``), which is still JSON
    every client parses.
    """
    text = json.dumps(value, default=json_default, ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return json.dumps(value, default=json_default)
    return text


def _dumps_bytes(value: Any) -> bytes:
    try:
        return json.dumps(value, default=json_default, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(value, default=json_default).encode()


def _dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput(f"the message's {name} must be a JSON object")
    return value


def _message(channel: Any, parts: dict[str, Any], buffers: list[bytes]) -> WireMessage:
    if channel is None:
        # As Jupyter Server does, which some clients rely on.
        _log_no_channel()
        channel = "shell"
    if not isinstance(channel, str) or channel not in CHANNELS:
        shown = repr(channel)[:80]
        raise BadInput(f"unknown channel {shown}: use one of {', '.join(sorted(CHANNELS))}")
    header = _dict(parts.get("header"), "header")
    for key in ("msg_id", "msg_type"):
        if not isinstance(header.get(key), str) or not header[key]:
            raise BadInput(f"the message's header has no {key}")
    return WireMessage(
        channel=str(channel),
        header=header,
        parent_header=_dict(parts.get("parent_header") or {}, "parent_header"),
        metadata=_dict(parts.get("metadata") or {}, "metadata"),
        content=_dict(parts.get("content") or {}, "content"),
        buffers=buffers,
    )


def _log_no_channel() -> None:
    # Once as a warning: a client that never names the channel would flood the log.
    global _warned_no_channel  # noqa: PLW0603 - one flag for the process
    level = logging.DEBUG if _warned_no_channel else logging.WARNING
    _warned_no_channel = True
    log.log(level, "a client's message names no channel; it goes to shell")


def _json(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested deeper than Python parses
        raise BadInput(f"{what} is not JSON") from None


def decode(frame: str | bytes, protocol: str | None) -> WireMessage:
    """A message a client sent, in the connection's protocol.

    Raises:
        BadInput: the frame is not a Jupyter message (says why).
    """
    if protocol == V1_PROTOCOL:
        if isinstance(frame, str):
            raise BadInput(f"{V1_PROTOCOL} sends binary frames only")
        channel, parts = _split(frame, "<Q", 8)
        if len(parts) < 4:
            raise BadInput("a v1 frame needs header, parent header, metadata and content")
        names = ("header", "parent_header", "metadata", "content")
        loaded = {name: _json(part, name) for name, part in zip(names, parts, strict=False)}
        try:
            channel_name = channel.decode()
        except UnicodeDecodeError:
            raise BadInput("the channel is not text") from None
        return _message(channel_name, loaded, [bytes(p) for p in parts[4:]])
    if isinstance(frame, str):
        msg = _dict(_json(frame, "the frame"), "frame")
        return _message(msg.get("channel"), msg, [])
    first, rest = _split(frame, ">I", 4)
    msg = _dict(_json(first, "the frame's first part"), "frame")
    return _message(msg.get("channel"), msg, [bytes(p) for p in rest])


def _split(frame: bytes, fmt: str, width: int) -> tuple[bytes, list[bytes]]:
    """The parts of a binary frame: a count, that many offsets, then the parts."""
    if len(frame) < width:
        raise BadInput("the binary frame is too short")
    (count,) = struct.unpack(fmt, frame[:width])
    if not 1 <= count <= _MAX_PARTS or len(frame) < width * (count + 1):
        raise BadInput("the binary frame's part count does not fit the frame")
    offsets = [
        struct.unpack(fmt, frame[width * (i + 1) : width * (i + 2)])[0] for i in range(count)
    ]
    if fmt == ">I":
        # Jupyter's legacy binary format counts the JSON part; the last part runs to the end.
        offsets.append(len(frame))
    bounds = list(zip(offsets[:-1], offsets[1:], strict=True))
    if any(not (width * (count + 1) <= a <= b <= len(frame)) for a, b in bounds):
        raise BadInput("the binary frame's offsets are out of order or out of the frame")
    parts = [frame[a:b] for a, b in bounds]
    if not parts:
        raise BadInput("the binary frame has no parts")
    return parts[0], parts[1:]


def encode(msg: WireMessage, protocol: str | None) -> str | bytes:
    """A kernel's message as a frame of the connection's protocol."""
    if protocol == V1_PROTOCOL:
        parts = [
            _dumps_bytes(part)
            for part in (msg.header, msg.parent_header, msg.metadata, msg.content)
        ]
        parts += msg.buffers
        channel = msg.channel.encode()
        offsets = [8 * (1 + 1 + len(parts) + 1)]
        offsets.append(offsets[-1] + len(channel))
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        head = struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets)
        return b"".join([head, channel, *parts])
    # Jupyter Server's JSON messages repeat msg_id and msg_type at the top,
    # and clients read them there (Open WebUI's code execution does).
    body = {
        "header": msg.header,
        "msg_id": msg.msg_id,
        "msg_type": msg.msg_type,
        "parent_header": msg.parent_header,
        "metadata": msg.metadata,
        "content": msg.content,
        "channel": msg.channel,
    }
    if not msg.buffers:
        body["buffers"] = []
        return _dumps(body)
    parts = [_dumps_bytes(body), *msg.buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f">{len(parts) + 1}I", len(parts), *offsets) + b"".join(parts)
