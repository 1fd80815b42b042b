"""The Engine with real sandboxed kernels: pool, sessions, lifetimes, concurrency."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sandkernel import (
    BadInput,
    Engine,
    EngineClosed,
    KernelDead,
    PoolExhausted,
    SessionExpired,
    SessionLimitReached,
    SessionNotFound,
    SessionState,
)
from sandkernel.kernel import SandboxedKernel
from sandkernel.sandbox.layout import SANDBOX_UID
from sandkernel.workspace import SessionWorkspace
from tests.conftest import leftovers

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
EngineFactory = Callable[..., Awaitable[Engine]]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 20) -> None:
    """Wait for engine state that has no event of its own, with a deadline."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polled state, bounded by the deadline
            await asyncio.sleep(0.02)


async def test_state_persists_across_cells(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    s = await engine.session("conv-1")
    await s.run("import math\nradius = 2")
    r = await s.run("round(math.pi * radius**2, 3)")
    assert r.text == "12.566"
    assert await engine.session("conv-1") is s


async def test_two_sessions_are_isolated(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    a, b = await engine.session("a"), await engine.session("b")
    await a.run(
        "secret = 'only-a'\n"
        "open('/mnt/data/a.txt', 'w').write('a')\n"
        "import subprocess; p = subprocess.Popen(['sleep', '30'])"
    )
    r = await b.run(
        "import os\n"
        "print('secret' in globals(), os.path.exists('/mnt/data/a.txt'),\n"
        "      any(open(f'/proc/{p}/cmdline').read().startswith('sleep')\n"
        "          for p in os.listdir('/proc') if p.isdigit()))"
    )
    assert r.stdout.strip() == "False False False"
    assert (await a.run("p.poll() is None")).text == "True"


async def test_pool_refills_after_hand_outs(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    await wait_until(lambda: engine.stats_now().pool.warm == 2)
    await engine.session("one")
    await engine.session("two")
    stats = await engine.stats()
    assert stats.pool.hits == 2 and stats.pool.in_use == 2
    await wait_until(lambda: engine.stats_now().pool.warm == 2)
    assert (await engine.stats()).pool.kernels_started == 4


async def test_warm_kernels_are_prewarmed_and_self_checked(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(prewarm_imports=("numpy",))
    s = await engine.session()
    r = await s.run("import sys; 'numpy' in sys.modules, 'numpy' in globals()")
    assert r.text == "(True, False)"
    assert r.execution_count == 1


async def test_a_prewarm_module_that_fails_to_import_is_warned_of_and_the_kernel_serves(
    engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sandkernel.engine")
    engine = await engine_factory(prewarm_imports=("json", "no_such_module_for_prewarm"))
    s = await engine.session()
    assert (await s.run("1 + 1")).text == "2"
    messages = [r.getMessage() for r in caplog.records]
    warned = [m for m in messages if "no_such_module_for_prewarm" in m]
    assert warned == [
        "prewarm import 'no_such_module_for_prewarm' fails in the sandbox: "
        "ModuleNotFoundError: No module named 'no_such_module_for_prewarm'"
    ]
    assert not [m for m in messages if "'json'" in m]


async def test_empty_pool_raises_pool_exhausted_naming_the_setting(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=0, max_kernels=1)
    await engine.session("first")  # started on demand, however long that takes under load
    assert (await engine.stats()).pool.misses == 1
    engine.acquire_timeout_s = 2
    with pytest.raises(PoolExhausted, match="max_kernels"):
        await engine.session("second")


async def test_max_sessions_is_enforced(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(max_sessions=1)
    await engine.session("only")
    with pytest.raises(SessionLimitReached, match="max_sessions=1"):
        await engine.session("another")


async def test_max_sessions_counts_sessions_being_created(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(max_sessions=1, pool_size=2)
    made = await asyncio.gather(
        *(engine.session(f"s{n}") for n in range(3)), return_exceptions=True
    )
    assert sorted(type(m).__name__ for m in made) == [
        "Session", "SessionLimitReached", "SessionLimitReached"
    ]  # fmt: skip
    assert (await engine.stats()).sessions_active == 1


async def test_a_cancelled_creator_leaves_those_waiting_for_the_session_to_make_it(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await engine_factory()
    pool = engine._pool
    assert pool is not None
    acquire, entered, gate = pool.acquire, asyncio.Event(), asyncio.Event()

    async def held_acquire(**options: Any) -> SandboxedKernel:
        entered.set()
        await gate.wait()
        return await acquire(**options)

    monkeypatch.setattr(pool, "acquire", held_acquire)
    first = asyncio.create_task(engine.session("shared"))
    await entered.wait()
    waiting = asyncio.create_task(engine.session("shared"))
    await asyncio.sleep(0)  # one step: it now waits for the first caller's session
    first.cancel()  # a client that went away while its kernel was on the way
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    async with asyncio.timeout(60):
        session = await waiting
    assert session.id == "shared" and (await session.run("1 + 1")).text == "2"


async def test_ttl_expiry_with_injected_clock(engine_factory: EngineFactory) -> None:
    now = [0.0]
    engine = await engine_factory(session_ttl_s=100, reap_interval_s=3600, clock=lambda: now[0])
    s = await engine.session("t")
    await s.run("1")
    now[0] = 99
    assert await engine.reap() == []
    now[0] = 101
    assert await engine.reap() == ["t"]
    assert s.state is SessionState.EXPIRED and s.kernel is None
    with pytest.raises(SessionExpired, match="no activity for 100 s"):
        await s.run("1")
    with pytest.raises(SessionExpired):
        await engine.session("t")
    fresh = await engine.session("t", if_expired="new")
    assert fresh is not s and (await fresh.run("2")).text == "2"


async def test_a_session_found_expired_on_use_loses_its_kernel_at_the_next_reap(
    engine_factory: EngineFactory,
) -> None:
    now = [0.0]
    engine = await engine_factory(session_ttl_s=100, reap_interval_s=3600, clock=lambda: now[0])
    s = await engine.session("t")
    kernel = s.kernel
    assert kernel is not None
    now[0] = 101
    with pytest.raises(SessionExpired):
        await engine.get_session("t")  # marks it expired; the reaper has not run
    assert await engine.reap() == ["t"]
    assert s.kernel is None and not kernel.alive
    assert s.ended_reason == "ttl" and (await engine.stats()).pool.in_use == 0


@pytest.mark.parametrize("seen_expired_first", [False, True])
async def test_a_new_session_in_place_of_one_expired_before_the_reap_ends_the_old_kernel(
    engine_factory: EngineFactory, seen_expired_first: bool
) -> None:
    now = [0.0]
    engine = await engine_factory(session_ttl_s=100, reap_interval_s=3600, clock=lambda: now[0])
    old = await engine.session("t")
    kernel = old.kernel
    assert kernel is not None
    now[0] = 101  # past its TTL; the reaper has not run
    if seen_expired_first:
        with pytest.raises(SessionExpired):
            await engine.get_session("t")
    fresh = await engine.session("t", if_expired="new")
    assert fresh is not old and (await fresh.run("2")).text == "2"
    assert old.state is SessionState.EXPIRED and old.kernel is None and not kernel.alive
    assert (await engine.stats()).pool.in_use == 1  # the new session's kernel only


async def test_callers_replacing_an_expired_session_at_once_get_one_new_session(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [0.0]
    engine = await engine_factory(
        pool_size=2, session_ttl_s=100, reap_interval_s=3600, clock=lambda: now[0]
    )
    old = await engine.session("t")
    kernel = old.kernel
    assert kernel is not None
    shutdown, ending, gate = kernel.shutdown, asyncio.Event(), asyncio.Event()

    async def slow_shutdown(**options: Any) -> None:
        ending.set()
        await gate.wait()
        await shutdown(**options)

    monkeypatch.setattr(kernel, "shutdown", slow_shutdown)
    now[0] = 101  # past its TTL; the reaper has not run
    first = asyncio.create_task(engine.session("t", if_expired="new"))
    await ending.wait()  # the first caller ends the old kernel
    async with asyncio.timeout(60):
        second = await engine.session("t", if_expired="new")  # meanwhile
        gate.set()
        assert await first is second
    assert await engine.get_session("t") is second
    stats = await engine.stats()
    assert stats.sessions_active == 1 and stats.pool.in_use == 1


async def test_a_bad_agent_id_leaves_the_session_id_usable(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    with pytest.raises(BadInput):
        await engine.session("thread-1", agent_id="bad id with spaces")
    async with asyncio.timeout(60):
        s = await engine.session("thread-1")
    assert (await s.run("1+1")).text == "2"


async def test_real_short_ttl_through_the_reaper(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(reap_interval_s=0.1)
    s = await engine.session("short")
    await s.run("1")
    await s.extend(0.5)  # after the cell: under load, creating it could take longer
    await wait_until(lambda: s.state is SessionState.EXPIRED, timeout_s=10)
    assert s.kernel is None
    info = {i.id: i for i in (await engine.sessions())}["short"]
    assert info.state is SessionState.EXPIRED and info.ended_reason == "ttl"
    with pytest.raises(SessionExpired):
        await s.run("1")


async def test_sessions_lists_state_and_times(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(session_ttl_s=3600)
    await engine.session("listed")
    (info,) = await engine.sessions()
    assert info.id == "listed" and info.state is SessionState.ACTIVE
    # Monotonic times become datetimes one by one: each may round by a microsecond.
    assert 3590 < (info.expires_at - info.last_active).total_seconds() <= 3600.001
    with pytest.raises(SessionNotFound):
        await engine.get_session("nope")


async def test_different_sessions_run_in_parallel(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    a, b = await engine.session("pa"), await engine.session("pb")
    started = time.monotonic()
    await asyncio.gather(a.run("import time; time.sleep(2)"), b.run("import time; time.sleep(2)"))
    assert time.monotonic() - started < 3.5  # one after the other: 4 s at least


async def test_cancelled_run_interrupts_the_cell_and_session_stays_usable(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("c")
    await s.run("before = 1")
    task = asyncio.create_task(s.run("import time\nfor i in range(300): time.sleep(0.1)"))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    r = await s.run("before + 1")
    assert r.text == "2" and time.monotonic() - started < 2
    assert (await s.run("'i' in globals() and i < 299")).text == "True"


async def test_a_run_cancelled_before_its_cell_begins_is_interrupted_not_killed(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled right after it is sent: an interrupt sent then reaches ipykernel before
    it begins the cell, which ignores it; it is sent once the cell has begun."""
    engine = await engine_factory()
    s = await engine.session("early")
    await s.run("before = 1")
    interrupt = SandboxedKernel._interrupt_cell
    begun_when_sent: list[bool] = []

    async def seen(kernel: SandboxedKernel, until: float | None = None) -> None:
        cell = kernel._cell
        begun_when_sent.append(cell is not None and cell.out.execution_count is not None)
        await interrupt(kernel, until)

    monkeypatch.setattr(SandboxedKernel, "_interrupt_cell", seen)
    for _ in range(3):
        task = asyncio.create_task(s.run("import time\nfor i in range(300): time.sleep(0.1)"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert begun_when_sent == [True, True, True]
    assert (await s.run("before + 1")).text == "2"  # the kernel and its state live on


async def test_an_ended_session_keeps_no_record_of_its_workspace_files_but_they_stay_stored(
    engine_factory: EngineFactory,
) -> None:
    """Ended sessions are kept a while for their info: not with an entry per file they made."""
    engine = await engine_factory()
    for end in ("close", "expire"):
        s = await engine.session(f"many-{end}")
        r = await s.run("for i in range(50): open(f'/mnt/data/f{i}.txt', 'w').write(str(i))")
        assert len(r.files) == 50
        workspace = s.workspace
        assert workspace is not None and len(workspace.state.snapshot) == 50
        if end == "close":
            await s.close()
        else:
            await s.expire("idle", time.monotonic())
        assert workspace.state.snapshot == {} and workspace.versions.files == {}
        assert s.state.value in ("closed", "expired") and engine._sessions[s.id] is s
        seventh = next(f for f in r.files if f.name == "f7.txt")
        assert await engine.download(seventh.id) == b"7"


async def test_dead_kernel_marks_session_dead_then_restart(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    s = await engine.session("d")
    r = await s.run("import os; os._exit(3)")
    assert r.status == "dead" and s.state is SessionState.DEAD
    with pytest.raises(KernelDead, match="code 3"):
        await s.run("1")
    r = await s.run("40 + 2", restart=True)
    assert r.text == "42" and r.state_lost
    assert (await engine.stats()).sessions_active == 1


async def test_a_kernel_killed_between_cells_is_dead_at_the_next_run(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("k")
    # The cell returns; the thread it left kills the kernel a moment later.
    await s.run("import os, threading\nthreading.Timer(0.2, os.kill, (os.getpid(), 9)).start()")
    assert s.kernel is not None
    async with asyncio.timeout(30):
        await s.kernel.wait_ended()
    with pytest.raises(KernelDead, match="restart=True"):
        await s.run("1")
    assert s.state is SessionState.DEAD
    r = await s.run("40 + 2", restart=True)
    assert r.text == "42" and r.state_lost
    assert (await engine.stats()).sessions_active == 1


async def test_fifty_sessions_leave_nothing_behind(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    for n in range(50):
        s = await engine.session(f"s{n}")
        assert (await s.run(f"{n} * 2")).text == str(n * 2)
        await s.close()
    stats = await engine.stats()
    assert stats.sessions_closed == 50 and stats.pool.in_use == 0
    # the fixture asserts: no kernel folder, cgroup, mount or fd left after close


async def test_engine_exit_ends_everything_within_10s(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    busy = [await engine.session(f"busy{n}") for n in range(2)]
    tasks = [asyncio.create_task(s.run("while True: pass")) for s in busy]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await engine.aclose()
    assert time.monotonic() - started < 10
    results = await asyncio.gather(*tasks)
    assert [r.status for r in results] == ["killed", "killed"]
    assert all("shut down" in (r.message or "") for r in results)
    assert all(s.state is SessionState.CLOSED for s in busy)


@pytest.mark.parametrize(
    "held", [SandboxedKernel, SessionWorkspace], ids=["its kernel starting", "its files prepared"]
)
async def test_closing_the_engine_as_a_workspace_session_is_made_ends_its_kernel(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, held: type
) -> None:
    """A workspace session's kernel is started for it, outside the warm pool."""
    engine = await engine_factory(pool_size=0)
    host = engine._host
    assert host is not None
    prepare, entered, gate = held.prepare, asyncio.Event(), asyncio.Event()

    async def held_prepare(self: Any, *args: Any, **options: Any) -> Any:
        entered.set()
        await gate.wait()
        return await prepare(self, *args, **options)

    monkeypatch.setattr(held, "prepare", held_prepare)
    creating = asyncio.create_task(engine.session(workspace=tmp_path / "ws"))
    try:
        async with asyncio.timeout(60):
            await entered.wait()
        async with asyncio.timeout(20):
            await engine.aclose()
        assert leftovers(host) == []
    finally:
        gate.set()
    with pytest.raises(EngineClosed):
        await creating


async def test_a_session_whose_kernel_came_as_the_engine_closed_is_refused(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing ends the sessions it finds: one made afterwards would outlive the engine."""
    engine = await engine_factory()
    pool = engine._pool
    assert pool is not None
    prepare, preparing, prepared = SessionWorkspace.prepare, asyncio.Event(), asyncio.Event()
    close_pool, closing, closed = pool.close, asyncio.Event(), asyncio.Event()

    async def held_prepare(self: SessionWorkspace, folder: Path, *, restart: bool) -> None:
        preparing.set()
        await prepared.wait()
        await prepare(self, folder, restart=restart)

    async def held_close() -> None:
        closing.set()  # the sessions are ended, the store still open
        await closed.wait()
        await close_pool()

    monkeypatch.setattr(SessionWorkspace, "prepare", held_prepare)
    monkeypatch.setattr(pool, "close", held_close)
    creating = asyncio.create_task(engine.session("late"))
    async with asyncio.timeout(60):
        await preparing.wait()
        shutting = asyncio.create_task(engine.aclose())
        await closing.wait()
        prepared.set()
        try:
            with pytest.raises(EngineClosed):
                await creating
        finally:
            closed.set()
            await shutting
    assert "late" not in engine._sessions


async def test_concurrent_session_calls_for_one_id_share_one_kernel(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=2)
    sessions: list[Any] = await asyncio.gather(*(engine.session("same") for _ in range(5)))
    assert all(s is sessions[0] for s in sessions)
    assert (await engine.stats()).pool.in_use == 1


async def test_a_kernel_links_end_is_awaited_not_polled(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    crashing = await engine.session()
    closing = await engine.session()
    crash_link = await engine.kernel_link(crashing.id)
    close_link = await engine.kernel_link(closing.id)
    crashed = asyncio.ensure_future(crash_link.wait_ended())
    closed = asyncio.ensure_future(close_link.wait_ended())
    assert (await crashing.run("1 + 1")).text == "2"
    assert not crashed.done() and not closed.done()
    # the kernel's process dies: the waiter returns, with no poll to wait for
    await crashing.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    await asyncio.wait_for(crashed, 10)
    assert not crash_link.alive
    assert not closed.done() and close_link.alive
    # the session ends: its kernel is shut down, and that ends the wait too
    await engine.close_session(closing.id)
    await asyncio.wait_for(closed, 10)
    assert not close_link.alive
    await asyncio.wait_for(close_link.wait_ended(), 1)  # at once, once ended


async def test_agent_files_reach_sessions_created_while_they_are_placed(tmp_path: Any) -> None:
    """Sessions come and go while an agent's files are placed (each placement awaits)."""
    engine = Engine(store_dir=tmp_path, handle_sigterm=False)
    placed: list[str] = []

    class Workspace:
        def __init__(self, name: str) -> None:
            self.name = name

        async def give_agent_file(self, folder: Any, stored: Any) -> None:
            placed.append(self.name)
            # Another request creates a session meanwhile.
            engine._sessions[f"new-{len(placed)}"] = FakeSession(f"new-{len(placed)}")  # type: ignore[assignment]
            await asyncio.sleep(0)

    class FakeSession:
        def __init__(self, name: str) -> None:
            self.agent_id = "a"
            self.closed = False
            self.kernel = type("K", (), {"workspace": tmp_path})()
            self.workspace = Workspace(name)

    engine._sessions.update({n: FakeSession(n) for n in ("s1", "s2")})  # type: ignore[misc]
    await engine._give_to_agent_sessions("a", [type("File", (), {"name": "f.txt"})()])  # type: ignore[list-item]
    assert placed == ["s1", "s2"]


async def test_a_timeout_that_is_no_timeout_is_refused(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    s = await engine.session("bounded")
    for timeout_s in (float("inf"), float("nan"), 0.0, -1.0, 86_401.0):
        with pytest.raises(BadInput, match="timeout_s must be above 0 and at most 86400"):
            await s.run("1", timeout_s=timeout_s)
    assert (await s.run("1 + 1", timeout_s=86_400)).text == "2"  # and the session serves on


# -- host workspaces: folders given to the sandbox for good -----------------------------


async def test_a_new_host_workspace_is_made_and_kept_but_not_the_folder_holding_it(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory(pool_size=0)
    workspace = tmp_path / "made" / "ws"
    s = await engine.session(workspace=workspace)
    assert (await s.run("open('/mnt/data/out.txt', 'w').write('kept')")).status == "ok"
    await engine.close_session(s.id)
    assert (workspace / "out.txt").read_text() == "kept"
    assert workspace.stat().st_uid == SANDBOX_UID
    # The folder it was made in stays the caller's: it holds more than a sandbox may own.
    assert workspace.parent.stat().st_uid == 0
    with pytest.raises(BadInput, match="is not empty and is not a sandbox's"):
        await engine.session(workspace=workspace.parent)


async def test_an_empty_host_workspace_is_taken_but_a_hidden_file_makes_one_not_empty(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory(pool_size=0)
    empty, hidden = tmp_path / "empty", tmp_path / "hidden"
    for folder in (empty, hidden):
        folder.mkdir()
        os.chown(folder, 1000, 1000)  # a user's, not root's: the owner does not matter
    (hidden / ".profile").write_text("echo mine\n")
    s = await engine.session(workspace=empty)
    assert (await s.run("open('/mnt/data/out.txt', 'w').write('kept')")).status == "ok"
    await engine.close_session(s.id)
    assert (empty / "out.txt").read_text() == "kept"
    with pytest.raises(BadInput, match=re.escape(f"the workspace {hidden} is not empty")):
        await engine.session(workspace=hidden)
    assert hidden.stat().st_uid == 1000


async def test_a_host_workspace_removed_under_its_session_loses_no_cell_result(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory(pool_size=0)
    workspace = tmp_path / "ws"
    s = await engine.session(workspace=workspace)
    assert (await s.run("x = 41")).status == "ok"
    shutil.rmtree(workspace)  # from the host, while the session lives
    r = await s.run("print('still here'); x + 1")
    assert (r.status, r.stdout, r.text) == ("ok", "still here\n", "42")
    assert r.files == [] and r.files_truncated
    assert r.files_note is not None
    assert "the workspace's files were not collected (cannot scan the workspace" in r.files_note
    assert (await s.run("x")).text == "41"  # and the next cell's too


async def test_a_host_workspace_a_sandbox_used_is_taken_again_but_not_a_copy_of_it(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory(pool_size=0)
    used = tmp_path / "used"
    first = await engine.session(workspace=used)
    assert (await first.run("open('/mnt/data/state.txt', 'w').write('from run 1')")).status == "ok"
    await engine.close_session(first.id)
    second = await engine.session(workspace=used)
    r = await second.run("open('/mnt/data/state.txt').read()")
    assert r.text == "'from run 1'"
    await engine.close_session(second.id)
    # What makes it acceptable is its owner, not what it holds.
    copy = tmp_path / "copy"
    shutil.copytree(used, copy)
    assert copy.stat().st_uid == 0
    with pytest.raises(BadInput, match=re.escape(f"the workspace {copy} is not empty")):
        await engine.session(workspace=copy)
