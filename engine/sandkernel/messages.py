"""The engine's ``Session`` for its kernels' Jupyter messages: jupyter_client's, with less work."""

from __future__ import annotations

import hmac
from typing import Any

from jupyter_client.adapter import adapt
from jupyter_client.session import Session


class MessageSession(Session):
    """jupyter_client's ``Session``, whose messages keep their header strings as sent.

    jupyter_client matches every string in each message's header and parent
    header against a date pattern and parses the dates it finds: a fifth of
    the engine's CPU for a ``1+1`` cell here, five messages a cell, for
    values the engine never reads. The checks are jupyter_client's: the
    signature, a replayed one, at least five frames.
    """

    def deserialize(self, msg_list: Any, content: bool = True, copy: bool = True) -> dict[str, Any]:
        if not copy:
            msg_list = [bytes(m.bytes) for m in msg_list[:5]] + list(msg_list[5:])
        if self.auth is not None:
            signature = msg_list[0]
            if not signature:
                raise ValueError("Unsigned Message")
            if signature in self.digest_history:
                raise ValueError(f"Duplicate Signature: {signature!r}")
            if content:
                self._add_digest(signature)
            if not hmac.compare_digest(signature, self.sign(msg_list[1:5])):
                raise ValueError(f"Invalid Signature: {signature!r}")
        if len(msg_list) < 5:
            raise TypeError("malformed message, must have at least 5 elements")
        header = self.unpack(msg_list[1])
        buffers = [memoryview(b if copy else bytes(b.bytes)) for b in msg_list[5:]]
        message = {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": self.unpack(msg_list[2]),
            "metadata": self.unpack(msg_list[3]),
            "content": self.unpack(msg_list[4]) if content else msg_list[4],
            "buffers": buffers,
        }
        result: dict[str, Any] = adapt(message)
        return result
