"""Admission control for one-shot runs: how many the daemon holds, and how many body bytes.

Every request to a one-shot route (``/v1/run``, ``/v1/runs``, ``/run_code``,
``/run_jupyter``) is admitted before its body is read, or refused at once
with 503 and ``Retry-After``. An admitted request holds a :class:`RunTicket`
until its response is finished: one run slot (more for a ``/v1/runs`` batch
with several lines in flight) and the bytes of its body. Without a bound,
a burst of requests would all be read into memory and queued in front of the
batch workers, however long the wait; with one, the queue (and so the wait
of every admitted run) stays bounded, and the excess is told to come back.

Two budgets, both checked at admission:

- ``max_runs``: runs admitted and not finished, queued or running. The
  default, :func:`default_max_queued_runs`, is about a second of work for
  short programs.
- ``max_body_bytes``: the bodies those runs arrived with (a run's body can
  carry files of up to the upload limit, and stays in memory, parsed, until
  the run ends). A request whose body would go past it is refused unless no
  other admitted request holds any bytes, so one body within the upload
  limit is always accepted on an idle daemon.

Plain data, no I/O, no clock: the ASGI middleware that applies it is
:class:`sandkernel.daemon.middleware.RunAdmissionGate`.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from sandkernel.daemon.errors import RunQueueFull

log = logging.getLogger(__name__)

#: Runs queued per batch worker by default. The batch path runs short programs
#: at about 100 per second per worker, so this is about a second of queue: what
#: a client gains by waiting longer is nothing it would not gain by retrying.
QUEUED_RUNS_PER_WORKER: Final = 128
#: The default never goes below this, so a small machine still absorbs bursts.
MIN_DEFAULT_QUEUED_RUNS: Final = 256
DEFAULT_MAX_QUEUED_BYTES: Final = 1 << 30
#: Open connections, idle kept-alive ones included, before the server refuses
#: every request (503, connection closed): the bound on what connections hold.
DEFAULT_MAX_CONNECTIONS: Final = 4096
#: Seconds a refused client is asked to wait (``Retry-After``).
RETRY_AFTER_S: Final = 1
#: Where the middleware puts the request's ticket in the ASGI scope.
TICKET_SCOPE_KEY: Final = "sandkernel.run_ticket"


def default_max_queued_runs(batch_workers: int | None) -> int:
    """The bound on queued one-shot runs for a daemon with ``batch_workers`` (None: one per CPU)."""
    workers = batch_workers or os.cpu_count() or 1
    return max(MIN_DEFAULT_QUEUED_RUNS, QUEUED_RUNS_PER_WORKER * workers)


class RunAdmission:
    """The daemon's count of admitted one-shot runs and of the bytes their bodies hold.

    Args:
        max_runs: runs admitted and not finished (``--max-queued-runs``).
        max_body_bytes: bytes of their request bodies (``--max-queued-mb``).
    """

    def __init__(self, *, max_runs: int, max_body_bytes: int) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be at least 1 (got {max_runs})")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1 (got {max_body_bytes})")
        self.max_runs = max_runs
        self.max_body_bytes = max_body_bytes
        self.runs = 0
        self.body_bytes = 0
        self.admitted_total = 0
        self.refused_total = 0
        self._refused_since_admit = 0

    def admit(self, body_bytes: int | None) -> RunTicket:
        """A ticket for one request, whose body declares ``body_bytes`` (None: not declared).

        Raises:
            RunQueueFull: the runs or the bytes are at their limit; retry later.
        """
        declared = body_bytes or 0
        if self.runs >= self.max_runs:
            self._refuse()
            raise RunQueueFull(
                f"the daemon holds {self.runs} one-shot runs, as many as it queues "
                f"(--max-queued-runs {self.max_runs}); retry after {RETRY_AFTER_S} s"
            )
        if not self._bytes_fit(declared, own=0):
            self._refuse()
            raise RunQueueFull(self._bytes_message(declared))
        if self._refused_since_admit:
            log.info("admitting one-shot runs again after refusing %d", self._refused_since_admit)
            self._refused_since_admit = 0
        self.runs += 1
        self.body_bytes += declared
        self.admitted_total += 1
        return RunTicket(self, declared)

    def _bytes_fit(self, more: int, *, own: int) -> bool:
        # Alone (no other request holds bytes), a body is limited by the upload limit only.
        return self.body_bytes + more <= self.max_body_bytes or self.body_bytes == own

    def _bytes_message(self, more: int) -> str:
        return (
            f"the one-shot runs queued hold {self.body_bytes} bytes of request bodies; "
            f"{more} more would pass the {self.max_body_bytes} accepted (--max-queued-mb); "
            f"retry after {RETRY_AFTER_S} s"
        )

    def _refuse(self) -> None:
        self.refused_total += 1
        self._refused_since_admit += 1
        if self._refused_since_admit == 1:
            log.warning(
                "one-shot runs refused with 503: %d runs and %d body bytes held "
                "(limits %d and %d); refusing until some finish",
                self.runs,
                self.body_bytes,
                self.max_runs,
                self.max_body_bytes,
            )


class RunTicket:
    """What one admitted request holds: run slots (at least one) and body bytes.

    Released once, when the request's response is finished; releasing again
    does nothing, so a clean-up path can always call :meth:`release`.
    """

    def __init__(self, admission: RunAdmission, body_bytes: int) -> None:
        self._admission = admission
        self.runs = 1
        self.body_bytes = body_bytes
        self.released = False

    def hold_runs(self, wanted: int) -> int:
        """Hold ``wanted`` run slots (at least one): take free ones, give back spare ones.

        Never waits: holds fewer than ``wanted`` when the others are taken.
        Returns how many it holds now.
        """
        admission = self._admission
        target = max(1, wanted)
        if self.released:
            raise RuntimeError("this ticket was released")
        if target > self.runs:
            target = self.runs + min(target - self.runs, admission.max_runs - admission.runs)
        admission.runs += target - self.runs
        self.runs = target
        return self.runs

    def hold_body_bytes(self, more: int) -> None:
        """Count ``more`` bytes of a body that declared no length, as they arrive.

        Raises:
            RunQueueFull: the bytes would pass the limit (and others hold some).
        """
        admission = self._admission
        if not admission._bytes_fit(more, own=self.body_bytes):
            admission._refuse()
            raise RunQueueFull(admission._bytes_message(more))
        admission.body_bytes += more
        self.body_bytes += more

    def release(self) -> None:
        """Give back every slot and byte this ticket holds."""
        if self.released:
            return
        self.released = True
        self._admission.runs -= self.runs
        self._admission.body_bytes -= self.body_bytes
