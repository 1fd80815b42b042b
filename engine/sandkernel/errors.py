"""The exception tree of sandkernel.

Every error the engine raises on purpose derives from :class:`SandkernelError`::

    SandkernelError
    ├── PolicyError            a policy file or value is invalid (names the field)
    ├── SandboxUnavailable     nsjail, cgroups or namespaces are missing or unusable
    ├── KernelStartFailed      a sandboxed kernel did not come up (says why)
    ├── KernelDead             the kernel is gone; its session needs a new one
    ├── SelfCheckFailed        a fresh kernel did not pass its isolation self-check
    ├── PoolExhausted          no warm kernel within the deadline (names the setting)
    ├── SessionError
    │   ├── SessionExpired     used after its TTL / idle timeout / max lifetime
    │   ├── SessionClosed      used after close()
    │   ├── SessionNotFound
    │   └── SessionLimitReached  max_sessions are active (names the setting)
    ├── EngineClosed           used after the engine shut down
    └── FileError              the file store cannot do what was asked
        ├── FileRejected       an upload or file was refused (says why and what is allowed)
        └── FileNotFoundInStore  no stored file with that id (never stored, deleted or expired)

User code failing is *not* an exception: it is an ``ExecutionResult`` whose
``status`` says what happened (``error``, ``timeout``, ``oom``, ``dead``...).
"""

from __future__ import annotations


class SandkernelError(Exception):
    """Root of every error sandkernel raises on purpose."""


class PolicyError(SandkernelError):
    """A sandbox policy is invalid; the message names the field and the fix."""


class SandboxUnavailable(SandkernelError):
    """The sandbox cannot be built on this machine (run ``sandkernel doctor``)."""


class KernelStartFailed(SandkernelError):
    """A sandboxed kernel did not reach the ready state."""


class KernelDead(SandkernelError):
    """The kernel process has exited; nothing more can run in it."""


class SelfCheckFailed(SandkernelError):
    """A kernel failed its isolation self-check and was destroyed (fail closed)."""


class PoolExhausted(SandkernelError):
    """No warm kernel became available before the deadline."""


class SessionError(SandkernelError):
    """Base for session lifecycle errors."""


class SessionExpired(SessionError):
    """The session reached its TTL, idle timeout or maximum lifetime."""


class SessionClosed(SessionError):
    """The session was closed by its owner."""


class SessionNotFound(SessionError):
    """No session with that id exists."""


class SessionLimitReached(SessionError):
    """As many sessions as ``max_sessions`` allows are active."""


class ModelCallFailed(SandkernelError):
    """The chat model could not be called or gave an unusable reply (says which and why)."""


class EngineClosed(SandkernelError):
    """The engine has been shut down."""


class FileError(SandkernelError):
    """Base for file store errors; raised as such when the store is closed."""


class FileRejected(FileError):
    """A file was refused; the message says why and what would be accepted."""


class FileNotFoundInStore(FileError):
    """No stored file has that id: it was never stored, was deleted, or expired."""
