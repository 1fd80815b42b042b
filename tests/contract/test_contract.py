"""The contract's scenarios against the embedded engine and the daemon over its socket."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sandkernel.api import EngineAPI
from tests.contract.scenarios import SCENARIOS, Scenario
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

# No reaper pass during a scenario: one that checks a file past its retention,
# not purged yet, must not race the purge. Expiry is found on use all the same.
ENGINE_OPTIONS: dict[str, Any] = {"pool_size": 1, "batch_workers": 1, "reap_interval_s": 3600.0}


@pytest.fixture(params=["embedded", "daemon"])
async def backend(
    request: pytest.FixtureRequest,
    engine_factory: Callable[..., Awaitable[Any]],
    daemon_factory: DaemonFactory,
) -> EngineAPI:
    if request.param == "embedded":
        engine: EngineAPI = await engine_factory(**ENGINE_OPTIONS)
        return engine
    running = await daemon_factory(engine_options=ENGINE_OPTIONS)
    client: EngineAPI = running.client()
    return client


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
async def test_scenario(backend: EngineAPI, scenario: Scenario) -> None:
    await scenario(backend)
