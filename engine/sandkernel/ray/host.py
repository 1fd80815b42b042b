"""The host actor: one per Ray node, owning that node's :class:`~sandkernel.engine.Engine`.

A :class:`NodeHost` runs as a detached async actor pinned to its node (hard
node affinity, ``num_cpus=0`` so it never takes a CPU from tasks). It owns the
node's warm pool, sessions and file store, and answers the driver's calls.

At its boundary it translates ids (see :mod:`sandkernel.ray._protocol`):
sessions are known inside by their bare names and outside as
``<tag>.<name>``, also in the engine's errors; a stored file's local id
becomes a cluster id carrying the tag. Expected errors
(:class:`~sandkernel.errors.SandkernelError`, ``ValueError``) come back as
:class:`~sandkernel.ray._protocol.Raised` values, so the driver re-raises
them as they were, without Ray's wrapper.

Lifetime: every driver holds a lease, renewed by its poll. A session is held
by every driver that opened it (made it, or opened it by name); when a
driver's lease is released or expires (it closed, or crashed), the sessions
no other driver holds are closed, as an embedded engine's end with its
process. When the last lease ends, the host closes its engine and kills
itself. Whatever way the actor's process ends, its guardian (see
:mod:`sandkernel.ray._guardian`) then sweeps the node of its kernels.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import platform
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, Literal

import ray

from sandkernel.batch import RunRequest, RunResult
from sandkernel.engine import Engine, default_store_dir
from sandkernel.errors import FileNotFoundInStore, SandkernelError
from sandkernel.files import FileStore, StoredFile
from sandkernel.files._common import CHUNK_BYTES
from sandkernel.ray._channel import ChannelServer, Endpoint
from sandkernel.ray._guardian import start_guardian
from sandkernel.ray._protocol import (
    CHANNEL_METHODS,
    HostClosing,
    HostConfig,
    HostInfo,
    HostStats,
    NeedFiles,
    Raised,
    claimed_from_elsewhere,
    cluster_file_id,
    expand_path,
    file_tag,
    node_tag,
    owner_id,
    policy_digest,
    session_id_of,
)
from sandkernel.ray.errors import FileLost
from sandkernel.results import ExecutionResult
from sandkernel.sandbox import default_runtime_root
from sandkernel.session import Session, SessionInfo

log = logging.getLogger(__name__)

_KEEP_ENDED = 10_000  # as the local engine: ended sessions remembered
#: How long a one-shot run's result may wait for others of its call, to travel
#: with them: a message per result cost many short runs a third of their
#: throughput through Ray calls, and 2.5 times the driver's CPU over the channel.
RESULT_LINGER_S = 0.01


def _replying[**P, R](
    method: Callable[Concatenate[NodeHost, P], Awaitable[R]],
) -> Callable[Concatenate[NodeHost, P], Awaitable[R | Raised]]:
    """Send expected errors back as values; anything else is a bug and stays an exception.

    A ``TypeError`` is expected: a caller's argument of the wrong type, raised
    to the caller as the embedded engine raises it.
    """

    async def reply(self: NodeHost, /, *args: P.args, **kwargs: P.kwargs) -> R | Raised:
        try:
            return await method(self, *args, **kwargs)
        except (SandkernelError, ValueError, TypeError) as exc:
            return Raised(exc)

    # Ray reads the name and the signature of actor methods.
    functools.update_wrapper(reply, method)
    return reply


def _naming_session[**P, R](
    method: Callable[Concatenate[NodeHost, str, P], Awaitable[R]],
) -> Callable[Concatenate[NodeHost, str, P], Awaitable[R]]:
    """Errors about the session ``name`` (the first argument) name it by its cluster-wide id."""

    async def call(self: NodeHost, name: str, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, name, *args, **kwargs)
        except (SandkernelError, ValueError) as exc:
            raise self._outward_error(exc, name) from None

    functools.update_wrapper(call, method)
    return call


class _FileIds:
    """Local file ids <-> cluster ids, plus the copies of other nodes' files."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._local: dict[str, str] = {}
        #: a file of another node (its cluster id) -> the local copy's id
        self._copies: dict[str, str] = {}
        #: a local copy's id -> the cluster id of the original it copies, at its first node
        self._origins: dict[str, str] = {}

    def outward(self, local_id: str) -> str:
        cluster_id = cluster_file_id(self.tag, local_id)
        self._local[cluster_id] = local_id
        return cluster_id

    def local(self, cluster_id: str) -> str | None:
        return self._local.get(cluster_id) or self._copies.get(cluster_id)

    def add_copy(self, cluster_id: str, local_id: str, origin: str) -> None:
        """``local_id`` copies ``cluster_id``, itself ``origin`` or a copy of it."""
        self._copies[cluster_id] = local_id
        self._origins[local_id] = origin
        self.outward(local_id)

    def origin(self, local_id: str, cluster_id: str) -> str:
        """The original of the file ``cluster_id`` (``local_id`` here): itself unless a copy."""
        return self._origins.get(local_id, cluster_id)

    def copies_of(self, origin: str) -> list[str]:
        """The local copies of the original ``origin`` (directly or through other copies)."""
        return [local for local, of in self._origins.items() if of == origin]

    def forget(self, local_id: str) -> None:
        for table in (self._local, self._copies):
            for key in [k for k, v in table.items() if v == local_id]:
                del table[key]
        self._origins.pop(local_id, None)


class NodeHost:
    """The sandkernel engine of one Ray node. Created by the cluster engine, not by hand."""

    def __init__(self, config: HostConfig) -> None:
        if config.niceness is not None:
            _renice_threads(config.niceness)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.tag = node_tag(self.node_id)
        self._config = config
        settings = config.engine
        self._runtime_dir = (
            expand_path(settings.runtime_dir, self.node_id) or default_runtime_root()
        )
        self._store_dir = expand_path(settings.store_dir, self.node_id) or default_store_dir()
        # One sandboxed fork server per CPU Ray gives the node (not per CPU of the
        # machine: several nodes may share one), unless told otherwise.
        batch_workers = settings.batch_workers or config.batch_slots or _node_cpus(self.node_id)
        self.engine = Engine(
            settings,
            handle_sigterm=False,
            runtime_dir=self._runtime_dir,
            store_dir=self._store_dir,
            batch_workers=batch_workers,
        )
        self._batch_slots: int = config.batch_slots or batch_workers
        self._batch_running = 0
        self._ids = _FileIds(self.tag)
        # One import at a time: two sessions of an agent opening at once must
        # not each copy the same file (the second copy would be known by no id).
        self._importing = asyncio.Lock()
        self._sessions: dict[str, Session] = {}
        self._agents: dict[str, str | None] = {}
        #: session name -> the clients that opened it (see the module's docstring)
        self._holders: dict[str, set[str]] = {}
        self._leases: dict[str, float] = {}
        self._state: Literal["new", "running", "failed", "closing"] = "new"
        self._failure: SandkernelError | None = None
        self._start_lock = asyncio.Lock()
        self._store: FileStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started_at = time.time()
        self._channel = ChannelServer(self._channel_call)
        self._endpoint: Endpoint | None = None
        # Started before any kernel, so that no kernel ever runs unguarded.
        self._guardian_fd: int | None = start_guardian(self._runtime_dir)

    # -- lifetime ---------------------------------------------------------------------

    async def start(
        self, client_id: str, lease_ttl_s: float
    ) -> tuple[HostInfo, Endpoint | None] | Raised:
        """Start the engine (once) and take a client's lease.

        Answers who this host is, and where its direct channel listens (None
        if it could not listen: drivers then use Ray calls only).
        """
        async with self._start_lock:
            if self._state == "new":
                try:
                    await self.engine.start()
                    self._store = await asyncio.to_thread(
                        FileStore, self._store_dir, max_bytes=self.engine.max_upload_bytes
                    )
                except SandkernelError as exc:
                    self._state, self._failure = "failed", exc
                    # After a delay, so that this answer reaches the driver first.
                    self._spawn(self._exit(f"its engine did not start: {exc}", delay_s=2.0))
                    return Raised(exc)
                address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]  # ray: untyped
                try:
                    self._endpoint = await self._channel.start(address)
                except OSError as exc:
                    log.warning("sandkernel host %s: no direct channel (%s)", self.tag, exc)
                self._state = "running"
                self._spawn(self._watch_leases())
        if self._state == "failed" and self._failure is not None:
            return Raised(self._failure)
        if self._state != "running":
            return Raised(HostClosing(f"the sandkernel host on node {self.node_id} is closing"))
        self._leases[client_id] = time.monotonic() + lease_ttl_s
        return self._info(), self._endpoint

    async def _channel_call(self, method: str, args: Sequence[Any]) -> Any:
        """A call that came over the direct channel: the same methods, the same replies."""
        if method not in CHANNEL_METHODS:
            return Raised(ValueError(f"{method!r} is not served over the channel"))
        answer = getattr(self, method)(*args)
        # A streaming method's items are sent one by one, as Ray streams them.
        return answer if inspect.isasyncgen(answer) else await answer

    def _info(self) -> HostInfo:
        host = self.engine._host
        return HostInfo(
            node_id=self.node_id,
            tag=self.tag,
            hostname=socket.gethostname(),
            address=ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]  # ray: untyped
            pid=os.getpid(),
            owner=host.owner if host is not None else "",
            runtime_dir=str(self._runtime_dir),
            store_dir=str(self._store_dir),
            policy=self.engine.policy.name,
            policy_digest=policy_digest(self.engine.policy),
            max_sessions=self.engine.max_sessions,
            pool_size=self.engine.pool_size,
            batch_slots=self._batch_slots,
            started_at=self._started_at,
            sandkernel_version=_version(),
            ray_version=ray.__version__,
            python=platform.python_version(),
        )

    @_replying
    async def poll(
        self, client_id: str, lease_ttl_s: float, names: Sequence[str]
    ) -> tuple[HostStats, list[SessionInfo]]:
        """Renew a client's lease; answers the figures and the infos of ``names``."""
        if self._state != "running":
            raise HostClosing(f"the sandkernel host on node {self.node_id} is closing")
        self._leases[client_id] = time.monotonic() + lease_ttl_s
        infos = [self._session_info(self._sessions[n]) for n in names if n in self._sessions]
        return self._stats(), infos

    async def release(self, client_id: str) -> None:
        """A client leaves: its sessions are closed; the last one to leave shuts the host down."""
        self._leases.pop(client_id, None)
        await self._client_left(client_id)
        if not self._leases and self._state == "running":
            self._spawn(self._exit("its last client left"))

    async def ping(self) -> None:
        """Answers while the actor lives (used to wait for its exit)."""

    async def shutdown(self) -> None:
        """Close the engine now, whoever holds a lease, then end the actor."""
        self._spawn(self._exit("it was told to shut down"))

    async def _watch_leases(self) -> None:
        period = max(0.5, min(5.0, self._config.lease_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for client, until in list(self._leases.items()):
                if until < now:
                    log.warning("sandkernel host %s: client %s stopped renewing", self.tag, client)
                    del self._leases[client]
                    await self._client_left(client)
            if not self._leases:
                await self._exit("no client renewed its lease")
                return

    async def _client_left(self, client_id: str) -> None:
        """Close the sessions ``client_id`` held that no other client holds."""
        orphans = []
        for name, holders in self._holders.items():
            if client_id in holders:
                holders.remove(client_id)
                if not holders and not self._sessions[name].closed:
                    orphans.append(self._sessions[name])
        if orphans:
            log.info("sandkernel host %s: client %s left its %d session(s)", self.tag, client_id,
                     len(orphans))  # fmt: skip
        # Never raised: the lease watcher calls this, and must live on.
        for outcome in await asyncio.gather(*(s.close() for s in orphans), return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("sandkernel host %s: closing a session failed: %r", self.tag, outcome)

    async def _exit(self, why: str, *, delay_s: float = 0.0) -> None:
        if self._state == "closing":
            return
        self._state = "closing"
        await asyncio.sleep(delay_s)
        log.info("sandkernel host on node %s shuts down: %s", self.node_id, why)
        try:
            await self._channel.close()
            await self.engine.aclose()
            if self._store is not None:
                self._store.close()
        finally:
            if self._guardian_fd is not None:
                os.close(self._guardian_fd)  # the guardian sweeps whatever is left, and exits
                self._guardian_fd = None
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stats(self) -> HostStats:
        stats = self.engine.stats_now()
        alive = stats.sessions_active + stats.sessions_dead
        return HostStats(
            node_id=self.node_id,
            tag=self.tag,
            engine=stats,
            free_session_slots=max(0, self.engine.max_sessions - alive),
            batch_slots=self._batch_slots,
            batch_running=self._batch_running,
            clients=len(self._leases),
        )

    # -- sessions ---------------------------------------------------------------------

    def _outward_error[E: Exception](self, exc: E, name: str) -> E:
        """``exc``, naming the session ``name`` by its cluster-wide id (as its callers know it)."""
        inside, outside = repr(name), repr(session_id_of(self.tag, name))
        message = str(exc)
        return type(exc)(message.replace(inside, outside)) if inside in message else exc

    def _session_info(self, session: Session) -> SessionInfo:
        if not session.closed:
            # Past its expiry, not yet reaped: expired, as the local engine answers it.
            with contextlib.suppress(SandkernelError):
                session._check_usable()
        return session.snapshot().model_copy(update={"id": session_id_of(self.tag, session.id)})

    @_replying
    @_naming_session
    async def open_session(
        self,
        name: str,
        client_id: str,
        agent_id: str | None,
        workspace: str | None,
        if_expired: Literal["raise", "new"],
    ) -> SessionInfo:
        """Get or create the session ``name`` (the local engine's semantics), for a client.

        The client holds it from now on, with any other that opened it: it is
        closed once they have all left.
        """
        session = await self.engine.session(
            name, agent_id=agent_id, workspace=workspace, if_expired=if_expired
        )
        if self._sessions.get(name) is not session:
            self._sessions[name] = session
            self._agents[name] = session.agent_id
            self._holders[name] = set()
            self._forget_old_sessions()
        self._holders[name].add(client_id)
        return self._session_info(session)

    def _forget_old_sessions(self) -> None:
        ended = [s for s in self._sessions.values() if s.closed]
        for s in sorted(ended, key=lambda s: s.ended_at or 0)[: max(0, len(ended) - _KEEP_ENDED)]:
            del self._sessions[s.id]
            self._agents.pop(s.id, None)
            self._holders.pop(s.id, None)

    @_replying
    async def find_session(self, name: str) -> SessionInfo | None:
        """The session ``name`` if this host has or had it, else None."""
        session = self._sessions.get(name)
        return None if session is None else self._session_info(session)

    @_replying
    @_naming_session
    async def check_session(self, name: str) -> SessionInfo:
        """The session ``name`` if it can be used, else the engine's error saying why not."""
        return self._session_info(self.engine.live_session(name))

    @_replying
    @_naming_session
    async def run(
        self,
        name: str,
        code: str,
        timeout_s: float | None,
        restart: bool | None,
        file_ids: Sequence[str],
    ) -> tuple[ExecutionResult, SessionInfo] | NeedFiles:
        """Run one cell; answers the result and the session's info (or the files it lacks)."""
        session = self.engine.live_session(name)
        local_ids = await self._resolve(file_ids) if file_ids else []
        if isinstance(local_ids, NeedFiles):
            return local_ids
        result = await session.run(code, timeout_s=timeout_s, restart=restart, file_ids=local_ids)
        return self._outward_result(result), self._session_info(session)

    async def run_stream(
        self,
        name: str,
        code: str,
        timeout_s: float | None,
        restart: bool | None,
        file_ids: Sequence[str],
    ) -> AsyncIterator[object]:
        """As :meth:`run`, yielding each iopub message first (a Ray streaming generator).

        Yields dicts (messages), then one of: ``(result, info)``, :class:`NeedFiles`,
        :class:`Raised`.
        """
        try:
            session = self.engine.live_session(name)
            local_ids = await self._resolve(file_ids) if file_ids else []
        except (SandkernelError, ValueError, TypeError) as exc:  # TypeError: as below
            yield Raised(self._outward_error(exc, name))
            return
        if isinstance(local_ids, NeedFiles):
            yield local_ids
            return
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def on_output(message: dict[str, Any]) -> None:
            # Buffers are memoryviews, which do not pickle: sent as bytes.
            buffers = [bytes(b) for b in message.get("buffers") or ()]
            messages.put_nowait({**message, "buffers": buffers})

        task = asyncio.create_task(
            session.run(
                code, timeout_s=timeout_s, restart=restart, file_ids=local_ids, on_output=on_output
            )
        )
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
            try:
                result = task.result()
            except (SandkernelError, ValueError, TypeError) as exc:
                # TypeError: a caller's argument of the wrong type (the code), raised
                # to the caller as the embedded engine raises it (as :func:`_replying` does).
                yield Raised(self._outward_error(exc, name))
                return
            yield self._outward_result(result), self._session_info(session)
        finally:
            if not task.done():
                task.cancel()  # the driver went away or cancelled: the engine interrupts the cell
                await asyncio.wait({task})

    @_replying
    @_naming_session
    async def extend(self, name: str, ttl_s: float | None) -> SessionInfo:
        session = self.engine.live_session(name)
        session.extend_now(ttl_s)
        return self._session_info(session)

    @_replying
    @_naming_session
    async def interrupt(self, name: str) -> SessionInfo:
        session = self.engine.live_session(name)
        await session.interrupt()
        return self._session_info(session)

    @_replying
    @_naming_session
    async def close_session(self, name: str) -> SessionInfo:
        await self.engine.close_session(name)
        return self._session_info(self._sessions.get(name) or self.engine.live_session(name))

    @_replying
    @_naming_session
    async def session_info(self, name: str) -> SessionInfo:
        session = self._sessions.get(name)
        if session is None:
            session = self.engine.live_session(name)
        return self._session_info(session)

    async def sessions(self) -> list[SessionInfo]:
        """Every session of this host's engine, alive or recently ended."""
        return [
            info.model_copy(update={"id": session_id_of(self.tag, info.id)})
            for info in await self.engine.sessions()
        ]

    @_replying
    async def reap(self) -> list[str]:
        return [session_id_of(self.tag, name) for name in await self.engine.reap()]

    @_replying
    async def has_agent_sessions(self, agent_id: str) -> bool:
        return any(
            agent == agent_id and not self._sessions[name].closed
            for name, agent in self._agents.items()
        )

    # -- one-shot and batch runs ------------------------------------------------------

    async def run_batch(
        self, requests: Sequence[RunRequest]
    ) -> AsyncIterator[list[tuple[int, RunResult]] | Raised]:
        """Run one-shot requests on this node's batch path, streaming their results back.

        Each item holds results with their request's position in ``requests``:
        a result waits at most :data:`RESULT_LINGER_S` for the others of its
        call, never for the slowest of them. Ends with a :class:`Raised` if the
        batch path fails.
        """
        self._batch_running += len(requests)
        runs = {
            asyncio.ensure_future(self._run_program(request)): index
            for index, request in enumerate(requests)
        }
        try:
            while runs:
                done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
                if len(done) < len(runs):
                    more, _ = await asyncio.wait(runs.keys() - done, timeout=RESULT_LINGER_S)
                    done |= more
                answered = [(runs.pop(run), run.result()) for run in done]
                self._batch_running -= len(answered)
                results = [(i, r) for i, r in answered if isinstance(r, RunResult)]
                if results:
                    yield results
                failure = next((r for _, r in answered if isinstance(r, Raised)), None)
                if failure is not None:
                    yield failure  # the batch path failed: the others are not run
                    return
        finally:
            self._batch_running -= len(runs)
            for run in runs:
                run.cancel()
            if runs:
                await asyncio.wait(runs)

    @_replying
    async def _run_program(self, request: RunRequest) -> RunResult:
        (result,) = [r async for r in self.engine.run_many([request])]
        return result

    # -- files --------------------------------------------------------------------------

    def _require_store(self) -> FileStore:
        if self._store is None or self._state != "running":
            raise HostClosing(f"the sandkernel host on node {self.node_id} is not running")
        return self._store

    def _outward_file(self, stored: StoredFile) -> StoredFile:
        session = stored.session_id
        return stored.model_copy(
            update={
                "id": self._ids.outward(stored.id),
                "session_id": None if session is None else owner_id(self.tag, session),
            }
        )

    def _outward_result(self, result: ExecutionResult) -> ExecutionResult:
        if not result.files:
            return result
        files = [f.model_copy(update={"id": self._ids.outward(f.id)}) for f in result.files]
        return result.model_copy(update={"files": files})

    async def _local_id(self, file_id: str) -> str:
        """The local id of one of this node's files (or of a copy held here)."""
        local = self._ids.local(file_id)
        if local is None and file_tag(file_id) == self.tag:
            # Stored before this actor started (the store outlives it): learn the ids.
            store = self._require_store()
            for stored in await asyncio.to_thread(store.list):
                self._ids.outward(stored.id)
            local = self._ids.local(file_id)
        if local is None:
            raise FileNotFoundInStore(
                f"no file with id {file_id!r}: it was never stored or has been deleted"
            )
        return local

    async def _resolve(self, file_ids: Sequence[str]) -> list[str] | NeedFiles:
        missing = [
            f for f in file_ids if self._ids.local(f) is None and file_tag(f) not in (self.tag,)
        ]
        if missing:
            return NeedFiles(tuple(missing))
        return [await self._local_id(f) for f in file_ids]

    @_replying
    async def store(
        self, data: bytes, name: str, agent_id: str | None, retention_s: float | None
    ) -> StoredFile:
        """A fresh upload, unowned or given to an agent."""
        stored = await self.engine.upload(data, name, agent_id=agent_id, retention_s=retention_s)
        return self._outward_file(stored)

    @_replying
    @_naming_session
    async def upload_to_session(
        self, name: str, data: bytes, filename: str | None, retention_s: float | None = None
    ) -> StoredFile:
        session = self.engine.live_session(name)
        stored = await session._store_upload(data, filename, retention_s=retention_s)
        return self._outward_file(stored)

    @_replying
    @_naming_session
    async def attach(self, name: str, file_ids: Sequence[str]) -> list[str] | NeedFiles:
        session = self.engine.live_session(name)
        local_ids = await self._resolve(file_ids)
        if isinstance(local_ids, NeedFiles):
            return local_ids
        return await session.attach(local_ids)

    @_replying
    async def file(self, file_id: str) -> StoredFile:
        return self._outward_file(await self.engine.file(await self._local_id(file_id)))

    @_replying
    async def download(self, file_id: str) -> bytes:
        return await self.engine.download(await self._local_id(file_id))

    @_replying
    async def read_chunk(self, file_id: str, offset: int, size: int) -> bytes:
        """``size`` bytes of a file from ``offset``: one of the chunks a driver reads it in.

        The store checks a file's hash on a read from its start to its end.
        A chunk that reaches the end is read that way: after its first
        bytes, the file is read through from the start, so that a copy
        damaged on disk fails there (as a whole read does) instead of being
        served chunk by chunk. That costs one more read of the file per
        download; a chunk short of the end is not checked.
        """
        store = self._require_store()
        local = await self._local_id(file_id)

        def read() -> bytes:
            with store.open(local) as f:
                if offset and offset + size >= os.fstat(f.fileno()).st_size:
                    left = offset
                    while left and (skipped := len(f.read(min(left, CHUNK_BYTES)))):
                        left -= skipped
                else:
                    f.seek(offset)
                return f.read(size)

        return await asyncio.to_thread(read)

    @_replying
    async def list_files(self, session_name: str | None, agent_id: str | None) -> list[StoredFile]:
        files = await self.engine.list_files(session_id=session_name, agent_id=agent_id)
        return [self._outward_file(f) for f in files]

    @_replying
    async def catalog(self, agent_id: str | None) -> list[tuple[StoredFile, str]]:
        """This node's files (of ``agent_id``, if given), each with the id of its original.

        The original of a copy of another node's file is that file; of any
        other file, itself. A copy made before this host started (the store
        outlives it) is not known as one.
        """
        files = await self.engine.list_files(agent_id=agent_id)
        listed = []
        for stored in files:
            outward = self._outward_file(stored)
            listed.append((outward, self._ids.origin(stored.id, outward.id)))
        return listed

    @_replying
    async def agent_files(self, agent_id: str) -> list[StoredFile]:
        """The files every session of ``agent_id`` on this node sees."""
        files = await self.engine.list_files(agent_id=agent_id)
        return [self._outward_file(f) for f in files if f.session_id is None]

    @_replying
    async def delete_file(self, file_id: str) -> StoredFile:
        local = await self._local_id(file_id)
        # Also a file past its retention, not purged yet: it can still be deleted.
        stored = await asyncio.to_thread(self._require_store().get, local, expired=True)
        await self.engine.delete_file(local)
        outward = self._outward_file(stored)
        self._ids.forget(local)  # after naming it: naming a file maps its id
        return outward

    @_replying
    async def drop_copies(self, file_id: str, agent_file: tuple[str, str, str] | None) -> int:
        """Delete this node's copies of a file deleted at its origin; how many.

        Found by the original's id, whatever became of a copy (an upload's
        copy attached to a session, an agent file's, a copy of a copy): once
        the original is deleted, no id of it finds a copy here. A copy made
        before this host started (the store outlives it) has no known origin:
        for an agent's file (``agent_file``: its agent, name and content
        hash), such copies are found by those instead.
        """
        async with self._importing:  # not while an import may still map one
            found = self._ids.copies_of(file_id)
            if not found and agent_file is not None:
                agent_id, name, sha256 = agent_file
                found = [
                    f.id
                    for f in await self.engine.list_files(agent_id=agent_id)
                    if f.session_id is None
                    and (f.name, f.sha256) == (name, sha256)
                    and f.created_at < self._started_at
                ]
            for local in found:
                with contextlib.suppress(FileNotFoundInStore):  # deleted here already
                    await self.engine.delete_file(local)
                self._ids.forget(local)
            return len(found)

    @_replying
    async def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        local_ids = [await self._local_id(f) for f in file_ids]
        return [
            self._outward_file(f) for f in await self.engine.attach_to_agent(agent_id, local_ids)
        ]

    @_replying
    async def export_file(
        self, file_id: str, claimant: str | None = None
    ) -> tuple[StoredFile, bytes, str]:
        """A file's metadata (cluster ids), content and original's id, for another node to copy.

        A copy's copy is known by its original's id too, so that deleting the
        original finds every copy, however it travelled. A file nobody owns
        becomes the session ``claimant``'s (a cluster-wide id) here, where its
        id leads every node: as on one machine, the first session to attach it
        gets it, and no other session finds it then.
        """
        store = self._require_store()
        local = await self._local_id(file_id)
        stored = await asyncio.to_thread(store.get, local)
        if claimant is not None and stored.session_id is None and stored.agent_id is None:
            # Refused if another session claimed it meanwhile: this one may not have it.
            stored = await asyncio.to_thread(
                functools.partial(store.attach, local, session_id=claimed_from_elsewhere(claimant))
            )
        data = await asyncio.to_thread(store.read_bytes, local)
        return self._outward_file(stored), data, self._ids.origin(local, file_id)

    @_replying
    async def import_files(
        self, sources: dict[str, Any], session_name: str | None
    ) -> list[StoredFile]:
        """Copy other nodes' files here: ``sources`` maps each cluster id to its host's actor.

        For a session, a file owned by another session or another agent is not
        found, as on one machine. Copies keep their agent, so an agent's file
        stays read-only; an unowned upload becomes the session's, the original
        on its node (see :meth:`export_file`) and the copy here.
        """
        async with self._importing:
            return await self._import_files(sources, session_name)

    async def _import_files(
        self, sources: dict[str, Any], session_name: str | None
    ) -> list[StoredFile]:
        store = self._require_store()
        claimant = None if session_name is None else session_id_of(self.tag, session_name)
        copies = []
        for file_id, source in sources.items():
            if self._ids.local(file_id) is not None:
                continue
            try:
                reply = await source.export_file.remote(file_id, claimant)
            except ray.exceptions.RayActorError as exc:
                raise FileLost(
                    f"file {file_id!r}: the node holding it did not answer ({exc}); "
                    "it left the cluster or is leaving"
                ) from None
            if isinstance(reply, Raised):
                raise reply.error
            stored, data, origin = reply
            if session_name is not None:
                self._check_scope(stored, session_name)
            retention_s = None
            if stored.expires_at is not None:
                retention_s = stored.expires_at - time.time()
                if retention_s <= 0:
                    raise FileNotFoundInStore(f"file {file_id!r} has expired")
            copy = await asyncio.to_thread(
                functools.partial(
                    store.add_bytes,
                    data,
                    stored.name,
                    origin=stored.origin,
                    mime=stored.mime_type,
                    # The session's already (it claimed the original): no other
                    # session of this node finds the copy before it is attached.
                    session_id=session_name if stored.session_id == claimant else None,
                    agent_id=stored.agent_id,
                    execution_count=stored.execution_count,
                    path=stored.path,
                    retention_s=retention_s,
                )
            )
            self._ids.add_copy(file_id, copy.id, origin)
            if session_name is None and copy.agent_id is not None:
                # Also into this node's live sessions of the agent, read-only.
                await self.engine.attach_to_agent(copy.agent_id, [copy.id])
            copies.append(self._outward_file(copy))
        return copies

    def _check_scope(self, stored: StoredFile, session_name: str) -> None:
        session_id = session_id_of(self.tag, session_name)
        agent = self._agents.get(session_name)
        if stored.session_id not in (None, session_id) or (
            stored.session_id is None and stored.agent_id not in (None, agent)
        ):
            raise FileNotFoundInStore(f"no file {stored.id!r} for session {session_id!r}")


def _renice_threads(niceness: int) -> None:
    """Give every thread of this process ``niceness`` (Linux keeps one per thread).

    Ray starts workers at nice 15, under its own daemons. A host is not a
    batch task: it answers every session of its node, and its kernels run
    user code at the policy's nice level (0); at 15 it would be starved by
    them, and kernel starts would time out on a busy node. Threads created
    later inherit the value from their creator.
    """
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(tid), niceness)


def _node_cpus(node_id: str) -> int:
    """The CPUs Ray gives the node (its ``num_cpus``), at least 1."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # ray: untyped
    for node in nodes:
        if node.get("NodeID") == node_id:
            return max(1, int(node.get("Resources", {}).get("CPU", 0)))
    return os.cpu_count() or 1


def _version() -> str:
    from sandkernel import __version__

    return __version__
