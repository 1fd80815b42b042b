"""Sniffing: the type of a content, from its bytes rather than its name.

Signatures of the supported binary types and of formats that must not pass
for them (executables, compressed data, databases...), the entries of a zip
(which tell an Office file from a plain archive), and the rule that tells text
from binary data.
"""

from __future__ import annotations

import builtins
import codecs
import io
import unicodedata
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Final

from sandkernel.files.mime import OOXML_PARTS

#: How much of a content sniffing looks at.
HEAD_BYTES: Final = 8192

# (offset, magic, type, strong). A weak signature is two or three printable
# bytes that ordinary text can start with, so it only counts for binary data.
_SIGNATURES: Final[tuple[tuple[int, bytes, str, bool], ...]] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png", True),
    (0, b"GIF87a", "image/gif", True),
    (0, b"GIF89a", "image/gif", True),
    (0, b"\xff\xd8\xff", "image/jpeg", True),
    (0, b"%PDF-", "application/pdf", True),
    (0, b"PK\x03\x04", "application/zip", True),
    (0, b"PK\x05\x06", "application/zip", True),  # an archive with no entries
    (0, b"PK\x07\x08", "application/zip", True),  # first part of a spanned archive
    (257, b"ustar", "application/x-tar", True),
    (0, b"\x7fELF", "application/x-executable", True),
    (0, b"\xcf\xfa\xed\xfe", "application/x-mach-binary", True),
    (0, b"\xca\xfe\xba\xbe", "application/java-vm", True),
    (0, b"\x1f\x8b", "application/gzip", True),
    (0, b"\xfd7zXZ\x00", "application/x-xz", True),
    (0, b"\x28\xb5\x2f\xfd", "application/zstd", True),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed", True),
    (0, b"Rar!\x1a\x07", "application/vnd.rar", True),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage", True),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3", True),
    (0, b"\x00asm", "application/wasm", True),
    (0, b"II*\x00", "image/tiff", True),
    (0, b"MM\x00*", "image/tiff", True),
    (0, b"\x89HDF\r\n\x1a\n", "application/x-hdf5", True),
    (0, b"\x93NUMPY", "application/x-npy", True),
    (0, b"OggS\x00", "application/ogg", True),
    (0, b"MZ", "application/vnd.microsoft.portable-executable", False),
    (0, b"BZh", "application/x-bzip2", False),
)
#: Every type a signature above identifies.
SIGNATURE_TYPES: Final = frozenset(mime for _, _, mime, _ in _SIGNATURES)

# Bytes that occur in text: printable ASCII, every byte >= 0x80 (UTF-8 or a
# legacy 8-bit encoding), and the controls text really uses (BEL, BS, TAB, LF,
# VT, FF, CR, ESC). Anything else, NUL above all, means binary; the same rule
# as file(1).
_TEXT_BYTES: Final = bytes([7, 8, 9, 10, 11, 12, 13, 27, *range(0x20, 0x7F), *range(0x80, 0x100)])
_BOMS: Final[tuple[tuple[bytes, str], ...]] = (
    # UTF-32 first: its little-endian BOM starts with UTF-16's.
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_TEXT_CONTROLS: Final = frozenset("\a\b\t\n\v\f\r\x1b")


def _bom_codec(head: bytes) -> str | None:
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return None


def looks_like_text(head: bytes) -> bool:
    """Whether a content's first bytes are text (see ``_TEXT_BYTES``)."""
    codec = _bom_codec(head)
    if codec is None:
        return not head.translate(None, _TEXT_BYTES)
    try:
        decoded = codecs.getincrementaldecoder(codec)("strict").decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return not any(unicodedata.category(c) == "Cc" and c not in _TEXT_CONTROLS for c in decoded)


def is_text(chunks: Iterable[bytes]) -> bool:
    """Whether a whole content, given in chunks, is text (see ``_TEXT_BYTES``)."""
    decoder: codecs.IncrementalDecoder | None = None
    first = True
    for chunk in chunks:
        if first:
            first = False
            codec = _bom_codec(chunk)
            if codec is not None:
                decoder = codecs.getincrementaldecoder(codec)("strict")
        if decoder is None:
            if chunk.translate(None, _TEXT_BYTES):
                return False
            continue
        try:
            decoded = decoder.decode(chunk)
        except UnicodeDecodeError:
            return False
        if any(unicodedata.category(c) == "Cc" and c not in _TEXT_CONTROLS for c in decoded):
            return False
    if decoder is not None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _is_tar_header(block: bytes) -> bool:
    """Whether a 512-byte block is a tar header (old v7 tars have no magic)."""
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    field = block[148:156].split(b"\x00", 1)[0].strip()
    try:
        declared = int(field, 8)
    except ValueError:
        return False
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:512])
    return declared == computed and block[0] != 0


def signature(head: bytes) -> str | None:
    """The type a content's first bytes carry the signature of, if any."""
    for offset, magic, mime, strong in _SIGNATURES:
        if head.startswith(magic, offset) and (strong or not looks_like_text(head)):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if _is_tar_header(head[:512]):
        return "application/x-tar"
    return None


def ooxml_kind(names: Iterable[str]) -> str | None:
    """The Office Open XML type of a zip with these entries, if it is one."""
    listed = set(names)
    if "[Content_Types].xml" not in listed:
        return None
    for mime, prefix in OOXML_PARTS.items():
        if any(n.startswith(prefix) for n in listed):
            return mime
    return None


def sniff_mime(head: bytes) -> str | None:
    """Guess a content's type from its first bytes.

    Recognises the binary types of :data:`~sandkernel.files.mime.MIME_TYPES` and common formats that
    should not pass for them (executables, compressed data, databases...). A zip
    is told apart from a ``.docx``/``.xlsx``/``.pptx`` by looking at its entries,
    which needs the whole content: given only a prefix, a zip is reported as
    ``application/zip``. Content that is text reports ``text/plain``; the
    program language of a text cannot be sniffed and is not guessed.

    Returns:
        A MIME type, or ``None`` for empty input or binary data it does not know.
    """
    if not head:
        return None
    found = signature(head)
    if found == "application/zip":
        names = _zip_entries(io.BytesIO(head))
        if names is not None:
            return ooxml_kind(names) or found
    if found is None and looks_like_text(head):
        return "text/plain"
    return found


def sniff_path(path: Path) -> str | None:
    """:func:`sniff_mime` of a file, whose zip entries can be read to tell Office files apart."""
    with builtins.open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        if signature(head) == "application/zip":
            names = _zip_entries(f)
            if names is not None:
                return ooxml_kind(names) or "application/zip"
    return sniff_mime(head)


def _zip_entries(source: BinaryIO) -> list[str] | None:
    """The entry names of the zip ``source`` holds; None if :mod:`zipfile` cannot list them.

    A zip is only a signature here, and the content anyone's: any error in
    parsing it (zipfile raises many: BadZipFile, NotImplementedError for a
    version it does not know, struct.error, OverflowError, ValueError...) means
    an archive this cannot look into, never a failure of the caller.
    """
    try:
        with zipfile.ZipFile(source) as archive:
            return archive.namelist()
    except Exception:  # noqa: BLE001 - see above: untrusted bytes, any parsing error
        return None
