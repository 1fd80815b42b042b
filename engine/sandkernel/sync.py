"""The blocking facade: any backend of the contract, for code that does not use asyncio.

One event loop runs in a portal thread (``anyio.from_thread``); the backend
lives on it, and every method here hands the backend's coroutine of the same
name to it and waits; interrupted while it waits (Ctrl-C), it cancels that
coroutine first, as cancelling the async call would. No other logic lives here,
and every method of :class:`~sandkernel.api.EngineAPI` and
:class:`~sandkernel.api.SessionAPI` has its blocking twin with the same
parameters (a test checks it), so the blocking API cannot drift from the async
one::

    from sandkernel.sync import Engine                  # the embedded engine

    with Engine(pool_size=2) as engine:
        session = engine.session("thread-42")
        print(session.run("1 + 1").text)

    from sandkernel.daemon import Client                # a daemon
    from sandkernel.sync import BlockingEngine
    from sandkernel.ray import ClusterEngine            # a Ray cluster

    with BlockingEngine(lambda: ClusterEngine("auto")) as cluster:
        print(cluster.run_once("print(6 * 7)").stdout)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from sandkernel.api import ManagedBackend, SessionAPI
from sandkernel.errors import EngineClosed

if TYPE_CHECKING:
    from pathlib import Path

    from sandkernel import engine as _embedded  # noqa: F401 - named in Engine's base, quoted
    from sandkernel.batch import RunRequest, RunResult
    from sandkernel.config import EngineConfig
    from sandkernel.engine import EngineStats
    from sandkernel.files import StoredFile
    from sandkernel.results import ExecutionResult
    from sandkernel.session import SessionInfo, UploadSource
    from sandkernel.streaming import StreamEvent

__all__ = ["BlockingEngine", "BlockingSession", "Engine", "ManagedBackend"]

log = logging.getLogger(__name__)


class _Portal:
    """Calls into the loop thread: one value, or an async iterator item by item.

    Once its engine is closed (``closed``), a call raises EngineClosed, as the
    async API does, not anyio's "portal is not running".

    A call interrupted in the calling thread (Ctrl-C, or any exception raised
    there while it waits) cancels its task on the loop, as cancelling the task
    of the async API does, waits for that task to end (for
    :data:`_CANCELLED_WAIT_S` at most), then lets the exception go on: nothing
    keeps running for a caller that has gone, a cell has been interrupted, and
    its session is free for the next call.
    """

    def __init__(self, portal: BlockingPortal) -> None:
        self.portal = portal
        self.closed = False

    def call[T](self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self.closed:
            raise EngineClosed("the engine is closed")
        task = _CallerTask(partial(fn, *args, **kwargs))
        try:
            return self.portal.start_task_soon(task.run).result()
        except BaseException:
            # Ended: the error is the coroutine's own, and goes on unchanged. Else this
            # thread was interrupted, maybe before start_task_soon returned (which is
            # why the task is cancelled through its own handle, not the future).
            if task.cancel_from_caller():
                task.ended.wait(_CANCELLED_WAIT_S)
            raise

    def iterate[T](self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        stepper: _Stepper[T] = self.call(_made, partial(_Stepper, make))
        try:
            while (item := self.call(stepper.next_or_end)) is not _END:
                yield item
        except GeneratorExit:  # its reader stopped early
            if not self.closed:
                self.call(stepper.close)
            raise
        except BaseException:
            # Interrupted (its pending step has been cancelled) or failed: close it too,
            # but wait no longer than for a cancellation; a step that outlives that
            # bound is closed once it ends, on the loop.
            if not self.closed:
                closing = self.portal.start_task_soon(stepper.close)
                if not concurrent.futures.wait([closing], _CANCELLED_WAIT_S).not_done:
                    closing.result()
            raise
        if not self.closed:
            self.call(stepper.close)


# The embedded engine settles a cancelled cell within its policy's interrupt grace
# (2 s by default), or kills its kernel (5 s more at most). A caller that will not
# wait that long presses Ctrl-C again, which ends this wait.
_CANCELLED_WAIT_S = 10.0

_END: Any = object()


async def _made[T](make: Callable[[], T]) -> T:
    # Made in the loop thread: async iterators and backends belong to its loop.
    return make()


class _CallerGone(Exception):
    """How a task its caller cancelled ends: read by nobody, as its caller has gone."""


class _CallerTask[T]:
    """One call on the loop, which its caller can cancel from its own thread at any time.

    The handle exists before the task is started, so that a caller interrupted
    while starting it (before it has the future) can still cancel it.
    """

    def __init__(self, call: Callable[[], Awaitable[T]]) -> None:
        self._call = call
        self._lock = threading.Lock()  # _cancelled and _started, read and set in both threads
        self._cancelled = False
        self._started: tuple[asyncio.AbstractEventLoop, anyio.CancelScope] | None = None
        self.ended = threading.Event()

    async def run(self) -> T:
        with anyio.CancelScope() as scope:
            with self._lock:
                if self._cancelled:
                    raise _CallerGone
                self._started = (asyncio.get_running_loop(), scope)
            try:
                return await self._call()
            finally:
                self.ended.set()
        raise _CallerGone

    def cancel_from_caller(self) -> bool:
        """Cancel the call (in the caller's thread); True if it runs, and will end soon."""
        with self._lock:
            self._cancelled = True  # one not started yet never starts
            started = self._started
        if started is None or self.ended.is_set():
            return False
        loop, scope = started
        try:
            loop.call_soon_threadsafe(scope.cancel)
        except RuntimeError:  # the loop has closed: nothing runs on it any more
            return False
        return True


class _Stepper[T]:
    """An async iterator driven from another thread one step at a time, in the loop thread.

    Its steps and its close take turns: closing an async generator while a step
    of it runs (one cancelled and still unwinding) raises RuntimeError.
    """

    def __init__(self, make: Callable[[], AsyncIterator[T]]) -> None:
        self._iterator = make()
        self._turn = anyio.Lock()

    async def next_or_end(self) -> T:
        async with self._turn:
            return await anext(self._iterator, _END)

    async def close(self) -> None:
        async with self._turn:
            close = getattr(self._iterator, "aclose", None)
            if close is not None:
                await close()


class BlockingSession:
    """A :class:`~sandkernel.api.SessionAPI`, blocking."""

    def __init__(self, portal: _Portal, session: SessionAPI) -> None:
        self._portal = portal
        self._session = session

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def agent_id(self) -> str | None:
        return self._session.agent_id

    def run(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> ExecutionResult:
        """Run one cell (see :meth:`sandkernel.api.SessionAPI.run`)."""
        return self._portal.call(
            self._session.run, code, timeout_s=timeout_s, restart=restart, file_ids=file_ids
        )

    def stream(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        restart: bool | None = None,
        file_ids: Sequence[str] = (),
    ) -> Iterator[StreamEvent]:
        """Run one cell, yielding its outputs as they come, then its result (last)."""
        return self._portal.iterate(
            partial(
                self._session.stream, code, timeout_s=timeout_s, restart=restart, file_ids=file_ids
            )
        )

    def upload(self, source: UploadSource, name: str | None = None) -> StoredFile:
        return self._portal.call(self._session.upload, source, name)

    def attach(self, file_ids: Sequence[str]) -> list[str]:
        return self._portal.call(self._session.attach, file_ids)

    def files(self) -> list[StoredFile]:
        return self._portal.call(self._session.files)

    def extend(self, ttl_s: float | None = None) -> float:
        return self._portal.call(self._session.extend, ttl_s)

    def interrupt(self) -> None:
        self._portal.call(self._session.interrupt)

    def info(self) -> SessionInfo:
        return self._portal.call(self._session.info)

    def close(self) -> None:
        if not self._portal.closed:  # else it ended with its engine
            self._portal.call(self._session.close)


class BlockingEngine[B: ManagedBackend]:
    """Any backend of :class:`~sandkernel.api.EngineAPI`, blocking.

    Args:
        make_backend: builds the backend (called in the loop thread); it is
            entered as an async context manager (started) here and exited
            by :meth:`close`.
    """

    def __init__(self, make_backend: Callable[[], B]) -> None:
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        portal = self._portal_cm.__enter__()
        self._portal = _Portal(portal)
        self._closed = False
        try:
            backend = self._portal.call(_made, make_backend)
            self._backend_cm = portal.wrap_async_context_manager(backend)
            self._backend: B = self._backend_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closing = threading.Lock()
        # Never closed by its program (it forgot, dropped it, or raised first):
        # kept alive until closed, and closed as the interpreter ends. Dropped and
        # collected, it would leave its loop's thread running its backend, with
        # no one to close it, and its sandboxes behind.
        _still_open(self)

    @property
    def backend(self) -> B:
        """The async backend; reach its extras with :meth:`call`."""
        return self._backend

    def call[T](self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run one of the backend's coroutines (``fn(*args, **kwargs)``) and wait for it."""
        return self._portal.call(fn, *args, **kwargs)

    def session(
        self,
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        if_expired: Literal["raise", "new"] = "raise",
    ) -> BlockingSession:
        session = self.call(
            self._backend.session, session_id, agent_id=agent_id, if_expired=if_expired
        )
        return BlockingSession(self._portal, session)

    def get_session(self, session_id: str) -> BlockingSession:
        return BlockingSession(self._portal, self.call(self._backend.get_session, session_id))

    def close_session(self, session_id: str) -> None:
        self.call(self._backend.close_session, session_id)

    def sessions(self) -> list[SessionInfo]:
        return self.call(self._backend.sessions)

    def stats(self) -> EngineStats:
        return self.call(self._backend.stats)

    def run_once(
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
        return self.call(
            self._backend.run_once, code, stdin=stdin, files=files, fetch_files=fetch_files,
            argv=argv, timeout_s=timeout_s, memory_mb=memory_mb,
        )  # fmt: skip

    def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> Iterator[RunResult]:
        return self._portal.iterate(
            partial(self._backend.run_many, requests, concurrency=concurrency)
        )

    def upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        return self.call(
            self._backend.upload, source, name, session_id=session_id, agent_id=agent_id,
            retention_s=retention_s,
        )  # fmt: skip

    def attach_to_agent(self, agent_id: str, file_ids: Sequence[str]) -> list[StoredFile]:
        return self.call(self._backend.attach_to_agent, agent_id, file_ids)

    def file(self, file_id: str) -> StoredFile:
        return self.call(self._backend.file, file_id)

    def download(self, file_id: str, *, max_bytes: int | None = None) -> bytes:
        return self.call(self._backend.download, file_id, max_bytes=max_bytes)

    def list_files(
        self, *, session_id: str | None = None, agent_id: str | None = None
    ) -> list[StoredFile]:
        return self.call(self._backend.list_files, session_id=session_id, agent_id=agent_id)

    def delete_file(self, file_id: str) -> None:
        self.call(self._backend.delete_file, file_id)

    def close(self) -> None:
        """Stop the backend (for a client: close its connections), then the loop.

        Idempotent; a call while another thread closes it returns once that is done.
        """
        with self._closing:
            if self._closed:
                return
            self._closed = True
            try:
                self._backend_cm.__exit__(None, None, None)
            finally:
                self._portal.closed = True
                self._portal_cm.__exit__(None, None, None)
                with _OPEN_LOCK:
                    _OPEN.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The blocking engines not closed yet: each is closed as the interpreter ends.
_OPEN: set[BlockingEngine[Any]] = set()
#: Reentrant: a SIGTERM handler (which closes its engine) may run in the main
#: thread while that thread holds it.
_OPEN_LOCK = threading.RLock()
_hooked = False


def _still_open(engine: BlockingEngine[Any]) -> None:
    """Hold ``engine`` until it is closed, and close it as the interpreter ends if it is not."""
    global _hooked
    with _OPEN_LOCK:
        _OPEN.add(engine)
        if not _hooked:
            # Not atexit, which runs after the interpreter waits for the loops'
            # threads (for ever, as they run until closed): threading's own hook
            # runs before (concurrent.futures ends its workers the same way).
            threading._register_atexit(_close_all_at_exit)  # type: ignore[attr-defined]
            _hooked = True


def _close_all_at_exit() -> None:
    with _OPEN_LOCK:
        engines = list(_OPEN)
    for engine in engines:
        try:
            engine.close()
        except Exception:  # one that fails to close must not keep the others open
            log.exception("closing a blocking engine at exit failed")


class Engine(BlockingEngine["_embedded.Engine"]):
    """The embedded :class:`sandkernel.engine.Engine`, blocking; takes the same arguments.

    In the main thread it also handles SIGTERM (the loop thread cannot): the
    engine is closed, then the signal's default action runs.
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        from sandkernel import engine as embedded

        wants_sigterm = kwargs.pop("handle_sigterm", True)
        self._previous_sigterm: Any = None
        super().__init__(partial(embedded.Engine, config, handle_sigterm=False, **kwargs))
        if wants_sigterm:
            self._install_sigterm()

    def session(
        self,
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        workspace: str | Path | None = None,
        if_expired: Literal["raise", "new"] = "raise",
    ) -> BlockingSession:
        """The session for a conversation id, created if needed.

        Takes what :meth:`sandkernel.engine.Engine.session` takes, a host
        folder as ``workspace`` too.
        """
        session = self.call(
            self.backend.session,
            session_id,
            agent_id=agent_id,
            workspace=workspace,
            if_expired=if_expired,
        )
        return BlockingSession(self._portal, session)

    def reap(self, now: float | None = None) -> list[str]:
        """End every expired session now (see :meth:`sandkernel.engine.Engine.reap`)."""
        return self.call(self.backend.reap, now)

    def close(self) -> None:
        self._restore_sigterm()
        super().close()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        stale = getattr(current, "__self__", None)
        if isinstance(stale, Engine) and stale._closed:
            # Left by an engine closed from another thread: this one takes its
            # place, and puts back what was there before it when it closes.
            current, stale._previous_sigterm = stale._previous_sigterm, None
        if current is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._previous_sigterm = current

    def _restore_sigterm(self) -> None:
        # Only the main thread may set a handler. Closed from another, the
        # engine's stays: a SIGTERM then finds the engine closed, puts the
        # previous handler back and takes its default action, as it would have.
        if self._previous_sigterm is not None and threading.current_thread() is (
            threading.main_thread()
        ):
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.close()
        os.kill(os.getpid(), signal.SIGTERM)
