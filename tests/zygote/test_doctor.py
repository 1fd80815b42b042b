"""``sandkernel doctor`` says which kernel start is in force, and why."""

from __future__ import annotations

import pytest

from sandkernel import doctor
from sandkernel.policy import load_policy
from sandkernel.sandbox import SandboxHost
from sandkernel.sandbox.zygote import Zygote, ZygoteFailed

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def test_doctor_forks_a_kernel_and_names_the_start_in_force(host: SandboxHost) -> None:
    check = await doctor._zygote_check(host, load_policy(None))
    assert check.ok and not check.critical, check
    assert check.detail.startswith("in force: ") and "EngineConfig.zygote" in check.detail
    assert "passed the outside check and the self-check" in check.detail


async def test_doctor_says_why_when_the_zygote_cannot_start(
    host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Zygote, timeout_s: float = 120.0) -> None:
        raise ZygoteFailed("no fork here")

    monkeypatch.setattr(Zygote, "start", broken)
    check = await doctor._zygote_check(host, load_policy(None))
    assert not check.ok and not check.critical
    assert "in force: cold start" in check.detail and "no fork here" in check.detail


async def test_doctor_says_a_policy_whose_env_a_fork_cannot_honour_starts_cold(
    host: SandboxHost,
) -> None:
    env = {"LC_ALL": "C", "TZ": "Asia/Tokyo", "MPLBACKEND": "agg", "TMPDIR": "/mnt/data"}
    policy = load_policy(None).model_copy(update={"env": env})
    check = await doctor._zygote_check(host, policy)
    assert check.ok and not check.critical, check  # the policy's choice, not a fault
    assert check.detail.startswith("in force: cold start"), check.detail
    assert "sets LC_ALL, MPLBACKEND, TZ, which a kernel forked" in check.detail, check.detail
