"""One batch worker: a sandbox running the fork server, fed requests over a pipe.

The pool's internals: :class:`Worker` starts one nsjail running
``kernels/runtime/forkserver.py``, writes request frames to its stdin as they
are submitted and matches the replies on its stdout to them; a timer kills a
server that does not answer its current request in time. When the sandbox
dies, hangs or breaks the protocol, every request still outstanding fails
with :class:`WorkerLost`, blamed only on the one that was running.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandkernel._resources import data_dir
from sandkernel.batch.frames import LENGTH_SIZE, Reply, decode_frame_body, frame_body_size
from sandkernel.sandbox import RUNTIME_IN_JAIL, Jail, SandboxHost
from sandkernel.sandbox.cgroups import UsageReader
from sandkernel.sandbox.runtime import write_bytecode

if TYPE_CHECKING:
    # Not imported with the worker: a fork server can be spawned before the
    # policy model is loaded (prestart.py).
    from sandkernel.policy import Policy

#: After a request's own time limit, how long the server may take to clean
#: up and answer before the worker is considered hung and replaced.
_ANSWER_GRACE_S = 10.0
#: The script that starts the server from its bytecode, and the modules it loads.
_SERVER = "start_forkserver.py"
_SERVER_MODULES = ("forkserver.py", "frames.py", "immortal.py")
#: Modules the fork server imports before it forks: what typical benchmark
#: programs import (HumanEval's prompts and tests use these), so that a child
#: does not pay for importing them. Each adds pages a child may have to copy.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "typing", "math", "re", "collections", "itertools", "functools", "string",
    "random", "copy", "hashlib", "heapq", "bisect",
)  # fmt: skip
#: Requests a fork server answers before it makes its objects immortal
#: (``forkserver.py``'s ``_immortalize``: about 8 ms of its CPU, once, for
#: about 0.3 ms less per program after): a short evaluation never waits for
#: it, a long one gains from the next program on.
IMMORTAL_AFTER = 8
#: A check's verdict as the server keeps it (forkserver.py's _STATUS_MAX).
_VERDICT_MAX_CHARS = 4 << 20
#: A reply's header beyond what it echoes of its request (the ready frame's
#: whole size too).
_HEADER_SLACK_BYTES = 1 << 20


@functools.cache
def _write_server_bytecode() -> None:
    """The server's bytecode, written once per process (a check of two headers after that)."""
    folder = data_dir("kernels") / "runtime"
    write_bytecode(*(folder / name for name in _SERVER_MODULES))


class WorkerLost(Exception):
    """The worker's sandbox died, hung, broke the protocol or was stopped.

    ``blamed``: the request was running (or next to run) when it happened;
    requests still queued behind it were never started and are not to blame.
    """

    def __init__(self, reason: str, *, blamed: bool, oom: bool = False) -> None:
        super().__init__(reason)
        self.blamed = blamed
        self.oom = oom


class OomKillLedger:
    """Which run each OOM kill the worker's cgroup counts is credited to (sans-IO).

    The fallback: the server reads the count itself before and after each
    run, which settles it, where the engine could pass it the count's file
    (a reply's ``oom_kills``). Without it, and for the requests of a
    sandbox that died, the engine credits kills from its own reads:

    The count is read as each reply is handled, and with requests pipelined
    the server can be well into the runs queued behind by then: a kill new at
    that read is the replying run's or one of the runs sent after it, and the
    count alone cannot tell which. So a kill waits until a run that can own
    it claims it: one whose process died of a SIGKILL the server did not send
    (the OOM killer's signal; the server sends SIGKILL only at a timeout, and
    says so, as it says when the kernel sent it at the run's CPU limit). A
    kill no run claims is dropped once every run sent when it was counted has
    replied: it took a run's subprocess and the run lived on, which its own
    result already shows.

    Runs are numbered from 1 in the order they are sent.
    """

    def __init__(self) -> None:
        #: the cgroup's count at the last read (a fresh cgroup's is 0)
        self._count = 0
        self._replied = 0
        #: kills not credited yet, oldest first: [the last run that can own them, how many]
        self._unclaimed: deque[list[int]] = deque()

    def counted(self, count: int | None, sent: int) -> None:
        """The cgroup's count read now, when ``sent`` runs have been sent to the server."""
        if count is None:
            # Unreadable now: keep the baseline, so that a count read again
            # later is not taken for new kills.
            return
        # With every run sent answered (the server's start), a kill is no run's.
        if count > self._count and sent > self._replied:
            self._unclaimed.append([sent, count - self._count])
        self._count = count

    def replied(self, *, killed_unasked: bool) -> bool:
        """The next run replied; whether it is credited with an OOM kill.

        ``killed_unasked``: its process died of a SIGKILL neither the server
        nor the run's CPU limit sent.
        """
        self._replied += 1
        credited = False
        if killed_unasked and self._unclaimed:
            # Every kill still here can be this run's; the oldest is the one
            # the fewest later runs can claim.
            oldest = self._unclaimed[0]
            oldest[1] -= 1
            if not oldest[1]:
                self._unclaimed.popleft()
            credited = True
        while self._unclaimed and self._unclaimed[0][0] <= self._replied:
            self._unclaimed.popleft()
        return credited

    def unclaimed(self) -> bool:
        """Whether a kill not credited yet can be the run in progress (the next to reply)."""
        return bool(self._unclaimed)


@dataclass(frozen=True)
class ServerSettings:
    """What a fork server is told when it starts, beside its jail's policy: its ``argv``."""

    python: str
    preload: tuple[str, ...]
    file_size_mb: int
    nofile: int
    output_max_bytes: int
    fetch_max_bytes: int

    def argv(self, oom_kills_fd: int | None) -> list[str]:
        """The server's command in the jail, given the descriptor it reads OOM kills from."""
        server_config = {
            "preload": list(self.preload),
            "file_size_mb": self.file_size_mb,
            "nofile": self.nofile,
            "output_max_bytes": self.output_max_bytes,
            "fetch_max_bytes": self.fetch_max_bytes,
            "immortal_after": IMMORTAL_AFTER,
            "oom_kills_fd": oom_kills_fd,
        }
        return [self.python, "-s", f"{RUNTIME_IN_JAIL}/{_SERVER}", json.dumps(server_config)]


@dataclass
class WorkerConfig:
    """What every worker of a pool is started with."""

    host: SandboxHost
    policy: Policy
    preload: tuple[str, ...]
    output_max_bytes: int
    fetch_max_bytes: int
    start_timeout_s: float

    def settings(self) -> ServerSettings:
        return ServerSettings(
            python=self.host.runtime.python,
            preload=self.preload,
            file_size_mb=self.policy.file_size_mb,
            nofile=self.policy.nofile,
            output_max_bytes=self.output_max_bytes,
            fetch_max_bytes=self.fetch_max_bytes,
        )


@dataclass
class SpawnedServer:
    """A fork server's jail, spawned and booting: the ends of its pipes, and what it runs."""

    jail: Jail
    #: the server's stdin and stdout, the engine's ends (non-blocking)
    request_fd: int
    reply_fd: int
    #: its cgroup's counters, kept open
    usage: UsageReader
    argv: list[str]
    pass_fds: tuple[int, ...]
    config_text: str

    def close(self) -> None:
        """Close the engine's ends (the jail is its owner's to stop and destroy)."""
        for fd in (self.request_fd, self.reply_fd):
            os.close(fd)
        self.usage.close()


def spawn_server(
    jail: Jail,
    settings: ServerSettings,
    render: Callable[[list[str], tuple[int, ...]], str],
) -> SpawnedServer:
    """Start the fork server in ``jail`` (prepared), its config ``render(argv, pass_fds)``.

    Raises what the start or ``render`` raised, having closed what it opened.
    """
    _write_server_bytecode()
    # Kept open: the count is read after every reply (one pread, not an open).
    usage = UsageReader(jail.cgroup)
    opened: list[int] = []
    try:
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        opened += (request_r, request_w)
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        opened += (reply_r, reply_w)
        # The server reads the sandbox's OOM-kill count before and after each
        # run, through a descriptor of its own: a kill counted in between is
        # that run's, which the engine's reads cannot tell with the next run
        # already under way (OomKillLedger is what it falls back on).
        oom_kills_fd = usage.open_oom_kills()
        pass_fds = () if oom_kills_fd is None else (oom_kills_fd,)
        opened += pass_fds
        argv = settings.argv(oom_kills_fd)
        config_text = render(argv, pass_fds)
        jail.spawn(
            argv, stdin=request_r, stdout=reply_w, pass_fds=pass_fds, config_text=config_text
        )
    except BaseException:
        for fd in opened:
            os.close(fd)
        usage.close()
        raise
    for fd in (request_r, reply_w, *pass_fds):
        os.close(fd)
    os.set_blocking(request_w, False)
    os.set_blocking(reply_r, False)
    return SpawnedServer(jail, request_w, reply_r, usage, argv, pass_fds, config_text)


@dataclass
class _Pending:
    limit_s: float
    future: asyncio.Future[Reply]
    #: no reply to this request is larger (see Worker.submit)
    reply_max_bytes: int
    #: its caller gave up while it was queued: ended when its turn comes
    abandoned: bool = False


class Worker:
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
        config: WorkerConfig,
        on_slot_free: Callable[[], None],
        on_lost: Callable[[Worker], None],
        *,
        on_spawned: Callable[[], None] | None = None,
        spawned: SpawnedServer | None = None,
    ) -> None:
        self.config = config
        #: a server spawned already, checked against ``config`` by its caller
        self._spawned = spawned
        self.jail = spawned.jail if spawned is not None else Jail(config.host, config.policy)
        self.kernel_id = self.jail.kernel_id
        self.request_fd = -1
        self.reply_fd = -1
        self.hello: dict[str, Any] = {}
        #: the server was passed a descriptor to read its sandbox's OOM kills from
        self.oom_kills_fd = False
        self.served = 0
        #: taking requests: started, not lost, not stopping
        self.accepting = False
        self.outstanding: deque[_Pending] = deque()
        self._on_slot_free = on_slot_free
        self._on_lost = on_lost
        self._on_spawned = on_spawned
        self._buffer = bytearray()
        self._unsent = bytearray()
        self._oom = OomKillLedger()
        self._usage: UsageReader | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hung = False
        self._stopping = False
        self._stopped = False

    # -- start -------------------------------------------------------------

    async def start(self) -> None:
        if self._spawned is None:
            try:
                await self.jail.prepare()  # undone if cancelled meanwhile
            except asyncio.CancelledError:
                self._stopping = True
                raise
        async with self.jail.starting("batch worker", self.stop):
            await self._launch()
        self._reader = asyncio.ensure_future(self._read_replies())
        self.accepting = True

    async def _launch(self) -> None:
        server, self._spawned = self._spawned, None
        if server is None:
            jail = self.jail
            server = spawn_server(
                jail,
                self.config.settings(),
                lambda argv, pass_fds: jail.render(argv, pass_fds=pass_fds),
            )
        self.request_fd, self.reply_fd = server.request_fd, server.reply_fd
        self.oom_kills_fd = bool(server.pass_fds)
        self._usage = server.usage
        if self._on_spawned is not None:
            self._on_spawned()  # while the sandbox boots
        header, _ = await self._read_frame(
            time.monotonic() + self.config.start_timeout_s, lambda: _HEADER_SLACK_BYTES
        )
        if not header.get("ready"):
            raise WorkerLost(f"unexpected first frame from the server: {header}", blamed=False)
        self.hello = header
        self._count_oom_kills()  # the baseline: what the server's start cost is no run's

    def preload_failures(self) -> dict[str, str]:
        """The ``preload`` modules the server could not import, each with why (as it said)."""
        failed = self.hello.get("failed")
        if not isinstance(failed, dict):
            return {}
        return {m: str(failed[m]) for m in self.config.preload if m in failed}

    # -- requests ------------------------------------------------------------

    def submit(self, frame: bytes, limit_s: float) -> asyncio.Future[Reply]:
        """Queue a request frame; the future gets its reply or a WorkerLost."""
        loop = asyncio.get_running_loop()
        # A reply holds at most two capped outputs and the fetched files, and a
        # header with a check's verdict and what it echoes of the request (its
        # paths, in one list or another), each character at most 6 bytes of
        # JSON: a larger frame is not the server's reply, and is not read into
        # the engine's memory. (Generous: a bound, not a size.)
        config = self.config
        blobs = 2 * config.output_max_bytes + config.fetch_max_bytes
        header = 6 * (_VERDICT_MAX_CHARS + 2 * len(frame)) + _HEADER_SLACK_BYTES
        pending = _Pending(limit_s, loop.create_future(), blobs + header)
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
                header, blobs = await self._read_frame(None, self._reply_bound)
                if not self.outstanding:
                    reason = "the server answered a request it was not sent"
                    break
                if "error" in header:
                    reason = f"the server failed: {header['error']}"
                    break
                pending = self.outstanding.popleft()
                self._arm_timer()
                self.served += 1
                if self.outstanding and self.outstanding[0].abandoned:
                    # Its caller is gone and the server has just started it: end it
                    # (it takes the blame; what is queued behind runs elsewhere).
                    self.kill()
                # Read after every reply, not only a killed run's: what each read
                # adds can only be a run still in flight then (OomKillLedger).
                self._count_oom_kills()
                killed_unasked = (
                    header.get("signal") == signal.SIGKILL
                    and not header.get("timed_out")
                    and not header.get("cpu_limited")
                )
                credited = self._oom.replied(killed_unasked=killed_unasked)
                # The server's count around the run, where it could read one.
                during = header.get("oom_kills")
                header["oom_killed"] = (
                    credited if not isinstance(during, int) else killed_unasked and during > 0
                )
                if not pending.future.done():
                    pending.future.set_result((header, blobs))
                if header.get("restart"):
                    # The server exits after this reply; what is queued behind
                    # it never started.
                    reason = f"the server restarts: {header['restart']}"
                    head_blamed = False
                    break
                self._on_slot_free()
        except WorkerLost as lost:
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
                self._count_oom_kills()
                oom = self._oom.unclaimed()
            blamed = head_blamed and not self._stopping
            while self.outstanding:
                pending = self.outstanding.popleft()
                if not pending.future.done():
                    pending.future.set_exception(WorkerLost(reason, blamed=blamed, oom=oom))
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
            raise WorkerLost("the server did not start in time", blamed=False) from None
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
                raise WorkerLost("the sandbox is gone", blamed=True)
            self._buffer += chunk

    def _reply_bound(self) -> int:
        # Asked once a frame's length has come, not before the wait for it:
        # an idle worker waits for the reply of a request not sent yet.
        # (With none outstanding, whatever comes is refused after it is read.)
        return self.outstanding[0].reply_max_bytes if self.outstanding else _HEADER_SLACK_BYTES

    async def _read_frame(self, deadline: float | None, max_bytes: Callable[[], int]) -> Reply:
        await self._fill(LENGTH_SIZE, deadline)
        size = frame_body_size(self._buffer)
        if size > max_bytes():
            # Not read: the engine's memory is not the sandbox's to fill.
            raise WorkerLost(
                f"the server sent a frame of {size} bytes, more than any of its replies",
                blamed=True,
            )
        end = LENGTH_SIZE + size
        await self._fill(end, deadline)
        body = bytes(self._buffer[LENGTH_SIZE:end])
        del self._buffer[:end]
        return decode_frame_body(body)

    def _count_oom_kills(self) -> None:
        """Read the cgroup's OOM-kill count into the ledger (one ``pread``)."""
        count = None if self._usage is None else self._usage.oom_kills()
        self._oom.counted(count, self.served + len(self.outstanding))

    # -- shutdown ------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the whole sandbox now (its cgroup); :meth:`stop` still cleans up."""
        self.jail.kill()

    def abandon(self, future: asyncio.Future[Reply]) -> None:
        """Its caller gave up on the request behind ``future``: end it, not another.

        The request running now is ended with its sandbox; one queued behind
        another caller's is ended when its turn comes, so the request running
        now, someone else's, is neither killed nor blamed.
        """
        for i, pending in enumerate(self.outstanding):
            if pending.future is future:
                if i == 0:
                    self.kill()
                else:
                    pending.abandoned = True
                return

    async def stop(self, *, grace_s: float = 1.0) -> None:
        """End the server (EOF on its stdin, then SIGKILL) and remove every trace.

        Requests still outstanding fail with an unblamed WorkerLost.
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
            # The server exits at EOF on its stdin: no SIGTERM.
            await self.jail.stop(grace_s, terminate=False)
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
        finally:
            if self.reply_fd >= 0:
                os.close(self.reply_fd)
                self.reply_fd = -1
            if self._usage is not None:
                self._usage.close()
                self._usage = None
            await self.jail.destroy()
