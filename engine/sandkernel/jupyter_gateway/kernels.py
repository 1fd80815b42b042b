"""The gateway's kernels and Jupyter sessions, kept over the engine's sessions.

A gateway kernel is a sandkernel session whose id is the kernel's id, taken
from the warm pool; a restart ends its kernel and gives the session a fresh
one (a new sandbox, variables gone), whose ``/mnt/data`` holds the session's
files again, as a Jupyter server's disk keeps them. A Jupyter session
(notebook path to kernel) is a record here, as Jupyter Server keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import zmq.asyncio

from sandkernel._tasks import wait_out
from sandkernel.api import ExposesKernels, KernelLink, ServedEngine
from sandkernel.errors import (
    BadInput,
    SandkernelError,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
)
from sandkernel.jupyter_gateway.relay import KernelRelay
from sandkernel.jupyter_gateway.specs import KernelSpecs

_KEEP_DEAD: Final = 1000  # dead kernels still listed (as dead) until deleted, at most


def iso(moment: datetime) -> str:
    """A time as Jupyter Server writes it (UTC, ``Z``)."""
    # Always with microseconds: Jupyter Server's GatewayClient parses "%Y-%m-%dT%H:%M:%S.%fZ".
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class GatewayKernels:
    """Kernels started through the gateway, by id.

    Args:
        engine: the daemon's engine (sessions, the policy).
        kernels: the same engine's kernel links.
        specs: the kernel specs served.
    """

    def __init__(self, engine: ServedEngine, kernels: ExposesKernels, specs: KernelSpecs) -> None:
        self.engine = engine
        self.kernels = kernels
        self.specs = specs
        self._context = zmq.asyncio.Context()
        self._relays: dict[str, KernelRelay] = {}

    async def start(self, name: str | None) -> KernelRelay:
        """A new kernel from the warm pool.

        Raises:
            BadInput: an unknown spec. SessionLimitReached, PoolExhausted,
                KernelStartFailed: as the engine says.
        """
        spec = self.specs.resolve(name)
        kernel_id = str(uuid.uuid4())
        await self.engine.session(kernel_id)
        try:
            relay = KernelRelay(
                kernel_id, spec, self._context, lambda replaced: self._fresh(kernel_id, replaced)
            )
            await relay.attach(await self.kernels.kernel_link(kernel_id))
        except BaseException:
            with contextlib.suppress(SandkernelError):
                await wait_out(asyncio.ensure_future(self.engine.close_session(kernel_id)))
            raise
        self._relays[kernel_id] = relay
        self._forget_dead()
        return relay

    async def _fresh(self, kernel_id: str, replaced: KernelLink | None) -> KernelLink:
        """A new kernel for the session, its files put back in ``/mnt/data``.

        The engine's own restart does that: once the old kernel is ended (the
        session is then dead, not closed), a run with ``restart=True`` starts
        a fresh kernel and restores the session's files, each at its path, as
        the cells last left them. Its cell is empty: IPython neither counts
        nor records it. A session that expired or was closed is over: a new
        one under the same id starts empty (its files stay in the store).
        """
        if replaced is not None:
            with contextlib.suppress(SandkernelError):
                # What the running cell (or a thread) wrote since the last reply.
                await replaced.collect((), None)
            await replaced.end("the kernel was restarted")
        try:
            session = await self.engine.get_session(kernel_id)
        except (SessionExpired, SessionClosed, SessionNotFound):
            await self.engine.session(kernel_id, if_expired="new")
        else:
            await session.run("", restart=True)
        return await self.kernels.kernel_link(kernel_id)

    def get(self, kernel_id: str) -> KernelRelay:
        """Raises SessionNotFound (404) for an unknown id."""
        relay = self._relays.get(kernel_id)
        if relay is None:
            raise SessionNotFound(f"Kernel does not exist: {kernel_id[:80]}")
        return relay

    def all(self) -> list[KernelRelay]:
        return list(self._relays.values())

    async def delete(self, kernel_id: str) -> None:
        relay = self.get(kernel_id)
        del self._relays[kernel_id]
        await relay.shutdown()
        with contextlib.suppress(SandkernelError):
            await self.engine.close_session(kernel_id)

    def _forget_dead(self) -> None:
        dead = [r for r in self._relays.values() if r.execution_state == "dead"]
        for relay in dead[: max(0, len(dead) - _KEEP_DEAD)]:
            if not relay.connection_count:
                del self._relays[relay.id]

    async def aclose(self) -> None:
        """End every kernel of the gateway (the daemon is stopping)."""
        await asyncio.gather(
            *(self.delete(kernel_id) for kernel_id in list(self._relays)), return_exceptions=True
        )
        self._context.term()

    @staticmethod
    def model(relay: KernelRelay) -> dict[str, Any]:
        """A kernel as ``/api/kernels/{id}`` answers it."""
        return {
            "id": relay.id,
            "name": relay.name,
            "last_activity": iso(relay.last_activity),
            "execution_state": relay.execution_state,
            "connections": relay.connection_count,
        }


@dataclass
class JupyterSession:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str


class JupyterSessions:
    """``/api/sessions``: which notebook (path) uses which kernel, as Jupyter Server keeps it."""

    def __init__(self, kernels: GatewayKernels) -> None:
        self.kernels = kernels
        self._sessions: dict[str, JupyterSession] = {}
        #: sessions being created, by path: a second request for the path waits for it
        self._creating: dict[str, asyncio.Event] = {}

    def _live(self) -> list[JupyterSession]:
        # A session whose kernel was deleted is gone with it.
        known = {r.id for r in self.kernels.all()}
        for session in [s for s in self._sessions.values() if s.kernel_id not in known]:
            del self._sessions[session.id]
        return list(self._sessions.values())

    def model(self, session: JupyterSession) -> dict[str, Any]:
        kernel = GatewayKernels.model(self.kernels.get(session.kernel_id))
        return {
            "id": session.id,
            "path": session.path,
            "name": session.name,
            "type": session.type,
            "kernel": kernel,
            "notebook": {"path": session.path, "name": session.name},
        }

    def all(self) -> list[dict[str, Any]]:
        return [self.model(s) for s in self._live()]

    def get(self, session_id: str) -> JupyterSession:
        for session in self._live():
            if session.id == session_id:
                return session
        raise SessionNotFound(f"Session not found: {session_id[:80]}")

    async def _kernel_for(self, kernel: Any) -> str:
        if not isinstance(kernel, dict):
            raise BadInput("kernel must be an object with a name or an id")
        if kernel.get("id"):
            return self.kernels.get(str(kernel["id"])).id
        name = kernel.get("name")
        if name is not None and not isinstance(name, str):
            raise BadInput("kernel.name must be a string")
        return (await self.kernels.start(name)).id

    async def create(self, body: dict[str, Any]) -> JupyterSession:
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise BadInput("path is required")
        while True:
            for session in self._live():
                if session.path == path:
                    return session
            creating = self._creating.get(path)
            if creating is None:
                break
            # Two tabs opening one notebook at once: one session, as one after the
            # other gets (unless the first fails: then this one tries for itself).
            await creating.wait()
        # Checked before a kernel starts: a refused request leaves none behind.
        name, kind = _text(body.get("name"), ""), _text(body.get("type"), "")
        creating = self._creating[path] = asyncio.Event()
        try:
            kernel_id = await self._kernel_for(body.get("kernel") or {})
            session = JupyterSession(
                id=str(uuid.uuid4()), path=path, name=name, type=kind, kernel_id=kernel_id
            )
            self._sessions[session.id] = session
        finally:
            del self._creating[path]
            creating.set()
        return session

    async def update(self, session_id: str, body: dict[str, Any]) -> JupyterSession:
        """Change a session as Jupyter Server does; nothing changes if any part is refused.

        ``kernel``: an ``id`` moves the session to that kernel, a ``name``
        starts a new one; neither, no change of kernel. An old kernel no
        session uses any more is shut down.
        """
        session = self.get(session_id)
        changes = {
            f: _text(body[f], getattr(session, f)) for f in ("path", "name", "type") if f in body
        }
        kernel = body.get("kernel")
        if kernel is not None and not isinstance(kernel, dict):
            raise BadInput("kernel must be an object with a name or an id")
        kernel_id = session.kernel_id
        if kernel and (kernel.get("id") or kernel.get("name") is not None):
            try:
                kernel_id = await self._kernel_for(kernel)
            except SessionNotFound:  # Jupyter Server's answer: a 400
                raise BadInput(f"No such kernel: {str(kernel.get('id'))[:80]}") from None
            if self._sessions.get(session.id) is not session:
                # Deleted while its new kernel started: that kernel is nobody's.
                if not kernel.get("id") and not any(
                    s.kernel_id == kernel_id for s in self._sessions.values()
                ):
                    with contextlib.suppress(SessionNotFound):
                        await self.kernels.delete(kernel_id)
                raise SessionNotFound(f"Session not found: {session_id[:80]}")
        for field, value in changes.items():
            setattr(session, field, value)
        old, session.kernel_id = session.kernel_id, kernel_id
        if old != kernel_id and not any(s.kernel_id == old for s in self._live()):
            with contextlib.suppress(SessionNotFound):
                await self.kernels.delete(old)
        return session

    async def delete(self, session_id: str) -> None:
        session = self.get(session_id)
        del self._sessions[session.id]
        if not any(s.kernel_id == session.kernel_id for s in self._sessions.values()):
            with contextlib.suppress(SessionNotFound):
                await self.kernels.delete(session.kernel_id)


def _text(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadInput("path, name and type must be strings")
    return value
