"""A session of the cluster: one conversation's kernel on one node, called through its host."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from sandkernel.errors import FileNotFoundInStore, SessionClosed, SessionExpired, SessionNotFound
from sandkernel.files import StoredFile
from sandkernel.kernel import OutputCallback
from sandkernel.ray._handle import HostGone, HostHandle
from sandkernel.ray._protocol import NeedFiles, session_id_of
from sandkernel.ray._uploads import read_upload
from sandkernel.ray.errors import HostUnreachable, SessionLost
from sandkernel.results import ExecutionResult
from sandkernel.session import SessionInfo, SessionState, UploadSource
from sandkernel.streaming import StreamsFromRun

FILE_ROUNDS = 3  # "copy these files over, then call again" rounds per call


class SessionOwner(Protocol):
    """What a :class:`ClusterSession` needs of the engine that opened it."""

    @property
    def session_ttl_s(self) -> float: ...

    @property
    def max_upload_bytes(self) -> int: ...

    async def _bring_files(
        self, target: HostHandle, session_name: str, file_ids: Sequence[str]
    ) -> None: ...

    def _session_closed(self, session: ClusterSession) -> None: ...


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
        engine: SessionOwner,
        host: HostHandle,
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
        #: Why the session expired, in its host's (the engine's) words, once the host said.
        self._expired_message: str | None = None

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

    def _past_expiry(self) -> bool:
        """The expiry the host last reported has passed (the host may know better)."""
        return not self.closed and self._info.expires_at <= datetime.now(UTC)

    def _check_usable(self) -> None:
        """Raise if the session is known to be closed, expired or lost.

        Why a session expired is its host's to say: until it has, an expired
        session passes here, and the call this guards gets the host's answer.
        """
        if self._info.state is SessionState.CLOSED:
            raise SessionClosed(f"session {self.id!r} was closed")
        if self._info.state is SessionState.EXPIRED and self._expired_message is not None:
            raise SessionExpired(self._expired_message)
        if self._host.gone:
            raise self._lost_error()

    async def _require_usable(self) -> None:
        """:meth:`_check_usable`, once the host has said why, if the session expired."""
        state = self._info.state
        if state is SessionState.EXPIRED and self._expired_message is None and not self._host.gone:
            self._update(await self._call("check_session", self.name, usable=False))
        self._check_usable()

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        """What the host's errors mean for this session: lost, expired or closed from now on."""
        try:
            yield
        except HostGone:
            raise self._lost_error() from None
        except SessionExpired as exc:
            self._expired_message = str(exc)
            self._mark_ended(SessionState.EXPIRED, "expired")
            raise
        except SessionClosed:
            self._mark_ended(SessionState.CLOSED, "closed")
            raise

    async def _call(self, method: str, *args: Any, usable: bool = True) -> Any:
        if usable:
            self._check_usable()
        with self._answering():
            return await self._host.call(method, *args)

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
        for _ in range(FILE_ROUNDS):
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
        final: object = None
        with self._answering():
            stream = self._host.stream("run_stream", self.name, code, timeout_s, restart, file_ids)
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    if isinstance(item, dict):
                        on_output(item)
                    else:
                        final = item
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
        return await self._store_upload(source, name)

    async def _store_upload(
        self, source: UploadSource, name: str | None, *, retention_s: float | None = None
    ) -> StoredFile:
        self._check_usable()
        data, filename = await read_upload(source, name, self._engine.max_upload_bytes)
        stored: StoredFile = await self._call(
            "upload_to_session", self.name, data, filename, retention_s
        )
        return stored

    async def attach(self, file_ids: Sequence[str]) -> list[str]:
        """Copy stored files (of any node) into ``/mnt/data`` now; returns their paths there."""
        for _ in range(FILE_ROUNDS):
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
        except (HostGone, SessionNotFound):
            self._mark_ended(SessionState.CLOSED, "lost")
        self._engine._session_closed(self)
