"""One sandboxed kernel: start, execute, interrupt, self-check, shut down.

A :class:`SandboxedKernel` is single-use: it serves one session and is then
destroyed. ``execute`` never raises for what user code does; it returns an
:class:`~sandkernel.results.ExecutionResult` whose ``status`` says whether
the cell finished, failed, timed out, ran out of memory or killed its kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import zmq
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandkernel._resources import data_dir
from sandkernel._tasks import wait_out
from sandkernel.errors import BadInput, KernelDead, KernelStartFailed, SelfCheckFailed
from sandkernel.limits import MAX_TIMEOUT_S, check_code_text
from sandkernel.messages import MessageSession
from sandkernel.policy import Policy
from sandkernel.provisioner import IPC_NAME, SandboxProvisioner
from sandkernel.results import (
    DisplayOutput,
    ErrorInfo,
    ExecutionResult,
    Status,
    Usage,
    strip_ansi,
)
from sandkernel.sandbox import (
    SELF_CHECK_PROBE,
    CgroupUsage,
    Jail,
    KernelCgroup,
    SandboxHost,
    verify_cgroup_limits,
    verify_isolation_report,
)
from sandkernel.sandbox.cgroups import UsageReader
from sandkernel.sandbox.zygote import Zygote, verify_forked

KERNEL_NAME = "sandkernel-python"
_POLL_S = 0.2  # how often a waiting execute checks that the kernel still lives
_IOPUB_BATCH = 64  # IOPub messages taken at once before the event loop runs again
#: The most a cell keeps of its displays and value, in the bytes the kernel sent.
_DISPLAY_MAX_BYTES = 32 << 20
#: The largest IOPub message the engine parses. A larger one (a display or
#: value beyond what a cell keeps, a stream message past its cap many times
#: over) is counted as cut from its size, its header and parent alone read:
#: parsing a 200 MiB display held the engine's event loop for seconds, and
#: its memory grew by a gigabyte.
_IOPUB_PARSE_MAX_BYTES = _DISPLAY_MAX_BYTES + (64 << 10)
#: The most an oversized message's header or parent header may take.
_HEADER_MAX_BYTES = 64 << 10
_DELIM = b"<IDS|MSG>"  # jupyter_client's: the routing ids end here
#: How long a cell whose reply has come may go without an IOPub message before
#: its idle status counts as lost (zmq drops what queues past its limit, as
#: PUB/SUB does, when the engine falls far behind a kernel's output).
_IDLE_LOST_S = 3.0
#: how long an interrupt waits for the kernel to say it has signalled itself
_INTERRUPT_ACK_S = 1.0

#: A cell's end when its kernel is shut down under it: a result, not an error.
_SHUT_DOWN: tuple[Status, str] = (
    "killed",
    "the kernel was shut down while the cell ran (session closed or engine stopped)",
)

#: Optional callback fed each iopub message of a cell as it arrives (streaming).
OutputCallback = Callable[[dict[str, Any]], None]

#: Starts a line the set-up cell prints on stderr for a prewarm module it could not
#: import (``PREWARM_FAILED`` in ``kernels/runtime/_sandkernel_setup.py``).
_PREWARM_FAILED = "sandkernel-prewarm-failed:"


def _set_up_cell(self_check: bool, modules: Sequence[str]) -> str:
    """The set-up cell: one line that binds no name and shows no value.

    The runtime's function does the work (``_sandkernel_setup.set_up``,
    imported before the kernel started): the self-check's report if
    ``self_check``, the imports of ``modules``, the warm-up. One short
    statement for IPython to transform and compile in each new kernel,
    however many modules.
    """
    return f"__import__('_sandkernel_setup').set_up({self_check!r}, {list(modules)!r})"


def _prewarm_failures(stderr: str) -> dict[str, str]:
    """Module -> why, for each prewarm import the set-up cell could not make."""
    failed = {}
    for line in stderr.splitlines():
        if line.startswith(_PREWARM_FAILED):
            module, _, why = line[len(_PREWARM_FAILED) :].strip().partition(": ")
            failed[module] = why
    return failed


class _Capped:
    """A text stream kept within ``limit`` bytes of UTF-8: the head and the tail survive.

    Counted in bytes, not characters, so a flood of 4-byte characters keeps no
    more than a flood of ASCII. A character cut at either edge is dropped; a
    lone surrogate becomes ``?``.
    """

    def __init__(self, limit: int) -> None:
        self.half = max(1, limit // 2)
        self.head: list[str] = []
        self.head_len = 0
        self.tail = b""
        self.dropped = 0

    def add(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        if self.head_len < self.half:
            room = self.half - self.head_len
            if len(data) <= room:
                self.head.append(text)
                self.head_len += len(data)
                return
            take = data[:room].decode("utf-8", "ignore")
            self.head.append(take)
            self.head_len = self.half  # a cut character's bytes stay unused
            data = data[len(take.encode("utf-8", "replace")) :]
        joined = self.tail + data
        if len(joined) > self.half:
            self.dropped += len(joined) - self.half
            joined = joined[-self.half :]
        self.tail = joined

    def add_cut(self, head: str, nbytes: int, tail: str) -> None:
        """Text of which only ``head`` and ``tail`` were read, about ``nbytes`` cut between."""
        self.add(head)
        self.head_len = max(self.head_len, self.half)  # nothing after the cut goes before it
        self.dropped += nbytes
        self.add(tail)

    def clear(self) -> None:
        self.head, self.head_len, self.tail, self.dropped = [], 0, b"", 0

    def value(self) -> tuple[str, bool]:
        head = "".join(self.head)
        tail = self.tail.decode("utf-8", "ignore")
        if not self.dropped:
            return head + tail, False
        note = f"\n[... {self.dropped} bytes cut ...]\n"
        return head + note + tail, True


class _CellOutput:
    """Folds a cell's iopub messages into the parts of an ExecutionResult."""

    def __init__(self, output_max_bytes: int) -> None:
        self.stdout = _Capped(output_max_bytes)
        self.stderr = _Capped(output_max_bytes)
        self.displays: list[DisplayOutput] = []
        self.display_bytes = 0
        self.displays_truncated = False
        self.value: DisplayOutput | None = None
        self.error: ErrorInfo | None = None
        self.execution_count: int | None = None
        self.idle = False

    def add(self, msg: dict[str, Any], size: int) -> None:
        """Fold in one message; ``size``: its content's bytes as the kernel sent them."""
        kind = msg["msg_type"]
        content = msg["content"]
        if kind == "stream":
            target = self.stdout if content.get("name") == "stdout" else self.stderr
            target.add(content.get("text", ""))
        elif kind in ("display_data", "update_display_data"):
            if not self._fits(size):
                return
            self.displays.append(
                DisplayOutput(data=content.get("data", {}), metadata=content.get("metadata", {}))
            )
        elif kind == "execute_result":
            self.execution_count = content.get("execution_count")
            if self._fits(size):
                self.value = DisplayOutput(
                    data=content.get("data", {}), metadata=content.get("metadata", {})
                )
        elif kind == "error":
            self.error = ErrorInfo(
                name=content.get("ename", ""),
                value=content.get("evalue", ""),
                traceback=strip_ansi("\n".join(content.get("traceback", []))),
            )
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count")
        elif kind == "clear_output":
            self.stdout.clear()
            self.stderr.clear()
            self.displays.clear()
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True

    def cut(self, kind: str, content: bytes | memoryview) -> None:
        """Count a message too large to parse as cut; ``content``: its content frame."""
        size = len(content)
        if kind == "stream":
            # ipykernel sends a stream's name first: {"name": "stderr", "text": ...}.
            target = self.stderr if b'"stderr"' in bytes(content[:64]) else self.stdout
            head, tail = _text_ends(content, target.half)
            target.add_cut(head, size - len(head) - len(tail), tail)
        elif kind in ("display_data", "update_display_data", "execute_result"):
            self.displays_truncated = True
        elif kind == "error":
            self.error = ErrorInfo(
                name="", value=f"[an error of {size} bytes, too large to read]", traceback=""
            )

    def _fits(self, size: int) -> bool:
        """Whether a display or value of ``size`` bytes fits what the cell keeps of them."""
        if self.display_bytes + size > _DISPLAY_MAX_BYTES:
            self.displays_truncated = True
            return False
        self.display_bytes += size
        return True


def _text_ends(content: bytes | memoryview, nbytes: int) -> tuple[str, str]:
    """About the first and last ``nbytes`` of a stream message's text, read from its JSON.

    For a message too large to parse whole: ipykernel sends the text last,
    ``{"name": "stdout", "text": "..."}``. Each end is cut where it decodes
    as a JSON string, never inside an escape or a character; from anything
    else a kernel sends, nothing is read.
    """
    head_at = bytes(content[:64]).find(b'"text": "')
    if head_at < 0 or len(content) < 2 * nbytes + 64:
        return "", ""
    first = bytes(content[head_at + 9 : head_at + 9 + nbytes])
    # The tail, before the closing "}, with a few bytes before it to tell an escape by.
    last = bytes(content[len(content) - nbytes - 8 : len(content) - 2])
    head = tail = ""
    for trim in range(8):
        with contextlib.suppress(ValueError):
            head = json.loads(b'"' + first[: len(first) - trim] + b'"')
            break
    for at in range(6, 14):
        if _inside_escape_or_character(last, at):
            continue
        with contextlib.suppress(ValueError):
            tail = json.loads(b'"' + last[at:] + b'"')
            break
    return head, tail


def _inside_escape_or_character(data: bytes, at: int) -> bool:
    """Whether string text read from ``data[at:]`` would begin inside an escape or a character."""
    if 0x80 <= data[at] < 0xC0:  # a UTF-8 continuation byte
        return True

    def escaping(end: int) -> bool:  # the backslash at data[end] starts an escape
        run = 0
        while end - run >= 0 and data[end - run] == 0x5C:
            run += 1
        return run % 2 == 1

    if escaping(at - 1):
        return True
    return any(
        data[at - k] == 0x5C and data[at - k + 1] == ord("u") and escaping(at - k)
        for k in range(2, 6)
    )


class _CellSink:
    """The running cell, as the IOPub reader sees it: its id, its output, who to tell."""

    __slots__ = (
        "begun", "done", "failed", "failure", "heard_at", "msg_id", "on_output", "out", "reply",
        "silent",
    )  # fmt: skip

    def __init__(
        self,
        msg_id: str,
        out: _CellOutput,
        on_output: OutputCallback | None,
        *,
        silent: bool = False,
    ) -> None:
        self.msg_id = msg_id
        #: sent silent: the kernel publishes no execute_input for it
        self.silent = silent
        self.out = out
        self.on_output = on_output
        loop = asyncio.get_running_loop()
        #: set at the cell's idle status (to an exception if its output could not be taken)
        self.done: asyncio.Future[None] = loop.create_future()
        #: set at its execute_input: the kernel runs it, and an interrupt reaches it
        self.begun: asyncio.Future[None] = loop.create_future()
        #: what the output callback raised: the cell goes on to its end, unheard
        self.failure: Exception | None = None
        #: set when ``failure`` is
        self.failed: asyncio.Future[None] = loop.create_future()
        #: when the cell's last IOPub message, or its reply, was taken (monotonic)
        self.heard_at = time.monotonic()
        #: the cell's execute_reply, once read
        self.reply: dict[str, Any] | None = None


class SandboxedKernel:
    """An ipykernel running inside its own nsjail sandbox.

    Args:
        host: the engine's :class:`~sandkernel.sandbox.SandboxHost`.
        policy: limits and permissions of this kernel.
        workspace: a host folder to use as ``/mnt/data`` (default: a fresh
            size-limited tmpfs that disappears with the kernel).
        zygote: fork the kernel from this warm zygote into its sandbox
            instead of starting an interpreter there (the sandbox is the same).
    """

    #: the running cell, which the IOPub reader feeds (None between cells)
    _cell: _CellSink | None = None
    #: the cgroup counters' kept descriptors, opened by the first cell
    _usage: UsageReader | None = None
    #: :attr:`workspace`, once resolved (the jail's folder does not move)
    _workspace: Path | None = None

    def __init__(
        self,
        host: SandboxHost,
        policy: Policy,
        *,
        workspace: Path | None = None,
        zygote: Zygote | None = None,
    ):
        self.host = host
        self.policy = policy
        self.zygote = zygote
        #: the kernel's host pid, once a forked kernel passed its outside check
        self.forked_pid: int | None = None
        self._jail = Jail(host, policy, workspace=workspace)
        self.kernel_id = self._jail.kernel_id
        self._km: AsyncKernelManager | None = None
        self._client: AsyncKernelClient | None = None
        self._lock = asyncio.Lock()
        #: one interrupt at a time reads the control channel for its reply
        self._interrupting = asyncio.Lock()
        self._drain: asyncio.Task[None] | None = None
        self._dead_reason: str | None = None
        self._closed = False
        #: handed every IOPub message's raw frames (frontends relaying the kernel)
        self._iopub_taps: list[Callable[[list[bytes]], None]] = []
        self._shutdown_task: asyncio.Future[None] | None = None
        self.started_at: float | None = None

    # -- properties ----------------------------------------------------------

    @property
    def workspace(self) -> Path:
        """Host path of the kernel's ``/mnt/data``."""
        layout = self._jail.layout
        if layout is None:
            raise KernelDead("kernel not started")
        if self._workspace is None:
            # Resolved once (a dozen system calls): a session asks after every cell.
            self._workspace = layout.workspace.resolve()
        return self._workspace

    @property
    def cgroup(self) -> KernelCgroup:
        return self._jail.cgroup

    @property
    def provisioner(self) -> SandboxProvisioner | None:
        prov = self._km.provisioner if self._km is not None else None
        return prov if isinstance(prov, SandboxProvisioner) else None

    @property
    def alive(self) -> bool:
        return not self._closed and self._jail.running

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    async def wait_ended(self) -> None:
        """Return once the kernel's sandbox has ended (at once if it has, or never started).

        Its process is awaited on a pidfd: no polling, any number of waiters.
        """
        await self._jail.wait()

    def tap_iopub(self, tap: Callable[[list[bytes]], None]) -> Callable[[], None]:
        """Hand ``tap`` the raw frames of every IOPub message from now on.

        The engine's IOPub subscription has been in place since the kernel
        started, so a frontend that relays the kernel's messages misses none
        published after this call, where a subscription of its own would take
        effect only some milliseconds later. ``tap`` is called on the event
        loop and must not block. Returns the function that removes it.
        """
        self._iopub_taps.append(tap)

        def untap() -> None:
            with contextlib.suppress(ValueError):
                self._iopub_taps.remove(tap)

        return untap

    def connection_info(self) -> dict[str, Any]:
        """The kernel's Jupyter connection info (transport, ports, HMAC key).

        For frontends that speak the Jupyter messaging protocol to the kernel
        themselves (the Kernel Gateway API relays WebSocket messages over
        sockets of its own); the engine's own client is not shared.

        Raises:
            KernelDead: the kernel is not started or has ended.
        """
        if self._km is None or not self.alive:
            raise KernelDead(self._dead_reason or "the kernel is not running")
        # The sockets as bound, through links only root reaches (the provisioner's).
        info: dict[str, Any] = dict(self._km.get_connection_info())
        key = info.get("key")
        if isinstance(key, bytes):
            info["key"] = key.decode()
        return info

    # -- lifecycle -----------------------------------------------------------

    async def start(self, *, timeout_s: float = 30.0) -> None:
        """Start the sandbox and wait until the kernel answers ``kernel_info``.

        Raises:
            KernelStartFailed: with nsjail's and the kernel's last log lines.
        """
        try:
            layout = await self._jail.prepare()  # undone if cancelled meanwhile
        except asyncio.CancelledError:
            self._closed = True
            raise
        km = AsyncKernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(data_dir("kernels"))]),
            transport="ipc",
            ip=str(layout.connection_dir / IPC_NAME),
            connection_file=str(layout.root / "connection.json"),
        )
        km.session = MessageSession(key=secrets.token_hex(32).encode(), parent=km)
        self._km = km
        async with self._jail.starting("sandboxed kernel", self.shutdown):
            await km.start_kernel(sandbox=self._jail, zygote=self.zygote, bind_timeout_s=timeout_s)
            client = km.client()  # connected through the provisioner's pinned links
            assert isinstance(client, AsyncKernelClient)
            # No heartbeat channel: death is told by the process and its cgroup,
            # and each heartbeat is a thread with an event loop and a socket of
            # its own per kernel, which the engine would carry for nothing.
            client.start_channels(hb=False)
            self._client = client
            await asyncio.wait_for(
                wait_until_ready(client, timeout_s, lambda: self.alive), timeout_s + 1
            )
            forked = self.provisioner.forked if self.provisioner is not None else None
            if forked is not None:
                # Its isolation is checked from outside, not taken from the zygote.
                self.forked_pid = await asyncio.to_thread(verify_forked, self._jail, forked)
            self._start_drain()
        self.started_at = time.monotonic()

    async def shutdown(self, *, grace_s: float = 1.0) -> None:
        """End the kernel: SIGTERM to nsjail, SIGKILL after ``grace_s``; remove every trace.

        Idempotent and bounded in time; safe to call from any state. Runs as one
        task that every caller waits for. A caller that is cancelled meanwhile
        still waits for it to end, then raises :class:`asyncio.CancelledError`:
        once a cancelled start or close has returned, nothing of the kernel is
        left on the machine.
        """
        if self._shutdown_task is None:
            self._closed = True
            self._shutdown_task = asyncio.ensure_future(self._shutdown(grace_s))
        await wait_out(self._shutdown_task)

    async def _shutdown(self, grace_s: float) -> None:
        await self._stop_drain()
        if self._client is not None:
            self._client.stop_channels()
        km = self._km
        try:
            await self._jail.stop(grace_s)
        finally:
            if km is not None:
                # Connection file, control socket, zmq context, then the
                # provisioner's cleanup (the jail's cgroup, mounts and folder).
                await km.cleanup_resources(restart=False)
            if self._jail.layout is not None:
                # Idempotent; covers a start cancelled before the provisioner
                # took charge of the jail.
                await self._jail.destroy()

    async def __aenter__(self) -> SandboxedKernel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- execution -------------------------------------------------------------

    async def execute(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        silent: bool = False,
        store_history: bool = True,
        on_output: OutputCallback | None = None,
    ) -> ExecutionResult:
        """Run one cell and return what happened.

        Args:
            code: Python source of the cell.
            timeout_s: wall timeout (default: the policy's ``wall_timeout_s``).
                On expiry the cell is interrupted through the kernel; if it
                does not stop within the policy's ``interrupt_grace_s`` the
                kernel is killed and ``state_lost`` is set.
            silent: do not count or record the cell (used for set-up code).
            store_history: record the cell in the kernel's history.
            on_output: called with each iopub message of this cell as it arrives.

        Raises:
            KernelDead: the kernel was already dead before the cell started.
            BadInput: ``timeout_s`` is not above 0 and at most a day, or ``code`` is not
                valid text (a lone surrogate).
        """
        if timeout_s is not None and not 0 < timeout_s <= MAX_TIMEOUT_S:  # nan too
            raise BadInput(
                f"timeout_s must be above 0 and at most {MAX_TIMEOUT_S:g} s (got {timeout_s!r})"
            )
        check_code_text(code)
        async with self._lock:
            if not self.alive or self._client is None:
                raise KernelDead(self._dead_reason or "the kernel is not running")
            self._start_drain()  # running already, unless someone took IOPub over
            return await self._execute(code, timeout_s, silent, store_history, on_output)

    def _start_drain(self) -> None:
        """Start the kernel's one IOPub reader (idempotent).

        It runs from the kernel's start to its shutdown. While no cell runs it
        drains: a thread a cell left running can keep printing after the cell
        ended, and unread, zmq would queue its messages in the engine (1000 of
        any size); those raw frames are dropped without being parsed or
        verified. While a cell runs, it hands that cell's messages to it. One
        long-lived reader costs a cell nothing to set up, where a reader per
        cell (stopping the drain, polling with a timeout per message, starting
        it again) cost a few hundred microseconds a cell.
        """
        if self._drain is None and self._client is not None:
            channel = self._client.iopub_channel
            self._drain = asyncio.ensure_future(self._read_iopub(channel.socket, channel.session))

    async def _stop_drain(self) -> None:
        """Stop the IOPub reader and close what the cell path holds open (idempotent).

        A cell still waiting (the kernel is being shut down under it) is woken
        at once, and ends as ``killed``.
        """
        if self._closed and self._cell is not None:
            self._cell.done.cancel()
        task, self._drain = self._drain, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        reader, self._usage = self._usage, None
        if reader is not None:
            reader.close()

    async def _read_iopub(self, socket: Any, session: Any) -> None:
        # zmq.asyncio answers an awaited receive at once, without yielding to
        # the event loop, while a message is queued: a kernel sending faster
        # than this reads (a thread printing, a flood of displays) would hold
        # the loop, and every other session, for as long as it kept up. So the
        # messages already queued are taken _IOPUB_BATCH at a time, through a
        # plain socket on the same zmq socket, and then the loop runs: after
        # every batch, a short one too (the next awaited receive need not
        # yield, and a kernel sending just fast enough would chain them).
        queued: zmq.Socket[Any] = zmq.Socket.shadow(socket.underlying)
        with contextlib.suppress(zmq.ZMQError):
            while True:
                self._take_iopub(await socket.recv_multipart(copy=False), session)
                for _ in range(_IOPUB_BATCH - 1):
                    if socket.closed:  # by a callback of the message just taken
                        return
                    try:
                        frames = queued.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._take_iopub(frames, session)
                await asyncio.sleep(0)

    def _take_iopub(self, frames: Sequence[Any], session: Any) -> None:
        raw: list[bytes] | None = None
        if self._iopub_taps:
            raw = [f.bytes for f in frames]
            for tap in tuple(self._iopub_taps):
                tap(raw)
        sink = self._cell
        if sink is None or sink.done.done():
            return  # no cell is waiting: dropped unparsed
        if sum(len(f) for f in frames) > _IOPUB_PARSE_MAX_BYTES:
            self._take_oversized(frames, session, sink)
            return
        try:
            _, parts = session.feed_identities(raw or [f.bytes for f in frames])
            msg = session.deserialize(parts)
        except Exception:  # noqa: BLE001 - malformed or unsigned: not the cell's
            return
        if msg.get("parent_header", {}).get("msg_id") != sink.msg_id:
            return
        sink.heard_at = time.monotonic()
        try:
            sink.out.add(msg, len(parts[4]))
            if sink.out.execution_count is not None and not sink.begun.done():
                sink.begun.set_result(None)
        except Exception as exc:  # noqa: BLE001 - raised to the cell's caller
            sink.done.set_exception(exc)
            return
        if sink.on_output is not None:
            try:
                sink.on_output(msg)
            except Exception as exc:  # noqa: BLE001 - raised to the cell's caller
                # The cell is still the kernel's: its messages are followed to
                # its end, which the caller waits for (see _run_cell).
                sink.on_output = None
                sink.failure = exc
                sink.failed.set_result(None)
        if sink.out.idle:
            sink.done.set_result(None)

    @staticmethod
    def _take_oversized(frames: Sequence[Any], session: Any, sink: _CellSink) -> None:
        """A message too large to parse: what it was and whose, then counted as cut.

        Its signature is not computed either (over hundreds of MiB): the most
        a forged one could do is mark the running cell's output as cut, which
        code in the sandbox can do by printing.
        """
        data = [f if isinstance(f, bytes) else f.buffer for f in frames]
        try:
            # Not Session.feed_identities: it copies every frame before the
            # delimiter, and the kernel chooses those frames (one of hundreds
            # of MiB, and no delimiter, would be copied whole). Only a frame
            # of the delimiter's length is compared here.
            start = next(i for i, f in enumerate(data) if len(f) == len(_DELIM) and f == _DELIM)
            header, parent, content = data[start + 2], data[start + 3], data[start + 5]
        except (StopIteration, IndexError):
            return  # malformed: not the cell's
        if len(header) > _HEADER_MAX_BYTES or len(parent) > _HEADER_MAX_BYTES:
            return
        try:
            kind = session.unpack(bytes(header)).get("msg_type")
            parent_id = session.unpack(bytes(parent)).get("msg_id")
        except Exception:  # noqa: BLE001 - malformed: not the cell's
            return
        if parent_id == sink.msg_id and isinstance(kind, str):
            sink.out.cut(kind, content)

    def _read_usage(self, *, peak: bool = True, reset_peak: bool = False) -> CgroupUsage:
        """The kernel's cgroup counters, through descriptors kept open between cells.

        ``reset_peak`` first starts a new peak-memory window; ``peak=False``
        leaves the peak out (a cell needs it only at its end).
        """
        if self._closed:  # shutting down: read once and keep nothing open
            return self.cgroup.usage()
        if self._usage is None:
            self._usage = UsageReader(self.cgroup)
        if reset_peak:
            self._usage.reset_peak()
        return self._usage.read(peak=peak)

    async def _execute(
        self,
        code: str,
        timeout_s: float | None,
        silent: bool,
        store_history: bool,
        on_output: OutputCallback | None,
    ) -> ExecutionResult:
        assert self._client is not None
        client = self._client
        timeout = self.policy.wall_timeout_s if timeout_s is None else timeout_s
        before = self._read_usage(peak=False, reset_peak=True)
        started = time.monotonic()
        msg_id = client.execute(code, silent=silent, store_history=store_history, allow_stdin=False)
        out = _CellOutput(self.policy.output_max_bytes)
        # Registered before anything is awaited: the reader cannot see this
        # cell's first message before the cell is there to take it.
        sink = self._cell = _CellSink(msg_id, out, on_output, silent=silent)
        try:
            return await self._run_cell(sink, before, started, timeout)
        finally:
            self._cell = None
            if sink.done.done() and not sink.done.cancelled():
                sink.done.exception()  # retrieved: an unawaited failure is not logged as lost

    async def _run_cell(
        self, sink: _CellSink, before: CgroupUsage, started: float, limit_s: float
    ) -> ExecutionResult:
        msg_id, out = sink.msg_id, sink.out
        status: Status | None = None
        message: str | None = None
        try:
            finished = await self._collect(sink, started + limit_s, until_failure=True)
            if sink.failure is not None:
                # The caller's own callback failed: as when the caller cancels,
                # the cell is interrupted and settled before its error is raised.
                if not finished:
                    await self._settle_after_cancel(sink)
                raise sink.failure
            if not finished and self.alive:
                status = "timeout"
                message = f"the cell ran longer than its {limit_s:g} s limit"
                grace = await self._interrupt_once_begun(sink)
                if await self._collect(sink, grace):
                    message += " and was interrupted; the kernel and its variables survive"
                else:
                    await self._kill()
                    message += (
                        " and did not stop when interrupted; the kernel was killed "
                        "and its variables are lost"
                    )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (self._closed and task is not None and task.cancelling() == 0):
                # The caller cancelled: interrupt the cell so the session stays usable,
                # and return only once it settled, so that the session's next cell is
                # not sent while this one still runs (the kernel would abort it).
                # Waited out whatever else is cancelled meanwhile: an anyio cancel
                # scope cancels every await in it, again and again; the wait is
                # bounded by the interrupt's grace and the kill.
                settle = asyncio.ensure_future(self._settle_after_cancel(sink))
                with contextlib.suppress(Exception):
                    await wait_out(settle)
                raise
            # Nobody cancelled us: the kernel was shut down under the running cell
            # (session closed, engine shutting down).
            status, message = _SHUT_DOWN
        if sink.failure is not None:  # it failed while the timed-out cell was settled
            raise sink.failure
        reply = sink.reply
        if reply is None and out.idle:
            reply = await self._reply_unless_closed(msg_id, 1.0)
        if status is None and not out.idle and sink.reply is not None:
            note = (
                "the kernel's output came faster than the engine could take it: zmq "
                "dropped some of it and the cell's end, and the cell ended at its reply"
            )
            message = f"{message}; {note}" if message else note
        after = self._read_usage()
        wall_ms = (time.monotonic() - started) * 1000
        alive = self.alive
        if after.oom_kills > before.oom_kills:
            status = "oom"
            message = (
                f"the sandbox ran out of memory (limit {self.policy.memory_mb} MiB, "
                "policy field memory_mb)"
                + ("; the kernel was killed and its variables are lost" if not alive else
                   "; a process of the cell was killed")
            )  # fmt: skip
        elif not alive and status is None:
            # Shut down under the cell, which may have seen its sandbox end before
            # being woken, or its reply cut off: the shutdown, not a death.
            status, message = _SHUT_DOWN if self._closed else await self._death_status()
        elif status is None:
            status = "error" if out.error is not None else "ok"
            if reply is not None and reply["content"].get("status") == "error":
                status = "error"
        if not alive:
            self._dead_reason = self._dead_reason or message
        if after.pids_limit_hits > before.pids_limit_hits:
            note = f"the cell hit the process limit ({self.policy.pids_max}, policy field pids_max)"
            message = f"{message}; {note}" if message else note
        error = out.error
        if error is None and reply is not None and reply["content"].get("status") == "error":
            # Some errors come with no error message on IOPub (IPython prints an
            # ExceptionGroup's traceback to stderr): the reply still names them.
            content = reply["content"]
            if isinstance(content.get("ename"), str):
                error = ErrorInfo(
                    name=content["ename"],
                    value=str(content.get("evalue") or ""),
                    traceback=strip_ansi("\n".join(map(str, content.get("traceback") or []))),
                )
        stdout, stdout_cut = out.stdout.value()
        stderr, stderr_cut = out.stderr.value()
        return ExecutionResult(
            status=status,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=stdout_cut,
            stderr_truncated=stderr_cut,
            displays=out.displays,
            displays_truncated=out.displays_truncated,
            value=out.value,
            error=error,
            usage=_usage(wall_ms, before, after),
            execution_count=out.execution_count,
            message=message,
            kernel_alive=alive,
            state_lost=not alive,
        )

    async def _collect(
        self, sink: _CellSink, deadline: float, *, until_failure: bool = False
    ) -> bool:
        """Wait for the cell's idle status (True), the deadline or the kernel's death.

        The IOPub reader folds the messages into the cell's output as they
        come; this wakes every ``_POLL_S`` to see whether the kernel still
        lives. ``until_failure``: the output callback's failure ends the wait
        too (False).
        """
        waited = [sink.done, sink.failed] if until_failure else [sink.done]
        while not sink.done.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(
                waited, timeout=min(remaining, _POLL_S), return_when=asyncio.FIRST_COMPLETED
            )
            if sink.failed in waited and sink.failed.done():
                return False
            if not sink.done.done() and not self.alive:
                return False
            if not sink.done.done() and await self._idle_lost(sink):
                return True
        sink.done.result()
        return True

    async def _idle_lost(self, sink: _CellSink) -> bool:
        """Whether the cell has ended in the kernel but its idle status will never come.

        Past zmq's queue limit a kernel's IOPub messages are dropped, the idle
        status with them. Once IOPub has been silent for a while, the shell
        channel is asked, without waiting, for the cell's reply (kept for the
        result); the cell has ended when that came and IOPub stayed silent
        :data:`_IDLE_LOST_S` after it too.
        """
        if time.monotonic() - sink.heard_at < _IDLE_LOST_S:
            return False
        if self._closed:  # shutting down: its channels are being closed under it
            return False
        if sink.reply is None:
            sink.reply = await self._reply_unless_closed(sink.msg_id, 0)
            if sink.reply is not None:
                sink.heard_at = time.monotonic()
            return False
        return True

    async def _reply_unless_closed(self, msg_id: str, within_s: float) -> dict[str, Any] | None:
        """The cell's execute_reply; None if none came in time or the kernel was shut down.

        Shutting down closes the shell channel under a read: zmq cancels it or
        finds its socket closed, or jupyter_client its channel gone (an assert).
        Unless the caller cancelled, that is the kernel's end, not an error.
        """
        if self._closed:
            return None
        try:
            return await self._shell_reply(msg_id, within_s)
        except (queue.Empty, TimeoutError):
            return None
        except (asyncio.CancelledError, AssertionError, zmq.ZMQError):
            task = asyncio.current_task()
            if self._closed and task is not None and task.cancelling() == 0:
                return None
            raise

    async def _shell_reply(self, msg_id: str, within_s: float) -> dict[str, Any]:
        assert self._client is not None
        return await _reply_to(self._client.get_shell_msg, msg_id, time.monotonic() + within_s)

    async def _interrupt_cell(self, until: float | None = None) -> None:
        """Interrupt the running cell; return once the kernel has signalled itself.

        The kernel takes interrupts as messages: its control thread sends its
        process SIGINT, then replies. jupyter_client's ``interrupt_kernel``
        sends the request and does not wait, so the SIGINT could come after
        the cell has ended and land in the session's next cell. Waited for
        here, a bounded time whatever the kernel sends meanwhile (its code is
        the user's, and can flood its control socket): a kernel that does not
        answer in time is left to the caller's grace and kill. ``until``
        (monotonic) ends the wait sooner.
        """
        client = self._client
        if client is None:  # not started: nothing runs
            return
        deadline = time.monotonic() + _INTERRUPT_ACK_S
        if until is not None:
            deadline = min(deadline, until)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                async with self._interrupting:
                    request = client.session.msg("interrupt_request", content={})
                    client.control_channel.send(request)
                    await _reply_to(client.get_control_msg, request["header"]["msg_id"], deadline)
        except asyncio.CancelledError:
            # Shutting down closes the channel under the wait, and pyzmq cancels
            # it: the kernel's end, not the caller's cancel.
            task = asyncio.current_task()
            if self._closed and task is not None and task.cancelling() == 0:
                return
            raise
        except Exception:  # noqa: BLE001 - no answer in time (or none readable): the caller's grace
            return

    async def interrupt(self) -> None:
        """Interrupt the running cell (``KeyboardInterrupt`` in the kernel)."""
        await self._interrupt_cell()

    async def _settle_after_cancel(self, sink: _CellSink) -> None:
        sink.on_output = None  # the caller has gone
        grace = await self._interrupt_once_begun(sink)
        if not await self._collect(sink, grace):
            await self._kill(after="a cancelled cell that did not stop when interrupted")
        elif self._client is not None and sink.reply is None:
            await self._reply_unless_closed(sink.msg_id, 0.5)

    async def _interrupt_once_begun(self, sink: _CellSink) -> float:
        """Interrupt the cell once it is seen to begin; when its grace to stop ends.

        ipykernel takes SIGINT only while it handles a request: sent before it
        begins the cell (cancelled right after it was sent, or timed out before
        a busy kernel took it up), an interrupt is ignored, and the cell runs to
        the grace's end and its kernel is killed. It is sent once the cell is
        seen to begin (its execute_input; a silent cell has none), or has ended
        meanwhile, waited for up to a grace; the cell's own grace starts then.
        """
        if not (sink.silent or sink.begun.done()):
            deadline = time.monotonic() + self.policy.interrupt_grace_s
            while not (sink.begun.done() or sink.done.done()) and self.alive:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    [sink.begun, sink.done],
                    timeout=min(remaining, _POLL_S),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        grace = time.monotonic() + self.policy.interrupt_grace_s
        if not sink.done.done():
            await self._interrupt_cell(grace)
        return grace

    async def _kill(self, after: str = "a timeout it did not survive") -> None:
        self._jail.kill()
        await self._jail.wait(5)
        self._dead_reason = self._dead_reason or f"killed after {after}"

    async def _death_status(self) -> tuple[Status, str]:
        await self._jail.wait(2)
        code = self._jail.exit_code
        if code is not None and code > 128:
            signum = code - 128
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = f"signal {signum}"
            if signum == signal.SIGKILL:
                return "killed", "the kernel was killed (SIGKILL); its variables are lost"
            return "dead", f"the kernel died from {name}; its variables are lost"
        if code is not None:
            return "dead", f"the kernel process exited with code {code}; its variables are lost"
        return "dead", "the kernel stopped responding; its variables are lost"

    async def prepare(
        self, *, self_check: bool = True, imports: Sequence[str] = ()
    ) -> dict[str, str]:
        """Make the kernel ready for a session, in one cell: check it, import, warm it up.

        In this order: the isolation self-check (:meth:`self_check`, skipped when
        ``self_check`` is false), the prewarm ``imports`` (a module that is missing or
        fails to import is not fatal: the user's own import will say so; no name is
        bound in the user's namespace) and the warm-up. A kernel's first cell that shows
        a value costs about 2 ms more than the next ones, for one-time work in IPython
        (it builds its session logger, importing ``IPython.core.logger``, and runs its
        display formatters for the first time): the warm-up does both now, before a
        session gets the kernel (a forked kernel finds both done by its zygote). The
        cell is not silent, so that a session's first cell is not the kernel's first to
        publish its input and run IPython's per-cell hooks (measured: a session's second
        cell 1 ms faster, its first 0.2 ms), but it is kept out of the history: the
        user's namespace, ``In``/``Out`` and execution count stay as new. One cell
        rather than one per step: each round trip costs the engine and the kernel about
        3 ms of CPU.

        Returns:
            The prewarm imports that failed: module -> why.

        Raises:
            KernelStartFailed: the cell did not run to its end (the kernel died,
                hung) or failed after the check. SelfCheckFailed: a check did
                not hold, or the check itself failed.
        """
        # A cold kernel imports the prewarm modules here (numpy, pandas: seconds).
        timeout_s = 120 if imports else 30
        cell = _set_up_cell(self_check, imports)
        result = await self.execute(cell, silent=False, store_history=False, timeout_s=timeout_s)
        if result.status not in ("ok", "error"):
            # The kernel died or hung: a start that failed, not a check.
            raise KernelStartFailed(f"set-up cell failed: {result.status}: {result.message}")
        if self_check:
            self._check_report(result)  # its report missing: the probe itself failed
        if result.status != "ok":
            raise KernelStartFailed(f"set-up cell failed: {result.status}: {result.message}")
        return _prewarm_failures(result.stderr) if imports else {}

    # -- self-check -------------------------------------------------------------

    async def self_check(self) -> dict[str, Any]:
        """Verify that the isolation holds before the kernel is handed out. Fail closed.

        From inside: no capabilities, no new privileges, seccomp on, not root,
        its own PID namespace, every mount as the policy renders it (``/``
        and the system read-only, ``/mnt/data`` and ``/tmp`` writable, nothing
        extra) and only the allowlisted environment. From outside: the
        kernel's cgroups hold it, within the policy's limits.

        Raises:
            SelfCheckFailed: with every check that did not hold.
        """
        result = await self.execute(
            SELF_CHECK_PROBE, silent=True, store_history=False, timeout_s=10
        )
        if result.status != "ok":
            raise SelfCheckFailed(f"self-check did not run: {result.status} {result.message}")
        return self._check_report(result)

    def _check_report(self, result: ExecutionResult) -> dict[str, Any]:
        """The report a cell that began with the probe printed first, checked."""
        lines = result.stdout.strip().splitlines()
        try:
            report: dict[str, Any] = json.loads(lines[0])
        except (IndexError, ValueError):
            error = result.error
            why = f"{error.name}: {error.value}" if error is not None else repr(result.stdout[:200])
            raise SelfCheckFailed(f"self-check did not run: {why}") from None
        problems = []
        if int(report["cap_eff"], 16) != 0:
            problems.append(f"capabilities present (CapEff {report['cap_eff']})")
        if report["no_new_privs"] != "1":
            problems.append("no_new_privs not set")
        if report["seccomp"] != "2":
            problems.append("seccomp filter not active")
        if report["uid"] == 0 or report["gid"] == 0:
            problems.append("runs as root")
        if report["usr_writable"]:
            problems.append("/usr is writable")
        if not report["workspace_writable"]:
            problems.append("workspace is not writable")
        if any(p > 64 for p in report["pids"]) and 1 not in report["pids"]:
            problems.append("not in its own PID namespace")
        # Mounts and environment as rendered; the cgroup limits from outside.
        problems += verify_isolation_report(report, self.policy, self.host.runtime)
        problems += verify_cgroup_limits(self.cgroup, self.policy)
        if problems:
            raise SelfCheckFailed("kernel failed its isolation self-check: " + "; ".join(problems))
        return report


async def _reply_to(get_msg: Callable[..., Any], msg_id: str, deadline: float) -> dict[str, Any]:
    """The reply to ``msg_id`` on a channel (``get_msg``: the client's getter for it).

    Raises ``queue.Empty`` or :class:`TimeoutError` once ``deadline``
    (monotonic) has passed. The kernel runs the user's code, which can flood
    a channel with signed messages: a queued message is taken without a
    pause, so the deadline is checked after each one, not only by the read's
    timeout.
    """
    while True:
        msg = await get_msg(timeout=max(0.0, deadline - time.monotonic()))
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            return cast(dict[str, Any], msg)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no reply to {msg_id} in time")


async def wait_until_ready(
    client: AsyncKernelClient, timeout_s: float, alive: Callable[[], bool]
) -> None:
    """Wait until a kernel answers ``kernel_info`` and its IOPub is connected.

    jupyter_client's ``wait_for_ready`` does the same and then waits for 0.2 s
    of IOPub silence to flush it: a fixed cost on every start (a third of it),
    not needed by clients that ignore IOPub messages that are not their own.

    Raises:
        RuntimeError: the kernel died first. TimeoutError: no answer in time.
    """
    deadline = time.monotonic() + timeout_s
    # A slow kernel (a starved CPU) may answer after a request has been sent
    # again: a reply to any of them proves the shell channel works.
    sent = {client.kernel_info()}
    last_sent = time.monotonic()
    while True:
        try:
            reply = await client.get_shell_msg(timeout=1.0)
        except queue.Empty:
            reply = None
            if time.monotonic() - last_sent > 5.0:
                sent.add(client.kernel_info())
                last_sent = time.monotonic()
        if reply is not None and reply.get("parent_header", {}).get("msg_id") in sent:
            try:
                # Any IOPub message (the welcome, or kernel_info's status)
                # proves the subscription is live; else ask again, which
                # makes the kernel publish a status.
                await client.get_iopub_msg(timeout=0.2)
                return
            except queue.Empty:
                sent.add(client.kernel_info())
                last_sent = time.monotonic()
        if not alive():
            raise RuntimeError("the kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the kernel did not answer kernel_info within {timeout_s:g} s")


def _usage(wall_ms: float, before: CgroupUsage, after: CgroupUsage) -> Usage:
    cpu_ms = None
    if before.cpu_ns is not None and after.cpu_ns is not None:
        cpu_ms = (after.cpu_ns - before.cpu_ns) / 1e6
    return Usage(
        wall_ms=round(wall_ms, 3), cpu_ms=cpu_ms, peak_memory_bytes=after.peak_memory_bytes
    )
