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
  that host's actor: no router, one Ray call per cell. A name is looked up
  and opened by one engine of the namespace at a time: one live session per
  name, as on one machine. A session is held by the engines that opened it,
  and closed once they have all left: closed, or crashed (their lease expired).
* **One-shot runs** (``run_once``, ``run_many``) go to the hosts least loaded
  for their batch slots, spread over every host before any gets a queue, and
  each result comes back as it finishes (several runs travel in one call when
  many wait). When every host is full the caller waits (back-pressure). A run
  whose host is lost meanwhile is run again elsewhere: it has no state.
* **Files** live on the node that stored or produced them; their ids carry the
  node's tag. A file attached to a session on another node is copied there
  first, host to host. An agent's files are copied to every node that runs a
  session of the agent.
* **Nodes** come and go: a driver-side reconciler (an asyncio task) polls the
  cluster every ``refresh_interval_s``, starts a host on each node that joins,
  and forgets the hosts of nodes that left. Calls for a session whose node is
  gone raise :class:`~sandkernel.ray.errors.SessionLost`, which names the node.

The engine is built of one module per concern: the host handle
(``_handle``), the hosts and their reconciler (``_nodes``), session
placement and lookup (``_routing``), one name opened by one engine at a time
(``_names``), one-shot runs (``_batch``), files across nodes (``_files``) and
:class:`ClusterSession` (``session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Literal, Unpack

import ray

from sandkernel.config import EngineConfig, EngineSettings
from sandkernel.errors import (
    EngineClosed,
    KernelStartFailed,
    PoolExhausted,
    SandboxUnavailable,
    SessionLimitReached,
)
from sandkernel.limits import check_id
from sandkernel.policy import Policy, load_policy
from sandkernel.pool import PoolStats
from sandkernel.ray._batch import BatchDistribution
from sandkernel.ray._files import ClusterFiles
from sandkernel.ray._handle import RUN_ATTEMPTS, HostGone, HostHandle, alive_nodes
from sandkernel.ray._names import SessionNames
from sandkernel.ray._protocol import (
    DEFAULT_NAMESPACE,
    ClusterStats,
    HostConfig,
    check_name,
    session_id_of,
)
from sandkernel.ray.errors import HostUnreachable, SessionLost
from sandkernel.ray.host import NodeHost
from sandkernel.ray.session import ClusterSession
from sandkernel.session import SessionInfo

#: ``Engine`` arguments outside its settings, that make no sense on a remote node.
_DRIVER_ONLY = frozenset({"clock", "handle_sigterm"})

__all__ = ["ClusterEngine", "ClusterSession", "alive_nodes"]


class ClusterEngine(ClusterFiles, BatchDistribution):
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
        lease_ttl_s: once this engine has stopped renewing its lease for this
            long (its process died), its hosts close the sessions it held; a
            host whose clients all stopped shuts its engine down and exits.
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
        self.max_sessions = self.config.max_sessions
        self.session_ttl_s = self.config.session_ttl_s
        self.acquire_timeout_s = self.config.acquire_timeout_s
        self.max_upload_bytes = self.config.max_upload_bytes
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
        self._names = SessionNames(namespace, self._client_id, lease_ttl_s)
        self._state = "new"
        self._owns_ray = False
        self._remote_host = None
        self._hosts = {}  # node id -> live host
        self._by_tag = {}
        self._lost = {}  # tag -> what was lost
        self._starting = {}
        self._unavailable = {}  # node id -> why no host runs there
        self._retry_at = {}
        self._sessions = {}  # cluster-wide id -> session
        self._by_name = {}  # name -> cluster-wide id
        self._creating: dict[str, asyncio.Future[ClusterSession]] = {}
        self._capacity = None
        self._reconciler: asyncio.Task[None] | None = None
        self._wake = None
        self._started_at = 0.0

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
        """Leave the hosts, which close the sessions only this engine held.

        Idempotent. An engine holds the sessions it opened (made, or opened by
        name); a session another engine of the namespace also opened stays
        open, as does a host that other engines still use (the last client
        to leave stops it). A session only
        looked up by id or name (``get_session``) is not held. The same
        happens if this engine's process dies: its hosts close its sessions
        once its lease (``lease_ttl_s``) expires.
        """
        if self._state in ("closing", "closed", "new"):
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"
        tasks = [t for t in (self._reconciler, *self._starting.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hosts = list(self._hosts.values())
        await asyncio.gather(
            self._names.leave(),
            *(self._leave(h) for h in hosts if not h.gone),
            return_exceptions=True,
        )
        for host in hosts:
            host.mark_lost("was left when the engine closed")  # and its channel closed
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
        self._state = "closed"

    async def _leave(self, host: HostHandle) -> None:
        """Release this engine's lease; if it was the last, wait (bounded) for the host's exit.

        The host closes the sessions no other engine holds.
        """
        last = host.stats is not None and host.stats.clients <= 1
        await host.call("release", self._client_id)
        if not last:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(host.call("ping"), timeout=2)
            except (HostGone, HostUnreachable, TimeoutError):
                return
            await asyncio.sleep(0.1)

    async def shutdown_hosts(self) -> None:
        """Stop every host now, whichever engines still use them (an administrator's tool)."""
        self._require_running()
        await asyncio.gather(
            *(h.call("shutdown") for h in self._hosts.values()), return_exceptions=True
        )

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
            check_id(agent_id, "agent")
        host: HostHandle | None = None
        if session_id is None:
            name = f"sess-{secrets.token_hex(8)}"
        else:
            parsed = self._qualified(session_id)
            name = session_id if parsed is None else parsed[1]
            check_name(name)
            known = self._known(session_id)
            past = known is not None and known._past_expiry()
            if known is not None and not known.closed and not known._host.gone and not past:
                known._check_usable()
                return known
            if known is not None and known.closed and if_expired == "raise":
                known._check_usable()  # ended before its node left: closed, as it was
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
        # Another engine may be opening this name now (a generated one is this
        # engine's alone): held, it is looked up and opened by one at a time.
        holding = contextlib.nullcontext() if session_id is None else self._names.holding(name)
        try:
            async with holding:
                if host is None and session_id is not None and name == session_id:
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
        host: HostHandle | None,
        agent_id: str | None,
        workspace: str | Path | None,
        if_expired: Literal["raise", "new"],
    ) -> ClusterSession:
        placed = host is None
        tried: list[HostHandle] = []
        last_error: BaseException | None = None
        for _ in range(RUN_ATTEMPTS):
            target = host if host is not None else await self._place_session(tried)
            if placed:
                target.placing += 1
            try:
                if agent_id is not None:
                    await self._sync_agent_files(agent_id, target)
                ws = None if workspace is None else str(workspace)
                info = await target.call(
                    "open_session", name, self._client_id, agent_id, ws, if_expired
                )
            except HostGone as exc:
                if not placed:
                    raise SessionLost(
                        f"session {session_id_of(target.tag, name)!r} was on "
                        f"{target.describe()}, which {target.lost_reason}"
                    ) from None
                tried.append(target)
                last_error = exc
                continue
            except (SessionLimitReached, PoolExhausted, KernelStartFailed) as exc:
                # Full, or (KernelStartFailed) unable to start kernels: another
                # host may have room, or sandboxes that start.
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
            session = self._register(target, name, info, agent_id)
            if agent_id is not None:
                # An agent's file uploaded while the session opened went to the nodes
                # that had the agent's sessions then: once more, now that it has one.
                with contextlib.suppress(HostGone):
                    await self._sync_agent_files(agent_id, target)
            return session
        raise SandboxUnavailable(f"no host could open session {name!r}: {last_error}")

    async def get_session(self, session_id: str) -> ClusterSession:
        """The live session with this id or name (never creates one).

        A session this engine does not know yet (opened by another engine in
        the namespace) is looked up on its host.

        Raises:
            SessionNotFound, SessionExpired, SessionClosed, SessionLost.
        """
        self._require_running()
        session = await self._lookup(session_id)
        await session._require_usable()
        return session

    async def close_session(self, session_id: str) -> None:
        """Close a session by id or name (idempotent for ended sessions)."""
        self._require_running()
        await (await self._lookup(session_id)).close()

    async def session_info(self, session_id: str) -> SessionInfo:
        """A session by id or name, alive or recently ended, from its host.

        Raises:
            SessionNotFound, SessionLost (its node left).
        """
        self._require_running()
        return await (await self._lookup(session_id)).info()

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

    async def stats(self) -> ClusterStats:
        """Every host's figures summed, and each host's, as the hosts report them now."""
        self._require_running()
        # One poll of every live host first: a session opened a moment ago counts.
        await asyncio.gather(*(self._poll(h) for h in self._alive()), return_exceptions=True)
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
            kernel_start="; ".join(
                f"{s.tag}: {s.engine.pool.kernel_start}"
                for s in hosts
                if s.engine.pool.kernel_start
            )
            or None,
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
