"""One sandbox's life: prepare → spawn → wait → log tail → destroy.

Both paths run their code in a jail of this one shape: a sandboxed kernel
(ipykernel, started through the kernel provisioner) and a batch worker (the
fork server). A :class:`Jail` owns the sandbox from its folder to its
removal:

* :meth:`Jail.prepare` creates its folder, workspace and cgroup, and removes
  them again if it fails or is cancelled midway;
* :meth:`Jail.spawn` renders the nsjail config from the policy (or takes
  it rendered) and starts nsjail inside the cgroup, through the ``sh``
  wrapper that joins the cgroup and then becomes nsjail;
* :meth:`Jail.wait` waits for nsjail on a pidfd, without polling;
* :meth:`Jail.log_tail` and :meth:`Jail.starting` tell why a start failed;
* :meth:`Jail.stop` ends nsjail in bounded time (SIGTERM, a grace period,
  SIGKILL of nsjail and its whole cgroup) and :meth:`Jail.destroy` removes
  the cgroup, mounts and folder, even if its caller is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sandkernel._tasks import wait_out
from sandkernel.errors import KernelStartFailed
from sandkernel.sandbox.cgroups import KernelCgroup
from sandkernel.sandbox.host import SandboxHost
from sandkernel.sandbox.layout import KernelLayout

if TYPE_CHECKING:
    from sandkernel.policy import Policy
    from sandkernel.sandbox.limits import JailLimits

#: nsjail's own environment; the sandbox's is set by the config alone.
_NSJAIL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: How long nsjail may take to exit once it and its cgroup were SIGKILLed.
_KILLED_EXIT_S = 5.0
#: A line of no use in a log: the runtime's libraries report each symbol
#: version the host's libraries lack.
_LOG_NOISE = "no version information available"


async def wait_exit(process: subprocess.Popen[bytes], timeout_s: float | None = None) -> bool:
    """Wait for a child process to exit (a pidfd in the event loop, no polling).

    Returns:
        True once it has exited (and is reaped); False if ``timeout_s`` passed first.
    """
    if process.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process.wait()
        return True
    try:
        if not await wait_readable(pidfd, timeout_s):
            return False
    finally:
        os.close(pidfd)
    process.wait()
    return True


async def wait_readable(fd: int, timeout_s: float | None = None) -> bool:
    """Wait in the event loop until ``fd`` is readable; False if ``timeout_s`` passed first."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        async with asyncio.timeout(timeout_s):
            await ready.wait()
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


class Jail:
    """One sandbox on ``host``, rendered from ``policy``: its folder, cgroup and nsjail.

    Args:
        host: the engine's :class:`~sandkernel.sandbox.host.SandboxHost`.
        policy: limits and permissions; the only source of the nsjail config.
            ``None`` with ``limits``: the jail is prepared from those, and
            :meth:`spawn` is given its config rendered.
        limits: what the jail is prepared with (default: the policy's).
        workspace: a host folder to bind as ``/mnt/data`` instead of a fresh
            size-limited tmpfs.
    """

    def __init__(
        self,
        host: SandboxHost,
        policy: Policy | None,
        *,
        limits: JailLimits | None = None,
        workspace: Path | None = None,
    ) -> None:
        limits = limits if limits is not None else policy
        if limits is None:
            raise ValueError("a jail needs a policy or its limits")
        self.host = host
        self.policy = policy
        self.limits: JailLimits = limits
        self.kernel_id = host.new_kernel_id()
        #: set by :meth:`prepare`
        self.layout: KernelLayout | None = None
        #: nsjail (behind its ``sh`` wrapper), set by :meth:`spawn`
        self.process: subprocess.Popen[bytes] | None = None
        self._workspace = workspace

    @property
    def cgroup(self) -> KernelCgroup:
        return self.host.cgroup(self.kernel_id)

    @property
    def running(self) -> bool:
        """nsjail was spawned and has not exited."""
        return self.process is not None and self.process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """nsjail's exit status (its command's, or 128 + signal); None while it runs."""
        return None if self.process is None else self.process.poll()

    # -- prepare and spawn ---------------------------------------------------

    async def prepare(self) -> KernelLayout:
        """Create the jail's folder, workspace and cgroup (in a thread).

        If that fails, or the caller is cancelled meanwhile, it waits for the
        thread and removes what it made before it raises: nothing is left.
        """
        preparing = asyncio.ensure_future(
            asyncio.to_thread(self.host.prepare, self.kernel_id, self.limits, self._workspace)
        )
        try:
            self.layout = await wait_out(preparing)
        except BaseException:
            await self.destroy()
            raise
        return self.layout

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        pass_fds: Sequence[int] = (),
        config_text: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Render the config that runs ``argv`` in the jail; start nsjail inside the cgroup.

        nsjail runs in a session of its own, so a terminal's ^C reaches the
        engine, which shuts the jail down. Rendering and spawning (vfork and
        exec of the wrapper) take well under a millisecond: not worth a thread.

        Args:
            argv: the command inside the jail (``argv[0]`` is the program).
            stdin: a descriptor for nsjail's stdin (default: an empty pipe).
            stdout: a descriptor for nsjail's stdout (default: the jail's output
                file, ``kernel.out``, where its stderr always goes).
            pass_fds: descriptors the command inherits, at the same numbers.
            config_text: the config, rendered already (:meth:`render` of
                ``argv`` and ``pass_fds``, or what its caller knows to be it).
        """
        layout = self.layout
        if layout is None:
            raise RuntimeError("spawn() before prepare()")
        if config_text is None:
            config_text = self.render(argv, pass_fds=pass_fds)
        layout.config_file.write_text(config_text)
        empty: int | None = None
        if stdin is None:
            empty, writer = os.pipe2(os.O_CLOEXEC)
            os.close(writer)
        try:
            with open(layout.output_file, "ab") as output:
                self.process = subprocess.Popen(
                    self.host.launch_argv(layout),
                    stdin=empty if stdin is None else stdin,
                    stdout=output if stdout is None else stdout,
                    stderr=output,
                    env=_NSJAIL_ENV,
                    cwd=layout.root,
                    start_new_session=True,
                    pass_fds=tuple(pass_fds),
                )
        finally:
            if empty is not None:
                os.close(empty)
        return self.process

    def render(self, argv: list[str], *, pass_fds: Sequence[int] = ()) -> str:
        """The nsjail config that runs ``argv`` in this (prepared) jail, from its policy."""
        if self.layout is None:
            raise RuntimeError("render() before prepare()")
        if self.policy is None:
            raise RuntimeError("a jail made from limits alone is spawned with its config rendered")
        return self.host.configs.text(
            self.policy, self.layout, self.host.runtime, argv, pass_fds=pass_fds
        )

    # -- wait and diagnose ---------------------------------------------------

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until nsjail has exited; False if ``timeout_s`` passed first."""
        return self.process is None or await wait_exit(self.process, timeout_s)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of nsjail's log and of the jail's own output, for diagnostics."""
        if self.layout is None:
            return ""
        parts = []
        for path in (self.layout.log_file, self.layout.output_file):
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            kept = [t for t in text if _LOG_NOISE not in t]
            if kept:
                parts.append("\n".join(kept[-lines:]))
        return "\n".join(parts)

    @contextlib.asynccontextmanager
    async def starting(
        self, what: str, give_up: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Around the start of what runs in the jail: a failure gives up and says why.

        If the body raises, the log tail is read, then ``give_up`` (the
        owner's shutdown, which removes the jail) is awaited; a cancellation
        or ^C is then re-raised as it is, anything else becomes
        :class:`~sandkernel.errors.KernelStartFailed` naming ``what``, the
        cause and the log, and the command that checks the sandbox.
        """
        try:
            yield
        except BaseException as exc:
            detail = self.log_tail()
            await give_up()
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise KernelStartFailed(
                f"{what} did not start: {exc}"
                + (f"\n--- sandbox log ---\n{detail}" if detail else "")
                + "\n(run `sandkernel doctor` to check the sandbox)"
            ) from None

    # -- stop and destroy ----------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM to nsjail alone: it kills the jail and exits."""
        self._signal_nsjail(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL nsjail and every process in the jail's cgroup, now."""
        self._signal_nsjail(signal.SIGKILL)
        self.cgroup.kill_all()

    def _signal_nsjail(self, signum: signal.Signals) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def stop(self, grace_s: float = 1.0, *, terminate: bool = True) -> bool:
        """End nsjail in bounded time: SIGTERM, ``grace_s`` to exit, then SIGKILL of all.

        Args:
            grace_s: how long nsjail may take to exit before it and its cgroup
                are SIGKILLed (it then has :data:`_KILLED_EXIT_S` more).
            terminate: False when the caller has asked it to end its own way
                (the fork server exits at EOF on its stdin): no SIGTERM then.

        Returns:
            Whether nsjail has exited (True if it was never spawned).
        """
        process = self.process
        if process is None:
            return True
        if terminate:
            self.terminate()
        if await wait_exit(process, grace_s):
            return True
        self.kill()
        return await wait_exit(process, _KILLED_EXIT_S)

    async def destroy(self) -> None:
        """Kill what is left in the jail, unmount and remove its folder and cgroup; reap nsjail.

        Idempotent. A cancellation meanwhile (two workers failing at once in
        a pool's start, whose task group then cancels the other) waits for
        the removal to end before it is re-raised: otherwise the caller
        would go on while the jail's traces still exist.
        """
        destroying = asyncio.ensure_future(asyncio.to_thread(self.host.destroy, self.kernel_id))
        await wait_out(destroying)
        # nsjail was in the cgroup the removal emptied: reaped here if its stop
        # was cut short (cancelled) or never made, not left a zombie whose
        # Popen warns as it is collected.
        process = self.process
        if process is not None and process.poll() is None:
            await wait_exit(process, _KILLED_EXIT_S)
