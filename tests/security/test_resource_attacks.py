"""Resource attacks: bombs, floods, fills and spins, each against its limit.

Every attack runs in its own session of an engine whose policy has small
limits (:data:`~tests.security.conftest.TIGHT`), while a bystander session
of the same engine keeps answering: each test asserts that the limit held,
that the result says what happened, and that the neighbour's latency stayed
bounded.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandkernel import leaks
from sandkernel.engine import Engine
from sandkernel.errors import KernelStartFailed
from sandkernel.kernel import SandboxedKernel
from sandkernel.session import Session
from tests.conftest import runtime_root
from tests.security._support import ANNOUNCE, latency_s, run, run_json, while_running
from tests.security.conftest import TIGHT, EngineBox, KernelBox

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

#: How long a neighbour's trivial cell may take while an attack runs (2 busy cores).
NEIGHBOUR_BOUND_S = 3.0
#: Every process of it forks for ever; each fork that fails is tried again.
FORK_BOMB = (
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
)


@pytest.fixture
async def tight(engines: EngineBox) -> Engine:
    return await engines.get("tight", policy=TIGHT, pool_size=2, max_produced_files=20)


@pytest.fixture
async def bystander(tight: Engine) -> AsyncIterator[Session]:
    session = await tight.session("bystander", if_expired="new")
    await latency_s(session)  # warm
    yield session


@pytest.fixture
async def attacker(tight: Engine) -> AsyncIterator[Session]:
    session = await tight.session()
    yield session
    await session.close()


def _bounded(latencies: list[float]) -> None:
    assert latencies, "the neighbour was never probed"
    assert max(latencies) < NEIGHBOUR_BOUND_S, f"neighbour latencies {latencies}"


def _attack(code: str) -> str:
    return ANNOUNCE + textwrap.dedent(code)


# --------------------------------------------------------------------------- processes


async def test_fork_bomb_is_capped_by_pids_max(attacker: Session, bystander: Session) -> None:
    code = _attack(f"""
        import os, subprocess, sys, time
        bomb = subprocess.Popen([sys.executable, '-c', {FORK_BOMB!r}], start_new_session=True)
        peak, end = 0, time.monotonic() + 3
        while time.monotonic() < end:
            peak = max(peak, len([p for p in os.listdir('/proc') if p.isdigit()]))
            time.sleep(0.05)
        os.killpg(bomb.pid, 9)
        bomb.wait()  # the group lives as long as one member, even a zombie: reap ours
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                os.killpg(bomb.pid, 9)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        print(peak)
    """)
    r, latencies = await while_running(attacker, code, bystander, timeout_s=30)
    assert r.status == "ok", r
    assert int(r.stdout.split()[-1]) <= TIGHT.pids_max
    assert "process limit" in (r.message or "")
    _bounded(latencies)
    assert (await attacker.run("1 + 1")).text == "2"


async def test_thread_bomb_is_capped_by_pids_max(attacker: Session, bystander: Session) -> None:
    result = await run_json(
        attacker,
        """
        import threading
        release = threading.Event()
        threads, error = [], None
        try:
            while len(threads) < 10_000:
                t = threading.Thread(target=release.wait)
                t.start()
                threads.append(t)
        except RuntimeError as e:
            error = str(e)
        release.set()
        for t in threads:
            t.join()
        result = {'threads': len(threads), 'error': error}
        """,
    )
    assert result["threads"] < TIGHT.pids_max and "can't start new thread" in result["error"]
    _bounded([await latency_s(bystander)])
    assert (await attacker.run("1 + 1")).text == "2"


async def test_orphaned_zombies_are_reaped_inside_and_nothing_outlives_the_session(
    tight: Engine, bystander: Session
) -> None:
    session = await tight.session()
    assert session.kernel is not None
    kernel_id = session.kernel.kernel_id
    result = await run_json(
        session,
        """
        import subprocess, sys, time
        children = []
        for _ in range(10):  # 10 children and 10 grandchildren fit in pids_max beside the kernel
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:
                    time.sleep(0.2)
                os._exit(0)
            children.append(pid)
        for pid in children:  # the kernel reaps its own children...
            os.waitpid(pid, 0)
        # ...and their children, orphans now, must be reaped by the sandbox's init.
        # A daemon that ignores every polite signal, in its own session.
        subprocess.Popen([sys.executable, '-c', 'import signal, time\\n'
                          'for s in (1, 2, 15): signal.signal(s, signal.SIG_IGN)\\n'
                          'time.sleep(600)'], start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            states = {}
            for p in [p for p in os.listdir('/proc') if p.isdigit()]:
                try:
                    states[p] = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0]
                except OSError:
                    pass
            if 'Z' not in states.values():
                break
            time.sleep(0.05)
        result = {'zombies': sorted(p for p, s in states.items() if s == 'Z')}
        """,
    )
    assert result == {"zombies": []}
    live = leaks.snapshot(roots=[runtime_root()], owner_prefix=kernel_id)
    assert any("time.sleep(600)" in cmd for cmd in live.processes.values())
    await session.close()
    gone = leaks.snapshot(roots=[runtime_root()], owner_prefix=kernel_id)
    assert not (gone.processes or gone.zombies or gone.cgroups or gone.mounts), gone
    assert not gone.runtime_dirs, gone
    _bounded([await latency_s(bystander)])


async def test_realtime_scheduling_and_higher_priority_are_refused(attacker: Session) -> None:
    result = await run_json(
        attacker,
        """
        IOPRIO_CLASS_RT = 1
        result = {
            'fifo': attempt(lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))),
            'rr': attempt(lambda: os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))),
            'nice': attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, -5)),
            'ioprio_rt': call(251, 1, 0, IOPRIO_CLASS_RT << 13),
        }
        """,
    )
    assert "allowed" not in result.values(), result


# --------------------------------------------------------------------------- memory


async def test_memory_bomb_is_an_oom_and_the_neighbour_lives(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        hoard = []
        while True:
            hoard.append(bytearray(8 << 20))
    """)
    r, latencies = await while_running(attacker, code, bystander, timeout_s=30)
    assert r.status == "oom" and not r.kernel_alive, r
    assert "memory_mb" in (r.message or "")
    assert r.usage.peak_memory_bytes is not None
    assert r.usage.peak_memory_bytes <= (TIGHT.memory_mb + 8) << 20
    _bounded(latencies)
    again = await attacker.run("1 + 1", restart=True)
    assert again.text == "2" and again.state_lost


async def test_sparse_terabyte_mapping_touched_page_by_page_is_an_oom(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        import mmap
        NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
        m = mmap.mmap(-1, 1 << 40, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)
        for offset in range(0, 1 << 40, 4096):
            m[offset] = 1
    """)
    r, latencies = await while_running(attacker, code, bystander, timeout_s=30)
    assert r.status == "oom" and not r.kernel_alive, r
    assert r.usage.peak_memory_bytes is not None
    assert r.usage.peak_memory_bytes <= (TIGHT.memory_mb + 8) << 20
    _bounded(latencies)


# --------------------------------------------------------------------------- CPU


async def test_cpu_spin_in_many_processes_gets_the_policys_share(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        import subprocess, sys, time
        spinners = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(4)]
        time.sleep(4)
        for p in spinners:
            p.kill()
            p.wait()
    """)
    r, latencies = await while_running(attacker, code, bystander, timeout_s=30)
    assert r.status == "ok", r
    assert r.usage.cpu_ms is not None
    # The quota is policy.cpus of CPU time per wall second, whatever the processes.
    assert r.usage.cpu_ms <= TIGHT.cpus * r.usage.wall_ms * 1.25 + 200, r.usage
    _bounded(latencies)


async def test_regex_backtracking_that_ignores_interrupts_is_killed_at_the_timeout(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        import re
        re.match(r'(a+)+$', 'a' * 64 + 'b')
    """)
    started = time.monotonic()
    r, latencies = await while_running(attacker, code, bystander, timeout_s=4)
    elapsed = time.monotonic() - started
    assert r.status == "timeout" and not r.kernel_alive and r.state_lost, r
    assert "killed" in (r.message or "")
    assert elapsed < 4 + TIGHT.interrupt_grace_s + 5
    _bounded(latencies)


async def test_c_call_with_sigint_blocked_is_killed_at_the_timeout(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        import ctypes, signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ctypes.CDLL(None).sleep(600)
    """)
    r, latencies = await while_running(attacker, code, bystander, timeout_s=4)
    assert r.status == "timeout" and not r.kernel_alive, r
    _bounded(latencies)


# --------------------------------------------------------------------------- filesystems


async def test_workspace_tmp_and_shm_fills_stop_at_their_sizes(attacker: Session) -> None:
    result = await run_json(
        attacker,
        """
        def fill(folder):
            written, n = 0, 0
            try:
                while written < (1 << 30):
                    with open(f'{folder}/fill{n}', 'wb') as f:
                        for _ in range(4):
                            written += f.write(b'x' * (1 << 20))
                            f.flush()
                    n += 1
            except OSError as e:
                error = _name(e.errno)
            for i in range(n + 1):
                try:
                    os.remove(f'{folder}/fill{i}')
                except FileNotFoundError:
                    pass
            return {'error': error, 'mb': written >> 20}
        result = {d: fill(d) for d in ('/mnt/data', '/tmp', '/dev/shm')}
        """,
    )
    sizes = {"/mnt/data": TIGHT.workspace_mb, "/tmp": TIGHT.tmp_mb, "/dev/shm": TIGHT.shm_mb}
    for folder, outcome in result.items():
        assert outcome["error"] == "ENOSPC", (folder, outcome)
        assert outcome["mb"] <= sizes[folder], (folder, outcome)


async def test_inode_fills_stop_at_their_caps(attacker: Session) -> None:
    result = await run_json(
        attacker,
        """
        def many(folder):
            made = 0
            try:
                while made < 1_000_000:
                    os.mkdir(f'{folder}/d{made}')
                    made += 1
            except OSError as e:
                error = _name(e.errno)
            for i in range(made):
                os.rmdir(f'{folder}/d{i}')
            return {'error': error, 'made': made}
        result = {d: many(d) for d in ('/mnt/data', '/tmp', '/dev/shm')}
        """,
        timeout_s=60,
    )
    caps = {
        "/mnt/data": TIGHT.workspace_inodes,
        "/tmp": TIGHT.tmp_mb * 256,
        "/dev/shm": TIGHT.shm_mb * 256,
    }
    for folder, outcome in result.items():
        assert outcome["error"] == "ENOSPC", (folder, outcome)
        assert outcome["made"] <= caps[folder], (folder, outcome)


async def test_file_size_limit_is_enforced(attacker: Session) -> None:
    result = await run_json(
        attacker,
        """
        def big():
            with open('/tmp/big', 'wb') as f:
                for _ in range(64):
                    f.write(b'x' * (1 << 20))
                    f.flush()
        def sparse():
            with open('/mnt/data/sparse', 'wb') as f:
                f.truncate(1 << 40)
        result = {'big': attempt(big), 'sparse': attempt(sparse),
                  'size_mb': os.path.getsize('/tmp/big') >> 20}
        os.remove('/tmp/big')
        if os.path.exists('/mnt/data/sparse'):
            os.remove('/mnt/data/sparse')
        """,
    )
    assert result == {"big": "EFBIG", "sparse": "EFBIG", "size_mb": TIGHT.file_size_mb}


async def test_fd_exhaustion_stops_at_nofile_and_the_kernel_recovers(
    attacker: Session, bystander: Session
) -> None:
    result = await run_json(
        attacker,
        """
        held, error = [], None
        try:
            while len(held) < 100_000:
                held.append(os.open('/dev/null', os.O_RDONLY))
        except OSError as e:
            error = _name(e.errno)
        for fd in held:
            os.close(fd)
        result = {'error': error, 'opened': len(held)}
        """,
    )
    assert result["error"] == "EMFILE" and result["opened"] < TIGHT.nofile
    assert (await attacker.run("1 + 1")).text == "2"
    _bounded([await latency_s(bystander)])


# --------------------------------------------------------------------------- output


def _return_freed_memory() -> None:
    """Collect garbage, then have glibc give every arena's free pages back to the system."""
    gc.collect()
    libc = ctypes.CDLL(None)  # the C library this process has loaded
    libc.malloc_trim(0)


async def test_200_mb_stdout_flood_keeps_head_and_tail_within_the_cap(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        import sys
        print('HEAD-MARK')
        line = 'y' * 1023 + '\\n'
        for _ in range(200 * 1024):
            sys.stdout.write(line)
        print('TAIL-MARK')
    """)
    before = leaks.snapshot(roots=[runtime_root()])
    r, latencies = await while_running(attacker, code, bystander, timeout_s=60)
    assert r.status == "ok" and r.stdout_truncated, r.status
    assert "HEAD-MARK" in r.stdout[:1000] and r.stdout.rstrip().endswith("TAIL-MARK")
    assert "bytes cut" in r.stdout
    # The head and the tail fill the cap; the note saying what was cut comes on top.
    assert len(r.stdout.encode()) <= TIGHT.output_max_bytes + 200, len(r.stdout)
    _bounded(latencies)
    # What the engine still holds, not what the allocator kept of what it freed:
    # 200 MB of messages went through zmq's I/O thread's heap and this one's.
    _return_freed_memory()
    after = leaks.snapshot(roots=[runtime_root()])
    assert after.rss_bytes - before.rss_bytes < 128 << 20, "the engine kept the flood"


async def test_multibyte_stdout_flood_stays_within_the_byte_cap(attacker: Session) -> None:
    r = await attacker.run(
        "import sys\nfor _ in range(4096): sys.stdout.write('\\U0001F600' * 1024)"
    )
    assert r.status == "ok" and r.stdout_truncated
    assert len(r.stdout.encode()) <= TIGHT.output_max_bytes + 200, len(r.stdout.encode())


async def test_huge_displays_are_cut_and_the_engine_lets_go_of_them(
    attacker: Session, bystander: Session
) -> None:
    code = _attack("""
        from IPython.display import display
        blob = 'x' * (4 << 20)
        for n in range(50):
            display({'text/plain': blob, 'text/html': f'<p>{n}</p>'}, raw=True)
        print('done')
    """)
    _return_freed_memory()
    before = leaks.snapshot(roots=[runtime_root()])
    r, latencies = await while_running(attacker, code, bystander, timeout_s=60)
    assert r.status == "ok" and r.displays_truncated, r.status
    assert sum(len(json.dumps(d.data)) for d in r.displays) <= 32 << 20
    _bounded(latencies)
    del r
    # 200 MB of displays went through zmq's I/O thread's heap and this one's:
    # what the engine holds, not what the allocator kept of what it freed.
    _return_freed_memory()
    after = leaks.snapshot(roots=[runtime_root()])
    assert after.rss_bytes - before.rss_bytes < 128 << 20, "the engine kept the displays"


def _peak_rss_bytes(*, reset: bool = False) -> int:
    """This process's peak resident memory so far; ``reset``: start counting it afresh."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # the peak becomes the current RSS
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc/self/status")


async def test_a_message_larger_than_a_cell_keeps_is_cut_unread(
    attacker: Session, bystander: Session
) -> None:
    """A display, a print and a value of 36 MiB each: none is parsed, the print's ends are kept."""
    size = 36 << 20  # beyond the 32 MiB a cell keeps of its displays and value
    code = _attack(f"""
        import sys
        from IPython.display import display
        display({{'text/plain': 'x' * {size}}}, raw=True)
        sys.stdout.write('<' + 'y' * {size} + '>')
        sys.stdout.flush()
        'z' * {size}
    """)
    before = _peak_rss_bytes(reset=True)
    r, latencies = await while_running(attacker, code, bystander, timeout_s=60)
    grown = _peak_rss_bytes() - before
    assert r.status == "ok", (r.status, r.message)
    assert r.displays_truncated and r.displays == [] and r.value is None
    assert r.stdout_truncated and "<" + "y" * 1000 in r.stdout, r.stdout[:200]
    assert r.stdout.endswith("y" * 1000 + ">"), r.stdout[-200:]
    _bounded(latencies)
    # Parsing them took about five times their size in the engine at its peak.
    assert grown < 2 * size, f"the engine's peak memory grew by {grown >> 20} MiB"


def test_output_spam_from_an_idle_session_does_not_grow_the_engine(tmp_path: Path) -> None:
    """A thread left running by a finished cell writes 4 MiB chunks while nobody reads."""
    report = tmp_path / "report.json"
    script = textwrap.dedent(f"""
        import asyncio, json, pathlib, time
        from sandkernel.engine import Engine
        SPAM = '''
        import sys, threading, time
        def spam():
            chunk = 'z' * (4 << 20)
            end = time.monotonic() + 8
            while time.monotonic() < end:
                sys.stdout.write(chunk); sys.stdout.flush()
        threading.Thread(target=spam, daemon=True).start()
        '''
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * 4096
        async def main():
            async with Engine(pool_size=0, prewarm_imports=(), runtime_dir={str(runtime_root())!r},
                              store_dir={str(tmp_path / "store")!r}, handle_sigterm=False) as e:
                s = await e.session()
                await s.run('1')
                base = rss()
                await s.run(SPAM)
                grown, end = 0, time.monotonic() + 6
                while time.monotonic() < end and grown < (512 << 20):
                    await asyncio.sleep(0.2)
                    grown = rss() - base
                pathlib.Path({str(report)!r}).write_text(json.dumps({{'grown': grown}}))
        asyncio.run(main())
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0 or not report.exists():
        raise RuntimeError(f"the engine process failed:\n{done.stderr[-3000:]}")
    grown = json.loads(report.read_text())["grown"]
    assert grown < 256 << 20, f"an idle session grew the engine by {grown >> 20} MiB"


async def test_a_kernel_starved_by_its_neighbours_still_starts(kernels: KernelBox) -> None:
    """10% of a CPU makes the first kernel_info reply slow, as two busy cores would."""
    starved = TIGHT.model_copy(update={"cpus": 0.1})
    kernel = SandboxedKernel(kernels.host, starved)
    try:
        await kernel.start(timeout_s=15)
        assert (await kernel.execute("1 + 1")).text == "2"
    except KernelStartFailed as exc:
        raise AssertionError(f"a slow kernel never started: {str(exc)[:100]}") from None
    finally:
        await kernel.shutdown()


# --------------------------------------------------------------------------- all at once


async def test_neighbour_latency_stays_bounded_while_three_sessions_misbehave(
    tight: Engine, bystander: Session
) -> None:
    sessions = [await tight.session() for _ in range(3)]
    storms = [
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {FORK_BOMB!r}])\n"
        "time.sleep(60)",
        "x = []\nwhile True:\n    x.append(bytearray(4 << 20)); x = x[-40:]",
        "while True: pass",
    ]
    tasks = [
        asyncio.ensure_future(run(s, code, timeout_s=6))
        for s, code in zip(sessions, storms, strict=True)
    ]
    latencies = []
    try:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            latencies.append(await latency_s(bystander))
    finally:
        results = await asyncio.gather(*tasks)
        for s in sessions:
            await s.close()
    assert {r.status for r in results} <= {"timeout", "oom", "ok", "killed", "dead"}
    _bounded(latencies)
