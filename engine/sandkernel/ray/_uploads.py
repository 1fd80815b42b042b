"""Reading an upload's bytes on the driver's side, before they travel to a node."""

from __future__ import annotations

import asyncio
import os

from sandkernel.errors import FileRejected
from sandkernel.session import UploadSource


async def read_upload(source: UploadSource, name: str | None, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and name of an upload, read on this side (at most ``max_bytes``)."""
    if isinstance(source, bytes):
        if name is None:
            raise ValueError("uploading bytes needs a name (with its extension)")
        data = source
    elif isinstance(source, str | os.PathLike):
        name = name or os.path.basename(os.fspath(source))
        data = await asyncio.to_thread(_read_path, os.fspath(source), max_bytes)
    else:
        name = name or os.path.basename(str(getattr(source, "name", "") or "")) or None
        if name is None:
            raise ValueError("uploading a stream needs a name (with its extension)")
        data = await asyncio.to_thread(source.read, max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRejected(
            f"upload rejected: {name} is larger than {max_bytes} bytes (max_upload_bytes)"
        )
    return data, name


def _read_path(path: str, max_bytes: int) -> bytes:
    # As the local store: a symlink is refused, not followed.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)
