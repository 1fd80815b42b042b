"""The provisioner as any Jupyter client uses it: jupyter_client's own manager and client."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from sandkernel._resources import data_dir
from sandkernel.errors import KernelStartFailed
from sandkernel.kernel import KERNEL_NAME
from sandkernel.policy import load_policy
from sandkernel.provisioner import SandboxProvisioner
from sandkernel.sandbox import Jail, SandboxHost
from tests.security._support import host_unix_socket, nothing_connects, swap_sockets_for_a_link

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture
async def started() -> AsyncIterator[tuple[AsyncKernelManager, AsyncKernelClient]]:
    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(data_dir("kernels"))]),
    )
    await km.start_kernel()
    client = km.client()
    assert isinstance(client, AsyncKernelClient)
    try:
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        yield km, client
    finally:
        client.stop_channels()
        await km.shutdown_kernel(now=True)


async def _run(client: AsyncKernelClient, code: str) -> dict[str, Any]:
    """The cell's reply, with its printed text under ``"stdout"``."""
    msg_id = client.execute(code)
    stdout = ""
    while True:
        msg = await client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            stdout += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply: dict[str, Any] = (await client.get_shell_msg(timeout=30))["content"]
    return {**reply, "stdout": stdout}


async def _run_on_a_new_client(km: AsyncKernelManager, code: str) -> dict[str, Any]:
    """``code`` run by a client made now, from the manager's connection info as it is now."""
    client = km.client()
    assert isinstance(client, AsyncKernelClient)
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        return await _run(client, code)
    finally:
        client.stop_channels()


async def test_a_plain_jupyter_client_reaches_the_kernel_only_through_pinned_links(
    started: tuple[AsyncKernelManager, AsyncKernelClient],
) -> None:
    km, client = started
    folder = Path(km.ip).parent
    assert folder.name == "pin" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    for port in (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port):
        assert os.readlink(f"{km.ip}-{port}").startswith(f"/proc/{os.getpid()}/fd/")
    assert (await _run(client, "print(6 * 7)"))["stdout"] == "42\n"
    # The heartbeat too, for the clients that use it: it echoes through its link.
    context = zmq.asyncio.Context()
    beat = context.socket(zmq.REQ)
    try:
        beat.connect(f"ipc://{km.ip}-{km.hb_port}")
        await beat.send(b"ping")
        with anyio.fail_after(10):
            assert await beat.recv() == b"ping"
    finally:
        beat.close(linger=0)
        context.term()


async def test_another_process_of_roots_reaches_the_kernel_by_its_connection_file(
    started: tuple[AsyncKernelManager, AsyncKernelClient],
) -> None:
    """As ``jupyter console --existing`` does: the links lead to this process's sockets."""
    km, _ = started
    other = textwrap.dedent(f"""
        from jupyter_client import BlockingKernelClient
        client = BlockingKernelClient(connection_file={km.connection_file!r})
        client.load_connection_file()
        client.start_channels()
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive("print(6 * 7)", timeout=60)
        client.stop_channels()
        print(reply["content"]["status"])
    """)
    done = await anyio.run_process(
        [sys.executable, "-c", other], check=False, stderr=subprocess.STDOUT
    )
    assert done.stdout.decode().splitlines()[-2:] == ["42", "ok"], done.stdout.decode()


async def test_a_socket_swapped_for_a_host_link_is_not_reconnected_through(
    started: tuple[AsyncKernelManager, AsyncKernelClient],
) -> None:
    """The attack of the catalogue's kernel tests, against jupyter_client's own manager."""
    km, client = started
    with host_unix_socket() as (path, host_socket):
        swap = await _run(client, swap_sockets_for_a_link(path))
        assert swap["status"] == "ok" and int(swap["stdout"]) >= 1, swap
        await nothing_connects(host_socket)
    assert (await _run(client, "print(1 + 1)"))["stdout"] == "2\n"


async def test_a_restart_starts_in_a_new_sandbox_and_leaves_nothing_of_the_old(
    started: tuple[AsyncKernelManager, AsyncKernelClient],
) -> None:
    km, client = started
    assert (await _run(client, "open('/tmp/old', 'w').write('x')"))["status"] == "ok"
    provisioner = km.provisioner
    assert isinstance(provisioner, SandboxProvisioner) and provisioner.jail is not None
    old = provisioner.jail
    assert old.layout is not None
    old_root, old_cgroups = old.layout.root, set(old.cgroup.dirs.values())
    await km.restart_kernel(now=True)
    assert not old_root.exists()  # its folder, with its mounts
    assert not [d for d in old_cgroups if d.exists()]
    assert provisioner.jail is not None and provisioner.jail is not old
    # A new sandbox has new sockets: a client connects with the manager's new info.
    found = await _run_on_a_new_client(km, "import os\nprint(os.path.exists('/tmp/old'))")
    assert found["stdout"] == "False\n"  # not the old sandbox again


async def test_a_restart_in_the_callers_sandbox_reaches_the_new_kernel(
    host: SandboxHost,
) -> None:
    """A sandbox passed to start_kernel is the caller's: the kernel starts again in it."""
    jail = Jail(host, load_policy("default"))
    await jail.prepare()
    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(data_dir("kernels"))]),
    )
    try:
        await km.start_kernel(sandbox=jail)
        assert isinstance(km.provisioner, SandboxProvisioner)
        first = {os.fstat(fd).st_ino for fd in km.provisioner.pinned_fds}
        kept = await _run_on_a_new_client(km, "open('/mnt/data/kept', 'w').write('x')")
        assert kept["status"] == "ok"
        await km.restart_kernel(now=True)
        assert km.provisioner.jail is jail
        # Pinned anew, to the new kernel's sockets, not the old ones' names.
        pinned = {os.fstat(fd).st_ino for fd in km.provisioner.pinned_fds}
        assert len(pinned) == 5 and not pinned & first
        found = await _run_on_a_new_client(km, "print(open('/mnt/data/kept').read())")
        assert found["stdout"] == "x\n"  # the same sandbox, its workspace kept
    finally:
        await km.shutdown_kernel(now=True)
        await jail.stop()
        await jail.destroy()


async def test_a_launch_that_fails_leaves_nothing_of_its_sandbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[tuple[Path, set[Path]]] = []

    async def never_bound(self: SandboxProvisioner, ports: list[int]) -> str:
        assert self.jail is not None and self.jail.layout is not None
        made.append((self.jail.layout.root, set(self.jail.cgroup.dirs.values())))
        raise KernelStartFailed("the kernel did not bind its sockets")

    monkeypatch.setattr(SandboxProvisioner, "_pin_sockets", never_bound)
    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(data_dir("kernels"))]),
    )
    with pytest.raises(KernelStartFailed):
        await km.start_kernel()
    ((root, cgroups),) = made
    # jupyter_client cleans nothing up after a failed launch: the provisioner did.
    assert not root.exists() and not [d for d in cgroups if d.exists()]
