"""No kernel outlives its host: a killed host actor, the last engine leaving, the cluster ending.

Runs after test_cluster.py on the same local cluster; the last test shuts the
cluster down (a later module gets a fresh one).
"""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")

from sandkernel.ray import ClusterEngine, SessionLost  # noqa: E402
from sandkernel.ray._names import REGISTRY_ACTOR_NAME  # noqa: E402
from sandkernel.ray._protocol import HOST_ACTOR_PREFIX, host_actor_name  # noqa: E402
from sandkernel.sandbox import mounts_under  # noqa: E402
from tests.ray._support import LocalCluster, leftovers_of, wait_until  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.sandbox, pytest.mark.anyio, pytest.mark.timeout(300)]

BUSY_CELL = "import subprocess, time\np = subprocess.Popen(['sleep', '600'])\ntime.sleep(600)"


def host_actors() -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(HOST_ACTOR_PREFIX)
    ]


def name_registries() -> list[str]:
    return [
        a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"] == REGISTRY_ACTOR_NAME
    ]


async def test_a_killed_host_actor_takes_its_kernels_and_is_replaced(
    ray_cluster: LocalCluster,
) -> None:
    async with ClusterEngine(**ray_cluster.engine_kwargs()) as engine:
        sessions = await asyncio.gather(*(engine.session() for _ in range(3)))
        here = ray.get_runtime_context().get_node_id()
        victim = next(s for s in sessions if s.node_id != here)
        (info,) = [h for h in engine.hosts() if h.node_id == victim.node_id]
        ray_cluster.remember(engine.hosts())
        in_flight = asyncio.create_task(victim.run(BUSY_CELL))
        await asyncio.sleep(1.0)
        assert leftovers_of(info)

        actor = ray.get_actor(host_actor_name(info.node_id), namespace=ray_cluster.namespace)
        ray.kill(actor, no_restart=True)
        with pytest.raises(SessionLost, match=info.node_id):
            await in_flight
        # Ray does not kill the kernels (they run in sessions of their own): the guardian does.
        assert await asyncio.to_thread(wait_until, lambda: not leftovers_of(info), 10)
        # The node gets a new host; the other sessions never noticed.
        async with asyncio.timeout(30):
            while not any(  # noqa: ASYNC110 - the reconciler's work, bounded
                h.node_id == info.node_id and h.pid != info.pid for h in engine.hosts()
            ):
                await asyncio.sleep(0.1)
        ray_cluster.remember(engine.hosts())
        for s in sessions:
            if s is not victim:
                assert (await s.run("1 + 1")).text == "2"
        with pytest.raises(SessionLost):
            await victim.run("1")


async def test_the_last_engine_to_leave_stops_the_hosts_and_the_name_registry(
    ray_cluster: LocalCluster,
) -> None:
    async with ClusterEngine(**ray_cluster.engine_kwargs()) as engine:
        sessions = await asyncio.gather(
            *(engine.session() for _ in range(2)), engine.session("opened-by-name")
        )
        assert [r.text for r in await asyncio.gather(*(s.run("2 + 2") for s in sessions))] == [
            "4"
        ] * 3
        assert ray_cluster.namespace in name_registries()
        hosts = engine.hosts()
        ray_cluster.remember(hosts)
    started = time.monotonic()
    assert await asyncio.to_thread(wait_until, lambda: not host_actors(), 30)
    assert await asyncio.to_thread(wait_until, lambda: not name_registries(), 30)
    assert await asyncio.to_thread(wait_until, lambda: not any(leftovers_of(h) for h in hosts), 10)
    assert time.monotonic() - started < 30


async def test_shutting_the_cluster_down_leaves_nothing_behind(
    ray_cluster: LocalCluster,
) -> None:
    engine = ClusterEngine(**ray_cluster.engine_kwargs())
    await engine.start()
    try:
        sessions = await asyncio.gather(*(engine.session() for _ in range(3)))
        assert len({s.node_id for s in sessions}) == 3
        hosts = engine.hosts()
        ray_cluster.remember(hosts)
        busy = [asyncio.create_task(s.run(BUSY_CELL)) for s in sessions]
        await asyncio.sleep(1.0)
        assert all(leftovers_of(h) for h in hosts)
        await asyncio.to_thread(ray_cluster.shutdown)
        for task in busy:
            with pytest.raises(SessionLost):
                await task
        assert await asyncio.to_thread(
            wait_until, lambda: not any(leftovers_of(h) for h in hosts), 10
        ), [leftovers_of(h) for h in hosts]
        assert not mounts_under(ray_cluster.root)
    finally:
        await engine.aclose()
