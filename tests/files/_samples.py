"""Real files of every supported type, built in memory, for the file tests."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import openpyxl
from PIL import Image


def png_bytes() -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte, one red pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def gif_bytes() -> bytes:
    # A 1x1 GIF89a: screen descriptor, 2-colour table, graphic control, image, trailer.
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
        b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00"
        b"\x02\x02D\x01\x00;"
    )


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def pdf_bytes() -> bytes:
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


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


_CT = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_RELS_NS = b"http://schemas.openxmlformats.org/package/2006/relationships"
_OFFICE_REL = b"http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"


def ooxml_bytes(main_part: bytes, main_type: bytes, parts: dict[str, bytes]) -> bytes:
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
    return zip_bytes({"[Content_Types].xml": content_types, "_rels/.rels": rels, **parts})


def docx_bytes() -> bytes:
    document = (
        _CT + b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        b"<w:body><w:p><w:r><w:t>Hello</w:t></w:r></w:p></w:body></w:document>"
    )
    return ooxml_bytes(
        b"word/document.xml",
        b"application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml",
        {"word/document.xml": document},
    )


def pptx_bytes() -> bytes:
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
    return ooxml_bytes(
        b"ppt/presentation.xml",
        b"application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml",
        {
            "ppt/presentation.xml": presentation,
            "ppt/_rels/presentation.xml.rels": slide_rels,
            "ppt/slides/slide1.xml": slide,
        },
    )


def xlsx_bytes() -> bytes:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append(["x", "y"])
    sheet.append([1, 2])
    buf = io.BytesIO()
    workbook.save(buf)
    return buf.getvalue()


def tar_bytes(entries: dict[str, bytes]) -> bytes:
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
    ".docx": docx_bytes,
    ".html": lambda: b"<!doctype html><html><body><p>hi</p></body></html>\n",
    ".java": lambda: b"class A { public static void main(String[] a) {} }\n",
    ".json": lambda: b'{"a": [1, 2, 3]}\n',
    ".jsonl": lambda: b'{"a": 1}\n{"a": 2}\n',
    ".md": lambda: "# Title\n\n* caf\u00e9\n".encode(),
    ".pdf": pdf_bytes,
    ".php": lambda: b"<?php echo 'hi'; ?>\n",
    ".pptx": pptx_bytes,
    ".py": lambda: b"print('hello')\n",
    ".rb": lambda: b"puts 'hello'\n",
    ".tex": lambda: b"\\documentclass{article}\\begin{document}x\\end{document}\n",
    ".tsv": lambda: "city\ttemp\nZ\u00fcrich\t4.5\n".encode(),
    ".txt": lambda: "plain text \u2713\n".encode(),
    ".css": lambda: b"body { color: red; }\n",
    ".jpeg": jpeg_bytes,
    ".jpg": jpeg_bytes,
    ".js": lambda: b"console.log(1);\n",
    ".gif": gif_bytes,
    ".png": png_bytes,
    ".tar": lambda: tar_bytes({"data/a.txt": b"a\n", "data/b.txt": b"b\n"}),
    ".ts": lambda: b"const x: number = 1;\n",
    ".xlsx": xlsx_bytes,
    ".xml": lambda: b'<?xml version="1.0"?><root><a>1</a></root>\n',
    ".zip": lambda: zip_bytes({"a.txt": b"hello\n", "dir/b.txt": b"world\n"}),
}


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())
