"""The public entry point: an async :class:`Engine` of warm, sandboxed sessions.

::

    async with Engine(pool_size=2) as engine:
        session = await engine.session("thread-42")
        result = await session.run("print(1 + 1)")

The engine owns the sandbox host, the warm pool, every session and two
background tasks (pool refill and session reaper). Leaving its context ends
every kernel within a bounded time and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Literal, Unpack

from pydantic import BaseModel

from sandkernel.api import KernelConnectionInfo
from sandkernel.batch import BatchPool, RunRequest, RunResult
from sandkernel.config import DEFAULT_PREWARM as DEFAULT_PREWARM
from sandkernel.config import EngineConfig, EngineSettings
from sandkernel.errors import (
    BadInput,
    EngineClosed,
    FileNotFoundInStore,
    KernelDead,
    SelfCheckFailed,
    SessionClosed,
    SessionExpired,
    SessionLimitReached,
    SessionNotFound,
)
from sandkernel.files import FileStore, StoredFile
from sandkernel.kernel import SandboxedKernel
from sandkernel.limits import check_id
from sandkernel.policy import Policy, load_policy
from sandkernel.pool import Pool, PoolStats
from sandkernel.results import DisplayOutput, ExecutionResult, ProducedFile, Usage
from sandkernel.sandbox import Runtime, SandboxHost
from sandkernel.sandbox.host_workspace import check_host_workspace
from sandkernel.sandbox.zygote import Zygote, ZygoteSupervisor
from sandkernel.session import (
    Clock,
    Lifetime,
    Session,
    SessionInfo,
    SessionState,
    UploadSource,
)
from sandkernel.workspace import OutputCaps, SessionWorkspace

log = logging.getLogger(__name__)

_KEEP_ENDED = 10_000  # ended sessions remembered, to answer "expired when and why"


class EngineStats(BaseModel):
    """Pool and session figures, as ``engine.stats()`` reports them."""

    pool: PoolStats
    sessions_active: int
    sessions_dead: int
    sessions_expired: int
    sessions_closed: int
    uptime_s: float


class Engine:
    """Warm sandboxed kernels, handed out as sessions. Use as ``async with Engine(...)``.

    Args:
        config: the engine's settings (see :class:`~sandkernel.config.EngineConfig`
            for each one, its unit and default).
        clock: monotonic clock (injected in tests).
        handle_sigterm: in the main thread, end every kernel on SIGTERM, then exit.
        **settings: fields of :class:`~sandkernel.config.EngineConfig`, applied over
            ``config``: ``Engine(pool_size=2)`` is ``Engine(EngineConfig(pool_size=2))``.

    Raises:
        TypeError: a setting EngineConfig does not have.
        ValueError: a setting out of range.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        handle_sigterm: bool = True,
        **settings: Unpack[EngineSettings],
    ) -> None:
        config = EngineConfig.build(config, settings)
        self.config = config
        self.policy = load_policy(config.policy)
        self.pool_size = config.pool_size
        self.max_sessions = config.max_sessions
        self.max_kernels = (
            config.max_kernels
            if config.max_kernels is not None
            else config.max_sessions + config.pool_size
        )
        self.max_concurrent_starts = config.max_concurrent_starts
        self.refill_delay_s = config.refill_delay_s
        self.session_ttl_s = config.session_ttl_s
        self.idle_timeout_s = config.idle_timeout_s
        self.max_lifetime_s = config.max_lifetime_s
        self.acquire_timeout_s = config.acquire_timeout_s
        self.prewarm_imports = config.prewarm_imports
        #: prewarm imports already reported failing (each kernel tries them again)
        self._prewarm_failed: set[str] = set()
        self.self_check = config.self_check
        self.restart_dead_kernels = config.restart_dead_kernels
        self._python = config.python
        self._runtime_dir = Path(config.runtime_dir) if config.runtime_dir is not None else None
        self._store_dir = (
            Path(config.store_dir) if config.store_dir is not None else default_store_dir()
        )
        self.max_upload_bytes = config.max_upload_bytes
        self.output_caps = OutputCaps(
            max_files=config.max_produced_files,
            max_bytes=config.max_produced_bytes,
            retention_s=config.produced_file_retention_s,
            max_session_bytes=(
                self.policy.workspace_mb << 20
                if config.max_session_produced_bytes is None
                else config.max_session_produced_bytes
            ),
        )
        self._store: FileStore | None = None
        self.batch_workers = config.batch_workers
        self._batch: BatchPool | None = None
        self._batch_lock = asyncio.Lock()
        self.reap_interval_s = config.reap_interval_s
        self._clock = clock
        self._handle_sigterm = handle_sigterm
        self._host: SandboxHost | None = None
        #: the warm zygote kernels are forked from (``config.zygote``), set by start()
        self.zygotes: ZygoteSupervisor | None = None
        self._pool: Pool | None = None
        self._sessions: dict[str, Session] = {}
        self._creating: dict[str, asyncio.Future[Session]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = 0.0
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._sigterm_installed = False

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Claim the host, sweep what a dead engine left, start the pool and the reaper."""
        if self._state != "new":
            raise EngineClosed("an Engine can be started once")
        runtime = Runtime.detect(self._python)
        self._store = await asyncio.to_thread(
            FileStore, self._store_dir, max_bytes=self.max_upload_bytes
        )
        try:
            self._host = await asyncio.to_thread(
                SandboxHost,
                self._runtime_dir,
                runtime=runtime,
                refused_workspaces=[self._store_dir],
            )
        except BaseException:
            self._store.close()
            raise
        if self.config.zygote:
            self.zygotes = ZygoteSupervisor(self._host, self.policy, self.prewarm_imports)
        self._pool = Pool(
            self._start_kernel,
            size=self.pool_size,
            max_kernels=self.max_kernels,
            max_concurrent_starts=self.max_concurrent_starts,
            refill_delay_s=self.refill_delay_s,
        )
        self._started_at = self._clock()
        self._state = "running"
        self._spawn(self._pool.run(), "pool")
        self._spawn(self._reaper(), "reaper")
        self._install_sigterm()

    async def aclose(self) -> None:
        """End every session and kernel; release the host. Idempotent and bounded."""
        if self._state in ("closing", "closed", "new"):
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        self._remove_sigterm()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(s._end(SessionState.CLOSED, "engine") for s in self._sessions.values()),
            return_exceptions=True,
        )
        if self._pool is not None:
            await self._pool.close()
        if self.zygotes is not None:
            await self.zygotes.close()
        if self._batch is not None:
            await self._batch.close()
        if self._host is not None:
            self._host.close()
        if self._store is not None:
            self._store.close()
        self._state = "closed"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"sandkernel-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _install_sigterm(self) -> None:
        if not self._handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return  # the embedding program handles SIGTERM itself
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _remove_sigterm(self) -> None:
        if self._sigterm_installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
            self._sigterm_installed = False

    def _on_sigterm(self) -> None:
        async def shutdown_then_exit() -> None:
            await self.aclose()
            # Die of SIGTERM as the sender asked, now that nothing is left behind.
            os.kill(os.getpid(), signal.SIGTERM)

        asyncio.get_running_loop().create_task(shutdown_then_exit())

    def _require_running(self) -> tuple[SandboxHost, Pool]:
        if self._state != "running" or self._host is None or self._pool is None:
            raise EngineClosed(
                "the engine is not running: use `async with Engine(...)` or await start()"
            )
        return self._host, self._pool

    # -- kernels --------------------------------------------------------------------

    async def _start_kernel(self, workspace: Path | None = None) -> SandboxedKernel:
        host, _ = self._require_running()
        zygotes = self.zygotes
        zygote = await zygotes.get() if zygotes is not None else None
        if zygotes is not None and zygote is not None:
            try:
                kernel = await self._start_one(host, workspace, zygote)
            except SelfCheckFailed:
                # The sandbox failed, not the fork (whose own checks are part of
                # start()): a cold kernel would fail alike, so none is tried.
                raise
            except Exception as exc:  # noqa: BLE001 - the fallback is a cold start
                await zygotes.failed(exc)
            else:
                zygotes.succeeded()
                return kernel
        return await self._start_one(host, workspace, None)

    async def _start_one(
        self, host: SandboxHost, workspace: Path | None, zygote: Zygote | None
    ) -> SandboxedKernel:
        kernel = SandboxedKernel(host, self.policy, workspace=workspace, zygote=zygote)
        try:
            await kernel.start()
            failed = await kernel.prepare(self_check=self.self_check, imports=self.prewarm_imports)
        except BaseException:
            await kernel.shutdown()
            raise
        for module in failed.keys() - self._prewarm_failed:
            self._prewarm_failed.add(module)
            # Not fatal (the user's own import says why), but it costs every
            # kernel start a failing search, and a misspelt name would go unseen.
            log.warning("prewarm import %r fails in the sandbox: %s", module, failed[module])
        return kernel

    # -- sessions ------------------------------------------------------------------

    async def session(
        self,
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        workspace: str | Path | None = None,
        if_expired: Literal["raise", "new"] = "raise",
    ) -> Session:
        """Get the session for a conversation/thread id, creating it if needed.

        Args:
            session_id: the conversation's id; ``None`` creates a new random one.
            agent_id: the agent the session works for: its files appear in
                ``/mnt/data``, read-only (only used when the session is created).
            workspace: a host folder to use as ``/mnt/data`` instead of a fresh
                tmpfs, kept afterwards. It becomes the sandbox user's, with all
                it holds, so it must not exist yet (it is made), be empty, or be
                one a sandbox used before; give the code files with
                :meth:`Session.upload`. Never a link, a system or home folder,
                nor the engine's own. Its size is not capped: the policy's
                ``workspace_mb`` sizes the tmpfs only (each file is still capped
                by ``file_size_mb``). Such a session's kernel is started for it,
                outside the warm pool: forked from the zygote when one runs
                (``EngineConfig.zygote``), else cold.
            if_expired: for an id whose session expired or was closed: ``"raise"``
                (:class:`~sandkernel.errors.SessionExpired` says when and why) or
                ``"new"`` (start a fresh session under the same id).

        Raises:
            BadInput: the ``workspace`` may not be a sandbox's (nothing was changed).
            EngineClosed: the engine is not running, or began closing meanwhile.
            PoolExhausted: no kernel within ``acquire_timeout_s``.
            KernelStartFailed: kernels fail to start one after another (says
                why); raised as soon as that is seen, not at the deadline.
            SessionLimitReached: ``max_sessions`` are alive.
            SessionExpired, SessionClosed: see ``if_expired``.
        """
        _, pool = self._require_running()
        if session_id is None:
            session_id = f"sess-{secrets.token_hex(8)}"
        else:
            check_id(session_id, "session")
        existing = self._sessions.get(session_id)
        if existing is not None:
            if not existing.closed:
                with contextlib.suppress(SessionExpired):  # answered below, as if_expired says
                    existing._check_usable()
            if not existing.closed:
                return existing
            if if_expired == "raise":
                if existing.state is SessionState.EXPIRED:
                    raise existing.expired_error()
                raise SessionClosed(f"session {session_id!r} was closed")
            if existing.kernel is not None:
                # Found expired since the reaper's last pass: the new session under
                # its id replaces it in the table, where the reaper would find it.
                await existing.expire(existing.ended_reason or "ttl", existing.ended_at or 0.0)
                # Another caller may have begun (or made) that session while the old
                # kernel ended: looked up again, so that one id has one session.
                return await self.session(
                    session_id, agent_id=agent_id, workspace=workspace, if_expired=if_expired
                )
        pending = self._creating.get(session_id)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except _CreationAbandoned:
                # Its creator was cancelled: this caller was not, and starts over.
                return await self.session(
                    session_id, agent_id=agent_id, workspace=workspace, if_expired=if_expired
                )
        # Sessions being created count: their kernels are on the way.
        alive = sum(1 for s in self._sessions.values() if not s.closed) + len(self._creating)
        if alive >= self.max_sessions:
            raise SessionLimitReached(
                f"{alive} sessions are alive or starting (max_sessions={self.max_sessions}); "
                "close some or raise max_sessions"
            )
        if agent_id is not None:
            check_id(agent_id, "agent")
        files = SessionWorkspace(
            self._require_store(), self.output_caps, session_id=session_id, agent_id=agent_id
        )
        future: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._creating[session_id] = future
        try:
            if workspace is None:
                acquire = partial(pool.acquire, timeout_s=self.acquire_timeout_s)
            else:
                # Refused before a kernel starts for it: a refusal from the
                # host's claim, at the start, would count as the zygote's
                # failure. The store is refused too: a sandbox owning a folder
                # of it could swap the files other sessions get.
                host, _ = self._require_running()
                checked = await asyncio.to_thread(
                    check_host_workspace, Path(workspace), also_refused=host.refused_workspaces
                )
                # Started by the pool, outside its warm kernels: closing it ends this one too.
                acquire = partial(pool.start_outside, partial(self._start_kernel, checked))
            kernel = await acquire()
            try:
                await files.prepare(kernel.workspace, restart=False)
                # Closing began meanwhile: it ended the sessions it knew, not this one.
                self._require_running()
            except BaseException:
                await pool.release(kernel)
                raise
            now = self._clock()
            session = Session(
                session_id,
                kernel,
                Lifetime(now, self.session_ttl_s, self.idle_timeout_s, self.max_lifetime_s),
                clock=self._clock,
                acquire_kernel=acquire,
                release_kernel=pool.release,
                restart_dead_kernels=self.restart_dead_kernels,
                workspace=files,
                agent_id=agent_id,
            )
            self._sessions[session_id] = session
            self._forget_old_sessions()
            # Given to the agent while the workspace was filled: listed too late
            # for it, and given to the live sessions before this was one.
            await files.give_missed_agent_files(kernel.workspace)
            future.set_result(session)
            return session
        except BaseException as exc:
            # A cancellation is this caller's, not an answer for the others waiting.
            cancelled = isinstance(exc, asyncio.CancelledError)
            future.set_exception(_CreationAbandoned() if cancelled else exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._creating[session_id]

    async def get_session(self, session_id: str) -> Session:
        """The live session with this id (never creates one).

        Raises:
            SessionNotFound, SessionExpired, SessionClosed.
        """
        return self.live_session(session_id)

    def live_session(self, session_id: str) -> Session:
        """:meth:`get_session`, for code on the engine's own loop (no await)."""
        session = self._known(session_id)
        session._check_usable()
        return session

    def _known(self, session_id: str) -> Session:
        """The session with this id, alive or recently ended; SessionNotFound if none."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    async def kernel_link(self, session_id: str) -> SessionKernelLink:
        """The live kernel of a session, for a frontend that relays Jupyter messages to it.

        Raises:
            SessionNotFound, SessionExpired, SessionClosed, KernelDead.
        """
        session = self.live_session(session_id)
        if session.kernel is None or not session.kernel.alive:
            raise KernelDead(f"session {session_id!r} has no live kernel")
        return SessionKernelLink(session, session.kernel, self._clock)

    async def close_session(self, session_id: str) -> None:
        """Close a session by id (idempotent for ended sessions)."""
        await self._known(session_id).close()

    async def sessions(self) -> list[SessionInfo]:
        """Every session the engine knows, alive or recently ended."""
        return [s.snapshot() for s in self._sessions.values()]

    async def session_info(self, session_id: str) -> SessionInfo:
        """A session the engine knows, alive or recently ended.

        Raises:
            SessionNotFound: none has this id (or it ended long ago).
        """
        return self._known(session_id).snapshot()

    def _forget_old_sessions(self) -> None:
        ended = [s for s in self._sessions.values() if s.closed]
        for s in sorted(ended, key=lambda s: s.ended_at or 0)[: max(0, len(ended) - _KEEP_ENDED)]:
            del self._sessions[s.id]

    # -- reaping ------------------------------------------------------------------

    async def reap(self, now: float | None = None) -> list[str]:
        """End every session past its expiry. Returns their ids.

        Kernels are shut down concurrently, so one slow kernel delays no other.
        """
        now = self._clock() if now is None else now
        expired = []
        for session in list(self._sessions.values()):
            if session.closed:
                if session.kernel is not None and session.state is SessionState.EXPIRED:
                    # Found expired on use since the last pass: it keeps when and why.
                    expired.append((session, (session.ended_reason or "ttl", now)))
                continue
            expiry = session.expiry(now)
            if expiry is not None:
                expired.append((session, expiry))
        await asyncio.gather(
            *(s.expire(reason, when) for s, (reason, when) in expired), return_exceptions=True
        )
        if self._store is not None:
            await asyncio.to_thread(self._store.purge_expired, time.time())
        return [s.id for s, _ in expired]

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            try:
                ended = await self.reap()
                if ended:
                    log.info("expired sessions: %s", ", ".join(ended))
            except Exception:
                log.exception("session reaper pass failed; continuing")

    # -- one-shot runs (the batch path) ------------------------------------------------

    async def _batch_pool(self) -> BatchPool:
        host, _ = self._require_running()
        async with self._batch_lock:
            if self._batch is None:
                pool = BatchPool(host, self.policy, workers=self.batch_workers)
                await pool.start()
                self._batch = pool
            return self._batch

    async def run_once(
        self,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, bytes] | None = None,
        fetch_files: Sequence[str] = (),
        argv: Sequence[str] = (),
        timeout_s: float | None = None,
        memory_mb: int | None = None,
    ) -> RunResult:
        """Run ``code`` once as a program (``python main.py``), statelessly.

        Runs on the batch path: a fork of a warm, sandboxed server, in a fresh
        working directory, with nothing left for the next run. Exit codes,
        stdin, ``sys.argv`` and ``__main__`` behave as for ``python file.py``.

        Args:
            code: the program.
            stdin: what it reads on standard input.
            files: ``relative path -> content`` written into its working
                directory (text as UTF-8).
            fetch_files: files returned afterwards (``RunResult.files``): paths
                relative to the working directory, or absolute in ``/tmp``,
                ``/dev/shm`` or ``/mnt/data``; any other, and a missing file,
                is listed in ``RunResult.missing_files``.
            argv: ``sys.argv[1:]``.
            timeout_s: wall limit (default: the policy's ``wall_timeout_s``).
            memory_mb: memory limit of the run (default: the policy's).
        """
        request = RunRequest.program(
            code, stdin=stdin, files=files, fetch_files=fetch_files, argv=argv,
            timeout_s=timeout_s, memory_mb=memory_mb,
        )  # fmt: skip
        return await (await self._batch_pool()).run(request)

    async def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> AsyncIterator[RunResult]:
        """Run many requests, yielding results as they finish (tag them with ``id``).

        Requests are pulled only as slots free up, so memory stays bounded
        for any number of them.
        """
        pool = await self._batch_pool()
        async for result in pool.run_many(requests, concurrency=concurrency):
            yield result

    # -- files ----------------------------------------------------------------------

    def _require_store(self) -> FileStore:
        if self._store is None or self._state != "running":
            raise EngineClosed("the engine is not running")
        return self._store

    async def upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store a file and get its id.

        Args:
            source: bytes, a path, or a binary stream.
            name: the file's name (default: the path's name; required otherwise).
                Its extension must be a supported type and match the content.
            session_id: give it to this live session (copied into its ``/mnt/data``).
            agent_id: give it to this agent: every session of the agent sees it
                read-only in ``/mnt/data``, live sessions included.
            retention_s: delete it after this long (default: keep).

        Raises:
            FileRejected: why, and what is allowed.
            SessionNotFound, SessionExpired, SessionClosed: for ``session_id``.
        """
        store = self._require_store()
        if session_id is not None:
            if agent_id is not None:
                raise BadInput("a file goes to a session or to an agent, not both")
            session = self.live_session(session_id)
            return await session._store_upload(source, name, retention_s=retention_s)
        if agent_id is not None:
            check_id(agent_id, "agent")
        stored = await asyncio.to_thread(
            store.add_upload, source, name, agent_id=agent_id, retention_s=retention_s
        )
        if agent_id is not None:
            await self._give_to_agent_sessions(agent_id, [stored])
        return stored

    async def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        """Give stored files to an agent (they appear in its sessions, read-only)."""
        store = self._require_store()
        check_id(agent_id, "agent")
        # All checked before any is given: a refused id leaves the agent's files as they were.
        for file_id in file_ids:
            stored = await asyncio.to_thread(store.get, file_id)
            if stored.session_id is not None or stored.agent_id not in (None, agent_id):
                raise FileNotFoundInStore(f"no file {file_id!r} that can be given to an agent")
        attached = []
        try:
            for file_id in file_ids:
                attached.append(await asyncio.to_thread(store.attach, file_id, agent_id=agent_id))
        finally:
            # Those given (all, unless one went meanwhile) reach its live sessions.
            await self._give_to_agent_sessions(agent_id, attached)
        return attached

    async def _give_to_agent_sessions(self, agent_id: str, files: list[StoredFile]) -> None:
        # A copy: sessions come and go while each placement awaits its thread.
        for session in list(self._sessions.values()):
            if (
                session.agent_id != agent_id
                or session.closed
                or session.kernel is None
                or session.workspace is None
            ):
                continue
            for stored in files:
                await session.workspace.give_agent_file(session.kernel.workspace, stored)
                if session.closed or session.kernel is None:
                    break

    async def file(self, file_id: str) -> StoredFile:
        """A stored file's metadata. Raises FileNotFoundInStore."""
        return await asyncio.to_thread(self._require_store().get, file_id)

    async def download(self, file_id: str, *, max_bytes: int | None = None) -> bytes:
        """A stored file's bytes, or its first ``max_bytes`` (:meth:`open_file` streams)."""
        store = self._require_store()
        if max_bytes is None:
            return await asyncio.to_thread(store.read_bytes, file_id)

        def head() -> bytes:
            with store.open(file_id) as handle:
                return handle.read(max_bytes)

        return await asyncio.to_thread(head)

    def open_file(self, file_id: str) -> BinaryIO:
        """A stored file as a binary stream (blocking reads; close it when done)."""
        return self._require_store().open(file_id)

    async def list_files(
        self, *, session_id: str | None = None, agent_id: str | None = None
    ) -> list[StoredFile]:
        """Stored files, optionally of one session or one agent."""
        store = self._require_store()
        return await asyncio.to_thread(store.list, session_id=session_id, agent_id=agent_id)

    async def delete_file(self, file_id: str) -> None:
        """Delete a stored file (copies already in workspaces stay there)."""
        await asyncio.to_thread(self._require_store().delete, file_id)

    # -- reporting ----------------------------------------------------------------

    async def stats(self) -> EngineStats:
        """Pool and session metrics."""
        return self.stats_now()

    def stats_now(self) -> EngineStats:
        """:meth:`stats`, for code on the engine's own loop (no await)."""
        _, pool = self._require_running()
        counts = dict.fromkeys(SessionState, 0)
        for s in self._sessions.values():
            counts[s.state] += 1
        zygotes = self.zygotes
        start = zygotes.status() if zygotes is not None else "cold start (zygote=False)"
        return EngineStats(
            pool=pool.stats().model_copy(update={"kernel_start": start}),
            sessions_active=counts[SessionState.ACTIVE],
            sessions_dead=counts[SessionState.DEAD],
            sessions_expired=counts[SessionState.EXPIRED],
            sessions_closed=counts[SessionState.CLOSED],
            uptime_s=round(self._clock() - self._started_at, 3),
        )


class SessionKernelLink:
    """One session's kernel as :class:`~sandkernel.api.KernelLink` offers it to a frontend."""

    def __init__(self, session: Session, kernel: SandboxedKernel, clock: Clock) -> None:
        self._session = session
        self._kernel = kernel
        self._clock = clock

    @property
    def session_id(self) -> str:
        return self._session.id

    @property
    def policy(self) -> Policy:
        return self._kernel.policy

    @property
    def alive(self) -> bool:
        return self._kernel.alive and self._session.kernel is self._kernel

    def connection_info(self) -> KernelConnectionInfo:
        info = self._kernel.connection_info()
        return KernelConnectionInfo(
            transport=str(info["transport"]),
            ip=str(info["ip"]),
            shell_port=int(info["shell_port"]),
            iopub_port=int(info["iopub_port"]),
            stdin_port=int(info["stdin_port"]),
            control_port=int(info["control_port"]),
            hb_port=int(info["hb_port"]),
            key=str(info["key"]),
            signature_scheme=str(info["signature_scheme"]),
        )

    def tap_iopub(self, tap: Callable[[list[bytes]], None]) -> Callable[[], None]:
        return self._kernel.tap_iopub(tap)

    async def wait_ended(self) -> None:
        await self._kernel.wait_ended()

    def touch(self, *, ran: bool) -> None:
        if self._session.closed:
            return
        now = self._clock()
        if ran:
            self._session.lifetime.ran(now)
        else:
            self._session.lifetime.touch(now)

    async def interrupt(self) -> None:
        if self.alive:
            await self._kernel.interrupt()

    async def collect(
        self, displays: Sequence[DisplayOutput], execution_count: int | None
    ) -> list[ProducedFile]:
        workspace = self._session.workspace
        # Also after the kernel died (out of memory...): its workspace is there until it ends.
        if workspace is None or self._session.closed or self._session.kernel is not self._kernel:
            return []
        self._session.cells_run += 1
        # The cell ran outside Session.run: what collecting needs of its result
        # is the images it displayed and its number.
        result = ExecutionResult(
            status="ok",
            displays=list(displays),
            usage=Usage(wall_ms=0),
            execution_count=execution_count,
        )
        return (await workspace.collect(self._kernel.workspace, result)).files

    def ended_because(self, fallback: str) -> str:
        session, kernel = self._session, self._kernel
        if session.state is SessionState.EXPIRED:
            return str(session.expired_error())
        if session.state is SessionState.CLOSED:
            return f"session {session.id!r} was closed"
        with contextlib.suppress(OSError):
            if kernel.cgroup.usage().oom_kills:
                return (
                    f"the sandbox ran out of memory (limit {kernel.policy.memory_mb} MiB, "
                    "policy field memory_mb); the kernel was killed and its variables are lost"
                )
        return fallback

    async def end(self, reason: str) -> None:
        if self._session.kernel is self._kernel:
            await self._session._kernel_died(reason)
        else:
            await self._kernel.shutdown()


class _CreationAbandoned(Exception):
    """The caller creating a session was cancelled; those waiting for it try again."""


def default_store_dir() -> Path:
    """``$SANDKERNEL_STATE_DIR/files``, else ``/var/lib/sandkernel/files``."""
    return Path(os.environ.get("SANDKERNEL_STATE_DIR") or "/var/lib/sandkernel") / "files"
