"""sandkernel: a local sandbox execution engine for code written by language models.

Start with :class:`Engine` (async) or :class:`sandkernel.sync.Engine` (blocking).

Every public name is imported from its module on first use (PEP 562), so
``import sandkernel`` is cheap and a program pays only for what it touches:
the errors do not load pydantic, ``Policy`` does not load jupyter_client.
"""

from __future__ import annotations

import importlib

# Not ``typing.TYPE_CHECKING``: importing typing would double what ``import
# sandkernel`` costs. Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandkernel.api import EngineAPI, SessionAPI
    from sandkernel.batch import FetchedFile, RunRequest, RunResult
    from sandkernel.config import EngineConfig
    from sandkernel.engine import Engine, EngineStats
    from sandkernel.errors import (
        BadInput,
        EngineClosed,
        FileLost,
        FileNotFoundInStore,
        FileRejected,
        FileTooLarge,
        HostUnreachable,
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
        SessionLost,
        SessionNotFound,
    )
    from sandkernel.files.names import listed_file_name, raw_file_name
    from sandkernel.files.store import StoredFile
    from sandkernel.kernel import SandboxedKernel
    from sandkernel.loop.formatting import format_result
    from sandkernel.loop.models import ChatModel, OpenAIChatModel
    from sandkernel.loop.run import LoopResult, run_loop
    from sandkernel.loop.tool import PYTHON_TOOL
    from sandkernel.policy import Policy, load_policy
    from sandkernel.results import DisplayOutput, ErrorInfo, ExecutionResult, ProducedFile, Usage
    from sandkernel.sandbox import SandboxHost
    from sandkernel.session import Session, SessionInfo, SessionState

#: Public name -> the module (under ``sandkernel.``) that defines it.
_WHERE: dict[str, str] = {
    "EngineAPI": "api",
    "SessionAPI": "api",
    "FetchedFile": "batch",
    "RunRequest": "batch",
    "RunResult": "batch",
    "EngineConfig": "config",
    "Engine": "engine",
    "EngineStats": "engine",
    "BadInput": "errors",
    "EngineClosed": "errors",
    "FileLost": "errors",
    "FileTooLarge": "errors",
    "HostUnreachable": "errors",
    "SessionLost": "errors",
    "FileNotFoundInStore": "errors",
    "FileRejected": "errors",
    "KernelDead": "errors",
    "KernelStartFailed": "errors",
    "ModelCallFailed": "errors",
    "PolicyError": "errors",
    "PoolExhausted": "errors",
    "SandboxUnavailable": "errors",
    "SandkernelError": "errors",
    "SelfCheckFailed": "errors",
    "SessionClosed": "errors",
    "SessionError": "errors",
    "SessionExpired": "errors",
    "SessionLimitReached": "errors",
    "SessionNotFound": "errors",
    "listed_file_name": "files.names",
    "raw_file_name": "files.names",
    "StoredFile": "files.store",
    "SandboxedKernel": "kernel",
    "format_result": "loop.formatting",
    "ChatModel": "loop.models",
    "OpenAIChatModel": "loop.models",
    "LoopResult": "loop.run",
    "run_loop": "loop.run",
    "PYTHON_TOOL": "loop.tool",
    "Policy": "policy",
    "load_policy": "policy",
    "DisplayOutput": "results",
    "ErrorInfo": "results",
    "ExecutionResult": "results",
    "ProducedFile": "results",
    "Usage": "results",
    "SandboxHost": "sandbox",
    "Session": "session",
    "SessionInfo": "session",
    "SessionState": "session",
}

__all__ = [
    "BadInput",
    "ChatModel",
    "DisplayOutput",
    "Engine",
    "EngineAPI",
    "EngineClosed",
    "EngineConfig",
    "EngineStats",
    "ErrorInfo",
    "ExecutionResult",
    "FetchedFile",
    "FileLost",
    "FileNotFoundInStore",
    "FileRejected",
    "FileTooLarge",
    "HostUnreachable",
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
    "SessionAPI",
    "SessionClosed",
    "SessionError",
    "SessionExpired",
    "SessionInfo",
    "SessionLimitReached",
    "SessionLost",
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


# Runtime only: a module ``__getattr__`` that type checkers saw would make
# every misspelt ``sandkernel.X`` type-check as Any. Written out rather than
# taken from ``sandkernel._lazy`` (which the subpackages use): ``import
# sandkernel`` loads no module of its own.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _WHERE.get(name)
        if module is None:
            raise AttributeError(f"module 'sandkernel' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"sandkernel.{module}"), name)
        # Later lookups find it in the module's namespace and no longer come here.
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
