"""The attack catalogue's tally, printed at the end of a run: ``N attacks tried, N held``.

An attack counts as tried when its test ran, and as held when it passed (an
``xfail`` is an attack that succeeds and is waiting for its fix). The
program-side tricks on the batch path (``test_program_tricks.py``) are counted
apart: "held" there means the run got the verdict a plain ``python prog.py``
gets. A plugin of the root conftest, so that the process that reports a run
counts it, pytest-xdist's controller included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import pytest

_ATTACK_FILE = re.compile(r"(^|/)tests/security/test_\w+_attacks\.py::")


@dataclass
class _Tally:
    tried: int = 0
    held: int = 0
    succeeded: list[str] = field(default_factory=list)


# One pytest run per process: the tallies are plain module state.
_TALLY = _Tally()
#: Program-side tricks on the batch path (test_program_tricks.py): "held" there
#: means the run got the verdict a plain `python prog.py` gets.
_TRICKS = _Tally()
_TRICK_TEST = re.compile(r"(^|/)tests/security/test_program_tricks\.py::test_trick_")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _TRICK_TEST.search(report.nodeid):
        if report.when == "call" or (report.when == "setup" and report.failed):
            _TRICKS.tried += 1
            _TRICKS.held += int(report.passed and report.when == "call")
        return
    if not _ATTACK_FILE.search(report.nodeid):
        return
    name = report.nodeid.split("::", 1)[1]
    if report.when == "call":
        _TALLY.tried += 1
        if report.passed and not hasattr(report, "wasxfail"):
            _TALLY.held += 1
        else:
            _TALLY.succeeded.append(name)
    elif report.when == "setup" and report.failed:
        # The attack never ran because its sandbox did not come up: not a hold.
        _TALLY.tried += 1
        _TALLY.succeeded.append(f"{name} (setup failed)")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _TRICKS.tried:
        terminalreporter.section("program-side tricks on the batch path")
        terminalreporter.write_line(
            f"{_TRICKS.tried} tricks tried, {_TRICKS.held} gave the plain-python verdict"
        )
    tally = _TALLY
    if tally.tried == 0:
        return
    terminalreporter.section("sandbox attack catalogue")
    for name in tally.succeeded:
        terminalreporter.write_line(f"NOT HELD: {name}")
    terminalreporter.write_line(f"{tally.tried} attacks tried, {tally.held} held")
