"""SIGTERM and SIGHUP stop a command as Ctrl-C does: cancelled, cleaned up, then reported.

Their default action ends the process there and then, leaving its sandboxes
(nsjail, cgroups, run folders, mounts) behind until another engine sweeps
them. A command that starts sandboxes (``sandkernel run``, ``sandkernel
eval``) awaits its work through :func:`stoppable` instead.

One owner per process handles SIGTERM, whichever runs the engine:

* a program embedding an :class:`~sandkernel.Engine` (``handle_sigterm=True``,
  the default): the engine closes, then the process dies of the signal, as
  the sender asked, since the program has no clean-up of its own to run;
* the daemon: the server's graceful shutdown stops the listener, ends the
  requests, then closes its engine (made with ``handle_sigterm=False``);
* a command: :func:`stoppable` cancels the command's task, so that the
  command's own clean-up runs (partial results removed) and it reports the
  signal in its exit status; its engine, if any, has ``handle_sigterm=False``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Coroutine
from typing import Any


class Stopped(Exception):
    """A signal stopped the command; everything it started is cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def report(self, command: str, removed: str) -> int:
        """Say on stderr which signal stopped ``command`` and what it removed; its exit status.

        128 + the signal's number, as a shell reports a process the signal ended.
        """
        name = signal.Signals(self.signum).name
        print(f"sandkernel {command}: stopped by {name}; {removed}", file=sys.stderr)
        return 128 + self.signum


async def stoppable[T](main: Coroutine[Any, Any, T]) -> T:
    """Await ``main``; SIGTERM or SIGHUP cancel it, as asyncio's Ctrl-C does.

    Cancelled, ``main`` cleans up, then :class:`Stopped` says which signal it
    was. A signal the process ignores (``nohup``) or that something else
    handles is left alone; so is a second one while the clean-up runs
    (SIGKILL does not wait for it).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(signum: int) -> None:
        if not received:
            received.append(signum)
            task.cancel()

    handled = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                loop.add_signal_handler(signum, stop, signum)
                handled.append(signum)
    try:
        return await main
    except asyncio.CancelledError:
        if not received:
            raise
        task.uncancel()
        raise Stopped(received[0]) from None
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
