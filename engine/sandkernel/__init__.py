"""sandkernel: a local sandbox execution engine for code written by language models.

Start with :class:`Engine` (async) or :class:`sandkernel.sync.Engine` (blocking).
"""

from __future__ import annotations

from sandkernel.batch import FetchedFile, RunRequest, RunResult
from sandkernel.engine import Engine, EngineStats
from sandkernel.errors import (
    EngineClosed,
    FileNotFoundInStore,
    FileRejected,
    KernelDead,
    KernelStartFailed,
    ModelCallFailed,
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
from sandkernel.files import StoredFile, listed_file_name, raw_file_name
from sandkernel.kernel import SandboxedKernel
from sandkernel.loop import (
    PYTHON_TOOL,
    ChatModel,
    LoopResult,
    OpenAIChatModel,
    format_result,
    run_loop,
)
from sandkernel.policy import Policy, load_policy
from sandkernel.results import DisplayOutput, ErrorInfo, ExecutionResult, ProducedFile, Usage
from sandkernel.sandbox import SandboxHost
from sandkernel.session import Session, SessionInfo, SessionState

__all__ = [
    "ChatModel",
    "DisplayOutput",
    "Engine",
    "EngineClosed",
    "EngineStats",
    "ErrorInfo",
    "ExecutionResult",
    "FetchedFile",
    "FileNotFoundInStore",
    "FileRejected",
    "KernelDead",
    "KernelStartFailed",
    "LoopResult",
    "ModelCallFailed",
    "OpenAIChatModel",
    "PYTHON_TOOL",
    "Policy",
    "PolicyError",
    "PoolExhausted",
    "ProducedFile",
    "RunRequest",
    "RunResult",
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
    "StoredFile",
    "Usage",
    "format_result",
    "listed_file_name",
    "load_policy",
    "raw_file_name",
    "run_loop",
]
__version__ = "0.1.0"
