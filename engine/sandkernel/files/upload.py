"""Upload checks: whether a file may enter a sandbox, under which name and type.

:func:`check_upload` checks the name (:func:`~sandkernel.files.names.safe_name`),
the extension (the table :data:`~sandkernel.files.mime.MIME_TYPES`), the size,
whether the content matches the extension (:mod:`~sandkernel.files.sniff`),
and for archives whether they are bombs or write outside the folder they
unpack in (:mod:`~sandkernel.files.archives`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import BinaryIO, Final

from sandkernel.errors import FileRejected, FileTooLarge
from sandkernel.files._common import CHUNK_BYTES, human_size, open_regular
from sandkernel.files.archives import check_tar, check_zip
from sandkernel.files.mime import MIME_TYPES, OOXML_PARTS, ZIP_FAMILY, extension, is_textual
from sandkernel.files.names import safe_name
from sandkernel.files.sniff import HEAD_BYTES, SIGNATURE_TYPES, is_text, looks_like_text, signature

#: Largest upload accepted: 512 MiB.
DEFAULT_MAX_UPLOAD_BYTES: Final = 512 * 1024 * 1024
#: Total uncompressed size an archive may declare: 1 GiB.
DEFAULT_MAX_ARCHIVE_BYTES: Final = 1024 * 1024 * 1024
#: Entries an archive may hold; bounds the memory spent reading its directory.
DEFAULT_MAX_ARCHIVE_ENTRIES: Final = 100_000


def _allowed_list(allowed: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(sorted(allowed))


def check_extension(name: str, allowed: Mapping[str, Sequence[str]]) -> str:
    """The name's extension if ``allowed`` lists it; otherwise a refusal naming what is."""
    ext = extension(name)
    if ext not in allowed:
        what = f"{ext}" if ext else f"{name!r} has no extension and"
        raise FileRejected(
            f"upload rejected: {what} is not a supported type; allowed: {_allowed_list(allowed)}"
        )
    return ext


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(CHUNK_BYTES):
        yield chunk


def _mismatch(name: str, ext: str, detected: str | None, size: int, must_be: str) -> FileRejected:
    if size == 0:
        return FileRejected(f"upload rejected: {name!r} is empty, which is not a valid {ext}")
    looks = detected or "binary data"
    return FileRejected(
        f"upload rejected: content looks like {looks}, not {ext}: a {ext} upload must be "
        f"{must_be}; rename the file to match its content"
    )


def _check_content(
    f: BinaryIO,
    size: int,
    name: str,
    ext: str,
    accepted: Sequence[str],
    *,
    max_archive_bytes: int,
    max_archive_entries: int,
) -> None:
    canonical = accepted[0]
    f.seek(0)
    head = f.read(HEAD_BYTES)
    if is_textual(canonical):
        if not is_text(_chunks(f)):
            raise _mismatch(
                name,
                ext,
                signature(head),
                size,
                "text (UTF-8, another text encoding, or UTF-16/32 with a BOM) "
                "without NUL or other control bytes",
            )
        return
    detected = signature(head)
    if detected is None and looks_like_text(head) and size:
        detected = "text/plain"
    if canonical in ZIP_FAMILY:
        if detected != "application/zip":
            raise _mismatch(name, ext, detected, size, "a zip archive")
        kind = check_zip(
            f,
            size,
            name,
            max_archive_bytes=max_archive_bytes,
            max_archive_entries=max_archive_entries,
        )
        # Every Office file is a zip, so a .zip may hold one; the reverse is a mismatch.
        if canonical != "application/zip" and kind not in accepted:
            parts = OOXML_PARTS[canonical]
            raise _mismatch(
                name,
                ext,
                kind,
                size,
                f"an Office Open XML file (a zip with [Content_Types].xml and {parts} parts)",
            )
        return
    if canonical == "application/x-tar":
        if detected != "application/x-tar":
            raise _mismatch(name, ext, detected, size, "a tar archive")
        check_tar(
            f, name, max_archive_bytes=max_archive_bytes, max_archive_entries=max_archive_entries
        )
        return
    if canonical in SIGNATURE_TYPES:
        if detected not in accepted:
            raise _mismatch(name, ext, detected, size, canonical)
        return
    # A type added by the caller that has no known signature: nothing to compare
    # against, so only refuse content that is recognisably something else.
    if detected is not None and detected != "text/plain" and detected not in accepted:
        raise _mismatch(name, ext, detected, size, canonical)


def check_upload(
    name: str,
    path_or_bytes: bytes | os.PathLike[str],
    *,
    allowed: Mapping[str, Sequence[str]] = MIME_TYPES,
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    max_archive_entries: int = DEFAULT_MAX_ARCHIVE_ENTRIES,
) -> tuple[str, str]:
    """Decide whether a file may be uploaded, and under which name and type.

    Checks, in this order: the name (:func:`safe_name`), the extension (must be
    a key of ``allowed``, case-insensitive), the size, and the content.
    Content must match the extension: text types must be text, binary types
    must carry their signature, ``.docx``/``.xlsx``/``.pptx`` must be zips
    with the matching Office parts, and archives (zip family, tar) must
    declare at most ``max_archive_bytes`` unpacked, at most
    ``max_archive_entries`` entries, and no absolute or ``..`` paths. Nested
    archives are not opened.

    Args:
        name: The name the client gave.
        path_or_bytes: The content, or the path of a regular file holding it
            (a symlink or anything else is refused).
        allowed: Extension -> accepted MIME types, canonical first.
        max_bytes: Largest accepted size.
        max_archive_bytes: Largest total unpacked size an archive may declare.
        max_archive_entries: Most entries an archive may hold.

    Returns:
        ``(safe_name, mime_type)`` with the canonical type of the extension.

    Raises:
        FileRejected: with a message that names the problem and what is allowed.
    """
    clean = safe_name(name)
    ext = check_extension(clean, allowed)
    f: BinaryIO
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        f = io.BytesIO(path_or_bytes)
        size = len(path_or_bytes)
    elif isinstance(path_or_bytes, os.PathLike):
        f = open_regular(path_or_bytes)
        size = os.fstat(f.fileno()).st_size
    else:
        raise TypeError(f"path_or_bytes must be bytes or a path, not {type(path_or_bytes)}")
    with f:
        if size > max_bytes:
            raise FileTooLarge(
                f"upload rejected: {clean!r} is {human_size(size)}, over the "
                f"{human_size(max_bytes)} size cap (setting max_bytes)"
            )
        _check_content(
            f,
            size,
            clean,
            ext,
            tuple(allowed[ext]),
            max_archive_bytes=max_archive_bytes,
            max_archive_entries=max_archive_entries,
        )
    return clean, allowed[ext][0]
