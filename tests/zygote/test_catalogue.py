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

#: ``tests/security`` and ``tests/test_kernel.py``, in parts of a few minutes
#: each at most, which parallel test runs spread over their workers.
_PARTS = {
    "leaks": ["tests/security/test_leaks.py"],
    "kernel": ["tests/test_kernel.py"],
    "resource-attacks": ["tests/security/test_resource_attacks.py"],
}
_PARTS["other-attacks"] = [
    name
    for name in sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "tests/security").glob("test_*.py")
    )
    if all(name not in files for files in _PARTS.values())
]


@pytest.mark.early
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("part", list(_PARTS))
def test_the_attack_catalogue_and_leak_accounting_hold_with_forked_kernels(part: str) -> None:
    if mode.enabled():
        pytest.skip("already a run with forked kernels")
    files = _PARTS[part]
    # A pytest run of its own: the fixtures read the mode once, at their import.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, env={**os.environ, mode.ENV: "1"}, capture_output=True, text=True,
        timeout=1700, check=False,
    )  # fmt: skip
    tail = done.stdout[-6000:]
    assert done.returncode == 0, tail
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None and int(passed[1]) > 0, tail
    if any(f.endswith("_attacks.py") for f in files):
        tally = re.search(r"(\d+) attacks tried, (\d+) held", done.stdout)
        assert tally is not None and tally[1] == tally[2] and int(tally[1]) > 0, tail
