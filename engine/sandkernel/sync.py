"""The blocking facade: the async :class:`~sandkernel.engine.Engine` for sync code.

One event loop runs in a portal thread (``anyio.from_thread``); every method
here hands the matching coroutine of the async API to it and waits. No logic
lives here, so the two APIs cannot drift apart::

    from sandkernel.sync import Engine

    with Engine(pool_size=2) as engine:
        session = engine.session("thread-42")
        print(session.run("1 + 1").text)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from functools import partial
from types import FrameType
from typing import Any, Literal

from anyio.from_thread import BlockingPortal, start_blocking_portal

from sandkernel import engine as _async
from sandkernel.kernel import OutputCallback
from sandkernel.results import ExecutionResult
from sandkernel.session import Session as _AsyncSession
from sandkernel.session import SessionInfo, SessionState


class Session:
    """Blocking view of a :class:`sandkernel.session.Session`."""

    def __init__(self, portal: BlockingPortal, session: _AsyncSession) -> None:
        self._portal = portal
        self._session = session

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def state(self) -> SessionState:
        return self._session.state

    def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_output: OutputCallback | None = None,
        restart: bool | None = None,
    ) -> ExecutionResult:
        """See :meth:`sandkernel.session.Session.run` (``on_output`` runs in the loop thread)."""
        return self._portal.call(
            partial(self._session.run, code, timeout_s=timeout_s, on_output=on_output,
                    restart=restart)
        )  # fmt: skip

    def extend(self, ttl_s: float | None = None) -> float:
        expires: float = self._portal.call(partial(_call_sync, self._session.extend, ttl_s))
        return expires

    def interrupt(self) -> None:
        self._portal.call(self._session.interrupt)

    def close(self) -> None:
        self._portal.call(self._session.close)

    def info(self) -> SessionInfo:
        return self._session.info()


async def _call_sync(fn: Callable[..., Any], *args: Any) -> Any:
    # Sync methods of the async objects still run in the loop thread: they
    # touch state that only that thread may change.
    return fn(*args)


class Engine:
    """Blocking view of :class:`sandkernel.engine.Engine`; takes the same arguments."""

    def __init__(self, **kwargs: Any) -> None:
        wants_sigterm = kwargs.pop("handle_sigterm", True)
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._closed = False
        self._previous_sigterm: Any = None
        try:
            # The loop thread cannot take signals; this facade handles SIGTERM.
            self._engine = _async.Engine(handle_sigterm=False, **kwargs)
            self._portal.call(self._engine.start)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        if wants_sigterm:
            self._install_sigterm()

    def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(partial(fn, *args, **kwargs))

    def session(
        self, session_id: str | None = None, *, if_expired: Literal["raise", "new"] = "raise"
    ) -> Session:
        """See :meth:`sandkernel.engine.Engine.session`."""
        inner = self._run(self._engine.session, session_id, if_expired=if_expired)
        return Session(self._portal, inner)

    def get_session(self, session_id: str) -> Session:
        inner = self._run(_call_sync, self._engine.get_session, session_id)
        return Session(self._portal, inner)

    def close_session(self, session_id: str) -> None:
        self._run(self._engine.close_session, session_id)

    def sessions(self) -> list[SessionInfo]:
        result: list[SessionInfo] = self._run(_call_sync, self._engine.sessions)
        return result

    def stats(self) -> _async.EngineStats:
        result: _async.EngineStats = self._run(_call_sync, self._engine.stats)
        return result

    def reap(self, now: float | None = None) -> list[str]:
        result: list[str] = self._run(self._engine.reap, now)
        return result

    def close(self) -> None:
        """End every session and kernel, then stop the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._restore_sigterm()
        try:
            self._portal.call(self._engine.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.close()
        os.kill(os.getpid(), signal.SIGTERM)
