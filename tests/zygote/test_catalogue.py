"""The attack catalogue and the leak accounting, again, with every kernel forked from a zygote."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.zygote import mode

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


@pytest.mark.timeout(1800)
def test_the_attack_catalogue_and_leak_accounting_hold_with_forked_kernels() -> None:
    if mode.enabled():
        pytest.skip("already a run with forked kernels")
    # A pytest run of its own: the fixtures read the mode once, at their import.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/security", "tests/test_kernel.py"],
        cwd=ROOT, env={**os.environ, mode.ENV: "1"}, capture_output=True, text=True,
        timeout=1700, check=False,
    )  # fmt: skip
    tail = done.stdout[-6000:]
    assert done.returncode == 0, tail
    tally = re.search(r"(\d+) attacks tried, (\d+) held", done.stdout)
    assert tally is not None and tally[1] == tally[2] and int(tally[1]) > 0, tail
