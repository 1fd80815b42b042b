"""sandkernel as a local daemon: one engine behind an HTTP API on a Unix socket.

- ``sandkernel serve`` runs it (:mod:`sandkernel.daemon.server`, API in
  :mod:`sandkernel.daemon.app`);
- :class:`AsyncClient` and :class:`Client` talk to it with the embedded
  engine's methods, so switching is one line;
- ``sandkernel mcp`` offers the sandbox as Model Context Protocol tools
  (:mod:`sandkernel.daemon.mcp_server`).

Names are imported on first use, so ``import sandkernel.daemon`` needs none of
the optional libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandkernel._lazy import lazy_exports

if TYPE_CHECKING:
    from sandkernel.daemon.client import AsyncClient, Client, RemoteSession
    from sandkernel.daemon.errors import (
        DaemonError,
        DaemonUnavailable,
        InvalidRequest,
        RequestTooLarge,
        RunQueueFull,
        SessionLost,
        Unauthorized,
    )
    from sandkernel.daemon.server import Daemon, DaemonConfig, run_daemon

_WHERE = {
    "AsyncClient": "client",
    "Client": "client",
    "RemoteSession": "client",
    "DaemonError": "errors",
    "DaemonUnavailable": "errors",
    "InvalidRequest": "errors",
    "RequestTooLarge": "errors",
    "RunQueueFull": "errors",
    "SessionLost": "errors",
    "Unauthorized": "errors",
    "Daemon": "server",
    "DaemonConfig": "server",
    "run_daemon": "server",
}

__all__ = [
    "AsyncClient",
    "Client",
    "Daemon",
    "DaemonConfig",
    "DaemonError",
    "DaemonUnavailable",
    "InvalidRequest",
    "RemoteSession",
    "RequestTooLarge",
    "RunQueueFull",
    "SessionLost",
    "Unauthorized",
    "run_daemon",
]


# Runtime only: a module ``__getattr__`` that type checkers saw would make
# every misspelt ``sandkernel.daemon.X`` type-check as Any.
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
