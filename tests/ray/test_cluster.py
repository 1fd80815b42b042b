"""The cluster engine on a local 3-node Ray cluster: hosts, routing, files, node loss and growth.

The tests share one cluster and one engine (starting them takes ~15 s) and
run in this file's order: the last two remove a node and add one.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import io
import logging
import threading
import time
from collections import Counter
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from sandkernel import (  # noqa: E402
    FileNotFoundInStore,
    SandboxUnavailable,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
)
from sandkernel.ray import ClusterEngine, ClusterSession, SessionLost, _names  # noqa: E402
from sandkernel.ray._names import REGISTRY_ACTOR_NAME, SessionNames  # noqa: E402
from sandkernel.ray._protocol import HOST_ACTOR_PREFIX, file_tag, node_tag  # noqa: E402
from sandkernel.ray.cli import diagnose_cluster  # noqa: E402
from sandkernel.session import SessionState  # noqa: E402
from tests.ray._support import LocalCluster, leftovers_of, wait_until  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.sandbox, pytest.mark.anyio, pytest.mark.timeout(300)]


def alive_node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


async def wait_for(predicate: Any, timeout_s: float) -> None:
    """Wait for engine state that has no event of its own, with a deadline.

    ``predicate`` returns a bool, or an awaitable of one.
    """
    async with asyncio.timeout(timeout_s):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.05)


def placing_on(engine: ClusterEngine, tag: str) -> Any:
    """A session placement that always picks the host tagged ``tag``."""

    async def place(exclude: Any) -> Any:
        return engine._by_tag[tag]

    return place


async def test_one_host_per_node_each_on_its_own_node(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    hosts = cluster_engine.hosts()
    assert {h.node_id for h in hosts} == alive_node_ids()
    assert len(hosts) == 3
    for info in hosts:
        assert info.tag == node_tag(info.node_id)
        assert info.runtime_dir == str(ray_cluster.root / info.tag)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(HOST_ACTOR_PREFIX)
    ]
    assert sorted(names) == sorted(f"{HOST_ACTOR_PREFIX}{h.node_id}" for h in hosts)
    # A second engine in the namespace joins the same hosts, and leaving does not stop them.
    async with ClusterEngine(**ray_cluster.engine_kwargs()) as second:
        assert {(h.node_id, h.pid) for h in second.hosts()} == {(h.node_id, h.pid) for h in hosts}
    # One with another policy does not run its code under theirs: no host for it.
    stricter = ClusterEngine(**ray_cluster.engine_kwargs(policy="strict", start_timeout_s=5))
    with pytest.raises(SandboxUnavailable, match="enforces policy 'default', not this engine's"):
        await stricter.start()
    await stricter.aclose()
    await cluster_engine.refresh()
    assert {(h.node_id, h.pid) for h in cluster_engine.hosts()} == {
        (h.node_id, h.pid) for h in hosts
    }


async def test_a_session_keeps_its_state_and_its_kernel(cluster_engine: ClusterEngine) -> None:
    session = await cluster_engine.session("conv-1")
    tag, _, name = session.id.partition(".")
    assert name == "conv-1" and tag == node_tag(session.node_id)
    first = await session.run("import os\ncounter = 40")
    assert first.ok
    kernel_id = (await session.info()).kernel_id
    assert kernel_id is not None
    for n in range(3):
        result = await session.run("counter += 1\ncounter")
        assert result.text == str(41 + n)
        assert (await session.info()).kernel_id == kernel_id
    # By name, by cluster-wide id, sync or async: always this session.
    assert await cluster_engine.session("conv-1") is session
    assert await cluster_engine.session(session.id) is session
    assert await cluster_engine.get_session(session.id) is session
    assert await cluster_engine.get_session("conv-1") is session
    assert {i.id for i in (await cluster_engine.sessions())} >= {session.id}
    await session.close()
    with pytest.raises(SessionClosed):
        await session.run("1")
    with pytest.raises(SessionNotFound):
        await cluster_engine.get_session("never-opened")
    # A name that only looks qualified (no node has that tag) is a name.
    dated = await cluster_engine.session("20240105.thread-1")
    assert dated.id.partition(".")[2] == "20240105.thread-1"
    assert await cluster_engine.session("20240105.thread-1") is dated
    assert (await dated.run("1 + 1")).text == "2"
    await dated.close()


async def test_an_argument_of_the_wrong_type_is_the_callers_type_error(
    cluster_engine: ClusterEngine,
) -> None:
    # As the embedded engine raises it, not as the host's failure.
    session = await cluster_engine.session()
    with pytest.raises(TypeError, match="must be text"):
        await session.run(123)  # type: ignore[arg-type]
    # Streamed, the same: TypeError itself, not Ray's task error that derives from it.
    with pytest.raises(TypeError, match="must be text") as streamed:
        await session.run(123, on_output=lambda message: None)  # type: ignore[arg-type]
    assert type(streamed.value) is TypeError
    with pytest.raises(TypeError, match="must be text") as streamed:
        async for _ in session.stream(123):  # type: ignore[arg-type]
            pass
    assert type(streamed.value) is TypeError
    with pytest.raises(TypeError) as streamed:
        async for _ in session.stream("1", file_ids=[123]):  # type: ignore[list-item]
            pass
    assert type(streamed.value) is TypeError
    with pytest.raises(TypeError):
        await session.extend("60")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await session.run("1", file_ids=[123])  # type: ignore[list-item]
    assert (await session.run("1 + 1")).text == "2"
    await session.close()


async def test_an_engine_that_closes_closes_only_the_sessions_it_made(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    mine = await cluster_engine.session("owned-by-first")
    await mine.run("kept = 7")
    async with ClusterEngine(**ray_cluster.engine_kwargs()) as second:
        theirs = await second.session()
        # The first engine's session, used by the second: found, by id and by name.
        used = await second.get_session(mine.id)
        assert await second.session("owned-by-first") is used
        assert (await used.run("kept")).text == "7"
        # Also by a name that only looks qualified (no node has tag 20240106).
        dated = await cluster_engine.session("20240106.thread-2")
        assert (await second.get_session("20240106.thread-2")).id == dated.id
        assert await second.list_files(session_id="20240106.thread-2") == []
        await second.close_session("20240106.thread-2")
        with pytest.raises(SessionClosed):
            await dated.run("1")
    # Closing the second closed its own session, not the one it only used.
    assert (await mine.run("kept + 1")).text == "8"
    with pytest.raises(SessionClosed):
        await (await cluster_engine.get_session(theirs.id)).run("1")
    await mine.close()


async def test_the_sessions_of_an_engine_that_died_are_closed_when_its_lease_expires(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = cluster_engine.hosts()[0].tag
    dying = ClusterEngine(**ray_cluster.engine_kwargs(lease_ttl_s=2.0))
    await dying.start()
    try:
        # Everything on one host, which both engines keep using.
        for engine in (dying, cluster_engine):
            monkeypatch.setattr(engine, "_place_session", placing_on(engine, tag))
        its_own = await dying.session("dying-own")
        shared = await dying.session("dying-shared")
        assert (await cluster_engine.session("dying-shared")).id == shared.id
        others = await cluster_engine.session("dying-survivor")
        await asyncio.gather(*(s.run("kept = 1") for s in (its_own, shared, others)))
        assert {s.id.partition(".")[0] for s in (its_own, shared, others)} == {tag}
        # Its process dies (no aclose): it stops renewing its lease.
        assert dying._reconciler is not None
        dying._reconciler.cancel()

        async def closed() -> bool:
            info = await cluster_engine.session_info(its_own.id)
            return info.state is SessionState.CLOSED

        await wait_for(closed, timeout_s=60)
        # Only it held that one; the one the other engine opened too, and the other's, stay.
        for session in (await cluster_engine.get_session(shared.id), others):
            assert (await session.run("kept + 1")).text == "2"
    finally:
        await dying.aclose()
    await asyncio.gather(*(cluster_engine.close_session(s) for s in (shared.id, others.id)))


async def test_a_session_past_its_ttl_is_expired_before_the_reaper_passes(
    ray_cluster: LocalCluster,
) -> None:
    kwargs = ray_cluster.engine_kwargs(
        namespace=f"{ray_cluster.namespace}-ttl",
        runtime_dir=str(ray_cluster.root / "ttl-{node}"),
        store_dir=str(ray_cluster.stores / "ttl-{node}"),
        session_ttl_s=1.0,
        reap_interval_s=3600.0,  # no reaper pass: the expiry is found on use, as locally
    )
    async with ClusterEngine(**kwargs) as engine:
        ray_cluster.remember(engine.hosts())
        session = await engine.session("conv-ttl")
        await session.run("x = 1")
        async with asyncio.timeout(30):
            while not session._past_expiry():  # noqa: ASYNC110 - wall time passing, no event
                await asyncio.sleep(0.1)
        with pytest.raises(SessionExpired):
            await engine.get_session(session.id)
        fresh = await engine.session("conv-ttl", if_expired="new")
        assert (await fresh.run("'x' in globals()")).text == "False"
        await fresh.close()


async def test_twenty_sessions_spread_over_every_node(cluster_engine: ClusterEngine) -> None:
    sessions: list[ClusterSession] = await asyncio.gather(
        *(cluster_engine.session(f"spread-{n}") for n in range(20))
    )
    results = await asyncio.gather(*(s.run(f"{n} * 2") for n, s in enumerate(sessions)))
    assert [r.text for r in results] == [str(n * 2) for n in range(20)]
    per_node = Counter(s.node_id for s in sessions)
    assert set(per_node) == alive_node_ids()
    assert min(per_node.values()) >= 5, per_node
    await cluster_engine.refresh()
    stats = await cluster_engine.stats()
    assert stats.sessions_active >= 20
    # Each node's kernel start, named by its node.
    assert stats.pool.kernel_start is not None
    assert all(f"{host.tag}: " in stats.pool.kernel_start for host in stats.hosts)
    await asyncio.gather(*(s.close() for s in sessions))


async def test_output_streams_while_the_cell_runs(cluster_engine: ClusterEngine) -> None:
    session = await cluster_engine.session()
    seen: list[tuple[float, str]] = []
    started = time.monotonic()

    def on_output(message: dict[str, Any]) -> None:
        if message["msg_type"] == "stream":
            seen.append((time.monotonic() - started, message["content"]["text"]))

    result = await session.run(
        "import time\nprint('first', flush=True)\ntime.sleep(3)\nprint('second')",
        on_output=on_output,
    )
    assert result.ok and result.stdout == "first\nsecond\n"
    # Every message as the kernel sent it: ipykernel may send a line in two (its
    # flush timer can fire between print's two writes on a loaded machine).
    assert "".join(text for _, text in seen) == "first\nsecond\n"
    # The first came before the cell ended (a margin of 1.5 s for a loaded machine).
    first = next(at for at, text in seen if "first" in text)
    second = next(at for at, text in seen if "second" in text)
    assert second - first > 1.5
    await session.close()


async def test_streamed_messages_are_whole_as_the_embedded_engine_gives_them(
    cluster_engine: ClusterEngine,
) -> None:
    session = await cluster_engine.session()
    messages: list[dict[str, Any]] = []
    await session.run("print('x')", on_output=messages.append)
    assert {m["msg_type"] for m in messages} >= {"stream"}
    for message in messages:
        assert message.keys() == {
            "header", "msg_id", "msg_type", "parent_header", "metadata", "content", "buffers"
        }  # fmt: skip
        assert message["buffers"] == []
    await session.close()


async def test_cancelling_a_run_interrupts_the_cell(cluster_engine: ClusterEngine) -> None:
    session = await cluster_engine.session()
    await session.run("before = 1")
    task = asyncio.create_task(session.run("import time\nfor i in range(600): time.sleep(0.1)"))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    result = await session.run("before + 1")
    assert result.text == "2" and time.monotonic() - started < 5
    await session.close()


async def test_extend_answers_with_the_hosts_new_expiry(cluster_engine: ClusterEngine) -> None:
    session = await cluster_engine.session()
    before = (await session.info()).expires_at
    expected = await session.extend(7200)
    assert expected > time.time() + 7000
    assert (await session.info()).expires_at > before
    fresh = await session.refresh()
    assert 7100 < (fresh.expires_at - fresh.last_active).total_seconds() <= 7200 + 1e-5
    await session.close()


async def test_files_cross_nodes(cluster_engine: ClusterEngine) -> None:
    # A fresh upload lands on this driver's node; a session elsewhere gets a copy.
    here = ray.get_runtime_context().get_node_id()
    upload = await cluster_engine.upload(b"a,b\n1,2\n", "table.csv")
    assert upload.id.startswith(f"file-{node_tag(here)}")
    sessions = await asyncio.gather(*(cluster_engine.session() for _ in range(6)))
    remote = next(s for s in sessions if s.node_id != here)
    assert await remote.attach([upload.id]) == ["/mnt/data/table.csv"]
    result = await remote.run(
        "print(open('/mnt/data/table.csv').read().strip())\n"
        "open('/mnt/data/out.txt', 'w').write('made on ' + 'the node')"
    )
    assert result.stdout.strip() == "a,b\n1,2"
    (produced,) = result.files
    # The produced file's id names the node that holds it; any caller downloads by id.
    assert produced.id.startswith(f"file-{node_tag(remote.node_id)}")
    assert await cluster_engine.download(produced.id) == b"made on the node"
    assert (await cluster_engine.file(produced.id)).session_id == remote.id
    with cluster_engine.open_file(produced.id) as stream:
        assert stream.read() == b"made on the node"
    assert produced.id in {f.id for f in await remote.files()}
    # A file of one session is not found by a session on another node.
    third = next(s for s in sessions if s.node_id not in (remote.node_id,))
    with pytest.raises(FileNotFoundInStore):
        await third.run("1", file_ids=[produced.id])
    # run(file_ids=...) brings files over too.
    doc = await cluster_engine.upload(b"hello", "note.txt")
    elsewhere = next(s for s in sessions if s.node_id != here and s is not remote)
    result = await elsewhere.run("print(open('/mnt/data/note.txt').read())", file_ids=[doc.id])
    assert result.stdout.strip() == "hello"
    # Deleted where it was uploaded, its id finds the copy on that node no more.
    await cluster_engine.delete_file(doc.id)
    with pytest.raises(FileNotFoundInStore):
        await elsewhere.run("1", file_ids=[doc.id])
    await asyncio.gather(*(s.close() for s in sessions))


async def test_a_large_upload_is_handed_to_ray_off_the_event_loop(
    cluster_engine: ClusterEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandkernel.ray._handle import HostHandle

    loop_thread, on_loop = threading.get_ident(), {}
    submit = HostHandle.submit

    def recording_submit(self: HostHandle, method: str, *args: Any) -> Any:
        on_loop[method] = threading.get_ident() == loop_thread
        return submit(self, method, *args)

    monkeypatch.setattr(HostHandle, "submit", recording_submit)
    # Ray copies the bytes as the call is made: seconds for hundreds of MiB.
    big = await cluster_engine.upload(b"a,b\n" * (1 << 19), "big.csv")  # 2 MiB
    assert on_loop["store"] is False
    small = await cluster_engine.upload(b"a,b\n", "small.csv")
    assert on_loop["store"] is True
    assert await cluster_engine.download(big.id) == b"a,b\n" * (1 << 19)
    for stored in (big, small):
        await cluster_engine.delete_file(stored.id)


async def test_a_large_file_damaged_on_disk_is_refused_read_whole_or_in_chunks(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    content = b"".join(b"%07d\n" % i for i in range(3 << 17))  # 3 MiB of text: three chunks
    stored = await cluster_engine.upload(content, "blob.txt")
    with cluster_engine.open_file(stored.id) as stream:
        assert stream.read() == content  # whole, checked
    (blob,) = ray_cluster.stores.rglob(stored.sha256)
    blob.chmod(0o600)
    with blob.open("r+b") as f:  # same size, one byte other, in the last chunk
        f.seek(len(content) - 10)
        f.write(b"x")  # a digit before
    with pytest.raises(FileNotFoundInStore, match="damaged"):
        await cluster_engine.download(stored.id)
    with pytest.raises(FileNotFoundInStore, match="damaged"):
        await cluster_engine.download(stored.id, max_bytes=len(content))
    with cluster_engine.open_file(stored.id) as stream:
        assert len(stream.read(1 << 20)) == 1 << 20  # a chunk short of the end: not checked
        with pytest.raises(FileNotFoundInStore, match="damaged"):
            stream.read()
    await cluster_engine.delete_file(stored.id)


async def test_a_remote_file_refuses_a_seek_before_its_start(
    cluster_engine: ClusterEngine,
) -> None:
    stored = await cluster_engine.upload(b"0123456789", "digits.txt")
    with cluster_engine.open_file(stored.id) as stream:
        stream.seek(4)
        for offset, whence in ((-1, io.SEEK_SET), (-5, io.SEEK_CUR), (-11, io.SEEK_END)):
            with pytest.raises(OSError) as raised:
                stream.seek(offset, whence)
            assert raised.value.errno == errno.EINVAL
        assert stream.read(2) == b"45"  # where it was
    await cluster_engine.delete_file(stored.id)


async def test_a_deleted_files_id_is_forgotten_by_its_host(cluster_engine: ClusterEngine) -> None:
    def known(host: Any, file_id: str) -> bool:
        return file_id in host._ids._local

    stored = await cluster_engine.upload(b"brief\n", "brief.txt")
    handle = cluster_engine._file_host(stored.id)
    assert ray.get(handle.actor.__ray_call__.remote(known, stored.id))
    await cluster_engine.delete_file(stored.id)
    assert not ray.get(handle.actor.__ray_call__.remote(known, stored.id))


async def test_agent_files_reach_every_node_running_the_agent(
    cluster_engine: ClusterEngine,
) -> None:
    early = await cluster_engine.session(agent_id="analyst")
    stored = await cluster_engine.upload(b"shared facts", "facts.txt", agent_id="analyst")
    # The live session sees it, and so do sessions opened later on every node.
    later = await asyncio.gather(*(cluster_engine.session(agent_id="analyst") for _ in range(5)))
    agent_sessions = [early, *later]
    assert {s.node_id for s in agent_sessions} == alive_node_ids()
    reads = await asyncio.gather(
        *(s.run("print(open('/mnt/data/facts.txt').read())") for s in agent_sessions)
    )
    assert [r.stdout.strip() for r in reads] == ["shared facts"] * len(agent_sessions)
    write = await later[0].run("open('/mnt/data/facts.txt', 'w').write('changed')")
    assert write.status == "error" and write.error is not None
    listed = await cluster_engine.list_files(agent_id="analyst")
    assert [f.name for f in listed] == ["facts.txt"]  # copies are listed once
    await cluster_engine.delete_file(stored.id)
    assert await cluster_engine.list_files(agent_id="analyst") == []
    await asyncio.gather(*(s.close() for s in agent_sessions))


async def test_an_agent_file_uploaded_while_its_session_opens_reaches_that_session(
    cluster_engine: ClusterEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = cluster_engine._home()  # where an upload is stored
    away = next(h for h in cluster_engine._hosts.values() if h is not home and not h.gone)

    async def place_away(exclude: Any) -> Any:
        return away

    sync, uploaded = cluster_engine._sync_agent_files, []

    async def sync_then_upload(agent_id: str, target: Any) -> None:
        await sync(agent_id, target)
        if not uploaded:  # lands after the session's files were synced, before it opened
            uploaded.append(await cluster_engine.upload(b"v\n", "notes.txt", agent_id=agent_id))

    monkeypatch.setattr(cluster_engine, "_place_session", place_away)
    monkeypatch.setattr(cluster_engine, "_sync_agent_files", sync_then_upload)
    session = await cluster_engine.session("racing", agent_id="racer")
    assert session.node_id == away.node_id and uploaded
    assert (await session.run("print(open('/mnt/data/notes.txt').read(), end='')")).stdout == "v\n"
    await session.close()


async def test_an_unowned_upload_attached_on_another_node_becomes_that_sessions(
    cluster_engine: ClusterEngine,
) -> None:
    # As on one machine: the first session to attach a file nobody owns gets it.
    upload = await cluster_engine.upload(b"x,y\n3,4\n", "claimed.csv")
    home = file_tag(upload.id)
    others = sorted(h.tag for h in cluster_engine.hosts() if h.tag != home)
    claimer = await cluster_engine.session(f"{others[0]}.claimer")
    assert await claimer.attach([upload.id]) == ["/mnt/data/claimed.csv"]
    assert (await cluster_engine.file(upload.id)).session_id == claimer.id
    # Another session, on the upload's node or on a third one, finds it no more.
    for n, tag in enumerate((home, others[1])):
        rival = await cluster_engine.session(f"{tag}.rival-{n}")
        with pytest.raises(FileNotFoundInStore):
            await rival.attach([upload.id])
        with pytest.raises(FileNotFoundInStore):
            await rival.run("1", file_ids=[upload.id])
        await rival.close()
    read = await claimer.run("print(open('/mnt/data/claimed.csv').read())", file_ids=[upload.id])
    assert read.stdout.strip() == "x,y\n3,4"
    await claimer.close()
    await cluster_engine.delete_file(upload.id)


async def test_separate_uploads_of_one_name_and_content_are_listed_each(
    cluster_engine: ClusterEngine,
) -> None:
    # As Engine.list_files: two uploads are two files, whatever their names and bytes.
    first = await cluster_engine.upload(b"same bytes", "twin.txt", agent_id="twins")
    second = await cluster_engine.upload(b"same bytes", "twin.txt", agent_id="twins")
    assert [f.id for f in await cluster_engine.list_files(agent_id="twins")] == [
        first.id,
        second.id,
    ]
    # Copied to the other nodes for the agent's sessions there, each is still listed once.
    home = file_tag(first.id)
    sessions = [
        await cluster_engine.session(f"{h.tag}.twins-session", agent_id="twins")
        for h in cluster_engine.hosts()
        if h.tag != home
    ]
    listed = [f.id for f in await cluster_engine.list_files() if f.agent_id == "twins"]
    assert listed == [first.id, second.id]
    await asyncio.gather(*(s.close() for s in sessions))
    for stored in (first, second):
        await cluster_engine.delete_file(stored.id)


async def test_one_name_opened_by_two_engines_at_once_is_one_session(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"contested-{n}" for n in range(4)]
    async with ClusterEngine(**ray_cluster.engine_kwargs()) as second:
        # Each engine would open a new session on a node of its own.
        first_tag, second_tag = sorted(h.tag for h in cluster_engine.hosts())[:2]
        monkeypatch.setattr(cluster_engine, "_place_session", placing_on(cluster_engine, first_tag))
        monkeypatch.setattr(second, "_place_session", placing_on(second, second_tag))
        firsts, seconds = await asyncio.gather(
            asyncio.gather(*(cluster_engine.session(n) for n in names)),
            asyncio.gather(*(second.session(n) for n in names)),
        )
        # As two callers of Engine.session with one id: both get the one session.
        assert [s.id for s in seconds] == [s.id for s in firsts]
        live = [
            i.id
            for i in await cluster_engine.sessions()
            if i.id.partition(".")[2] in names and i.state is SessionState.ACTIVE
        ]
        assert sorted(live) == sorted(s.id for s in firsts)
    await asyncio.gather(*(s.close() for s in firsts))


class UnstartableRegistry:
    """A name registry that fails as it starts, as one would without sandkernel on the head."""

    def __init__(self) -> None:
        raise ModuleNotFoundError("No module named 'sandkernel'")

    async def join(self, *args: Any) -> bool:
        return True


def names_of_namespace(
    engine: ClusterEngine, monkeypatch: pytest.MonkeyPatch, namespace: str
) -> SessionNames:
    """The engine with a name registry of ``namespace`` (its hosts stay those of its own)."""
    names = SessionNames(namespace, engine._client_id, 60.0)
    monkeypatch.setattr(engine, "_names", names)
    return names


async def test_names_open_without_a_name_registry_that_cannot_be_created(
    cluster_engine: ClusterEngine,
    ray_cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=_names.__name__)
    monkeypatch.setattr(_names, "_REACH_TIMEOUT_S", 120.0)  # so that the failure is seen
    names = names_of_namespace(cluster_engine, monkeypatch, f"{ray_cluster.namespace}-unstartable")
    names._remote_registry = ray.remote(UnstartableRegistry)
    sessions = [await cluster_engine.session(f"unregistered-{n}") for n in range(2)]
    assert [(await s.run("1 + 1")).text for s in sessions] == ["2", "2"]
    warnings = [r.getMessage() for r in caplog.records if r.name == _names.__name__]
    assert len(warnings) == 1, warnings
    assert "could not be created on the head node" in warnings[0]
    assert "Is sandkernel installed" in warnings[0]
    await names.leave()
    await asyncio.gather(*(s.close() for s in sessions))


async def test_names_open_without_a_name_registry_that_cannot_be_placed(
    cluster_engine: ClusterEngine,
    ray_cluster: LocalCluster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=_names.__name__)
    monkeypatch.setattr(_names, "_REACH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(_names, "_HEAD_NODE", "sandkernel-test-no-such-node")  # pending forever
    namespace = f"{ray_cluster.namespace}-unplaceable"
    names = names_of_namespace(cluster_engine, monkeypatch, namespace)
    started = time.monotonic()
    first = await cluster_engine.session("unplaced-1")
    waited_s = time.monotonic() - started
    started = time.monotonic()
    second = await cluster_engine.session("unplaced-2")
    assert waited_s - (time.monotonic() - started) < 3.0  # the second did not wait for it
    assert (await second.run("6 * 7")).text == "42"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == _names.__name__]
    assert "did not answer within 1 s" in warning
    await names.leave()
    ray.kill(ray.get_actor(REGISTRY_ACTOR_NAME, namespace=namespace), no_restart=True)
    await asyncio.gather(first.close(), second.close())


async def test_doctor_runs_on_every_node(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    # In a thread: the engine's loop keeps renewing its leases meanwhile.
    reports = await asyncio.to_thread(diagnose_cluster, None, timeout_s=300)
    assert set(reports) == alive_node_ids()
    for node_id, report in reports.items():
        failed = [c for c in report["checks"] if not c["ok"] and c.get("critical", True)]
        assert report["ok"], (node_id, failed)
        assert any(c["name"] == "kernel start" and c["ok"] for c in report["checks"])


async def test_a_lost_node_fails_its_sessions_fast_and_only_them(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    sessions = await asyncio.gather(*(cluster_engine.session() for _ in range(6)))
    for s in sessions:
        await s.run("alive = True")
    here = ray.get_runtime_context().get_node_id()
    doomed_node = next(n for n in ray_cluster.worker_nodes() if n.node_id != here)
    doomed = [s for s in sessions if s.node_id == doomed_node.node_id]
    spared = [s for s in sessions if s.node_id != doomed_node.node_id]
    assert doomed and spared
    (host,) = [h for h in cluster_engine.hosts() if h.node_id == doomed_node.node_id]
    ray_cluster.remember(cluster_engine.hosts())
    # A cell in flight there, with a process of its own in the sandbox.
    in_flight = asyncio.create_task(
        doomed[0].run("import subprocess, time\np = subprocess.Popen(['sleep', '600'])\n"
                      "time.sleep(600)")
    )  # fmt: skip
    await asyncio.sleep(1.0)
    assert [p for p in leftovers_of(host) if p.startswith("process")]

    await asyncio.to_thread(ray_cluster.cluster.remove_node, doomed_node)  # type: ignore[union-attr]
    # Timed from the node's end: removing it takes Ray a while of its own.
    started = time.monotonic()
    with pytest.raises(SessionLost, match=doomed_node.node_id):
        await in_flight
    for s in doomed:
        with pytest.raises(SessionLost, match=doomed_node.node_id):
            await s.run("alive")
    assert time.monotonic() - started < 5
    for s in spared:
        assert (await s.run("alive")).text == "True"
    fresh = await cluster_engine.session()
    assert fresh.node_id != doomed_node.node_id
    assert (await fresh.run("1 + 1")).text == "2"
    # The guardian ends the node's kernels: nothing of that host is left.
    assert wait_until(lambda: not leftovers_of(host), timeout_s=10), leftovers_of(host)

    async def host_counted_lost() -> bool:
        return (await cluster_engine.stats()).hosts_lost >= 1

    await wait_for(host_counted_lost, timeout_s=5)
    assert doomed_node.node_id not in {h.node_id for h in cluster_engine.hosts()}
    await asyncio.gather(*(s.close() for s in [*sessions, fresh]))


async def test_a_joining_node_gets_a_host_and_new_sessions(
    cluster_engine: ClusterEngine, ray_cluster: LocalCluster
) -> None:
    from tests.ray._support import NODE_ARGS

    assert ray_cluster.cluster is not None
    # Sessions held on the other hosts, so that the new host is the emptiest.
    held = await asyncio.gather(*(cluster_engine.session() for _ in range(4)))
    # In this thread: a node installs signal handlers. It takes a few seconds, well
    # within the hosts' leases.
    node = ray_cluster.cluster.add_node(**NODE_ARGS)
    await wait_for(
        lambda: node.node_id in {h.node_id for h in cluster_engine.hosts()}, timeout_s=60
    )
    ray_cluster.remember(cluster_engine.hosts())
    # The emptiest host takes the next sessions: the new one.
    session = await cluster_engine.session()
    assert session.node_id == node.node_id
    assert (await session.run("6 * 7")).text == "42"
    await asyncio.gather(*(s.close() for s in [*held, session]))
