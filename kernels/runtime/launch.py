"""Start-up of a sandkernel kernel, run inside the sandbox as its PID 1.

PID 1 of a PID namespace must reap orphans (or zombies pile up) and does not
get default signal actions, so this process stays a minimal init: it forks
the kernel, forwards termination signals to it, reaps every child, and exits
with the kernel's status (128 + signal number when the kernel was killed).
The child prepares the environment and runs ipykernel.

:func:`adopt` (the sandbox's stub when ``perl`` is missing: a Python run
with ``-I -S`` that imports this module, from its bytecode, and calls it) is
the same init for a kernel forked from the zygote (see ``zygote.py``): by the
time it runs, nsjail has made the sandbox whole. It says so on its stdout
(one line, read by the engine), then waits for its kernel: the zygote's
child enters this process's namespaces and forks the kernel so that it is
adopted by this process, and the engine, told the kernel's pid by the
zygote once it is adopted, writes that pid on this process's stdin. From
then on it is the init above. (``sandkernel/sandbox/zygote.py`` has the
same stub in Perl, which costs a third of its CPU.)
"""

# The C module, not ``signal``: that one imports ``enum`` for its constants'
# names, 3.6 ms of each sandbox's start when this file runs as the stub.
import _signal as signal
import os
import sys

#: How long a sandbox waits for its forked kernel before it gives up (and ends).
ADOPT_TIMEOUT_S = 60.0


def init(kernel_pid):
    """Be PID 1 of the sandbox: forward signals to the kernel, reap, exit with its status."""

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


#: ipykernel's options for every kernel (whose application, kernel and
#: streams are ``_sandkernel_kernel``'s): no history database (nothing to
#: persist in a single-use kernel), inline matplotlib figures as image/png,
#: and no 0.5 ms sleep before each execute_reply. ipykernel sleeps there so
#: that a client which takes the reply as the cell's end has likely read the
#: cell's last output first; sandkernel ends a cell at its idle status, which
#: comes after that output on the same IOPub socket, and so do Jupyter's own
#: clients. Every cell is half a millisecond shorter.
KERNEL_OPTIONS = (
    "--HistoryManager.enabled=False",
    "--InlineBackend.figure_formats=png",
    "--IPKernelApp.quiet=True",
    "--Kernel._execute_sleep=0",
)


def prepare_kernel_app():
    """Make the part of every kernel's IPKernelApp that nothing per-kernel goes into.

    Called by the zygote before it forks: the options parsed, the IPython
    profile found and the configuration files read, as ``initialize()``
    does first. No connection file, key, socket or thread: the kernel makes
    those after the fork (:func:`run_kernel`).
    """
    import _sandkernel_setup  # noqa: F401 - every kernel's first cell calls it
    from _sandkernel_kernel import KernelApp
    from IPython.core.application import BaseIPythonApplication

    app = KernelApp.instance()
    BaseIPythonApplication.initialize(app, list(KERNEL_OPTIONS))
    _prepare_shell(app)
    return app


def _prepare_shell(app):
    """Make the kernel's InteractiveShell, the largest part of a kernel's start, once.

    As ``IPythonKernel.__init__`` makes it, but before there is a kernel to
    name: its namespace, magics, completer, formatters and display hooks.
    It holds nothing of a kernel's own: the kernel gives its display hooks
    the session and IOPub socket after the fork, and the history database is
    off (``KERNEL_OPTIONS``), so there is no file and no saving thread.
    A configured kernel or shell class is left to make its own shell.
    Its extensions are loaded here too (looking for them took about half a
    millisecond of each start).
    """
    import _sandkernel_setup
    from _sandkernel_kernel import Kernel
    from ipykernel.ipkernel import IPythonKernel

    if app.kernel_class is not Kernel or "IPythonKernel" in app.config:
        return
    shell_class = IPythonKernel.shell_class.default_value
    shell = shell_class.instance(
        parent=app,
        profile_dir=app.profile_dir,
        user_module=None,
        user_ns=None,
        kernel=None,
        compiler_class=IPythonKernel.compiler_class.default_value,
    )
    # Here rather than in each kernel: what it makes is shared, not copied.
    # The shell's extensions (IPython's storemagic, those configured) too:
    # ``initialize()`` finds them loaded in a forked kernel.
    app.shell = shell
    try:
        app.init_extensions()
    finally:
        app.shell = None
    app.extensions_loaded_into = shell
    _inline_figures()
    # Shared by every kernel forked, instead of done in each one's set-up cell.
    _sandkernel_setup.warm_up(shell)


def run_kernel(args, app=None):
    """Run ipykernel with ``args`` (``-f <connection file>``); never returns.

    ``app``: the zygote's prepared IPKernelApp (:func:`prepare_kernel_app`),
    which only needs the connection file.
    """
    for path in (os.environ.get("MPLCONFIGDIR"), os.environ.get("IPYTHONDIR")):
        if path:
            os.makedirs(path, exist_ok=True)
    os.chdir(os.environ.get("SANDKERNEL_WORKSPACE", "/mnt/data"))
    # The kernel's application and the set-up cell's code (its cell calls it),
    # from the runtime, before any file of the user's is on the path; a forked
    # kernel has them from the zygote.
    import _sandkernel_setup  # noqa: F401
    from _sandkernel_kernel import KernelApp

    # Then the runtime's folder leaves the path, and this module sys.modules (a
    # forked kernel's zygote imported it): the user's own launch.py, frames.py
    # or zygote.py in the workspace is theirs to import, not shadowed by ours.
    runtime = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != runtime]
    # A forked kernel has the zygote's path, made on the host: a folder a .pth
    # file added there (an editable install's source, say) that this sandbox
    # does not have goes, as site.py leaves it out in a cold kernel. The
    # interpreter's own entries stay, whether they exist or not, as in a cold one.
    prefixes = tuple({sys.prefix, sys.base_prefix})
    sys.path[:] = [p for p in sys.path if not p or p.startswith(prefixes) or os.path.isdir(p)]
    if __name__ == "launch":
        sys.modules.pop("launch", None)
    sys.argv = [sys.argv[0], *args, *KERNEL_OPTIONS]
    if app is None or len(args) != 2 or args[0] != "-f":
        KernelApp.launch_instance()
        return
    from pathlib import Path

    from IPython.core.application import BaseIPythonApplication

    app.connection_file = args[1]
    # Its folders were made in the zygote's /tmp, not this sandbox's.
    os.makedirs(app.profile_dir.location, exist_ok=True)
    app.profile_dir.check_dirs()
    # IPKernelApp.initialize() begins with the generic part, done before the
    # fork: the rest (connection, sockets, threads, the kernel and its shell).
    BaseIPythonApplication.initialize = _prepared
    app.initialize([])  # the kernel takes the prepared shell (it is a singleton)
    shell = app.shell
    if shell is not None and shell.kernel is None:
        # Made before there was a kernel (_prepare_shell): this is its kernel.
        shell.kernel = app.kernel
        shell.parent = app.kernel
        # And in the zygote's folder: this kernel starts in its workspace.
        shell.starting_dir = os.getcwd()
        shell.history_manager.dir_hist[:] = [Path.cwd()]
    elif shell is not None:
        _inline_figures()  # a shell made after the fork (a configured kernel class)
    app.start()


def _inline_figures():
    """Hook matplotlib's inline backend into the shell just made, as its import would have.

    The zygote imports matplotlib and its inline backend before there is
    any shell, and the backend hooks itself into the running shell only when
    it is imported: without this, a forked kernel shows a figure as its text
    repr instead of a PNG. (A cold kernel imports matplotlib in a cell, once
    its shell exists.)
    """
    backend_inline = sys.modules.get("matplotlib_inline.backend_inline")
    enable = getattr(backend_inline, "_enable_matplotlib_integration", None)
    if enable is not None:
        enable()


def _prepared(app, argv=None):
    """``BaseIPythonApplication.initialize`` in a forked kernel: done before the fork."""


def adopt():
    """Wait for the kernel the zygote forks into this sandbox, then be its init."""
    import select

    os.write(1, b"ready\n")
    # The engine's pipe is not needed any more: stdout becomes the log file.
    os.dup2(2, 1)
    # One line, the kernel's pid; an empty read: the engine gave up on this sandbox.
    line = b""
    if select.select([0], [], [], ADOPT_TIMEOUT_S)[0]:
        line = os.read(0, 32)
    if not line.endswith(b"\n") or not line[:-1].isdigit():
        sys.stderr.write("launch.py: no kernel came\n")
        os._exit(125)
    init(int(line))


if __name__ == "__main__":
    if os.getpid() == 1:
        child = os.fork()
        if child:
            init(child)
    os.setsid()
    run_kernel(sys.argv[1:])
