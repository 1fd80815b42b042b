"""The shared fixtures' kernels forked from zygotes, when ``SANDKERNEL_TEST_ZYGOTE=1``.

``tests/zygote/test_catalogue.py`` runs the attack catalogue and the leak
accounting again in this mode: every kernel the fixtures start
(``kernel_factory``, the catalogue's ``KernelBox``) is forked from a zygote of
its host and policy, and every engine defaults to ``zygote=True``.
"""

from __future__ import annotations

import os

from sandkernel.config import EngineConfig
from sandkernel.policy import Policy
from sandkernel.sandbox import SandboxHost
from sandkernel.sandbox.zygote import Zygote

ENV = "SANDKERNEL_TEST_ZYGOTE"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def install() -> None:
    """Make ``zygote=True`` the engines' default for this test process."""
    EngineConfig.model_fields["zygote"].default = True
    EngineConfig.model_rebuild(force=True)


class Zygotes:
    """One zygote per host and policy, started on first use, closed with the fixture."""

    def __init__(self) -> None:
        self._zygotes: dict[tuple[str, str], Zygote] = {}

    async def get(self, host: SandboxHost, policy: Policy) -> Zygote:
        key = (host.owner, policy.model_dump_json())
        zygote = self._zygotes.get(key)
        if zygote is None or not zygote.alive:
            if zygote is not None:
                await zygote.close()
            zygote = Zygote(host, policy)
            await zygote.start()
            self._zygotes[key] = zygote
        return zygote

    async def close(self, host: SandboxHost) -> None:
        for key in [k for k in self._zygotes if k[0] == host.owner]:
            await self._zygotes.pop(key).close()


ZYGOTES = Zygotes()
