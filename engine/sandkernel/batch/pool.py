"""The batch pool: sandboxed fork servers that run requests, one per worker at a time.

Callers wait for a slot in arrival order; a request goes to the worker with
the shortest queue. A request whose sandbox died under it is run again on
another worker, and only it: the requests queued behind it never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from sandkernel._tasks import wait_out
from sandkernel.batch.frames import request_frame
from sandkernel.batch.worker import DEFAULT_PRELOAD, SpawnedServer, Worker, WorkerConfig, WorkerLost
from sandkernel.errors import EngineClosed, KernelStartFailed
from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import SandboxHost

if TYPE_CHECKING:
    # Not imported with the pool: a command that starts its sandboxes first
    # (``sandkernel eval``) builds the request models while they boot. A caller
    # of run() has them: its request is one.
    from sandkernel.batch.models import RunRequest, RunResult
    from sandkernel.batch.prestart import Prestarted


def _import_result_models() -> None:
    """Build the request and result models now: the sandboxes were spawned and boot meanwhile.

    run() needs them only once a sandbox answers; imported with the pool,
    they would delay the sandboxes' spawn (about 3 ms of a short
    ``sandkernel eval``). Imported once: after that a lookup.
    """
    import sandkernel.batch.models  # noqa: F401


#: Bytes of fetched files returned per run, all files together.
DEFAULT_FETCH_MAX_BYTES = 64 << 20


class BatchStats(BaseModel):
    """Counters of a :class:`BatchPool`."""

    workers: int
    runs: int = 0
    reruns: int = 0
    lost: int = 0
    worker_restarts: int = 0


class BatchPool:
    """Sandboxed fork servers that run :class:`RunRequest` s, one per worker at a time.

    Args:
        host: the engine's :class:`~sandkernel.sandbox.SandboxHost`; ``None``
            creates one that the pool owns and closes.
        policy: limits and permissions of every worker's sandbox (a name, a
            TOML path or a :class:`~sandkernel.policy.Policy`; default ``default``).
            ``memory_mb`` is the cgroup limit of the worker (server and run),
            and the default address-space limit of a run; ``wall_timeout_s``
            the default timeout of a run.
        workers: sandboxes run in parallel (default: the number of CPUs).
        preload: modules the server imports before forking.
        output_max_bytes: stdout and stderr kept per run, each (default: the
            policy's ``output_max_bytes``).
        fetch_max_bytes: bytes of ``fetch_files`` returned per run.
        start_timeout_s: how long a worker may take to come up.
        max_attempts: runs of a request whose sandbox died under it before it
            fails with ``killed`` (or ``oom``).
        pipeline_depth: requests queued per worker, the running one included;
            2 keeps the next one waiting in the pipe while one runs.
        prestarted: fork servers spawned before the policy was loaded, and
            their host (:func:`~sandkernel.batch.prestart.prestart`; instead
            of ``host``): the pool owns them, starts with those that fit its
            policy and settings, and removes the rest.

    Use as ``async with BatchPool(...) as pool:`` or call :meth:`start` and
    :meth:`close`.
    """

    def __init__(
        self,
        host: SandboxHost | None = None,
        policy: Policy | str | None = None,
        *,
        workers: int | None = None,
        preload: Iterable[str] = DEFAULT_PRELOAD,
        output_max_bytes: int | None = None,
        fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES,
        start_timeout_s: float = 30.0,
        max_attempts: int = 2,
        pipeline_depth: int = 2,
        prestarted: Prestarted | None = None,
    ) -> None:
        if prestarted is not None:
            if host is not None:
                raise ValueError("a pool takes a host or prestarted servers, not both")
            host = prestarted.host
        if workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self.policy = load_policy(policy)
        self.workers = workers or os.cpu_count() or 1
        self.max_attempts = max_attempts
        self.pipeline_depth = pipeline_depth
        self._host = host
        self._owns_host = host is None or prestarted is not None
        self._prestarted = prestarted
        self._preload = tuple(preload)
        self._output_max_bytes = output_max_bytes or self.policy.output_max_bytes
        self._fetch_max_bytes = fetch_max_bytes
        self._start_timeout_s = start_timeout_s
        self._live: list[Worker] = []
        #: every worker made and not stopped yet, whatever its state (starting,
        #: taking requests, lost and not replaced yet): close() stops them all
        self._workers: set[Worker] = set()
        self._spawns = 0
        self._all_spawned = asyncio.Event()
        #: starting a worker, at the start or in a lost one's place
        self._starting: set[asyncio.Task[None]] = set()
        # Callers waiting for a slot, oldest first: a freed slot goes to the
        # oldest, so under load a run waits its turn rather than a random time.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._failure: BaseException | None = None
        self._started = False
        self._closed = False
        self.stats = BatchStats(workers=self.workers)

    @property
    def host(self) -> SandboxHost:
        if self._host is None:
            raise EngineClosed("the batch pool is not started")
        return self._host

    def worker_ids(self) -> list[str]:
        """Kernel ids (cgroup names) of the workers taking requests now."""
        return sorted(w.kernel_id for w in self._live if w.accepting)

    def preload_failures(self) -> dict[str, str]:
        """The ``preload`` modules the workers up now could not import, each with why."""
        failed: dict[str, str] = {}
        for worker in self._live:
            failed.update(worker.preload_failures())
        return failed

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raises KernelStartFailed if one does not come up."""
        if self._started:
            raise EngineClosed("a BatchPool can be started once")
        self._started = True
        if self._host is None:
            making = asyncio.ensure_future(asyncio.to_thread(SandboxHost))
            try:
                await wait_out(making)
            finally:
                # Kept even if cancelled meanwhile, so that close() releases
                # the host the thread made (its owner lock).
                if not making.cancelled() and making.exception() is None:
                    self._host = making.result()
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.workers):
                    self._track_start(group.create_task(self._add_worker(initial=True)))
        except BaseExceptionGroup as group_error:
            await self.close()
            raise group_error.exceptions[0] from None
        except asyncio.CancelledError:
            # The workers already up go too: the caller never gets this pool to close.
            await wait_out(asyncio.ensure_future(self.close()))
            raise
        if self._prestarted is not None:
            await self._prestarted.discard()  # more than it has workers
            worker = next(iter(self._live), None)
            if worker is not None:
                self._prestarted.remember(
                    self.policy, worker.config.settings(), oom_kills_fd=worker.oom_kills_fd
                )

    async def close(self) -> None:
        """Stop every worker and remove its sandbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._all_spawned.set()  # nothing more will be spawned
        self._wake_all()
        # A worker being started stops itself once up (bounded by start_timeout_s):
        # stopped half-way from here, its sandbox could be spawned after its removal.
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)
        # Every worker not stopped yet, live or lost: one lost while this close
        # waited above is not replaced, and is stopped here with the others.
        self._live = []
        await asyncio.gather(*(self._stop(w) for w in list(self._workers)), return_exceptions=True)
        if self._prestarted is not None:
            await self._prestarted.discard()
        if self._owns_host and self._host is not None:
            self._host.close()

    async def __aenter__(self) -> BatchPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _worker_config(self) -> WorkerConfig:
        return WorkerConfig(
            host=self.host,
            policy=self.policy,
            preload=self._preload,
            output_max_bytes=self._output_max_bytes,
            fetch_max_bytes=self._fetch_max_bytes,
            start_timeout_s=self._start_timeout_s,
        )

    def _new_worker(self, *, initial: bool, spawned: SpawnedServer | None = None) -> Worker:
        config = self._worker_config()
        # Only the start's workers count towards wait_spawned(); a replacement
        # comes after the start, which has built the result models already.
        on_spawned = self._spawned if initial else None
        return Worker(
            config, self._slot_freed, self._replace, on_spawned=on_spawned, spawned=spawned
        )

    def _spawned(self) -> None:
        self._spawns += 1
        if self._spawns == self.workers:
            self._all_spawned.set()
            _import_result_models()

    async def wait_spawned(self) -> None:
        """Return once each sandbox of the start is spawned: booting, not ready yet.

        For a caller with work of its own to do while the pool starts
        (``sandkernel eval`` reads its input then): done after the spawns, it
        does not delay them. Returns at once when the pool is closed; does
        not return if the start fails before every spawn: wait for this or
        for :meth:`start`, whichever ends first.
        """
        await self._all_spawned.wait()

    async def _add_worker(self, *, initial: bool = False) -> None:
        spawned = None
        if initial and self._prestarted is not None:
            spawned = await self._prestarted.take(self.policy, self._worker_config().settings())
        worker = self._new_worker(initial=initial, spawned=spawned)
        self._workers.add(worker)
        try:
            await worker.start()
        except BaseException:
            self._workers.discard(worker)  # a failed start removes what it made
            raise
        if self._closed:
            await self._stop(worker)
            return
        self._live.append(worker)
        self._wake_all()

    async def _stop(self, worker: Worker) -> None:
        try:
            await worker.stop()
        finally:
            self._workers.discard(worker)

    def _track_start(self, task: asyncio.Task[None]) -> None:
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    def _replace(self, worker: Worker) -> None:
        """Stop a lost worker and start another in its place, in the background.

        Once the pool is closing, close() stops it (it stops every worker).
        """
        if worker in self._live:
            self._live.remove(worker)
        if self._closed:
            return
        self.stats.worker_restarts += 1

        async def replace() -> None:
            await self._stop(worker)
            for attempt in range(3):
                try:
                    await self._add_worker()
                    return
                except KernelStartFailed as exc:
                    if attempt == 2:
                        self._failure = exc
                        self._starting.discard(task)
                        self._wake_all()
                        return
                    await asyncio.sleep(0.2 * (attempt + 1))

        task = asyncio.ensure_future(replace())
        self._track_start(task)

    def _slot_freed(self) -> None:
        """A slot came free: wake the caller that has waited longest."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        """Capacity changed (a worker came or went, the pool closed): everyone looks again."""
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def _least_loaded(self) -> Worker | None:
        best: Worker | None = None
        for worker in self._live:
            if worker.accepting and len(worker.outstanding) < self.pipeline_depth:
                if best is None or len(worker.outstanding) < len(best.outstanding):
                    best = worker
        return best

    async def _acquire(self) -> Worker:
        """The worker with the shortest queue, once one has room; callers in arrival order."""
        woken = False
        while True:
            if self._closed:
                raise EngineClosed("the batch pool is closed")
            if not self._started:
                raise EngineClosed("the batch pool is not started: use `async with` or start()")
            # A newcomer takes a free slot only if nobody is waiting for one.
            if woken or not self._waiting:
                best = self._least_loaded()
                if best is not None:
                    return best
            if self._failure is not None and not self._live and not self._starting:
                raise KernelStartFailed(f"no batch worker left: {self._failure}")
            waiter = asyncio.get_running_loop().create_future()
            # Woken but beaten to the slot: first in line for the next one.
            if woken:
                self._waiting.appendleft(waiter)
            else:
                self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._slot_freed()  # pass on the slot this caller will not use
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(waiter)
                raise
            woken = True

    # -- running -------------------------------------------------------------

    async def run(self, request: RunRequest) -> RunResult:
        """Run one request on the next free worker.

        User code failing is a result, never an exception. Raises
        EngineClosed if the pool is closed, KernelStartFailed if no sandbox
        can be started any more.
        """
        from sandkernel.batch.models import lost_result, result_from_reply

        timeout_s = request.timeout_s or self.policy.wall_timeout_s
        # Never above the policy's: the sandbox's cgroup holds that much, and a
        # larger address space would meet the OOM killer instead of MemoryError.
        memory_mb = min(request.memory_mb or self.policy.memory_mb, self.policy.memory_mb)
        frame = request_frame(request, timeout_s=timeout_s, memory_mb=memory_mb)
        limit_s = timeout_s + 1 if request.mode == "check" else timeout_s
        reasons: list[str] = []
        oom = False
        while True:
            worker = await self._acquire()
            future = worker.submit(frame, limit_s)
            try:
                header, blobs = await future
            except WorkerLost as lost:
                if not lost.blamed:
                    continue  # it never started: run it elsewhere
                reasons.append(str(lost))
                oom = oom or lost.oom
                if len(reasons) >= self.max_attempts:
                    self.stats.runs += 1
                    self.stats.lost += 1
                    return lost_result(
                        request, oom_killed=oom, attempts=len(reasons), reason="; ".join(reasons)
                    )
                self.stats.reruns += 1
                continue
            except asyncio.CancelledError:
                if future.cancelled():
                    # The request runs or waits in that sandbox: end it there
                    # (requests queued behind it are run elsewhere).
                    worker.abandon(future)
                raise
            self.stats.runs += 1
            return result_from_reply(
                request,
                header,
                blobs,
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                oom_killed=bool(header.get("oom_killed")),
                attempts=len(reasons) + 1,
            )

    async def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> AsyncIterator[RunResult]:
        """Run requests, yielding each result as it finishes (not in input order).

        Requests are pulled from ``requests`` only as slots free up, so at most
        ``concurrency`` (default: workers × pipeline depth) requests and their
        results are held at a time. Match results to requests with ``RunRequest.id``.
        """
        limit = self.workers * self.pipeline_depth if concurrency is None else concurrency
        if limit < 1:
            raise ValueError("concurrency must be at least 1")
        source = iterate_async(requests)
        running: set[asyncio.Task[RunResult]] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < limit:
                    try:
                        request = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    running.add(asyncio.ensure_future(self.run(request)))
                if not running:
                    return
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)


async def iterate_async[T](items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    """``items`` as an async iterator, whether it is a plain or an async iterable."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
