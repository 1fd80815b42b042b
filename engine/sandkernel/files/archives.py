"""Archives: whether an uploaded zip or tar is a bomb or unpacks outside its folder.

Only what an archive declares is read (its directory, its members' headers);
nothing is unpacked, and nested archives are not opened.
"""

from __future__ import annotations

import re
import stat
import struct
import tarfile
import zipfile
from typing import BinaryIO

from sandkernel.errors import FileRejected
from sandkernel.files._common import human_size
from sandkernel.files.sniff import ooxml_kind


def _escapes(member: str) -> bool:
    """Whether an archive member path is absolute or climbs with ``..``."""
    path = member.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return True
    return ".." in path.split("/")


def _zip_end(f: BinaryIO, size: int) -> tuple[int, int] | None:
    """(entries, central directory size) declared by a zip's end record.

    Read before :mod:`zipfile` parses the central directory, because parsing
    builds an object per entry and a crafted archive can declare millions.
    """
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        return None
    entries, cd_size = struct.unpack_from("<HI", tail, pos + 10)
    # zipfile takes the zip64 record's figures whenever a zip64 locator sits
    # just before the end record (at a fixed place, whatever the figures
    # above say): read them the same way, or a crafted archive declares one
    # entry here and millions to zipfile.
    locator_at = size - tail_len + pos - 20
    if locator_at < 56:
        return entries, cd_size
    f.seek(locator_at)
    locator = f.read(20)
    if len(locator) < 20 or locator[:4] != b"PK\x06\x07":
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
            return None  # the figures are in a zip64 record that is not there
        return entries, cd_size
    f.seek(locator_at - 56)
    record = f.read(56)
    if len(record) < 56 or record[:4] != b"PK\x06\x06":
        return entries, cd_size
    entries64, cd_size64 = struct.unpack_from("<QQ", record, 32)
    return max(entries, int(entries64)), max(cd_size, int(cd_size64))


#: The longest symlink target a zip entry may hold (Linux's PATH_MAX).
_ZIP_LINK_MAX_BYTES = 4096


def _zip_link_escapes(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """Whether a zip entry is a symlink (as ``unzip`` makes it) whose target escapes.

    A Unix zip stores a symlink as an entry whose mode says so and whose
    content is the target. A target that cannot be read (encrypted, an
    unknown compression) or is over-long counts as escaping.
    """
    if not stat.S_ISLNK(info.external_attr >> 16):
        return False
    if info.file_size > _ZIP_LINK_MAX_BYTES:
        return True
    try:
        with archive.open(info) as entry:
            target = entry.read(_ZIP_LINK_MAX_BYTES + 1)
    except Exception:  # noqa: BLE001 - whatever its codec raises (zlib.error...): unreadable
        return True
    return len(target) > _ZIP_LINK_MAX_BYTES or _escapes(target.decode("utf-8", "replace"))


def check_zip(
    f: BinaryIO, size: int, name: str, *, max_archive_bytes: int, max_archive_entries: int
) -> str:
    """Check a zip's directory; return its kind (zip or an Office type)."""
    end = _zip_end(f, size)
    if end is None:
        raise FileRejected(f"upload rejected: {name!r} is not a valid zip archive (no end record)")
    entries, cd_size = end
    # 1 KiB per entry is far above what real archives need (46 bytes plus the name).
    if entries > max_archive_entries or cd_size > max_archive_entries * 1024:
        raise FileRejected(
            f"upload rejected: {name!r} holds more than {max_archive_entries} entries "
            "(setting max_archive_entries)"
        )
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            if len(infos) > max_archive_entries:
                raise FileRejected(
                    f"upload rejected: {name!r} holds {len(infos)} entries, over the "
                    f"{max_archive_entries} allowed (setting max_archive_entries)"
                )
            for info in infos:
                if _escapes(info.filename) or _zip_link_escapes(archive, info):
                    raise FileRejected(
                        f"upload rejected: {name!r} contains {info.filename!r}, which would "
                        "unpack or link outside its folder; archives may only hold relative "
                        "paths without '..'"
                    )
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,  # an entry that needs a newer zip version than zipfile reads
    ) as exc:
        raise FileRejected(f"upload rejected: {name!r} is not a valid zip archive: {exc}") from None
    declared = sum(info.file_size for info in infos)
    if declared > max_archive_bytes:
        raise FileRejected(
            f"upload rejected: {name!r} unpacks to {human_size(declared)}, over the "
            f"{human_size(max_archive_bytes)} cap on archive contents (setting max_archive_bytes)"
        )
    return ooxml_kind(info.filename for info in infos) or "application/zip"


def check_tar(f: BinaryIO, name: str, *, max_archive_bytes: int, max_archive_entries: int) -> None:
    """Check a tar's members, without unpacking any."""
    f.seek(0)
    declared = 0
    count = 0
    try:
        with tarfile.open(fileobj=f, mode="r:") as archive:
            for member in archive:
                count += 1
                if count > max_archive_entries:
                    raise FileRejected(
                        f"upload rejected: {name!r} holds more than {max_archive_entries} "
                        "entries (setting max_archive_entries)"
                    )
                escaping = _escapes(member.name) or (
                    (member.issym() or member.islnk()) and _escapes(member.linkname)
                )
                if escaping:
                    raise FileRejected(
                        f"upload rejected: {name!r} contains {member.name!r}, which would "
                        "unpack or link outside its folder; archives may only hold relative "
                        "paths without '..'"
                    )
                declared += member.size
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise FileRejected(f"upload rejected: {name!r} is not a valid tar archive: {exc}") from None
    if declared > max_archive_bytes:
        raise FileRejected(
            f"upload rejected: {name!r} unpacks to {human_size(declared)}, over the "
            f"{human_size(max_archive_bytes)} cap on archive contents (setting max_archive_bytes)"
        )
