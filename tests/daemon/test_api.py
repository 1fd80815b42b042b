"""The daemon's API through its real socket, with the client: sessions, streaming, files."""

from __future__ import annotations

import hashlib
import io
import stat
import time
from typing import Any

import anyio
import pytest

from sandkernel.daemon.client import AsyncClient, Client
from sandkernel.errors import (
    EngineClosed,
    FileNotFoundInStore,
    FileRejected,
    SessionClosed,
    SessionNotFound,
)
from sandkernel.results import ExecutionResult
from sandkernel.session import SessionState
from sandkernel.workspace.place import MAX_COPIES
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def test_a_session_keeps_state_across_cells(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    client = running.client()
    session = await client.session("conv-1")
    assert (await session.run("import math\nradius = 2")).status == "ok"
    result = await session.run("round(math.pi * radius**2, 3)")
    assert isinstance(result, ExecutionResult)
    assert result.status == "ok" and result.text == "12.566"
    again = await client.session("conv-1")  # get-or-create answers the same session
    assert (await again.run("radius")).text == "2"
    info = await session.info()
    assert info.id == "conv-1" and info.state is SessionState.ACTIVE and info.cells_run == 3
    assert [s.id for s in await client.sessions()] == ["conv-1"]


async def test_streamed_outputs_arrive_while_the_cell_runs(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    session = await running.client().session("stream")
    seen: list[tuple[float, dict[str, Any]]] = []
    started = time.monotonic()
    result = await session.run(
        "import sys, time\n"
        "for i in range(6):\n"
        "    print(f'tick {i}', flush=True)\n"
        "    if i == 2: print('half way', file=sys.stderr, flush=True)\n"
        "    time.sleep(0.8)\n",
        on_output=lambda message: seen.append((time.monotonic() - started, message)),
    )
    finished = time.monotonic() - started
    assert result.status == "ok" and finished >= 4.0
    stdout = [(t, m) for t, m in seen if m["content"].get("name") == "stdout"]
    assert "".join(m["content"]["text"] for _, m in stdout) == result.stdout
    assert result.stdout.splitlines() == [f"tick {i}" for i in range(6)]
    # The cell prints its first line at once and its last 4 s later: streamed,
    # the first line arrives long before the result; buffered, with it.
    first_at = stdout[0][0]
    assert finished - first_at > 1.5, f"first output {first_at:.2f} s, result {finished:.2f} s"
    assert stdout[-1][0] - first_at > 1.5, "the outputs arrived together, not as they came"
    assert any(m["content"].get("name") == "stderr" for _, m in seen)
    assert all(set(m) == {"msg_type", "content"} for _, m in seen)


async def test_a_csv_goes_in_and_its_plot_comes_back_by_id(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    client = running.client()
    session = await client.session("plots")
    csv = b"month,sales\n1,10\n2,14\n3,9\n4,21\n"
    stored = await session.upload(csv, "sales.csv")
    assert stored.mime_type == "application/csv" and stored.session_id == "plots"
    result = await session.run(
        "import pandas as pd, matplotlib\n"
        "matplotlib.use('Agg')\n"
        "df = pd.read_csv('/mnt/data/sales.csv')\n"
        "ax = df.plot(x='month', y='sales')\n"
        "ax.figure.savefig('/mnt/data/sales.png')\n"
        "print(int(df.sales.sum()))"
    )
    assert result.status == "ok", result
    assert result.stdout.strip() == "54"
    (png,) = [f for f in result.files if f.name == "sales.png"]
    data = await client.download(png.id)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert hashlib.sha256(data).hexdigest() == png.sha256 and len(data) == png.size_bytes
    assert (await client.file(png.id)).session_id == "plots"
    names = {f.name for f in await session.files()}
    assert {"sales.csv", "sales.png"} <= names
    assert await client.download(stored.id) == csv


async def test_unowned_uploads_attach_by_id_and_agents_share_files(
    daemon_factory: DaemonFactory, tmp_path: Any
) -> None:
    running = await daemon_factory(engine_options={"pool_size": 2})
    client = running.client()
    source = tmp_path / "notes.txt"
    source.write_bytes(b"from a path\n")
    loose = await client.upload(source)  # a path, as Engine.upload takes
    assert loose.name == "notes.txt" and loose.scope == "none"
    session = await client.session("attach")
    result = await session.run(
        "print(open('/mnt/data/notes.txt').read(), end='')", file_ids=[loose.id]
    )
    assert result.stdout == "from a path\n"
    shared = await client.upload(io.BytesIO(b"k,v\na,1\n"), "shared.csv")
    attached = await client.attach_to_agent("analyst", [shared.id])
    assert [f.agent_id for f in attached] == ["analyst"]
    assert [f.id for f in await client.list_files(agent_id="analyst")] == [shared.id]
    agent_session = await client.session("for-analyst", agent_id="analyst")
    seen = await agent_session.run("print(open('/mnt/data/shared.csv').read(), end='')")
    assert seen.stdout == "k,v\na,1\n"
    await client.delete_file(loose.id)
    with pytest.raises(FileNotFoundInStore):
        await client.file(loose.id)


async def test_a_paths_name_arrives_as_the_engine_would_store_it(
    daemon_factory: DaemonFactory, tmp_path: Any
) -> None:
    running = await daemon_factory()
    client = running.client()
    session = await client.session("names")
    source = tmp_path / 'quo"te ü.csv'
    source.write_bytes(b"a,b\n1,2\n")
    assert (await client.upload(source)).name == 'quo"te ü.csv'
    assert (await session.upload(source)).name == 'quo"te ü.csv'
    assert (await client.upload(b"a\n", 'x"%22.csv')).name == 'x"%22.csv'
    assert (await running.engine.upload(source)).name == 'quo"te ü.csv'


async def test_attaching_a_file_again_and_again_answers_a_path_or_a_clear_refusal(
    daemon_factory: DaemonFactory,
) -> None:
    running = await daemon_factory()
    client = running.client()
    upload = await client.upload(b"a,b\n1,2\n", "data.csv")
    session = await client.session("attach-again")
    paths = []
    for _ in range(3):
        (path,) = await session.attach([upload.id])
        read_then_edit = f"print(open({path!r}).read(), end='')\nopen({path!r}, 'a').write('3,4')"
        assert (await session.run(read_then_edit)).stdout == "a,b\n1,2\n"  # as stored
        paths.append(path)
    tag = upload.id[5:13]
    assert paths == [
        "/mnt/data/data.csv",
        f"/mnt/data/data-{tag}.csv",
        f"/mnt/data/data-{tag}-2.csv",
    ]
    fill = (
        f"for n in range(3, {MAX_COPIES + 1}):\n"
        f"    open(f'/mnt/data/data-{tag}-{{n}}.csv', 'w').write('taken')"
    )
    assert (await session.run(fill)).status == "ok"
    with pytest.raises(FileRejected, match="cannot place 'data.csv' in /mnt/data"):
        await session.attach([upload.id])
    # The refusal is an answer like any other: the connection serves the next call.
    assert (await client.file(upload.id)).path == paths[-1]


async def test_extend_interrupt_and_close(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    client = running.client()
    session = await client.session("life", ttl_s=60)
    before = await session.info()
    # datetimes hold microseconds: two conversions may round apart by one
    assert 55 < (before.expires_at - before.last_active).total_seconds() <= 60 + 1e-5
    expires = await session.extend(ttl_s=600)
    assert expires - time.time() > 590
    await session.close()
    assert (await session.info()).state is SessionState.CLOSED
    with pytest.raises(SessionClosed):
        await session.run("1")
    with pytest.raises(SessionClosed):
        await client.get_session("life")
    with pytest.raises(SessionNotFound):
        await client.get_session("never-created")


async def test_the_blocking_client_mirrors_the_async_one(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()

    def use() -> tuple[str, list[str], bytes]:
        with Client(running.socket) as client:
            session = client.session("sync")
            *outputs, result = session.stream("print('a', flush=True); print('b')")
            assert isinstance(result, ExecutionResult)
            chunks = [m["content"].get("text", "") for m in outputs if isinstance(m, dict)]
            stored = session.upload(b"x,y\n1,2\n", "t.csv")
            return result.stdout, chunks, client.download(stored.id)

    import anyio

    stdout, chunks, data = await anyio.to_thread.run_sync(use)
    assert stdout == "a\nb\n" and "".join(chunks) == "a\nb\n" and data == b"x,y\n1,2\n"


async def test_the_socket_is_private_and_stats_and_schema_are_served(
    daemon_factory: DaemonFactory,
) -> None:
    running = await daemon_factory()
    mode = running.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(running.socket.parent.stat().st_mode) == 0o700
    client = running.client()
    health = await client.health()
    assert health.status == "ok" and health.policy == running.engine.policy.name
    await client.session("counted")
    stats = await client.stats()
    assert stats.sessions_active == 1
    schema = (await running.raw().get("/openapi.json")).json()
    assert {"/v1/sessions", "/v1/sessions/{session_id}/execute", "/v1/files"} <= set(
        schema["paths"]
    )
    assert "ExecutionResult" in schema["components"]["schemas"]


async def test_a_client_without_a_daemon_says_how_to_start_one(short_dir: Any) -> None:
    from sandkernel.daemon.errors import DaemonUnavailable

    async with AsyncClient(short_dir / "none.sock") as client:
        with pytest.raises(DaemonUnavailable, match="sandkernel serve"):
            await client.health()


async def test_a_client_closed_under_its_calls_says_so(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    client = running.client()
    session = await client.session("closed-under")
    started = anyio.Event()

    def seen(message: dict[str, Any]) -> None:
        started.set()

    async with anyio.create_task_group() as group:

        async def close_once_started() -> None:
            await started.wait()
            await client.aclose()

        group.start_soon(close_once_started)
        with pytest.raises(EngineClosed, match="closed while the call ran"):
            await session.run(
                "print('started', flush=True)\nimport time\ntime.sleep(60)", on_output=seen
            )
    with pytest.raises(EngineClosed, match="the client is closed"):
        await client.health()
    await running.engine.close_session("closed-under")


async def test_a_client_leaving_a_stream_stops_its_cell(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    session = await running.client().session("left")
    raw = running.raw()
    body = {"code": "import time\nprint('started', flush=True)\ntime.sleep(60)\nleft = False"}
    async with raw.stream("POST", "/v1/sessions/left/execute?stream=true", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if "started" in line:
                break  # leave in the middle of the cell
    started = time.monotonic()
    after = await session.run("'left' in globals()")
    assert after.text == "False"  # the cell was interrupted, not run to its end
    assert time.monotonic() - started < 15


async def test_sandkernel_run_through_the_daemon(
    daemon_factory: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import anyio

    from sandkernel.daemon.cli import run_via_daemon

    running = await daemon_factory()
    code = await anyio.to_thread.run_sync(
        lambda: run_via_daemon(running.socket, "print(1 + 1)", timeout_s=None, json_output=True)
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["stdout"] == "2\n"
    code = await anyio.to_thread.run_sync(
        lambda: run_via_daemon(running.socket, "1/0", timeout_s=5, json_output=False)
    )
    assert code == 1
    assert "ZeroDivisionError" in capsys.readouterr().err
    states = {s.state for s in (await running.engine.sessions())}
    assert states == {SessionState.CLOSED}  # each run used a fresh session and closed it


async def test_a_cell_whose_caller_gave_up_is_interrupted_as_the_engine_does(
    daemon_factory: DaemonFactory,
) -> None:
    running = await daemon_factory()
    session = await running.client().session("gave-up")
    with anyio.move_on_after(1):
        await session.run("import time\ntime.sleep(30)")
    started = time.monotonic()
    result = await session.run("1 + 1")
    # Not waited out: the cell the caller gave up on was interrupted.
    assert result.status == "ok" and result.text == "2"
    assert time.monotonic() - started < 15
    missing = await session.run("undefined_name")  # errors still come back as results
    assert missing.status == "error" and missing.error is not None
