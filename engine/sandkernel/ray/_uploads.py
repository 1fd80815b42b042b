"""Reading an upload's bytes on the driver's side, before they travel to a node.

A source is taken as the local store takes it (:meth:`FileStore.add_upload`):
bytes-like content, the path of a regular file (a link, folder, FIFO or
device is refused, never followed or waited on), or a binary stream read to
its end. What the store refuses is refused here with the same class.
"""

from __future__ import annotations

import asyncio
import os

from sandkernel.errors import BadInput, FileTooLarge
from sandkernel.files import UploadSource
from sandkernel.files._common import CHUNK_BYTES, open_regular
from sandkernel.files.store import TEXT_STREAM_REFUSED, Readable, upload_name


async def read_upload(source: UploadSource, name: str | None, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and name of an upload, read on this side (at most ``max_bytes``).

    Raises:
        FileRejected: a path that is not a regular file (or cannot be read).
        FileTooLarge: more than ``max_bytes``.
        BadInput: a text stream.
        ValueError: no name was given and none can be derived.
    """
    name = upload_name(source, name)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | os.PathLike):
        data = await asyncio.to_thread(_read_path, source, max_bytes)
    else:
        data = await asyncio.to_thread(_read_to_end, source, max_bytes)
    if len(data) > max_bytes:
        raise FileTooLarge(
            f"upload rejected: {name!r} is larger than {max_bytes} bytes (max_upload_bytes)"
        )
    return data, name


def _read_path(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    with open_regular(path) as f:
        return _read_to_end(f, max_bytes)


def _read_to_end(stream: Readable, max_bytes: int) -> bytes:
    """What ``stream`` holds, to its end or just past ``max_bytes``, however short its reads."""
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        chunk = stream.read(CHUNK_BYTES)
        if not chunk:
            break
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise BadInput(TEXT_STREAM_REFUSED)
        chunks.append(bytes(chunk))
        size += len(chunk)
    return b"".join(chunks)
