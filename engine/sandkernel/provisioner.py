"""A ``jupyter_client`` kernel provisioner that starts ipykernel inside nsjail.

Registered as the entry point ``sandkernel-provisioner`` and selected by the
``sandkernel-python`` kernel spec (``metadata.kernel_provisioner``), so any
Jupyter client can start a sandboxed kernel. sandkernel itself passes a
:class:`SandboxLaunch` to ``start_kernel(sandbox=...)``; a plain Jupyter
client gets a sandbox built from the spec's ``config`` (``policy``).

The kernel talks over the ``ipc`` transport: its sockets live in a
per-kernel folder bound into the sandbox at ``/run/sandkernel``. The kernel
reads a connection file with the in-sandbox paths; the client uses the same
sockets through their host paths.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import (
    CONNECTION_DIR_IN_JAIL,
    SANDBOX_GID,
    SANDBOX_UID,
    KernelLayout,
    SandboxHost,
    render_config_text,
    render_nsjail_config,
)

IPC_NAME = "k"
CONNECTION_FILE_IN_JAIL = f"{CONNECTION_DIR_IN_JAIL}/kernel.json"


async def wait_exit(process: subprocess.Popen[bytes]) -> None:
    """Wait for a child process to exit without polling (pidfd in the event loop)."""
    if process.poll() is not None:
        return
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process.poll()
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    process.wait()


@dataclass
class SandboxLaunch:
    """Everything the provisioner needs to start one kernel."""

    host: SandboxHost
    policy: Policy
    layout: KernelLayout
    owns_host: bool = False


class SandboxProvisioner(LocalProvisioner):
    """Launches the kernel under nsjail, inside its own cgroup."""

    launch: SandboxLaunch | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        launch = kwargs.pop("sandbox", None)
        if launch is None:
            launch = await asyncio.to_thread(self._standalone_launch)
        self.launch = launch
        km = self.parent
        layout = launch.layout
        if km is not None:
            # sandkernel's kernel sets these before start; a plain Jupyter
            # client gets them here.
            km.transport = "ipc"
            km.ip = str(layout.connection_dir / IPC_NAME)
            km.connection_file = str(layout.root / "connection.json")
        kwargs = await super().pre_launch(**kwargs)
        self._write_jail_connection_file(layout)
        argv = [
            launch.host.runtime.python if arg == "python" else arg for arg in self.kernel_spec.argv
        ]
        argv = [CONNECTION_FILE_IN_JAIL if a == "{connection_file}" else a for a in argv]
        config = render_nsjail_config(launch.policy, layout, launch.host.runtime, argv)
        layout.config_file.write_text(render_config_text(config))
        kwargs["cmd"] = launch.host.launch_argv(layout)
        # nsjail's own environment; the sandbox's is set by the config alone.
        kwargs["env"] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        kwargs["cwd"] = str(layout.root)
        return kwargs

    def _standalone_launch(self) -> SandboxLaunch:
        host = SandboxHost()
        policy = load_policy(self.config.get("policy") if self.config else None)
        kernel_id = host.new_kernel_id()
        layout = host.prepare(kernel_id, policy)
        return SandboxLaunch(host, policy, layout, owns_host=True)

    def _write_jail_connection_file(self, layout: KernelLayout) -> None:
        info = dict(self.connection_info)
        info["ip"] = f"{CONNECTION_DIR_IN_JAIL}/{IPC_NAME}"
        info["transport"] = "ipc"
        for key, value in list(info.items()):
            if isinstance(value, bytes):
                info[key] = value.decode()
        path = layout.connection_dir / "kernel.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.chown(path, SANDBOX_UID, SANDBOX_GID)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        assert self.launch is not None
        # Opening a local file is instant; not worth a thread.
        with open(self.launch.layout.output_file, "ab") as out:  # noqa: ASYNC230
            kwargs["stdout"] = out
            kwargs["stderr"] = subprocess.STDOUT
            return await super().launch_kernel(cmd, **kwargs)

    async def wait(self) -> int | None:
        # LocalProvisioner polls every 100 ms; a pidfd wakes us the moment nsjail exits.
        process = self.process
        if process is None:
            return 0
        await wait_exit(process)
        self.process = None
        return process.returncode

    async def wait_exit(self) -> None:
        """Wait until nsjail has exited, keeping ``process`` for its exit code."""
        if self.process is not None:
            await wait_exit(self.process)

    async def terminate(self, restart: bool = False) -> None:
        # SIGTERM to nsjail alone: it kills the jail and exits.
        if self.process is not None:
            try:
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        launch = self.launch
        if launch is None or restart:
            return
        await asyncio.to_thread(launch.host.destroy, launch.layout.kernel_id)
        if launch.owns_host:
            launch.host.close()
        self.launch = None

    @property
    def exit_code(self) -> int | None:
        """nsjail's exit status: the kernel's, or 128 + signal if it was killed."""
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of nsjail's log and the kernel's own output, for diagnostics."""
        if self.launch is None:
            return ""
        parts = []
        for path in (self.launch.layout.log_file, self.launch.layout.output_file):
            try:
                text = Path(path).read_text(errors="replace").splitlines()
            except OSError:
                continue
            kept = [t for t in text if "no version information available" not in t]
            if kept:
                parts.append("\n".join(kept[-lines:]))
        return "\n".join(parts)
