"""Scale-out on Ray: :class:`ClusterEngine`, the :class:`~sandkernel.engine.Engine` API
over one host actor per node.

::

    async with ClusterEngine("auto", pool_size=2) as engine:   # was: Engine(pool_size=2)
        session = await engine.session("thread-42")
        result = await session.run("print(1 + 1)")

How calls travel:

* **Sessions.** A new session goes to the host with the most free session
  slots (from the hosts' polled figures, adjusted for placements since). Its
  id, ``<tag>.<name>``, names the host, so every later call goes straight to
  that host's actor: no router, one Ray call per cell.
* **One-shot runs** (``run_once``, ``run_many``) go to any host with a free
  batch slot; when every slot is taken the caller waits (back-pressure). A run
  whose host is lost meanwhile is run again elsewhere: it has no state.
* **Files** live on the node that stored or produced them; their ids carry the
  node's tag. A file attached to a session on another node is copied there
  first, host to host. An agent's files are copied to every node that runs a
  session of the agent.
* **Nodes** come and go: a driver-side reconciler (an asyncio task) polls the
  cluster every ``refresh_interval_s``, starts a host on each node that joins,
  and forgets the hosts of nodes that left. Calls for a session whose node is
  gone raise :class:`~sandkernel.ray.errors.SessionLost`, which names the node.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Unpack

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sandkernel.batch import RunRequest, RunResult, iterate_async
from sandkernel.config import EngineConfig, EngineSettings
from sandkernel.errors import (
    EngineClosed,
    FileNotFoundInStore,
    FileRejected,
    PoolExhausted,
    SandboxUnavailable,
    SessionClosed,
    SessionExpired,
    SessionLimitReached,
    SessionNotFound,
)
from sandkernel.files import StoredFile
from sandkernel.kernel import OutputCallback
from sandkernel.policy import Policy, load_policy
from sandkernel.pool import PoolStats
from sandkernel.ray._channel import ChannelClient, ChannelClosed, Endpoint
from sandkernel.ray._protocol import (
    CHANNEL_METHODS,
    DEFAULT_NAMESPACE,
    ClusterStats,
    HostClosing,
    HostConfig,
    HostInfo,
    HostStats,
    NeedFiles,
    Raised,
    check_name,
    file_tag,
    host_actor_name,
    parse_session_id,
    session_id_of,
)
from sandkernel.ray.errors import FileLost, HostUnreachable, SessionLost
from sandkernel.ray.host import NodeHost
from sandkernel.results import ExecutionResult
from sandkernel.session import SessionInfo, SessionState, UploadSource
from sandkernel.streaming import StreamsFromRun

log = logging.getLogger(__name__)

#: ``Engine`` arguments outside its settings, that make no sense on a remote node.
_DRIVER_ONLY = frozenset({"clock", "handle_sigterm"})
_MAX_CONCURRENCY = 4096  # calls in flight per host actor (most wait on a kernel)
_FILE_ROUNDS = 3  # "copy these files over, then call again" rounds per call
_RUN_ATTEMPTS = 3  # hosts a one-shot run is tried on before giving up
_MIN_CHUNK = 4  # one-shot runs per Ray call, at least (when that many wait)
_CHUNKS_PER_HOST = 3  # chunks in flight per host: one finishing, two keeping it busy
_KEEP_ENDED = 10_000
_READ_CHUNK = 1 << 20


class _HostGone(Exception):
    """Internal: the host of a call is lost; public methods turn it into the right error."""

    def __init__(self, host: _Host) -> None:
        super().__init__(host.lost_reason)
        self.host = host


#: After these a stateless one-shot run is run again on another host.
_RERUN_ON = (_HostGone, HostUnreachable, HostClosing, EngineClosed)


class _Host:
    """The driver's handle on one incarnation of a node's host actor."""

    def __init__(
        self,
        actor: Any,
        info: HostInfo,
        endpoint: Endpoint | None,
        confirm: Callable[[_Host], Awaitable[None]],
    ) -> None:
        self.actor = actor
        self.info = info
        self.endpoint = endpoint
        self.channel: ChannelClient | None = None
        self.node_id = info.node_id
        self.tag = info.tag
        self._confirm = confirm
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.stats: HostStats | None = None
        self.free_slots = info.max_sessions
        self.placing = 0  # sessions being opened here
        self.opened = 0  # sessions opened here, ever (to discount those a poll missed)
        self.batch_slots = info.batch_slots
        self.batch_inflight = 0  # one-shot runs sent, not yet answered
        self.batch_calls = 0

    @property
    def batch_chunk(self) -> int:
        """One-shot runs sent to this host in one call, at most."""
        return max(_MIN_CHUNK, self.batch_slots)

    @property
    def batch_window(self) -> int:
        """One-shot runs this host is given at once (back-pressure bound)."""
        return _CHUNKS_PER_HOST * self.batch_chunk

    @property
    def gone(self) -> bool:
        return self.lost.done()

    @property
    def lost_reason(self) -> str:
        return self.lost.result() if self.lost.done() else ""

    def describe(self) -> str:
        return f"node {self.node_id} ({self.info.hostname}, {self.info.address})"

    def mark_lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        self.disconnect()

    async def connect(self) -> None:
        """Open the direct channel if there is none (or it broke); Ray calls if out of reach."""
        if self.endpoint is None or self.gone or (self.channel is not None and self.channel.open):
            return
        try:
            self.channel = await ChannelClient.connect(self.endpoint)
        except (OSError, TimeoutError) as exc:
            log.info("no direct channel to %s (%s): using Ray calls", self.describe(), exc)

    def disconnect(self) -> None:
        if self.channel is not None:
            self.channel.abort()
            self.channel = None

    @property
    def warm(self) -> int:
        return self.stats.engine.pool.warm if self.stats is not None else 0

    def submit(self, method: str, *args: Any) -> Any:
        """Send a call; the ObjectRef (or streaming generator) of its reply."""
        if not self.gone and not ray.is_initialized():
            # Never let Ray's auto-connect open a new connection behind the caller's back.
            self.mark_lost("cannot be reached: this process's Ray connection was shut down")
        if self.gone:
            raise _HostGone(self)
        return getattr(self.actor, method).remote(*args)

    async def call(self, method: str, *args: Any) -> Any:
        """Call a host method (over the direct channel if open); its reply, or its error."""
        if self.gone:
            raise _HostGone(self)
        channel = self.channel
        if channel is not None and channel.open and method in CHANNEL_METHODS:
            reply = await self._call_channel(channel, method, args)
        else:
            ref = self.submit(method, *args)
            reply = await self.guard(asyncio.wrap_future(ref.future()), cancel=ref)
        if isinstance(reply, Raised):
            raise reply.error
        return reply

    async def _call_channel(self, channel: ChannelClient, method: str, args: Sequence[Any]) -> Any:
        try:
            return await self.guard(channel.call(method, args), cancel=None)
        except ChannelClosed as exc:
            if self.channel is channel:
                self.channel = None  # Ray calls until the next poll reconnects
            await self._confirm(self)
            if self.gone:
                raise _HostGone(self) from None
            raise HostUnreachable(
                f"the connection to the sandkernel host on {self.describe()} broke ({exc}); "
                "the call may or may not have run: try again"
            ) from None

    async def guard[T](self, awaitable: Awaitable[T], *, cancel: Any) -> T:
        """Await a reply of this host, failing at once when the host is lost meanwhile.

        Cancelling the caller cancels the call on the host (``ray.cancel`` of
        ``cancel``, or the channel's cancel frame); there the engine interrupts
        the cell.
        """
        future = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait((future, self.lost), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()
            if not self.gone and cancel is not None:
                ray.cancel(cancel)
            raise
        if not future.done():
            future.cancel()
            raise _HostGone(self)
        try:
            return future.result()
        except ray.exceptions.ActorUnavailableError as exc:
            await self._confirm(self)
            if self.gone:
                raise _HostGone(self) from None
            raise HostUnreachable(
                f"the sandkernel host on {self.describe()} did not answer ({exc}); "
                "the call may or may not have run: try again"
            ) from None
        except ray.exceptions.RayActorError as exc:
            self.mark_lost(_death_reason(exc))
            raise _HostGone(self) from None


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes, as ``ray.nodes()`` describes them (blocking)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]  # ray: untyped
    return [n for n in nodes if n.get("Alive")]


def _death_reason(exc: BaseException) -> str:
    text = str(exc)
    if "node has died" in text or "node died" in text:
        return "left the cluster (its node died)"
    first = next((line for line in text.splitlines() if line.strip()), "no detail")
    return f"lost its host actor ({first.strip()})"


@dataclass
class _Lost:
    """What the driver remembers of a lost host, to name it in errors."""

    node_id: str
    where: str
    reason: str


# ---------------------------------------------------------------------------------------
# sessions


class ClusterSession(StreamsFromRun):
    """One conversation's sandboxed kernel on one node of the cluster.

    The methods of :class:`~sandkernel.session.Session`. ``info()`` and
    ``extend()`` stay synchronous: ``info()`` answers the state last reported
    by the host (each call and each poll of the reconciler refresh it);
    ``extend()`` sends the extension without waiting, and returns the expected
    expiry (driver's monotonic clock); an error it meets is raised by the
    session's next call. ``await refresh()`` asks the host now.
    """

    def __init__(
        self,
        engine: ClusterEngine,
        host: _Host,
        name: str,
        info: SessionInfo,
        agent_id: str | None,
    ) -> None:
        self._engine = engine
        self._host = host
        self.name = name
        self.id = session_id_of(host.tag, name)
        self.agent_id = agent_id
        self._info = info
        self._ttl_s: float = engine.session_ttl_s

    # -- state ----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """The Ray node whose host holds this session's kernel."""
        return self._host.node_id

    @property
    def state(self) -> SessionState:
        return self._info.state

    @property
    def closed(self) -> bool:
        return self._info.state in (SessionState.CLOSED, SessionState.EXPIRED)

    @property
    def lost(self) -> bool:
        """Its node left the cluster (or its host died) while it was open."""
        return self._host.gone and not self.closed

    async def info(self) -> SessionInfo:
        """The session's state and times, asked of its host (as last known once it ended)."""
        if self.closed:
            return self._info
        return await self.refresh()

    def snapshot(self) -> SessionInfo:
        """The session as last reported by its host (kept fresh by calls and polls)."""
        return self._info

    def _update(self, info: SessionInfo) -> None:
        self._info = info

    def _mark_ended(self, state: SessionState, reason: str) -> None:
        if not self.closed:
            self._info = self._info.model_copy(update={"state": state, "ended_reason": reason})

    def _lost_error(self) -> SessionLost:
        return SessionLost(
            f"session {self.id!r} was on {self._host.describe()}, which "
            f"{self._host.lost_reason}: its kernel, variables and workspace are gone. "
            "Open a new session"
        )

    def _check_usable(self) -> None:
        if self._info.state is SessionState.CLOSED:
            raise SessionClosed(f"session {self.id!r} was closed")
        if self._info.state is SessionState.EXPIRED:
            when = self._info.expires_at.isoformat(timespec="seconds")
            raise SessionExpired(
                f"session {self.id!r} expired at {when} ({self._info.ended_reason}); its "
                "kernel was ended. Open a new session (its files stay downloadable by id)"
            )
        if self._host.gone:
            raise self._lost_error()

    async def _call(self, method: str, *args: Any, usable: bool = True) -> Any:
        if usable:
            self._check_usable()
        try:
            return await self._host.call(method, *args)
        except _HostGone:
            raise self._lost_error() from None
        except SessionExpired:
            self._mark_ended(SessionState.EXPIRED, "expired")
            raise
        except SessionClosed:
            self._mark_ended(SessionState.CLOSED, "closed")
            raise

    # -- running code -------------------------------------------------------------------

    async def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_output: OutputCallback | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> ExecutionResult:
        """Run one cell in this session's kernel. See :meth:`sandkernel.session.Session.run`.

        ``on_output`` is called on this side with each iopub message, streamed
        from the host as the kernel sends it. Files of other nodes in
        ``file_ids`` are copied to this session's node first.

        Raises:
            SessionLost: its node left the cluster.
            SessionExpired, SessionClosed, KernelDead: as on one machine.
        """
        ids = list(file_ids)
        for _ in range(_FILE_ROUNDS):
            if on_output is None:
                reply = await self._call("run", self.name, code, timeout_s, restart, ids)
            else:
                reply = await self._run_streaming(code, timeout_s, restart, ids, on_output)
            if isinstance(reply, NeedFiles):
                await self._engine._bring_files(self._host, self.name, reply.file_ids)
                continue
            result, info = reply
            self._update(info)
            return result  # type: ignore[no-any-return]  # the host's reply is typed there
        raise FileNotFoundInStore(f"files {ids} could not be brought to session {self.id!r}")

    async def _run_streaming(
        self,
        code: str,
        timeout_s: float | None,
        restart: bool | None,
        file_ids: list[str],
        on_output: OutputCallback,
    ) -> Any:
        self._check_usable()
        host = self._host
        final: object = None
        try:
            stream = host.submit("run_stream", self.name, code, timeout_s, restart, file_ids)
            while True:
                try:
                    ref = await host.guard(stream.__anext__(), cancel=stream)
                except StopAsyncIteration:
                    break
                item = await host.guard(asyncio.wrap_future(ref.future()), cancel=stream)
                if isinstance(item, dict):
                    on_output(item)
                else:
                    final = item
        except _HostGone:
            raise self._lost_error() from None
        if isinstance(final, Raised):
            raise final.error
        if final is None:
            raise HostUnreachable(f"session {self.id!r}: the host's stream ended without a result")
        return final

    async def interrupt(self) -> None:
        """Interrupt the running cell, if any."""
        self._update(await self._call("interrupt", self.name))

    # -- files ------------------------------------------------------------------------

    async def upload(self, source: UploadSource, name: str | None = None) -> StoredFile:
        """Store a file for this session and copy it into its ``/mnt/data``.

        The bytes are read here and sent to the session's node.
        """
        self._check_usable()
        data, filename = await _read_upload(source, name, self._engine.max_upload_bytes)
        stored: StoredFile = await self._call("upload_to_session", self.name, data, filename)
        return stored

    async def attach(self, file_ids: Sequence[str]) -> list[str]:
        """Copy stored files (of any node) into ``/mnt/data`` now; returns their paths there."""
        for _ in range(_FILE_ROUNDS):
            reply = await self._call("attach", self.name, list(file_ids))
            if isinstance(reply, NeedFiles):
                await self._engine._bring_files(self._host, self.name, reply.file_ids)
                continue
            paths: list[str] = reply
            return paths
        raise FileNotFoundInStore(f"files could not be brought to session {self.id!r}")

    async def files(self) -> list[StoredFile]:
        """Files uploaded to this session and produced by it (also after it ended)."""
        files: list[StoredFile] = await self._call("list_files", self.name, None, usable=False)
        return files

    # -- lifetime ---------------------------------------------------------------------

    async def extend(self, ttl_s: float | None = None) -> float:
        """Keep the session alive: its TTL counts again from now.

        Returns:
            The new expiry, as a Unix time (the host's answer).
        """
        if ttl_s is not None:
            self._ttl_s = ttl_s
        self._update(await self._call("extend", self.name, ttl_s))
        return self._info.expires_at.timestamp()

    async def refresh(self) -> SessionInfo:
        """Ask the host for the session's state now."""
        self._update(await self._call("session_info", self.name, usable=False))
        return self._info

    async def close(self) -> None:
        """End the session and destroy its kernel. Idempotent (also for a lost session)."""
        if self.closed:
            return
        if self._host.gone:
            self._mark_ended(SessionState.CLOSED, "lost")
            return
        try:
            self._update(await self._host.call("close_session", self.name))
        except (_HostGone, SessionNotFound):
            self._mark_ended(SessionState.CLOSED, "lost")
        self._engine._session_closed(self)


# ---------------------------------------------------------------------------------------
# the engine


class ClusterEngine:
    """The :class:`~sandkernel.engine.Engine` API over a Ray cluster.

    Use as ``async with ClusterEngine(address, ...)``. The engine settings
    (:class:`~sandkernel.config.EngineConfig`, as ``config`` or keyword
    arguments) apply to each node's engine: ``pool_size``, ``max_sessions``,
    ``policy``... are per node.

    Args:
        address: the Ray cluster (``"auto"``, ``"ray://head:10001"``, ``"10.0.0.1:6379"``);
            None uses the current Ray connection, else ``"auto"``.
        config: each node's engine settings.
        namespace: Ray namespace of the host actors; engines in one namespace
            share the hosts (and see each other's sessions by id).
        batch_slots: one-shot runs a host takes at once (default: its CPUs).
        node_resource: run hosts only on nodes that offer this custom Ray
            resource (e.g. ``"sandkernel"``); default: every node.
        refresh_interval_s: how often the reconciler polls nodes and hosts.
        lease_ttl_s: a host whose clients all stopped renewing for this long
            shuts its engine down and exits.
        start_timeout_s: how long ``start()`` waits for ``min_hosts`` hosts.
        min_hosts: hosts ``start()`` waits for.
        **settings: :class:`~sandkernel.config.EngineConfig` fields, applied over
            ``config``. ``runtime_dir`` and ``store_dir`` are per node: ``{node}``
            is replaced by the node's tag, ``{node_id}`` by its id.

    Raises:
        TypeError: a setting EngineConfig does not have, or one that concerns
            a local engine only (``clock``, ``handle_sigterm``).
        ValueError: a setting out of range.
    """

    def __init__(
        self,
        address: str | None = None,
        config: EngineConfig | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        batch_slots: int | None = None,
        node_resource: str | None = None,
        refresh_interval_s: float = 1.0,
        lease_ttl_s: float = 60.0,
        start_timeout_s: float = 120.0,
        min_hosts: int = 1,
        **settings: Unpack[EngineSettings],
    ) -> None:
        driver_only = sorted(set(settings) & _DRIVER_ONLY)
        if driver_only:
            raise TypeError(
                f"{', '.join(driver_only)} cannot be given to a cluster's engines: "
                "they concern a local Engine in this process only"
            )
        if min_hosts < 1 or refresh_interval_s <= 0 or lease_ttl_s <= refresh_interval_s:
            raise ValueError("min_hosts >= 1, refresh_interval_s > 0, lease_ttl_s > refresh")
        config = EngineConfig.build(config, settings)
        self.policy: Policy = load_policy(config.policy)
        # Loaded here, sent as a value: the nodes need not have the policy's file.
        self.config = EngineConfig.build(config, {"policy": self.policy})
        self.pool_size: int = self.config.pool_size
        self.max_sessions: int = self.config.max_sessions
        self.session_ttl_s: float = self.config.session_ttl_s
        self.acquire_timeout_s: float = self.config.acquire_timeout_s
        self.max_upload_bytes: int = self.config.max_upload_bytes
        self._address = address
        self._namespace = namespace
        self._node_resource = node_resource
        self._refresh_interval_s = refresh_interval_s
        self._lease_ttl_s = lease_ttl_s
        self._start_timeout_s = start_timeout_s
        self._min_hosts = min_hosts
        self._host_config = HostConfig(
            engine=self.config,
            batch_slots=batch_slots,
            lease_ttl_s=lease_ttl_s,
        )
        self._client_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._owns_ray = False
        self._remote_host: Any = None
        self._hosts: dict[str, _Host] = {}  # node id -> live host
        self._by_tag: dict[str, _Host] = {}
        self._lost: dict[str, _Lost] = {}  # tag -> what was lost
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._unavailable: dict[str, str] = {}  # node id -> why no host runs there
        self._retry_at: dict[str, float] = {}
        self._sessions: dict[str, ClusterSession] = {}  # cluster-wide id -> session
        self._by_name: dict[str, str] = {}  # name -> cluster-wide id
        self._creating: dict[str, asyncio.Future[ClusterSession]] = {}
        self._capacity: asyncio.Event | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._started_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> ClusterEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect to Ray, start (or join) a host on each node, start the reconciler.

        Raises:
            SandboxUnavailable: fewer than ``min_hosts`` hosts started in time
                (the message says why, node by node).
        """
        if self._state != "new":
            raise EngineClosed("a ClusterEngine can be started once")
        self._capacity = asyncio.Event()
        self._wake = asyncio.Event()
        if not ray.is_initialized():
            # In this thread, not a worker thread: Ray installs its signal handlers here.
            ray.init(address=self._address or "auto", namespace=self._namespace)
            self._owns_ray = True
        self._remote_host = ray.remote(NodeHost)
        self._started_at = time.monotonic()
        self._state = "running"
        try:
            await self._wait_for_hosts(self._min_hosts, self._start_timeout_s)
        except BaseException:
            await self.aclose()
            raise
        self._reconciler = asyncio.create_task(
            self._reconcile_forever(), name="sandkernel-ray-reconciler"
        )

    async def aclose(self) -> None:
        """Close this engine's sessions and leave the hosts (the last client stops them).

        Idempotent. A host that other engines still use keeps running.
        """
        if self._state in ("closing", "closed", "new"):
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        tasks = [t for t in (self._reconciler, *self._starting.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(s.close() for s in list(self._sessions.values()) if not s.closed),
            return_exceptions=True,
        )
        hosts = list(self._hosts.values())
        await asyncio.gather(*(self._leave(h) for h in hosts if not h.gone), return_exceptions=True)
        for host in hosts:
            host.mark_lost("was left when the engine closed")  # and its channel closed
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
        self._state = "closed"

    async def _leave(self, host: _Host) -> None:
        """Release this engine's lease; if it was the last, wait (bounded) for the host's exit."""
        last = host.stats is not None and host.stats.clients <= 1
        await host.call("release", self._client_id)
        if not last:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(host.call("ping"), timeout=2)
            except (_HostGone, HostUnreachable, TimeoutError):
                return
            await asyncio.sleep(0.1)

    async def shutdown_hosts(self) -> None:
        """Stop every host now, whichever engines still use them (an administrator's tool)."""
        self._require_running()
        await asyncio.gather(
            *(h.call("shutdown") for h in self._hosts.values()), return_exceptions=True
        )

    def _require_running(self) -> None:
        if self._state != "running":
            raise EngineClosed(
                "the cluster engine is not running: use `async with ClusterEngine(...)`"
            )

    # -- hosts and nodes ------------------------------------------------------------------

    def hosts(self) -> list[HostInfo]:
        """The live hosts, one per node."""
        return [h.info for h in self._hosts.values() if not h.gone]

    def unavailable_nodes(self) -> dict[str, str]:
        """Nodes without a host, and why (see ``sandkernel doctor --ray``)."""
        return dict(self._unavailable)

    async def refresh(self) -> None:
        """Poll the cluster now: join new nodes, forget lost ones, refresh figures."""
        self._require_running()
        await self._reconcile()

    async def _reconcile_forever(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self._reconcile()
            except Exception:
                log.exception("sandkernel cluster reconciler pass failed; continuing")
            try:
                await asyncio.wait_for(self._wake.wait(), self._refresh_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _reconcile(self) -> None:
        if not ray.is_initialized():
            for host in list(self._hosts.values()):
                self._lose(host, "cannot be reached: this process's Ray connection was shut down")
            return
        try:
            nodes = await asyncio.to_thread(alive_nodes)
        except Exception:
            if ray.is_initialized():
                raise
            return  # shut down meanwhile: the next pass loses the hosts
        alive = {n["NodeID"]: n for n in nodes if self._eligible(n)}
        for host in list(self._hosts.values()):
            if host.node_id not in alive:
                self._lose(host, "left the cluster")
        now = time.monotonic()
        for node_id in alive:
            if node_id in self._hosts or node_id in self._starting:
                continue
            if now < self._retry_at.get(node_id, 0.0):
                continue
            self._starting[node_id] = asyncio.create_task(
                self._start_host(node_id), name=f"sandkernel-host-start-{node_id[:8]}"
            )
        for node_id in list(self._unavailable):
            if node_id not in alive:
                del self._unavailable[node_id]
        await asyncio.gather(*(self._poll(h) for h in list(self._hosts.values())))

    def _eligible(self, node: dict[str, Any]) -> bool:
        if self._node_resource is None:
            return True
        return float(node.get("Resources", {}).get(self._node_resource, 0)) > 0

    async def _wait_for_hosts(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            await self._reconcile()
            if len(self._hosts) >= count and not self._starting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if len(self._hosts) >= count:
                    return
                raise SandboxUnavailable(self._no_hosts_message(count))
            if self._starting:
                await asyncio.wait(
                    list(self._starting.values()),
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            else:
                await asyncio.sleep(min(self._refresh_interval_s, remaining))

    def _no_hosts_message(self, wanted: int = 1) -> str:
        why = "; ".join(f"node {n}: {r}" for n, r in sorted(self._unavailable.items()))
        return (
            f"{len(self._hosts)} sandkernel host(s) running on the Ray cluster, {wanted} needed"
            + (f" ({why})" if why else "")
            + ": run `sandkernel doctor --ray ADDRESS` to see what each node lacks"
        )

    async def _start_host(self, node_id: str) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        try:
            while True:
                actor = self._remote_host.options(
                    name=host_actor_name(node_id),
                    namespace=self._namespace,
                    lifetime="detached",
                    get_if_exists=True,
                    num_cpus=0,
                    max_restarts=0,
                    max_task_retries=0,
                    max_concurrency=_MAX_CONCURRENCY,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(self._host_config)
                ref = actor.start.remote(self._client_id, self._lease_ttl_s)
                remaining = max(0.1, deadline - time.monotonic())
                try:
                    reply = await asyncio.wait_for(asyncio.wrap_future(ref.future()), remaining)
                except ray.exceptions.RayActorError:
                    # A host that was closing has just exited: its name is free again.
                    if time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        continue
                    raise
                if isinstance(reply, Raised) and isinstance(reply.error, HostClosing):
                    await asyncio.sleep(0.2)
                    continue
                if isinstance(reply, Raised):
                    raise reply.error
                info, endpoint = reply
                host = _Host(actor, info, endpoint, self._confirm_lost)
                await host.connect()
                self._add_host(host)
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._unavailable[node_id] = f"{type(exc).__name__}: {exc}"
            self._retry_at[node_id] = time.monotonic() + 30
            log.warning("no sandkernel host on node %s: %s", node_id, exc)
        finally:
            self._starting.pop(node_id, None)

    def _add_host(self, host: _Host) -> None:
        other = self._by_tag.get(host.tag)
        if other is not None and other.node_id != host.node_id and not other.gone:
            # 1 in 4 billion per pair of nodes: refuse rather than misroute.
            self._unavailable[host.node_id] = (
                f"its tag {host.tag} is that of node {other.node_id}; restart one of them"
            )
            return
        self._hosts[host.node_id] = host
        self._by_tag[host.tag] = host
        self._lost.pop(host.tag, None)
        self._unavailable.pop(host.node_id, None)
        log.info("sandkernel host ready on %s", host.describe())
        self._capacity_changed()

    def _lose(self, host: _Host, reason: str) -> None:
        host.mark_lost(reason)
        if self._hosts.get(host.node_id) is host:
            del self._hosts[host.node_id]
        if self._by_tag.get(host.tag) is host:
            del self._by_tag[host.tag]
        self._lost[host.tag] = _Lost(host.node_id, host.describe(), host.lost_reason)
        log.warning("sandkernel host on %s %s; its sessions are lost", host.describe(), reason)
        self._capacity_changed()
        if self._wake is not None:
            self._wake.set()

    def _capacity_changed(self) -> None:
        if self._capacity is not None:
            self._capacity.set()

    async def _poll(self, host: _Host) -> None:
        names = [s.name for s in self._sessions.values() if s._host is host and not s.closed]
        opened_before = host.opened
        try:
            stats, infos = await asyncio.wait_for(
                host.call("poll", self._client_id, self._lease_ttl_s, names),
                timeout=max(5.0, 5 * self._refresh_interval_s),
            )
        except _HostGone:
            self._lose(host, host.lost_reason)
            return
        except HostClosing:
            self._lose(host, "was shut down")
            return
        except (HostUnreachable, TimeoutError) as exc:
            log.warning("sandkernel host on %s did not answer its poll: %s", host.describe(), exc)
            return
        host.stats = stats
        await host.connect()  # again, if the channel broke while the host lived on
        # Sessions opened while the poll travelled are not in its figures yet.
        host.free_slots = stats.free_session_slots - (host.opened - opened_before)
        host.batch_slots = stats.batch_slots
        for info in infos:
            session = self._sessions.get(info.id)
            if session is not None:
                session._update(info)

    async def _confirm_lost(self, host: _Host) -> None:
        """After "unavailable": is the host gone for good? Marks it lost if so (bounded)."""
        deadline = time.monotonic() + 8
        while not host.gone and time.monotonic() < deadline:
            if not ray.is_initialized():
                self._lose(host, "cannot be reached: this process's Ray connection was shut down")
                return
            try:
                nodes = await asyncio.to_thread(alive_nodes)
            except Exception:  # noqa: BLE001 - shut down meanwhile (checked above), or GCS trouble
                await asyncio.sleep(0.3)
                continue
            if not any(n["NodeID"] == host.node_id for n in nodes):
                self._lose(host, "left the cluster")
                return
            ref = host.actor.ping.remote()
            try:
                await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout=1)
                return  # it answers again
            except ray.exceptions.ActorUnavailableError:
                await asyncio.sleep(0.3)
            except ray.exceptions.RayActorError as exc:
                self._lose(host, _death_reason(exc))
            except TimeoutError:
                continue

    def _alive(self) -> list[_Host]:
        return [h for h in self._hosts.values() if not h.gone]

    async def _alive_or_wait(self) -> list[_Host]:
        """The live hosts; if none, wait for the reconciler to start one (bounded)."""
        assert self._capacity is not None
        deadline = time.monotonic() + self.acquire_timeout_s
        while not (hosts := self._alive()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxUnavailable(self._no_hosts_message())
            self._capacity.clear()
            try:
                await asyncio.wait_for(self._capacity.wait(), remaining)
            except TimeoutError:
                pass
        return hosts

    # -- sessions -----------------------------------------------------------------------

    async def session(
        self,
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        workspace: str | Path | None = None,
        if_expired: Literal["raise", "new"] = "raise",
    ) -> ClusterSession:
        """Get the session for a conversation id, creating it if needed.

        ``session_id`` is a name (``"thread-42"``) or the cluster-wide id
        (``"3fa2c1d0.thread-42"``) of a session created earlier, by this engine
        or another one in the namespace. A name this engine does not know is
        looked up on every host (and created on the emptiest if none has it).
        ``workspace`` is a folder on the node that gets the session.

        Raises:
            SessionLost: the session's node left the cluster.
            SandboxUnavailable: no host is running.
            SessionLimitReached: every host has ``max_sessions`` sessions alive.
            PoolExhausted, SessionExpired, SessionClosed: as on one machine.
        """
        self._require_running()
        if agent_id is not None:
            check_name(agent_id, "agent")
        host: _Host | None = None
        if session_id is None:
            name = f"sess-{secrets.token_hex(8)}"
        else:
            parsed = parse_session_id(session_id)
            name = session_id if parsed is None else parsed[1]
            check_name(name)
            known = self._known(session_id)
            if known is not None and not known.closed and not known._host.gone:
                known._check_usable()
                return known
            if known is not None and known._host.gone:
                if if_expired == "raise":
                    raise known._lost_error()
            elif known is not None:
                host = known._host
            elif parsed is not None:
                host = self._host_of_tag(parsed[0], session_id)
        pending = self._creating.get(name)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ClusterSession] = asyncio.get_running_loop().create_future()
        self._creating[name] = future
        try:
            if host is None and session_id is not None and parse_session_id(session_id) is None:
                host = await self._find_session_host(name)
            session = await self._open(name, host, agent_id, workspace, if_expired)
            future.set_result(session)
            return session
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._creating[name]

    async def _open(
        self,
        name: str,
        host: _Host | None,
        agent_id: str | None,
        workspace: str | Path | None,
        if_expired: Literal["raise", "new"],
    ) -> ClusterSession:
        placed = host is None
        tried: list[_Host] = []
        last_error: BaseException | None = None
        for _ in range(_RUN_ATTEMPTS):
            target = host if host is not None else await self._place_session(tried)
            if placed:
                target.placing += 1
            try:
                if agent_id is not None:
                    await self._sync_agent_files(agent_id, target)
                ws = None if workspace is None else str(workspace)
                info = await target.call("open_session", name, agent_id, ws, if_expired)
            except _HostGone as exc:
                if not placed:
                    raise SessionLost(
                        f"session {session_id_of(target.tag, name)!r} was on "
                        f"{target.describe()}, which {target.lost_reason}"
                    ) from None
                tried.append(target)
                last_error = exc
                continue
            except (SessionLimitReached, PoolExhausted) as exc:
                if not placed or len(tried) + 1 >= len(self._alive()):
                    raise
                if isinstance(exc, SessionLimitReached):
                    target.free_slots = 0  # until its next poll says otherwise
                tried.append(target)
                last_error = exc
                continue
            finally:
                if placed:
                    target.placing -= 1
            if placed:
                target.free_slots -= 1
                target.opened += 1
            return self._register(target, name, info, agent_id)
        raise SandboxUnavailable(f"no host could open session {name!r}: {last_error}")

    def _register(
        self, host: _Host, name: str, info: SessionInfo, agent_id: str | None
    ) -> ClusterSession:
        session_id = session_id_of(host.tag, name)
        session = self._sessions.get(session_id)
        if session is None or session._host is not host:
            session = ClusterSession(self, host, name, info, agent_id)
            self._sessions[session_id] = session
            self._forget_old_sessions()
        else:
            session._update(info)
            if agent_id is not None:
                session.agent_id = agent_id
        self._by_name[name] = session_id
        return session

    def _forget_old_sessions(self) -> None:
        ended = [s for s in self._sessions.values() if s.closed or s._host.gone]
        for s in ended[: max(0, len(ended) - _KEEP_ENDED)]:
            del self._sessions[s.id]
            if self._by_name.get(s.name) == s.id:
                del self._by_name[s.name]

    def _session_closed(self, session: ClusterSession) -> None:
        if not session._host.gone:
            session._host.free_slots += 1

    async def _place_session(self, exclude: Sequence[_Host]) -> _Host:
        hosts = [h for h in await self._alive_or_wait() if h not in exclude]
        if not hosts:
            raise SandboxUnavailable(self._no_hosts_message())
        best = max(hosts, key=lambda h: (h.free_slots - h.placing, h.warm, random.random()))  # noqa: S311
        if best.free_slots - best.placing <= 0:
            raise SessionLimitReached(
                f"every host is full: {len(hosts)} host(s), max_sessions={self.max_sessions} "
                "each; close sessions, raise max_sessions, or add nodes"
            )
        return best

    async def _find_session_host(self, name: str) -> _Host | None:
        hosts = self._alive()
        replies = await asyncio.gather(
            *(h.call("find_session", name) for h in hosts), return_exceptions=True
        )
        found = [(h, r) for h, r in zip(hosts, replies, strict=True) if isinstance(r, SessionInfo)]
        if not found:
            return None
        found.sort(
            key=lambda hr: (hr[1].state is not SessionState.ACTIVE, -hr[1].last_active.timestamp())
        )
        return found[0][0]

    def _known(self, session_id: str) -> ClusterSession | None:
        session = self._sessions.get(session_id)
        if session is None and session_id in self._by_name:
            session = self._sessions.get(self._by_name[session_id])
        return session

    def _host_of_tag(self, tag: str, session_id: str) -> _Host:
        host = self._by_tag.get(tag)
        if host is not None and not host.gone:
            return host
        lost = self._lost.get(tag)
        if lost is not None:
            raise SessionLost(f"session {session_id!r} was on {lost.where}, which {lost.reason}")
        raise SessionNotFound(f"no session {session_id!r}: no node of the cluster has tag {tag}")

    async def get_session(self, session_id: str) -> ClusterSession:
        """The live session with this id or name (never creates one).

        A session this engine does not know yet (opened by another engine in
        the namespace) is looked up on its host.

        Raises:
            SessionNotFound, SessionExpired, SessionClosed, SessionLost.
        """
        self._require_running()
        session = await self._lookup(session_id)
        session._check_usable()
        return session

    async def _lookup(self, session_id: str) -> ClusterSession:
        """A session by id or name, known here or found on its host."""
        session = self._known(session_id)
        if session is not None:
            return session
        parsed = parse_session_id(session_id)
        host = (
            self._host_of_tag(parsed[0], session_id)
            if parsed is not None
            else await self._find_session_host(session_id)
        )
        name = session_id if parsed is None else parsed[1]
        if host is None:
            raise SessionNotFound(f"no session {session_id!r}")
        try:
            info = await host.call("find_session", name)
        except _HostGone:
            raise SessionLost(f"session {session_id!r} was on {host.describe()}") from None
        if info is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return self._register(host, name, info, None)

    async def close_session(self, session_id: str) -> None:
        """Close a session by id or name (idempotent for ended sessions)."""
        self._require_running()
        await (await self._lookup(session_id)).close()

    def known_sessions(self) -> list[SessionInfo]:
        """The sessions this engine opened or looked up, as last reported (no call).

        Refreshed by every call and by the reconciler's polls; :meth:`sessions`
        asks every host for every session.
        """
        return [s.snapshot() for s in self._sessions.values()]

    async def sessions(self) -> list[SessionInfo]:
        """Every session of every host (of every engine in the namespace)."""
        self._require_running()
        hosts = self._alive()
        replies = await asyncio.gather(*(h.call("sessions") for h in hosts), return_exceptions=True)
        return [info for r in replies if isinstance(r, list) for info in r]

    async def reap(self, now: float | None = None) -> list[str]:
        """End every expired session on every host now. Returns their ids."""
        self._require_running()
        if now is not None:
            raise ValueError("each node's engine uses its own clock: reap() takes no `now`")
        replies = await asyncio.gather(
            *(h.call("reap") for h in self._alive()), return_exceptions=True
        )
        return [i for r in replies if isinstance(r, list) for i in r]

    # -- one-shot and batch runs ----------------------------------------------------------

    def batch_slots(self) -> int:
        """One-shot runs the live hosts run at once (their sandboxed fork servers)."""
        return sum(h.batch_slots for h in self._alive())

    def batch_capacity(self) -> int:
        """One-shot runs the live hosts accept at once: running, or queued on their node."""
        return sum(h.batch_window for h in self._alive())

    def _reserve_batch(self, wanted: int) -> tuple[_Host, int] | None:
        """Room for up to ``wanted`` runs on the host with the most room, or None if full."""
        best: _Host | None = None
        for host in self._alive():
            room = host.batch_window - host.batch_inflight
            if room > 0 and (best is None or room > best.batch_window - best.batch_inflight):
                best = host
        if best is None:
            return None
        count = min(wanted, best.batch_chunk, best.batch_window - best.batch_inflight)
        best.batch_inflight += count
        best.batch_calls += 1
        return best, count

    async def _wait_for_batch_room(self) -> None:
        """Until some host has room (or a host joins); bounded only if no host is alive."""
        assert self._capacity is not None
        if not self._alive():
            await self._alive_or_wait()
            return
        self._capacity.clear()
        await self._capacity.wait()

    async def _run_chunk(self, host: _Host, requests: list[RunRequest]) -> list[RunResult]:
        """One Ray call: ``requests`` on ``host``'s batch path (room reserved by the caller)."""
        try:
            results: list[RunResult] = await host.call("run_batch", requests)
            return results
        finally:
            host.batch_inflight -= len(requests)
            self._capacity_changed()

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
        """``Engine.run_once`` on the host with the most room; run again elsewhere if lost.

        Waits while every host is full (back-pressure). See
        :meth:`sandkernel.engine.Engine.run_once`.

        Raises:
            SandboxUnavailable: no host is running, or three hosts were lost in turn.
        """
        self._require_running()
        request = RunRequest.program(
            code, stdin=stdin, files=files, fetch_files=fetch_files, argv=argv,
            timeout_s=timeout_s, memory_mb=memory_mb,
        )  # fmt: skip
        failures: list[str] = []
        while len(failures) < _RUN_ATTEMPTS:
            while (placed := self._reserve_batch(1)) is None:
                await self._wait_for_batch_room()
            host, _ = placed
            try:
                (result,) = await self._run_chunk(host, [request])
                return result
            except _RERUN_ON as exc:
                failures.append(f"{host.describe()}: {exc}")
        raise SandboxUnavailable(
            f"a one-shot run was tried on {len(failures)} hosts, each lost meanwhile: "
            + "; ".join(failures)
        )

    async def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> AsyncIterator[RunResult]:
        """``Engine.run_many`` spread over every host: results as they finish (not in order).

        Requests travel in chunks (several per Ray call) to the hosts with the
        most room. At most ``concurrency`` requests are held at once (default:
        :meth:`batch_capacity`); they are read from ``requests`` only as room
        frees up, so a long or endless source is fine. Requests in flight on a
        host that is lost are run again elsewhere. Match results to requests
        with ``RunRequest.id``.

        Raises:
            SandboxUnavailable: no host is running, or a request's host was lost three times.
        """
        self._require_running()
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        assert self._capacity is not None
        source = iterate_async(requests)
        pending: deque[tuple[RunRequest, int]] = deque()  # (request, hosts lost under it)
        running: dict[asyncio.Future[Any], list[tuple[RunRequest, int]]] = {}
        held = 0  # pulled from the source, not yet yielded
        exhausted = False
        try:
            while True:
                limit = concurrency or max(1, self.batch_capacity())
                while not exhausted and held < limit:
                    try:
                        request = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    pending.append((request, 0))
                    held += 1
                while pending and (placed := self._reserve_batch(len(pending))) is not None:
                    host, count = placed
                    chunk = [pending.popleft() for _ in range(count)]
                    sent = asyncio.ensure_future(self._run_chunk(host, [r for r, _ in chunk]))
                    running[sent] = chunk
                if not running:
                    if exhausted and not pending:
                        return
                    await self._wait_for_batch_room()
                    continue
                waiters: list[asyncio.Future[Any]] = list(running)
                room: asyncio.Future[Any] | None = None
                if pending:  # a host joining, or another caller's runs ending, makes room
                    self._capacity.clear()
                    room = asyncio.ensure_future(self._capacity.wait())
                    waiters.append(room)
                try:
                    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if room is not None:
                        room.cancel()
                for finished in done:
                    if finished is room:
                        continue
                    chunk = running.pop(finished)
                    try:
                        results: list[RunResult] = finished.result()
                    except _RERUN_ON as exc:
                        if any(lost + 1 >= _RUN_ATTEMPTS for _, lost in chunk):
                            raise SandboxUnavailable(
                                f"a one-shot run's host was lost {_RUN_ATTEMPTS} times "
                                f"in turn (last: {exc})"
                            ) from None
                        log.warning("re-running %d one-shot run(s): %s", len(chunk), exc)
                        pending.extendleft((r, lost + 1) for r, lost in reversed(chunk))
                        continue
                    held -= len(results)
                    for result in results:
                        yield result
        finally:
            for unfinished in running:
                unfinished.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    # -- files --------------------------------------------------------------------------

    def _file_host(self, file_id: str) -> _Host:
        tag = file_tag(file_id)
        if tag is None:
            raise FileNotFoundInStore(f"no file with id {file_id!r}: not a file id of a cluster")
        host = self._by_tag.get(tag)
        if host is not None and not host.gone:
            return host
        lost = self._lost.get(tag)
        if lost is not None:
            raise FileLost(f"file {file_id!r} was stored on {lost.where}, which {lost.reason}")
        raise FileNotFoundInStore(f"no file with id {file_id!r}: no node of the cluster has it")

    async def _file_call(self, method: str, file_id: str, *args: Any) -> Any:
        self._require_running()
        host = self._file_host(file_id)
        try:
            return await host.call(method, file_id, *args)
        except _HostGone:
            raise FileLost(
                f"file {file_id!r} was stored on {host.describe()}, which {host.lost_reason}"
            ) from None

    async def _bring_files(self, target: _Host, session_name: str, file_ids: Sequence[str]) -> None:
        """Copy other nodes' files to ``target`` for session ``session_name``."""
        sources = {f: self._file_host(f).actor for f in file_ids}
        try:
            await target.call("import_files", sources, session_name)
        except _HostGone:
            raise SessionLost(
                f"session {session_id_of(target.tag, session_name)!r} was on "
                f"{target.describe()}, which {target.lost_reason}"
            ) from None

    def _home(self) -> _Host:
        """Where a fresh upload goes: this driver's node if it has a host, else the emptiest."""
        hosts = self._alive()
        if not hosts:
            raise SandboxUnavailable(self._no_hosts_message())
        here = ray.get_runtime_context().get_node_id()
        for host in hosts:
            if host.node_id == here:
                return host
        return max(hosts, key=lambda h: (h.free_slots, random.random()))  # noqa: S311

    async def upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store a file and get its id (which names its node). See ``Engine.upload``.

        An agent's file is also copied to every node running a session of the
        agent (and to any node that starts one later).
        """
        self._require_running()
        if session_id is not None:
            return await (await self._lookup(session_id)).upload(source, name)
        if agent_id is not None:
            check_name(agent_id, "agent")
        data, filename = await _read_upload(source, name, self.max_upload_bytes)
        home = self._home()
        stored: StoredFile = await home.call("store", data, filename, agent_id, retention_s)
        if agent_id is not None:
            await self._spread_agent_files(agent_id, [stored], home)
        return stored

    async def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        """Give stored files to an agent: they appear, read-only, in its sessions on every node."""
        self._require_running()
        check_name(agent_id, "agent")
        attached: dict[str, StoredFile] = {}
        by_host: dict[str, list[str]] = {}
        for file_id in file_ids:
            by_host.setdefault(self._file_host(file_id).node_id, []).append(file_id)
        for node_id, ids in by_host.items():
            host = self._hosts[node_id]
            files: list[StoredFile] = await host.call("attach_to_agent", agent_id, ids)
            attached.update(zip(ids, files, strict=True))
            await self._spread_agent_files(agent_id, files, host)
        return [attached[f] for f in file_ids]

    async def _spread_agent_files(
        self, agent_id: str, files: list[StoredFile], source: _Host
    ) -> None:
        others = [h for h in self._alive() if h is not source]
        flags = await asyncio.gather(
            *(h.call("has_agent_sessions", agent_id) for h in others), return_exceptions=True
        )
        targets = [h for h, flag in zip(others, flags, strict=True) if flag is True]
        sources = {f.id: source.actor for f in files}
        await asyncio.gather(
            *(h.call("import_files", sources, None) for h in targets), return_exceptions=True
        )

    async def _sync_agent_files(self, agent_id: str, target: _Host) -> None:
        """Copy to ``target`` the agent's files it lacks (same name and content)."""
        hosts = self._alive()
        manifests = await asyncio.gather(
            *(h.call("agent_files", agent_id) for h in hosts), return_exceptions=True
        )
        have: set[tuple[str, str]] = set()
        for host, files in zip(hosts, manifests, strict=True):
            if host is target and isinstance(files, list):
                have = {(f.name, f.sha256) for f in files}
        wanted: dict[tuple[str, str], tuple[str, _Host]] = {}
        for host, files in zip(hosts, manifests, strict=True):
            if host is target or not isinstance(files, list):
                continue
            for f in files:
                key = (f.name, f.sha256)
                if key not in have and key not in wanted:
                    wanted[key] = (f.id, host)
        if wanted:
            sources = {file_id: host.actor for file_id, host in wanted.values()}
            await target.call("import_files", sources, None)

    async def file(self, file_id: str) -> StoredFile:
        """A stored file's metadata, from the node that holds it. Raises FileNotFoundInStore."""
        stored: StoredFile = await self._file_call("file", file_id)
        return stored

    async def download(self, file_id: str, *, max_bytes: int | None = None) -> bytes:
        """A stored file's bytes (or its first ``max_bytes``), from the node that holds it."""
        if max_bytes is None:
            data: bytes = await self._file_call("download", file_id)
            return data

        def head() -> bytes:
            with self.open_file(file_id) as handle:
                return handle.read(max_bytes)

        return await asyncio.to_thread(head)

    def open_file(self, file_id: str) -> BinaryIO:
        """A stored file as a binary stream, read from its node in 1 MiB chunks.

        Blocking, as ``Engine.open_file``: call it (and read) from a worker thread.
        """
        self._require_running()
        host = self._file_host(file_id)
        try:
            reply = ray.get(host.submit("file", file_id))
        except (ray.exceptions.RayActorError, _HostGone):
            raise FileLost(f"file {file_id!r} was stored on {host.describe()}") from None
        if isinstance(reply, Raised):
            raise reply.error
        raw = _RemoteFile(host, file_id, reply.size_bytes)
        return io.BufferedReader(raw, buffer_size=_READ_CHUNK)

    async def list_files(
        self, *, session_id: str | None = None, agent_id: str | None = None
    ) -> list[StoredFile]:
        """Stored files of every node, optionally of one session or one agent.

        An agent's file copied to several nodes is listed once.
        """
        self._require_running()
        if session_id is not None:
            session = await self._lookup(session_id)
            files: list[StoredFile] = await session._call(
                "list_files", session.name, agent_id, usable=False
            )
            return files
        replies = await asyncio.gather(
            *(h.call("list_files", None, agent_id) for h in self._alive()),
            return_exceptions=True,
        )
        merged: dict[Any, StoredFile] = {}
        for reply in replies:
            if not isinstance(reply, list):
                continue
            for f in reply:
                key: Any = f.id
                if f.session_id is None and f.agent_id is not None:
                    key = (f.agent_id, f.name, f.sha256)
                kept = merged.get(key)
                if kept is None or f.created_at < kept.created_at:
                    merged[key] = f
        return sorted(merged.values(), key=lambda f: (f.created_at, f.id))

    async def delete_file(self, file_id: str) -> None:
        """Delete a stored file (and the copies of an agent's file on other nodes)."""
        stored: StoredFile = await self._file_call("delete_file", file_id)
        if stored.agent_id is not None and stored.session_id is None:
            owner = self._file_host(file_id)
            await asyncio.gather(
                *(
                    h.call("drop_copies", stored.agent_id, stored.name, stored.sha256)
                    for h in self._alive()
                    if h is not owner
                ),
                return_exceptions=True,
            )

    # -- reporting ----------------------------------------------------------------------

    async def stats(self) -> ClusterStats:
        """Every host's figures summed (as of the reconciler's last poll), and each host's."""
        self._require_running()
        hosts = [h.stats for h in self._alive() if h.stats is not None]
        pools = [s.engine.pool for s in hosts]
        p50s = [p.acquire_p50_ms for p in pools if p.acquire_p50_ms is not None]
        p99s = [p.acquire_p99_ms for p in pools if p.acquire_p99_ms is not None]
        errors = [f"{s.tag}: {s.engine.pool.last_start_error}" for s in hosts
                  if s.engine.pool.last_start_error]  # fmt: skip
        counters = (
            "warm", "starting", "in_use", "waiting", "target_warm", "max_kernels", "hits",
            "misses", "kernels_started", "kernels_failed",
        )  # fmt: skip
        pool = PoolStats(
            **{c: sum(getattr(p, c) for p in pools) for c in counters},
            acquire_p50_ms=max(p50s) if p50s else None,
            acquire_p99_ms=max(p99s) if p99s else None,
            last_start_error=errors[0] if errors else None,
        )
        return ClusterStats(
            pool=pool,
            sessions_active=sum(s.engine.sessions_active for s in hosts),
            sessions_dead=sum(s.engine.sessions_dead for s in hosts),
            sessions_expired=sum(s.engine.sessions_expired for s in hosts),
            sessions_closed=sum(s.engine.sessions_closed for s in hosts),
            uptime_s=round(time.monotonic() - self._started_at, 3),
            hosts_alive=len(hosts),
            hosts_lost=len(self._lost),
            hosts=hosts,
            unavailable_nodes=dict(self._unavailable),
        )


# ---------------------------------------------------------------------------------------
# helpers


class _RemoteFile(io.RawIOBase):
    """A stored file of some node, read in chunks with blocking Ray calls."""

    def __init__(self, host: _Host, file_id: str, size: int) -> None:
        super().__init__()
        self._host = host
        self._file_id = file_id
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size = min(len(view), _READ_CHUNK, self._size - self._pos)
        if size <= 0:
            return 0
        try:
            reply = ray.get(self._host.actor.read_chunk.remote(self._file_id, self._pos, size))
        except ray.exceptions.RayActorError:
            raise FileLost(
                f"file {self._file_id!r}: {self._host.describe()} left while it was read"
            ) from None
        if isinstance(reply, Raised):
            raise reply.error
        view[: len(reply)] = reply
        self._pos += len(reply)
        return len(reply)


async def _read_upload(source: UploadSource, name: str | None, max_bytes: int) -> tuple[bytes, str]:
    """The bytes and name of an upload, read on this side (at most ``max_bytes``)."""
    if isinstance(source, bytes):
        if name is None:
            raise ValueError("uploading bytes needs a name (with its extension)")
        data = source
    elif isinstance(source, str | os.PathLike):
        name = name or os.path.basename(os.fspath(source))
        data = await asyncio.to_thread(_read_path, os.fspath(source), max_bytes)
    else:
        name = name or os.path.basename(str(getattr(source, "name", "") or "")) or None
        if name is None:
            raise ValueError("uploading a stream needs a name (with its extension)")
        data = await asyncio.to_thread(source.read, max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRejected(
            f"upload rejected: {name} is larger than {max_bytes} bytes (max_upload_bytes)"
        )
    return data, name


def _read_path(path: str, max_bytes: int) -> bytes:
    # As the local store: a symlink is refused, not followed.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)
