"""The engine's message session: jupyter_client's checks, its header strings kept as sent."""

from __future__ import annotations

import pytest
from jupyter_client.session import Session

from sandkernel.messages import MessageSession

KEY = b"k" * 32


def _frames(sender: Session) -> list[bytes]:
    msg = sender.msg(
        "stream", {"name": "stdout", "text": "hi"}, parent=sender.msg("execute_request")
    )
    return sender.serialize(msg)[1:]  # without the delimiter


def test_a_message_reads_as_jupyter_clients_but_with_its_dates_as_sent() -> None:
    sender = Session(key=KEY)
    frames = _frames(sender)
    ours = MessageSession(key=KEY).deserialize(list(frames))
    stock = Session(key=KEY).deserialize(list(frames))
    assert isinstance(ours["header"]["date"], str) and ours["header"]["date"].startswith("20")
    assert (
        stock["header"]["date"].isoformat().replace("+00:00", "Z")[:19]
        == (ours["header"]["date"][:19])
    )
    for part in ("msg_id", "msg_type", "content", "metadata"):
        assert ours[part] == stock[part]
    assert ours["parent_header"]["msg_id"] == stock["parent_header"]["msg_id"]
    assert ours["buffers"] == stock["buffers"] == []


def test_unsigned_forged_replayed_and_short_messages_are_refused() -> None:
    frames = _frames(Session(key=KEY))
    reader = MessageSession(key=KEY)
    with pytest.raises(ValueError, match="Unsigned"):
        reader.deserialize([b"", *frames[1:]])
    forged = [b"0" * 64, *frames[1:4], b'{"name": "stdout", "text": "no"}']
    with pytest.raises(ValueError, match="Invalid Signature"):
        reader.deserialize(forged)
    reader.deserialize(list(frames))
    with pytest.raises(ValueError, match="Duplicate Signature"):
        reader.deserialize(list(frames))
    with pytest.raises(TypeError, match="at least 5"):
        MessageSession(key=b"").deserialize([b"", frames[1], frames[2]])
