"""SandboxFusion-compatible one-shot runs: ``/run_code`` and ``/run_jupyter``.

Grading and reward pipelines (verl among them) talk to a SandboxFusion server;
these are its request and response models, with the same fields, defaults and
status values, served by sandkernel: ``run_code`` on the batch path (sandboxed
fork servers), ``run_jupyter`` on a warm pooled kernel used once and destroyed.

Where SandboxFusion leaves a behaviour open, sandkernel's choice is noted:

* files (``path -> base64``) are written relative to the working directory
  (``/mnt/data`` for Jupyter); absolute paths and ``..`` are refused;
* ``fetch_files`` are fetched as SandboxFusion fetches them: relative to the
  working directory, or absolute inside a place the run can write (for
  ``run_code`` ``/tmp``, ``/dev/shm`` and ``/mnt/data``; for ``run_jupyter``
  the kernel's workspace ``/mnt/data``); any other path, like a missing file,
  is left out of ``files`` and the run's own result stands, and so is a file
  past 64 MiB of ``files`` in all (each name asked for counts);
* ``run_jupyter`` enforces ``cell_timeout`` (when > 0) and ``total_timeout``
  itself, and on a time-out also returns the cells that ran;
* ``memory_limit_MB`` (when > 0) lowers the sandbox's memory limit; it is
  capped by the engine's policy, never raised above it;
* numbers are strict: SandboxFusion's lax models take ``false`` for 0 and
  ``"10"`` for 10, which no client means; here they are refused (422), as
  are timeouts over a day and memory limits under 16 MB (no Python starts
  in less).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import posixpath
import time
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any, Literal

import anyio
from pydantic import BaseModel, Field, field_validator

from sandkernel.api import EngineAPI
from sandkernel.batch import RunRequest, RunResult
from sandkernel.batch.models import SETUP_FAILED
from sandkernel.errors import BadInput, FusionInputError
from sandkernel.limits import MAX_TIMEOUT_S as MAX_TIMEOUT_S  # a request's longest (a run's)
from sandkernel.results import ExecutionResult
from sandkernel.sandbox import WORKSPACE_IN_JAIL
from sandkernel.session import Session
from sandkernel.workspace import read_workspace_file, write_workspace_file

#: What ``run_code`` runs; SandboxFusion lists many more, which are refused by name.
SUPPORTED_LANGUAGES = ("python", "pytest")
#: The smallest memory limit a request may set, in MB (a one-shot run's smallest).
MIN_MEMORY_MB = 16
_MEMORY_SCHEMA: dict[str, Any] = {"anyOf": [{"maximum": 0}, {"minimum": MIN_MEMORY_MB}]}


def _timeout(default: float, description: str) -> Any:
    return Field(default, strict=True, le=MAX_TIMEOUT_S, description=description)


def _memory_limit() -> Any:
    return Field(
        -1,
        strict=True,
        json_schema_extra=_MEMORY_SCHEMA,
        description=f"maximum memory allowed in megabytes (<= 0: the policy's; else >= "
        f"{MIN_MEMORY_MB})",
    )


def _check_memory_limit(value: int) -> int:
    if 0 < value < MIN_MEMORY_MB:
        raise ValueError(
            f"memory_limit_MB must be at least {MIN_MEMORY_MB} (or <= 0 for the policy's limit)"
        )
    return value


#: Bytes of ``fetch_files`` one /run_jupyter request returns, in all: what /run_code
#: returns (``sandkernel.batch.DEFAULT_FETCH_MAX_BYTES``, not imported: the batch
#: pool's module is not needed here).
JUPYTER_FETCH_MAX_BYTES = 64 << 20


class CommandRunStatus(StrEnum):
    Finished = "Finished"
    Error = "Error"
    TimeLimitExceeded = "TimeLimitExceeded"


class RunStatus(StrEnum):
    Success = "Success"  # every command finished with return code 0
    Failed = "Failed"  # a non-zero return code or a time limit
    SandboxError = "SandboxError"  # the sandbox itself failed


class CommandRunResult(BaseModel):
    status: CommandRunStatus
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeRequest(BaseModel):
    compile_timeout: float = _timeout(10, "compile timeout for compiled languages")
    run_timeout: float = _timeout(10, "code run timeout (<= 0: the policy's)")
    memory_limit_MB: int = _memory_limit()
    code: str = Field(..., examples=['print("hello")'], description="the code to run")
    stdin: str | None = Field(None, examples=[""], description="optional string for stdin")
    language: str = Field(..., examples=["python"], description="language or execution mode")
    files: dict[str, str | None] = Field(
        default_factory=dict, description="a dict from file path to base64 encoded content"
    )
    fetch_files: list[str] = Field(
        default_factory=list, description="a list of file paths to fetch after execution"
    )
    args: list[str] = Field(
        default_factory=list, description="additional command-line arguments passed to pytest"
    )

    _memory = field_validator("memory_limit_MB")(_check_memory_limit)


class RunCodeResponse(BaseModel):
    status: RunStatus
    message: str
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


class RunJupyterRequest(BaseModel):
    cells: list[str] = Field(..., description="list of code blocks to run in jupyter notebook")
    cell_timeout: float = _timeout(0, "max run time for each of the cells (<= 0: none)")
    total_timeout: float = _timeout(45, "max run time for all the cells")
    memory_limit_MB: int = _memory_limit()
    kernel: Literal["python3"] = "python3"
    files: dict[str, str] = Field(
        default_factory=dict, description="a dict from file path to base64 encoded content"
    )
    fetch_files: list[str] = Field(
        default_factory=list, description="a list of file paths to fetch after code execution"
    )

    _memory = field_validator("memory_limit_MB")(_check_memory_limit)


class CellRunResult(BaseModel):
    stdout: str
    stderr: str
    display: list[dict[str, Any]]
    error: list[dict[str, Any]]


class RunJupyterResponse(BaseModel):
    status: RunStatus
    message: str
    driver: CommandRunResult | None = None
    cells: list[CellRunResult] = Field(default_factory=list)
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


#: The error of a request whose files cannot be used (its name before the tree was one).
BadRequest = FusionInputError


def relative_path(path: str) -> str:
    """A request's file path as a safe relative path (no absolute paths, no ``..``)."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\x00" in path:
        raise FusionInputError(f"file path {path!r} must be relative and must not contain '..'")
    if str(pure) == ".":
        raise FusionInputError(f"file path {path!r} names no file")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise FusionInputError(f"file path {path!r} is not valid UTF-8") from None
    return str(pure)


def workspace_path(path: str) -> str | None:
    """A fetched path in a kernel's workspace (``/mnt/data``), relative; None if outside it."""
    if not path or "\x00" in path:
        return None
    full = posixpath.normpath(posixpath.join(str(WORKSPACE_IN_JAIL), path))
    prefix = f"{WORKSPACE_IN_JAIL}/"
    return full[len(prefix) :] if full.startswith(prefix) else None


def decode_files(files: dict[str, str | None]) -> dict[str, bytes]:
    """``path -> base64`` to ``relative path -> bytes``, as SandboxFusion writes them.

    As there, a file whose content is not a string (``null``) or whose path
    holds ``IGNORE_THIS_FILE`` is not written, and base64 broken into lines
    (76 columns, as ``base64.encodebytes`` writes it) is base64.
    """
    decoded = {}
    for path, content in files.items():
        if not isinstance(content, str) or "IGNORE_THIS_FILE" in path:
            continue
        relative = relative_path(path)
        try:
            decoded[relative] = base64.b64decode("".join(content.split()), validate=True)
        except (binascii.Error, ValueError):
            raise FusionInputError(f"file {path!r}: content is not valid base64") from None
    return decoded


def cell_result(result: ExecutionResult) -> CellRunResult:
    """One executed cell in SandboxFusion's shape (display includes the cell's value)."""
    display = [d.data for d in result.displays]
    if result.value is not None:
        display.append(result.value.data)
    errors = []
    if result.error is not None:
        errors.append(
            {
                "ename": result.error.name,
                "evalue": result.error.value,
                "traceback": result.error.traceback.splitlines(),
            }
        )
    return CellRunResult(stdout=result.stdout, stderr=result.stderr, display=display, error=errors)


def _pytest_main(test_file: str) -> str:
    """The program that runs pytest on ``test_file``, as SandboxFusion's pytest runner does."""
    # `raise SystemExit`, not `sys.exit`: a test file's anti-exit header
    # (`sys.exit = None`) must not turn a green run into a failure.
    return (
        "import sys\nimport pytest\n"
        "raise SystemExit(\n"
        f"    pytest.main(['-q', '-p', 'no:cacheprovider', {test_file!r}, *sys.argv[1:]])\n"
        ")\n"
    )


def _free_name(name: str, files: dict[str, bytes]) -> str:
    """``name``, or ``<stem>_<n>.py`` if the request's files have it.

    SandboxFusion names its program and test files at random, so a request's
    own files can have any name, ``main.py`` included.
    """
    stem = name.removesuffix(".py")
    number = 0
    while name in files:
        number += 1
        name = f"{stem}_{number}.py"
    return name


def command_result(result: RunResult) -> CommandRunResult:
    """A batch-path result as SandboxFusion's ``run_result``."""
    status = (
        CommandRunStatus.TimeLimitExceeded if result.status == "timeout"
        else CommandRunStatus.Finished
    )  # fmt: skip
    return_code = result.return_code
    if status is CommandRunStatus.TimeLimitExceeded:
        return_code = None  # SandboxFusion reports none for a run it stopped
    elif return_code is None:
        return_code = 137 if result.status in ("oom", "killed") else 1
    stderr = result.stderr
    if result.message and result.status in ("oom", "killed"):
        separator = "" if not stderr or stderr.endswith("\n") else "\n"
        stderr = f"{stderr}{separator}{result.message}"
    return CommandRunResult(
        status=status,
        execution_time=round(result.execution_time_s, 6),
        return_code=return_code,
        stdout=result.stdout,
        stderr=stderr,
    )


async def run_code(
    engine: EngineAPI, request: RunCodeRequest, *, pod_name: str | None = None
) -> RunCodeResponse:
    """Run a ``/run_code`` request once on the batch path (a fresh sandboxed fork)."""
    if request.language not in SUPPORTED_LANGUAGES:
        return RunCodeResponse(
            status=RunStatus.SandboxError,
            message=f"language {request.language!r} is not supported by this server; "
            f"supported: {', '.join(SUPPORTED_LANGUAGES)}",
            executor_pod_name=pod_name,
        )
    try:
        files = decode_files(request.files)
    except FusionInputError as exc:
        return RunCodeResponse(status=RunStatus.SandboxError, message=str(exc),
                               executor_pod_name=pod_name)  # fmt: skip
    code, argv = request.code, []
    if request.language == "pytest":
        # The request's own files keep their names: the test file and the program
        # that runs it take names none of them has.
        test_file = _free_name("test_main.py", files)
        try:
            files[test_file] = request.code.encode()
        except UnicodeEncodeError:
            return RunCodeResponse(
                status=RunStatus.SandboxError,
                message="code: text with a lone surrogate cannot be written as UTF-8 "
                "(pytest reads it from a file)",
                executor_pod_name=pod_name,
            )
        code, argv = _pytest_main(test_file), list(request.args)
    try:
        run = RunRequest.program(
            code,
            stdin=request.stdin,
            files=files,
            fetch_files=request.fetch_files,
            argv=argv,
            timeout_s=request.run_timeout if request.run_timeout > 0 else None,
            memory_mb=request.memory_limit_MB if request.memory_limit_MB > 0 else None,
            filename=_free_name("main.py", files),
        )
    except BadInput as exc:
        # Input no run can be given (stdin with a lone surrogate, which JSON's
        # "\ud800" parses to): a request that cannot run, which SandboxFusion
        # answers so, as a bad file path above. The message names the field;
        # "run_once" is not this route's name.
        return RunCodeResponse(status=RunStatus.SandboxError,
                               message=str(exc).removeprefix("run_once: "),
                               executor_pod_name=pod_name)  # fmt: skip
    result = [r async for r in engine.run_many([run], concurrency=1)][0]
    if result.setup_failed:
        # The code never ran: SandboxFusion answers a run it could not set up
        # so, with no run_result, and the message says why.
        return RunCodeResponse(status=RunStatus.SandboxError, message=result.message or "",
                               executor_pod_name=pod_name)  # fmt: skip
    run_result = command_result(result)
    ok = run_result.status is CommandRunStatus.Finished and run_result.return_code == 0
    return RunCodeResponse(
        status=RunStatus.Success if ok else RunStatus.Failed,
        message="",
        run_result=run_result,
        executor_pod_name=pod_name,
        files={f.path: base64.b64encode(f.content).decode() for f in result.files},
    )


async def run_jupyter(
    engine: EngineAPI, request: RunJupyterRequest, *, pod_name: str | None = None
) -> RunJupyterResponse:
    """Run the cells in a fresh warm kernel, fetch files, destroy the kernel."""
    started = time.monotonic()
    try:
        files = decode_files(dict(request.files))
    except FusionInputError as exc:
        return RunJupyterResponse(status=RunStatus.SandboxError, message=str(exc),
                                  executor_pod_name=pod_name)  # fmt: skip
    session = await engine.session()
    try:
        # The workspace and cgroup are reached on this machine: only the
        # embedded engine's sessions have them here (a cluster's live on its
        # nodes, a daemon's behind its socket).
        kernel = session.kernel if isinstance(session, Session) else None
        if kernel is None:
            return RunJupyterResponse(
                status=RunStatus.SandboxError,
                message="run_jupyter needs an engine on this machine (this one serves a Ray "
                "cluster): use /run_code, or a daemon started without --ray",
                executor_pod_name=pod_name,
            )
        workspace = kernel.workspace
        if request.memory_limit_MB > 0:
            try:
                kernel.cgroup.lower_memory_limit(request.memory_limit_MB << 20)
            except OSError as exc:
                # cgroup v1 refuses (EBUSY) a limit below what the kernel already uses.
                return RunJupyterResponse(
                    status=RunStatus.SandboxError,
                    message=f"memory_limit_MB={request.memory_limit_MB} cannot be set: the "
                    f"kernel already uses more ({exc.strerror}); give a larger limit, or -1 "
                    "for the policy's",
                    executor_pod_name=pod_name,
                )
        try:
            for path, data in files.items():
                await asyncio.to_thread(write_workspace_file, workspace, path, data)
        except (OSError, ValueError) as exc:  # a name no file system takes, a file in a file
            return RunJupyterResponse(
                status=RunStatus.SandboxError,
                message=f"{SETUP_FAILED}: {exc}",
                executor_pod_name=pod_name,
            )
        cells: list[CellRunResult] = []
        deadline = started + request.total_timeout
        status = CommandRunStatus.Finished
        for code in request.cells:
            remaining = deadline - time.monotonic()
            timeout = (
                remaining if request.cell_timeout <= 0 else min(remaining, request.cell_timeout)
            )
            if timeout <= 0:
                status = CommandRunStatus.TimeLimitExceeded
                break
            result = await session.run(code, timeout_s=timeout)
            cells.append(cell_result(result))
            if result.status == "timeout":
                status = CommandRunStatus.TimeLimitExceeded
                break
            if result.status in ("oom", "dead", "killed"):
                status = CommandRunStatus.Error
                break
        fetched: dict[str, str] = {}
        # Under each name asked for (SandboxFusion's clients look them up so), each
        # read once, and no more in all than /run_code returns: a name past what is
        # left is not returned, so that naming one file many times cannot grow the answer.
        left, read = JUPYTER_FETCH_MAX_BYTES, {}
        for path in request.fetch_files:
            rel = workspace_path(path)
            if rel is None:
                continue
            if rel not in read:
                read[rel] = await asyncio.to_thread(read_workspace_file, workspace, rel, left)
            content = read[rel]
            if content is not None and len(content) <= left:
                left -= len(content)
                fetched[path] = base64.b64encode(content).decode()
    finally:
        # Also when the request is cancelled (its client went): closed whole.
        with anyio.CancelScope(shield=True):
            await session.close()
    driver = CommandRunResult(
        status=status, execution_time=round(time.monotonic() - started, 6), return_code=0
    )
    if status is CommandRunStatus.Finished:
        return RunJupyterResponse(
            status=RunStatus.Success, message="", driver=driver, cells=cells, files=fetched,
            executor_pod_name=pod_name,
        )  # fmt: skip
    why = {
        CommandRunStatus.TimeLimitExceeded: "time limit exceeded",
        CommandRunStatus.Error: "the kernel died (out of memory or crashed)",
    }[status]
    return RunJupyterResponse(status=RunStatus.Failed, message=why, driver=driver, cells=cells,
                              files=fetched, executor_pod_name=pod_name)  # fmt: skip


__all__ = [
    "SUPPORTED_LANGUAGES",
    "WORKSPACE_IN_JAIL",
    "BadRequest",
    "FusionInputError",
    "CellRunResult",
    "CommandRunResult",
    "CommandRunStatus",
    "RunCodeRequest",
    "RunCodeResponse",
    "RunJupyterRequest",
    "RunJupyterResponse",
    "RunStatus",
    "cell_result",
    "decode_files",
    "relative_path",
    "command_result",
    "run_code",
    "run_jupyter",
]
