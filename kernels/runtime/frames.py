"""The batch path's frame codec: the one both ends use, the fork server and the engine.

Engine and fork server speak length-prefixed frames over the server's stdin
and stdout. Each frame is::

    8 bytes   little-endian length N of the rest of the frame
    4 bytes   little-endian length H of the header
    H bytes   header (JSON object)
    N-4-H     blobs, concatenated, sizes listed in the header's "sizes"

Python standard library only and no sandkernel import, like the fork server:
the server loads this file from its own folder, inside the sandbox and in
whatever runtime the sandbox uses; the engine loads the same file from the
shipped ``kernels/runtime`` folder (``sandkernel.batch.frames``).
"""

import json
import os

#: Bytes of the length that starts every frame.
LENGTH_SIZE = 8
_HEADER_LENGTH_SIZE = 4
_READ_MAX = 1 << 20


def encode_frame(header, blobs=()):
    """One frame of ``header`` (a dict; its "sizes" are set here) and ``blobs`` (bytes)."""
    encoded = json.dumps(dict(header, sizes=[len(b) for b in blobs])).encode()
    size = _HEADER_LENGTH_SIZE + len(encoded) + sum(len(b) for b in blobs)
    return b"".join(
        [
            size.to_bytes(LENGTH_SIZE, "little"),
            len(encoded).to_bytes(_HEADER_LENGTH_SIZE, "little"),
            encoded,
            *blobs,
        ]
    )


def body_size(prefix):
    """The length of a frame's body, read from its first :data:`LENGTH_SIZE` bytes."""
    return int.from_bytes(prefix[:LENGTH_SIZE], "little")


def decode_body(body):
    """A frame's body (what follows its length) as ``(header, blobs)``."""
    header_size = int.from_bytes(body[:_HEADER_LENGTH_SIZE], "little")
    offset = _HEADER_LENGTH_SIZE + header_size
    header = json.loads(body[_HEADER_LENGTH_SIZE:offset])
    blobs = []
    for size in header.get("sizes", ()):
        blobs.append(body[offset : offset + size])
        offset += size
    return header, blobs


def read_exact(fd, size):
    """Exactly ``size`` bytes from the blocking descriptor ``fd``; EOFError if it ends first."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, _READ_MAX))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd):
    """One frame from the blocking descriptor ``fd``, as ``(header, blobs)``.

    Reads exactly the frame's bytes, never more: no buffer reads ahead, so
    the next frame stays in the pipe.
    """
    return decode_body(read_exact(fd, body_size(read_exact(fd, LENGTH_SIZE))))


def write_frame(fd, header, blobs=()):
    """Write one frame, whole, to the blocking descriptor ``fd``."""
    view = memoryview(encode_frame(header, blobs))
    while view:
        view = view[os.write(fd, view) :]
