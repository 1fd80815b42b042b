"""Upload checks: every supported type passes; the rest is refused, saying why."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import openpyxl
import pytest
from PIL import Image

from sandkernel.errors import FileRejected, FileTooLarge, SandkernelError
from sandkernel.files import MIME_TYPES, FileStore, check_upload
from tests.files._samples import (
    SAMPLES,
    blob_files,
    docx_bytes,
    pdf_bytes,
    png_bytes,
    xlsx_bytes,
    zip_bytes,
)

# --------------------------------------------------------------------------- every type uploads


@pytest.mark.parametrize("ext", sorted(SAMPLES))
def test_every_supported_type_uploads_and_round_trips(store: FileStore, ext: str) -> None:
    data = SAMPLES[ext]()
    assert check_upload(f"sample{ext}", data) == (f"sample{ext}", MIME_TYPES[ext][0])
    stored = store.add_bytes(data, f"sample{ext}")
    assert stored.mime_type == MIME_TYPES[ext][0]
    assert stored.name == f"sample{ext}"
    assert stored.size_bytes == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert store.read_bytes(stored.id) == data
    assert store.blob_path(stored.id).read_bytes() == data
    with store.open(stored.id) as stream:
        assert stream.read() == data


def test_samples_are_real_files_of_their_type() -> None:
    for ext in (".png", ".gif", ".jpeg"):
        with Image.open(io.BytesIO(SAMPLES[ext]())) as image:
            image.verify()
    book = openpyxl.load_workbook(io.BytesIO(xlsx_bytes()))
    assert book.active is not None and book.active["A2"].value == 1
    for ext in (".docx", ".pptx", ".zip"):
        with zipfile.ZipFile(io.BytesIO(SAMPLES[ext]())) as archive:
            assert archive.testzip() is None
    with tarfile.open(fileobj=io.BytesIO(SAMPLES[".tar"]())) as archive:
        assert archive.getnames() == ["data/a.txt", "data/b.txt"]
    pdf = pdf_bytes()
    startxref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    assert pdf[startxref:].startswith(b"xref")


def test_upload_from_a_path_is_checked_like_bytes(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(png_bytes())
    assert check_upload("chart.png", path) == ("chart.png", "image/png")
    with pytest.raises(FileRejected, match="content looks like image/png, not .csv"):
        check_upload("chart.csv", path)


def test_text_in_other_encodings_is_accepted() -> None:
    assert check_upload("latin1.csv", "caf\u00e9;1\n".encode("latin-1"))[1] == "application/csv"
    utf16 = "a,b\n\u00e9,\u4e2d\n".encode("utf-16")  # with BOM, full of NUL bytes
    assert check_upload("excel.csv", utf16)[1] == "application/csv"
    assert check_upload("empty.txt", b"") == ("empty.txt", "text/plain")


def test_declared_mime_is_kept_only_when_the_table_lists_it(store: FileStore) -> None:
    script = b"print(1)\n"
    assert store.add_bytes(script, "a.py", mime="text/x-script.python").mime_type == (
        "text/x-script.python"
    )
    assert store.add_bytes(script, "b.py", mime="image/png").mime_type == "text/x-python"
    assert store.add_bytes(b"a,b\n", "c.csv", mime="text/csv").mime_type == "application/csv"


# --------------------------------------------------------------------------- refusals


def test_unsupported_extension_is_refused_naming_the_allowed_list(store: FileStore) -> None:
    with pytest.raises(FileRejected) as caught:
        check_upload("setup.exe", b"MZ\x90\x00\x03\x00")
    message = str(caught.value)
    assert message.startswith("upload rejected: .exe is not a supported type; allowed: .c, .cpp")
    assert all(ext in message for ext in MIME_TYPES)
    with pytest.raises(FileRejected, match="has no extension"):
        check_upload("Makefile", b"all:\n")
    with pytest.raises(FileRejected, match=r"\.exe is not a supported type"):
        store.add_bytes(b"MZ", "setup.exe")
    assert isinstance(caught.value, SandkernelError)


def test_png_named_csv_is_refused_as_mislabelled(store: FileStore) -> None:
    with pytest.raises(FileRejected) as caught:
        check_upload("data.csv", png_bytes())
    assert "content looks like image/png, not .csv" in str(caught.value)
    assert "must be text" in str(caught.value)
    with pytest.raises(FileRejected, match="content looks like image/png, not .csv"):
        store.add_bytes(png_bytes(), "data.csv")
    assert blob_files(store.root) == []
    assert store.list() == []


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("report.pdf", zip_bytes({"a.txt": b"x"}), "content looks like application/zip, not .pdf"),
        ("notes.txt", bytes(range(256)), "content looks like binary data, not .txt"),
        ("tool.py", b"\x7fELF\x02\x01\x01" + bytes(64), "looks like application/x-executable"),
        ("photo.png", b"just some text\n", "content looks like text/plain, not .png"),
        ("photo.jpg", png_bytes(), "content looks like image/png, not .jpg"),
        ("memo.docx", zip_bytes({"a.txt": b"x"}), "content looks like application/zip, not .docx"),
        ("memo.docx", xlsx_bytes(), "spreadsheetml.sheet, not .docx"),
        ("bundle.tar", zip_bytes({"a": b"x"}), "content looks like application/zip, not .tar"),
        ("image.gif", b"", "is empty, which is not a valid .gif"),
    ],
)
def test_content_contradicting_the_extension_is_refused(
    name: str, data: bytes, expected: str
) -> None:
    with pytest.raises(FileRejected) as caught:
        check_upload(name, data)
    assert expected in str(caught.value)
    assert "must be" in str(caught.value) or "not a valid" in str(caught.value)


def test_office_file_named_zip_is_accepted_as_zip() -> None:
    assert check_upload("memo.zip", docx_bytes()) == ("memo.zip", "application/zip")


def test_size_cap_holds_and_names_the_setting(tmp_path: Path) -> None:
    assert check_upload("a.txt", b"x" * 10, max_bytes=10) == ("a.txt", "text/plain")
    with pytest.raises(FileRejected) as caught:
        check_upload("a.txt", b"x" * 11, max_bytes=10)
    assert "over the 10 bytes size cap (setting max_bytes)" in str(caught.value)
    with FileStore(tmp_path / "small", max_bytes=1024) as small:
        small.add_bytes(b"y" * 1024, "ok.txt")
        with pytest.raises(FileTooLarge) as refused:
            small.add_stream(io.BytesIO(b"y" * 5000), "big.txt")
        # The settings a user has: the engine's, and the daemon's flag.
        assert str(refused.value) == (
            "upload rejected: 'big.txt' is larger than the 1 KiB size cap (the store's "
            "max_bytes, set by EngineConfig.max_upload_bytes or `sandkernel serve "
            "--max-upload-mb`)"
        )
        assert [f.name for f in small.list()] == ["ok.txt"]
        assert len(blob_files(small.root)) == 1
        assert list((small.root / "tmp").iterdir()) == []


def test_stream_over_the_cap_is_not_read_to_the_end(tmp_path: Path) -> None:
    class Endless:
        reads = 0

        def read(self, size: int = -1, /) -> bytes:
            self.reads += 1
            return b"z" * 65536

    source = Endless()
    with FileStore(tmp_path / "s", max_bytes=1 << 20) as s:
        with pytest.raises(FileRejected, match="size cap"):
            s.add_stream(source, "endless.txt")
    assert source.reads <= (1 << 20) // 65536 + 1
