"""Tests of sandkernel.files: upload checks, the file store, workspace scans."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import struct
import sys
import tarfile
import threading
import tracemalloc
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import openpyxl
import pytest
from PIL import Image

from sandkernel.errors import FileError, FileNotFoundInStore, FileRejected, SandkernelError
from sandkernel.files import (
    MIME_TYPES,
    FileStore,
    ScanResult,
    StoredFile,
    check_upload,
    listed_file_name,
    mime_for_name,
    open_workspace_file,
    raw_file_name,
    safe_name,
    scan_workspace,
    sniff_mime,
)

# --------------------------------------------------------------------------- samples


def _png() -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte, one red pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _gif() -> bytes:
    # A 1x1 GIF89a: screen descriptor, 2-colour table, graphic control, image, trailer.
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
        b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00"
        b"\x02\x02D\x01\x00;"
    )


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _pdf() -> bytes:
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


_CT = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_RELS_NS = b"http://schemas.openxmlformats.org/package/2006/relationships"
_OFFICE_REL = b"http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"


def _ooxml(main_part: bytes, main_type: bytes, parts: dict[str, bytes]) -> bytes:
    content_types = (
        _CT + b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        b'<Default Extension="rels" '
        b'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        b'<Default Extension="xml" ContentType="application/xml"/>'
        b'<Override PartName="/' + main_part + b'" ContentType="' + main_type + b'"/></Types>'
    )
    rels = (
        _CT
        + b'<Relationships xmlns="'
        + _RELS_NS
        + b'"><Relationship Id="rId1" Type="'
        + _OFFICE_REL
        + b'" Target="'
        + main_part
        + b'"/></Relationships>'
    )
    return _zip({"[Content_Types].xml": content_types, "_rels/.rels": rels, **parts})


def _docx() -> bytes:
    document = (
        _CT + b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        b"<w:body><w:p><w:r><w:t>Hello</w:t></w:r></w:p></w:body></w:document>"
    )
    return _ooxml(
        b"word/document.xml",
        b"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
        {"word/document.xml": document},
    )


def _pptx() -> bytes:
    p = b'xmlns:p="http://schemas.openxmlformats.org/presentationml/2006/main"'
    r = b'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    presentation = (
        _CT + b"<p:presentation " + p + b" " + r + b'><p:sldIdLst><p:sldId id="256" r:id="rId1"/>'
        b'</p:sldIdLst><p:sldSz cx="9144000" cy="6858000"/></p:presentation>'
    )
    slide = _CT + b"<p:sld " + p + b"><p:cSld><p:spTree/></p:cSld></p:sld>"
    slide_rels = (
        _CT + b'<Relationships xmlns="' + _RELS_NS + b'"><Relationship Id="rId1" '
        b'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/slide" '
        b'Target="slides/slide1.xml"/></Relationships>'
    )
    return _ooxml(
        b"ppt/presentation.xml",
        b"application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml",
        {
            "ppt/presentation.xml": presentation,
            "ppt/_rels/presentation.xml.rels": slide_rels,
            "ppt/slides/slide1.xml": slide,
        },
    )


def _xlsx() -> bytes:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append(["x", "y"])
    sheet.append([1, 2])
    buf = io.BytesIO()
    workbook.save(buf)
    return buf.getvalue()


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SAMPLES: dict[str, Callable[[], bytes]] = {
    ".c": lambda: b'#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n',
    ".cpp": lambda: b"#include <iostream>\nint main() { std::cout << 1; }\n",
    ".csv": lambda: "city,temp\nZ\u00fcrich,4.5\n".encode(),
    ".docx": _docx,
    ".html": lambda: b"<!doctype html><html><body><p>hi</p></body></html>\n",
    ".java": lambda: b"class A { public static void main(String[] a) {} }\n",
    ".json": lambda: b'{"a": [1, 2, 3]}\n',
    ".md": lambda: "# Title\n\n* caf\u00e9\n".encode(),
    ".pdf": _pdf,
    ".php": lambda: b"<?php echo 'hi'; ?>\n",
    ".pptx": _pptx,
    ".py": lambda: b"print('hello')\n",
    ".rb": lambda: b"puts 'hello'\n",
    ".tex": lambda: b"\\documentclass{article}\\begin{document}x\\end{document}\n",
    ".txt": lambda: "plain text \u2713\n".encode(),
    ".css": lambda: b"body { color: red; }\n",
    ".jpeg": _jpeg,
    ".jpg": _jpeg,
    ".js": lambda: b"console.log(1);\n",
    ".gif": _gif,
    ".png": _png,
    ".tar": lambda: _tar({"data/a.txt": b"a\n", "data/b.txt": b"b\n"}),
    ".ts": lambda: b"const x: number = 1;\n",
    ".xlsx": _xlsx,
    ".xml": lambda: b'<?xml version="1.0"?><root><a>1</a></root>\n',
    ".zip": lambda: _zip({"a.txt": b"hello\n", "dir/b.txt": b"world\n"}),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    with FileStore(tmp_path / "store") as s:
        yield s


def _blobs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


# --------------------------------------------------------------------------- table and sniffing


def test_mime_table_lists_the_documented_types() -> None:
    assert set(MIME_TYPES) == set(SAMPLES)
    assert MIME_TYPES[".py"] == ("text/x-python", "text/x-script.python")
    assert MIME_TYPES[".xml"] == ("application/xml", "text/xml")
    assert MIME_TYPES[".jpg"] == MIME_TYPES[".jpeg"] == ("image/jpeg",)
    assert MIME_TYPES[".csv"] == ("application/csv",)
    with pytest.raises(TypeError):
        MIME_TYPES[".exe"] = ("application/x-msdownload",)  # type: ignore[index]


def test_mime_for_name_prefers_the_table_then_the_builtin_one() -> None:
    assert mime_for_name("report.CSV") == "application/csv"
    assert mime_for_name("dir/script.py") == "text/x-python"
    assert mime_for_name("drawing.svg") == "image/svg+xml"
    assert mime_for_name("Makefile") is None
    assert mime_for_name("x.unknown-ext") is None


def test_sniff_mime_recognises_signatures_office_files_and_text() -> None:
    assert sniff_mime(_png()) == "image/png"
    assert sniff_mime(_gif()) == "image/gif"
    assert sniff_mime(_jpeg()) == "image/jpeg"
    assert sniff_mime(_pdf()) == "application/pdf"
    assert sniff_mime(SAMPLES[".tar"]()) == "application/x-tar"
    assert sniff_mime(SAMPLES[".zip"]()) == "application/zip"
    assert sniff_mime(_docx()) == MIME_TYPES[".docx"][0]
    assert sniff_mime(_xlsx()) == MIME_TYPES[".xlsx"][0]
    assert sniff_mime(_pptx()) == MIME_TYPES[".pptx"][0]
    assert sniff_mime(_docx()[:100]) == "application/zip"  # a prefix cannot show the parts
    assert sniff_mime(b"\x7fELF\x02\x01\x01\x00") == "application/x-executable"
    assert sniff_mime(b"def f():\n    return 1\n") == "text/plain"
    assert sniff_mime(b"MZ is a postcode\n") == "text/plain"  # weak magic needs binary
    assert sniff_mime(b"\x00\x01\x02\x03") is None
    assert sniff_mime(b"") is None


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
    book = openpyxl.load_workbook(io.BytesIO(_xlsx()))
    assert book.active is not None and book.active["A2"].value == 1
    for ext in (".docx", ".pptx", ".zip"):
        with zipfile.ZipFile(io.BytesIO(SAMPLES[ext]())) as archive:
            assert archive.testzip() is None
    with tarfile.open(fileobj=io.BytesIO(SAMPLES[".tar"]())) as archive:
        assert archive.getnames() == ["data/a.txt", "data/b.txt"]
    pdf = _pdf()
    startxref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    assert pdf[startxref:].startswith(b"xref")


def test_upload_from_a_path_is_checked_like_bytes(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    path.write_bytes(_png())
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
        check_upload("data.csv", _png())
    assert "content looks like image/png, not .csv" in str(caught.value)
    assert "must be text" in str(caught.value)
    with pytest.raises(FileRejected, match="content looks like image/png, not .csv"):
        store.add_bytes(_png(), "data.csv")
    assert _blobs(store.root) == []
    assert store.list() == []


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("report.pdf", _zip({"a.txt": b"x"}), "content looks like application/zip, not .pdf"),
        ("notes.txt", bytes(range(256)), "content looks like binary data, not .txt"),
        ("tool.py", b"\x7fELF\x02\x01\x01" + bytes(64), "looks like application/x-executable"),
        ("photo.png", b"just some text\n", "content looks like text/plain, not .png"),
        ("photo.jpg", _png(), "content looks like image/png, not .jpg"),
        ("memo.docx", _zip({"a.txt": b"x"}), "content looks like application/zip, not .docx"),
        ("memo.docx", _xlsx(), "spreadsheetml.sheet, not .docx"),
        ("bundle.tar", _zip({"a": b"x"}), "content looks like application/zip, not .tar"),
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
    assert check_upload("memo.zip", _docx()) == ("memo.zip", "application/zip")


def test_size_cap_holds_and_names_the_setting(tmp_path: Path) -> None:
    assert check_upload("a.txt", b"x" * 10, max_bytes=10) == ("a.txt", "text/plain")
    with pytest.raises(FileRejected) as caught:
        check_upload("a.txt", b"x" * 11, max_bytes=10)
    assert "over the 10 bytes size cap (setting max_bytes)" in str(caught.value)
    with FileStore(tmp_path / "small", max_bytes=1024) as small:
        small.add_bytes(b"y" * 1024, "ok.txt")
        with pytest.raises(
            FileRejected, match=r"larger than the 1 KiB size cap \(setting max_bytes"
        ):
            small.add_stream(io.BytesIO(b"y" * 5000), "big.txt")
        assert [f.name for f in small.list()] == ["ok.txt"]
        assert len(_blobs(small.root)) == 1
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


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("data.csv", "data.csv"),
        ("../x.csv", "x.csv"),
        ("/etc/x.csv", "x.csv"),
        ("a/../../b.csv", "b.csv"),
        ("folder/sub/data.csv", "data.csv"),
        ("C:\\Users\\me\\data.csv", "data.csv"),
        ("..\\..\\win.csv", "win.csv"),
        ("r\u00e9sum\u00e9 2024.md", "r\u00e9sum\u00e9 2024.md"),
    ],
)
def test_traversing_and_absolute_names_reduce_to_their_basename(
    store: FileStore, given: str, kept: str
) -> None:
    assert safe_name(given) == kept
    stored = store.add_bytes(b"a,b\n" if kept.endswith(".csv") else b"# t\n", given)
    assert stored.name == kept
    assert "/" not in stored.name and "\\" not in stored.name


def test_traversal_to_a_file_without_a_supported_extension_is_refused() -> None:
    with pytest.raises(FileRejected, match="'passwd' has no extension"):
        check_upload("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("..", "names a directory"),
        ("../", "names a directory"),
        ("a/..", "names a directory"),
        ("dir/", "names a directory"),
        (".", "names a directory"),
        ("x\x00.csv", "NUL byte"),
        ("a\nb.csv", "line break"),
        ("a\rb.csv", "line break"),
        ("tab\there.csv", r"invisible character U\+0009"),
        ("report\u202etxt.csv", r"invisible character U\+202E"),
        ("bad\udcff.csv", "not valid Unicode"),
        ("\u00e9" * 126 + ".txt", "names are limited to 255 bytes"),
        ("d/" * 2100 + "x.csv", "the limit is 4096"),
    ],
)
def test_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(FileRejected, match=why):
        safe_name(name)
    with pytest.raises(FileRejected, match=why):
        check_upload(name, b"a,b\n")


def test_a_name_of_exactly_255_bytes_is_kept() -> None:
    name = "a" * 251 + ".txt"
    assert safe_name(name) == name


# --------------------------------------------------------------------------- listed names

# Pieces that look alike once escaped naively: escapes spelt out literally,
# the characters they stand for, bytes that are not UTF-8, partial UTF-8
# sequences that adjacent pieces may complete, and characters that do show.
_TRICKY_PIECES: tuple[bytes, ...] = (
    b"\\", b"\\\\", b"\\n", b"\\x", b"\\xff", b"\\u202e", b"\\U0001f600", b"\\q",
    b"n", b"x", b"u", b"f", b"0", b".txt", b" ", b"/",
    b"\n", b"\t", b"\r", b"\x00", b"\x1b", b"\x7f",
    b"\xff", b"\x80", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xf0\x9f\x98",
    "\u00e9".encode(), "\x85".encode(), "\u00a0".encode(), "\u200d".encode(),
    "\u202e".encode(), "\u2028".encode(), "\ue000".encode(), "\U0001f600".encode(),
    "\U000e0001".encode(), "\U0010ffff".encode(), "\u4e2d".encode(),
)  # fmt: skip


def _tricky_names(count: int, seed: int) -> set[bytes]:
    rng = random.Random(seed)
    return {b"".join(rng.choices(_TRICKY_PIECES, k=rng.randint(1, 8))) for _ in range(count)}


def _shows_as_itself(listed: str) -> bool:
    """Fit for JSON, SQLite and an HTTP header: valid Unicode, every character visible."""
    listed.encode("utf-8")  # raises on a surrogate
    hidden = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
    return not any(unicodedata.category(char) in hidden for char in listed)


@pytest.mark.parametrize(
    "name",
    ["data.csv", "sp ace.txt", "-dash.txt", ".hidden", "C:evil.txt", "r\u00e9sum\u00e9.md",
     "emoji-\U0001f600.txt", "\u4e2d\u6587.txt", "nbsp\u00a0kept.txt", "a" * 251 + ".txt"],
)  # fmt: skip
def test_printable_names_without_a_backslash_are_listed_as_they_are(name: str) -> None:
    assert listed_file_name(name) == name
    assert listed_file_name(name.encode()) == name
    assert raw_file_name(name) == name.encode()


@pytest.mark.parametrize(
    ("raw", "listed"),
    [
        (b"sk new\nline.txt", "sk new\\nline.txt"),
        (b"sk new\\nline.txt", "sk new\\\\nline.txt"),
        (b"bad\xff.txt", "bad\\xff.txt"),
        (b"tab\there\r.txt", "tab\\there\\r.txt"),
        (b"\\x41.txt", "\\\\x41.txt"),
        (b"C:\\evil.txt", "C:\\\\evil.txt"),
        ("report\u202etxt.exe".encode(), "report\\u202etxt.exe"),
        (b"esc-\x1b[31m-del-\x7f.txt", "esc-\\u001b[31m-del-\\u007f.txt"),
        ("tag\U000e0001-pua\ue000.txt".encode(), "tag\\U000e0001-pua\\ue000.txt"),
        # U+0085 (the UTF-8 bytes c2 85) and the lone byte 85 are different names.
        ("nel\x85.txt".encode(), "nel\\u0085.txt"),
        (b"nel\x85.txt", "nel\\x85.txt"),
        (b"cut\xc3.txt", "cut\\xc3.txt"),
        (b"surrogate\xed\xa0\x80.txt", "surrogate\\xed\\xa0\\x80.txt"),
        (b"sub dir/new\nline.txt", "sub dir/new\\nline.txt"),
    ],
)
def test_names_are_listed_with_reversible_escapes(raw: bytes, listed: str) -> None:
    assert listed_file_name(raw) == listed
    assert listed_file_name(os.fsdecode(raw)) == listed
    assert raw_file_name(listed) == raw
    assert _shows_as_itself(listed)


def test_every_one_and_two_byte_name_round_trips_under_its_own_listed_name() -> None:
    names = [bytes([a]) for a in range(256)] + [
        bytes([a, b]) for a in range(256) for b in range(256)
    ]
    listed: dict[str, bytes] = {}
    for raw in names:
        shown = listed_file_name(raw)
        assert raw_file_name(shown) == raw, (raw, shown)
        assert listed.setdefault(shown, raw) == raw, f"{raw!r} and {listed[shown]!r} -> {shown!r}"
    assert len(listed) == len(names)


def test_every_character_round_trips_and_only_visible_ones_are_listed() -> None:
    # Characters 4096 at a time: a name round-trips only if each of them does.
    for start in range(0, sys.maxunicode + 1, 4096):
        codes = range(start, min(start + 4096, sys.maxunicode + 1))
        # Surrogates are not characters: UTF-8 cannot hold them.
        raw = "".join(chr(c) for c in codes if not 0xD800 <= c <= 0xDFFF).encode()
        shown = listed_file_name(raw)
        assert raw_file_name(shown) == raw, hex(start)
        assert _shows_as_itself(shown), hex(start)


def test_tricky_names_round_trip_and_never_share_a_listed_name() -> None:
    names = _tricky_names(20_000, seed=20240611)
    listed: dict[str, bytes] = {}
    for raw in names:
        shown = listed_file_name(raw)
        assert raw_file_name(shown) == raw, (raw, shown)
        assert os.fsencode(os.fsdecode(raw_file_name(shown))) == raw
        assert _shows_as_itself(shown), shown
        assert json.loads(json.dumps(shown)) == shown
        assert listed.setdefault(shown, raw) == raw, f"{raw!r} and {listed[shown]!r} -> {shown!r}"


def test_names_a_scan_decodes_are_listed_like_their_bytes() -> None:
    # os.fsdecode's surrogate escapes and the bytes they stand for: one name.
    assert listed_file_name("bad\udcff.txt") == listed_file_name(b"bad\xff.txt") == "bad\\xff.txt"
    # The two bytes of "é", decoded one by one elsewhere, are still "é".
    assert listed_file_name("caf\udcc3\udca9.md") == "caf\u00e9.md"
    # A lone surrogate stands for no byte: it is listed apart from the bytes
    # that UTF-8 would give it, and names no file.
    assert listed_file_name("a\ud800b") == "a\\ud800b" != listed_file_name(b"a\xed\xa0\x80b")
    with pytest.raises(ValueError, match=r"\\ud800 is a lone surrogate"):
        raw_file_name("a\\ud800b")


def test_names_safe_name_accepts_need_no_escape() -> None:
    rng = random.Random(7)
    accepted = 0
    for raw in _tricky_names(5_000, seed=11):
        try:
            kept = safe_name(os.fsdecode(raw).replace("/", "_") + ".txt")
        except FileRejected:
            continue
        accepted += 1
        assert listed_file_name(kept) == kept and raw_file_name(kept) == kept.encode()
    for _ in range(2_000):
        name = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(1, 12)))
        try:
            kept = safe_name(name)
        except FileRejected:
            continue
        accepted += 1
        assert listed_file_name(kept) == kept
    assert accepted > 1_000  # the property was checked on many names, not vacuously


@pytest.mark.parametrize(
    ("listed", "why"),
    [
        ("trailing\\", r"backslash at index 8 starts no escape"),
        ("a\\qb", r"backslash at index 1 starts no escape"),
        ("short\\x4", r"backslash at index 5 starts no escape"),
        ("short\\u12", r"backslash at index 5 starts no escape"),
        ("big\\U00110000", r"past U\+10FFFF"),
        ("\\udcff", r"\\udcff is a lone surrogate"),
        ("\\ud83d\\ude00", r"\\ud83d is a lone surrogate"),
        ("given\ud800as is", r"\\ud800 is a lone surrogate"),
    ],
)
def test_raw_file_name_refuses_what_no_listed_name_is(listed: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        raw_file_name(listed)


def test_look_alike_produced_names_are_stored_apart_and_map_back(store: FileStore) -> None:
    raws = {b"sk new\nline.txt": b"line feed", b"sk new\\nline.txt": b"backslash n",
            b"bad\xff.txt": b"not utf-8"}  # fmt: skip
    stored = {
        raw: store.add_bytes(data, os.fsdecode(b"out/" + raw), origin="produced",
                             session_id="s", path=os.fsdecode(b"/mnt/data/out/" + raw))
        for raw, data in raws.items()
    }  # fmt: skip
    assert len({s.name for s in stored.values()}) == 3
    assert len({s.path for s in stored.values()}) == 3
    for raw, record in stored.items():
        again = store.get(record.id)  # through SQLite
        assert again == record
        assert raw_file_name(again.name) == raw
        assert again.path is not None and raw_file_name(again.path) == b"/mnt/data/out/" + raw
        assert store.read_bytes(record.id) == raws[raw]
        assert StoredFile.model_validate_json(record.model_dump_json()) == record
        header = f"attachment; filename*=UTF-8''{quote(record.name)}"
        assert header.isascii() and header.isprintable()


def test_the_daemons_schema_tells_clients_how_names_are_escaped(tmp_path: Path) -> None:
    from sandkernel.daemon.app import create_app
    from sandkernel.daemon.records import SessionRecords
    from sandkernel.engine import Engine

    app = create_app(Engine(store_dir=tmp_path / "store"), SessionRecords(tmp_path / "r.sqlite3"))
    schemas = app.openapi()["components"]["schemas"]
    stored_name = schemas["StoredFile"]["properties"]["name"]["description"]
    for escape in ("`\\\\`", "`\\n`", "`\\t`", "`\\r`", "`\\xNN`", "`\\uXXXX`", "`\\UXXXXXXXX`"):
        assert escape in stored_name
    for model in ("StoredFile", "ProducedFile"):
        properties = schemas[model]["properties"]
        assert "raw_file_name" in properties["name"]["description"]
        assert "escaped" in properties["path"]["description"]


# --------------------------------------------------------------------------- archives


def test_zip_bomb_is_refused_by_its_declared_size() -> None:
    bomb = _zip({f"zeros{i}.bin": bytes(1 << 20) for i in range(4)})  # 4 MiB in ~4 KiB
    assert len(bomb) < 64 * 1024
    assert check_upload("ok.zip", bomb, max_archive_bytes=4 << 20)[1] == "application/zip"
    with pytest.raises(FileRejected) as caught:
        check_upload("bomb.zip", bomb, max_archive_bytes=(4 << 20) - 1)
    assert "unpacks to 4 MiB" in str(caught.value)
    assert "(setting max_archive_bytes)" in str(caught.value)


def test_office_file_with_a_bomb_inside_is_refused() -> None:
    with zipfile.ZipFile(io.BytesIO(_docx())) as source:
        parts = {name: source.read(name) for name in source.namelist()}
    parts["word/media/huge.bin"] = bytes(2 << 20)
    with pytest.raises(FileRejected, match="over the 1 MiB cap on archive contents"):
        check_upload("memo.docx", _zip(parts), max_archive_bytes=1 << 20)


def test_zip_with_forged_huge_declared_size_is_refused() -> None:
    data = bytearray(_zip({"a.txt": b"hello"}))
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size
    with pytest.raises(FileRejected, match="unpacks to 4 GiB"):
        check_upload("forged.zip", bytes(data))


@pytest.mark.parametrize("member", ["../evil.sh", "/etc/cron.d/evil", "a/../../b", "..\\x.bat"])
def test_path_traversing_zip_is_refused(member: str) -> None:
    archive = _zip({"ok.txt": b"fine", member: b"evil"})
    with pytest.raises(FileRejected) as caught:
        check_upload("archive.zip", archive)
    assert repr(member) in str(caught.value)
    assert "outside its folder" in str(caught.value)


def test_path_traversing_tar_and_escaping_links_are_refused() -> None:
    with pytest.raises(FileRejected, match="outside its folder"):
        check_upload("a.tar", _tar({"../../etc/x": b"evil"}))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        link = tarfile.TarInfo("innocent")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        archive.addfile(link)
    with pytest.raises(FileRejected, match="'innocent', which would unpack or link outside"):
        check_upload("b.tar", buf.getvalue())


def test_archive_with_too_many_entries_is_refused() -> None:
    many = _zip({f"f{i}.txt": b"" for i in range(6)})
    assert check_upload("ok.zip", many, max_archive_entries=6)[1] == "application/zip"
    with pytest.raises(FileRejected, match=r"more than 5 entries \(setting max_archive_entries"):
        check_upload("many.zip", many, max_archive_entries=5)
    with pytest.raises(FileRejected, match="max_archive_entries"):
        check_upload("many.tar", _tar({f"f{i}": b"" for i in range(6)}), max_archive_entries=5)


def test_corrupt_zip_is_refused_not_crashed() -> None:
    truncated = _zip({"a.txt": b"x" * 100})[:40]
    with pytest.raises(FileRejected, match="not a valid zip archive"):
        check_upload("broken.zip", truncated)


# --------------------------------------------------------------------------- the store


def test_ids_and_content_survive_reopening_the_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FileStore(root) as first:
        a = first.add_bytes(b"alpha\n", "a.txt", session_id="s1")
        b = first.add_bytes(_png(), "b.png", agent_id="agent-1", retention_s=3600)
    with FileStore(root) as second:
        assert second.get(a.id) == a
        assert second.get(b.id) == b
        assert second.read_bytes(b.id) == _png()
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
    assert len(_blobs(store.root)) == 1
    store.delete(first.id)
    with pytest.raises(FileNotFoundInStore):
        store.get(first.id)
    assert store.read_bytes(second.id) == b"shared content\n"
    assert len(_blobs(store.root)) == 1
    store.delete(second.id)
    assert _blobs(store.root) == []


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
        assert len(_blobs(s.root)) == 1
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
    assert len(_blobs(store.root)) == 1 + 8 * 10
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
    sheet = store.add_bytes(_xlsx(), "export", origin="produced")
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


# --------------------------------------------------------------------------- workspace scans


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
    (root / os.fsdecode(raw)).write_bytes(_png())
    (entry,) = _scan(root).changed
    with open_workspace_file(root, entry.path) as f:
        stored = store.add_stream(
            f, entry.path, origin="produced", path=f"/mnt/data/{entry.path}", session_id="s"
        )
    assert stored.sha256 == entry.sha256
    assert stored.name == "plot\\xff\\n.png"
    assert stored.mime_type == "image/png"
    assert store.read_bytes(stored.id) == _png()


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
