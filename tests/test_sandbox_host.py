"""The host's side of sandboxes.

Sweeping: what a killed engine left is removed; a live engine's kernels are
not. A host workspace the host refuses leaves nothing made.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import psutil
import pytest

from sandkernel.errors import BadInput
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import load_policy
from sandkernel.sandbox import SandboxHost, iter_sandkernel_cgroups, mounts_under
from tests.conftest import engine_process

pytestmark = pytest.mark.sandbox


@pytest.mark.anyio
async def test_a_sweep_spares_a_live_engine_that_uses_another_root(tmp_path: Path) -> None:
    with SandboxHost(tmp_path / "live-root") as live:
        kernel = SandboxedKernel(live, load_policy())
        await kernel.start()
        try:
            with SandboxHost(tmp_path / "other-root") as other:
                assert kernel.kernel_id not in other.sweep()
            assert kernel.alive
            assert (await kernel.execute("1 + 1")).text == "2"
        finally:
            await kernel.shutdown()


def test_sigkilled_engine_leaves_nothing_once_the_next_one_started(tmp_path: Path) -> None:
    root = tmp_path / "rt"
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


def test_a_host_workspace_in_the_runtime_folder_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    with SandboxHost(tmp_path / "rt") as host:
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
    tmp_path: Path,
) -> None:
    """The engine's store too: checked where the folder is handed over, not only before."""
    store = tmp_path / "store"
    store.mkdir()
    with SandboxHost(tmp_path / "rt", refused_workspaces=[store]) as host:
        inside = store / "spare"
        kernel_id = host.new_kernel_id()
        try:
            with pytest.raises(BadInput, match="the engine's own folder"):
                host.prepare(kernel_id, load_policy(), inside)
            assert not inside.exists()
        finally:
            host.destroy(kernel_id)
