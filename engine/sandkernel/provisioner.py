"""A ``jupyter_client`` kernel provisioner that starts ipykernel inside nsjail.

Registered as the entry point ``sandkernel-provisioner`` and selected by the
``sandkernel-python`` kernel spec (``metadata.kernel_provisioner``), so any
Jupyter client can start a sandboxed kernel. sandkernel itself passes a
:class:`~sandkernel.sandbox.jail.Jail` it has prepared to
``start_kernel(sandbox=...)``; a plain Jupyter client gets a jail, on a host
of its own, built from the spec's ``config`` (``policy``). Either way the jail
spawns nsjail, waits for it and removes it: the same lifecycle as a batch
worker's. A plain client's restart starts the kernel in a new sandbox (the
old one removed); a restart in a jail the caller passed starts it again in
that jail. Either way its connection info changes (new sockets, pinned
anew): a client reconnects with the manager's new info.

The kernel talks over the ``ipc`` transport: its sockets live in a
per-kernel folder bound into the sandbox at ``/run/sandkernel``. The kernel
reads a connection file with the in-sandbox paths. Clients never use those
names: the folder is the sandbox's to write, and zmq (re)connects by name,
so code in the sandbox could swap a socket for a link to any host socket
and have the manager's client, root in the host's mounts, connect to it.
Once the kernel has bound its sockets, each is opened as bound (``O_PATH``,
not through a link, checked to be a socket), and the connection info this
provisioner returns points into a root-only folder of links to those
descriptors (``/proc/<pid>/fd/N``, this process's): the same sockets
whatever their names in the sandbox point to later. The connection file
jupyter_client writes from that info serves any client of root's on the
host (``jupyter console --existing``) while this process holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from sandkernel.errors import KernelStartFailed
from sandkernel.policy import load_policy
from sandkernel.sandbox import (
    CONNECTION_DIR_IN_JAIL,
    SANDBOX_GID,
    SANDBOX_UID,
    Jail,
    KernelLayout,
    SandboxHost,
    wait_exit,
)
from sandkernel.sandbox.zygote import ForkedKernel, Zygote

IPC_NAME = "k"
#: the root-only folder, in the jail's, of the links to the kernel's sockets as bound
PIN_DIR = "pin"
CONNECTION_FILE_IN_JAIL = f"{CONNECTION_DIR_IN_JAIL}/kernel.json"


class SandboxProvisioner(LocalProvisioner):
    """Launches the kernel under nsjail, inside its own cgroup: a prepared :class:`Jail`."""

    jail: Jail | None = None
    #: the jail's host was made for this kernel alone (a plain Jupyter client's)
    owns_host = False
    #: fork the kernel from this zygote into the jail (``start_kernel(zygote=...)``)
    zygote: Zygote | None = None
    #: set by launch_kernel() when the kernel was forked from the zygote
    forked: ForkedKernel | None = None
    #: how long launch_kernel() waits for the kernel to bind its sockets
    #: (``start_kernel(bind_timeout_s=...)``)
    bind_timeout_s = 60.0
    #: the kernel's sockets as bound, which the pinned links lead to
    pinned_fds: tuple[int, ...] = ()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        jail = kwargs.pop("sandbox", None)
        self.zygote = kwargs.pop("zygote", None)
        self.bind_timeout_s = float(kwargs.pop("bind_timeout_s", self.bind_timeout_s))
        if jail is None:
            jail = await self._standalone_jail()
        self.jail = jail
        layout = jail.layout
        if layout is None:
            raise RuntimeError("start_kernel(sandbox=...) takes a prepared Jail")
        km = self.parent
        if km is not None:
            # A restart's: it named the old kernel's pinned links, and would be
            # kept (jupyter_client writes the file only once) over the new ones.
            km.cleanup_connection_file()
            # sandkernel's kernel sets these before start; a plain Jupyter
            # client gets them here.
            km.transport = "ipc"
            km.ip = str(layout.connection_dir / IPC_NAME)
            km.connection_file = str(layout.root / "connection.json")
        kwargs = await super().pre_launch(**kwargs)
        self._write_jail_connection_file(layout)
        # The command inside the jail: launch_kernel() hands it to the jail,
        # which renders the nsjail config around it.
        python = jail.host.runtime.python
        argv = [python if arg == "python" else arg for arg in self.kernel_spec.argv]
        kwargs["cmd"] = [CONNECTION_FILE_IN_JAIL if a == "{connection_file}" else a for a in argv]
        kwargs["cwd"] = str(layout.root)
        return kwargs

    async def _standalone_jail(self) -> Jail:
        """A host and a jail of their own, for a kernel a plain Jupyter client starts."""
        host = await asyncio.to_thread(SandboxHost)
        try:
            jail = Jail(host, load_policy(self.config.get("policy") if self.config else None))
            await jail.prepare()
        except BaseException:
            host.close()
            raise
        self.owns_host = True
        return jail

    def _write_jail_connection_file(self, layout: KernelLayout) -> None:
        info = dict(self.connection_info)
        info["ip"] = f"{CONNECTION_DIR_IN_JAIL}/{IPC_NAME}"
        info["transport"] = "ipc"
        for key, value in list(info.items()):
            if isinstance(value, bytes):
                info[key] = value.decode()
        # The folder is the sandbox's to write: in a jail started again, a name
        # there may be anything it left (a link to a host file, for root to write).
        path = layout.connection_dir / "kernel.json"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchown(f.fileno(), SANDBOX_UID, SANDBOX_GID)
            json.dump(info, f)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start nsjail running ``cmd``, the kernel's command inside the jail.

        With a zygote, nsjail runs the stub and the kernel is forked into the
        jail, running ``cmd``'s arguments (``-f <connection file>``). Returns
        once the kernel has bound its sockets, with the connection info of
        their pinned links (see the module).

        The jail starts nsjail (in the jail's folder, ``kwargs["cwd"]``);
        jupyter_client's other Popen options in ``kwargs`` are not used, and
        the sandbox's environment is set by the config alone.
        """
        if self.jail is None:
            raise RuntimeError("launch_kernel() before pre_launch()")
        try:
            return await self._launch(self.jail, cmd, kwargs.get("cwd"))
        except BaseException:
            # jupyter_client cleans nothing up after a failed launch: a jail of
            # our own goes now (a caller's jail is the caller's to destroy).
            if self.owns_host:
                with anyio.CancelScope(shield=True):
                    await self._discard_own_jail()
            raise

    async def _launch(self, jail: Jail, cmd: list[str], cwd: str | None) -> KernelConnectionInfo:
        if self.zygote is not None:
            # The same sandbox, its init a stub; the kernel is forked into it.
            self.forked = await self.zygote.fork_into(jail, cmd)
            process = jail.process
            assert process is not None
        else:
            process = jail.spawn(cmd)
        self.process = process
        self.pid = process.pid
        self.pgid = process.pid  # a session, and so a process group, of its own
        self.cwd = cwd
        info = self.connection_info.copy()
        ports = [
            int(info["shell_port"]),
            int(info["iopub_port"]),
            int(info["stdin_port"]),
            int(info["control_port"]),
            int(info["hb_port"]),  # for the clients that use it
        ]
        info["ip"] = await self._pin_sockets(ports)
        return info

    async def _pin_sockets(self, ports: Sequence[int]) -> str:
        """The ip (path prefix) of links to the kernel's sockets as bound; see the module."""
        assert self.jail is not None and self.jail.layout is not None
        layout = self.jail.layout
        named = str(layout.connection_dir / IPC_NAME)
        deadline = time.monotonic() + self.bind_timeout_s
        while not _all_exist(named, ports):  # a few stat calls
            if self.process is None or self.process.poll() is not None:
                raise KernelStartFailed("the kernel ended before it bound its sockets")
            if time.monotonic() > deadline:
                raise KernelStartFailed(
                    f"the kernel did not bind its sockets within {self.bind_timeout_s:g} s"
                )
            await asyncio.sleep(0.002)
        folder = layout.root / PIN_DIR
        self.pinned_fds = _pin(named, ports, folder)
        return str(folder / IPC_NAME)

    async def wait(self) -> int | None:
        # LocalProvisioner polls every 100 ms; a pidfd wakes us the moment nsjail exits.
        process = self.process
        if process is None:
            return 0
        await wait_exit(process)
        self.process = None
        return process.returncode

    async def terminate(self, restart: bool = False) -> None:
        if self.jail is not None:
            self.jail.terminate()

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        fds, self.pinned_fds = self.pinned_fds, ()
        for fd in fds:
            os.close(fd)
        jail = self.jail
        if jail is None:
            return
        if restart and not self.owns_host:
            # A jail the caller passed is the caller's, to start again in: its
            # links go, and the old kernel's socket names, so that the next
            # launch waits for the new kernel's and pins those.
            if jail.layout is not None:
                _unpin(jail.layout)
            return
        # A restart of a jail of our own starts in a new one (pre_launch).
        if self.owns_host:
            await self._discard_own_jail()
        else:
            await jail.destroy()
            self.jail = None

    async def _discard_own_jail(self) -> None:
        """Stop and remove the jail made for this kernel, and close its host."""
        jail, self.jail = self.jail, None
        self.owns_host = False
        if jail is not None:
            await jail.stop()
            await jail.destroy()
            jail.host.close()


def _all_exist(prefix: str, ports: Sequence[int]) -> bool:
    return all(os.path.exists(f"{prefix}-{port}") for port in ports)


def _unpin(layout: KernelLayout) -> None:
    """Remove the pinned links and the sockets' names (not what a name links to)."""
    shutil.rmtree(layout.root / PIN_DIR, ignore_errors=True)
    # The folder is the sandbox's: entries are removed by name, from its fd.
    folder = os.open(layout.connection_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in os.listdir(folder):
            if name.startswith(f"{IPC_NAME}-"):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(name, dir_fd=folder)
    finally:
        os.close(folder)


def _pin(prefix: str, ports: Sequence[int], folder: Path) -> tuple[int, ...]:
    """Open each ``<prefix>-<port>`` socket (not a symlink) and link ``folder`` to it."""
    folder.mkdir(mode=0o700)
    fds: list[int] = []
    try:
        for port in ports:
            fd = os.open(f"{prefix}-{port}", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(fd)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise KernelStartFailed(f"{IPC_NAME}-{port} is not the kernel's socket")
            # By this process's pid, not /proc/self: the connection file means the
            # same sockets to any other process of root's (jupyter console --existing).
            (folder / f"{IPC_NAME}-{port}").symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return tuple(fds)
