"""Workspace scans: new and changed files, read without following a symlink."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sandkernel.errors import FileError, FileRejected
from sandkernel.files import FileStore
from sandkernel.workspace import ScanResult, open_workspace_file, scan_workspace
from sandkernel.workspace.scan import (
    QUICK_CHECK_MAX_ENTRIES,
    empty_workspace_stamps,
    workspace_unchanged,
)
from tests.files._samples import png_bytes


def _scan(
    root: Path,
    since: dict[str, tuple[int, int, int]] | None = None,
    *,
    max_files: int = 100,
    max_bytes: int = 1 << 30,
    **caps: int,
) -> ScanResult:
    return scan_workspace(root, since=since, max_files=max_files, max_bytes=max_bytes, **caps)


def test_symlink_to_a_secret_outside_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret_bytes = b"SECRET-7f3a9c-never-read"
    (outside / "secret.txt").write_bytes(secret_bytes)
    root = tmp_path / "ws"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"fine\n")
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside)
    (root / "dangling").symlink_to(tmp_path / "nothing")
    result = _scan(root)
    assert [f.path for f in result.changed] == ["ok.txt"]
    assert set(result.snapshot) == {"ok.txt"}
    assert ("link.txt", "symlink") in result.skipped
    assert ("linkdir", "symlink") in result.skipped
    links = ("dangling", "link.txt", "linkdir")
    assert result.not_regular == {n: ("symlink", os.lstat(root / n).st_ino) for n in links}
    secret_hash = hashlib.sha256(secret_bytes).hexdigest()
    everything = repr(result)
    assert secret_hash not in everything and "SECRET-7f3a9c" not in everything
    with pytest.raises(FileRejected, match="symlink"):
        open_workspace_file(root, "link.txt")
    with pytest.raises(FileRejected, match="symlink"):
        open_workspace_file(root, "linkdir/secret.txt")


def test_directory_swapped_for_a_link_is_not_entered(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"SECRET")
    root = tmp_path / "ws"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_bytes(b"a")
    first = _scan(root)
    assert [f.path for f in first.changed] == ["sub/a.txt"]
    (root / "sub" / "a.txt").unlink()
    (root / "sub").rmdir()
    (root / "sub").symlink_to(outside)
    second = _scan(root, first.snapshot)
    assert second.changed == [] and second.removed == ["sub/a.txt"]
    assert ("sub", "symlink") in second.skipped


def test_fifo_is_skipped_without_hanging(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    os.mkfifo(root / "pipe")
    (root / "data.txt").write_bytes(b"data\n")
    scans: list[ScanResult] = []
    refusals: list[FileRejected] = []

    def open_fifo() -> None:
        try:
            open_workspace_file(root, "pipe").close()
        except FileRejected as exc:
            refusals.append(exc)

    # Threads with a deadline, so that a hang fails fast instead of at the timeout.
    for target in (lambda: scans.append(_scan(root)), open_fifo):
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "hung on a FIFO"
    (result,) = scans
    assert [f.path for f in result.changed] == ["data.txt"]
    assert ("pipe", "FIFO") in result.skipped
    assert result.not_regular == {"pipe": ("FIFO", os.lstat(root / "pipe").st_ino)}
    assert "pipe" not in result.snapshot
    (refusal,) = refusals
    assert "it is a FIFO, not a regular file" in str(refusal)


def test_files_over_the_count_cap_are_flagged_truncated(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_bytes(name.encode())
    result = _scan(root, max_files=2)
    assert [f.path for f in result.changed] == ["a.txt", "b.txt"]
    assert result.truncated
    assert result.truncated_reason is not None and "max_files" in result.truncated_reason
    assert ("c.txt", "over the max_files cap") in result.skipped
    assert not _scan(root, max_files=3).truncated


def test_files_over_the_byte_cap_are_flagged_truncated(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "big.bin").write_bytes(b"b" * 5000)
    (root / "small.txt").write_bytes(b"s" * 100)
    result = _scan(root, max_bytes=1000)
    assert [f.path for f in result.changed] == ["small.txt"]
    assert sum(f.size_bytes for f in result.changed) <= 1000
    assert result.truncated
    assert result.truncated_reason is not None and "max_bytes" in result.truncated_reason
    assert ("big.bin", "over the max_bytes cap") in result.skipped


def test_depth_and_entry_caps_bound_the_walk(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    deep = root / "1" / "2" / "3"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_bytes(b"d")
    (root / "top.txt").write_bytes(b"t")
    result = _scan(root, max_depth=2)
    assert [f.path for f in result.changed] == ["top.txt"]
    assert result.truncated and "max_depth" in (result.truncated_reason or "")
    many = _scan(root, max_entries=1)
    assert many.truncated and "max_entries" in (many.truncated_reason or "")


def test_odd_names_are_scanned_without_crashing(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    undecodable = os.fsencode("bad\udcff.txt")
    assert undecodable == b"bad\xff.txt"
    names = {
        b"new\nline.txt": b"newline",
        undecodable: b"not utf-8",
        ("n" * 246 + ".txt").encode(): b"long",
    }
    for raw, data in names.items():
        fd = os.open(os.path.join(os.fsencode(root), raw), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, data)
        os.close(fd)
    assert len(("n" * 246 + ".txt").encode()) == 250
    result = _scan(root)
    found = {os.fsencode(f.path): f for f in result.changed}
    assert set(found) == set(names)
    for raw, data in names.items():
        assert found[raw].sha256 == hashlib.sha256(data).hexdigest()
        with open_workspace_file(root, os.fsdecode(raw)) as f:
            assert f.read() == data
    assert "bad\udcff.txt" in result.snapshot


def test_odd_names_can_be_stored_as_produced_files(store: FileStore, tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    raw = b"plot\xff\n.png"
    (root / os.fsdecode(raw)).write_bytes(png_bytes())
    (entry,) = _scan(root).changed
    with open_workspace_file(root, entry.path) as f:
        stored = store.add_stream(
            f, entry.path, origin="produced", path=f"/mnt/data/{entry.path}", session_id="s"
        )
    assert stored.sha256 == entry.sha256
    assert stored.name == "plot\\xff\\n.png"
    assert stored.mime_type == "image/png"
    assert store.read_bytes(stored.id) == png_bytes()


def test_changed_files_are_detected_between_two_scans(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    (root / "sub").mkdir(parents=True)
    (root / "same.txt").write_bytes(b"unchanged")
    (root / "grow.txt").write_bytes(b"short")
    (root / "touch.txt").write_bytes(b"abcd")
    (root / "gone.txt").write_bytes(b"bye")
    first = _scan(root)
    assert {f.path for f in first.changed} == {"same.txt", "grow.txt", "touch.txt", "gone.txt"}
    (root / "grow.txt").write_bytes(b"much longer now")
    touched = root / "touch.txt"
    old_ns = touched.stat().st_mtime_ns
    touched.write_bytes(b"wxyz")  # same size, new content
    os.utime(touched, ns=(old_ns + 10**9, old_ns + 10**9))
    (root / "gone.txt").unlink()
    (root / "sub" / "new.txt").write_bytes(b"new")
    second = _scan(root, first.snapshot)
    assert sorted(f.path for f in second.changed) == ["grow.txt", "sub/new.txt", "touch.txt"]
    assert second.removed == ["gone.txt"]
    by_path = {f.path: f for f in second.changed}
    assert by_path["touch.txt"].sha256 == hashlib.sha256(b"wxyz").hexdigest()
    third = _scan(root, second.snapshot)
    assert third.changed == [] and third.removed == [] and not third.truncated


def test_file_that_changes_while_read_is_skipped_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    target = root / "log.txt"
    target.write_bytes(b"line 1\n")
    real_read = os.read

    def growing_read(fd: int, n: int) -> bytes:
        with target.open("ab") as f:
            f.write(b"more\n")
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", growing_read)
    result = _scan(root)
    monkeypatch.undo()
    assert result.changed == []
    assert ("log.txt", "changed while being read") in result.skipped
    assert "log.txt" not in result.snapshot
    retry = _scan(root, result.snapshot)
    assert [f.path for f in retry.changed] == ["log.txt"]


def test_files_rewritten_while_read_cannot_make_a_scan_read_without_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each is read, found changed and skipped: what was read still counts."""
    root = tmp_path / "ws"
    root.mkdir()
    size = 1 << 20
    for i in range(40):
        with (root / f"f{i}").open("wb") as f:
            f.truncate(size)  # sparse: no space taken
    real_read = os.read
    read: list[int] = []

    def touching_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        read.append(len(data))
        os.utime(fd)  # the kernel keeps touching them
        return data

    monkeypatch.setattr(os, "read", touching_read)
    result = scan_workspace(root, since={}, max_files=100, max_bytes=4 * size)
    monkeypatch.undo()
    assert result.changed == []
    assert sum(read) <= 2 * 4 * size + 40  # twice max_bytes, not 40 files' worth
    assert result.truncated and "twice max_bytes" in (result.truncated_reason or "")


def test_file_that_vanishes_while_read_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    target = root / "tmp.txt"
    target.write_bytes(b"temporary\n")
    real_read = os.read

    def vanishing_read(fd: int, n: int) -> bytes:
        target.unlink(missing_ok=True)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", vanishing_read)
    result = _scan(root)
    monkeypatch.undo()
    assert result.changed == []
    assert ("tmp.txt", "vanished while being read") in result.skipped


def test_scan_refuses_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    with pytest.raises(FileError, match="cannot scan the workspace"):
        _scan(tmp_path / "alias")


def test_open_workspace_file_refuses_traversal(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "outside.txt").write_bytes(b"x")
    for rel in ("../outside.txt", "/etc/passwd", "a/./b", ""):
        with pytest.raises(FileRejected, match="relative path"):
            open_workspace_file(tmp_path / "ws", rel)


def test_the_scan_is_still_imported_from_sandkernel_files_and_loaded_only_then() -> None:
    import sandkernel.files
    import sandkernel.workspace

    assert sandkernel.files.scan_workspace is sandkernel.workspace.scan_workspace
    assert sandkernel.files.ScanResult is sandkernel.workspace.ScanResult
    with pytest.raises(AttributeError, match="no attribute 'scan_workspaces'"):
        _ = sandkernel.files.scan_workspaces  # type: ignore[attr-defined]
    probe = (
        "import sys, sandkernel.files\n"
        "assert 'sandkernel.workspace' not in sys.modules, 'the store loaded the workspace'\n"
        "from sandkernel.files import scan_workspace\n"
        "assert scan_workspace.__module__ == 'sandkernel.workspace.scan'\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _settled_tree(root: Path) -> ScanResult:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"one")
    (root / "sub" / "b.txt").write_bytes(b"two")
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"three")
    found = _scan(root)
    assert found.dirs is not None and set(found.dirs) == {"", "sub", "sub/deeper"}
    assert workspace_unchanged(root, found.snapshot, found.dirs)
    return found


@pytest.mark.usefixtures("no_stamp_tick")
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r: (r / "new.txt").write_bytes(b""), id="file added at the root"),
        pytest.param(lambda r: (r / "sub/deeper/new").write_bytes(b"x"), id="file added deep"),
        pytest.param(lambda r: (r / "sub/b.txt").unlink(), id="file removed"),
        pytest.param(lambda r: (r / "sub/b.txt").rename(r / "sub/d.txt"), id="file renamed"),
        pytest.param(lambda r: (r / "sub/deeper/more").mkdir(), id="directory added"),
        pytest.param(lambda r: (r / "a.txt").write_bytes(b"ONE!"), id="file rewritten"),
        pytest.param(
            lambda r: os.utime(r / "sub/deeper/c.txt", ns=(1, 1)), id="same size, other mtime"
        ),
    ],
)
def test_the_quick_check_sees_every_change_a_scan_would_see(
    tmp_path: Path, change: Callable[[Path], object]
) -> None:
    found = _settled_tree(tmp_path)
    assert found.dirs is not None
    change(tmp_path)
    assert not workspace_unchanged(tmp_path, found.snapshot, found.dirs)
    rescan = _scan(tmp_path, found.snapshot)
    # The scan it falls back to sees the change too (an empty new folder: its stamp).
    assert rescan.changed or rescan.removed or rescan.dirs != found.dirs


@pytest.mark.usefixtures("no_stamp_tick")
def test_the_quick_check_follows_no_symlink(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    found = _settled_tree(root)
    assert found.dirs is not None
    outside = tmp_path / "outside"
    (root / "sub").rename(outside)
    (root / "sub").symlink_to(outside)  # same files behind a link: not the same tree
    assert not workspace_unchanged(root, found.snapshot, found.dirs)


def test_a_directory_changed_within_a_clock_tick_proves_nothing(tmp_path: Path) -> None:
    (tmp_path / "just-written.txt").write_bytes(b"now")
    found = _scan(tmp_path)
    assert found.dirs is None  # its mtime may not move again for the next change
    assert empty_workspace_stamps(tmp_path) is None


@pytest.mark.usefixtures("no_stamp_tick")
def test_an_incomplete_scan_or_a_big_tree_is_never_skipped(tmp_path: Path) -> None:
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "pipe")
    assert _scan(tmp_path).dirs is None  # something skipped: scanned again next time
    big = tmp_path / "big"
    big.mkdir()
    for n in range(QUICK_CHECK_MAX_ENTRIES + 1):
        (big / f"f{n}").write_bytes(b"")
    found = _scan(big)
    assert found.dirs is not None
    assert not workspace_unchanged(big, found.snapshot, found.dirs)


@pytest.mark.usefixtures("no_stamp_tick")
def test_an_empty_workspace_is_stamped_without_a_scan(tmp_path: Path) -> None:
    stamps = empty_workspace_stamps(tmp_path)
    assert stamps is not None
    assert stamps == _scan(tmp_path).dirs
    assert workspace_unchanged(tmp_path, {}, stamps)
    (tmp_path / "x").write_bytes(b"")
    assert not workspace_unchanged(tmp_path, {}, stamps)
    assert empty_workspace_stamps(tmp_path) is None
