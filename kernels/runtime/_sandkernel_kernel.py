"""The kernel's application, kernel and standard streams: ipykernel's, with six changes.

Loaded from the runtime's folder (``launch.py``) before the user's files are
on the path; the zygote imports it before it forks.

- **No shell-channel thread.** ipykernel 7 receives every shell request on
  a thread of its own and passes it to the main thread over an in-process
  socket, and each reply back the same way, so that a kernel can run
  "subshells" beside its main shell. sandkernel offers no subshells (a
  session runs one cell at a time, under the policy's wall timeout; the
  Jupyter gateway refuses them), so the main thread reads its shell socket
  itself, as ipykernel 6 did and ipykernel 7 still does when it has no such
  thread. Each request is one wake-up of a thread shorter on its way in, and
  each reply on its way out; the kernel's ``kernel_info`` no longer lists
  "kernel subshells". Without debugpy (which a forked kernel never has),
  the debugger's shell socket, connected to the shell socket by ipykernel
  whether there is a debugger or not, is not made either.
- **No empty flushes.** ipykernel publishes a stream's output from its IOPub
  thread, and its ``flush()``, called from any other thread, hands the flush
  to that thread and waits until it has run. A kernel flushes both streams
  several times per cell (before its displayed value, before its reply,
  after it), whether the cell wrote anything or not. :class:`OutStream`
  skips a flush that has nothing to hand over: the text of every write made
  before it has already gone out on the IOPub socket. What is sent, and its
  order, are unchanged.
- **The IOPub thread never waits on itself** (:class:`IOPubThread`): a
  thread printing faster than it sends could make it block on its own
  wake-up pipe, and the kernel's output stopped for good.
- **An interrupt cancels a cell awaiting at top level at once**
  (:meth:`Kernel._cancel_on_sigint`), where ipykernel's waited for the await
  to end.
- **An interrupt always reaches a cell waiting in a system call**
  (:meth:`Kernel._send_interrupt_children`): the main thread, seen asleep in
  one after the interrupt, is woken once.
- **Less bookkeeping per cell.** The application's logger drops what its
  handler would drop (traitlets leaves it at DEBUG and filters in the
  handler, so ipykernel's four debug lines per cell were each made into a
  record first), and the signature of IPython's ``run_cell_async``, which
  ipykernel inspects before every cell, is worked out once. Together about
  a tenth of a ``1+1`` cell's CPU in the kernel.
"""

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading

import zmq
from ipykernel.control import ControlThread
from ipykernel.iostream import IOPubThread as _IOPubThread
from ipykernel.iostream import OutStream as _OutStream
from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from IPython.core.interactiveshell import InteractiveShell
from traitlets import DottedObjectName, Type

# ipykernel asks before each cell which parameters this method takes;
# inspect.signature answers from __signature__ when a function has one.
InteractiveShell.run_cell_async.__signature__ = inspect.signature(InteractiveShell.run_cell_async)


class _NoShellChannelThread:
    """Where ipykernel 7 keeps its shell-channel thread: none (false), the main thread's shell.

    ipykernel tests the thread's truth to choose the path without it, and
    reads ``parent_thread`` (the thread whose shell runs a cell) where it
    runs a cell with top-level ``await``.
    """

    def __init__(self):
        self.parent_thread = threading.main_thread()

    def __bool__(self):
        return False


#: The signal that wakes the main thread after an interrupt (see
#: :meth:`Kernel._wake_main_thread`): one whose default action is to do
#: nothing, which few programs use (Go's runtime chose it for the same role).
_WAKE = signal.SIGURG
#: How often, and for how many times, the main thread is looked at after an
#: interrupt while the request it interrupted runs: for a second at most.
_WAKE_EVERY_S = 0.05
_WAKES = 20


def _asleep(thread_id):
    """Whether this process's thread ``thread_id`` sleeps (in a system call a signal ends).

    True too if ``/proc`` cannot tell: a wake-up is then sent.
    """
    try:
        with open(f"/proc/self/task/{thread_id}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # The state follows the thread's name, which may hold any character but ends with ")".
    fields = stat[stat.rfind(b")") + 1 :].split()
    return not fields or fields[0] == b"S"


def _woken(_signum, _frame):
    """The wake's handler: nothing. Its work is done by its delivery (see ``_wake_main_thread``)."""


class Kernel(IPythonKernel):
    """ipykernel's Python kernel, its shell requests read by the main thread (no subshells)."""

    #: Counts the shell requests handled, so that an interrupt's wake-ups end with its request.
    _requests_begun = 0

    @property
    def _supports_kernel_subshells(self):
        return False

    def start(self):
        super().start()  # in the main thread, the only one that may set a handler
        signal.signal(_WAKE, _woken)

    def pre_handler_hook(self):
        self._requests_begun += 1
        super().pre_handler_hook()

    def _send_interrupt_children(self):
        """ipykernel's interrupt (SIGINT to the kernel's process group), then a wake-up.

        The signal can be taken while the main thread is between two checks
        for it and a blocking system call: Python's handler then only flags
        it, the call (``time.sleep(30)`` in a cell) is not interrupted, and
        the interrupt took effect when the call returned, long after the
        engine's grace had ended in a kill (about 1 interrupt in 100 of a
        sleeping cell, on a busy machine). A signal of another kind, sent to
        the main thread, interrupts the call, and Python then runs the
        handlers of every signal flagged: the flagged SIGINT raises
        ``KeyboardInterrupt``. One such wake-up is sent, the first time the
        main thread is seen asleep in a system call within a second: it then
        has the SIGINT flagged, or it has already acted on it (a cell that
        went on after catching it sees one system call end early, as it
        would for any signal it handles).
        """
        begun = self._requests_begun
        super()._send_interrupt_children()
        if threading.current_thread() is not threading.main_thread():
            asyncio.get_running_loop().call_later(
                _WAKE_EVERY_S, self._wake_main_thread, begun, _WAKES
            )

    def _wake_main_thread(self, begun, left):
        # Not past the request that was interrupted, nor once SIGINT has no
        # handler to run (the cell ignores it, or the request has ended), nor
        # once the cell has set a handler of its own for the wake's signal.
        if (
            left <= 0
            or self._requests_begun != begun
            or not callable(signal.getsignal(signal.SIGINT))
            or signal.getsignal(_WAKE) is not _woken
        ):
            return
        main = threading.main_thread()
        if _asleep(main.native_id):
            signal.pthread_kill(main.ident, _WAKE)
            return
        # Running: it sees a flagged SIGINT at its next check, unless it then blocks.
        asyncio.get_running_loop().call_later(
            _WAKE_EVERY_S, self._wake_main_thread, begun, left - 1
        )

    @contextlib.contextmanager
    def _cancel_on_sigint(self, future):
        """Cancel a cell with top-level ``await`` on SIGINT (an interrupt), at once.

        ipykernel's own hands the cancellation to its IOLoop, which a cell
        awaiting ``asyncio.sleep(60)`` does not wake: the interrupt took effect
        only when the sleep ended (measured with ipykernel 7.4 outside any
        sandbox), long after the engine's grace, which then kills the kernel.
        The cell's own event loop is woken here instead.
        """
        loop = asyncio.get_running_loop()

        def handle_sigint(*_args):
            loop.call_soon_threadsafe(_cancel_unless_done, future)

        saved = signal.signal(signal.SIGINT, handle_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, saved)


def _cancel_unless_done(future):
    if not future.done():
        future.cancel()


class OutStream(_OutStream):
    """ipykernel's ``OutStream``, whose ``flush()`` returns at once when nothing is pending."""

    def __init__(self, *args, **kwargs):
        # Before the stream exists: nothing is written yet, so nothing is pending.
        self._counts_lock = threading.Lock()
        self._writes = 0  # writes whose text is in the buffers or sent
        self._sent = 0  # of them, how many are sent on the IOPub socket
        super().__init__(*args, **kwargs)

    def write(self, string):
        written = super().write(string)
        # Counted once the text is in the buffers: a _flush() that counts it
        # below takes its text with it.
        with self._counts_lock:
            self._writes += 1
        return written

    def _flush(self):
        with self._counts_lock:
            writes = self._writes
        try:
            super()._flush()
        finally:
            # What _flush() publishes, the IOPub thread sends later, in order:
            # counted as sent once it has. Until then a flush is a full one,
            # whose wait ends after that send: a program that flushes and then
            # holds the GIL in C code for good has its output out first.
            pub_thread = self.pub_thread
            if pub_thread is None:
                self._count_sent(writes)
            else:
                pub_thread.schedule(functools.partial(self._count_sent, writes))

    def _count_sent(self, writes):
        with self._counts_lock:
            self._sent = max(self._sent, writes)

    def flush(self):
        with self._counts_lock:
            pending = self._writes != self._sent
        if pending or getattr(self, "echo", None) is not None:
            super().flush()


class IOPubThread(_IOPubThread):
    """ipykernel's IOPub thread, which never waits on itself.

    A function is scheduled on the thread by a wake-up message on a pipe (an
    inproc socket per scheduling thread) that the IOPub thread alone drains,
    and the IOPub thread schedules the send of each stream flush it runs on
    a pipe of its own. A thread printing faster than the IOPub thread sends
    queues a batch of flushes, which the IOPub thread runs in one go: past
    the pipe's 1,000 wake-ups it blocked on its own pipe, the only thread
    that could empty it. The kernel's output stopped for good, and each
    flush waited out its 10 s timeout. On the IOPub thread itself, the
    function is queued in the same order and the loop is woken through its
    own callback instead, which never blocks.
    """

    def schedule(self, f):
        if self.thread.is_alive() and threading.current_thread() is self.thread:
            self._events.append(f)
            self.io_loop.add_callback(self._handle_event, None)
        else:
            super().schedule(f)


class KernelApp(IPKernelApp):
    """ipykernel's application with :class:`Kernel` and :class:`OutStream`."""

    kernel_class = Type(Kernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)
    outstream_class = DottedObjectName(f"{__name__}.OutStream").tag(config=True)

    #: the shell whose extensions were loaded before the fork (``launch.prepare_kernel_app``)
    extensions_loaded_into = None

    def init_extensions(self):
        # IPython looks for "storemagic" on the whole path before it finds
        # IPython.extensions.storemagic, loaded or not: about half a
        # millisecond of each kernel's start.
        if self.shell is None or self.shell is not self.extensions_loaded_into:
            super().init_extensions()

    def get_default_logging_config(self):
        config = super().get_default_logging_config()
        for logger in config.get("loggers", {}).values():
            logger["level"] = logging.getLevelName(self.log_level)
        return config

    def init_iopub(self, context):
        """ipykernel's, with :class:`IOPubThread`."""
        self.iopub_socket = context.socket(zmq.XPUB)
        self.iopub_socket.linger = 1000
        self._apply_curve_server_options(self.iopub_socket)
        self.iopub_port = self._bind_socket(self.iopub_socket, self.iopub_port)
        self.configure_tornado_logger()
        self.iopub_thread = IOPubThread(self.iopub_socket, pipe=True, session=self.session)
        self.iopub_thread.start()
        # As ipykernel: the socket's API, from any thread, through the IOPub thread.
        self.iopub_socket = self.iopub_thread.background_socket

    def init_control(self, context):
        """The control socket and its thread: ipykernel's, less what this kernel never uses.

        No shell-channel thread: only a kernel that knows it has no subshells
        can do without it. And without debugpy (which a forked kernel never
        has) no debugger's shell socket, which ipykernel connects to the shell
        socket whether there is a debugger or not: one connection and one
        thread's event loop fewer at each start. The debugger's own socket
        stays, unbound, for the kernel's constructor.
        """
        if not issubclass(self.kernel_class, Kernel):
            super().init_control(context)
            return
        if _debugpy_available():
            super().init_control(context)
            thread = getattr(self, "shell_channel_thread", None)  # ipykernel 7 makes one
            if thread is not None:
                thread.io_loop.close()  # made, never started: its event loop's descriptors
        else:
            self.control_socket = context.socket(zmq.ROUTER)
            self.control_socket.linger = 1000
            self._apply_curve_server_options(self.control_socket)
            self.control_port = self._bind_socket(self.control_socket, self.control_port)
            self.debugpy_socket = context.socket(zmq.STREAM)
            self.debugpy_socket.linger = 1000
            if hasattr(zmq, "ROUTER_HANDOVER"):
                self.control_socket.router_handover = 1
            self.control_thread = ControlThread(daemon=True)
        self.shell_channel_thread = _NoShellChannelThread()


def _debugpy_available():
    from ipykernel.debugger import _is_debugpy_available

    return _is_debugpy_available
