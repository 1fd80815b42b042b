"""The contract suite's tally: scenarios passed per backend, printed at the end of a run.

A plugin of the root conftest (``pytest_plugins``), so that the process
that reports a run counts it, pytest-xdist's controller included; it counts
the scenarios of ``tests/contract`` and of ``tests/ray``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

_SCENARIO = re.compile(r"::test_scenario\[(?P<backend>[\w-]+)-(?P<name>\w+)\]$")
_TRIED: Counter[str] = Counter()
_PASSED: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    match = _SCENARIO.search(report.nodeid)
    if match is None or report.when != "call":
        return
    _TRIED[match["backend"]] += 1
    _PASSED[match["backend"]] += int(report.passed)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _TRIED:
        return
    terminalreporter.section("contract scenarios per backend")
    for backend in sorted(_TRIED):
        terminalreporter.write_line(
            f"{backend}: {_PASSED[backend]} of {_TRIED[backend]} scenarios passed"
        )
