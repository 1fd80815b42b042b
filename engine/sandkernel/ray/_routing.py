"""Which host a session goes to, and which host holds a session id or name."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from sandkernel.errors import SandboxUnavailable, SessionLimitReached, SessionNotFound
from sandkernel.ray._handle import HostGone, HostHandle
from sandkernel.ray._nodes import HostDirectory
from sandkernel.ray._protocol import parse_session_id, session_id_of
from sandkernel.ray.errors import SessionLost
from sandkernel.ray.session import ClusterSession
from sandkernel.session import SessionInfo, SessionState

_KEEP_ENDED = 10_000  # ended sessions remembered, to name them in errors


class SessionRouting(HostDirectory):
    """Sessions placed on the emptiest host, and found again by id or name."""

    async def _bring_files(
        self, target: HostHandle, session_name: str, file_ids: Sequence[str]
    ) -> None:
        """Copy other nodes' files to ``target``: the engine's file part does it.

        Declared here because the sessions registered here call it on their engine.
        """
        raise NotImplementedError

    def _register(
        self, host: HostHandle, name: str, info: SessionInfo, agent_id: str | None
    ) -> ClusterSession:
        session_id = session_id_of(host.tag, name)
        # The host's word: an existing session keeps the agent it was made for.
        agent_id = info.agent_id if info.agent_id is not None else agent_id
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

    async def _place_session(self, exclude: Sequence[HostHandle]) -> HostHandle:
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

    async def _find_session_host(self, name: str) -> HostHandle | None:
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

    def _is_node_tag(self, tag: str) -> bool:
        """Whether ``tag`` is a node's, alive or lost (else an id only looks qualified)."""
        return tag in self._by_tag or tag in self._lost

    def _qualified(self, session_id: str) -> tuple[str, str] | None:
        """``(node tag, name)`` of a session id, or None for a bare name.

        A name that only looks qualified ("20240105.thread-1": no node has
        that tag) is a bare name.
        """
        parsed = parse_session_id(session_id)
        return parsed if parsed is not None and self._is_node_tag(parsed[0]) else None

    def _host_of_tag(self, tag: str, session_id: str) -> HostHandle:
        host = self._by_tag.get(tag)
        if host is not None and not host.gone:
            return host
        lost = self._lost_at(tag)
        if lost is not None:
            raise SessionLost(f"session {session_id!r} was on {lost.where}, which {lost.reason}")
        raise SessionNotFound(f"no session {session_id!r}: no node of the cluster has tag {tag}")

    async def _lookup(self, session_id: str) -> ClusterSession:
        """A session by id or name, known here or found on its host."""
        session = self._known(session_id)
        if session is not None and session._past_expiry() and not session._host.gone:
            # What its host says now: expired, or kept alive meanwhile by another engine.
            try:
                info = await session._host.call("find_session", session.name)
            except HostGone:
                raise session._lost_error() from None
            if info is not None:
                session._update(info)
        if session is not None:
            return session
        parsed = self._qualified(session_id)
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
        except HostGone:
            raise SessionLost(f"session {session_id!r} was on {host.describe()}") from None
        if info is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return self._register(host, name, info, None)
