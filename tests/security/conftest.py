"""The attack catalogue's fixtures.

Attacks live in ``test_*_attacks.py``; each test runs hostile code through
the public API and passes when the sandbox held; ``_tally.py`` counts them.

Kernels and engines are shared by the attacks of a module where the attack
does not destroy them (module-scoped fixtures); each is checked for leaks
when its module ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkernel import leaks
from sandkernel.engine import Engine
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import SandboxHost
from tests.conftest import leftovers, runtime_root
from tests.zygote import mode as zygote_mode

# ---------------------------------------------------------------------------
# policies

#: Small limits, so that resource attacks reach them in a second or two.
TIGHT = Policy(
    name="tight",
    memory_mb=256,
    cpus=0.5,
    pids_max=48,
    wall_timeout_s=20,
    interrupt_grace_s=1,
    workspace_mb=32,
    workspace_inodes=1024,
    tmp_mb=16,
    shm_mb=8,
    nofile=128,
    file_size_mb=8,
    output_max_bytes=64 * 1024,
)


# ---------------------------------------------------------------------------
# shared kernels


class KernelBox:
    """Kernels shared by a module's attacks; a dead one is replaced on demand."""

    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self._kernels: dict[str, SandboxedKernel] = {}
        self._all: list[SandboxedKernel] = []

    async def get(self, name: str = "main", policy: Policy | str | None = None) -> SandboxedKernel:
        """The shared kernel called ``name`` (started or restarted if needed)."""
        kernel = self._kernels.get(name)
        if kernel is None or not kernel.alive:
            kernel = await self._new(policy)
            self._all.append(kernel)
            await kernel.start()
            self._kernels[name] = kernel
        return kernel

    async def fresh(self, policy: Policy | str | None = None) -> SandboxedKernel:
        """A kernel of its own, for an attack that destroys it."""
        kernel = await self._new(policy)
        self._all.append(kernel)
        await kernel.start()
        return kernel

    async def _new(self, policy: Policy | str | None) -> SandboxedKernel:
        loaded = load_policy(policy)
        zygote = await zygote_mode.ZYGOTES.get(self.host, loaded) if zygote_mode.enabled() else None
        return SandboxedKernel(self.host, loaded, zygote=zygote)

    async def close(self) -> None:
        await asyncio.gather(*(k.shutdown() for k in self._all))
        await zygote_mode.ZYGOTES.close(self.host)


async def _nothing_left_of(owner: str) -> None:
    """Wait until nothing of ``owner``'s kernels is on the host; fail if something stays."""
    empty = leaks.LeakSnapshot()
    found = await asyncio.to_thread(
        leaks.wait_for_baseline,
        empty,
        roots=[runtime_root()],
        owner_prefix=owner + "-",
        rss_slack_bytes=None,
        fd_slack=None,  # the process's descriptors: checked by the per-test fixtures
    )
    assert not found, f"leaks of {owner} after the module's attacks: {found}"


@pytest.fixture(scope="module")
async def kernels() -> AsyncIterator[KernelBox]:
    """Sandboxed kernels shared by the attacks of one module; leak-checked at its end."""
    with SandboxHost(runtime_root()) as host:
        box = KernelBox(host)
        try:
            yield box
        finally:
            await box.close()
        left = leftovers(host)
    assert not left, f"sandbox resources left behind: {left}"
    await _nothing_left_of(host.owner)  # its owner lock included, now released


@pytest.fixture(scope="module")
async def engines(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[EngineBox]:
    """Engines shared by the attacks of one module; leak-checked at its end."""
    box = EngineBox(tmp_path_factory)
    try:
        yield box
    finally:
        owners = await box.close()
    for owner in owners:
        await _nothing_left_of(owner)


class EngineBox:
    """Engines shared by a module's attacks, one per configuration name."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self._tmp = tmp
        self._engines: dict[str, Engine] = {}

    async def get(self, name: str = "main", **kwargs: Any) -> Engine:
        """The shared engine called ``name``, started with ``kwargs`` the first time."""
        engine = self._engines.get(name)
        if engine is None:
            kwargs.setdefault("runtime_dir", runtime_root())
            kwargs.setdefault("store_dir", self._tmp.mktemp("store"))
            kwargs.setdefault("prewarm_imports", ())
            kwargs.setdefault("pool_size", 2)
            kwargs.setdefault("handle_sigterm", False)
            engine = Engine(**kwargs)
            await engine.start()
            self._engines[name] = engine
        return engine

    async def close(self) -> list[str]:
        """Close every engine; return their owners."""
        owners = []
        for engine in self._engines.values():
            host = engine._host
            await engine.aclose()
            if host is not None:
                owners.append(host.owner)
                left = leftovers(host)
                assert not left, f"engine left resources behind: {left}"
        return owners


@pytest.fixture
def host_secret(tmp_path: Path) -> Iterator[Path]:
    """A file on the host that no sandbox may read."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text("HOST-SECRET-7f3a9c do not leak\n")
    yield secret
