"""The bytecode the engine writes for the code that runs in the sandbox."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from sandkernel.sandbox.runtime import _bytecode_is_current, write_bytecode


def _import_value(source: Path) -> str:
    """``VALUE`` as a fresh interpreter imports it from ``source`` (writing no bytecode)."""
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('m', {str(source)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.VALUE)"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_bytecode_is_written_once_and_is_what_python_loads(tmp_path: Path) -> None:
    source = tmp_path / "server.py"
    source.write_text("VALUE = 'one'\n")
    cached = Path(importlib.util.cache_from_source(str(source)))
    write_bytecode(source)
    assert _bytecode_is_current(source, cached)
    written = cached.stat().st_mtime_ns
    write_bytecode(source)
    assert cached.stat().st_mtime_ns == written  # current: not written again
    # Same size and mtime, other text: Python takes the bytecode, so it says "one".
    stat = source.stat()
    source.write_text("VALUE = 'two'\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _import_value(source) == "one"


def test_a_changed_source_gets_new_bytecode(tmp_path: Path) -> None:
    source = tmp_path / "server.py"
    source.write_text("VALUE = 'one'\n")
    write_bytecode(source)
    source.write_text("VALUE = 'three'\n")
    os.utime(source, (1_000_000_000, 1_000_000_000))
    assert not _bytecode_is_current(source, Path(importlib.util.cache_from_source(str(source))))
    write_bytecode(source)
    assert _bytecode_is_current(source, Path(importlib.util.cache_from_source(str(source))))
    assert _import_value(source) == "three"


def test_where_bytecode_cannot_be_written_nothing_fails(tmp_path: Path) -> None:
    source = tmp_path / "server.py"
    source.write_text("VALUE = 'one'\n")
    (tmp_path / "__pycache__").write_text("a file where the folder would be")
    write_bytecode(source)  # no error: the sandbox compiles the source itself
    assert _import_value(source) == "one"


def test_a_source_that_does_not_compile_is_left_to_fail_where_it_runs(tmp_path: Path) -> None:
    source = tmp_path / "server.py"
    source.write_text("def broken(:\n")
    write_bytecode(source)
    assert not Path(importlib.util.cache_from_source(str(source))).exists()
