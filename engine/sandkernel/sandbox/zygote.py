"""Kernels forked from a warm zygote, each into a sandbox of its own.

A :class:`Zygote` is one warm interpreter per engine and policy
(``kernels/runtime/zygote.py``), a child of the engine (root, outside every
sandbox) that talks to it over a private ``SOCK_SEQPACKET`` socketpair. It has
imported ipykernel, IPython and the policy's prewarm modules, so a new kernel
costs a fork instead of an interpreter start, and the imported code's pages
are shared copy-on-write by every kernel.

The sandbox is made exactly as for a cold kernel, by nsjail, from the same
rendered config: only the jail's command differs, the stub (``PERL_STUB``, or
``launch.adopt()`` in Python), which waits as the sandbox's PID 1.
:meth:`Zygote.fork_into` then has the zygote fork a child that enters the
stub's namespaces, root and cgroup, and forks the kernel into its PID
namespace, where it drops to the stub's credentials,
rlimits and seccomp filters (read from the stub by the engine) before it runs
ipykernel. :func:`verify_forked` checks all of it from outside once the
kernel answers: the kernel's isolation never rests on the zygote's word.

:class:`ZygoteSupervisor` keeps one zygote alive for the pool: it starts it,
notices its death or failures, falls back to cold starts meanwhile, and
starts a new one with a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandkernel._resources import data_dir
from sandkernel.errors import SelfCheckFailed, ZygoteFailed
from sandkernel.policy import Policy
from sandkernel.sandbox.confinement import (
    compare_confinement,
    confinement,
    descriptors_naming,
    fd_targets,
    nspid,
    seccomp_filters,
)
from sandkernel.sandbox.host import SandboxHost
from sandkernel.sandbox.jail import Jail, wait_exit, wait_readable
from sandkernel.sandbox.layout import (
    RUNTIME_IN_JAIL,
    SANDBOX_GID,
    SANDBOX_UID,
    WORKSPACE_IN_JAIL,
    KernelLayout,
)
from sandkernel.sandbox.render import sandbox_env
from sandkernel.sandbox.runtime import write_bytecode

log = logging.getLogger(__name__)

#: The sandbox's init when its kernel comes from the zygote (``launch.adopt``):
#: it says it is ready, reads its kernel's pid on stdin once the kernel is its
#: child, then forwards SIGTERM, SIGINT and SIGHUP to it, reaps every child
#: and exits with the kernel's status (128 + signal when it was killed).
#: ``launch`` is imported rather than run as a script, so that it is loaded from
#: the bytecode :meth:`Zygote.start` writes: a script is compiled at every run
#: (about 1.5 ms of each forked start's CPU).
STUB_ARGS = (
    "-I", "-S", "-c",
    f"import sys; sys.path.insert(0, {RUNTIME_IN_JAIL!r}); import launch; launch.adopt()",
)  # fmt: skip
#: The same init in Perl, the stub wherever the jail has it (``/usr`` is always
#: mounted): 3.1 ms of CPU as a kernel's init where Python's takes 9 (its
#: interpreter's start), once per kernel. Perl dispatches the handlers between
#: its operations and restarts the interrupted ``waitpid``. The alarm is the
#: Python stub's timeout; its handler goes once the pid is read, so that the
#: sandbox's own code cannot end its init with it (init ignores a signal it has
#: no handler for).
PERL = "/usr/bin/perl"
PERL_STUB = r"""
sub none { print STDERR "stub: no kernel came\n"; exit 125 }
$SIG{ALRM} = \&none;
alarm 60;
syswrite STDOUT, "ready\n";
open STDOUT, ">&STDERR";
$k = <STDIN>;
alarm 0;
$SIG{ALRM} = "DEFAULT";
none() unless defined $k && $k =~ /\A([0-9]+)\n\z/;
$k = $1;
$SIG{$_} = sub { kill $_[0], $k } for qw(TERM INT HUP);
while (1) {
    $p = waitpid(-1, 0);
    exit 0 if $p < 0;
    exit($? & 127 ? 128 + ($? & 127) : $? >> 8) if $p == $k;
}
"""


def stub_command(python: str) -> list[str]:
    """The stub's command in the jail: Perl's where the host's ``/usr`` has it, else Python's."""
    if os.path.realpath(PERL).startswith("/usr/") and os.access(PERL, os.X_OK):
        # -T: taint mode, which also ignores PERL5OPT and PERL5LIB (a policy's env).
        return [PERL, "-T", "-e", PERL_STUB]
    return [python, *STUB_ARGS]


#: The zygote's command line is overwritten with each kernel's (see zygote.py): room for it.
_CMDLINE_ROOM = "--room=" + "." * 160
_NAMESPACE_FLAGS = (
    os.CLONE_NEWNS | os.CLONE_NEWPID | os.CLONE_NEWNET | os.CLONE_NEWIPC
    | os.CLONE_NEWUTS | os.CLONE_NEWCGROUP
)  # fmt: skip
_MAX_MSG = 1 << 20
_STUB_READY_S = 10.0
#: How long a fork request waits for the zygote: first behind the requests
#: before it, then for its reply. Measured, queue and reply, 48 forks 8 at a
#: time on 2 cores: 42 ms median (load average 2); 123 ms median and 0.77 s
#: at most with 12 busy processes (load 8); 0.51 s at most with 24 (load 14).
#: A zygote silent for 5 s is stalled (stopped, or hung), and is ended; the
#: start goes cold. Above the zygote's own wait for its child's report
#: (``_REPORT_TIMEOUT_S`` in its script), so that a slow child costs a
#: failed reply, not the zygote.
_FORK_REPLY_S = 5.0


@dataclass(frozen=True)
class ForkedKernel:
    """A kernel forked into a sandbox: the sandbox's init and the kernel, as host pids.

    ``zygote_pid`` and ``zygote_fds`` (what the zygote's descriptors named
    once it was ready, read by the engine) let :func:`verify_forked` check
    that the kernel holds none of them.
    """

    stub_pid: int
    kernel_pid_in_jail: int
    filters: tuple[bytes, ...]
    zygote_pid: int | None = None
    zygote_fds: frozenset[str] = frozenset()


#: The variables of a policy's ``env`` a forked kernel honours, an allowlist:
#: each kernel sets them before any of its code runs, and nothing reads them
#: earlier. Traced (every read of ``os.environ``) through the zygote's start
#: and warm-up with the default prewarm: none of these is read there (TMPDIR
#: is read by ``tempfile`` on first use, whose cached folder a kernel forgets,
#: see ``_become_kernel``); Perl's are read by a ``perl`` the kernel runs (the
#: stub ignores them, ``-T``). Every other variable may have been read as the
#: interpreter started or the zygote's modules were imported, and a kernel
#: forked from it keeps what was read then: the interpreter (``PYTHON*``, the
#: locale), glibc (``LANG``, ``LC_*``, ``TZ``, ``GCONV_PATH``, ``MALLOC_*``), the
#: dynamic loader (``LD_*``), thread pools (``OMP_*``...), matplotlib
#: (``MPLBACKEND``, ``MPLCONFIGDIR``, and ``HOME`` and ``PATH`` for its fonts),
#: IPython (``IPYTHONDIR``, ``HOME``), jupyter_client (``USER``: a session's
#: user name), and whatever a prewarm module reads as it is imported.
FORK_HONOURS_ENV = frozenset({"TMPDIR", "SHELL", "PERL5LIB", "PERL5OPT", "PERLLIB"})


def fork_refused(policy: Policy) -> str | None:
    """Why kernels of ``policy`` cannot be forked (they start cold), or None."""
    at_start = sorted(policy.env.keys() - FORK_HONOURS_ENV)
    if at_start:
        return (
            f"the policy's env sets {', '.join(at_start)}, which a kernel forked from the "
            "zygote cannot honour (read as a process starts or its modules are imported; "
            f"a fork honours only {', '.join(sorted(FORK_HONOURS_ENV))}): its kernels start cold"
        )
    return None


class Zygote:
    """One warm interpreter that forks kernels into sandboxes (see the module's doc).

    Args:
        host: the engine's sandbox host (its runtime Python runs the zygote).
        policy: the sandbox policy of the kernels (their environment is the zygote's).
        prewarm: modules to import before the first fork.
    """

    def __init__(self, host: SandboxHost, policy: Policy, prewarm: Sequence[str] = ()) -> None:
        self.host = host
        self.policy = policy
        self.prewarm = tuple(prewarm)
        #: the command of each sandbox's init; None: :func:`stub_command`'s
        self.stub: list[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        #: what the zygote said when it was ready (pid, imports, threads, fds)
        self.info: dict[str, Any] = {}
        self.forks = 0
        #: CPU its children spent before they joined a kernel's cgroup (as they report it)
        self.outside_cpu_s = 0.0
        #: what its descriptors named once it was ready (read from /proc, not its word)
        self.fds: frozenset[str] = frozenset()
        self._sock: socket.socket | None = None
        self._stderr: Any = None
        self._lock = asyncio.Lock()
        #: ids of requests whose callers gave up waiting: their replies are dropped
        self._abandoned: set[str] = set()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self._sock is not None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    async def start(self, timeout_s: float = 120.0) -> None:
        """Spawn the zygote and wait until it has imported everything.

        Raises:
            ZygoteFailed: it exited or did not get ready in time (with its stderr).
        """
        refused = fork_refused(self.policy)
        if refused is not None:
            raise ZygoteFailed(refused)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        # The sandbox's environment without the policy's own variables: the
        # zygote is root on the host, where a path the policy names (a config
        # folder, PYTHONPATH) may be anyone's. Each kernel gets them after the fork.
        plain = self.policy.model_copy(update={"env": {}})
        env = dict(e.split("=", 1) for e in sandbox_env(plain, self.host.runtime))
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        runtime = data_dir("kernels") / "runtime"
        script = runtime / "zygote.py"
        # The stub of every sandbox it forks into, and the zygote, import them.
        names = (
            "launch.py", "immortal.py", "hugepages.py",
            "_sandkernel_kernel.py", "_sandkernel_setup.py",
        )  # fmt: skip
        write_bytecode(*(runtime / name for name in names))
        # -s: the zygote runs as root with the sandbox's HOME (/tmp, the host's
        # until the zygote covers it): a user site folder there would run
        # anyone's .pth file as root.
        argv = [
            self.host.runtime.python, "-s", str(script),
            "--fd", str(theirs.fileno()), "--parent", str(os.getpid()), _CMDLINE_ROOM,
        ]  # fmt: skip
        if self.prewarm:
            argv += ["--prewarm", ",".join(self.prewarm)]
        try:
            # Spawned from the event loop's thread: the zygote's parent-death
            # signal fires when the spawning thread ends, not only the process.
            self.process = process = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, no wait
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env=env,
                cwd="/",
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._sock = ours
        try:
            async with asyncio.timeout(timeout_s):
                data = await asyncio.get_running_loop().sock_recv(ours, _MAX_MSG)
            if not data:
                raise ZygoteFailed(f"the zygote exited while warming up: {self._stderr_tail()}")
            self.info = json.loads(data)
        except BaseException:
            await self.close()
            raise
        if self.info.get("threads") != 1:
            await self.close()
            raise ZygoteFailed(f"the zygote has {self.info.get('threads')} threads, not 1")
        try:
            # Between requests: its channel, stdio and nothing else (tested).
            self.fds = frozenset(fd_targets(process.pid).values())
        except OSError as exc:
            await self.close()
            raise ZygoteFailed(f"the zygote's descriptors cannot be read: {exc}") from None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            text: str = self._stderr.read().decode(errors="replace")
            return "\n".join(text.splitlines()[-15:])
        return ""

    async def close(self, grace_s: float = 2.0) -> None:
        """End the zygote: EOF on its socket, then SIGKILL after ``grace_s``. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        process = self.process
        if process is not None and not await wait_exit(process, grace_s):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await wait_exit(process, 5.0)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # -- forking -----------------------------------------------------------------

    async def fork_into(self, jail: Jail, argv: list[str]) -> ForkedKernel:
        """Start ``jail`` with the stub and fork a kernel into it, as if it ran ``argv``.

        ``jail`` must be prepared; on return its nsjail runs, and the kernel
        is starting ipykernel with ``argv``'s arguments from the third on
        (``-f <connection file in jail>``); ``argv`` is a cold kernel's
        command (``python /opt/sandkernel/launch.py -f ...``), which it shows.

        Raises:
            ZygoteFailed: the zygote is dead or its child failed; the jail
                may be running its stub (the caller destroys it).
        """
        layout = jail.layout
        if layout is None:
            raise RuntimeError("fork_into() before prepare()")
        opened: list[int] = []
        try:
            reader, writer = os.pipe2(os.O_CLOEXEC)
            opened += (reader, writer)
            # The stub's stdin: its kernel's pid, written once the kernel is its
            # child. The engine (root) makes the pipe: the sandbox's uid cannot
            # open it through /proc/1/fd to write a pid of its choosing.
            pid_reader, pid_writer = os.pipe2(os.O_CLOEXEC)
            opened += (pid_reader, pid_writer)
            stub = self.stub or stub_command(jail.host.runtime.python)
            try:
                process = jail.spawn(stub, stdin=pid_reader, stdout=writer)
            finally:
                for fd in (writer, pid_reader):  # nsjail has them now
                    opened.remove(fd)
                    os.close(fd)
            failed = await _stub_failed(process, reader)
            if failed is not None:
                # Its end of file comes as nsjail exits, just before it can be reaped.
                if self.stub is None and stub[0] == PERL and await wait_exit(process, 1.0):
                    # A Perl that does not run in this jail: Python's stub from now on.
                    self.stub = [jail.host.runtime.python, *STUB_ARGS]
                    log.warning("%s: forked kernels' init is Python's from now on", failed)
                raise ZygoteFailed(f"{failed}: {jail.log_tail(5)}")
            forked = await self._fork(jail, layout, process, argv)
            try:
                # The kernel was adopted before it reported: the stub can wait for it.
                os.write(pid_writer, b"%d\n" % forked.kernel_pid_in_jail)
            except BrokenPipeError:
                raise ZygoteFailed("the sandbox's stub ended before its kernel came") from None
        finally:
            for fd in opened:
                os.close(fd)
        return forked

    async def _fork(
        self,
        jail: Jail,
        layout: KernelLayout,
        process: subprocess.Popen[bytes],
        argv: list[str],
    ) -> ForkedKernel:
        """Ask the zygote for the kernel of the jail whose stub is ready."""
        stub_pid = _only_child(process.pid)
        pidfd = os.pidfd_open(stub_pid)
        try:
            if nspid(stub_pid)[-1] != 1:
                raise ZygoteFailed("nsjail's child is not the sandbox's init")
            filters = tuple(await asyncio.to_thread(seccomp_filters, stub_pid))
            if not filters:
                raise ZygoteFailed("the sandbox's stub has no seccomp filter")
            request = {
                "id": secrets.token_hex(4),
                "procs": [str(p) for p in jail.cgroup.procs_files],
                "flags": _NAMESPACE_FLAGS,
                "uid": SANDBOX_UID,
                "gid": SANDBOX_GID,
                "filters": [f.hex() for f in filters],
                "args": argv[2:],
                "cmdline": argv,
                "cwd": WORKSPACE_IN_JAIL,
                # The whole environment a cold kernel starts with, set once it is unprivileged.
                "env": sandbox_env(self.policy, jail.host.runtime),
            }
            empty, closed = os.pipe2(os.O_CLOEXEC)
            os.close(closed)
            try:
                output = os.open(layout.output_file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    reply = await self._request(request, [pidfd, empty, output])
                finally:
                    os.close(output)
            finally:
                os.close(empty)
        finally:
            os.close(pidfd)
        if not reply.get("ok"):
            raise ZygoteFailed(f"the zygote could not fork a kernel: {reply.get('error')}")
        self.forks += 1
        self.outside_cpu_s += int(reply.get("outside_cpu_ns") or 0) / 1e9
        return ForkedKernel(stub_pid, int(reply["pid"]), filters, self.pid, self.fds)

    async def _request(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        try:
            # Queued behind a request the zygote does not answer, a start waits
            # no longer than that one: which then ends the zygote, and the
            # queue finds it gone. Each start goes cold, none waits in turn.
            async with asyncio.timeout(_FORK_REPLY_S):
                await self._lock.acquire()
        except TimeoutError:
            raise ZygoteFailed(
                f"the zygote did not answer within {_FORK_REPLY_S:g} s (busy with another request)"
            ) from None
        try:
            return await self._exchange(request, fds)
        finally:
            self._lock.release()

    async def _exchange(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        sock = self._sock
        if sock is None or not self.alive:
            raise ZygoteFailed("the zygote is not running")
        loop = asyncio.get_running_loop()
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], fds)
            async with asyncio.timeout(_FORK_REPLY_S):
                while True:
                    data = await loop.sock_recv(sock, _MAX_MSG)
                    if not data:
                        break
                    reply: dict[str, Any] = json.loads(data)
                    if reply.get("id") not in self._abandoned:
                        break
                    # A caller before this one gave up: its kernel's jail is gone.
                    self._abandoned.discard(reply["id"])
        except asyncio.CancelledError:
            # The reply still comes: the next request must not take it for its own.
            self._abandoned.add(request["id"])
            raise
        except TimeoutError:
            # Stalled (stopped, hung): killed now, without close()'s grace, as
            # a stopped zygote never reads the end of file that ends it.
            await self.close(grace_s=0)
            raise ZygoteFailed(
                f"the zygote did not answer within {_FORK_REPLY_S:g} s: it was ended"
            ) from None
        except OSError as exc:
            await self.close(grace_s=0)
            raise ZygoteFailed(f"the zygote cannot be reached: {exc}") from None
        if not data:
            await self.close()
            raise ZygoteFailed(f"the zygote died: {self._stderr_tail()}")
        if reply.get("id") != request["id"]:
            await self.close()
            raise ZygoteFailed("the zygote answered another request")
        return reply


async def _stub_failed(process: subprocess.Popen[bytes], reader: int) -> str | None:
    """Why the stub did not say it is ready on ``reader``; None once it did."""
    if not await wait_readable(reader, _STUB_READY_S):
        exited = "" if process.poll() is None else " (nsjail exited)"
        return f"the sandbox's stub did not start{exited} within {_STUB_READY_S:g} s"
    if os.read(reader, 64) != b"ready\n":
        return "the sandbox's stub did not start"
    return None


def _only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise ZygoteFailed(f"nsjail has {len(children)} children, expected its one")
    return int(children[0])


def _kernel_host_pid(jail: Jail, pid_in_jail: int, stub_pid: int) -> int:
    for pid in jail.cgroup.pids():
        with contextlib.suppress(OSError):
            chain = nspid(pid)
            if len(chain) == 2 and chain[1] == pid_in_jail and pid != stub_pid:
                return pid
    raise SelfCheckFailed("the forked kernel is not in its sandbox's cgroup")


def verify_forked(jail: Jail, forked: ForkedKernel) -> int:
    """Check from outside that a forked kernel is confined exactly as its sandbox's init.

    Same namespaces, root, uid/gid and groups, no capability (bounding and
    ambient sets too), no_new_privs, cgroups and rlimits, the very same
    seccomp programs (compared byte for byte), and no descriptor naming what
    the zygote holds open (read now, and as it was once ready: a zygote gone
    since leaves its channel's name). Blocking: call it in a thread.

    Returns:
        The kernel's host pid.

    Raises:
        SelfCheckFailed: with every difference found.
    """
    pid = _kernel_host_pid(jail, forked.kernel_pid_in_jail, forked.stub_pid)
    problems = compare_confinement(confinement(pid), confinement(forked.stub_pid))
    try:
        if tuple(seccomp_filters(pid)) != forked.filters:
            problems.append("its seccomp filters are not the sandbox's")
    except OSError as exc:
        problems.append(f"its seccomp filters cannot be read: {exc}")
    zygote = set(forked.zygote_fds)
    if forked.zygote_pid is not None:
        with contextlib.suppress(FileNotFoundError):  # gone: what it held once ready stays
            zygote.update(fd_targets(forked.zygote_pid).values())
    try:
        for fd, target in descriptors_naming(fd_targets(pid), zygote):
            problems.append(f"its fd {fd} is {target}, which the zygote holds open")
    except OSError as exc:
        problems.append(f"its descriptors cannot be read: {exc}")
    if problems:
        raise SelfCheckFailed("forked kernel failed its outside check: " + "; ".join(problems))
    return pid


class ZygoteSupervisor:
    """Keeps one zygote for the pool: started lazily, replaced when it dies or fails.

    Args:
        host, policy, prewarm: as for :class:`Zygote`.
        max_failures: consecutive failed forks after which the zygote is
            replaced (a dead zygote is replaced at once).
        wait_for_start_s: how long a kernel start waits for a zygote that
            is warming up before it starts cold instead.
    """

    def __init__(
        self,
        host: SandboxHost,
        policy: Policy,
        prewarm: Sequence[str] = (),
        *,
        max_failures: int = 3,
        wait_for_start_s: float = 15.0,
    ) -> None:
        self.host = host
        self.policy = policy
        self.prewarm = tuple(prewarm)
        self.max_failures = max_failures
        self.wait_for_start_s = wait_for_start_s
        self.zygote: Zygote | None = None
        self._starting: asyncio.Task[Zygote] | None = None
        self._retry_at = 0.0
        self._backoff_s = 0.5
        self.failures = 0
        self.forks = 0
        self.fallbacks = 0
        self.restarts = 0
        #: why this policy's kernels cannot be forked, if so (its env is fixed)
        self.refused = fork_refused(policy)
        self.last_error: str | None = self.refused
        self._closed = False

    def status(self) -> str:
        """One line: which start is in force and why."""
        zygote = self.zygote
        if zygote is not None and zygote.alive:
            return f"zygote fork (zygote pid {zygote.pid}, {self.forks} kernels forked)"
        why = self.last_error or "the zygote is starting"
        return f"cold start (fallback: {why})"

    async def get(self) -> Zygote | None:
        """The live zygote, starting one if needed; None to start cold this time."""
        if self._closed or self.refused is not None:
            return None
        zygote = self.zygote
        if zygote is not None and zygote.alive:
            return zygote
        if zygote is not None:
            self.last_error = self.last_error or "the zygote died"
            self.zygote = None
            await zygote.close()
        if self._starting is None:
            if time.monotonic() < self._retry_at:
                return None
            self._starting = asyncio.ensure_future(self._start())
        starting = self._starting
        # A start that takes long (a loaded machine) does not hold refills up:
        # they go cold meanwhile, and the zygote is taken once it is ready.
        done, _ = await asyncio.wait({starting}, timeout=self.wait_for_start_s)
        if not done:
            return None
        self._starting = None
        error = None if starting.cancelled() else starting.exception()
        if starting.cancelled() or error is not None:
            self.last_error = f"the zygote did not start: {error or 'cancelled'}"
            self._retry_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(30.0, self._backoff_s * 2)
            return None
        self.zygote = starting.result()
        self._backoff_s = 0.5
        return self.zygote

    async def _start(self) -> Zygote:
        zygote = Zygote(self.host, self.policy, self.prewarm)
        await zygote.start()
        self.restarts += 1
        return zygote

    def succeeded(self) -> None:
        self.forks += 1
        self.failures = 0
        self.last_error = None

    async def failed(self, error: BaseException | str) -> None:
        """A forked start failed: count it; replace the zygote if it died or keeps failing."""
        self.fallbacks += 1
        self.failures += 1
        self.last_error = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning("kernel fork failed, starting cold: %s", self.last_error)
        zygote = self.zygote
        if zygote is not None and (not zygote.alive or self.failures >= self.max_failures):
            self.zygote = None
            self.failures = 0
            await zygote.close()

    async def close(self) -> None:
        self._closed = True
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await (await starting).close()
        current, self.zygote = self.zygote, None
        if current is not None:
            await current.close()
