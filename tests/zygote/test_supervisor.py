"""ZygoteSupervisor's decisions, with a stand-in for the zygote process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sandkernel.policy import load_policy
from sandkernel.sandbox.zygote import Zygote, ZygoteFailed, ZygoteSupervisor

pytestmark = pytest.mark.anyio


class _Started:
    """Patches Zygote.start/close/alive: each start waits for ``release``, then ``outcome``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = asyncio.Event()
        self.outcome: BaseException | None = None
        self.closed: list[Zygote] = []
        this = self

        async def start(zygote: Zygote, timeout_s: float = 120.0) -> None:
            await this.release.wait()
            if this.outcome is not None:
                raise this.outcome
            zygote._sock = object()  # type: ignore[assignment]

        async def close(zygote: Zygote, grace_s: float = 2.0) -> None:
            this.closed.append(zygote)
            zygote._sock = None

        monkeypatch.setattr(Zygote, "start", start)
        monkeypatch.setattr(Zygote, "close", close)
        monkeypatch.setattr(Zygote, "alive", property(lambda z: z._sock is not None))


def _supervisor(**kwargs: Any) -> ZygoteSupervisor:
    return ZygoteSupervisor(None, load_policy(None), (), **kwargs)  # type: ignore[arg-type]


async def test_a_slow_zygote_start_sends_refills_cold_until_it_is_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = _Started(monkeypatch)
    supervisor = _supervisor(wait_for_start_s=0.05)
    assert await supervisor.get() is None  # still warming up: start cold
    assert supervisor.status().startswith("cold start")
    started.release.set()
    zygote = await supervisor.get()
    assert zygote is not None and supervisor.status().startswith("zygote fork")
    assert await supervisor.get() is zygote
    await supervisor.close()
    assert started.closed == [zygote]


async def test_a_failed_start_is_reported_and_retried_after_a_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = _Started(monkeypatch)
    started.outcome = ZygoteFailed("no imports")
    started.release.set()
    supervisor = _supervisor()
    assert await supervisor.get() is None
    assert "no imports" in supervisor.status()
    assert await supervisor.get() is None  # within the back-off: not even tried
    started.outcome = None
    supervisor._retry_at = 0.0
    assert await supervisor.get() is not None
    await supervisor.close()


async def test_a_dead_or_failing_zygote_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    started = _Started(monkeypatch)
    started.release.set()
    supervisor = _supervisor(max_failures=2)
    first = await supervisor.get()
    assert first is not None
    await supervisor.failed(ZygoteFailed("one"))
    assert supervisor.zygote is first  # one failure: kept
    await supervisor.failed(ZygoteFailed("two"))
    assert supervisor.zygote is None and started.closed == [first]
    second = await supervisor.get()
    assert second is not None and second is not first
    second._sock = None  # it died
    third = await supervisor.get()
    assert third is not None and third is not second and second in started.closed
    assert supervisor.restarts == 3 and supervisor.fallbacks == 2
    await supervisor.close()
