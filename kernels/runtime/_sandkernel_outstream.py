"""The kernel's ``sys.stdout`` and ``sys.stderr``: ipykernel's, without the empty flushes.

ipykernel publishes a stream's output from its IOPub thread, and its
``flush()``, called from any other thread, hands the flush to that thread
and waits until it has run: a round trip between two threads. A kernel
flushes both streams several times per cell (before its displayed value,
before its reply, after it), whether the cell wrote anything or not, so a
cell that prints nothing pays for about six of these round trips; after
the kernel has idled, each one is a thread's wake-up. This stream skips a
flush that has nothing to hand over: the text of every write made before
it is already queued on IOPub, so whatever the caller publishes next comes
after it, as the full flush guarantees. What is sent, and its order, are
unchanged.

Loaded from the runtime's folder (``launch.KERNEL_OPTIONS`` names it as
ipykernel's ``outstream_class``) before the user's files are on the path.
"""

import threading

from ipykernel.iostream import OutStream as _OutStream


class OutStream(_OutStream):
    """ipykernel's ``OutStream``, whose ``flush()`` returns at once when nothing is pending."""

    def __init__(self, *args, **kwargs):
        # Before the stream exists: nothing is written yet, so nothing is pending.
        self._counts_lock = threading.Lock()
        self._writes = 0  # writes whose text is in the buffers or sent
        self._sent = 0  # of them, how many a finished _flush() has sent
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
            with self._counts_lock:
                self._sent = max(self._sent, writes)

    def flush(self):
        with self._counts_lock:
            pending = self._writes != self._sent
        if pending or getattr(self, "echo", None) is not None:
            super().flush()
