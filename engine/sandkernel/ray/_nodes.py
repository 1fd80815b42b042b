"""The cluster's hosts, one per node: started as nodes join, polled, forgotten when lost."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sandkernel.errors import EngineClosed, SandboxUnavailable
from sandkernel.policy import Policy
from sandkernel.ray._handle import HostGone, HostHandle, LostHost, alive_nodes, death_reason
from sandkernel.ray._names import SessionNames
from sandkernel.ray._protocol import (
    HostClosing,
    HostConfig,
    HostInfo,
    Raised,
    host_actor_name,
    policy_digest,
)
from sandkernel.ray.errors import HostUnreachable
from sandkernel.ray.session import ClusterSession

log = logging.getLogger(__name__)

_MAX_CONCURRENCY = 4096  # calls in flight per host actor (most wait on a kernel)


class HostDirectory:
    """The live hosts and the reconciler that keeps them: the base of the cluster engine."""

    # Set by ClusterEngine.__init__; declared here, where the reconciler uses them.
    acquire_timeout_s: float
    max_sessions: int
    max_upload_bytes: int
    session_ttl_s: float
    _state: Literal["new", "running", "closing", "closed"]
    _client_id: str
    _namespace: str
    _node_resource: str | None
    _refresh_interval_s: float
    _lease_ttl_s: float
    _start_timeout_s: float
    _host_config: HostConfig
    _remote_host: Any
    _hosts: dict[str, HostHandle]  # node id -> live host
    _by_tag: dict[str, HostHandle]
    _lost: dict[str, LostHost]  # tag -> what was lost
    _starting: dict[str, asyncio.Task[None]]
    _unavailable: dict[str, str]  # node id -> why no host runs there
    _retry_at: dict[str, float]
    _sessions: dict[str, ClusterSession]  # cluster-wide id -> session
    _by_name: dict[str, str]  # name -> cluster-wide id
    _capacity: asyncio.Event | None
    _wake: asyncio.Event | None
    _names: SessionNames

    def _require_running(self) -> None:
        if self._state != "running":
            raise EngineClosed(
                "the cluster engine is not running: use `async with ClusterEngine(...)`"
            )

    def _lost_at(self, tag: str) -> LostHost | None:
        """What was lost under ``tag``, if anything.

        A host a call found gone is lost from then on, before the reconciler's
        next pass moves it from ``_by_tag`` to ``_lost``.
        """
        host = self._by_tag.get(tag)
        if host is not None and host.gone:
            return LostHost.of(host)
        return self._lost.get(tag)

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
        await asyncio.gather(
            self._names.renew(self._poll_timeout_s()),
            *(self._poll(h) for h in list(self._hosts.values())),
        )

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
                self._check_same_policy(node_id, info)
                host = HostHandle(actor, info, endpoint, self._confirm_lost)
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

    def _check_same_policy(self, node_id: str, info: HostInfo) -> None:
        """Refuse a node's host that enforces another policy than this engine's.

        The host actor is per node and namespace, and found by name: one that
        another engine started keeps the settings it was started with. Sharing
        it is fine; running this engine's code under another policy is not.
        """
        mine = self._host_config.engine.policy
        if not isinstance(mine, Policy) or not info.policy_digest:
            return  # resolved by each node (not this engine's build), or an older host
        if info.policy_digest != policy_digest(mine):
            raise SandboxUnavailable(
                f"node {node_id} already runs a host, started by another engine, that "
                f"enforces policy {info.policy!r}, not this engine's {mine.name!r}: use the "
                "same policy, or another Ray namespace for this engine"
            )

    def _add_host(self, host: HostHandle) -> None:
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

    def _lose(self, host: HostHandle, reason: str) -> None:
        host.mark_lost(reason)
        if self._hosts.get(host.node_id) is host:
            del self._hosts[host.node_id]
        if self._by_tag.get(host.tag) is host:
            del self._by_tag[host.tag]
        self._lost[host.tag] = LostHost.of(host)
        log.warning("sandkernel host on %s %s; its sessions are lost", host.describe(), reason)
        self._capacity_changed()
        if self._wake is not None:
            self._wake.set()

    def _capacity_changed(self) -> None:
        if self._capacity is not None:
            self._capacity.set()

    async def _poll(self, host: HostHandle) -> None:
        names = [s.name for s in self._sessions.values() if s._host is host and not s.closed]
        opened_before = host.opened
        try:
            stats, infos = await asyncio.wait_for(
                host.call("poll", self._client_id, self._lease_ttl_s, names),
                timeout=self._poll_timeout_s(),
            )
        except HostGone:
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

    def _poll_timeout_s(self) -> float:
        return max(5.0, 5 * self._refresh_interval_s)

    async def _confirm_lost(self, host: HostHandle) -> None:
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
                self._lose(host, death_reason(exc))
            except TimeoutError:
                continue

    def _alive(self) -> list[HostHandle]:
        return [h for h in self._hosts.values() if not h.gone]

    async def _alive_or_wait(self) -> list[HostHandle]:
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
