"""Placement's foresight: the paths a new session will give files, before it exists."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandkernel.files import FileStore
from sandkernel.openai_api.placement import _NewWorkspace
from sandkernel.workspace import OutputCaps, SessionWorkspace

pytestmark = [
    pytest.mark.anyio,
    # The engine's placing gives files to the sandbox user (or root, read-only): that takes root.
    pytest.mark.skipif(os.geteuid() != 0, reason="placing files changes their owner"),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    with FileStore(tmp_path / "store") as s:
        yield s


async def test_a_new_sessions_paths_are_foreseen_as_the_engine_places_the_files(
    store: FileStore, tmp_path: Path
) -> None:
    agent = [
        store.add_bytes(b"reference", "data.csv", agent_id="asst"),
        store.add_bytes(b"another reference", "data.csv", agent_id="asst"),
        store.add_bytes(b"shared", "same.csv", agent_id="asst"),
        store.add_bytes(b"the assistant's notes", "notes.txt", agent_id="asst"),
    ]
    outputs = [
        store.add_bytes(
            b"notes code wrote", "notes.txt", origin="produced", session_id="thr",
            path="/mnt/data/notes.txt",
        ),
    ]  # fmt: skip
    thread = [
        store.add_bytes(b"the thread's data", "data.csv"),  # taken by the assistant's
        store.add_bytes(b"shared", "same.csv"),  # the same content is there already
        store.add_bytes(b"draft", "report.txt"),
        store.add_bytes(b"final", "report.txt"),  # given beside the other, not over it
    ]
    foreseen = _NewWorkspace()
    agent_paths = [foreseen.place(f) for f in store.list(agent_id="asst")]
    output_paths = [foreseen.place(f) for f in outputs]
    thread_paths = [foreseen.place(f) for f in thread]

    ws = tmp_path / "ws"
    ws.mkdir(mode=0o1777)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="thr", agent_id="asst")
    await workspace.prepare(ws, restart=False)
    # The assistant's files are placed as the session starts: the workspace holds them alone.
    assert agent_paths == list(workspace.state.latest)
    assert list(workspace.state.latest.values()) == [f.id for f in agent]
    assert output_paths == await workspace.attach(ws, [f.id for f in outputs])
    assert thread_paths == await workspace.attach(ws, [f.id for f in thread])
    assert thread_paths == [
        f"/mnt/data/data-{thread[0].id[5:13]}.csv",
        "/mnt/data/same.csv",
        "/mnt/data/report.txt",
        f"/mnt/data/report-{thread[3].id[5:13]}.txt",
    ]
    assert output_paths == [f"/mnt/data/notes-{outputs[0].id[5:13]}.txt"]


async def test_a_copy_made_when_placed_is_foreseen_only_under_its_own_free_name(
    store: FileStore, tmp_path: Path
) -> None:
    store.add_bytes(b"reference", "data.csv", agent_id="asst")
    held = [
        store.add_bytes(b"another thread's data", "data.csv", session_id="other"),
        store.add_bytes(b"another thread's notes", "notes.txt", session_id="other"),
    ]
    foreseen = _NewWorkspace()
    for stored in store.list(agent_id="asst"):
        foreseen.place(stored)
    # The copy's id, which would name it where its own name is taken, is not known yet.
    assert [foreseen.place(f, known_id=False) for f in held] == [
        None,
        "/mnt/data/notes.txt",
    ]

    ws = tmp_path / "ws"
    ws.mkdir(mode=0o1777)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="thr", agent_id="asst")
    await workspace.prepare(ws, restart=False)
    copies = []
    for stored in held:
        with store.open(stored.id) as content:
            copies.append(store.add_bytes(content.read(), stored.name))
    data, notes = await workspace.attach(ws, [f.id for f in copies])
    assert notes == "/mnt/data/notes.txt"
    assert data == f"/mnt/data/data-{copies[0].id[5:13]}.csv"
