"""What the routes may raise, in groups: each route's OpenAPI answers are built from them."""

from __future__ import annotations

from typing import Final

from sandkernel.errors import (
    EngineClosed,
    FileError,
    FileLost,
    FileNotFoundInStore,
    FileRejected,
    FileTooLarge,
    HostUnreachable,
    InvalidRequest,
    KernelStartFailed,
    PoolExhausted,
    RequestTooLarge,
    RunQueueFull,
    SandboxUnavailable,
    SelfCheckFailed,
    SessionClosed,
    SessionExpired,
    SessionLimitReached,
    SessionLost,
    SessionNotFound,
)

#: A request with a body: malformed or invalid (400/422), or over the size limit.
BODY: Final = (InvalidRequest, RequestTooLarge)
#: Any call into the engine: it is shutting down, or (on a cluster) a host did not answer.
ENGINE: Final = (EngineClosed, HostUnreachable)
#: A session by id that is not live.
SESSION: Final = (SessionNotFound, SessionExpired, SessionClosed, SessionLost)
#: A session that needs a new kernel.
NEW_KERNEL: Final = (
    SessionLimitReached, PoolExhausted, KernelStartFailed, SelfCheckFailed, SandboxUnavailable,
)  # fmt: skip
#: Stored files by id.
FILES: Final = (FileNotFoundInStore, FileLost, FileError)
#: An upload the store may refuse.
UPLOAD: Final = (FileRejected, FileTooLarge, FileError)
#: Any one-shot run: its body refused, no room in the run queue (``RunQueueFull``,
#: answered at once, before the body is read), or no sandbox to run in.
ONE_SHOT_RUN: Final = (
    InvalidRequest, RequestTooLarge, RunQueueFull, SandboxUnavailable, KernelStartFailed,
    EngineClosed, HostUnreachable,
)  # fmt: skip
#: A one-shot run in a kernel taken from the pool (SandboxFusion's ``/run_jupyter``).
POOLED_KERNEL: Final = (SessionLimitReached, PoolExhausted, SelfCheckFailed)
