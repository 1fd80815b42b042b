"""The engine's contract: what every backend offers and every frontend may use.

::

    frontends  CLI · model loop · eval · daemon routes · MCP · gateways
                 │   typed against EngineAPI / SessionAPI, never a concrete class
                 ▼
    contract   EngineAPI (sessions, one-shot runs, files, stats)
               SessionAPI (one stateful sandboxed kernel)
                 │
       ┌─────────┼──────────────────────┐
       ▼         ▼                      ▼
    Engine    daemon.AsyncClient     ray.ClusterEngine
    (this     (a daemon over its     (one Engine per node
    process)   socket or TCP)         of a Ray cluster)

Every method that can cross a process is a coroutine, on every backend, so a
frontend written against these protocols runs unchanged on any of them. A
backend may offer more (``Engine.open_file``, ``AsyncClient.health``,
``ClusterEngine.hosts``) and take more optional arguments; what is here is
what all of them take and return. ``sandkernel.sync`` wraps any of them in
one blocking facade.

Errors are the classes of :mod:`sandkernel.errors`, raised the same way by
every backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol, Self, TypedDict, runtime_checkable

if TYPE_CHECKING:
    from sandkernel.batch import RunRequest, RunResult
    from sandkernel.engine import EngineStats
    from sandkernel.files import StoredFile
    from sandkernel.policy import Policy
    from sandkernel.results import DisplayOutput, ExecutionResult, ProducedFile
    from sandkernel.session import SessionInfo, UploadSource
    from sandkernel.streaming import StreamEvent

__all__ = [
    "EngineAPI",
    "ExposesKernels",
    "KernelConnectionInfo",
    "KernelLink",
    "Managed",
    "ManagedBackend",
    "RunsMany",
    "ServedEngine",
    "SessionAPI",
]


class SessionAPI(Protocol):
    """One conversation's stateful, sandboxed Python kernel."""

    @property
    def id(self) -> str:
        """The session's id (a conversation's or thread's id)."""
        ...

    @property
    def agent_id(self) -> str | None:
        """The agent the session works for (its files are read-only in ``/mnt/data``)."""
        ...

    async def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> ExecutionResult:
        """Run one cell; the result lists the files it produced.

        Raises:
            SessionExpired, SessionClosed, SessionLost, KernelDead.
        """
        ...

    def stream(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> AsyncIterator[StreamEvent]:
        """Run one cell, yielding each output as it comes, then its result (last).

        See :mod:`sandkernel.streaming`; close the iterator early to stop the cell.
        """
        ...

    async def upload(self, source: UploadSource, name: str | None = None) -> StoredFile:
        """Store a file for this session and copy it into ``/mnt/data``."""
        ...

    async def attach(self, file_ids: Sequence[str]) -> list[str]:
        """Copy stored files into ``/mnt/data``; returns their paths there."""
        ...

    async def files(self) -> list[StoredFile]:
        """Files uploaded to this session and produced by it."""
        ...

    async def extend(self, ttl_s: float | None = None) -> float:
        """Keep the session alive; returns its new expiry as a Unix time."""
        ...

    async def interrupt(self) -> None:
        """Interrupt the running cell, if any."""
        ...

    async def info(self) -> SessionInfo:
        """The session's state and times."""
        ...

    async def close(self) -> None:
        """End the session and its kernel (idempotent)."""
        ...


class RunsMany(Protocol):
    """What runs batches of one-shot programs: every engine, and a bare ``BatchPool``."""

    def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> AsyncIterator[RunResult]:
        """Run many requests, yielding results as they finish (tagged with ``id``)."""
        ...


class EngineAPI(RunsMany, Protocol):
    """Sessions, one-shot runs and files, on whatever backend runs them."""

    async def session(
        self,
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        if_expired: Literal["raise", "new"] = "raise",
    ) -> SessionAPI:
        """The session for a conversation id, created if needed.

        Raises:
            PoolExhausted, SessionLimitReached, SessionExpired, SessionClosed.
        """
        ...

    async def get_session(self, session_id: str) -> SessionAPI:
        """The live session with this id (never creates one).

        Raises:
            SessionNotFound, SessionExpired, SessionClosed, SessionLost.
        """
        ...

    async def close_session(self, session_id: str) -> None:
        """Close a session by id (idempotent for ended sessions)."""
        ...

    async def sessions(self) -> list[SessionInfo]:
        """Every session the engine knows, alive or recently ended."""
        ...

    async def stats(self) -> EngineStats:
        """Pool and session figures."""
        ...

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
        """Run ``code`` once as ``python main.py``, statelessly, in a fresh sandbox fork."""
        ...

    async def upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store a file and get its id (given to a session or an agent if named)."""
        ...

    async def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        """Give stored files to an agent: its sessions see them read-only."""
        ...

    async def file(self, file_id: str) -> StoredFile:
        """A stored file's metadata."""
        ...

    async def download(self, file_id: str, *, max_bytes: int | None = None) -> bytes:
        """A stored file's bytes (only the first ``max_bytes`` if given)."""
        ...

    async def list_files(
        self, *, session_id: str | None = None, agent_id: str | None = None
    ) -> list[StoredFile]:
        """Stored files, optionally of one session or one agent."""
        ...

    async def delete_file(self, file_id: str) -> None:
        """Delete a stored file."""
        ...

    async def aclose(self) -> None:
        """Release everything the backend holds (for a client: its connection)."""
        ...


class Managed(Protocol):
    """Started and stopped as an async context manager (``async with``)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> object: ...


class ManagedBackend(EngineAPI, Managed, Protocol):
    """A backend that starts and stops with ``async with`` (every backend does)."""


class ServedEngine(ManagedBackend, Protocol):
    """What the daemon serves: a backend on the daemon's side of the socket.

    The embedded ``Engine`` and ``ClusterEngine`` are both; a daemon client is
    not (a daemon does not front another daemon).
    """

    @property
    def policy(self) -> Policy:
        """The sandbox policy its kernels and one-shot runs use."""
        ...

    def open_file(self, file_id: str) -> BinaryIO:
        """A stored file as a blocking binary stream (read it from a worker thread)."""
        ...

    async def session_info(self, session_id: str) -> SessionInfo:
        """A session it knows, live or ended, by the id or the name it was opened with.

        Raises:
            SessionNotFound: no such session (a cluster's lost with its node: SessionLost).
        """
        ...


class KernelConnectionInfo(TypedDict):
    """Where a kernel's Jupyter sockets are and how its messages are signed."""

    transport: str
    ip: str
    shell_port: int
    iopub_port: int
    stdin_port: int
    control_port: int
    hb_port: int
    key: str
    signature_scheme: str


class KernelLink(Protocol):
    """A live session's kernel, for a frontend that speaks the Jupyter protocol to it.

    The frontend opens sockets of its own to the kernel (``connection_info``)
    for requests and replies, takes IOPub from the engine's (``tap_iopub``),
    and relays messages; the engine keeps what it owns: the kernel's limits,
    the session's lifetime and its files. A link is bound to one kernel: once
    that kernel has ended, ``alive`` stays false, and a restart is a new link.
    """

    @property
    def session_id(self) -> str:
        """The session the kernel serves."""
        ...

    @property
    def alive(self) -> bool:
        """The kernel still runs and still serves its session."""
        ...

    @property
    def policy(self) -> Policy:
        """The kernel's limits (a relayed cell's wall timeout and interrupt grace)."""
        ...

    def connection_info(self) -> KernelConnectionInfo:
        """The kernel's sockets and signing key.

        Raises:
            KernelDead: the kernel has ended.
        """
        ...

    def tap_iopub(self, tap: Callable[[list[bytes]], None]) -> Callable[[], None]:
        """Hand ``tap`` the raw frames of each IOPub message from now on; returns its removal.

        Through the engine's own subscription, in place since the kernel
        started: nothing published after the call is missed.
        """
        ...

    async def wait_ended(self) -> None:
        """Return once the kernel's process has ended (at once if it has).

        Its death (a crash, out of memory, a kill, its session closed or
        expired, the engine shut down) is an event to await, not a state to
        poll.
        """
        ...

    def touch(self, *, ran: bool) -> None:
        """Count activity for the session's expiry (``ran``: a cell started or ended)."""
        ...

    async def interrupt(self) -> None:
        """Interrupt the running cell, if any."""
        ...

    async def collect(
        self, displays: Sequence[DisplayOutput], execution_count: int | None
    ) -> list[ProducedFile]:
        """Store what a relayed cell produced (workspace files, displayed images)."""
        ...

    def ended_because(self, fallback: str) -> str:
        """Why the kernel ended, as a user should read it (out of memory, expired...).

        ``fallback`` when nothing the engine knows says more.
        """
        ...

    async def end(self, reason: str) -> None:
        """End the kernel (kill it, or clear up after its death); the session is then dead."""
        ...


@runtime_checkable
class ExposesKernels(Protocol):
    """A backend whose sessions' kernels a frontend may reach directly (the embedded Engine)."""

    async def kernel_link(self, session_id: str) -> KernelLink:
        """The live kernel of a session.

        Raises:
            SessionNotFound, SessionExpired, SessionClosed, KernelDead.
        """
        ...
