"""A daemon serving a ClusterEngine (``sandkernel serve --ray``): a lost node's errors cross it.

The session and the file a node held answer 410 ``SessionLost`` and 404
``FileNotFoundInStore`` (``FileLost``) over HTTP, and the client raises the
class the cluster engine raises embedded. The test removes a node and adds
one back, so the cluster keeps its size for the modules after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from sandkernel import errors  # noqa: E402
from sandkernel.api import ServedEngine  # noqa: E402
from sandkernel.daemon import errors as daemon_errors  # noqa: E402
from sandkernel.engine import Engine  # noqa: E402
from sandkernel.errors import FileLost, FileNotFoundInStore, SessionLost  # noqa: E402
from sandkernel.ray import errors as ray_errors  # noqa: E402
from sandkernel.ray._protocol import HostClosing, file_tag, node_tag  # noqa: E402
from tests.conftest import runtime_root  # noqa: E402
from tests.ray._daemon import client_of, cluster_engine_as_served, raw_client_of, serving  # noqa: E402
from tests.ray._support import NODE_ARGS, LocalCluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.sandbox, pytest.mark.anyio, pytest.mark.timeout(300)]


async def raised(call: Awaitable[Any]) -> Exception:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("no error was raised")


def test_the_cluster_errors_are_the_trees_classes() -> None:
    assert ray_errors.SessionLost is daemon_errors.SessionLost is errors.SessionLost
    assert (
        ray_errors.FileLost is errors.FileLost
        and ray_errors.HostUnreachable is errors.HostUnreachable
    )
    assert HostClosing is errors.HostClosing


async def test_a_lost_node_answers_410_and_404_with_the_cluster_engines_classes(
    ray_cluster: LocalCluster,
) -> None:
    assert ray_cluster.cluster is not None
    engine = cluster_engine_as_served(**ray_cluster.engine_kwargs())
    removed = False
    try:
        async with engine, serving(engine) as socket, client_of(socket) as client:
            ray_cluster.remember(engine.hosts())
            here = ray.get_runtime_context().get_node_id()
            doomed_node = next(n for n in ray_cluster.worker_nodes() if n.node_id != here)
            tag = node_tag(doomed_node.node_id)
            sessions = [await client.session(f"doomed-{n}") for n in range(6)]
            (on_doomed, *_) = [s for s in sessions if s.id.startswith(f"{tag}.")]
            stored = await on_doomed.upload(b"on that node\n", "kept.txt")
            assert file_tag(stored.id) == tag
            embedded = await engine.get_session(on_doomed.id)

            await asyncio.to_thread(ray_cluster.cluster.remove_node, doomed_node)
            removed = True
            remote_lost = await raised(on_doomed.run("1"))
            embedded_lost = await raised(embedded.run("1"))
            assert type(embedded_lost) is SessionLost and type(remote_lost) is SessionLost
            assert doomed_node.node_id in str(remote_lost)
            remote_file = await raised(client.download(stored.id))
            embedded_file = await raised(engine.download(stored.id))
            # Lost with its node, whether or not the engine's reconciler has
            # dropped the node yet (it had not, when a call found it gone, and
            # the file was "not found" until it had).
            assert type(embedded_file) is FileLost and isinstance(
                embedded_file, FileNotFoundInStore
            )
            assert type(remote_file) is type(embedded_file)
            async with raw_client_of(socket) as raw:
                for method, path, status, error in [
                    ("POST", f"/v1/sessions/{on_doomed.id}/execute", 410, "SessionLost"),
                    ("GET", f"/v1/sessions/{on_doomed.id}", 410, "SessionLost"),
                    ("GET", f"/v1/files/{stored.id}", 404, type(embedded_file).__name__),
                    ("GET", f"/v1/files/{stored.id}/content", 404, type(embedded_file).__name__),
                ]:
                    body = {"code": "1"} if method == "POST" else None
                    answer = await raw.request(method, path, json=body)
                    assert answer.status_code == status, (method, path, answer.text)
                    assert answer.json()["error"]["type"] == error, (method, path, answer.text)
            await asyncio.gather(*(s.close() for s in sessions))
    finally:
        ray_cluster.remember(engine.hosts())
        if removed:
            # In this thread: a node installs signal handlers. Added back whatever
            # happened since, so that the next tests have the cluster they expect.
            ray_cluster.cluster.add_node(**NODE_ARGS)


async def ended_session_answers(engine: ServedEngine, name: str) -> list[tuple[int, str]]:
    """What a daemon serving ``engine`` answers for session ``name``, closed, by that name."""
    answers = []
    async with (
        serving(engine) as socket,
        raw_client_of(socket) as raw,
    ):
        opened = await raw.post("/v1/sessions", json={"id": name})
        assert opened.status_code == 200, opened.text
        closed = await raw.delete(f"/v1/sessions/{opened.json()['id']}")
        assert closed.status_code == 200, closed.text
        for path in (f"/v1/sessions/{name}", f"/v1/sessions/{name}/files"):
            answer = await raw.get(path)
            body = answer.json()
            what = body["error"]["type"] if "error" in body else str(body.get("state"))
            answers.append((answer.status_code, what))
    return answers


async def test_an_ended_session_looked_up_by_its_name_answers_as_on_one_machine(
    ray_cluster: LocalCluster, tmp_path: Path
) -> None:
    local = Engine(
        runtime_dir=runtime_root(),
        store_dir=tmp_path / "store",
        pool_size=1,
        prewarm_imports=(),
        handle_sigterm=False,
    )
    async with local:
        on_one_machine = await ended_session_answers(local, "ended-by-name")
    # One machine answers the ended session (200, closed), as the engine lists it.
    assert on_one_machine == [(200, "closed"), (200, "None")]
    cluster = cluster_engine_as_served(
        **ray_cluster.engine_kwargs(
            namespace=f"{ray_cluster.namespace}-ended",
            runtime_dir=str(ray_cluster.root / "ended-{node}"),
            store_dir=str(ray_cluster.stores / "ended-{node}"),
        )
    )
    async with cluster:
        ray_cluster.remember(cluster.hosts())
        assert await ended_session_answers(cluster, "ended-by-name") == on_one_machine
