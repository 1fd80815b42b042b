"""The file store: durable ids, content stored once, expiry, concurrency."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import inspect
import io
import os
import re
import sqlite3
import stat
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from sandkernel.errors import BadInput, FileError, FileNotFoundInStore, FileRejected, FileTooLarge
from sandkernel.files import DEFAULT_MAX_UPLOAD_BYTES, MIME_TYPES, FileStore, StoredFile
from sandkernel.files import store as store_module
from tests.files._samples import blob_files, png_bytes, xlsx_bytes


def test_ids_and_content_survive_reopening_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FileStore(root) as first:
        a = first.add_bytes(b"alpha\n", "a.txt", session_id="s1")
        b = first.add_bytes(png_bytes(), "b.png", agent_id="agent-1", retention_s=3600)
    with FileStore(root) as second:
        assert second.get(a.id) == a
        assert second.get(b.id) == b
        assert second.read_bytes(b.id) == png_bytes()
        assert {f.id for f in second.list()} == {a.id, b.id}


def test_ids_are_unguessable_and_well_formed(store: FileStore) -> None:
    ids = {store.add_bytes(b"same\n", "x.txt").id for _ in range(50)}
    assert len(ids) == 50
    for file_id in ids:
        assert file_id.startswith("file-") and len(file_id) == 29
        int(file_id[5:], 16)


def test_same_content_is_stored_once_and_outlives_one_delete(store: FileStore) -> None:
    first = store.add_bytes(b"shared content\n", "one.txt")
    second = store.add_bytes(b"shared content\n", "two.txt")
    assert first.id != second.id and first.sha256 == second.sha256
    assert len(blob_files(store.root)) == 1
    store.delete(first.id)
    with pytest.raises(FileNotFoundInStore):
        store.get(first.id)
    assert store.read_bytes(second.id) == b"shared content\n"
    assert len(blob_files(store.root)) == 1
    store.delete(second.id)
    assert blob_files(store.root) == []


def test_a_file_deleted_while_it_is_opened_is_not_found(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete lands between the lookup and the open: a not-found, never an OSError."""
    stored = store.add_bytes(b"going\n", "going.txt")
    looked_up = store._checked_blob

    def then_deleted(record: StoredFile) -> Path:
        blob = looked_up(record)
        store.delete(record.id)
        return blob

    monkeypatch.setattr(store, "_checked_blob", then_deleted)
    with pytest.raises(FileNotFoundInStore, match="deleted"):
        store.open(stored.id)


def test_unknown_id_error_names_the_id(store: FileStore) -> None:
    with pytest.raises(FileNotFoundInStore, match="file-000000000000000000000000"):
        store.get("file-000000000000000000000000")
    with pytest.raises(FileNotFoundInStore, match="'../../etc/passwd'"):
        store.read_bytes("../../etc/passwd")
    with pytest.raises(FileNotFoundInStore, match="file-ffffffffffffffffffffffff"):
        store.delete("file-ffffffffffffffffffffffff")


def test_expired_files_are_hidden_then_purged(tmp_path: Path) -> None:
    now = [1000.0]
    with FileStore(tmp_path / "s", clock=lambda: now[0]) as s:
        short = s.add_bytes(b"short-lived\n", "short.txt", retention_s=10)
        shared = s.add_bytes(b"kept\n", "kept.txt")
        also = s.add_bytes(b"kept\n", "copy.txt", retention_s=10)
        assert short.expires_at == 1010.0
        now[0] = 1009.0
        assert s.get(short.id).name == "short.txt"
        now[0] = 1010.0
        with pytest.raises(FileNotFoundInStore, match="expired"):
            s.get(short.id)
        assert [f.id for f in s.list()] == [shared.id]
        assert s.purge_expired(now=1010.0) == 2
        assert s.purge_expired(now=1010.0) == 0
        assert s.read_bytes(shared.id) == b"kept\n"  # shared content outlives the copy
        assert len(blob_files(s.root)) == 1
        with pytest.raises(FileNotFoundInStore):
            s.delete(also.id)


def test_purge_removes_orphan_blobs_and_stale_partials(store: FileStore) -> None:
    kept = store.add_bytes(b"kept\n", "kept.txt")
    orphan_hash = hashlib.sha256(b"orphan").hexdigest()
    orphan = store.root / "blobs" / orphan_hash[:2] / orphan_hash
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    stale = store.root / "tmp" / "incoming-stale"
    stale.write_bytes(b"partial")
    os.utime(stale, (1000.0, 1000.0))
    fresh = store.root / "tmp" / "incoming-fresh"
    fresh.write_bytes(b"partial")
    os.utime(fresh, (9000.0, 9000.0))
    assert store.purge_expired(now=10000.0) == 0
    assert not orphan.exists() and not stale.exists() and fresh.exists()
    assert store.read_bytes(kept.id) == b"kept\n"


def test_concurrent_adds_from_8_threads(store: FileStore) -> None:
    barrier = threading.Barrier(8)
    results: list[StoredFile] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=10)
            for i in range(15):
                data = b"common\n" if i % 3 == 0 else f"thread {n} file {i}\n".encode()
                stored = store.add_bytes(data, f"t{n}-{i}.txt", session_id=f"s{n}")
                with lock:
                    results.append(stored)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(results) == 120 and len({r.id for r in results}) == 120
    for r in results:
        assert hashlib.sha256(store.read_bytes(r.id)).hexdigest() == r.sha256
    assert len(blob_files(store.root)) == 1 + 8 * 10
    assert len(store.list(session_id="s3")) == 15


def test_list_filters_by_owner_and_origin_and_attach_sets_owners(store: FileStore) -> None:
    upload = store.add_bytes(b"u\n", "u.txt")
    produced = store.add_bytes(
        b"\x89PNG not really",
        "plot.png",
        origin="produced",
        session_id="s1",
        agent_id="a1",
        execution_count=3,
        path="/mnt/data/plots/plot.png",
    )
    assert upload.scope == "none" and produced.scope == "session"
    assert store.list(session_id="s1") == [produced]
    assert store.list(origin="uploaded") == [upload]
    attached = store.attach(upload.id, agent_id="a1")
    assert attached.agent_id == "a1" and attached.scope == "agent"
    assert {f.id for f in store.list(agent_id="a1")} == {upload.id, produced.id}
    assert store.list(agent_id="a1", origin="produced") == [produced]
    assert store.attach(upload.id, session_id="s2").agent_id == "a1"
    assert store.list(session_id="s2")[0].scope == "session"
    # An owner once set stays (two sessions attaching one upload: the first keeps it).
    assert store.attach(upload.id, session_id="s2").session_id == "s2"
    with pytest.raises(FileNotFoundInStore):
        store.attach(upload.id, session_id="s3")
    with pytest.raises(FileNotFoundInStore):
        store.attach(upload.id, agent_id="a2")
    assert store.get(upload.id).session_id == "s2" and store.get(upload.id).agent_id == "a1"


def test_produced_files_keep_any_type_and_get_printable_names(store: FileStore) -> None:
    stored = store.add_bytes(
        b"<svg/>", "out/bad\udcff\nname.svg", origin="produced", path="/mnt/data/bad\udcff.svg"
    )
    assert stored.name == "bad\\xff\\nname.svg"
    assert stored.path == "/mnt/data/bad\\xff.svg"
    assert stored.mime_type == "image/svg+xml"
    blob = store.add_bytes(b"\x00\x01binary", "blob", origin="produced")
    assert blob.mime_type == "application/octet-stream"
    notes = store.add_bytes(b"plain notes\n", "NOTES", origin="produced")
    assert notes.mime_type == "text/plain"
    sheet = store.add_bytes(xlsx_bytes(), "export", origin="produced")
    assert sheet.mime_type == MIME_TYPES[".xlsx"][0]
    assert store.get(stored.id).name == stored.name  # survives SQLite


def test_add_file_streams_without_loading_the_file(store: FileStore, tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    chunk = b"0123456789abcdef,ghijklmnopqrstuv\n" * 1000
    with big.open("wb") as f:
        for _ in range(1000):  # 34 MB
            f.write(chunk)
    tracemalloc.start()
    try:
        stored = store.add_file(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored.name == "big.csv" and stored.size_bytes == big.stat().st_size
    assert peak < 8 * 1024 * 1024
    digest = hashlib.sha256()
    with big.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    assert stored.sha256 == digest.hexdigest()


@pytest.mark.timeout(15)  # opening the FIFO must not wait for a writer
def test_add_file_refuses_symlinks_and_fifos(store: FileStore, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    link = tmp_path / "link.txt"
    link.symlink_to(secret)
    with pytest.raises(FileRejected, match="symlink"):
        store.add_file(link)
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(FileRejected, match="FIFO, not a regular file"):
        store.add_file(fifo)
    assert store.list() == []


def test_store_files_and_directories_are_private(store: FileStore) -> None:
    stored = store.add_bytes(b"private\n", "p.txt")
    blob = store.blob_path(stored.id)
    for directory in (store.root, store.root / "blobs", blob.parent, store.root / "tmp"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for file in (blob, store.root / "files.sqlite3", store.root / "files.sqlite3-wal"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    s = FileStore(tmp_path / "s")
    stored = s.add_bytes(b"x\n", "x.txt")
    s.close()
    s.close()
    with pytest.raises(FileError, match="is closed"):
        s.get(stored.id)
    with pytest.raises(FileError, match="is closed"):
        s.add_bytes(b"y\n", "y.txt")


def test_set_expiry_changes_retention(tmp_path: Path) -> None:
    now = [50.0]
    with FileStore(tmp_path / "s", clock=lambda: now[0]) as s:
        f = s.add_bytes(b"x\n", "x.txt")
        assert s.set_expiry(f.id, 60.0).expires_at == 60.0
        now[0] = 61.0
        assert s.purge_expired(now=61.0) == 1
        with pytest.raises(FileNotFoundInStore):
            s.get(f.id)


def test_add_upload_takes_bytes_a_path_or_a_stream(store: FileStore, tmp_path: Path) -> None:
    path = tmp_path / "from-disk.csv"
    path.write_bytes(b"a,b\n")
    from_bytes = store.add_upload(b"a,b\n", "given.csv", session_id="s1")
    from_path = store.add_upload(path, agent_id="agent-1", retention_s=60)
    with path.open("rb") as stream:
        from_stream = store.add_upload(stream)
    assert [f.name for f in (from_bytes, from_path, from_stream)] == [
        "given.csv", "from-disk.csv", "from-disk.csv",
    ]  # fmt: skip
    assert (from_bytes.session_id, from_path.agent_id) == ("s1", "agent-1")
    assert from_path.expires_at is not None and from_stream.expires_at is None
    assert len({f.sha256 for f in (from_bytes, from_path, from_stream)}) == 1
    with pytest.raises(ValueError, match="bytes needs a name"):
        store.add_upload(b"a,b\n")
    with pytest.raises(ValueError, match="stream needs a name"):
        store.add_upload(io.BytesIO(b"a,b\n"))


def test_add_upload_takes_any_bytes_and_refuses_a_text_stream_saying_why(
    store: FileStore,
) -> None:
    for data in (bytearray(b"a,b\n"), memoryview(b"a,b\n")):
        assert store.add_upload(data, "given.csv").size_bytes == 4  # type: ignore[arg-type]
    with pytest.raises(BadInput, match="binary mode"):
        store.add_upload(io.StringIO("a,b\n"), "text.csv")  # type: ignore[arg-type]


def test_closed_says_whether_the_store_was_closed(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    assert not store.closed
    store.close()
    assert store.closed


def test_set_path_records_where_a_file_was_placed_as_produced_paths_are_listed(
    store: FileStore,
) -> None:
    stored = store.add_bytes(b"a,b\n", "data.csv", session_id="s1")
    assert stored.path is None
    placed = store.set_path(stored.id, "/mnt/data/data-1a2b3c4d.csv")
    assert placed.path == store.get(stored.id).path == "/mnt/data/data-1a2b3c4d.csv"
    assert store.set_path(stored.id, "/mnt/data/a\\b.csv").path == "/mnt/data/a\\\\b.csv"
    assert store.set_path(stored.id, None).path is None  # no longer there
    with pytest.raises(FileNotFoundInStore):
        store.set_path("file-000000000000000000000000", "/mnt/data/x.csv")


def test_the_upload_cap_leaves_produced_files_to_their_own_cap(tmp_path: Path) -> None:
    # A daemon's --max-upload-mb: what clients send, not what the code writes.
    with FileStore(tmp_path / "store", max_bytes=1024) as store:
        produced = store.add_bytes(b"p" * 4096, "report.bin", origin="produced", session_id="s1")
        assert store.read_bytes(produced.id) == b"p" * 4096
        with pytest.raises(FileTooLarge, match="upload rejected: 'report.txt'"):
            store.add_bytes(b"u" * 4096, "report.txt", session_id="s1")
        assert [f.id for f in store.list()] == [produced.id]


def test_a_produced_file_is_bounded_by_the_engines_default_upload_cap(tmp_path: Path) -> None:
    default = inspect.signature(FileStore).parameters["max_produced_file_bytes"].default
    assert default == DEFAULT_MAX_UPLOAD_BYTES  # the bound it always had, whatever max_bytes
    with FileStore(tmp_path / "store", max_produced_file_bytes=1024) as store:
        store.add_bytes(b"p" * 1024, "at-cap.bin", origin="produced")
        with pytest.raises(FileTooLarge) as refused:
            store.add_stream(io.BytesIO(b"p" * 1025), "over.bin", origin="produced")
        assert str(refused.value) == (
            "file rejected: 'over.bin' is larger than the 1 KiB a produced file may be "
            "(the store's max_produced_file_bytes)"
        )
        assert [f.name for f in store.list()] == ["at-cap.bin"]
        assert list((store.root / "tmp").iterdir()) == []


# ----------------------------------------------------------------- faults


def _quoted(path: Path) -> str:
    """A pattern matching ``path`` as an error message quotes it."""
    return re.escape(repr(str(path)))


def _fill(disk: Path) -> Path:
    """Fill ``disk`` up with one file; remove it to free the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_an_add_on_a_full_disk_is_refused_naming_the_store(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def full(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        FileTooLarge,
        match=f"the disk of the file store at {_quoted(store.root)} is full",
    ):
        store.add_bytes(b"a,b\n", "a.csv")
    monkeypatch.undo()
    assert list((store.root / "tmp").iterdir()) == []
    assert store.list() == []
    assert store.read_bytes(store.add_bytes(b"a,b\n", "a.csv").id) == b"a,b\n"


def test_a_source_that_fails_to_be_read_is_not_the_stores_error(store: FileStore) -> None:
    class Failing:
        def read(self, size: int = -1, /) -> bytes:
            raise OSError(errno.EIO, "the client's disk failed")

    with pytest.raises(OSError, match="the client's disk failed") as failed:
        store.add_stream(Failing(), "a.txt")
    assert not isinstance(failed.value, FileError)
    assert list((store.root / "tmp").iterdir()) == []


def test_a_store_on_a_full_disk_says_so_until_space_is_freed(small_disk: Path) -> None:
    with FileStore(small_disk / "store") as store:
        kept = store.add_bytes(b"kept\n", "kept.txt")
        with pytest.raises(FileTooLarge, match="the disk of the file store at .* is full"):
            store.add_bytes(b"x" * 2_000_000, "big.txt")  # larger than the disk
        assert list((store.root / "tmp").iterdir()) == []
        filler = _fill(small_disk)
        with pytest.raises(FileTooLarge, match="is full"):
            store.add_bytes(b"small\n", "small.txt")
        # Deleting writes to the database too: a FileError (503), not a refused file.
        with pytest.raises(FileError, match="is full .*database or disk is full") as refused:
            store.delete(kept.id)
        assert type(refused.value) is FileError
        assert store.read_bytes(kept.id) == b"kept\n"
        filler.unlink()
        store.delete(kept.id)
        assert store.list() == []


def test_a_read_only_store_refuses_adds_and_a_start_saying_so(
    tmp_path: Path, make_read_only: Callable[[Path], None]
) -> None:
    root = tmp_path / "store"
    with FileStore(root) as store:
        kept = store.add_bytes(b"kept\n", "kept.txt")
        make_read_only(root)
        with pytest.raises(
            FileError, match=f"the file store at {_quoted(root)} is read-only"
        ) as refused:
            store.add_bytes(b"new\n", "new.txt")
        assert type(refused.value) is FileError
        assert store.read_bytes(kept.id) == b"kept\n"
    with pytest.raises(FileError, match=f"the file store at {_quoted(root)} is read-only"):
        FileStore(root)


def test_a_delete_whose_content_cannot_be_removed_succeeds_and_leaves_it_to_purge(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stored = store.add_bytes(b"going\n", "going.txt")
    blob = store.blob_path(stored.id)
    unlink = os.unlink

    def refused(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        if Path(path) == blob:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refused)
    store.delete(stored.id)
    with pytest.raises(FileNotFoundInStore):
        store.get(stored.id)
    assert blob.exists() and "left for a later purge" in caplog.text
    monkeypatch.undo()
    store.purge_expired(now=0.0)
    assert not blob.exists()


def test_a_database_another_process_holds_is_a_file_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_BUSY_TIMEOUT_S", 0.0)
    with FileStore(tmp_path / "store") as store:
        kept = store.add_bytes(b"kept\n", "kept.txt")
        db = store.root / "files.sqlite3"
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            held = f"another process has held the database of the file store at {_quoted(db)}"
            with pytest.raises(FileError, match=held):
                store.add_bytes(b"new\n", "new.txt")
            with pytest.raises(FileError, match=held):
                store.delete(kept.id)
            with pytest.raises(FileError, match=held):
                store.purge_expired(now=0.0)
            assert [f.id for f in store.list()] == [kept.id]  # reads go on meanwhile
            holder.execute("COMMIT")
        finally:
            holder.close()
        assert store.read_bytes(store.add_bytes(b"new\n", "new.txt").id) == b"new\n"
        assert {f.name for f in store.list()} == {"kept.txt", "new.txt"}


def test_reads_go_on_while_a_write_waits_for_another_process_s_lock(tmp_path: Path) -> None:
    """A write waiting (up to its busy timeout) for the database holds up no read."""
    with FileStore(tmp_path / "store") as store:
        kept = store.add_bytes(b"kept\n", "kept.txt")
        holder = sqlite3.connect(store.root / "files.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write, in progress
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as threads:
                waiting = threads.submit(store.add_bytes, b"new\n", "new.txt")
                with pytest.raises(concurrent.futures.TimeoutError):
                    waiting.result(timeout=0.5)  # it waits for the lock
                reading = threads.submit(
                    lambda: (store.read_bytes(kept.id), [f.name for f in store.list()])
                )
                assert reading.result(timeout=5) == (b"kept\n", ["kept.txt"])
                holder.execute("COMMIT")
                assert store.read_bytes(waiting.result(timeout=30).id) == b"new\n"
        finally:
            holder.close()


def _damage(db: Path) -> None:
    """Overwrite the database's pages after the first (its header and schema)."""
    with db.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * 8192)


def test_a_damaged_database_is_refused_at_start_saying_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FileStore(root) as store:
        for i in range(50):
            store.add_bytes(b"row %d\n" % i, f"f{i}.txt")
    db = root / "files.sqlite3"
    _damage(db)
    with pytest.raises(
        FileError, match=f"the database of the file store at {_quoted(db)} is damaged"
    ):
        FileStore(root)
    db.write_bytes(b"garbage" * 20)  # not even a header
    with pytest.raises(FileError, match="is damaged .*restore it from a backup"):
        FileStore(root)


def test_a_database_damaged_while_open_fails_every_call_with_a_file_error(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FileStore(root) as store:  # closing it writes the rows into the database file
        stored = [store.add_bytes(b"row %d\n" % i, f"f{i}.txt") for i in range(50)]
    with FileStore(root) as store:
        db = root / "files.sqlite3"
        _damage(db)
        # Another process's write: the store reads the database afresh.
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("PRAGMA user_version = 1")
        other.close()
        damaged = f"the database of the file store at {_quoted(db)} is damaged"
        with pytest.raises(FileError, match=damaged):
            store.list()
        with pytest.raises(FileError, match=damaged):
            store.get(stored[0].id)
        with pytest.raises(FileError, match=damaged):
            store.add_bytes(b"new\n", "new.txt")
        with pytest.raises(FileError, match=damaged):
            store.delete(stored[1].id)


def test_a_truncated_blob_is_refused_and_an_upload_of_its_content_repairs_it(
    store: FileStore,
) -> None:
    data = b"id,value\n" + b"".join(b"%d,%d\n" % (i, i * i) for i in range(2000))
    first = store.add_bytes(data, "data.csv")
    blob = store.blob_path(first.id)
    with blob.open("r+b") as f:
        f.truncate(100)
    damaged = re.escape(f"the stored copy of {first.id!r} at {str(blob)!r} is damaged: 100 bytes")
    with pytest.raises(FileNotFoundInStore, match=damaged):
        store.read_bytes(first.id)
    with pytest.raises(FileNotFoundInStore, match=damaged):
        store.blob_path(first.id)
    again = store.add_bytes(data, "again.csv")
    assert store.read_bytes(again.id) == store.read_bytes(first.id) == data


def test_a_stored_copy_changed_in_place_is_refused_before_its_last_bytes_are_read(
    store: FileStore,
) -> None:
    data = b"".join(b"%08d\n" % i for i in range(300_000))  # 2.7 MiB: several reads
    stored = store.add_bytes(data, "rows.txt")
    blob = store.blob_path(stored.id)
    with blob.open("r+b") as f:  # one byte changed, the size the same
        f.seek(len(data) // 2)
        f.write(b"X")
    damaged = re.escape(f"the stored copy of {stored.id!r} at {str(blob)!r} is damaged: other")
    with pytest.raises(FileNotFoundInStore, match=damaged):
        store.read_bytes(stored.id)
    read = bytearray()
    with store.open(stored.id) as f, pytest.raises(FileNotFoundInStore, match=damaged):
        while chunk := f.read(1 << 20):
            read += chunk
    assert len(read) < len(data)  # its end never reached the reader
    with store.open(stored.id) as f:  # a part is not checked: it is what is on disk
        assert f.read(8) == b"00000000"
    store.add_bytes(data, "again.txt")  # an upload of the content repairs it
    assert store.read_bytes(stored.id) == data


def test_a_stored_copy_that_grew_or_shrank_while_open_is_refused_at_its_end(
    store: FileStore,
) -> None:
    data = b"x" * 5000
    stored = store.add_bytes(data, "x.txt")
    blob = store.blob_path(stored.id)
    with store.open(stored.id) as f:
        blob.write_bytes(data + b"more")
        with pytest.raises(FileNotFoundInStore, match="is damaged: more bytes"):
            f.read()
    blob.write_bytes(data)
    with store.open(stored.id) as f:
        blob.write_bytes(data[:10])
        with pytest.raises(FileNotFoundInStore, match="is damaged: only 10 bytes"):
            f.read()


def test_a_sound_stored_copy_reads_whole_in_any_pieces_and_where_sought(store: FileStore) -> None:
    data = b"0123456789abcdef\n" * 140_000  # 2.3 MiB
    stored = store.add_bytes(data, "lines.txt")
    assert store.read_bytes(stored.id) == data
    with store.open(stored.id) as f:
        assert b"".join(iter(lambda: f.read(4097), b"")) == data
    with store.open(stored.id) as f:
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
    assert store.read_bytes(store.add_bytes(b"", "empty.txt").id) == b""


def test_an_upload_replaces_a_stored_copy_damaged_in_place(store: FileStore) -> None:
    data = b"id,value\n1,1\n2,4\n"
    first = store.add_bytes(data, "data.csv")
    store.blob_path(first.id).write_bytes(b"Z" * len(data))  # same size, other bytes
    store.add_bytes(data, "again.csv")
    assert store.read_bytes(first.id) == data
    assert len(blob_files(store.root)) == 1


def test_purge_goes_past_entries_it_cannot_remove(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FileStore(tmp_path / "store", clock=lambda: 1000.0) as store:
        expiring = store.add_bytes(b"expiring\n", "exp.txt", retention_s=10)
        kept = store.add_bytes(b"kept\n", "kept.txt")
        odd = store.root / "blobs" / "00" / ("0" * 64)  # named as a blob, but a folder
        odd.mkdir(parents=True)
        orphan_hash = hashlib.sha256(b"orphan").hexdigest()
        orphan = store.root / "blobs" / orphan_hash[:2] / orphan_hash
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"orphan")
        stale_dir = store.root / "tmp" / "incoming-folder"
        stale_dir.mkdir()
        stale = store.root / "tmp" / "incoming-stale"
        stale.write_bytes(b"partial")
        for partial in (stale_dir, stale):
            os.utime(partial, (0.0, 0.0))
        expiring_blob = store.blob_path(expiring.id)
        assert store.purge_expired(now=5000.0) == 1
        assert store.purge_expired(now=5000.0) == 0
        assert not orphan.exists() and not stale.exists() and not expiring_blob.exists()
        assert odd.is_dir() and stale_dir.is_dir()
        assert f"cannot remove orphan blob {odd}" in caplog.text
        assert f"cannot remove partial upload {stale_dir}" in caplog.text
        assert store.read_bytes(kept.id) == b"kept\n"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_writes_are_refused_once_the_database_is_deleted_or_replaced(
    store: FileStore, how: str
) -> None:
    kept = store.add_bytes(b"kept\n", "kept.txt")
    db = store.root / "files.sqlite3"
    if how == "deleted":
        for path in store.root.glob("files.sqlite3*"):
            path.unlink()
    else:
        copy = store.root / "copy.sqlite3"
        copy.write_bytes(db.read_bytes())
        copy.replace(db)
    gone = f"the database of the file store at {_quoted(db)} was deleted or replaced"
    with pytest.raises(FileError, match=gone):
        store.add_bytes(b"lost\n", "lost.txt")
    with pytest.raises(FileError, match=gone):
        store.delete(kept.id)
    assert [f.name for f in store.list()] == ["kept.txt"]
