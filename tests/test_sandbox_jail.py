"""One jail's lifecycle, as kernels and batch workers use it: prepare, spawn, wait, stop, destroy.

The ``host`` fixture fails a test that leaves a folder, cgroup, mount or fd behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal

import pytest

from sandkernel.errors import KernelStartFailed
from sandkernel.policy import (
    MAX_INODES,
    MAX_NOFILE,
    MAX_PIDS,
    MAX_SIZE_MB,
    Policy,
    load_policy,
)
from sandkernel.sandbox import Jail, SandboxHost
from sandkernel.sandbox.cgroups import KernelCgroup

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


def shell(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


async def test_a_jail_runs_its_command_in_its_cgroup_and_leaves_nothing(
    host: SandboxHost,
) -> None:
    jail = Jail(host, load_policy())
    layout = await jail.prepare()
    assert layout.root.is_dir() and jail.cgroup.dirs
    jail.spawn(shell("echo from-the-jail; cat /proc/self/cgroup; exit 3"))
    assert await jail.wait(30)
    assert jail.exit_code == 3 and not jail.running
    tail = jail.log_tail()
    assert "from-the-jail" in tail
    await jail.destroy()
    assert not layout.root.exists()
    await jail.destroy()  # idempotent


async def test_stop_kills_the_whole_jail_when_asked_to_end_another_way(
    host: SandboxHost,
) -> None:
    jail = Jail(host, load_policy())
    await jail.prepare()
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    try:
        # cat waits for the EOF that never comes: only the SIGKILL ends it
        jail.spawn(["/bin/cat"], stdin=stdin_r)
    finally:
        os.close(stdin_r)
    try:
        assert jail.running
        assert await jail.stop(0.2, terminate=False)
        assert jail.exit_code == -signal.SIGKILL
    finally:
        os.close(stdin_w)
        await jail.destroy()


async def test_destroy_reaps_a_jail_whose_stop_was_cut_short(host: SandboxHost) -> None:
    """No unreaped nsjail, whose ``Popen`` would warn as it is collected, in another test."""
    jail = Jail(host, load_policy())
    await jail.prepare()
    jail.spawn(shell("sleep 60"))
    stopping = asyncio.ensure_future(jail.stop(30))
    await asyncio.sleep(0)  # its SIGTERM is sent; the wait for the exit is cancelled
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await jail.destroy()
    assert jail.process is not None and jail.process.returncode is not None


async def test_stop_terminates_first(host: SandboxHost) -> None:
    jail = Jail(host, load_policy())
    await jail.prepare()
    jail.spawn(shell("sleep 60"))
    try:
        assert await jail.stop(10)
        # nsjail ended on SIGTERM, in the grace period: it was never SIGKILLed
        assert jail.exit_code is not None and jail.exit_code != -signal.SIGKILL
    finally:
        await jail.destroy()


async def test_a_start_that_fails_gives_up_and_says_why(host: SandboxHost) -> None:
    jail = Jail(host, load_policy())
    await jail.prepare()
    gave_up: list[bool] = []

    async def give_up() -> None:
        gave_up.append(await jail.stop())
        await jail.destroy()

    with pytest.raises(KernelStartFailed) as failed:
        async with jail.starting("test jail", give_up):
            jail.spawn(["/nonexistent/program"])
            await jail.wait(30)
            raise RuntimeError(f"it exited with {jail.exit_code}")
    message = str(failed.value)
    assert message.startswith("test jail did not start: it exited with ")
    assert "--- sandbox log ---" in message and "/nonexistent/program" in message
    assert message.endswith("(run `sandkernel doctor` to check the sandbox)")
    assert gave_up == [True]


async def test_a_cancelled_start_gives_up_and_stays_cancelled(host: SandboxHost) -> None:
    jail = Jail(host, load_policy())
    await jail.prepare()
    gave_up: list[bool] = []

    async def give_up() -> None:
        gave_up.append(True)
        await jail.destroy()

    async def start() -> None:
        async with jail.starting("test jail", give_up):
            jail.spawn(shell("sleep 60"))
            await asyncio.sleep(60)

    task = asyncio.ensure_future(start())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gave_up == [True]
    assert await jail.stop()


async def test_a_prepare_that_fails_midway_leaves_nothing(
    host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder, its tmpfs and the workspace's are made, then the cgroup cannot be.
    def no_room(self: KernelCgroup, policy: Policy) -> None:
        raise OSError(errno.ENOSPC, "no room for a cgroup")

    monkeypatch.setattr(KernelCgroup, "create", no_room)
    jail = Jail(host, load_policy())
    with pytest.raises(KernelStartFailed, match="cannot create the kernel's cgroup .*no room"):
        await jail.prepare()
    assert not (host.root / jail.kernel_id).exists()


async def test_a_prepare_cancelled_midway_leaves_nothing(host: SandboxHost) -> None:
    jail = Jail(host, load_policy())
    task = asyncio.ensure_future(jail.prepare())
    await asyncio.sleep(0)  # the thread has started preparing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (host.root / jail.kernel_id).exists()


async def test_a_destroy_cancelled_midway_still_ends_before_it_returns(
    host: SandboxHost,
) -> None:
    jail = Jail(host, load_policy())
    layout = await jail.prepare()
    task = asyncio.ensure_future(jail.destroy())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not layout.root.exists()


async def test_a_policy_at_every_upper_bound_starts_with_those_limits(host: SandboxHost) -> None:
    """The bounds are what the kernel and nsjail take, not more."""
    sizes = ("memory_mb", "workspace_mb", "tmp_mb", "shm_mb", "file_size_mb")
    # A sandbox cannot have more open files than the engine's own hard limit
    # (the host's choice, which root cannot always raise, as in a container).
    nofile = min(MAX_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    policy = Policy(
        **dict.fromkeys(sizes, MAX_SIZE_MB),
        pids_max=MAX_PIDS,
        nofile=nofile,
        workspace_inodes=MAX_INODES,
    )
    jail = Jail(host, policy)
    await jail.prepare()
    try:
        jail.spawn(shell("grep -E 'Max (file size|open files)' /proc/self/limits"))
        assert await jail.wait(30)
        tail = jail.log_tail()
        assert jail.exit_code == 0, tail
        pids_max = (jail.cgroup.dirs["pids"] / "pids.max").read_text().strip()
    finally:
        await jail.destroy()
    assert pids_max == str(MAX_PIDS)
    assert f"Max file size             {MAX_SIZE_MB << 20}" in tail
    assert f"Max open files            {nofile}" in tail
