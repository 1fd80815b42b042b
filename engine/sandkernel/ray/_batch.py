"""One-shot runs spread over the hosts' batch slots: back-pressure, and re-runs on host loss."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass

from sandkernel.batch import RunRequest, RunResult, iterate_async
from sandkernel.errors import SandboxUnavailable
from sandkernel.ray._handle import RERUN_ON, RUN_ATTEMPTS, HostHandle
from sandkernel.ray._nodes import HostDirectory

log = logging.getLogger(__name__)


class BatchDistribution(HostDirectory):
    """``run_once`` and ``run_many`` over every host."""

    def batch_slots(self) -> int:
        """One-shot runs the live hosts run at once (their sandboxed fork servers)."""
        return sum(h.batch_slots for h in self._alive())

    def batch_capacity(self) -> int:
        """One-shot runs the live hosts accept at once: running, or queued on their node."""
        return sum(h.batch_window for h in self._alive())

    def _reserve_runs(self, wanted: int) -> dict[HostHandle, int]:
        """Room for up to ``wanted`` runs: how many go to which host (none if all are full).

        Run by run, to the host least loaded for its slots: a host with a free
        slot comes before any whose slots are all taken, so runs spread over
        the hosts first and wait on a node only when every node is busy.
        Beyond its free slots a host takes runs only once it has room for a
        whole chunk, so that under a steady load runs travel several to a call
        (their results stream back one by one).
        """
        open_hosts = [
            h for h in self._alive() if h.batch_window - h.batch_inflight >= h.batch_chunk
        ]
        placed: dict[HostHandle, int] = {}
        for _ in range(wanted):
            roomy = [h for h in open_hosts if placed.get(h, 0) < h.batch_chunk]
            if not roomy:
                break
            best = min(roomy, key=lambda h: h.batch_load)
            best.batch_inflight += 1
            placed[best] = placed.get(best, 0) + 1
        for host in placed:
            host.batch_calls += 1
        return placed

    async def _wait_for_batch_room(self) -> None:
        """Until some host has room (or a host joins); bounded only if no host is alive."""
        assert self._capacity is not None
        if not self._alive():
            await self._alive_or_wait()
            return
        self._capacity.clear()
        await self._capacity.wait()

    async def _run_chunk(
        self, host: HostHandle, requests: list[RunRequest]
    ) -> AsyncGenerator[list[tuple[int, RunResult]]]:
        """One call: ``requests`` on ``host``'s batch path (room reserved by the caller).

        Yields their results as the host streams them back, each with its
        request's position in ``requests``; the room of each is freed as it comes.
        """
        left = len(requests)
        try:
            async with contextlib.aclosing(host.stream("run_batch", requests)) as answers:
                async for answered in answers:
                    left -= len(answered)
                    host.batch_inflight -= len(answered)
                    self._capacity_changed()
                    yield answered
        finally:
            host.batch_inflight -= left
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
        while len(failures) < RUN_ATTEMPTS:
            while not (placed := self._reserve_runs(1)):
                await self._wait_for_batch_room()
            (host,) = placed
            try:
                answers = self._run_chunk(host, [request])
                (result,) = [r async for answered in answers for _, r in answered]
                return result
            except RERUN_ON as exc:
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

        Requests go to the least loaded hosts, several per call when many wait;
        each result comes back as soon as it is ready. At most ``concurrency``
        requests are held at once (default: :meth:`batch_capacity`); they are
        read from ``requests`` only as room frees up, so a long or endless
        source is fine. Requests in flight on a host that is lost are run
        again elsewhere. Match results to requests with ``RunRequest.id``.

        Raises:
            SandboxUnavailable: no host is running, or a request's host was lost three times.
        """
        self._require_running()
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        assert self._capacity is not None
        source = iterate_async(requests)
        pending: deque[tuple[RunRequest, int]] = deque()  # (request, hosts lost under it)
        answers: asyncio.Queue[_Answer] = asyncio.Queue()
        calls: set[asyncio.Task[None]] = set()
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
                for host, count in self._reserve_runs(len(pending)).items():
                    runs = [pending.popleft() for _ in range(count)]
                    call = asyncio.create_task(self._run_call(host, runs, answers))
                    calls.add(call)
                    call.add_done_callback(calls.discard)
                if held == len(pending):  # none in flight
                    if exhausted and not pending:
                        return
                    await self._wait_for_batch_room()
                    continue
                got: list[_Answer] = []
                if answers.empty() and not pending:
                    got.append(await answers.get())
                elif answers.empty():
                    # A host joining, or another caller's runs ending, makes room too.
                    self._capacity.clear()
                    room = asyncio.ensure_future(self._capacity.wait())
                    answer = asyncio.ensure_future(answers.get())
                    try:
                        await asyncio.wait((room, answer), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        room.cancel()
                        answer.cancel()  # none came yet: the next one stays in the queue
                    if answer.done() and not answer.cancelled():
                        got.append(answer.result())
                while not answers.empty():
                    got.append(answers.get_nowait())
                for answered in got:
                    match answered:
                        case _Unanswered(runs, exc):
                            if any(lost + 1 >= RUN_ATTEMPTS for _, lost in runs):
                                raise SandboxUnavailable(
                                    f"a one-shot run's host was lost {RUN_ATTEMPTS} times "
                                    f"in turn (last: {exc})"
                                ) from None
                            log.warning("re-running %d one-shot run(s): %s", len(runs), exc)
                            pending.extendleft((r, lost + 1) for r, lost in reversed(runs))
                        case Exception():
                            raise answered
                        case results:
                            for result in results:
                                held -= 1
                                yield result
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)

    async def _run_call(
        self, host: HostHandle, runs: list[tuple[RunRequest, int]], answers: asyncio.Queue[_Answer]
    ) -> None:
        """One call of :meth:`run_many`: its results go to ``answers`` as they come.

        So do the runs a lost host had not answered, to be run again, and any
        other failure, to be raised.
        """
        unanswered = dict(enumerate(runs))
        try:
            async for answered in self._run_chunk(host, [r for r, _ in runs]):
                for index, _ in answered:
                    del unanswered[index]
                answers.put_nowait([result for _, result in answered])
        except RERUN_ON as exc:
            answers.put_nowait(_Unanswered(list(unanswered.values()), exc))
        except Exception as exc:  # noqa: BLE001 - raised by run_many, which reads the queue
            answers.put_nowait(exc)


@dataclass
class _Unanswered:
    """Runs of a call whose host was lost before it answered them."""

    runs: list[tuple[RunRequest, int]]
    error: BaseException


#: What a call of ``run_many`` hands back: results, runs to run again, or a failure.
type _Answer = list[RunResult] | _Unanswered | Exception
