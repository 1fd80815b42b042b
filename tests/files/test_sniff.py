"""Sniffing: the type of a content from its bytes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from sandkernel.files import MIME_TYPES, sniff_mime
from sandkernel.files.sniff import sniff_path
from tests.files._samples import (
    SAMPLES,
    docx_bytes,
    gif_bytes,
    jpeg_bytes,
    pdf_bytes,
    png_bytes,
    pptx_bytes,
    xlsx_bytes,
)


def test_sniff_mime_recognises_signatures_office_files_and_text() -> None:
    assert sniff_mime(png_bytes()) == "image/png"
    assert sniff_mime(gif_bytes()) == "image/gif"
    assert sniff_mime(jpeg_bytes()) == "image/jpeg"
    assert sniff_mime(pdf_bytes()) == "application/pdf"
    assert sniff_mime(SAMPLES[".tar"]()) == "application/x-tar"
    assert sniff_mime(SAMPLES[".zip"]()) == "application/zip"
    assert sniff_mime(docx_bytes()) == MIME_TYPES[".docx"][0]
    assert sniff_mime(xlsx_bytes()) == MIME_TYPES[".xlsx"][0]
    assert sniff_mime(pptx_bytes()) == MIME_TYPES[".pptx"][0]
    assert sniff_mime(docx_bytes()[:100]) == "application/zip"  # a prefix cannot show the parts
    assert sniff_mime(b"\x7fELF\x02\x01\x01\x00") == "application/x-executable"
    assert sniff_mime(b"def f():\n    return 1\n") == "text/plain"
    assert sniff_mime(b"MZ is a postcode\n") == "text/plain"  # weak magic needs binary
    assert sniff_mime(b"\x00\x01\x02\x03") is None
    assert sniff_mime(b"") is None


def zip_needing_version(version: int) -> bytes:
    """A zip whose one entry says it needs ``version`` (tenths) to be extracted."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("big", b"y" * 10)
    data = bytearray(buffer.getvalue())
    entry = data.index(b"PK\x01\x02")  # the central directory's record of the entry
    data[entry + 6 : entry + 8] = version.to_bytes(2, "little")
    return bytes(data)


def test_a_zip_the_archive_library_cannot_read_is_sniffed_as_a_zip(tmp_path: Path) -> None:
    data = zip_needing_version(166)  # 16.6: zipfile refuses it (NotImplementedError)
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(io.BytesIO(data))
    assert sniff_mime(data) == "application/zip"
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sniff_path(path) == "application/zip"
