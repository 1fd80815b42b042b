"""The contract's scenarios against the cluster engine and a daemon serving the cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

pytest.importorskip("ray")

from sandkernel.api import EngineAPI  # noqa: E402
from tests.contract.scenarios import SCENARIOS, Scenario  # noqa: E402
from tests.ray._daemon import client_of, cluster_engine_as_served, serving  # noqa: E402
from tests.ray._support import LocalCluster  # noqa: E402

# No reaper pass during a scenario: one that checks a file past its retention,
# not purged yet, must not race the purge. Expiry is found on use all the same.
NO_REAPER = {"reap_interval_s": 3600.0}
#: the ``cluster`` backend's (tests/ray/conftest.py: ``cluster_engine``)
CLUSTER_ENGINE_OPTIONS = NO_REAPER

pytestmark = [pytest.mark.ray, pytest.mark.sandbox, pytest.mark.anyio, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
async def cluster_daemon(ray_cluster: LocalCluster) -> AsyncIterator[EngineAPI]:
    """A client of a daemon serving its own ClusterEngine, as ``sandkernel serve --ray``.

    Its hosts are not the ``cluster`` backend's: in a namespace of their own (and
    their own folders), so the scenarios' fixed names meet no session or agent
    file the other backend left there.
    """
    engine = cluster_engine_as_served(
        **ray_cluster.engine_kwargs(
            namespace=f"{ray_cluster.namespace}-daemon",
            runtime_dir=str(ray_cluster.root / "daemon-{node}"),
            store_dir=str(ray_cluster.stores / "daemon-{node}"),
            **NO_REAPER,
        )
    )
    async with engine, serving(engine) as socket, client_of(socket) as client:
        ray_cluster.remember(engine.hosts())
        yield client
        ray_cluster.remember(engine.hosts())


@pytest.fixture(params=["cluster", "daemon-cluster"])
def backend(
    request: pytest.FixtureRequest, cluster_engine: EngineAPI, cluster_daemon: EngineAPI
) -> EngineAPI:
    return cluster_engine if request.param == "cluster" else cluster_daemon


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
async def test_scenario(backend: EngineAPI, scenario: Scenario) -> None:
    await scenario(backend)
