"""One-shot runs spread over the hosts' batch slots: back-pressure, and re-runs on host loss."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

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

    def _reserve_batch(self, wanted: int) -> tuple[HostHandle, int] | None:
        """Room for up to ``wanted`` runs on the host with the most room, or None if full."""
        best: HostHandle | None = None
        for host in self._alive():
            room = host.batch_window - host.batch_inflight
            if room > 0 and (best is None or room > best.batch_window - best.batch_inflight):
                best = host
        if best is None:
            return None
        count = min(wanted, best.batch_chunk, best.batch_window - best.batch_inflight)
        best.batch_inflight += count
        best.batch_calls += 1
        return best, count

    async def _wait_for_batch_room(self) -> None:
        """Until some host has room (or a host joins); bounded only if no host is alive."""
        assert self._capacity is not None
        if not self._alive():
            await self._alive_or_wait()
            return
        self._capacity.clear()
        await self._capacity.wait()

    async def _run_chunk(self, host: HostHandle, requests: list[RunRequest]) -> list[RunResult]:
        """One Ray call: ``requests`` on ``host``'s batch path (room reserved by the caller)."""
        try:
            results: list[RunResult] = await host.call("run_batch", requests)
            return results
        finally:
            host.batch_inflight -= len(requests)
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
            while (placed := self._reserve_batch(1)) is None:
                await self._wait_for_batch_room()
            host, _ = placed
            try:
                (result,) = await self._run_chunk(host, [request])
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

        Requests travel in chunks (several per Ray call) to the hosts with the
        most room. At most ``concurrency`` requests are held at once (default:
        :meth:`batch_capacity`); they are read from ``requests`` only as room
        frees up, so a long or endless source is fine. Requests in flight on a
        host that is lost are run again elsewhere. Match results to requests
        with ``RunRequest.id``.

        Raises:
            SandboxUnavailable: no host is running, or a request's host was lost three times.
        """
        self._require_running()
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        assert self._capacity is not None
        source = iterate_async(requests)
        pending: deque[tuple[RunRequest, int]] = deque()  # (request, hosts lost under it)
        running: dict[asyncio.Future[Any], list[tuple[RunRequest, int]]] = {}
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
                while pending and (placed := self._reserve_batch(len(pending))) is not None:
                    host, count = placed
                    chunk = [pending.popleft() for _ in range(count)]
                    sent = asyncio.ensure_future(self._run_chunk(host, [r for r, _ in chunk]))
                    running[sent] = chunk
                if not running:
                    if exhausted and not pending:
                        return
                    await self._wait_for_batch_room()
                    continue
                waiters: list[asyncio.Future[Any]] = list(running)
                room: asyncio.Future[Any] | None = None
                if pending:  # a host joining, or another caller's runs ending, makes room
                    self._capacity.clear()
                    room = asyncio.ensure_future(self._capacity.wait())
                    waiters.append(room)
                try:
                    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if room is not None:
                        room.cancel()
                for finished in done:
                    if finished is room:
                        continue
                    chunk = running.pop(finished)
                    try:
                        results: list[RunResult] = finished.result()
                    except RERUN_ON as exc:
                        if any(lost + 1 >= RUN_ATTEMPTS for _, lost in chunk):
                            raise SandboxUnavailable(
                                f"a one-shot run's host was lost {RUN_ATTEMPTS} times "
                                f"in turn (last: {exc})"
                            ) from None
                        log.warning("re-running %d one-shot run(s): %s", len(chunk), exc)
                        pending.extendleft((r, lost + 1) for r, lost in reversed(chunk))
                        continue
                    held -= len(results)
                    for result in results:
                        yield result
        finally:
            for unfinished in running:
                unfinished.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
