"""A session's workspace on its own: a store, caps and ids, and no engine."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from sandkernel.errors import EngineClosed, FileNotFoundInStore, FileRejected, FileTooLarge
from sandkernel.files import FileStore
from sandkernel.results import DisplayOutput, ExecutionResult, Usage
from sandkernel.sandbox import SANDBOX_UID
from sandkernel.workspace import OutputCaps, SessionWorkspace, place
from tests.files._samples import png_bytes

pytestmark = [
    pytest.mark.anyio,
    # Placed files are given to the sandbox user (or root, read-only): that takes root.
    pytest.mark.skipif(os.geteuid() != 0, reason="placing files changes their owner"),
]


def folder(tmp_path: Path, name: str = "ws") -> Path:
    """A stand-in for a kernel's /mnt/data on the host."""
    path = tmp_path / name
    path.mkdir(mode=0o1777)
    return path


def cell(count: int) -> ExecutionResult:
    return ExecutionResult(status="ok", usage=Usage(wall_ms=1.0), execution_count=count)


async def test_an_upload_is_the_sessions_and_is_placed_in_its_folder(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    stored = await workspace.upload(ws, b"a,b\n1,2\n", "data.csv")
    assert stored.session_id == "s1"
    placed = ws / "data.csv"
    assert placed.read_bytes() == b"a,b\n1,2\n"
    assert placed.stat().st_uid == SANDBOX_UID
    assert workspace.state.latest == {"/mnt/data/data.csv": stored.id}
    assert [f.id for f in await workspace.list()] == [stored.id]


async def test_an_upload_the_workspace_has_no_room_for_is_refused_and_leaves_nothing(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")

    def full(src: BinaryIO, dst: BinaryIO, length: int = 0) -> None:
        dst.write(src.read(4))
        dst.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(place.shutil, "copyfileobj", full)
    with pytest.raises(FileTooLarge, match="no room for 'data.csv'"):
        await workspace.upload(ws, b"a,b\n1,2\n", "data.csv")
    # No half-written file the sandbox could not remove, and nothing stored.
    assert list(ws.iterdir()) == []
    assert await workspace.list() == [] and store.list() == []


async def test_another_sessions_or_agents_file_is_not_found_and_the_agents_is_read_only(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    other_session = store.add_bytes(b"theirs\n", "theirs.txt", session_id="s2")
    other_agent = store.add_bytes(b"not ours\n", "agent.txt", agent_id="a2")
    for file_id in (other_session.id, other_agent.id):
        with pytest.raises(FileNotFoundInStore, match="for session 's1'"):
            await workspace.attach(ws, [file_id])
    ours = store.add_bytes(b"shared\n", "shared.txt", agent_id="a1")
    assert await workspace.attach(ws, [ours.id]) == ["/mnt/data/shared.txt"]
    placed = (ws / "shared.txt").stat()
    assert (placed.st_uid, stat.S_IMODE(placed.st_mode)) == (0, 0o444)
    fresh = store.add_bytes(b"nobody's yet\n", "fresh.txt")
    await workspace.attach(ws, [fresh.id])
    assert store.get(fresh.id).session_id == "s1"


async def test_collect_stores_what_a_cell_wrote_within_the_caps(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(max_files=1), session_id="s1")
    (ws / "a.txt").write_text("first")
    (ws / "b.txt").write_text("second")
    result = await workspace.collect(ws, cell(1))
    (produced,) = result.files
    assert (produced.path, produced.execution_count) == ("/mnt/data/a.txt", 1)
    assert result.files_truncated and "max_files" in (result.files_note or "")
    assert store.get(produced.id).session_id == "s1"


async def test_links_and_fifos_a_cell_makes_are_noted_once_and_never_followed(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    await workspace.prepare(ws, restart=False)
    secret = tmp_path / "secret.txt"
    secret.write_text("host only")
    (ws / "out.txt").write_text("made")
    (ws / "link.txt").symlink_to(secret)
    os.mkfifo(ws / "pipe")
    (ws / "sub").mkdir()
    (ws / "sub" / "host").symlink_to(tmp_path)
    first = await workspace.collect(ws, cell(1))
    assert [f.name for f in first.files] == ["out.txt"] and first.files_truncated
    assert first.files_note == (
        "not collected (not regular files): link.txt (a symlink), pipe (a FIFO), "
        "sub/host (a symlink)"
    )
    assert [f.name for f in store.list()] == ["out.txt"]
    second = cell(2)
    assert await workspace.collect(ws, second) is second  # an earlier cell made them
    # Made again by a later cell: a new link over the old one, as `ln -sf` does.
    (ws / "link.new").symlink_to(secret)
    os.replace(ws / "link.new", ws / "link.txt")
    third = await workspace.collect(ws, cell(3))
    assert third.files == [] and third.files_truncated
    assert third.files_note == "not collected (not regular files): link.txt (a symlink)"


async def test_many_links_are_noted_by_a_few_names_and_a_count(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    for n in range(1000):
        (ws / f"link{n:03}").symlink_to("nowhere")
    result = await workspace.collect(ws, cell(1))
    assert result.files_note == (
        "not collected (not regular files): link000 (a symlink), link001 (a symlink), "
        "link002 (a symlink), link003 (a symlink), link004 (a symlink) and 995 more"
    )


async def test_a_restart_puts_the_sessions_files_into_the_fresh_folder(
    store: FileStore, tmp_path: Path
) -> None:
    first = folder(tmp_path, "first")
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    store.add_bytes(b"agent\n", "agent.txt", agent_id="a1")
    await workspace.prepare(first, restart=False)
    await workspace.upload(first, b"mine\n", "mine.txt")
    (first / "out").mkdir()
    (first / "out" / "made.txt").write_text("made")
    await workspace.collect(first, cell(1))
    second = folder(tmp_path, "second")
    await workspace.prepare(second, restart=True)
    assert (second / "agent.txt").read_bytes() == b"agent\n"
    assert (second / "mine.txt").read_bytes() == b"mine\n"
    assert (second / "out" / "made.txt").read_text() == "made"
    again = await workspace.collect(second, cell(2))
    assert again.files == []  # what was put back is not produced again


async def test_agent_files_given_while_the_workspace_was_filled_are_placed_after(
    store: FileStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    early = store.add_bytes(b"early\n", "early.txt", agent_id="a1")
    await workspace.prepare(ws, restart=False)
    # Given to the agent after prepare listed its files, before the session was live.
    late = store.add_bytes(b"late\n", "late.txt", agent_id="a1")
    store.add_bytes(b"big" * 1000, "big.txt", agent_id="a1")
    store.add_bytes(b"theirs\n", "theirs.txt", agent_id="a2")
    real_copy = place.shutil.copyfileobj

    def no_room_for_big(src: BinaryIO, dst: BinaryIO, length: int = 0) -> None:
        if src.read(3) == b"big":
            raise OSError(errno.ENOSPC, "No space left on device")
        src.seek(0)
        real_copy(src, dst, length)

    monkeypatch.setattr(place.shutil, "copyfileobj", no_room_for_big)
    await workspace.give_missed_agent_files(ws)  # a file with no room is no failure
    assert sorted(p.name for p in ws.iterdir()) == ["early.txt", "late.txt"]
    assert workspace.state.latest == {
        "/mnt/data/early.txt": early.id,
        "/mnt/data/late.txt": late.id,
    }
    assert "agent a1's session s1 did not get big.txt: no room for 'big.txt'" in caplog.text


async def test_a_closed_store_is_reported_as_the_engine_not_running(
    store: FileStore, tmp_path: Path
) -> None:
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    store.close()
    with pytest.raises(EngineClosed, match="not running"):
        await workspace.list()


@pytest.mark.usefixtures("no_stamp_tick")
async def test_an_unchanged_workspace_is_collected_without_a_thread_or_the_store(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(max_session_bytes=1 << 20), session_id="s1")
    await workspace.prepare(ws, restart=False)
    assert workspace.state.dirs is not None  # a fresh, empty folder: proved empty at once
    threads: list[object] = []

    async def to_thread(func: Callable[..., object], /, *args: object, **kwargs: object) -> object:
        threads.append(func)
        return func(*args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    first = cell(1)
    assert await workspace.collect(ws, first) is first
    assert threads == []
    (ws / "out.csv").write_text("a,b\n")
    (produced,) = (await workspace.collect(ws, cell(2))).files
    assert produced.path == "/mnt/data/out.csv" and len(threads) == 1
    third = cell(3)
    assert await workspace.collect(ws, third) is third  # that scan's stamps prove it
    assert len(threads) == 1
    (ws / "out.csv").write_text("a,b\n1,2\n")  # rewritten in place: the folder's mtime stays
    (again,) = (await workspace.collect(ws, cell(4))).files
    assert again.path == "/mnt/data/out.csv" and len(threads) == 2
    image = ExecutionResult(
        status="ok",
        usage=Usage(wall_ms=1.0),
        execution_count=5,
        displays=[DisplayOutput(data={"image/png": base64.b64encode(png_bytes()).decode()})],
    )
    (shown,) = (await workspace.collect(ws, image)).files
    assert shown.source == "display" and len(threads) == 3


async def test_a_file_grown_or_rewritten_after_the_scan_is_not_stored_past_the_caps(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caps hold for what the scan read: what is stored is exactly that."""
    from sandkernel.workspace import collect

    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(max_bytes=1 << 20), session_id="s1")
    await workspace.prepare(ws, restart=False)
    for name in ("grown.txt", "rewritten.txt", "kept.txt"):
        (ws / name).write_bytes(b"x")
    real_open = collect.open_workspace_file

    def racing_open(root: Path, rel: str) -> object:
        # The kernel writes between the scan and the engine's read.
        if rel == "grown.txt":
            (ws / rel).write_bytes(b"x" * (8 << 20))
        elif rel == "rewritten.txt":
            (ws / rel).write_bytes(b"y")
        return real_open(root, rel)

    monkeypatch.setattr(collect, "open_workspace_file", racing_open)
    result = await workspace.collect(ws, cell(1))
    assert [f.name for f in result.files] == ["kept.txt"]
    assert [f.name for f in store.list(session_id="s1")] == ["kept.txt"]


async def test_an_agent_file_placed_while_a_cell_is_collected_is_not_produced_by_it(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agent files are placed without waiting for a running cell, so even during its scan."""
    from sandkernel.workspace import collect

    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    await workspace.prepare(ws, restart=False)
    rules = store.add_bytes(b"rules\n", "rules.txt", agent_id="a1")
    real_scan = collect.scan_workspace

    def scan_meanwhile(*args: object, **kwargs: object) -> object:
        scanned = real_scan(*args, **kwargs)  # type: ignore[arg-type]
        # Placed after the walk passed, before the scan's snapshot is taken in.
        asyncio.run(workspace.place_agent_files(ws, [rules]))
        return scanned

    monkeypatch.setattr(collect, "scan_workspace", scan_meanwhile)
    result = await workspace.collect(ws, cell(1))
    monkeypatch.undo()
    assert result.files == [] and store.list(session_id="s1") == []
    assert workspace.state.latest["/mnt/data/rules.txt"] == rules.id
    again = await workspace.collect(ws, cell(2))
    assert again.files == []  # and it is not found new by the next scan either


async def test_an_agent_file_placed_while_a_cells_files_are_stored_stays_the_agents(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storing a cell's files takes a while (each is synced): a placement then is not lost."""
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    await workspace.prepare(ws, restart=False)
    (ws / "out.csv").write_text("made,by\ncode,1\n")
    ref = store.add_bytes(b"shared,ref\n1,2\n", "ref.csv", agent_id="a1")
    real_add = store.add_stream

    def placed_while_storing(fileobj: BinaryIO, name: str, **kwargs: object) -> object:
        stored = real_add(fileobj, name, **kwargs)  # type: ignore[arg-type]
        # After the walk, before the scan is taken in: the client gives the agent a file.
        asyncio.run(workspace.place_agent_files(ws, [ref]))
        return stored

    monkeypatch.setattr(store, "add_stream", placed_while_storing)
    result = await workspace.collect(ws, cell(1))
    monkeypatch.undo()
    assert [f.name for f in result.files] == ["out.csv"]
    assert workspace.state.latest["/mnt/data/ref.csv"] == ref.id
    again = await workspace.collect(ws, cell(2))
    assert again.files == []  # not found new, as the session's, by the next scan
    assert [f.name for f in store.list(session_id="s1")] == ["out.csv"]
    # A restart puts the agent's read-only copy back, not a writable one of the session's.
    fresh = folder(tmp_path, "fresh")
    await workspace.prepare(fresh, restart=True)
    copy = (fresh / "ref.csv").stat()
    assert (copy.st_uid, stat.S_IMODE(copy.st_mode)) == (0, 0o444)
    assert sorted(p.name for p in fresh.iterdir()) == ["out.csv", "ref.csv"]


async def test_an_agent_file_the_scan_read_before_its_placement_was_recorded_is_not_produced(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its copy is in the folder a moment before the placement records it: the collect waits."""
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    await workspace.prepare(ws, restart=False)
    ref = store.add_bytes(b"shared,ref\n1,2\n", "ref.csv", agent_id="a1")
    copied, read_by_collect = threading.Event(), threading.Event()
    real_record, real_add = place._record, store.add_stream

    def record_once_read(*args: object) -> str:
        copied.set()
        assert read_by_collect.wait(10), "the collect never stored the scanned copy"
        return real_record(*args)  # type: ignore[arg-type]

    def add_stream(fileobj: BinaryIO, name: str, **kwargs: object) -> object:
        stored = real_add(fileobj, name, **kwargs)  # type: ignore[arg-type]
        read_by_collect.set()
        return stored

    monkeypatch.setattr(place, "_record", record_once_read)
    monkeypatch.setattr(store, "add_stream", add_stream)
    placing = asyncio.create_task(workspace.place_agent_files(ws, [ref]))
    assert await asyncio.to_thread(copied.wait, 10), "the placement never copied the file"
    result = await workspace.collect(ws, cell(1))
    await placing
    monkeypatch.undo()
    assert read_by_collect.is_set()  # the scan did find the copy, and it was stored
    assert result.files == [] and store.list(session_id="s1") == []
    assert workspace.state.latest == {"/mnt/data/ref.csv": ref.id}
    assert (await workspace.collect(ws, cell(2))).files == []


def test_restoring_into_a_reused_folder_follows_no_link_out_of_it(
    store: FileStore, tmp_path: Path
) -> None:
    """A host folder as the workspace keeps what the dead kernel left: links too."""
    from sandkernel.workspace.place import WorkspaceState, restore_files

    ws = folder(tmp_path)
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (ws / "a").symlink_to(host_dir)
    saved = store.add_bytes(b"payload\n", "payload.txt", session_id="s1")
    state = WorkspaceState()
    lost = restore_files(store, {"/mnt/data/a/b/payload.txt": saved.id}, ws, state)
    assert lost == ["/mnt/data/a/b/payload.txt"]
    assert list(host_dir.iterdir()) == [] and host_dir.stat().st_uid == os.getuid()


def test_writing_a_workspace_file_over_a_fifo_refuses_without_blocking(tmp_path: Path) -> None:
    from sandkernel.workspace.place import write_workspace_file

    ws = folder(tmp_path)
    os.mkfifo(ws / "planted")
    with pytest.raises(OSError):  # no reader: ENXIO at once
        write_workspace_file(ws, "planted", b"data")
    reader = os.open(ws / "planted", os.O_RDONLY | os.O_NONBLOCK)  # the sandbox holds one
    try:
        with pytest.raises(FileExistsError, match="not a regular file"):
            write_workspace_file(ws, "planted", b"data")
    finally:
        os.close(reader)


def shown(count: int, *images: bytes) -> ExecutionResult:
    """A cell that displayed ``images`` as PNGs."""
    displays = [DisplayOutput(data={"image/png": base64.b64encode(i).decode()}) for i in images]
    return ExecutionResult(
        status="ok", usage=Usage(wall_ms=1.0), execution_count=count, displays=displays
    )


async def test_uploading_a_name_again_replaces_the_sessions_own_earlier_upload(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    first = await workspace.upload(ws, b"month,sales\njan,1\n", "data.csv")
    corrected = await workspace.upload(ws, b"month,sales\njan,1\nfeb,999\n", "data.csv")
    assert sorted(p.name for p in ws.iterdir()) == ["data.csv"]
    assert (ws / "data.csv").read_bytes() == b"month,sales\njan,1\nfeb,999\n"
    placed = (ws / "data.csv").stat()
    assert (placed.st_uid, stat.S_IMODE(placed.st_mode)) == (SANDBOX_UID, 0o644)
    assert first.path == corrected.path == "/mnt/data/data.csv"
    assert workspace.state.latest == {"/mnt/data/data.csv": corrected.id}
    # The earlier one is still stored, and said to be nowhere in the sandbox now.
    listed = {f.id: f.path for f in await workspace.list()}
    assert listed == {first.id: None, corrected.id: "/mnt/data/data.csv"}
    assert (await workspace.collect(ws, cell(1))).files == []  # placed, not produced


async def test_an_upload_replaces_the_sessions_earlier_upload_deleted_from_the_store(
    store: FileStore, tmp_path: Path
) -> None:
    """Clients replace a file by deleting its id, then uploading the corrected one."""
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    old = await workspace.upload(ws, b"month,sales\njan,1\n", "sales.csv")
    store.delete(old.id)
    corrected = await workspace.upload(ws, b"month,sales\njan,100\n", "sales.csv")
    assert corrected.path == "/mnt/data/sales.csv"
    assert sorted(p.name for p in ws.iterdir()) == ["sales.csv"]
    assert (ws / "sales.csv").read_bytes() == b"month,sales\njan,100\n"
    assert workspace.state.latest == {"/mnt/data/sales.csv": corrected.id}
    assert (await workspace.collect(ws, cell(1))).files == []  # placed, not produced
    # A deleted upload the code changed since is the code's work: the next one goes beside it.
    store.delete(corrected.id)
    with (ws / "sales.csv").open("a") as edit:
        edit.write("feb,7\n")
    beside = await workspace.upload(ws, b"month,sales\njan,5\n", "sales.csv")
    assert beside.path == f"/mnt/data/sales-{beside.id[5:13]}.csv"
    assert (ws / "sales.csv").read_bytes() == b"month,sales\njan,100\nfeb,7\n"


async def test_an_upload_leaves_names_the_session_does_not_own_and_says_where_it_went(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1", agent_id="a1")
    store.add_bytes(b"agent's\n", "rules.txt", agent_id="a1")
    await workspace.prepare(ws, restart=False)
    (ws / "out.csv").write_text("made,by\ncode,1\n")  # produced by a cell
    await workspace.collect(ws, cell(1))
    notes = await workspace.upload(ws, b"v1\n", "notes.txt")
    with (ws / "notes.txt").open("a") as edit:  # the code edits the session's upload
        edit.write("edited\n")
    for name in ("rules.txt", "out.csv", "notes.txt"):
        stored = await workspace.upload(ws, b"a,b\n" if name == "out.csv" else b"new\n", name)
        stem, ext = name.split(".")
        expected = f"/mnt/data/{stem}-{stored.id[5:13]}.{ext}"
        assert stored.path == expected
        assert {f.id: f.path for f in await workspace.list()}[stored.id] == expected
        assert workspace.state.latest[expected] == stored.id
    assert (ws / "rules.txt").read_bytes() == b"agent's\n"
    assert (ws / "out.csv").read_text() == "made,by\ncode,1\n"
    assert (ws / "notes.txt").read_bytes() == b"v1\nedited\n"
    assert notes.path == "/mnt/data/notes.txt"


async def test_an_upload_while_the_kernel_is_dead_says_where_the_restart_puts_it(
    store: FileStore, tmp_path: Path
) -> None:
    first = folder(tmp_path, "first")
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    await workspace.prepare(first, restart=False)
    await workspace.upload(first, b"v1\n", "notes.txt")
    (first / "out.csv").write_text("made\n")
    await workspace.collect(first, cell(1))
    # The kernel died: no workspace until a restart makes one.
    corrected = await workspace.upload(None, b"v2\n", "notes.txt")
    beside = await workspace.upload(None, b"a,b\n", "out.csv")
    tag = beside.id[5:13]
    assert corrected.path == "/mnt/data/notes.txt"
    assert [f.path for f in await workspace.list() if f.name == "notes.txt"] == [
        None,
        "/mnt/data/notes.txt",
    ]
    assert beside.path == f"/mnt/data/out-{tag}.csv"
    second = folder(tmp_path, "second")
    await workspace.prepare(second, restart=True)
    assert (second / "notes.txt").read_bytes() == b"v2\n"
    assert (second / "out.csv").read_text() == "made\n"
    assert (second / f"out-{tag}.csv").read_bytes() == b"a,b\n"


async def test_attaching_a_file_again_gives_its_unchanged_copy_or_a_fresh_one(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    upload = store.add_bytes(b"a,b\n1,2\n", "data.csv")
    tag = upload.id[5:13]
    paths = []
    for n in range(1, 5):
        (path,) = await workspace.attach(ws, [upload.id])
        assert await workspace.attach(ws, [upload.id]) == [path]  # unchanged: the same copy
        assert (ws / path.removeprefix("/mnt/data/")).read_bytes() == b"a,b\n1,2\n"
        with (ws / path.removeprefix("/mnt/data/")).open("a") as edit:
            edit.write("3,4\n")  # the analysis edits its input
        await workspace.collect(ws, cell(n))
        paths.append(path)
    assert paths == [
        "/mnt/data/data.csv",
        f"/mnt/data/data-{tag}.csv",
        f"/mnt/data/data-{tag}-2.csv",
        f"/mnt/data/data-{tag}-3.csv",
    ]
    assert store.get(upload.id).path == paths[-1]


async def test_a_produced_file_with_an_odd_name_attached_again_is_where_the_code_wrote_it(
    store: FileStore, tmp_path: Path
) -> None:
    """Its stored name is listed escaped; its copy is the file the code wrote, not a second one."""
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    raw = [b"new\nline.txt", b"back\\slash.txt", b"b\xffd.txt", b"plain.txt"]
    for name in raw:
        (ws / os.fsdecode(name)).write_bytes(b"from the code " + name)
    produced = (await workspace.collect(ws, cell(1))).files
    listed = sorted(f.path for f in produced)
    assert listed == sorted(
        ["/mnt/data/new\\nline.txt", "/mnt/data/back\\\\slash.txt", "/mnt/data/b\\xffd.txt",
         "/mnt/data/plain.txt"]
    )  # fmt: skip
    paths = await workspace.attach(ws, [f.id for f in produced])
    assert sorted(paths) == listed  # where the code wrote each, as its path is listed
    assert sorted(os.listdir(os.fsencode(ws))) == sorted(raw)  # and no copy beside it
    # Put back under its own name in a fresh workspace after a restart, too.
    second = folder(tmp_path, "second")
    await workspace.prepare(second, restart=True)
    assert sorted(os.listdir(os.fsencode(second))) == sorted(raw)
    assert (await workspace.collect(second, cell(2))).files == []


async def test_attaching_an_earlier_upload_again_leaves_the_one_that_replaced_it(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    old = await workspace.upload(ws, b"v,w\nOLD,1\n", "data.csv")
    new = await workspace.upload(ws, b"v,w\nNEW,2\n", "data.csv")
    # Clients send all of a conversation's file ids again with each run.
    (again,) = await workspace.attach(ws, [old.id])
    assert again == f"/mnt/data/data-{old.id[5:13]}.csv"
    assert (ws / "data.csv").read_bytes() == b"v,w\nNEW,2\n"
    assert (ws / again.removeprefix("/mnt/data/")).read_bytes() == b"v,w\nOLD,1\n"
    assert await workspace.attach(ws, [old.id, new.id]) == [again, "/mnt/data/data.csv"]
    # An upload nobody owned yet, of the same name, is attached beside it too.
    fresh = store.add_bytes(b"v,w\nFRESH,3\n", "data.csv")
    (beside,) = await workspace.attach(ws, [fresh.id])
    assert beside == f"/mnt/data/data-{fresh.id[5:13]}.csv"
    assert (ws / "data.csv").read_bytes() == b"v,w\nNEW,2\n"
    assert {f.id: f.path for f in await workspace.list()} == {
        old.id: again,
        new.id: "/mnt/data/data.csv",
        fresh.id: beside,
    }
    assert workspace.state.latest == {
        "/mnt/data/data.csv": new.id,
        again: old.id,
        beside: fresh.id,
    }


async def test_a_file_with_no_free_name_left_is_refused_as_a_file_error(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    upload = store.add_bytes(b"a,b\n1,2\n", "data.csv")
    tag = upload.id[5:13]
    taken = ["data.csv", f"data-{tag}.csv"]
    taken += [f"data-{tag}-{n}.csv" for n in range(2, place.MAX_COPIES + 1)]
    for name in taken:
        (ws / name).write_text("the code's own\n")
    with pytest.raises(FileRejected, match=r"cannot place 'data\.csv' in /mnt/data") as refused:
        await workspace.attach(ws, [upload.id])
    assert 400 <= refused.value.http_status < 500
    assert sorted(p.name for p in ws.iterdir()) == sorted(taken)


@pytest.mark.usefixtures("no_stamp_tick")
async def test_a_file_the_store_cannot_write_is_noted_and_stored_by_a_later_cell(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    await workspace.prepare(ws, restart=False)
    (ws / "small.txt").write_text("ok")
    (ws / "report.bin").write_bytes(b"r" * 4096)
    real_add = store.add_stream

    def full_disk(fileobj: BinaryIO, name: str, **kwargs: object) -> object:
        if name == "report.bin":
            fileobj.read(1024)
            raise OSError(errno.ENOSPC, "No space left on device", str(store.root / "tmp" / "x"))
        return real_add(fileobj, name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "add_stream", full_disk)
    first = await workspace.collect(ws, cell(1))
    assert [f.name for f in first.files] == ["small.txt"]
    assert first.files_truncated
    note = first.files_note or ""
    assert note == (
        "report.bin: not stored (the file store failed: No space left on device; "
        "a later cell stores it once the store can)"
    )
    assert str(store.root) not in note  # the host's paths stay on the host
    monkeypatch.undo()
    second = await workspace.collect(ws, cell(2))
    assert [f.name for f in second.files] == ["report.bin"]
    assert not second.files_truncated
    assert store.read_bytes(second.files[0].id) == b"r" * 4096


@pytest.mark.usefixtures("no_stamp_tick")
async def test_a_failing_store_database_is_noted_and_the_file_stored_by_a_later_cell(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    await workspace.prepare(ws, restart=False)
    (ws / "report.bin").write_bytes(b"r" * 4096)

    def full_database(fileobj: BinaryIO, name: str, **kwargs: object) -> object:
        fileobj.read()
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "add_stream", full_database)
    first = await workspace.collect(ws, cell(1))
    assert first.files == [] and first.files_truncated
    assert first.files_note == (
        "report.bin: not stored (the file store failed: database or disk is full; "
        "a later cell stores it once the store can)"
    )
    monkeypatch.undo()
    (stored,) = (await workspace.collect(ws, cell(2))).files
    assert store.read_bytes(stored.id) == b"r" * 4096


@pytest.mark.usefixtures("no_stamp_tick")
async def test_a_file_failing_for_a_reason_of_its_own_is_noted_once_and_tried_when_changed(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")
    await workspace.prepare(ws, restart=False)
    (ws / "blob").write_bytes(b"PK\x03\x04 an archive a library cannot read")
    tried: list[str] = []

    def unreadable_archive(fileobj: BinaryIO, name: str, **kwargs: object) -> object:
        tried.append(name)
        fileobj.read()
        raise NotImplementedError("zip file version 16.6")  # as zipfile raises it

    monkeypatch.setattr(store, "add_stream", unreadable_archive)
    first = await workspace.collect(ws, cell(1))
    assert first.files == [] and first.files_truncated
    assert first.files_note == "blob: not stored (NotImplementedError: zip file version 16.6)"
    for count in (2, 3):
        later = cell(count)
        # Proved unchanged by the folder's stamps: not read, copied nor noted again.
        assert await workspace.collect(ws, later) is later
    assert tried == ["blob"]
    (ws / "blob").write_bytes(b"rewritten\n")
    monkeypatch.undo()
    (stored,) = (await workspace.collect(ws, cell(4))).files
    assert stored.name == "blob" and store.read_bytes(stored.id) == b"rewritten\n"


async def test_an_image_the_store_cannot_write_is_noted_and_the_result_kept(
    store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(), session_id="s1")

    def failing_disk(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "add_bytes", failing_disk)
    result = await workspace.collect(ws, shown(1, png_bytes()))
    assert result.files == [] and result.files_truncated
    assert "image-1-1.png" in (result.files_note or "")
    assert "Input/output error" in (result.files_note or "")


async def test_the_session_cap_never_deletes_a_file_of_the_cell_being_collected(
    store: FileStore, tmp_path: Path
) -> None:
    ws = folder(tmp_path)
    workspace = SessionWorkspace(store, OutputCaps(max_session_bytes=300_000), session_id="s1")
    first = await workspace.collect(ws, shown(1, *(os.urandom(120_000) for _ in range(3))))
    assert [f.name for f in first.files] == ["image-1-1.png", "image-1-2.png"]
    for produced in first.files:
        assert store.get(produced.id).size_bytes == 120_000  # still there to download
    assert first.files_truncated
    note = first.files_note or ""
    assert "image-1-3.png (120000 bytes) not stored" in note and "superseded" not in note
    # An earlier cell's image is what makes room for a later cell's.
    later = await workspace.collect(ws, shown(2, os.urandom(120_000)))
    assert [f.name for f in later.files] == ["image-2-1.png"]
    assert not later.files_truncated
    assert "1 superseded version(s) of earlier cells' files deleted" in (later.files_note or "")
    with pytest.raises(FileNotFoundInStore):
        store.get(first.files[0].id)
    store.get(first.files[1].id)


async def test_the_session_cap_deletes_only_the_sessions_own_superseded_versions(
    store: FileStore, tmp_path: Path
) -> None:
    """Not an earlier session's files (same id), nor one the code removed: never superseded."""
    caps = OutputCaps(max_session_bytes=3000)
    earlier = SessionWorkspace(store, caps, session_id="s1")  # before the engine restarted
    first = folder(tmp_path, "first")
    (first / "report.txt").write_text("R" * 1000)
    (report,) = (await earlier.collect(first, cell(1))).files
    workspace = SessionWorkspace(store, caps, session_id="s1")
    ws = folder(tmp_path)
    (ws / "final.txt").write_text("F" * 1000)
    (final,) = (await workspace.collect(ws, cell(1))).files
    (ws / "final.txt").unlink()  # the code removes its result: the stored file stays
    await workspace.collect(ws, cell(2))
    (ws / "c.txt").write_text("c" * 1500)
    assert [f.name for f in (await workspace.collect(ws, cell(3))).files] == ["c.txt"]
    (ws / "d.txt").write_text("d" * 1500)
    refused = await workspace.collect(ws, cell(4))
    assert refused.files == [] and refused.files_truncated
    assert "d.txt (1500 bytes) not stored" in (refused.files_note or "")
    assert "superseded" not in (refused.files_note or "")
    assert store.read_bytes(report.id) == b"R" * 1000
    assert store.read_bytes(final.id) == b"F" * 1000
    # A version of a path this session wrote again since is what makes room.
    (ws / "c.txt").write_text("C" * 400)
    (again,) = (await workspace.collect(ws, cell(5))).files
    (ws / "d.txt").write_text("D" * 1400)  # a size of its own: seen changed at once
    stored = await workspace.collect(ws, cell(6))
    assert [f.name for f in stored.files] == ["d.txt"]
    assert "1 superseded version(s) of earlier cells' files deleted" in (stored.files_note or "")
    assert {f.id for f in store.list(session_id="s1")} == {
        report.id, final.id, again.id, stored.files[0].id
    }  # fmt: skip
