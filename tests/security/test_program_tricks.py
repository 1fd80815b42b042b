"""What a program can do to its own runtime on the batch path, against `python prog.py`.

A reward pipeline scores a program by what its run reports. Each trick here
is a program that tampers with its own interpreter or process (rebinding
``os._exit``, replacing its streams, closing descriptors, forking, flooding,
forging the run's report) and is run twice in the same test: through the
public API (``Engine.run_once``, one fresh fork of a warm sandbox) and as a
plain ``python prog.py`` in a temporary folder with the same interpreter.
Each passes when the two verdicts agree (exit status, or both timed out, and
stdout and stderr where they are deterministic), no byte of the engine's own
protocol shows in the run's output, and the next 50 runs on the same workers
are correct.

The terminal summary ends with ``N tricks tried, N gave the plain-python
verdict`` (counted in ``conftest.py``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandkernel.batch import RunRequest, RunResult
from sandkernel.engine import Engine
from tests.security.conftest import EngineBox

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

#: What the fork server and engine exchange, which a run's output must never carry.
PROTOCOL_MARKERS = ('"restart"', '"timed_out"', '"verdict"', "forkserver.py", "\x00", "sandkernel:")

#: The header reward pipelines prepend so that a program cannot leave before its asserts.
ANTI_EXIT_HEADER = "exit = None\nimport os, sys\nos._exit = None\nsys.exit = None\n"

TIMEOUT_S = 6.0


@dataclass(frozen=True)
class Trick:
    name: str
    code: str
    #: compare stdout as well as the exit status (False where it differs by design,
    #: such as output that sandkernel caps)
    same_stdout: bool = True
    #: plain python's stdout goes to /dev/null (too big to hold)
    discard_plain_stdout: bool = False
    #: compare stderr too (where it is deterministic)
    same_stderr: bool = False
    #: plain python runs as a shell's child, as a run is its fork server's: what
    #: it does to its parent lands on that shell, not on the test's process
    under_a_shell: bool = False


def _trick(name: str, code: str, **kwargs: bool) -> Trick:
    return Trick(name, textwrap.dedent(code).lstrip("\n"), **kwargs)


TRICKS = [
    _trick("anti_exit_header", ANTI_EXIT_HEADER + "print('hello')\n"),
    _trick(
        "rebind_os_exit_then_exit",
        """
        import os, sys
        real = os._exit
        os._exit = None
        sys.exit = lambda *a: None
        print('before')
        raise SystemExit(3)
        """,
    ),
    _trick(
        "rebind_builtins",
        """
        import builtins, sys
        for name in ('exit', 'quit', 'print', 'isinstance', 'len', 'str', 'int', 'repr',
                     'open', '__import__', 'BaseException', 'Exception', 'getattr'):
            setattr(builtins, name, None)
        sys.stdout.write('still here\\n')
        """,
    ),
    _trick(
        "rebind_os_write_and_kill",
        """
        import os, signal
        os.write = os.kill = os.getpid = os.dup2 = os.close = None
        signal.signal = None
        print('ok')
        """,
    ),
    _trick(
        "stdout_that_raises",
        """
        import sys
        class Broken:
            def write(self, s): raise RuntimeError('no write')
            def flush(self): raise RuntimeError('no flush')
        print('buffered before')
        sys.stdout = Broken()
        """,
        same_stdout=False,
    ),
    _trick(
        "stderr_that_raises_then_error",
        """
        import sys
        class Broken:
            def write(self, s): raise RuntimeError('no write')
            def flush(self): raise RuntimeError('no flush')
        sys.stderr = Broken()
        print('out')
        1 / 0
        """,
    ),
    _trick(
        "excepthook_that_raises",
        """
        import sys
        def hook(*args): raise RuntimeError('hook')
        sys.excepthook = hook
        print('out', flush=True)
        raise ValueError('x')
        """,
    ),
    _trick(
        "close_fds_0_to_3",
        """
        import os
        print('first', flush=True)
        for fd in range(4):
            try:
                os.close(fd)
            except OSError:
                pass
        """,
    ),
    _trick(
        "dup2_over_fds_0_to_2",
        """
        import os
        print('visible', flush=True)
        r, w = os.pipe()
        os.dup2(r, 0)
        os.dup2(w, 1)
        os.dup2(w, 2)
        print('into the pipe')
        """,
    ),
    _trick(
        "ignore_sigterm_and_sigint",
        """
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        print('ignoring')
        """,
    ),
    _trick(
        "keyboard_interrupt_with_kill_rebound",
        """
        import os, signal
        os.kill = None
        signal.signal = None
        raise KeyboardInterrupt
        """,
    ),
    _trick(
        "lower_and_raise_rlimits",
        """
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))
        stack_hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
        resource.setrlimit(resource.RLIMIT_STACK, (1 << 20, stack_hard))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        print('limits changed')
        """,
    ),
    _trick(
        # Its parent is its fork server (PID 1 of the sandbox), of the same uid.
        "lower_the_parents_open_files_limit_for_good",
        """
        import os, resource, time
        resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))
        print('lowered', flush=True)
        time.sleep(0.2)
        print('still running')
        """,
        under_a_shell=True,
    ),
    _trick(
        "lower_the_parents_open_files_soft_limit",
        """
        import os, resource, time
        hard = resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE)[1]
        resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, hard))
        print('lowered', flush=True)
        time.sleep(0.2)
        print('still running')
        """,
        under_a_shell=True,
    ),
    _trick(
        "close_stdout_then_print",
        """
        import os
        print('a', flush=True)
        os.close(1)
        print('b')
        """,
        same_stderr=True,
    ),
    _trick(
        "address_space_lowered_then_memory_error",
        """
        import resource
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (300 << 20, hard))
        print('allocating', flush=True)
        block = bytearray(1 << 30)
        """,
    ),
    _trick(
        "non_daemon_thread_alive_at_exit",
        """
        import threading, time
        def late():
            time.sleep(0.3)
            print('thread done', flush=True)
        threading.Thread(target=late).start()
        print('main done', flush=True)
        """,
    ),
    _trick(
        "atexit_that_raises",
        """
        import atexit
        def boom(): raise RuntimeError('at exit')
        atexit.register(boom)
        atexit.register(print, 'atexit ran')
        print('main')
        """,
    ),
    _trick(
        "atexit_that_hangs",
        """
        import atexit, time
        atexit.register(time.sleep, 3600)
        print('main', flush=True)
        """,
    ),
    _trick(
        "atexit_that_exits",
        """
        import atexit, sys
        atexit.register(sys.exit, 7)
        print('main')
        """,
    ),
    _trick(
        "gc_disable_and_freeze",
        """
        import gc
        gc.disable()
        gc.freeze()
        cycle = []
        cycle.append(cycle)
        print('frozen', gc.isenabled())
        """,
    ),
    _trick(
        "delete_os_and_sys_modules",
        """
        import sys
        for name in ('os', 'signal', 'atexit', 'threading', 'io', 'resource', 'posix'):
            sys.modules.pop(name, None)
        print('gone')
        """,
    ),
    _trick(
        "fork_bomb_in_one_run",
        """
        import os, sys, time
        sys.stdout.flush()
        children = 0
        for _ in range(400):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(1)
                os._exit(0)
            children += 1
        print('forked')
        """,
    ),
    _trick(
        "one_gigabyte_to_stdout",
        """
        import sys
        chunk = b'x' * (1 << 20)
        for _ in range(1024):
            sys.stdout.buffer.write(chunk)
        """,
        same_stdout=False,
        discard_plain_stdout=True,
    ),
    _trick(
        "forge_the_status_report_from_own_memory",
        """
        import gc, os, sys
        # every 16-byte secret reachable from this process: frames, closures, objects
        found = set()
        frame = sys._getframe()
        while frame is not None:
            for value in list(frame.f_locals.values()):
                if isinstance(value, bytes) and len(value) == 16:
                    found.add(value)
                for cell in getattr(value, '__closure__', None) or ():
                    content = cell.cell_contents
                    if isinstance(content, bytes) and len(content) == 16:
                        found.add(content)
            frame = frame.f_back
        for obj in gc.get_objects():
            for cell in getattr(obj, '__closure__', None) or ():
                try:
                    content = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(content, bytes) and len(content) == 16:
                    found.add(content)
        for tag in found:
            for fd in range(3, 64):
                for forged in (b'M', b'-passed', b'\\x00' * 8):
                    try:
                        os.write(fd, tag + forged)
                    except OSError:
                        pass
        print('forged')
        """,
    ),
]


# ---------------------------------------------------------------------------
# the two runs


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "timeout" or the exit status (negative: the signal)
    stdout: str
    stderr: str = ""


def plain_python(
    code: str, workdir: Path, *, discard_stdout: bool, under_a_shell: bool = False
) -> Verdict:
    """``python prog.py`` in ``workdir``, with the interpreter the sandbox runs."""
    workdir.mkdir()
    (workdir / "prog.py").write_text(code)
    command = [sys.executable, "prog.py"]
    if under_a_shell:
        # Not `exec`ed by the shell: it stays the program's parent, and exits with its status.
        command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', *command]
    try:
        proc = subprocess.run(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if discard_stdout else subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=TIMEOUT_S,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return Verdict("timeout", (exc.stdout or b"").decode("utf-8", "replace"))
    stdout = "" if proc.stdout is None else proc.stdout.decode("utf-8", "replace")
    return Verdict(str(proc.returncode), stdout, proc.stderr.decode("utf-8", "replace"))


def ours(result: RunResult) -> Verdict:
    outcome = "timeout" if result.status == "timeout" else str(result.return_code)
    return Verdict(outcome, result.stdout, result.stderr)


@pytest.fixture(scope="module")
async def batch_engine(engines: EngineBox) -> AsyncIterator[Engine]:
    yield await engines.get("tricks", pool_size=0, batch_workers=2)


@pytest.mark.parametrize("trick", TRICKS, ids=[t.name for t in TRICKS])
async def test_trick_gets_the_plain_python_verdict(
    trick: Trick, batch_engine: Engine, tmp_path: Path
) -> None:
    expected = plain_python(
        trick.code,
        tmp_path / "plain",
        discard_stdout=trick.discard_plain_stdout,
        under_a_shell=trick.under_a_shell,
    )
    result = await batch_engine.run_once(trick.code, timeout_s=TIMEOUT_S)
    got = ours(result)
    assert got.outcome == expected.outcome, (result.status, result.message, result.stderr[-2000:])
    assert result.attempts == 1, result.message
    if trick.same_stdout:
        assert got.stdout == expected.stdout
    if trick.same_stderr:
        assert got.stderr == expected.stderr
    for marker in PROTOCOL_MARKERS:
        assert marker not in result.stdout, f"protocol bytes in stdout: {marker!r}"
        assert marker not in result.stderr, f"protocol bytes in stderr: {marker!r}"
    # the workers the trick ran on are as good as new
    requests = [RunRequest(code=f"print({n} * {n})", id=n) for n in range(50)]
    after = {r.id: r async for r in batch_engine.run_many(requests, concurrency=2)}
    assert {n: (r.status, r.stdout) for n, r in after.items()} == {
        n: ("ok", f"{n * n}\n") for n in range(50)
    }


async def test_a_forged_report_is_not_the_verdict(batch_engine: Engine) -> None:
    """The forger finds no channel: a MemoryError or a verdict it claims is not believed."""
    (forger,) = [t for t in TRICKS if t.name == "forge_the_status_report_from_own_memory"]
    result = await batch_engine.run_once(forger.code, timeout_s=TIMEOUT_S)
    assert (result.status, result.return_code, result.stdout) == ("ok", 0, "forged\n")
    assert result.verdict is None and result.message is None


async def test_anti_exit_header_keeps_exit_statuses(batch_engine: Engine) -> None:
    """With the header, a program's own failures still fail and successes still pass."""
    cases = {
        "print('hello')": (0, "hello\n"),
        "assert 1 + 1 == 3": (1, ""),
        "raise SystemExit(4)": (4, ""),
        "import sys; sys.stdout.write('partial'); 1/0": (1, "partial"),
    }
    for body, (code, stdout) in cases.items():
        result = await batch_engine.run_once(ANTI_EXIT_HEADER + body)
        assert (result.return_code, result.stdout) == (code, stdout), body
