"""Engine.run_once / run_many: one-shot programs on the batch path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from sandkernel import Engine
from sandkernel.batch import RunRequest

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
EngineFactory = Callable[..., Awaitable[Engine]]


async def test_run_once_behaves_like_python_file(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    r = await engine.run_once(
        "import sys\nprint(sys.stdin.read().upper(), sys.argv[1:], __name__)",
        stdin="echo", argv=["-v"],
    )  # fmt: skip
    assert (r.status, r.return_code) == ("ok", 0)
    assert r.stdout == "ECHO ['-v'] __main__\n"
    r = await engine.run_once("raise SystemExit(3)")
    assert (r.status, r.return_code) == ("error", 3)
    r = await engine.run_once("1/0")
    assert r.return_code == 1 and "ZeroDivisionError" in r.stderr
    r = await engine.run_once("while True: pass", timeout_s=1)
    assert r.status == "timeout"


async def test_run_once_files_in_and_out(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    r = await engine.run_once(
        "data = open('in/x.bin', 'rb').read(); open('out.bin', 'wb').write(data * 2)",
        files={"in/x.bin": b"\x00\xff"}, fetch_files=["out.bin"],
    )  # fmt: skip
    assert r.status == "ok" and [(f.path, f.content) for f in r.files] == [
        ("out.bin", b"\x00\xff\x00\xff")
    ]


async def test_a_runs_input_does_not_count_against_its_memory_limit(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    big = b"\x01" * (150 << 20)
    allocate = "x = bytearray(120 << 20)\n"
    plain = await engine.run_once(allocate, memory_mb=256)
    assert plain.status == "ok", plain
    # An input of 150 MiB and an allocation of 120 MiB fit a 256 MiB limit, as
    # for `python main.py < input`: the input is the program's only once it reads it.
    with_file = await engine.run_once(allocate, memory_mb=256, files={"data.bin": big})
    assert with_file.status == "ok", with_file.message
    with_stdin = await engine.run_once(
        allocate + "import sys\nprint(len(sys.stdin.buffer.read(1 << 20)), sys.stdin.read(3))",
        memory_mb=256,
        stdin=big,
    )
    assert with_stdin.status == "ok", with_stdin.stderr
    assert with_stdin.stdout == f"{1 << 20} \x01\x01\x01\n"
    assert with_stdin.peak_memory_bytes is not None and plain.peak_memory_bytes is not None
    assert with_stdin.peak_memory_bytes < plain.peak_memory_bytes + (20 << 20)


async def test_run_many_streams_tagged_results(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=2)
    requests = (RunRequest(code=f"print({n} * {n})", id=n) for n in range(20))
    results = {r.id: r.stdout.strip() async for r in engine.run_many(requests, concurrency=4)}
    assert results == {n: str(n * n) for n in range(20)}


async def test_fetch_files_as_sandboxfusion_fetches_them(engine_factory: EngineFactory) -> None:
    """Relative and writable absolute paths come back; the rest is missing; the run stands."""
    engine = await engine_factory(pool_size=0, batch_workers=1)
    r = await engine.run_once(
        "open('a.txt', 'wb').write(b'\\x00a')\n"
        "open('/tmp/b', 'wb').write(b'b' * 3)\n"
        "import os; os.symlink('/etc/passwd', '/tmp/link')\n"
        "print('ran')",
        fetch_files=[
            "a.txt",
            "/tmp/b",
            "/etc/passwd",
            "missing.txt",
            "/tmp/link",
            "../../etc/passwd",
        ],
    )
    assert (r.status, r.return_code, r.stdout) == ("ok", 0, "ran\n")
    assert [(f.path, f.content) for f in r.files] == [("a.txt", b"\x00a"), ("/tmp/b", b"bbb")]
    assert r.missing_files == ["/etc/passwd", "missing.txt", "/tmp/link", "../../etc/passwd"]
    # what one run left in /tmp is gone for the next
    again = await engine.run_once("print('next')", fetch_files=["/tmp/b"])
    assert again.files == [] and again.missing_files == ["/tmp/b"]
