"""The README's examples run as shown and print what their comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import runtime_root

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_are_short() -> None:
    """Embedding: async and sync under 15 lines each; the model loop under 20."""
    assert len(BLOCKS) >= 3
    for block in BLOCKS:
        limit = 20 if "run_loop" in block else 15
        assert len(block.strip().splitlines()) < limit, block


@pytest.mark.sandbox
@pytest.mark.parametrize("block", BLOCKS, ids=[f"example{n}" for n in range(len(BLOCKS))])
def test_readme_example_runs_and_prints_what_it_says(block: str, tmp_path: Path) -> None:
    if "base_url=" in block:
        pytest.skip("needs a model server; run_loop is tested against a scripted one")
    if "sandkernel.ray" in block:
        pytest.skip("needs a Ray cluster; tests/ray run ClusterEngine on a local one")
    expected = [c.strip() for c in re.findall(r"#\s*(ok .*)$", block, flags=re.M)]
    env = {
        **os.environ,
        "SANDKERNEL_RUNTIME_DIR": str(runtime_root()),
        "SANDKERNEL_STATE_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert [line.strip() for line in proc.stdout.splitlines()] == expected


def test_the_upload_types_it_lists_are_those_accepted() -> None:
    from sandkernel.files import MIME_TYPES

    paragraph = README.read_text().split("a type a code interpreter takes", 1)[1].split("\n\n")[0]
    listed = set(re.findall(r"`(\.\w+)`", paragraph))
    assert listed == set(MIME_TYPES)
