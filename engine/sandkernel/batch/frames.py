"""The engine's side of the fork server's protocol: length-prefixed frames over pipes.

Each frame is::

    8 bytes   little-endian length N of the rest of the frame
    4 bytes   little-endian length H of the header
    H bytes   header (JSON object)
    N-4-H     blobs, concatenated, sizes listed in the header's "sizes"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sandkernel.batch.models import RunRequest

#: A frame read: its header and its blobs.
Reply = tuple[dict[str, Any], list[bytes]]


def encode_frame(header: dict[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    """One frame of the fork server's protocol: length, header length, header, blobs."""
    encoded = json.dumps(dict(header, sizes=[len(b) for b in blobs])).encode()
    size = 4 + len(encoded) + sum(len(b) for b in blobs)
    return b"".join(
        [size.to_bytes(8, "little"), len(encoded).to_bytes(4, "little"), encoded, *blobs]
    )


def decode_frame_body(body: bytes) -> Reply:
    """Split a frame's body (what follows its 8-byte length) into header and blobs."""
    header_size = int.from_bytes(body[:4], "little")
    header: dict[str, Any] = json.loads(body[4 : 4 + header_size])
    blobs: list[bytes] = []
    offset = 4 + header_size
    for size in header.get("sizes", ()):
        blobs.append(body[offset : offset + size])
        offset += size
    return header, blobs


def request_frame(request: RunRequest, *, timeout_s: float, memory_mb: int | None) -> bytes:
    """The frame that asks the server to run ``request`` with these limits."""
    header = {
        "mode": request.mode,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "argv": request.argv,
        "filename": request.filename,
        "files": list(request.files),
        "fetch": request.fetch_files,
    }
    blobs = [
        request.code.encode("utf-8", "surrogatepass"),
        request.stdin,
        *request.files.values(),
    ]
    return encode_frame(header, blobs)
