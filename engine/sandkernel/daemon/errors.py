"""Errors of the daemon and their HTTP status codes, shared by the server and the client.

The daemon answers every failure with ``{"error": {"type": ..., "message": ...}}``.
``type`` is the name of the exception class, so the client raises the very
class the embedded engine would have raised::

    SandkernelError
    ├── SessionError
    │   └── SessionLost        the session existed before the daemon restarted
    └── DaemonError            the daemon refused the request, or cannot be reached
        ├── DaemonUnavailable  nothing listens at the socket or address
        ├── InvalidRequest     malformed JSON, wrong types, invalid ids (also a ValueError)
        ├── Unauthorized       TCP without the right bearer token
        ├── RequestTooLarge    the body is over the daemon's size limit
        └── RunQueueFull       as many one-shot runs are queued as it accepts (503, Retry-After)
"""

from __future__ import annotations

from sandkernel import errors as _engine_errors
from sandkernel.errors import (
    EngineClosed,
    FileError,
    FileNotFoundInStore,
    FileRejected,
    KernelDead,
    KernelStartFailed,
    PolicyError,
    PoolExhausted,
    SandboxUnavailable,
    SandkernelError,
    SelfCheckFailed,
    SessionClosed,
    SessionError,
    SessionExpired,
    SessionLimitReached,
    SessionNotFound,
)


class SessionLost(SessionError):
    """The session was created before the daemon restarted; its kernel and variables are gone."""


class DaemonError(SandkernelError):
    """The daemon answered with an error no engine exception describes.

    Attributes:
        status_code: the HTTP status (``None`` when no answer came).
        error_type: the ``type`` of the error body.
    """

    def __init__(
        self, message: str, *, status_code: int | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type or type(self).__name__


class DaemonUnavailable(DaemonError):
    """No daemon answers at the socket or address (start it with ``sandkernel serve``)."""


class InvalidRequest(DaemonError, ValueError):
    """The request was malformed: bad JSON, wrong types or an invalid id."""


class Unauthorized(DaemonError):
    """A TCP request came without the daemon's bearer token, or with a wrong one."""


class RequestTooLarge(DaemonError):
    """The request body is larger than the daemon accepts."""


class RunQueueFull(DaemonError):
    """The daemon holds as many one-shot runs as it queues: retry after ``Retry-After`` seconds.

    Raised at once, before the request's body is read; the limits are the
    daemon's ``--max-queued-runs`` and ``--max-queued-mb``.
    """


#: Most specific first: the first class an exception is an instance of decides.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (SessionNotFound, 404),
    (FileNotFoundInStore, 404),
    (SessionLost, 410),
    (SessionExpired, 410),
    (SessionClosed, 410),
    (KernelDead, 409),
    (SessionLimitReached, 429),
    (PoolExhausted, 503),
    (FileRejected, 422),
    (PolicyError, 400),
    (EngineClosed, 503),
    (SandboxUnavailable, 503),
    (KernelStartFailed, 503),
    (SelfCheckFailed, 503),
    (FileError, 503),
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (RequestTooLarge, 413),
    (RunQueueFull, 503),
    (ValueError, 400),
)


def status_for(exc: Exception) -> int:
    """The HTTP status the daemon answers ``exc`` with."""
    if isinstance(exc, FileRejected) and "size cap" in str(exc):
        return 413  # the store's upload size limit, as opposed to a refused type or name
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_type_for(exc: Exception) -> str:
    """The ``type`` field for ``exc``: its class name, or ``InvalidRequest`` for a ValueError."""
    if isinstance(exc, SandkernelError):
        return type(exc).__name__
    if isinstance(exc, ValueError):
        return "InvalidRequest"
    return "InternalError"


def _error_classes() -> dict[str, type[SandkernelError]]:
    found: dict[str, type[SandkernelError]] = {}
    for module_globals in (vars(_engine_errors), globals()):
        for value in module_globals.values():
            if isinstance(value, type) and issubclass(value, SandkernelError):
                found[value.__name__] = value
    return found


_ERROR_CLASSES = _error_classes()
_BY_STATUS: dict[int, type[DaemonError]] = {
    400: InvalidRequest, 422: InvalidRequest, 401: Unauthorized, 413: RequestTooLarge,
}  # fmt: skip


def error_from_response(status_code: int, error_type: str, message: str) -> SandkernelError:
    """The exception the client raises for an error answer of the daemon."""
    cls = _ERROR_CLASSES.get(error_type)
    if cls is not None and not issubclass(cls, DaemonError):
        return cls(message)
    daemon_cls = _BY_STATUS.get(status_code, DaemonError)
    if cls is not None and issubclass(cls, DaemonError):
        daemon_cls = cls
    return daemon_cls(message, status_code=status_code, error_type=error_type)
