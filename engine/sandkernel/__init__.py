"""sandkernel: a local sandbox execution engine for code written by language models.

Start with :class:`Engine` (async) or :class:`sandkernel.sync.Engine` (blocking).
"""

from __future__ import annotations

from sandkernel.engine import Engine, EngineStats
from sandkernel.errors import (
    EngineClosed,
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
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import Policy, load_policy
from sandkernel.results import DisplayOutput, ErrorInfo, ExecutionResult, Usage
from sandkernel.sandbox import SandboxHost
from sandkernel.session import Session, SessionInfo, SessionState

__all__ = [
    "DisplayOutput",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "ErrorInfo",
    "ExecutionResult",
    "KernelDead",
    "KernelStartFailed",
    "Policy",
    "PolicyError",
    "PoolExhausted",
    "SandboxHost",
    "SandboxUnavailable",
    "SandboxedKernel",
    "SandkernelError",
    "SelfCheckFailed",
    "Session",
    "SessionClosed",
    "SessionError",
    "SessionExpired",
    "SessionInfo",
    "SessionLimitReached",
    "SessionNotFound",
    "SessionState",
    "Usage",
    "load_policy",
]
__version__ = "0.1.0"
