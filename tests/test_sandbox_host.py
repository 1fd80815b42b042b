"""The host's side of sandboxes.

Sweeping: what a killed engine left is removed; a live engine's kernels are
not. A host workspace the host refuses leaves nothing made. What the host
cannot make fails the start, saying which policy settings it was made from.
"""

from __future__ import annotations

import os
import resource
import signal
import textwrap
from pathlib import Path

import psutil
import pytest

from sandkernel.errors import BadInput, KernelStartFailed
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import SandboxHost, iter_sandkernel_cgroups, mounts_under
from tests.conftest import engine_process

pytestmark = pytest.mark.sandbox


@pytest.mark.anyio
async def test_a_sweep_spares_a_live_engine_that_uses_another_root(short_dir: Path) -> None:
    with SandboxHost(short_dir / "live-root") as live:
        kernel = SandboxedKernel(live, load_policy())
        await kernel.start()
        try:
            with SandboxHost(short_dir / "other-root") as other:
                assert kernel.kernel_id not in other.sweep()
            assert kernel.alive
            assert (await kernel.execute("1 + 1")).text == "2"
        finally:
            await kernel.shutdown()


def test_sigkilled_engine_leaves_nothing_once_the_next_one_started(
    tmp_path: Path, short_dir: Path
) -> None:
    root = short_dir / "rt"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import asyncio, pathlib
        from sandkernel.engine import Engine
        async def main():
            engine = Engine(pool_size=2, prewarm_imports=(), runtime_dir={str(root)!r},
                            store_dir={str(tmp_path / "store")!r}, handle_sigterm=False)
            await engine.start()
            s = await engine.session("doomed")
            await s.run("import subprocess; p = subprocess.Popen(['sleep', '300'])")
            while (await engine.stats()).pool.warm < 2:
                await asyncio.sleep(0.05)
            pathlib.Path({str(ready)!r}).write_text(engine._host.owner)
            await asyncio.sleep(300)
        asyncio.run(main())
    """)
    with engine_process(script, ready) as (proc, owner):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with SandboxHost(root) as host:
        cgroups = [p for p in iter_sandkernel_cgroups(host.cgroups) if p.name.startswith(owner)]
        assert cgroups == []
        assert [p for p in root.iterdir() if p.name.startswith(owner)] == []
        assert mounts_under(root) == []
    leftover = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["cmdline"] and owner in " ".join(p.info["cmdline"])
    ]
    assert leftover == []


def test_a_runtime_folder_too_long_for_socket_paths_is_refused_naming_the_setting(
    short_dir: Path,
) -> None:
    root = short_dir / ("r" * (70 - len(str(short_dir)) - 1))  # one byte too long
    with pytest.raises(BadInput, match=r"70 bytes long.*--runtime-dir"):
        SandboxHost(root)
    assert not root.exists()


@pytest.mark.anyio
async def test_a_kernel_runs_in_the_longest_runtime_folder_allowed(short_dir: Path) -> None:
    """The room kept for a kernel's socket paths is room enough: no "File name too long"."""
    root = short_dir / ("r" * (69 - len(str(short_dir)) - 1))
    assert len(str(root)) == 69
    with SandboxHost(root) as host:
        kernel = SandboxedKernel(host, load_policy())
        try:
            await kernel.start()
            assert (await kernel.execute("1 + 1")).text == "2"
        finally:
            await kernel.shutdown()


def test_a_host_workspace_in_the_runtime_folder_is_refused_before_anything_is_made(
    short_dir: Path,
) -> None:
    with SandboxHost(short_dir / "rt") as host:
        spare = host.root / "spare"
        kernel_id = host.new_kernel_id()
        try:
            with pytest.raises(BadInput, match="the engine's own folder"):
                host.prepare(kernel_id, load_policy(), spare)
            assert not spare.exists()
            assert not (host.root / kernel_id).exists()
        finally:
            host.destroy(kernel_id)  # what a wrong acceptance made


def test_a_host_workspace_in_a_folder_the_engine_refuses_is_refused_at_the_claim(
    tmp_path: Path, short_dir: Path
) -> None:
    """The engine's store too: checked where the folder is handed over, not only before."""
    store = tmp_path / "store"
    store.mkdir()
    with SandboxHost(short_dir / "rt", refused_workspaces=[store]) as host:
        inside = store / "spare"
        kernel_id = host.new_kernel_id()
        try:
            with pytest.raises(BadInput, match="the engine's own folder"):
                host.prepare(kernel_id, load_policy(), inside)
            assert not inside.exists()
        finally:
            host.destroy(kernel_id)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        # pids.max takes at most Linux's PID_MAX_LIMIT (4194304)
        (
            {"pids_max": 5_000_000},
            "cannot create the kernel's cgroup (with the policy's memory_mb = 1024, cpus = 1 "
            "and pids_max = 5000000): [Errno 22] Invalid argument",
        ),
        # tmpfs takes at most about 2**54 files
        (
            {"workspace_inodes": 99_999_999_999_999_999},
            "cannot mount the workspace's tmpfs (sized by the policy's workspace_mb = 1024 and "
            "workspace_inodes = 99999999999999999): [Errno 22] mount tmpfs at ",
        ),
    ],
)
def test_what_the_host_refuses_to_prepare_fails_the_start_naming_the_policy_settings(
    host: SandboxHost, setting: dict[str, int], problem: str
) -> None:
    """A value the policy's validation refuses, put past it: the host's refusal is no traceback."""
    policy = Policy.model_construct(**{**Policy().model_dump(), **setting})
    kernel_id = host.new_kernel_id()
    try:
        with pytest.raises(KernelStartFailed) as failed:
            host.prepare(kernel_id, policy)
    finally:
        host.destroy(kernel_id)
    message = str(failed.value)
    assert message.startswith(f"the sandbox could not be prepared: {problem}")
    assert message.endswith("; run `sandkernel doctor` to check the sandbox")


def test_more_open_files_than_the_engine_may_have_fails_the_start_before_anything_is_made(
    host: SandboxHost,
) -> None:
    """nsjail sets the limit once unprivileged: above the engine's own, it failed (EPERM)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # Past the policy's bound if need be: the engine's own limit may be the bound.
    policy = Policy.model_construct(**{**Policy().model_dump(), "nofile": hard + 1})
    kernel_id = host.new_kernel_id()
    try:
        with pytest.raises(KernelStartFailed) as failed:
            host.prepare(kernel_id, policy)
        assert not (host.root / kernel_id).exists()
    finally:
        host.destroy(kernel_id)
    assert str(failed.value) == (
        f"the policy's nofile = {hard + 1} is above this engine's own hard limit of {hard} open "
        "files, which a sandbox cannot exceed: lower nofile, or start the engine with a higher "
        "limit (`ulimit -Hn`, LimitNOFILE= in a systemd unit)"
    )


def test_a_larger_file_than_the_engine_may_write_fails_the_start_before_anything_is_made(
    host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = resource.getrlimit

    def one_gib_per_file(limit: int) -> tuple[int, int]:
        return (1 << 30, 1 << 30) if limit == resource.RLIMIT_FSIZE else real(limit)

    monkeypatch.setattr(resource, "getrlimit", one_gib_per_file)
    kernel_id = host.new_kernel_id()
    try:
        with pytest.raises(KernelStartFailed) as failed:
            host.prepare(kernel_id, Policy(file_size_mb=1025))
        assert not (host.root / kernel_id).exists()
        assert str(failed.value).startswith(
            "the policy's file_size_mb = 1025 is above this engine's own hard limit of 1024 "
            "MiB per file, which a sandbox cannot exceed: lower file_size_mb"
        )
        host.prepare(kernel_id, Policy(file_size_mb=1024))  # as much as the engine may write
    finally:
        host.destroy(kernel_id)
