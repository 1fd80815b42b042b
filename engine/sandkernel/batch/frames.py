"""The engine's side of the fork server's protocol: length-prefixed frames over pipes.

The codec is ``kernels/runtime/frames.py``, the very file the fork server
loads inside the sandbox (standard library only, no sandkernel import), so
the two ends cannot drift apart. It is loaded here from the shipped
``kernels/runtime`` folder and given types.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sandkernel._resources import data_dir

if TYPE_CHECKING:
    # Types only: a worker starts its sandbox without building the request models.
    from sandkernel.batch.models import RunRequest

#: A frame read: its header and its blobs.
Reply = tuple[dict[str, Any], list[bytes]]


def _load_codec() -> ModuleType:
    path = data_dir("kernels") / "runtime" / "frames.py"
    spec = importlib.util.spec_from_file_location("sandkernel.batch._codec", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"the frame codec {path} cannot be loaded (broken install?)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CODEC = _load_codec()

#: Bytes of the length that starts every frame.
LENGTH_SIZE: int = _CODEC.LENGTH_SIZE


def encode_frame(header: Mapping[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    """One frame of the fork server's protocol: length, header length, header, blobs."""
    frame: bytes = _CODEC.encode_frame(header, blobs)
    return frame


def frame_body_size(prefix: bytes | bytearray) -> int:
    """The length of a frame's body, from its first :data:`LENGTH_SIZE` bytes."""
    size: int = _CODEC.body_size(prefix)
    return size


def decode_frame_body(body: bytes) -> Reply:
    """Split a frame's body (what follows its length) into header and blobs."""
    header, blobs = _CODEC.decode_body(body)
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
