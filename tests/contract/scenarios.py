"""The contract's scenarios: what every backend of ``EngineAPI`` must do, alike.

Each scenario is an async function taking the backend (typed as the contract,
never a concrete class). ``test_contract.py`` runs them against the embedded
engine and the daemon over its socket; the Ray test run runs the same list
against ``ClusterEngine`` and a daemon serving a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sandkernel.api import EngineAPI
from sandkernel.batch import RunRequest
from sandkernel.errors import (
    BadInput,
    FileNotFoundInStore,
    FileRejected,
    KernelDead,
    SandkernelError,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
)
from sandkernel.results import ExecutionResult

Scenario = Callable[[EngineAPI], Awaitable[None]]


async def state_is_kept_across_cells(api: EngineAPI) -> None:
    session = await api.session("contract-state")
    assert session.id.endswith("contract-state")
    await session.run("total = 40")
    assert (await session.run("total + 2")).text == "42"
    again = await api.get_session(session.id)
    assert (await again.run("total")).text == "40"
    await session.close()


async def sessions_are_isolated(api: EngineAPI) -> None:
    a, b = await api.session(), await api.session()
    assert a.id != b.id
    await a.run("secret = 1\nopen('/mnt/data/mine.txt', 'w').write('a')")
    result = await b.run("secret")
    assert result.status == "error" and result.error is not None
    assert result.error.name == "NameError"
    listed = await b.run("import os; sorted(os.listdir('/mnt/data'))")
    assert "mine.txt" not in listed.text
    await a.close()
    await b.close()


async def outputs_stream_before_the_result(api: EngineAPI) -> None:
    session = await api.session()
    events = []
    async with contextlib.aclosing(
        session.stream("print('a', flush=True)\nprint('b', flush=True)\n6 * 7")
    ) as stream:
        async for event in stream:
            events.append(event)
    *outputs, result = events
    assert isinstance(result, ExecutionResult) and result.text == "42"
    assert all(isinstance(e, dict) for e in outputs)
    text = "".join(
        e["content"].get("text", "")
        for e in outputs
        if e.get("msg_type", e.get("type")) == "stream"
    )
    assert text == "a\nb\n" and result.stdout == "a\nb\n"
    await session.close()


async def output_holding_unicode_line_breaks_comes_whole(api: EngineAPI) -> None:
    """U+2028, U+2029 and U+0085 are text in a line of JSON, not its end: streamed, one-shot."""
    text = "a\u2028b\u2029c\x85d"
    code = f"print({text!r})"
    session = await api.session()
    async with contextlib.aclosing(session.stream(code)) as stream:
        events = [event async for event in stream]
    result = events[-1]
    assert isinstance(result, ExecutionResult) and result.stdout == text + "\n"
    await session.close()
    requests = [RunRequest(code=code, id=1), RunRequest(code="print(2)", id=2)]
    results = [r async for r in api.run_many(requests, concurrency=1)]
    assert sorted((r.id, r.stdout) for r in results) == [(1, text + "\n"), (2, "2\n")]


async def files_go_up_and_come_back_by_id(api: EngineAPI) -> None:
    session = await api.session()
    uploaded = await session.upload(b"x,y\n3,4\n", "in.csv")
    made = await session.run(
        "data = open('/mnt/data/in.csv').read()\nopen('/mnt/data/out.txt', 'w').write(data.upper())"
    )
    assert made.status == "ok", made.error
    (produced,) = [f for f in made.files if f.name == "out.txt"]
    assert await api.download(produced.id) == b"X,Y\n3,4\n"
    assert await api.download(uploaded.id) == b"x,y\n3,4\n"
    assert (await api.file(uploaded.id)).name == "in.csv"
    ids = {f.id for f in await api.list_files(session_id=session.id)}
    assert {uploaded.id, produced.id} <= ids
    assert {f.id for f in await session.files()} >= {uploaded.id, produced.id}
    await api.delete_file(uploaded.id)
    with pytest.raises(FileNotFoundInStore):
        await api.file(uploaded.id)
    with pytest.raises(FileNotFoundInStore):
        await api.download("file-doesnotexist")
    with pytest.raises(FileNotFoundInStore):
        await api.delete_file(uploaded.id)  # gone
    # A session's upload keeps its retention; a file has one owner.
    kept = await api.upload(b"k\n", "k.txt", session_id=session.id, retention_s=600)
    assert kept.session_id is not None and kept.expires_at is not None
    assert (await api.file(kept.id)).expires_at == kept.expires_at
    with pytest.raises(BadInput):
        await api.upload(b"b\n", "b.txt", session_id=session.id, agent_id="contract-agent")
    # Past its retention, not purged yet: unreadable, and still deletable.
    brief = await api.upload(b"brief\n", "brief.txt", retention_s=0.2)
    async with asyncio.timeout(10):
        while True:
            try:
                await api.file(brief.id)
            except FileNotFoundInStore:
                break
            await asyncio.sleep(0.05)
    await api.delete_file(brief.id)
    with pytest.raises(FileNotFoundInStore):
        await api.delete_file(brief.id)
    await session.close()


class _ShortReads(io.RawIOBase):
    """A binary stream whose reads return at most 4 KiB, as a pipe's or a socket's may."""

    name = "short.txt"

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 4096))
        buffer[: len(chunk)] = chunk
        return len(chunk)


async def uploads_are_taken_from_any_source_as_the_embedded_engine_takes_them(
    api: EngineAPI,
) -> None:
    data = b"0123456789abcdef\n" * 2048  # 34 KiB
    for source in (bytearray(data), memoryview(data)):
        stored = await api.upload(source, "bytes.txt")
        assert await api.download(stored.id) == data
    stored = await api.upload(_ShortReads(data))  # read to its end, not one read
    assert (stored.name, await api.download(stored.id)) == ("short.txt", data)
    with pytest.raises(BadInput, match="text stream"):
        await api.upload(io.StringIO("/etc/hostname"), "note.txt")  # never a path
    with tempfile.TemporaryDirectory() as folder:
        place = Path(folder)
        (place / "real.txt").write_bytes(data)
        (place / "link.txt").symlink_to(place / "real.txt")
        os.mkfifo(place / "fifo.txt")
        stored = await api.upload(place / "real.txt")
        assert (stored.name, await api.download(stored.id)) == ("real.txt", data)
        # Refused, never followed nor waited on.
        for refused in ("link.txt", "fifo.txt", "missing.txt"):
            with pytest.raises(FileRejected):
                await api.upload(place / refused)
        with pytest.raises(FileRejected):
            await api.upload(place, "folder.txt")


async def agent_files_are_seen_read_only_by_its_sessions(api: EngineAPI) -> None:
    stored = await api.upload(b"rules\n", "rules.txt", agent_id="contract-agent")
    # An agent id of 128 characters, as every backend takes it (no node's tag in it).
    long_agent = "a" * 128
    assert (await api.upload(b"x\n", "x.txt", agent_id=long_agent)).agent_id == long_agent
    session = await api.session(agent_id="contract-agent")
    result = await session.run(
        "print(open('/mnt/data/rules.txt').read(), end='')\n"
        "try:\n    open('/mnt/data/rules.txt', 'w')\n"
        "except OSError as e:\n    print(type(e).__name__)"
    )
    assert result.stdout.startswith("rules\n") and "Error" in result.stdout, result.stdout
    assert stored.id in {f.id for f in await api.list_files(agent_id="contract-agent")}
    other = await api.session()
    assert (await other.run("import os; os.path.exists('/mnt/data/rules.txt')")).text == "False"
    # Every handle on the session knows its agent, however it was got.
    assert session.agent_id == "contract-agent" and other.agent_id is None
    assert (await api.get_session(session.id)).agent_id == "contract-agent"
    assert (await api.session(session.id)).agent_id == "contract-agent"
    # Given with an id that is not there, or a file another session owns (maybe on another
    # node): none is given, and the live session has no new file.
    notes = await api.upload(b"notes\n", "notes.txt")
    owned = await other.upload(b"other's\n", "owned.txt")
    for refused in ("file-000000000000000000000000", owned.id):
        with pytest.raises(FileNotFoundInStore):
            await api.attach_to_agent("contract-agent", [notes.id, refused])
    assert notes.id not in {f.id for f in await api.list_files(agent_id="contract-agent")}
    assert (await session.run("import os; os.path.exists('/mnt/data/notes.txt')")).text == "False"
    await api.attach_to_agent("contract-agent", [notes.id])
    assert (await session.run("print(open('/mnt/data/notes.txt').read(), end='')")).stdout == (
        "notes\n"
    )
    await session.close()
    await other.close()


async def ended_sessions_answer_with_their_error(api: EngineAPI) -> None:
    session = await api.session("contract-ended")
    await session.run("x = 1")
    await session.close()
    with pytest.raises(SessionClosed):
        await session.run("x")
    with pytest.raises(SessionClosed):
        await session.interrupt()
    with pytest.raises(SessionClosed):
        await api.get_session(session.id)
    with pytest.raises(SessionClosed):
        await api.session(session.id)
    fresh = await api.session(session.id, if_expired="new")
    assert (await fresh.run("x")).error is not None  # a new kernel: x is gone
    await fresh.close()
    with pytest.raises(SessionNotFound):
        await api.get_session("contract-never-opened")
    assert await api.list_files(session_id="contract-never-opened") == []


async def a_session_expires_after_its_ttl(api: EngineAPI) -> None:
    session = await api.session()
    expires_at = await session.extend(1.0)
    info = await session.info()
    assert abs(info.expires_at.timestamp() - expires_at) < 0.5
    # the TTL has to pass: nothing to wait on but the clock
    await asyncio.sleep(1.6)
    # Named by the id its backend gave it, and why, in the embedded engine's words.
    why = rf"^session {re.escape(repr(session.id))} expired at \S+ because no activity for 1 s "
    with pytest.raises(SessionExpired, match=why + r"\(session_ttl_s\)"):
        await session.run("1")


async def a_dead_kernel_is_named_by_its_session(api: EngineAPI) -> None:
    session = await api.session()
    await session.run("x = 1")
    died = await session.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (died.status, died.kernel_alive) == ("killed", False)
    with pytest.raises(KernelDead, match=rf"^session {re.escape(repr(session.id))}: its kernel"):
        await session.run("x")
    fresh = await session.run("'x' in globals()", restart=True)
    assert (fresh.text, fresh.state_lost) == ("False", True)
    await session.close()


async def one_shot_runs_are_programs(api: EngineAPI) -> None:
    result = await api.run_once("import sys\nprint(sys.stdin.read()[::-1])", stdin="abc")
    assert (result.status, result.return_code, result.stdout) == ("ok", 0, "cba\n")
    failed = await api.run_once("raise SystemExit(3)")
    assert (failed.status, failed.return_code) == ("error", 3)
    requests = [RunRequest(code=f"print({n} * 2)", id=n) for n in range(8)]
    results = {r.id: r.stdout async for r in api.run_many(requests, concurrency=2)}
    assert results == {n: f"{n * 2}\n" for n in range(8)}
    with pytest.raises((SandkernelError, ValueError)):
        [r async for r in api.run_many(requests, concurrency=0)]


async def stats_count_sessions(api: EngineAPI) -> None:
    session = await api.session()
    stats = await api.stats()
    assert stats.sessions_active >= 1
    assert session.id in {s.id for s in await api.sessions()}
    await session.close()


async def bad_input_is_refused_by_name_and_the_engine_serves_on(api: EngineAPI) -> None:
    with pytest.raises((SandkernelError, ValueError)):
        await api.session("not a valid id/../")
    with pytest.raises((SandkernelError, ValueError)):
        await api.upload(b"MZ\x90\x00", "tool.exe")
    # Names no backend can take (one the daemon's client could not even send), and ids
    # that are no path segment: the embedded engine's answers, from every backend.
    with pytest.raises(FileRejected):
        await api.upload(b"x", "bad\udcff.txt")
    for odd in ("a/b", ".", ".."):
        with pytest.raises(FileNotFoundInStore):
            await api.file(odd)
        with pytest.raises(FileNotFoundInStore):
            await api.download(odd)
        with pytest.raises(SessionNotFound):
            await api.get_session(odd)
    session = await api.session()
    # Code no Jupyter message (nor the daemon's client) can carry: the same refusal.
    with pytest.raises(BadInput, match="lone surrogate"):
        await session.run("x = '\ud800'")
    with pytest.raises(BadInput, match="lone surrogate"):
        async for _ in session.stream("x = '\ud800'"):
            pass
    assert (await session.run("1 + 1")).text == "2"
    await session.close()


SCENARIOS: list[Scenario] = [
    state_is_kept_across_cells,
    sessions_are_isolated,
    outputs_stream_before_the_result,
    output_holding_unicode_line_breaks_comes_whole,
    files_go_up_and_come_back_by_id,
    uploads_are_taken_from_any_source_as_the_embedded_engine_takes_them,
    agent_files_are_seen_read_only_by_its_sessions,
    ended_sessions_answer_with_their_error,
    a_session_expires_after_its_ttl,
    a_dead_kernel_is_named_by_its_session,
    one_shot_runs_are_programs,
    stats_count_sessions,
    bad_input_is_refused_by_name_and_the_engine_serves_on,
]
