"""SandboxFusion's models and runners, importable under their first name.

They live in :mod:`sandkernel.daemon.fusion`, next to the routes that serve
them; this module re-exports the same objects.
"""

from __future__ import annotations

from sandkernel.daemon.fusion import (
    MAX_TIMEOUT_S,
    MIN_MEMORY_MB,
    SUPPORTED_LANGUAGES,
    WORKSPACE_IN_JAIL,
    BadRequest,
    CellRunResult,
    CommandRunResult,
    CommandRunStatus,
    FusionInputError,
    RunCodeRequest,
    RunCodeResponse,
    RunJupyterRequest,
    RunJupyterResponse,
    RunStatus,
    cell_result,
    command_result,
    decode_files,
    relative_path,
    run_code,
    run_jupyter,
    workspace_path,
)

__all__ = [
    "MAX_TIMEOUT_S",
    "MIN_MEMORY_MB",
    "SUPPORTED_LANGUAGES",
    "WORKSPACE_IN_JAIL",
    "BadRequest",
    "CellRunResult",
    "CommandRunResult",
    "CommandRunStatus",
    "FusionInputError",
    "RunCodeRequest",
    "RunCodeResponse",
    "RunJupyterRequest",
    "RunJupyterResponse",
    "RunStatus",
    "cell_result",
    "command_result",
    "decode_files",
    "relative_path",
    "run_code",
    "run_jupyter",
    "workspace_path",
]
