"""Sessions: one conversation's kernel, its lifetime and its queue of cells.

A session is active **one hour by default**: it expires ``ttl_s`` after its
last activity (a run or :meth:`Session.extend`). Two optional bounds come on
top: an idle timeout counted from the last *run* only (extending does not
reset it), and a hard maximum lifetime counted from creation. The rules are
the pure :class:`Lifetime`; the engine's reaper applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from sandkernel.errors import BadInput, KernelDead, SessionClosed, SessionExpired
from sandkernel.files import StoredFile, listed_file_name
from sandkernel.files import UploadSource as UploadSource  # where the contract imports it from
from sandkernel.kernel import OutputCallback, SandboxedKernel
from sandkernel.limits import MAX_TTL_S
from sandkernel.results import ExecutionResult
from sandkernel.streaming import StreamsFromRun
from sandkernel.workspace import SessionWorkspace

Clock = Callable[[], float]


class SessionState(StrEnum):
    ACTIVE = "active"
    DEAD = "dead"  # its kernel died; the next run raises or restarts
    EXPIRED = "expired"
    CLOSED = "closed"


@dataclass
class Lifetime:
    """When a session expires, as plain data. Times are from the engine's clock."""

    created_at: float
    ttl_s: float
    idle_timeout_s: float | None = None
    max_lifetime_s: float | None = None
    last_touch: float = 0.0
    last_run: float = 0.0

    def __post_init__(self) -> None:
        self.last_touch = self.last_touch or self.created_at
        self.last_run = self.last_run or self.created_at

    def deadlines(self) -> dict[str, float]:
        found = {"ttl": self.last_touch + self.ttl_s}
        if self.idle_timeout_s is not None:
            found["idle"] = self.last_run + self.idle_timeout_s
        if self.max_lifetime_s is not None:
            found["max_lifetime"] = self.created_at + self.max_lifetime_s
        return found

    def expires_at(self) -> float:
        return min(self.deadlines().values())

    def expiry(self, now: float, *, running: bool = False) -> tuple[str, float] | None:
        """``(reason, when)`` if expired at ``now``, else None.

        ``running``: a cell is running, which is activity: only the maximum
        lifetime can end the session then (the TTL and idle timeout count
        again from the cell's end).
        """
        deadlines = self.deadlines()
        if running:
            deadlines = {k: v for k, v in deadlines.items() if k == "max_lifetime"}
            if not deadlines:
                return None
        reason, when = min(deadlines.items(), key=lambda kv: kv[1])
        return (reason, when) if now >= when else None

    def touch(self, now: float) -> None:
        self.last_touch = max(self.last_touch, now)

    def ran(self, now: float) -> None:
        self.touch(now)
        self.last_run = max(self.last_run, now)

    def describe(self, reason: str) -> str:
        return {
            "ttl": f"no activity for {self.ttl_s:g} s (session_ttl_s)",
            "idle": f"no code run for {self.idle_timeout_s or 0:g} s (idle_timeout_s)",
            "max_lifetime": f"it reached its maximum lifetime of {self.max_lifetime_s or 0:g} s "
            "(max_lifetime_s)",
            "closed": "it was closed",
            "engine": "the engine shut down",
        }.get(reason, reason)


class SessionInfo(BaseModel):
    """A session as ``engine.sessions()`` lists it (times are UTC datetimes)."""

    id: str
    state: SessionState
    created_at: datetime
    last_active: datetime
    expires_at: datetime
    cells_run: int
    kernel_id: str | None
    ended_reason: str | None = None
    #: the agent the session works for, if any
    agent_id: str | None = None


class Session(StreamsFromRun):
    """One conversation's sandboxed kernel. Created by :meth:`Engine.session`.

    Cells sent to one session run one at a time, in order; different sessions
    run in parallel.
    """

    def __init__(
        self,
        session_id: str,
        kernel: SandboxedKernel,
        lifetime: Lifetime,
        *,
        clock: Clock,
        acquire_kernel: Callable[[], Awaitable[SandboxedKernel]],
        release_kernel: Callable[[SandboxedKernel], Awaitable[None]],
        restart_dead_kernels: bool = False,
        workspace: SessionWorkspace | None = None,
        agent_id: str | None = None,
    ) -> None:
        self.id = session_id
        self.agent_id = agent_id
        #: The session's files: its view of the store and what its kernel's workspace holds.
        self.workspace = workspace
        self.kernel: SandboxedKernel | None = kernel
        self.lifetime = lifetime
        self.state = SessionState.ACTIVE
        self.cells_run = 0
        self.ended_reason: str | None = None
        self.ended_at: float | None = None
        self._clock = clock
        self._acquire = acquire_kernel
        self._release = release_kernel
        self._restart_dead = restart_dead_kernels
        self._lock = asyncio.Lock()
        self._dead_message: str | None = None
        #: a cell is executing (activity: it keeps the TTL and idle timeout off)
        self._running = False

    # -- running code ---------------------------------------------------------------

    async def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_output: OutputCallback | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> ExecutionResult:
        """Run one cell in this session's kernel.

        Files the cell creates or changes under ``/mnt/data``, and images it
        displays, are stored and listed in the result's ``files``.

        Args:
            code: the cell's Python source.
            timeout_s: wall timeout (default: the policy's).
            on_output: called with each iopub message as it arrives.
            restart: if the kernel has died, start on a fresh one (the result
                then has ``state_lost``) instead of raising. Defaults to the
                engine's ``restart_dead_kernels``. The session's files are put
                back into the fresh workspace.
            file_ids: stored files to copy into ``/mnt/data`` before the cell
                (they become this session's).

        Raises:
            SessionExpired: past its TTL, idle timeout or maximum lifetime.
            SessionClosed: after :meth:`close`.
            KernelDead: its kernel died and restarting is not allowed.
        """
        async with self._lock:
            self._check_usable()
            # From here the run is activity: the TTL and idle timeout do not end the
            # session while a fresh kernel is acquired, files are placed, the cell runs.
            self._running = True
            try:
                return await self._run_held(code, timeout_s, on_output, restart, file_ids)
            finally:
                self._running = False

    async def _run_held(
        self,
        code: str,
        timeout_s: float | None,
        on_output: OutputCallback | None,
        restart: bool | None,
        file_ids: Sequence[str],
    ) -> ExecutionResult:
        """:meth:`run`, the session's lock held and its use checked."""
        state_lost = False
        if self.kernel is not None and not self.kernel.alive:
            # It died between cells (a thread a cell left, the OOM killer, a kill
            # from outside): found now, it is a dead kernel like one a cell ended.
            await self._kernel_died(self.kernel.dead_reason or "it exited between cells")
        if self.state is SessionState.DEAD:
            if not (self._restart_dead if restart is None else restart):
                raise KernelDead(
                    f"session {self.id!r}: {self._dead_message}. Its variables are lost; "
                    "run again with restart=True for a fresh kernel, or open a new session"
                )
            fresh = await self._acquire()
            try:
                # Closed or expired while the kernel was being acquired: that stands.
                self._check_usable()
                if self.workspace is not None:
                    with self._closed_meanwhile():
                        await self.workspace.prepare(fresh.workspace, restart=True)
                self._check_usable()  # or while its files were put back
            except BaseException:
                await self._release(fresh)
                raise
            self.kernel = fresh
            self.state = SessionState.ACTIVE
            state_lost = True
            if self.workspace is not None:
                # Given to the agent while the files were put back: the engine gave it to
                # the sessions that had a kernel, and this one had none then.
                await self.workspace.give_missed_agent_files(fresh.workspace)
                self._check_usable()  # closed or expired meanwhile: its kernel is gone
        current = self.kernel
        assert current is not None
        kernel = current
        self.lifetime.ran(self._clock())
        if file_ids and self.workspace is not None:
            with self._closed_meanwhile():
                await self.workspace.attach(kernel.workspace, file_ids)
            # Closed while they were placed: its kernel is gone, which is no death.
            self._check_usable()
        result = await kernel.execute(code, timeout_s=timeout_s, on_output=on_output)
        self.lifetime.ran(self._clock())
        self.cells_run += 1
        if self.workspace is not None and not self.closed:
            # Before a dead kernel is released: its workspace still exists.
            result = await self.workspace.collect(kernel.workspace, result)
        # Not the status alone: "oom" with the kernel alive is a process of the
        # cell killed, the kernel and its variables still there.
        if not result.kernel_alive:
            await self._kernel_died(result.message or result.status)
        if self.state is SessionState.EXPIRED and result.status == "killed":
            # Ended by its expiry (max_lifetime_s, or a TTL passed meanwhile): say so.
            why = self.lifetime.describe(self.ended_reason or "ttl")
            result = result.model_copy(
                update={"message": f"the session expired while the cell ran: {why}"}
            )
        if state_lost:
            update: dict[str, Any] = {"state_lost": True}
            if self.workspace is not None and self.workspace.not_restored:
                paths = ", ".join(listed_file_name(p) for p in self.workspace.not_restored)
                note = f"not put back after the kernel restarted (deleted, or expired): {paths}"
                if result.files_note:
                    note = f"{result.files_note}; {note}"
                update["files_note"] = note
            result = result.model_copy(update=update)
        return result

    async def _kernel_died(self, message: str) -> None:
        if self.closed:  # closed or expired while the cell ran: that state stands
            return
        self.state = SessionState.DEAD
        self._dead_message = f"its kernel died ({message})"
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await self._release(kernel)

    def _check_usable(self) -> None:
        if self.state is SessionState.CLOSED:
            raise SessionClosed(f"session {self.id!r} was closed")
        if self.state is SessionState.EXPIRED:
            raise self.expired_error()
        expiry = self.expiry(self._clock())
        if expiry is not None:
            # Expired since the reaper's last pass: same answer as after it (its
            # next pass ends the kernel).
            self.state = SessionState.EXPIRED
            self.ended_reason, self.ended_at = expiry
            raise self.expired_error()

    def expiry(self, now: float) -> tuple[str, float] | None:
        """``(reason, when)`` if the session is past its expiry at ``now`` (a running
        cell counts as activity), else None."""
        return self.lifetime.expiry(now, running=self._running)

    def expired_error(self) -> SessionExpired:
        when = self._wall(self.ended_at or self._clock()).isoformat(timespec="seconds")
        why = self.lifetime.describe(self.ended_reason or "ttl")
        return SessionExpired(
            f"session {self.id!r} expired at {when} because {why}; its kernel was ended. "
            "Open a new session (its files stay downloadable by id)"
        )

    # -- files -----------------------------------------------------------------------

    async def upload(self, source: UploadSource, name: str | None = None) -> StoredFile:
        """Store a file for this session and copy it into ``/mnt/data``.

        Args:
            source: bytes, a path, or a binary stream.
            name: the file's name (default: the path's name; required otherwise).

        Raises:
            FileRejected: unsupported type, mislabelled content, over the size cap.
        """
        return await self._store_upload(source, name)

    async def _store_upload(
        self, source: UploadSource, name: str | None, *, retention_s: float | None = None
    ) -> StoredFile:
        self._check_usable()
        workspace = self._require_workspace()
        async with self._lock:
            self._check_usable()  # closed or expired while a cell held the lock
            # A dead kernel has no workspace: the file is placed when a restart makes one.
            folder = self.kernel.workspace if self.kernel is not None else None
            with self._closed_meanwhile():
                return await workspace.upload(folder, source, name, retention_s=retention_s)

    async def attach(self, file_ids: Sequence[str]) -> list[str]:
        """Copy stored files into ``/mnt/data`` now; returns their paths there."""
        self._check_usable()
        workspace = self._require_workspace()
        async with self._lock:
            self._check_usable()
            if self.kernel is None:
                raise KernelDead(f"session {self.id!r} has no kernel: {self._dead_message}")
            with self._closed_meanwhile():
                return await workspace.attach(self.kernel.workspace, file_ids)

    @contextlib.contextmanager
    def _closed_meanwhile(self) -> Iterator[None]:
        """A failure placing files is the session's end if it ended meanwhile.

        Closing does not wait for the session's lock (a cell may hold it for
        long): its kernel's folder can go while a file is being placed there,
        and "no such file" would read as the file refused.
        """
        try:
            yield
        except Exception:
            if self.closed:
                self._check_usable()  # SessionClosed or SessionExpired, from what failed
            raise

    async def files(self) -> list[StoredFile]:
        """Files uploaded to this session and produced by it (also after it ended)."""
        return await self._require_workspace().list()

    def _require_workspace(self) -> SessionWorkspace:
        if self.workspace is None:
            raise SessionClosed(f"session {self.id!r} has no file store")
        return self.workspace

    async def interrupt(self) -> None:
        """Interrupt the running cell, if any.

        Raises:
            SessionExpired, SessionClosed: the session has ended (as its other calls do).
        """
        self._check_usable()
        if self.kernel is not None:
            await self.kernel.interrupt()

    # -- lifetime ----------------------------------------------------------------------

    async def extend(self, ttl_s: float | None = None) -> float:
        """Keep the session alive: its TTL counts again from now.

        Args:
            ttl_s: a new TTL for this session (default: keep the current one).

        Returns:
            The new expiry time, as a Unix time.

        Raises:
            BadInput: ``ttl_s`` is not above 0 and at most 30 days.
        """
        return self.extend_now(ttl_s)

    def extend_now(self, ttl_s: float | None = None) -> float:
        """:meth:`extend`, for code on the engine's own loop (no await)."""
        if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:  # nan too
            raise BadInput(f"ttl_s must be above 0 and at most {MAX_TTL_S:g} s (got {ttl_s!r})")
        self._check_usable()
        if ttl_s is not None:
            self.lifetime.ttl_s = ttl_s
        self.lifetime.touch(self._clock())
        return self._wall(self.lifetime.expires_at()).timestamp()

    async def close(self) -> None:
        """End the session and destroy its kernel. Idempotent."""
        await self._end(SessionState.CLOSED, "closed")

    async def _end(self, state: SessionState, reason: str, when: float | None = None) -> None:
        if not self.closed:
            self.state = state
            self.ended_reason = reason
            self.ended_at = self._clock() if when is None else when
        # Also for a session found expired on use (which only marks it): its kernel ends now.
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            # A cell still running sees its kernel end and returns "killed".
            await self._release(kernel)
        if self.workspace is not None and self.closed:
            self.workspace.forget()

    async def expire(self, reason: str, when: float) -> None:
        """Called by the reaper: end the session as expired."""
        await self._end(SessionState.EXPIRED, reason, when)

    @property
    def closed(self) -> bool:
        return self.state in (SessionState.CLOSED, SessionState.EXPIRED)

    # -- reporting ---------------------------------------------------------------------

    def _wall(self, t: float, offset: float | None = None) -> datetime:
        """Engine-clock time ``t`` as a UTC datetime (``offset``: wall minus engine clock)."""
        if offset is None:
            offset = time.time() - self._clock()
        return datetime.fromtimestamp(t + offset, tz=UTC)

    async def info(self) -> SessionInfo:
        """The session's state and times."""
        return self.snapshot()

    def snapshot(self) -> SessionInfo:
        """:meth:`info`, for code on the engine's own loop (no await)."""
        # One offset for all three: their differences are the engine clock's.
        offset = time.time() - self._clock()
        return SessionInfo(
            id=self.id,
            state=self.state,
            created_at=self._wall(self.lifetime.created_at, offset),
            last_active=self._wall(self.lifetime.last_touch, offset),
            expires_at=self._wall(self.ended_at or self.lifetime.expires_at(), offset),
            cells_run=self.cells_run,
            kernel_id=self.kernel.kernel_id if self.kernel is not None else None,
            ended_reason=self.ended_reason,
            agent_id=self.agent_id,
        )
