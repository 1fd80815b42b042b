"""A watchdog that ends a host actor's kernels when the actor's process dies.

Ray kills a dead worker's process group, but kernels are started in sessions
of their own (``jupyter_client`` does so to interrupt them), and a node whose
raylet is killed kills nothing at all. So each host actor starts one guardian:

* it is started through a double fork, so it is nobody's child in the worker's
  process tree and outlives the worker;
* it holds the read end of a pipe whose only write end the actor keeps, so it
  learns of the actor's death, however it happens (SIGKILL included), from an
  end-of-file;
* then it builds a :class:`~sandkernel.sandbox.SandboxHost` on the actor's
  runtime folder, which sweeps every owner whose lock is free: the dead actor's
  processes (through their cgroups), mounts, folders and cgroups.

Until the actor dies it runs only the standard library (a few MiB); it is run
as a script (``python -I path/to/_guardian.py``) so as not to import sandkernel
and Ray before it has work to do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def start_guardian(runtime_dir: Path) -> int:
    """Start the guardian of this process's kernels; returns the fd to keep open.

    Close the fd (or die) and the guardian sweeps ``runtime_dir`` and the
    cgroups of dead owners, then exits.
    """
    read_end, write_end = os.pipe()  # both close-on-exec: kernels never inherit them
    try:
        launcher = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, "-I", __file__, "--fd", str(read_end), "--runtime-dir",
             str(runtime_dir)],
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        # The launcher forks the guardian and exits at once: reap it here.
        if launcher.wait(timeout=30) != 0:
            raise OSError(f"the kernel guardian did not start (exit {launcher.returncode})")
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end


def _wait_for_eof(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except InterruptedError:
            continue


def _sweep(runtime_dir: Path) -> None:
    from sandkernel.sandbox import SandboxHost

    # Its constructor sweeps every dead owner; it holds a lock of its own meanwhile.
    SandboxHost(runtime_dir).close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--runtime-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if os.fork() != 0:
        os._exit(0)  # the launcher: its parent reaps it; the guardian is re-parented
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    _wait_for_eof(args.fd)
    os.close(args.fd)
    try:
        _sweep(args.runtime_dir)
    except Exception as exc:  # noqa: BLE001 - report, nobody else will
        print(f"sandkernel guardian: sweeping {args.runtime_dir} failed: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
