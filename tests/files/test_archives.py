"""Archives: bombs, escaping paths and corrupt files are refused."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile

import pytest

from sandkernel.errors import FileRejected
from sandkernel.files import check_upload
from tests.files._samples import docx_bytes, tar_bytes, zip_bytes


def test_zip_bomb_is_refused_by_its_declared_size() -> None:
    bomb = zip_bytes({f"zeros{i}.bin": bytes(1 << 20) for i in range(4)})  # 4 MiB in ~4 KiB
    assert len(bomb) < 64 * 1024
    assert check_upload("ok.zip", bomb, max_archive_bytes=4 << 20)[1] == "application/zip"
    with pytest.raises(FileRejected) as caught:
        check_upload("bomb.zip", bomb, max_archive_bytes=(4 << 20) - 1)
    assert "unpacks to 4 MiB" in str(caught.value)
    assert "(setting max_archive_bytes)" in str(caught.value)


def test_office_file_with_a_bomb_inside_is_refused() -> None:
    with zipfile.ZipFile(io.BytesIO(docx_bytes())) as source:
        parts = {name: source.read(name) for name in source.namelist()}
    parts["word/media/huge.bin"] = bytes(2 << 20)
    with pytest.raises(FileRejected, match="over the 1 MiB cap on archive contents"):
        check_upload("memo.docx", zip_bytes(parts), max_archive_bytes=1 << 20)


def test_zip_with_forged_huge_declared_size_is_refused() -> None:
    data = bytearray(zip_bytes({"a.txt": b"hello"}))
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size
    with pytest.raises(FileRejected, match="unpacks to 4 GiB"):
        check_upload("forged.zip", bytes(data))


@pytest.mark.parametrize("member", ["../evil.sh", "/etc/cron.d/evil", "a/../../b", "..\\x.bat"])
def test_path_traversing_zip_is_refused(member: str) -> None:
    archive = zip_bytes({"ok.txt": b"fine", member: b"evil"})
    with pytest.raises(FileRejected) as caught:
        check_upload("archive.zip", archive)
    assert repr(member) in str(caught.value)
    assert "outside its folder" in str(caught.value)


def test_path_traversing_tar_and_escaping_links_are_refused() -> None:
    with pytest.raises(FileRejected, match="outside its folder"):
        check_upload("a.tar", tar_bytes({"../../etc/x": b"evil"}))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        link = tarfile.TarInfo("innocent")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        archive.addfile(link)
    with pytest.raises(FileRejected, match="'innocent', which would unpack or link outside"):
        check_upload("b.tar", buf.getvalue())


def _zip_with_link(name: str, target: str) -> bytes:
    """A zip holding a symlink entry, as Info-ZIP's ``zip --symlinks`` writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("ok.txt", b"fine")
        link = zipfile.ZipInfo(name)
        link.create_system = 3  # Unix: unzip makes the entry a symlink
        link.external_attr = (0o120777 << 16) | 0x20
        archive.writestr(link, target)
    return buf.getvalue()


@pytest.mark.parametrize("target", ["../../../../etc", "/etc/shadow", "a/../../b"])
def test_zip_symlink_escaping_its_folder_is_refused(target: str) -> None:
    with pytest.raises(FileRejected, match="'escape', which would unpack or link outside"):
        check_upload("links.zip", _zip_with_link("escape", target))


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_symlink_whose_target_cannot_be_read_is_refused(method: int) -> None:
    """A corrupt target raises its codec's own error (zlib.error...), not a 500."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        link = zipfile.ZipInfo("link")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        link.compress_type = method
        archive.writestr(link, b"target/of/the/link" * 4)
    data = bytearray(buf.getvalue())
    start = 30 + len("link")  # after the entry's local header: its compressed bytes
    data[start : start + 8] = b"\xff" * 8
    with pytest.raises(FileRejected, match="'link', which would unpack or link outside"):
        check_upload("corrupt.zip", bytes(data))


def test_zip_symlink_within_its_folder_is_accepted() -> None:
    assert check_upload("links.zip", _zip_with_link("alias", "data/ok.txt")) == (
        "links.zip",
        "application/zip",
    )


def test_a_zip64_record_cannot_hide_the_entry_count_from_the_check() -> None:
    """zipfile takes the zip64 record's count: the check must read the same one."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", allowZip64=True) as archive:
        for i in range(70_000):  # past 65,535: zipfile writes a zip64 end record
            archive.writestr(f"{i}", b"")
    data = bytearray(buf.getvalue())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHI", data, end + 8, 1, 1, 46)  # the plain record: "1 entry"
    parsed = []
    real = zipfile.ZipFile.__init__

    def counting(self: zipfile.ZipFile, *args: object, **kwargs: object) -> None:
        parsed.append(True)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    zipfile.ZipFile.__init__ = counting  # type: ignore[method-assign]
    try:
        with pytest.raises(FileRejected, match="more than 1000 entries"):
            check_upload("many.zip", bytes(data), max_archive_entries=1000)
    finally:
        zipfile.ZipFile.__init__ = real  # type: ignore[method-assign]
    assert parsed == []  # refused before zipfile built an object per entry


def test_archive_with_too_many_entries_is_refused() -> None:
    many = zip_bytes({f"f{i}.txt": b"" for i in range(6)})
    assert check_upload("ok.zip", many, max_archive_entries=6)[1] == "application/zip"
    with pytest.raises(FileRejected, match=r"more than 5 entries \(setting max_archive_entries"):
        check_upload("many.zip", many, max_archive_entries=5)
    with pytest.raises(FileRejected, match="max_archive_entries"):
        check_upload("many.tar", tar_bytes({f"f{i}": b"" for i in range(6)}), max_archive_entries=5)


def test_corrupt_zip_is_refused_not_crashed() -> None:
    truncated = zip_bytes({"a.txt": b"x" * 100})[:40]
    with pytest.raises(FileRejected, match="not a valid zip archive"):
        check_upload("broken.zip", truncated)


def test_a_zip_needing_a_version_zipfile_cannot_read_is_refused_not_crashed() -> None:
    data = bytearray(zip_bytes({"a.txt": b"x"}))
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<H", data, central + 6, 166)  # "version needed to extract": 16.6
    for name in ("new.zip", "new.docx"):
        with pytest.raises(FileRejected, match="not a valid zip archive: zip file version 16.6"):
            check_upload(name, bytes(data))
