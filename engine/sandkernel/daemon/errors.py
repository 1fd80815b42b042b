"""The daemon's errors, and how they cross it: names kept from before the tree was one.

The classes live in :mod:`sandkernel.errors`, drawn there with the HTTP
status of each; these are the same class objects. The daemon answers every
failure with ``{"error": {"type": ..., "message": ...}}``, ``type`` being
the class name (:func:`error_type_for`) and the status the class's
(:func:`status_for`); the client raises the class ``type`` names
(:func:`error_from_response`), so it raises what the engine behind the
daemon raised, whichever engine that is.
"""

from __future__ import annotations

from sandkernel.errors import (
    DaemonError,
    DaemonUnavailable,
    EngineClosed,
    FileError,
    FileNotFoundInStore,
    FileRejected,
    InvalidRequest,
    KernelDead,
    KernelStartFailed,
    PolicyError,
    PoolExhausted,
    RequestTooLarge,
    RunQueueFull,
    SandboxUnavailable,
    SandkernelError,
    SelfCheckFailed,
    SessionClosed,
    SessionError,
    SessionExpired,
    SessionLimitReached,
    SessionLost,
    SessionNotFound,
    Unauthorized,
)
from sandkernel.errors import error_from_wire as error_from_response
from sandkernel.errors import error_type_of as error_type_for
from sandkernel.errors import http_status_of as status_for

__all__ = [
    "DaemonError",
    "DaemonUnavailable",
    "EngineClosed",
    "FileError",
    "FileNotFoundInStore",
    "FileRejected",
    "InvalidRequest",
    "KernelDead",
    "KernelStartFailed",
    "PolicyError",
    "PoolExhausted",
    "RequestTooLarge",
    "RunQueueFull",
    "SandboxUnavailable",
    "SandkernelError",
    "SelfCheckFailed",
    "SessionClosed",
    "SessionError",
    "SessionExpired",
    "SessionLimitReached",
    "SessionLost",
    "SessionNotFound",
    "Unauthorized",
    "error_from_response",
    "error_type_for",
    "status_for",
]
