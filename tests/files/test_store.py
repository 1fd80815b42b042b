"""The file store: durable ids, content stored once, expiry, concurrency."""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import stat
import threading
import tracemalloc
from pathlib import Path

import pytest

from sandkernel.errors import BadInput, FileError, FileNotFoundInStore, FileRejected, FileTooLarge
from sandkernel.files import DEFAULT_MAX_UPLOAD_BYTES, MIME_TYPES, FileStore, StoredFile
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
    looked_up = store.blob_path

    def then_deleted(file_id: str) -> Path:
        blob = looked_up(file_id)
        store.delete(file_id)
        return blob

    monkeypatch.setattr(store, "blob_path", then_deleted)
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
