"""Session lifetimes and ordering, with an injected clock and a fake kernel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sandkernel.errors import BadInput, FileRejected, KernelDead, SessionClosed, SessionExpired
from sandkernel.results import ExecutionResult, Usage
from sandkernel.session import Lifetime, Session, SessionState

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeKernel:
    """Duck-typed stand-in for SandboxedKernel: records cells, can 'die'."""

    instances = 0

    def __init__(self, log: list[str]) -> None:
        FakeKernel.instances += 1
        self.kernel_id = f"fake-{FakeKernel.instances}"
        self.log = log
        self.shut = False
        self.alive = True
        self.dead_reason: str | None = None
        self.workspace = "/nowhere"  # its /mnt/data on the host (the tests place nothing)

    async def execute(self, code: str, **_: Any) -> ExecutionResult:
        self.log.append(f"start {code}")
        await asyncio.sleep(0.01)
        self.log.append(f"end {code}")
        if code == "die":
            return ExecutionResult(status="dead", usage=Usage(wall_ms=1), kernel_alive=False,
                                   state_lost=True, message="exited with code 1")  # fmt: skip
        return ExecutionResult(status="ok", usage=Usage(wall_ms=1), stdout=code)

    async def interrupt(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.shut = True


def make_session(clock: FakeClock, log: list[str], **lifetime: Any) -> tuple[Session, list[Any]]:
    released: list[Any] = []

    async def acquire() -> Any:
        return FakeKernel(log)

    async def release(kernel: Any) -> None:
        released.append(kernel)

    life = Lifetime(clock(), lifetime.pop("ttl_s", 3600), **lifetime)
    session = Session("s1", FakeKernel(log), life, clock=clock,  # type: ignore[arg-type]
                      acquire_kernel=acquire, release_kernel=release)  # fmt: skip
    return session, released


def test_ttl_counts_from_last_activity_and_extend_resets_it() -> None:
    life = Lifetime(created_at=0, ttl_s=3600)
    assert life.expires_at() == 3600
    assert life.expiry(3599) is None
    assert life.expiry(3600) == ("ttl", 3600)
    life.touch(1000)
    assert life.expires_at() == 4600


def test_idle_timeout_counts_runs_only() -> None:
    life = Lifetime(created_at=0, ttl_s=3600, idle_timeout_s=600)
    life.touch(500)  # extend(): not a run
    assert life.expiry(600) == ("idle", 600)
    life.ran(550)
    assert life.expires_at() == 1150


def test_max_lifetime_is_not_extended_by_activity() -> None:
    life = Lifetime(created_at=0, ttl_s=3600, max_lifetime_s=5000)
    life.ran(4000)
    assert life.expiry(4999) is None
    assert life.expiry(5000) == ("max_lifetime", 5000)


async def test_expired_session_says_when_and_why() -> None:
    clock, log = FakeClock(), []
    session, released = make_session(clock, log, ttl_s=60)
    await session.run("a")
    clock.now += 61
    with pytest.raises(
        SessionExpired, match=r"expired at .* no activity for 60 s \(session_ttl_s\)"
    ):
        await session.run("b")
    assert session.state is SessionState.EXPIRED
    assert "start b" not in log


async def test_reaper_expiry_releases_the_kernel_and_later_use_raises() -> None:
    clock, log = FakeClock(), []
    session, released = make_session(clock, log, ttl_s=60)
    kernel = session.kernel
    await session.expire("ttl", clock.now)
    assert released == [kernel] and session.kernel is None
    with pytest.raises(SessionExpired):
        await session.run("x")
    with pytest.raises(SessionExpired):
        await session.extend()


async def test_extend_keeps_the_session_alive() -> None:
    clock, log = FakeClock(), []
    session, _ = make_session(clock, log, ttl_s=60)
    clock.now += 50
    expires_at = await session.extend()
    assert expires_at == pytest.approx(time.time() + 60, abs=1)
    assert session.lifetime.expires_at() == clock.now + 60
    clock.now += 50
    assert (await session.run("still")).stdout == "still"


async def test_cells_of_one_session_run_one_at_a_time_in_order() -> None:
    clock, log = FakeClock(), []
    session, _ = make_session(clock, log)
    await asyncio.gather(*(session.run(c) for c in ("1", "2", "3")))
    assert log == ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]


async def test_dead_kernel_raises_then_restart_gives_state_lost() -> None:
    clock, log = FakeClock(), []
    session, released = make_session(clock, log)
    first = session.kernel
    result = await session.run("die")
    assert result.status == "dead" and session.state is SessionState.DEAD
    assert released == [first]
    with pytest.raises(KernelDead, match="exited with code 1.*restart=True"):
        await session.run("x")
    again = await session.run("x", restart=True)
    assert again.status == "ok" and again.state_lost
    assert session.state is SessionState.ACTIVE and session.kernel is not first
    assert not (await session.run("y")).state_lost


async def test_a_kernel_that_died_between_cells_is_found_dead_at_the_next_run() -> None:
    clock, log = FakeClock(), []
    session, released = make_session(clock, log)
    first = session.kernel
    assert first is not None
    await session.run("a")
    first.alive, first.dead_reason = False, "killed by SIGKILL"
    with pytest.raises(KernelDead, match=r"killed by SIGKILL.*restart=True"):
        await session.run("b")
    assert session.state is SessionState.DEAD and released == [first]
    again = await session.run("b", restart=True)
    assert again.status == "ok" and again.state_lost and session.kernel is not first
    assert "start b" in log


@pytest.mark.parametrize("ttl_s", [0.0, -1.0, float("inf"), float("nan"), 3.6e15])
async def test_extend_refuses_a_ttl_out_of_bounds_and_keeps_the_old_one(ttl_s: float) -> None:
    clock, log = FakeClock(), []
    session, _ = make_session(clock, log, ttl_s=60)
    with pytest.raises(BadInput, match="ttl_s must be above 0 and at most"):
        await session.extend(ttl_s)
    assert session.lifetime.ttl_s == 60
    assert session.snapshot().expires_at is not None  # still representable


async def test_closed_session_refuses_runs() -> None:
    clock, log = FakeClock(), []
    session, released = make_session(clock, log)
    await session.close()
    await session.close()
    assert len(released) == 1
    with pytest.raises(SessionClosed):
        await session.run("x")


class GatedKernel(FakeKernel):
    """A kernel whose cells end when the test says so."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def execute(self, code: str, **_: Any) -> ExecutionResult:
        self.log.append(f"start {code}")
        self.started.set()
        await self.gate.wait()
        return ExecutionResult(status="ok", usage=Usage(wall_ms=1), stdout=code)


async def test_a_running_cell_keeps_the_ttl_and_idle_timeout_off() -> None:
    clock, log = FakeClock(), []
    kernel = GatedKernel(log)
    life = Lifetime(clock(), 60, idle_timeout_s=30, max_lifetime_s=1000)
    session = Session("s1", kernel, life, clock=clock,  # type: ignore[arg-type]
                      acquire_kernel=None, release_kernel=None)  # type: ignore[arg-type]  # fmt: skip
    cell = asyncio.create_task(session.run("long"))
    await kernel.started.wait()
    clock.now += 120  # past the TTL and the idle timeout, the cell still running
    assert session.expiry(clock.now) is None
    session._check_usable()  # a lookup meanwhile does not end it either
    assert session.state is SessionState.ACTIVE
    kernel.gate.set()
    assert (await cell).stdout == "long"
    # Both count again from the cell's end.
    assert session.expiry(clock.now + 29) is None
    assert session.expiry(clock.now + 30) == ("idle", clock.now + 30)
    # The maximum lifetime holds even while a cell runs.
    kernel.gate.clear()
    kernel.started.clear()
    cell = asyncio.create_task(session.run("longer"))
    await kernel.started.wait()
    assert session.expiry(life.created_at + 1000) == ("max_lifetime", life.created_at + 1000)
    kernel.gate.set()
    await cell


class EndedKernel(GatedKernel):
    """A kernel whose running cell is ended by its shutdown, as a real kernel's is."""

    async def execute(self, code: str, **_: Any) -> ExecutionResult:
        self.log.append(f"start {code}")
        self.started.set()
        await self.gate.wait()
        return ExecutionResult(
            status="killed", usage=Usage(wall_ms=1), message="the kernel was shut down"
        )

    async def shutdown(self) -> None:
        self.gate.set()


async def test_a_cell_ended_by_the_sessions_expiry_says_so() -> None:
    clock, log = FakeClock(), []
    kernel = EndedKernel(log)
    released: list[Any] = []

    async def release(ended: Any) -> None:
        released.append(ended)
        await ended.shutdown()

    life = Lifetime(clock(), 60, max_lifetime_s=1000)
    session = Session("s1", kernel, life, clock=clock,  # type: ignore[arg-type]
                      acquire_kernel=None, release_kernel=release)  # type: ignore[arg-type]  # fmt: skip
    cell = asyncio.create_task(session.run("long"))
    await kernel.started.wait()
    clock.now += 1000
    await session.expire(*life.expiry(clock.now, running=True))  # type: ignore[misc]
    result = await cell
    assert result.status == "killed" and released == [kernel]
    assert result.message == (
        "the session expired while the cell ran: it reached its maximum lifetime of 1000 s "
        "(max_lifetime_s)"
    )


async def test_a_session_found_expired_on_use_releases_its_kernel_when_expired() -> None:
    clock, log = FakeClock(), []
    session, released = make_session(clock, log, ttl_s=60)
    kernel = session.kernel
    clock.now += 61
    with pytest.raises(SessionExpired):
        await session.run("late")
    assert session.state is SessionState.EXPIRED and released == []
    await session.expire("ttl", clock.now + 5)  # the reaper's next pass
    assert released == [kernel] and session.kernel is None
    assert session.ended_at == 1060  # its deadline, not the time of the pass
    await session.close()
    assert released == [kernel] and session.state is SessionState.EXPIRED


async def test_a_session_closed_while_its_dead_kernel_is_replaced_stays_closed() -> None:
    clock, log = FakeClock(), []
    gate = asyncio.Event()
    released: list[Any] = []
    fresh = FakeKernel(log)

    async def acquire() -> Any:
        await gate.wait()
        return fresh

    async def release(kernel: Any) -> None:
        released.append(kernel)

    session = Session("s1", FakeKernel(log), Lifetime(clock(), 3600), clock=clock,  # type: ignore[arg-type]
                      acquire_kernel=acquire, release_kernel=release)  # fmt: skip
    await session.run("die")
    restart = asyncio.create_task(session.run("x", restart=True))
    await asyncio.sleep(0.01)  # waiting for a kernel
    await session.close()
    gate.set()
    with pytest.raises(SessionClosed):
        await restart
    assert session.state is SessionState.CLOSED and session.kernel is None
    assert released[-1] is fresh  # the kernel it got is given back, not kept
    assert "start x" not in log


class _ClosedWhilePlacing:
    """A workspace whose session is closed while a file is being placed in it."""

    def __init__(self) -> None:
        self.session: Session | None = None

    async def _placing(self) -> None:
        assert self.session is not None
        await self.session.close()  # the kernel, and its folder, go meanwhile
        raise FileRejected("cannot place 'a.txt' in /mnt/data: No such file or directory")

    async def upload(self, *_: Any, **__: Any) -> Any:
        await self._placing()

    async def attach(self, *_: Any, **__: Any) -> Any:
        await self._placing()


async def test_a_session_closed_while_a_file_is_placed_says_closed_not_refused() -> None:
    session, released = make_session(FakeClock(), [])
    workspace = _ClosedWhilePlacing()
    workspace.session = session
    session.workspace = workspace  # type: ignore[assignment]
    session.kernel.workspace = "/nowhere"  # type: ignore[union-attr]
    with pytest.raises(SessionClosed):
        await session.upload(b"x", "a.txt")
    session2, _ = make_session(FakeClock(), [])
    workspace.session, session2.workspace = session2, workspace  # type: ignore[assignment]
    session2.kernel.workspace = "/nowhere"  # type: ignore[union-attr]
    with pytest.raises(SessionClosed):
        await session2.attach(["file-1"])
    session3, _ = make_session(FakeClock(), [])
    workspace.session, session3.workspace = session3, workspace  # type: ignore[assignment]
    session3.kernel.workspace = "/nowhere"  # type: ignore[union-attr]
    with pytest.raises(SessionClosed):
        await session3.run("1", file_ids=["file-1"])  # a cell's files, placed before it runs
    assert len(released) == 1  # the first session's kernel went with its close


class _ClosesItsSession:
    """A workspace whose session is closed while it works, the work itself succeeding."""

    def __init__(self) -> None:
        self.session: Session | None = None

    async def _close(self) -> None:
        assert self.session is not None
        await self.session.close()

    async def prepare(self, *_: Any, **__: Any) -> None:
        await self._close()

    async def attach(self, *_: Any, **__: Any) -> list[str]:
        await self._close()
        return ["/mnt/data/a.txt"]


async def test_a_session_closed_while_a_restart_puts_its_files_back_stays_closed() -> None:
    log: list[str] = []
    session, released = make_session(FakeClock(), log)
    await session.run("die")
    workspace = _ClosesItsSession()
    workspace.session, session.workspace = session, workspace  # type: ignore[assignment]
    with pytest.raises(SessionClosed):
        await session.run("x", restart=True)
    assert session.state is SessionState.CLOSED and session.kernel is None
    assert len(released) == 2  # the dead kernel, then the fresh one: not kept
    assert "start x" not in log


async def test_a_session_closed_while_a_cells_files_are_placed_says_closed() -> None:
    """The placing succeeded, the kernel went with the close: not a kernel that died."""
    log: list[str] = []
    session, _ = make_session(FakeClock(), log)
    workspace = _ClosesItsSession()
    workspace.session, session.workspace = session, workspace  # type: ignore[assignment]
    session.kernel.workspace = "/nowhere"  # type: ignore[union-attr]
    with pytest.raises(SessionClosed):
        await session.run("x", file_ids=["file-1"])
    assert "start x" not in log


async def test_a_process_of_the_cell_killed_for_memory_leaves_the_kernel_and_its_variables() -> (
    None
):
    log: list[str] = []
    session, released = make_session(FakeClock(), log)
    kernel = session.kernel
    oom = ExecutionResult(
        status="oom",
        usage=Usage(wall_ms=1),
        kernel_alive=True,
        message="the sandbox ran out of memory; a process of the cell was killed",
    )

    async def child_killed(code: str, **_: Any) -> ExecutionResult:
        return oom

    kernel.execute = child_killed  # type: ignore[method-assign, union-attr]
    assert (await session.run("spawn a hog")).status == "oom"
    assert session.state is SessionState.ACTIVE and session.kernel is kernel
    assert released == []


async def test_a_restart_taking_past_the_ttl_is_not_expired_by_it() -> None:
    """The run began in time: acquiring the fresh kernel is part of it, as the cell is."""
    clock, log = FakeClock(), []
    gate = asyncio.Event()
    session, _ = make_session(clock, log, ttl_s=10)
    await session.run("die")

    async def slow_acquire() -> Any:
        await gate.wait()
        return FakeKernel(log)

    session._acquire = slow_acquire  # type: ignore[method-assign]
    restart = asyncio.create_task(session.run("x", restart=True))
    await asyncio.sleep(0)  # it holds the lock, waiting for a kernel
    clock.now += 60  # the TTL passes meanwhile
    assert session.expiry(clock.now) is None  # the reaper leaves it
    gate.set()
    result = await restart
    assert result.status == "ok" and result.state_lost
