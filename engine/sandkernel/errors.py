"""The exception tree of sandkernel, with the HTTP status of each error.

Every error sandkernel raises on purpose is a class of this module, under
:class:`SandkernelError`. Each carries ``http_status``, the status the daemon
answers it with; the daemon's client raises the class named by the answer's
``type``, so a caller catches the same class whichever backend it talks to::

    SandkernelError                 500  the root
    ├── PolicyError                 400  a policy file or value is invalid (names the field)
    ├── SandboxUnavailable          503  nsjail, cgroups or namespaces are missing or unusable
    ├── KernelStartFailed           503  a sandboxed kernel did not come up (says why)
    │   └── ZygoteFailed            503  the zygote could not fork a kernel (the engine starts cold)
    ├── SelfCheckFailed             503  a fresh kernel failed its isolation self-check
    ├── KernelDead                  409  the kernel is gone: run again with restart=True
    ├── PoolExhausted               503  no warm kernel within the deadline (names the setting)
    ├── EngineClosed                503  used after the engine shut down
    ├── ModelCallFailed             502  the chat model could not be called, or replied unusably
    ├── HostUnreachable             503  a cluster node's host did not answer: retry
    ├── HostClosing                 503  a cluster node's host is shutting down: retry
    ├── SessionError                409  base of the session lifecycle errors
    │   ├── SessionNotFound         404  no session with that id
    │   ├── SessionExpired          410  used after its TTL / idle timeout / max lifetime
    │   ├── SessionClosed           410  used after close()
    │   ├── SessionLost             410  its kernel went with a daemon restart or a cluster node
    │   └── SessionLimitReached     429  max_sessions are active (names the setting)
    ├── FileError                   503  the store cannot serve (closed, read-only, full, damaged)
    │   ├── FileRejected            422  a file was refused (says why and what is allowed)
    │   │   └── FileTooLarge        413  over the upload limit (names the setting), or disk full
    │   └── FileNotFoundInStore     404  no stored file with that id (never stored, deleted...)
    │       └── FileLost            404  the cluster node that stored it is gone
    ├── BadInput (ValueError)       400  input that cannot be used (says which and why)
    │   ├── FusionInputError        400  a SandboxFusion request's files cannot be used
    │   └── EvalInputError          400  a problems or samples file cannot be used
    └── DaemonError                 500  the daemon answered an error no other class describes
        ├── DaemonUnavailable       503  nothing listens at the socket or address (client side)
        ├── InvalidRequest          400  malformed JSON or an invalid id (422: invalid fields);
        │                                also a BadInput
        ├── Unauthorized            401  TCP without the daemon's bearer token
        ├── RequestTooLarge         413  the body is over the daemon's size limit (names the flag)
        └── RunQueueFull            503  the daemon queues as many one-shot runs as it accepts

The daemon adds ``Retry-After`` to its 429 and 503 answers. Errors from
other libraries are mapped where they cross the daemon (:func:`error_class_of`):
a ``ValueError`` is an :class:`InvalidRequest`, anything else an internal
error (500, ``InternalError``), which is a bug.

User code failing is *not* an exception: it is an ``ExecutionResult`` whose
``status`` says what happened (``error``, ``timeout``, ``oom``, ``dead``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Final


class SandkernelError(Exception):
    """Root of every error sandkernel raises on purpose.

    Attributes:
        http_status: the HTTP status the daemon answers this error with.
    """

    http_status: ClassVar[int] = 500


class PolicyError(SandkernelError):
    """A policy is invalid, or not the one asked for; the message names the field and the fix."""

    http_status = 400


class SandboxUnavailable(SandkernelError):
    """The sandbox cannot be built on this machine (run ``sandkernel doctor``)."""

    http_status = 503


class KernelStartFailed(SandkernelError):
    """A sandboxed kernel did not reach the ready state."""

    http_status = 503


class ZygoteFailed(KernelStartFailed):
    """The zygote could not fork a kernel (it died, or its child failed): start cold.

    Internal to the start path, which falls back to a cold start: a user sees
    it only as the :class:`KernelStartFailed` it is.
    """


class SelfCheckFailed(SandkernelError):
    """A kernel failed its isolation self-check and was destroyed (fail closed)."""

    http_status = 503


class KernelDead(SandkernelError):
    """The kernel process has exited; nothing more can run in it.

    409: the session's state conflicts with the request; ``restart=True``
    continues on a fresh kernel.
    """

    http_status = 409


class PoolExhausted(SandkernelError):
    """No warm kernel became available before the deadline."""

    http_status = 503


class EngineClosed(SandkernelError):
    """The engine has been shut down."""

    http_status = 503


class ModelCallFailed(SandkernelError):
    """The chat model could not be called or gave an unusable reply (says which and why).

    502: the model's endpoint is the upstream that failed.
    """

    http_status = 502


class HostUnreachable(SandkernelError):
    """A cluster node's host did not answer and is not (yet) known to be gone: retry later.

    The call may or may not have run. 503 with ``Retry-After``, as the
    condition is temporary: the host answers again, or is found lost.
    """

    http_status = 503


class HostClosing(SandkernelError):
    """A cluster node's host is shutting down (its last client left); a new one takes its node."""

    http_status = 503


class SessionError(SandkernelError):
    """Base for session lifecycle errors."""

    http_status = 409


class SessionNotFound(SessionError):
    """No session with that id exists."""

    http_status = 404


class SessionExpired(SessionError):
    """The session reached its TTL, idle timeout or maximum lifetime."""

    http_status = 410


class SessionClosed(SessionError):
    """The session was closed by its owner."""

    http_status = 410


class SessionLost(SessionError):
    """The session's kernel is gone with what ran it; the message says which and when.

    Either the daemon restarted since the session was created (its kernel and
    variables ended with the old daemon process), or, on a cluster, the node
    (or host actor) holding its kernel left. Its files stay downloadable by
    id unless they were stored on that node. Open a new session (the same id
    works with ``if_expired="new"``).
    """

    http_status = 410


class SessionLimitReached(SessionError):
    """As many sessions as ``max_sessions`` allows are active."""

    http_status = 429


class FileError(SandkernelError):
    """Base for file store errors; raised as such when the store cannot serve.

    Closed, not writable (read-only, a full disk), its database held by
    another process or damaged: the message says which and what fixes it.
    """

    http_status = 503


class FileRejected(FileError):
    """A file was refused; the message says why and what would be accepted."""

    http_status = 422


class FileTooLarge(FileRejected):
    """A file is larger than the store or the engine accepts (the message names the setting).

    Also an upload the store's disk has no room for.
    """

    http_status = 413


class FileNotFoundInStore(FileError):
    """No stored file has that id: it was never stored, was deleted, or expired."""

    http_status = 404


class FileLost(FileNotFoundInStore):
    """The cluster node that stored the file is gone (the message names it)."""

    http_status = 404


class BadInput(SandkernelError, ValueError):
    """Input given to sandkernel cannot be used; the message says which and why.

    Also a ``ValueError``, as Python's own functions raise for bad arguments.
    """

    http_status = 400


class FusionInputError(BadInput):
    """A SandboxFusion request sandkernel cannot serve (a file path or its content)."""

    http_status = 400


class EvalInputError(BadInput):
    """A problems or samples file cannot be used (says which file, line and why)."""

    http_status = 400


class DaemonError(SandkernelError):
    """The daemon answered with an error no other class describes, or cannot be used.

    Attributes:
        status_code: the status of the daemon's answer (``None`` when none came).
        error_type: the ``type`` of its error body.
    """

    http_status = 500

    def __init__(
        self, message: str, *, status_code: int | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type or type(self).__name__


class DaemonUnavailable(DaemonError):
    """No daemon answers at the socket or address (start it with ``sandkernel serve``).

    Raised by the client; the daemon never answers it.
    """

    http_status = 503


class InvalidRequest(DaemonError, BadInput):
    """The request was malformed: bad JSON, wrong types or an invalid id (also a ValueError).

    400 for a body that is not JSON and for values the engine refuses (an
    invalid id); 422 for well-formed JSON whose fields fail the route's schema.
    """

    http_status = 400


class Unauthorized(DaemonError):
    """A TCP request came without the daemon's bearer token, or with a wrong one."""

    http_status = 401


class RequestTooLarge(DaemonError):
    """The request body is larger than the daemon accepts (the message names the flag)."""

    http_status = 413


class RunQueueFull(DaemonError):
    """The daemon holds as many one-shot runs as it queues: retry after ``Retry-After`` seconds.

    Raised at once, before the request's body is read; the limits are the
    daemon's ``--max-queued-runs`` and ``--max-queued-mb``.
    """

    http_status = 503


# -- the registry: what crosses the daemon, and back ------------------------------------


def _by_name(*classes: type[SandkernelError]) -> Mapping[str, type[SandkernelError]]:
    registry: dict[str, type[SandkernelError]] = {}
    for cls in classes:
        if cls.__name__ in registry:
            raise RuntimeError(f"two error classes are named {cls.__name__}")
        registry[cls.__name__] = cls
    return MappingProxyType(registry)


#: Every class of the tree, by the name an error body's ``type`` gives it (its class name).
ERROR_CLASSES: Final = _by_name(
    SandkernelError,
    PolicyError,
    SandboxUnavailable,
    KernelStartFailed,
    ZygoteFailed,
    SelfCheckFailed,
    KernelDead,
    PoolExhausted,
    EngineClosed,
    ModelCallFailed,
    HostUnreachable,
    HostClosing,
    SessionError,
    SessionNotFound,
    SessionExpired,
    SessionClosed,
    SessionLost,
    SessionLimitReached,
    FileError,
    FileRejected,
    FileTooLarge,
    FileNotFoundInStore,
    FileLost,
    BadInput,
    FusionInputError,
    EvalInputError,
    DaemonError,
    DaemonUnavailable,
    InvalidRequest,
    Unauthorized,
    RequestTooLarge,
    RunQueueFull,
)

#: Errors of other libraries, and the class they cross the daemon as.
FOREIGN_ERRORS: Final[tuple[tuple[type[Exception], type[SandkernelError]], ...]] = (
    (ValueError, InvalidRequest),
)

#: The ``type`` of an error that is none of sandkernel's: a bug (500).
INTERNAL_ERROR: Final = "InternalError"

#: For an answer whose ``type`` is not a class here (a proxy's, or a newer daemon's):
#: the class its status stands for.
_BY_STATUS: Final[Mapping[int, type[DaemonError]]] = MappingProxyType(
    {400: InvalidRequest, 422: InvalidRequest, 401: Unauthorized, 413: RequestTooLarge}
)


def error_class_of(exc: BaseException) -> type[SandkernelError] | None:
    """The class ``exc`` crosses the daemon as, or None for an internal error.

    A sandkernel error is its own class (or, for a subclass defined elsewhere,
    the nearest class of the tree); another library's error is mapped by
    :data:`FOREIGN_ERRORS`.
    """
    if isinstance(exc, SandkernelError):
        for cls in type(exc).__mro__:
            registered = ERROR_CLASSES.get(cls.__name__)
            if registered is cls:
                return registered
        return SandkernelError
    for foreign, cls in FOREIGN_ERRORS:
        if isinstance(exc, foreign):
            return cls
    return None


def http_status_of(exc: BaseException) -> int:
    """The HTTP status the daemon answers ``exc`` with (500 for an internal error)."""
    cls = error_class_of(exc)
    if cls is None:
        return 500
    return cls.http_status


def error_type_of(exc: BaseException) -> str:
    """The ``type`` of the daemon's error body for ``exc``."""
    cls = error_class_of(exc)
    return INTERNAL_ERROR if cls is None else cls.__name__


def error_from_wire(status_code: int, error_type: str, message: str) -> SandkernelError:
    """The exception for a daemon's error answer: the class its ``type`` names.

    A ``type`` not in :data:`ERROR_CLASSES` gives the daemon error its status
    stands for, else a plain :class:`DaemonError` carrying the status.
    """
    cls = ERROR_CLASSES.get(error_type)
    if cls is not None and not issubclass(cls, DaemonError):
        return cls(message)
    daemon_cls: type[DaemonError] = _BY_STATUS.get(status_code, DaemonError)
    if cls is not None and issubclass(cls, DaemonError):
        daemon_cls = cls
    return daemon_cls(message, status_code=status_code, error_type=error_type)
