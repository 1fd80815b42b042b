"""Fixtures of the Ray tests: one local multi-node Ray cluster, shared and leak-checked."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ray._support import LocalCluster

# Without Ray the tests of this folder skip (each module imports it with importorskip).

# A test shuts the cluster down under a live engine: Ray must not reconnect by itself
# (read when Ray is first imported, which happens after this file is loaded).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")


@pytest.fixture(scope="session")
def ray_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The local cluster (started by :func:`ray_cluster` on first use), checked at the end.

    At the end: no process, cgroup or mount of any host seen remains.
    """
    pytest.importorskip("ray")
    from tests.ray._support import LocalCluster, leftovers_of, remove_tree, wait_until

    local = LocalCluster(
        namespace=f"sandkernel-test-{secrets.token_hex(4)}",
        root=Path("/run") / f"skray-{os.getpid()}",
        stores=tmp_path_factory.mktemp("ray-stores"),
    )
    yield local
    local.shutdown()
    left: list[str] = []

    def clean() -> bool:
        left[:] = [x for info in local.hosts_seen.values() for x in leftovers_of(info)]
        return not left

    wait_until(clean, timeout_s=15)
    remove_tree(local.root)
    assert not left, f"kernels of Ray hosts left behind: {left}"


@pytest.fixture(scope="module")
def ray_cluster(ray_clusters: LocalCluster) -> LocalCluster:
    """A running 3-node cluster (a test may have shut the previous one down)."""
    if not ray_clusters.alive:
        ray_clusters.start(nodes=3)
    return ray_clusters


@pytest.fixture(scope="module")
async def cluster_engine(
    request: pytest.FixtureRequest, ray_cluster: LocalCluster
) -> AsyncIterator[object]:
    """A ClusterEngine over the cluster, shared by a module's tests; closed afterwards.

    A module's ``CLUSTER_ENGINE_OPTIONS`` (a dict) are added to its arguments.
    """
    from sandkernel.ray import ClusterEngine

    options = getattr(request.module, "CLUSTER_ENGINE_OPTIONS", {})
    engine = ClusterEngine(**ray_cluster.engine_kwargs(**options))
    async with engine:
        ray_cluster.remember(engine.hosts())
        yield engine
        ray_cluster.remember(engine.hosts())
