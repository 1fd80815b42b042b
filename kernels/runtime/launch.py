"""Start-up of a sandkernel kernel, run inside the sandbox as its PID 1.

PID 1 of a PID namespace must reap orphans (or zombies pile up) and does not
get default signal actions, so this process stays a minimal init: it forks
the kernel, forwards termination signals to it, reaps every child, and exits
with the kernel's status (128 + signal number when the kernel was killed).
The child prepares the environment and runs ipykernel.
"""

import os
import signal
import sys


def _init(kernel_pid):
    def forward(signum, _frame):
        try:
            os.kill(kernel_pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == kernel_pid:
            if os.WIFSIGNALED(status):
                os._exit(128 + os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status))


def _kernel():
    os.setsid()
    for path in (os.environ.get("MPLCONFIGDIR"), os.environ.get("IPYTHONDIR")):
        if path:
            os.makedirs(path, exist_ok=True)
    os.chdir(os.environ.get("SANDKERNEL_WORKSPACE", "/mnt/data"))
    # ipykernel's own options: no history database (nothing to persist in a
    # single-use kernel), inline matplotlib figures as image/png displays.
    sys.argv = [
        sys.argv[0],
        *sys.argv[1:],
        "--HistoryManager.enabled=False",
        "--InlineBackend.figure_formats=png",
        "--IPKernelApp.quiet=True",
    ]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    if os.getpid() == 1:
        child = os.fork()
        if child:
            _init(child)
    _kernel()
