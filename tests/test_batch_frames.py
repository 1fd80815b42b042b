"""The frame codec: one file, kernels/runtime/frames.py, for the fork server and the engine."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

from sandkernel.batch import RunRequest, decode_frame_body, encode_frame, request_frame
from sandkernel.batch import frames as batch_frames

FORKSERVER = Path(__file__).resolve().parents[1] / "kernels" / "runtime" / "forkserver.py"


def forkserver_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sk_forkserver", FORKSERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_reads_exactly_one_frame_and_leaves_the_next_in_the_pipe() -> None:
    server = forkserver_module()
    first = request_frame(
        RunRequest(code="print(1)", stdin=b"in", files={"f": b"data"}, id=1),
        timeout_s=3,
        memory_mb=64,
    )
    second = encode_frame({"mode": "check"}, [b"next"])
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, first + second)
        header, blobs = server.read_frame(read_end)
        assert header["mode"] == "program" and header["files"] == ["f"]
        assert blobs == [b"print(1)", b"in", b"data"]
        # what the first request's child inherits: nothing of the second one
        assert os.read(read_end, 1 << 16) == second
    finally:
        os.close(read_end)
        os.close(write_end)
    body = encode_frame({"k": "v"}, [b"a", b"", b"bc"])[8:]
    assert decode_frame_body(body) == ({"k": "v", "sizes": [1, 0, 2]}, [b"a", b"", b"bc"])


def test_engine_and_server_share_one_frame_codec() -> None:
    server = forkserver_module()
    codec = FORKSERVER.with_name("frames.py")
    assert Path(server._frames.__file__) == codec
    assert Path(batch_frames._CODEC.__file__).resolve() == codec.resolve()
    read_end, write_end = os.pipe()
    try:
        server.write_frame(write_end, {"ready": True}, [b"out", b""])
        data = os.read(read_end, 1 << 16)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert batch_frames.frame_body_size(data) == len(data) - batch_frames.LENGTH_SIZE
    header, blobs = decode_frame_body(data[batch_frames.LENGTH_SIZE :])
    assert (header, blobs) == ({"ready": True, "sizes": [3, 0]}, [b"out", b""])
