"""How the ``sandkernel`` command prints results, on the embedded engine or a daemon's.

``sandkernel run`` and ``sandkernel run --socket`` (:mod:`sandkernel.daemon.cli`)
print the same way; both import this module, so neither command line module
imports the other.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandkernel.batch import RunResult
    from sandkernel.results import ExecutionResult

#: Exit status of `sandkernel run --once` for a run that did not exit by itself,
#: as coreutils' `timeout` and a shell report them (a run killed by a signal
#: it names exits 128 + that signal, below).
_ONCE_EXIT = {"timeout": 124, "oom": 137, "killed": 137}


def print_execution_result(result: ExecutionResult, save_dir: Path | None) -> None:
    """Print a cell's result for a person: its output, value, displays, files and status.

    A displayed PNG is saved in ``save_dir`` when one is given.
    """
    if result.stdout:
        sys.stdout.write(result.stdout if result.stdout.endswith("\n") else result.stdout + "\n")
    if result.stderr:
        sys.stderr.write(result.stderr if result.stderr.endswith("\n") else result.stderr + "\n")
    if result.value is not None and result.text is not None:
        print(f"Out[{result.execution_count}]: {result.text}")
    for n, display in enumerate(result.displays, 1):
        if "image/png" in display.data and save_dir is not None:
            name = f"display-{result.execution_count or 0}-{n}.png"
            try:
                _save_in_workspace(save_dir, name, base64.b64decode(display.data["image/png"]))
            except (OSError, ValueError) as exc:
                print(f"[display {n}: image/png not saved as {name}: {exc}]", file=sys.stderr)
            else:
                print(f"[display {n}: image/png saved to {save_dir / name}]")
        else:
            kinds = ", ".join(sorted(display.data))
            print(f"[display {n}: {kinds}]")
    for f in result.files:
        where = f.path or "(displayed)"
        print(f"[file] {where}  {f.mime_type}, {f.size_bytes} bytes  id={f.id}")
    if result.files_truncated:
        print(f"[files left out: {result.files_note}]", file=sys.stderr)
    if result.error is not None:
        print(result.error.traceback, file=sys.stderr)
    if result.status != "ok" or result.message:
        detail = result.message or (
            f"{result.error.name}: {result.error.value}" if result.error else ""
        )
        print(f"[{result.status}] {detail}".rstrip(), file=sys.stderr)


def _save_in_workspace(workspace: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``workspace/name``, never through anything the sandbox put there.

    The workspace is the sandbox's to write, and this process may be root: a
    symlink planted at that name (to ``/etc/cron.d/…``) must not be followed.
    """
    from sandkernel.workspace.place import write_workspace_file  # only with a workspace

    write_workspace_file(workspace, name, data)


def print_run_result(result: RunResult, *, json_output: bool) -> int:
    """Print a one-shot run as ``python file.py`` would have; its exit status.

    2 when the program never ran (its files could not be written), as
    ``sandkernel run --help`` says of a run that could not run.
    """
    if json_output:
        print(result.model_dump_json(indent=2))
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.stdout_truncated or result.stderr_truncated:
            print("[output truncated]", file=sys.stderr)
        if result.message or result.status in _ONCE_EXIT:
            print(f"[{result.status}] {result.message or ''}".rstrip(), file=sys.stderr)
    if result.setup_failed:
        return 2
    code = result.return_code
    if result.status == "killed" and code is not None and code < 0:
        return 128 - code  # as a shell reports `python prog.py` killed by that signal
    if result.status in _ONCE_EXIT:
        return _ONCE_EXIT[result.status]
    return code if code is not None and code >= 0 else 1
