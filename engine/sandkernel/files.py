"""Files: upload checks, a durable content-addressed store, and workspace scans.

Three parts, none of which starts a kernel or a process:

* :func:`check_upload` decides whether a file may enter a sandbox: its name,
  its extension (the table :data:`MIME_TYPES`, the types a code interpreter
  accepts), its size, whether its content matches the extension, and for
  archives whether they are bombs or write outside the folder they unpack in.
* :class:`FileStore` keeps files across restarts: metadata in SQLite (WAL mode,
  every write in a transaction), content on disk under ``blobs/`` named by its
  SHA-256, so identical content is stored once.
* :func:`scan_workspace` finds the files a cell created or changed, walking the
  workspace without ever following a symlink, so that code in the sandbox cannot
  make the engine read a host file.

Names of uploads are reduced to their last path component (see
:func:`safe_name`); names seen in a workspace are kept byte-exact as ``str``
with surrogate escapes (see :func:`scan_workspace`), and a produced file is
listed under a printable form of its name that :func:`raw_file_name` turns
back into the exact bytes (see :func:`listed_file_name`).
"""

from __future__ import annotations

import builtins
import codecs
import errno
import functools
import hashlib
import io
import mimetypes
import os
import re
import secrets
import sqlite3
import stat
import struct
import sys
import tarfile
import tempfile
import threading
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import BinaryIO, Final, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field

from sandkernel.errors import FileError, FileNotFoundInStore, FileRejected

# --------------------------------------------------------------------------- types

_WORD: Final = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
_SHEET: Final = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_SLIDES: Final = "application/vnd.openxmlformats-officedocument.presentationml.presentation"

#: Extensions a code interpreter accepts, each with the MIME types it accepts for
#: it; the first one is the canonical type that :func:`check_upload` reports.
MIME_TYPES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        ".c": ("text/x-c",),
        ".cpp": ("text/x-c++",),
        ".csv": ("application/csv",),
        ".docx": (_WORD,),
        ".html": ("text/html",),
        ".java": ("text/x-java",),
        ".json": ("application/json",),
        ".md": ("text/markdown",),
        ".pdf": ("application/pdf",),
        ".php": ("text/x-php",),
        ".pptx": (_SLIDES,),
        ".py": ("text/x-python", "text/x-script.python"),
        ".rb": ("text/x-ruby",),
        ".tex": ("text/x-tex",),
        ".txt": ("text/plain",),
        ".css": ("text/css",),
        ".jpeg": ("image/jpeg",),
        ".jpg": ("image/jpeg",),
        ".js": ("text/javascript",),
        ".gif": ("image/gif",),
        ".png": ("image/png",),
        ".tar": ("application/x-tar",),
        ".ts": ("application/typescript",),
        ".xlsx": (_SHEET,),
        ".xml": ("application/xml", "text/xml"),
        ".zip": ("application/zip",),
    }
)

DEFAULT_MAX_UPLOAD_BYTES: Final = 512 * 1024 * 1024
#: Total uncompressed size an archive may declare: 1 GiB.
DEFAULT_MAX_ARCHIVE_BYTES: Final = 1024 * 1024 * 1024
#: Entries an archive may hold; bounds the memory spent reading its directory.
DEFAULT_MAX_ARCHIVE_ENTRIES: Final = 100_000

Origin = Literal["uploaded", "produced"]
Scope = Literal["session", "agent", "none"]
#: Relative path -> (size, mtime_ns, inode) of every regular file seen by a scan.
Snapshot = dict[str, tuple[int, int, int]]

_CHUNK: Final = 1024 * 1024
_HEAD: Final = 8192
_MAX_NAME_BYTES: Final = 255  # NAME_MAX on Linux: longer names cannot be created
_MAX_RAW_NAME_BYTES: Final = 4096  # PATH_MAX: a longer "name" is not a name
_STALE_TEMP_S: Final = 3600.0
_OCTET_STREAM: Final = "application/octet-stream"

_OOXML_PARTS: Final[Mapping[str, str]] = MappingProxyType(
    {_WORD: "word/", _SHEET: "xl/", _SLIDES: "ppt/"}
)
_ZIP_FAMILY: Final = frozenset({"application/zip", *_OOXML_PARTS})
_TEXTUAL_APPLICATION: Final = frozenset(
    {
        "application/csv",
        "application/json",
        "application/xml",
        "application/typescript",
        "application/javascript",
        "application/x-sh",
    }
)

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
_SIGNATURE_TYPES: Final = frozenset(mime for _, _, mime, _ in _SIGNATURES)

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


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


# --------------------------------------------------------------------------- names


def safe_name(name: str) -> str:
    """The name an upload is stored and shown under, or a refusal.

    Clients send names such as ``C:\\Users\\me\\data.csv`` or ``folder/data.csv``;
    only the last component names the file, so it is kept and the rest dropped.
    Both ``/`` and ``\\`` separate components. The reduction is deterministic
    and never keeps a ``..``: ``../x.csv``, ``/etc/x.csv`` and
    ``a/../../x.csv`` all become ``x.csv``.

    Raises:
        FileRejected: the name is empty or ends in a separator, ``.`` or ``..``
            (it names a directory); it contains NUL, a line break or another
            invisible character (a control, a bidi override...); it is not
            valid Unicode; or the file name is over 255 bytes in UTF-8 (the
            whole name over 4096).
    """
    if not name:
        raise FileRejected("upload rejected: the file name is empty; give the file a name")
    for char in name:
        if unicodedata.category(char) in _HIDDEN_CATEGORIES - {"Cs"}:  # Cs: not Unicode
            what = {"\x00": "a NUL byte", "\n": "a line break", "\r": "a line break"}.get(
                char, f"the invisible character U+{ord(char):04X}"
            )
            raise FileRejected(
                f"upload rejected: the file name {name!r} contains {what}; "
                "names may only contain printable characters"
            )
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise FileRejected(
            f"upload rejected: the file name {name!r} is not valid Unicode text"
        ) from None
    if len(raw) > _MAX_RAW_NAME_BYTES:
        raise FileRejected(
            f"upload rejected: the file name is {len(raw)} bytes long; "
            f"the limit is {_MAX_RAW_NAME_BYTES}"
        )
    base = re.split(r"[/\\]", name)[-1]
    if base in ("", ".", ".."):
        raise FileRejected(
            f"upload rejected: {name!r} names a directory, not a file; "
            "give a file name such as data.csv"
        )
    size = len(base.encode("utf-8"))
    if size > _MAX_NAME_BYTES:
        raise FileRejected(
            f"upload rejected: the file name is {size} bytes long in UTF-8; "
            f"names are limited to {_MAX_NAME_BYTES} bytes"
        )
    return base


#: Unicode categories of characters that do not show as themselves: controls,
#: format characters (bidi overrides, zero-width joiners), line and paragraph
#: separators, surrogates, private use and unassigned code points. Spaces
#: other than U+0020 (such as U+00A0) show as spaces and are kept.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})

_SHORT_ESCAPES: Final[Mapping[str, str]] = MappingProxyType(
    {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
)
_SHORT_UNESCAPES: Final[Mapping[str, str]] = MappingProxyType(
    {escape[1]: char for char, escape in _SHORT_ESCAPES.items()}
)
# os.fsdecode keeps a byte that is not UTF-8 as the lone surrogate U+DC80..U+DCFF
# (surrogateescape); any other lone surrogate comes from no file system.
_NOT_A_BYTE: Final = re.compile("([\ud800-\udc7f\udd00-\udfff])")
_LISTED_TOKEN: Final = re.compile(
    r"\\(?:[\\ntr]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})|\\|[^\\]+"
)


def _canonical(raw: str) -> str:
    r"""The string ``os.fsdecode`` gives for the bytes ``raw`` stands for.

    ``"\udcc3\udca9"`` and ``"é"`` are the same two bytes on disk; both become
    ``"é"``, so that one file has one listed name. Surrogates that stand for no
    byte are kept as they are (they cannot be encoded at all).
    """
    pieces = _NOT_A_BYTE.split(raw)  # odd indices: the surrogates that stand for no byte
    return "".join(
        piece if index % 2 else _decode_name(piece.encode("utf-8", "surrogateescape"))
        for index, piece in enumerate(pieces)
    )


def _decode_name(raw: bytes) -> str:
    # What os.fsdecode does on Linux, spelt out: the listed form is defined on
    # UTF-8, whatever the interpreter's file system encoding.
    return raw.decode("utf-8", "surrogateescape")


def _listed_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if unicodedata.category(char) in _HIDDEN_CATEGORIES:
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return char


def listed_file_name(raw: str | bytes) -> str:
    r"""The printable, reversible form in which a file's name or path is listed.

    Produced files (:attr:`StoredFile.name` and :attr:`StoredFile.path`,
    :class:`~sandkernel.results.ProducedFile`) are listed this way, because a
    name on disk may hold bytes and characters that cannot go into JSON or an
    HTTP header, or that show as something else (``report\u202etxt.exe``
    shows as ``reportexe.txt``):

    * a backslash is listed as ``\\``;
    * a line feed, a tab, a carriage return as ``\n``, ``\t``, ``\r``;
    * a byte that is not part of valid UTF-8 as ``\xNN`` (``NN`` from 80 to ff);
    * any other character that does not show (a control; a format character
      such as a bidi override; a line or paragraph separator; private use;
      unassigned) as ``\uXXXX``, or ``\UXXXXXXXX`` above U+FFFF;
    * anything else as itself.

    Hexadecimal digits are lowercase. Since the backslash is escaped too,
    different names are always listed differently, and :func:`raw_file_name`
    gives the name back byte for byte. A printable name without a backslash
    (every upload's name, see :func:`safe_name`) is listed as it is.

    Args:
        raw: The name or path as bytes, or as ``os.fsdecode`` gives it (bytes
            that are not UTF-8 as the surrogate escapes U+DC80..U+DCFF).

    Returns:
        Printable text, valid Unicode (no surrogates), ``/`` kept as it is.
    """
    text = _decode_name(raw) if isinstance(raw, bytes) else raw
    return "".join(_listed_char(char) for char in _canonical(text))


def _unescaped(listed: str) -> str:
    chars: builtins.list[str] = []
    for token in _LISTED_TOKEN.finditer(listed):  # the tokens cover the whole text
        text = token.group()
        if not text.startswith("\\"):
            chars.append(text)
        elif text == "\\":
            raise ValueError(
                f"{listed!r} is not a listed file name: the backslash at index {token.start()} "
                r"starts no escape (\\, \n, \t, \r, \xNN, \uXXXX, \UXXXXXXXX)"
            )
        elif text[1] in _SHORT_UNESCAPES:
            chars.append(_SHORT_UNESCAPES[text[1]])
        else:
            code = int(text[2:], 16)
            if text[1] == "x":
                chars.append(chr(0xDC00 + code if code >= 0x80 else code))
            elif code > sys.maxunicode:
                raise ValueError(f"{listed!r} is not a listed file name: {text} is past U+10FFFF")
            elif 0xD800 <= code <= 0xDFFF:
                raise ValueError(_lone_surrogate(listed, text))
            else:
                chars.append(chr(code))
    return "".join(chars)


def raw_file_name(listed: str) -> bytes:
    r"""The exact bytes on disk of a name or path listed by :func:`listed_file_name`.

    ``raw_file_name(listed_file_name(raw)) == os.fsencode(raw)`` for every name
    a file can have. Open ``raw_file_name(listed)`` as a bytes path, or use
    ``os.fsdecode(raw_file_name(listed))`` where a ``str`` is needed; both name
    the same file.

    Examples:
        ``sk new\nline.txt`` gives ``b"sk new\nline.txt"`` with a line feed,
        ``sk new\\nline.txt`` gives ``b"sk new\\nline.txt"`` with a backslash
        and an ``n``, and ``bad\xff.txt`` gives ``b"bad\xff.txt"``.

    Raises:
        ValueError: ``listed`` has a backslash that starts no escape, or
            escapes a character no name on disk can hold (a lone surrogate
            such as ``\ud800``).
    """
    text = _unescaped(listed)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:  # a lone surrogate given as itself, not escaped
        raise ValueError(_lone_surrogate(listed, listed_file_name(text[exc.start]))) from None


def _lone_surrogate(listed: str, escape: str) -> str:
    return f"{listed!r} names no file: {escape} is a lone surrogate, which no name can hold"


def _produced_name(name: str) -> str:
    base = listed_file_name(name.rsplit("/", 1)[-1])
    if base in ("", ".", ".."):
        raise FileRejected(
            f"file rejected: {listed_file_name(name)!r} names a directory, not a file"
        )
    return base


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _allowed_list(allowed: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(sorted(allowed))


def _check_extension(name: str, allowed: Mapping[str, Sequence[str]]) -> str:
    ext = _extension(name)
    if ext not in allowed:
        what = f"{ext}" if ext else f"{name!r} has no extension and"
        raise FileRejected(
            f"upload rejected: {what} is not a supported type; allowed: {_allowed_list(allowed)}"
        )
    return ext


def _human(size: int) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    value = float(size)
    index = 0
    while value >= 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    shown = f"{value:.1f}".removesuffix(".0")
    return f"{shown} {units[index]}"


# --------------------------------------------------------------------------- types of content


@functools.cache
def _stdlib_types() -> mimetypes.MimeTypes:
    # Python's built-in table only: /etc/mime.types differs between machines,
    # and a file's type must not depend on where the engine runs.
    return mimetypes.MimeTypes()


def mime_for_name(name: str) -> str | None:
    """The MIME type a file name's extension implies.

    :data:`MIME_TYPES` is consulted first (its canonical type wins), then
    Python's built-in table, which knows types such as ``.svg`` that can be
    produced but not uploaded. The system's ``mime.types`` is not read.

    Returns:
        The type, or ``None`` for an unknown or missing extension.
    """
    ext = _extension(name)
    if not ext:
        return None
    if ext in MIME_TYPES:
        return MIME_TYPES[ext][0]
    return _stdlib_types().guess_type("file" + ext, strict=False)[0]


def _bom_codec(head: bytes) -> str | None:
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return None


def _looks_like_text(head: bytes) -> bool:
    codec = _bom_codec(head)
    if codec is None:
        return not head.translate(None, _TEXT_BYTES)
    try:
        decoded = codecs.getincrementaldecoder(codec)("strict").decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return not any(unicodedata.category(c) == "Cc" and c not in _TEXT_CONTROLS for c in decoded)


def _is_text(chunks: Iterable[bytes]) -> bool:
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


def _signature(head: bytes) -> str | None:
    for offset, magic, mime, strong in _SIGNATURES:
        if head.startswith(magic, offset) and (strong or not _looks_like_text(head)):
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


def _ooxml_kind(names: Iterable[str]) -> str | None:
    listed = set(names)
    if "[Content_Types].xml" not in listed:
        return None
    for mime, prefix in _OOXML_PARTS.items():
        if any(n.startswith(prefix) for n in listed):
            return mime
    return None


def sniff_mime(head: bytes) -> str | None:
    """Guess a content's type from its first bytes.

    Recognises the binary types of :data:`MIME_TYPES` and common formats that
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
    found = _signature(head)
    if found == "application/zip":
        with suppress(zipfile.BadZipFile, OSError, EOFError, ValueError):
            with zipfile.ZipFile(io.BytesIO(head)) as archive:
                return _ooxml_kind(archive.namelist()) or found
    if found is None and _looks_like_text(head):
        return "text/plain"
    return found


def _is_textual(mime: str) -> bool:
    return (
        mime.startswith("text/") or mime in _TEXTUAL_APPLICATION or mime.endswith(("+xml", "+json"))
    )


# --------------------------------------------------------------------------- archives


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
    if entries != 0xFFFF and cd_size != 0xFFFFFFFF:
        return entries, cd_size
    locator_at = size - tail_len + pos - 20
    if locator_at < 0:
        return None
    f.seek(locator_at)
    locator = f.read(20)
    if len(locator) < 20 or locator[:4] != b"PK\x06\x07":
        return None
    (record_at,) = struct.unpack_from("<Q", locator, 8)
    f.seek(record_at)
    record = f.read(56)
    if len(record) < 56 or record[:4] != b"PK\x06\x06":
        return None
    entries64, cd_size64 = struct.unpack_from("<QQ", record, 32)
    return int(entries64), int(cd_size64)


def _check_zip(
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
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise FileRejected(f"upload rejected: {name!r} is not a valid zip archive: {exc}") from None
    if len(infos) > max_archive_entries:
        raise FileRejected(
            f"upload rejected: {name!r} holds {len(infos)} entries, over the "
            f"{max_archive_entries} allowed (setting max_archive_entries)"
        )
    for info in infos:
        if _escapes(info.filename):
            raise FileRejected(
                f"upload rejected: {name!r} contains the path {info.filename!r}, which "
                "would unpack outside its folder; archives may only hold relative paths "
                "without '..'"
            )
    declared = sum(info.file_size for info in infos)
    if declared > max_archive_bytes:
        raise FileRejected(
            f"upload rejected: {name!r} unpacks to {_human(declared)}, over the "
            f"{_human(max_archive_bytes)} cap on archive contents (setting max_archive_bytes)"
        )
    return _ooxml_kind(info.filename for info in infos) or "application/zip"


def _check_tar(f: BinaryIO, name: str, *, max_archive_bytes: int, max_archive_entries: int) -> None:
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
            f"upload rejected: {name!r} unpacks to {_human(declared)}, over the "
            f"{_human(max_archive_bytes)} cap on archive contents (setting max_archive_bytes)"
        )


# --------------------------------------------------------------------------- upload check


def _open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> BinaryIO:
    """Open a regular file for reading without following a final symlink.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a
    writer; ``fstat`` on the open descriptor then refuses anything that is not
    a regular file, with no window between the check and the use.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise FileRejected(f"cannot read {os.fsdecode(path)!r}: {why}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FileRejected(
            f"cannot read {os.fsdecode(path)!r}: it is a {_kind(mode)}, not a regular file"
        )
    return os.fdopen(fd, "rb")


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(_CHUNK):
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
    head = f.read(_HEAD)
    if _is_textual(canonical):
        if not _is_text(_chunks(f)):
            raise _mismatch(
                name,
                ext,
                _signature(head),
                size,
                "text (UTF-8, another text encoding, or UTF-16/32 with a BOM) "
                "without NUL or other control bytes",
            )
        return
    detected = _signature(head)
    if detected is None and _looks_like_text(head) and size:
        detected = "text/plain"
    if canonical in _ZIP_FAMILY:
        if detected != "application/zip":
            raise _mismatch(name, ext, detected, size, "a zip archive")
        kind = _check_zip(
            f,
            size,
            name,
            max_archive_bytes=max_archive_bytes,
            max_archive_entries=max_archive_entries,
        )
        # Every Office file is a zip, so a .zip may hold one; the reverse is a mismatch.
        if canonical != "application/zip" and kind not in accepted:
            parts = _OOXML_PARTS[canonical]
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
        _check_tar(
            f, name, max_archive_bytes=max_archive_bytes, max_archive_entries=max_archive_entries
        )
        return
    if canonical in _SIGNATURE_TYPES:
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
    ext = _check_extension(clean, allowed)
    f: BinaryIO
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        f = io.BytesIO(path_or_bytes)
        size = len(path_or_bytes)
    elif isinstance(path_or_bytes, os.PathLike):
        f = _open_regular(path_or_bytes)
        size = os.fstat(f.fileno()).st_size
    else:
        raise TypeError(f"path_or_bytes must be bytes or a path, not {type(path_or_bytes)}")
    with f:
        if size > max_bytes:
            raise FileRejected(
                f"upload rejected: {clean!r} is {_human(size)}, over the "
                f"{_human(max_bytes)} size cap (setting max_bytes)"
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


# --------------------------------------------------------------------------- the store


# The field's description, which the daemon's OpenAPI schema shows to clients.
_NAME_DESCRIPTION: Final = (
    "The file name, without directories. An upload's is the last component of the "
    "name it was given (printable UTF-8 without a backslash, so it needs no escape). "
    "A produced file's name on disk is "
    r"escaped so that it is printable, unique and reversible: a backslash becomes `\\`, "
    r"a line feed `\n`, a tab `\t`, a carriage return `\r`, a byte that is not valid "
    r"UTF-8 `\xNN` (80 to ff), any other character that does not show (control, "
    "format character such as a bidi override, line or paragraph separator, private "
    r"use, unassigned) `\uXXXX`, or `\UXXXXXXXX` above U+FFFF; everything else is "
    "itself, and hexadecimal digits are lowercase. Undoing the escapes gives the exact "
    "bytes on disk (in Python: sandkernel.raw_file_name(name))."
)


class StoredFile(BaseModel):
    """A file kept by a :class:`FileStore`.

    Ownership is two optional ids rather than one field, so the engine can list
    both "files of session S" and "files of agent A": an upload starts with
    neither and is attached later (:meth:`FileStore.attach`); a produced file is
    stored with the session (and agent) it came from. A file belongs to at most
    one session and one agent; to give the same content to another owner, add
    it again (the content is stored once).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^file-[0-9a-f]{24}$", description="unguessable (96 random bits)")
    name: str = Field(description=_NAME_DESCRIPTION)
    mime_type: str = Field(pattern=r"^[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*$")
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: float = Field(description="unix time")
    origin: Origin
    session_id: str | None = None
    execution_count: int | None = Field(default=None, description="the cell that produced it")
    path: str | None = Field(
        default=None,
        description="where a produced file was in the sandbox, escaped as `name` is",
    )
    agent_id: str | None = None
    expires_at: float | None = Field(default=None, description="unix time; None keeps it")

    @property
    def scope(self) -> Scope:
        """Who may see the file: one session, every session of an agent, or no one yet."""
        if self.session_id is not None:
            return "session"
        if self.agent_id is not None:
            return "agent"
        return "none"


_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('uploaded', 'produced')),
    session_id TEXT,
    execution_count INTEGER,
    path TEXT,
    agent_id TEXT,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS files_by_session ON files (session_id);
CREATE INDEX IF NOT EXISTS files_by_agent ON files (agent_id);
CREATE INDEX IF NOT EXISTS files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
"""
_INSERT: Final = """
INSERT INTO files (
    id, name, mime_type, size_bytes, sha256, created_at, origin,
    session_id, execution_count, path, agent_id, expires_at
) VALUES (
    :id, :name, :mime_type, :size_bytes, :sha256, :created_at, :origin,
    :session_id, :execution_count, :path, :agent_id, :expires_at
)
"""
_ID_PATTERN: Final = re.compile(r"file-[0-9a-f]{24}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def _record(row: sqlite3.Row) -> StoredFile:
    # extra="forbid" turns a column the model does not know into a loud error.
    return StoredFile(**{key: row[key] for key in row.keys()})


def _make_private_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new entry in the directory survive a power loss.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Files kept on disk across restarts, addressed by unguessable ids.

    Layout under ``root`` (directories 0700, files 0600)::

        files.sqlite3            metadata, WAL mode
        blobs/ab/abcdef...       content, named by its SHA-256; stored once
        tmp/                     content being received (same file system)

    Content is written to ``tmp/``, fsynced, then renamed into ``blobs/``,
    so a blob is either complete or absent. A row is inserted only after its
    blob is in place, and blobs are created and removed only while holding
    SQLite's write lock, so several processes may share one root.

    Thread safety: one SQLite connection serves every thread, guarded by a
    lock held only for database work; receiving, hashing and checking content
    happen outside it, so concurrent adds overlap their I/O. The methods are
    blocking; async code calls them in a worker thread.

    Uploads (``origin="uploaded"``) pass :func:`check_upload`; produced files
    are stored whatever their type, with their name made printable.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        allowed: Mapping[str, Sequence[str]] = MIME_TYPES,
        max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
        max_archive_entries: int = DEFAULT_MAX_ARCHIVE_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the store at ``root``.

        Args:
            root: Directory of the store; created with mode 0700 if missing.
            allowed: Upload types, as for :func:`check_upload`.
            max_bytes: Largest file accepted, uploaded or produced.
            max_archive_bytes: See :func:`check_upload`.
            max_archive_entries: See :func:`check_upload`.
            clock: Unix time; decides expiry and ``created_at``.

        Raises:
            FileError: the database cannot be opened or is from a newer version.
        """
        self.root = Path(root)
        self._allowed = allowed
        self._max_bytes = max_bytes
        self._max_archive_bytes = max_archive_bytes
        self._max_archive_entries = max_archive_entries
        self._clock = clock
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._closed = False
        self.root.parent.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self._blobs, self._tmp):
            _make_private_dir(directory)
        db = self.root / "files.sqlite3"
        # Created here with 0600 so SQLite, which gives its -wal and -shm files
        # the database's mode, never makes a readable copy of the metadata.
        fd = os.open(db, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self._conn = sqlite3.connect(
            db, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed id survives a power loss, as its blob does.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("BEGIN IMMEDIATE")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise FileError(
                    f"the file store at {str(self.root)!r} was written by a newer sandkernel "
                    f"(schema {version}); upgrade sandkernel to open it"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._conn.close()
            raise FileError(f"cannot open the file store at {str(self.root)!r}: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    # ----------------------------------------------------------------- plumbing

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; later calls raise :class:`FileError`. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def _ensure_open(self) -> None:
        if self._closed:
            raise FileError(f"the file store at {str(self.root)!r} is closed")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._ensure_open()
            yield self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes SQLite's write lock up front; blob renames and unlinks
        # done inside are thereby ordered with other processes' row changes.
        with self._lock:
            self._ensure_open()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _blob_for(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def _row(self, conn: sqlite3.Connection, file_id: str) -> StoredFile | None:
        if not _ID_PATTERN.fullmatch(file_id):
            return None
        row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else _record(row)

    # ----------------------------------------------------------------- adding

    def add_bytes(
        self,
        data: bytes,
        name: str,
        *,
        origin: Origin = "uploaded",
        session_id: str | None = None,
        execution_count: int | None = None,
        path: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
        mime: str | None = None,
    ) -> StoredFile:
        """Store ``data`` under ``name``. See :meth:`add_stream` for the arguments."""
        return self.add_stream(
            io.BytesIO(data),
            name,
            origin=origin,
            session_id=session_id,
            execution_count=execution_count,
            path=path,
            agent_id=agent_id,
            retention_s=retention_s,
            mime=mime,
        )

    def add_file(
        self,
        source: str | os.PathLike[str],
        name: str | None = None,
        /,
        *,
        origin: Origin = "uploaded",
        session_id: str | None = None,
        execution_count: int | None = None,
        path: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
        mime: str | None = None,
    ) -> StoredFile:
        """Store the regular file at ``source``, streaming it (never all in memory).

        A symlink at ``source`` is refused, not followed. To take a file out of
        a workspace the sandbox can write, prefer :func:`open_workspace_file`
        with :meth:`add_stream`, which follows no symlink on the whole path.
        ``name`` defaults to the last component of ``source``. See
        :meth:`add_stream` for the other arguments.
        """
        if name is None:
            name = os.fsdecode(os.path.basename(os.fspath(source)))
        with _open_regular(source) as f:
            return self.add_stream(
                f,
                name,
                origin=origin,
                session_id=session_id,
                execution_count=execution_count,
                path=path,
                agent_id=agent_id,
                retention_s=retention_s,
                mime=mime,
            )

    def add_stream(
        self,
        fileobj: _Readable,
        name: str,
        *,
        origin: Origin = "uploaded",
        session_id: str | None = None,
        execution_count: int | None = None,
        path: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
        mime: str | None = None,
    ) -> StoredFile:
        """Store what ``fileobj.read()`` returns until it is exhausted.

        Args:
            fileobj: Anything with ``read(size) -> bytes``; read in 1 MiB chunks.
            name: The file's name. An upload's is checked by :func:`safe_name`;
                a produced file's is reduced to its last component and listed
                as :func:`listed_file_name` gives it.
            origin: ``"uploaded"`` (checked by :func:`check_upload`) or
                ``"produced"`` (stored as is).
            session_id: The owning session, if any.
            execution_count: For a produced file, the cell that made it.
            path: For a produced file, where it was in the sandbox (listed as
                :func:`listed_file_name` gives it).
            agent_id: The owning agent, if any.
            retention_s: Seconds to keep the file; ``None`` keeps it until deleted.
            mime: The type the client declared. For an upload it is kept only if
                :data:`MIME_TYPES` lists it for the extension (otherwise the
                canonical type is stored); for a produced file it is used as
                given, else guessed from the name, then the content.

        Returns:
            The stored file's metadata, with a new id.

        Raises:
            FileRejected: the name, type, size or content is refused.
        """
        if retention_s is not None and retention_s < 0:
            raise ValueError(f"retention_s must be >= 0, not {retention_s}")
        if origin == "uploaded":
            clean = safe_name(name)
            _check_extension(clean, self._allowed)  # before receiving anything
        else:
            clean = _produced_name(name)
        tmp, sha256, size = self._receive(fileobj, clean, origin)
        try:
            if origin == "uploaded":
                _, canonical = check_upload(
                    clean,
                    tmp,
                    allowed=self._allowed,
                    max_bytes=self._max_bytes,
                    max_archive_bytes=self._max_archive_bytes,
                    max_archive_entries=self._max_archive_entries,
                )
                accepted = self._allowed[_extension(clean)]
                mime_type = mime if mime is not None and mime in accepted else canonical
            else:
                mime_type = mime or mime_for_name(clean) or _sniff_path(tmp) or _OCTET_STREAM
            now = self._clock()
            record = StoredFile(
                id=f"file-{secrets.token_hex(12)}",
                name=clean,
                mime_type=mime_type,
                size_bytes=size,
                sha256=sha256,
                created_at=now,
                origin=origin,
                session_id=session_id,
                execution_count=execution_count,
                path=None if path is None else listed_file_name(path),
                agent_id=agent_id,
                expires_at=None if retention_s is None else now + retention_s,
            )
            with self._write() as conn:
                self._place_blob(tmp, sha256)
                conn.execute(_INSERT, record.model_dump())
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()
        return record

    def _receive(self, fileobj: _Readable, name: str, origin: Origin) -> tuple[Path, str, int]:
        """Copy a stream into ``tmp/``, hashing it and enforcing the size cap."""
        self._ensure_open()
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="incoming-")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := fileobj.read(_CHUNK):
                    size += len(chunk)
                    if size > self._max_bytes:
                        verb = "upload" if origin == "uploaded" else "file"
                        raise FileRejected(
                            f"{verb} rejected: {name!r} is larger than the "
                            f"{_human(self._max_bytes)} size cap (setting max_bytes)"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def _place_blob(self, tmp: Path, sha256: str) -> None:
        # Called with the write lock held (see _write).
        blob = self._blob_for(sha256)
        _make_private_dir(blob.parent)
        if blob.exists():
            return  # same content already stored; the caller removes tmp
        os.replace(tmp, blob)
        _fsync_dir(blob.parent)

    # ----------------------------------------------------------------- reading

    def get(self, file_id: str) -> StoredFile:
        """The metadata of a file.

        Raises:
            FileNotFoundInStore: no such id, or the file has expired.
        """
        with self._read() as conn:
            record = self._row(conn, file_id)
        if record is None:
            raise FileNotFoundInStore(
                f"no file with id {file_id!r}: it was never stored here or has been deleted"
            )
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise FileNotFoundInStore(
                f"file {file_id!r} expired at {record.expires_at:.0f} (unix time)"
            )
        return record

    def blob_path(self, file_id: str) -> Path:
        """Where a file's content is on disk, to copy it into a workspace.

        The file is shared by every id with the same content: copy it, never
        modify or move it.

        Raises:
            FileNotFoundInStore: no such id, expired, or its content is missing.
        """
        record = self.get(file_id)
        blob = self._blob_for(record.sha256)
        if not blob.is_file():
            raise FileNotFoundInStore(
                f"the content of {file_id!r} is missing from {str(blob)!r}: the store was "
                "changed by something other than sandkernel"
            )
        return blob

    def open(self, file_id: str) -> BinaryIO:
        """A binary stream of a file's content; the caller closes it."""
        return builtins.open(self.blob_path(file_id), "rb")

    def read_bytes(self, file_id: str) -> bytes:
        """A file's whole content."""
        with self.open(file_id) as f:
            return f.read()

    def list(
        self,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        origin: Origin | None = None,
    ) -> builtins.list[StoredFile]:
        """Files that are not expired, oldest first, filtered by every given argument."""
        query = """
            SELECT * FROM files
            WHERE (expires_at IS NULL OR expires_at > :now)
              AND (:session_id IS NULL OR session_id = :session_id)
              AND (:agent_id IS NULL OR agent_id = :agent_id)
              AND (:origin IS NULL OR origin = :origin)
            ORDER BY created_at, id
        """
        params = {
            "now": self._clock(),
            "session_id": session_id,
            "agent_id": agent_id,
            "origin": origin,
        }
        with self._read() as conn:
            rows = conn.execute(query, params).fetchall()
        return [_record(row) for row in rows]

    def stored_bytes(self, *, session_id: str, origin: Origin | None = None) -> int:
        """Total size of a session's files that are not expired (of one origin, if given)."""
        query = """
            SELECT coalesce(sum(size_bytes), 0) FROM files
            WHERE session_id = :session_id
              AND (expires_at IS NULL OR expires_at > :now)
              AND (:origin IS NULL OR origin = :origin)
        """
        params = {"session_id": session_id, "now": self._clock(), "origin": origin}
        with self._read() as conn:
            (total,) = conn.execute(query, params).fetchone()
        return int(total)

    # ----------------------------------------------------------------- changing

    def attach(
        self, file_id: str, *, session_id: str | None = None, agent_id: str | None = None
    ) -> StoredFile:
        """Give a file to a session and/or an agent; ``None`` leaves that owner as is.

        Raises:
            FileNotFoundInStore: no such id, or the file has expired.
        """
        self.get(file_id)
        with self._write() as conn:
            conn.execute(
                "UPDATE files SET session_id = coalesce(?, session_id),"
                " agent_id = coalesce(?, agent_id) WHERE id = ?",
                (session_id, agent_id, file_id),
            )
        return self.get(file_id)

    def set_expiry(self, file_id: str, expires_at: float | None) -> StoredFile:
        """Set when a file expires (unix time), or keep it (``None``).

        Raises:
            FileNotFoundInStore: no such id, or the file has already expired.
        """
        self.get(file_id)
        with self._write() as conn:
            conn.execute("UPDATE files SET expires_at = ? WHERE id = ?", (expires_at, file_id))
        return self.get(file_id)

    def delete(self, file_id: str) -> None:
        """Delete a file; its content goes when no other id shares it.

        Raises:
            FileNotFoundInStore: no such id (an expired file can still be deleted).
        """
        with self._write() as conn:
            record = self._row(conn, file_id)
            if record is None:
                raise FileNotFoundInStore(
                    f"no file with id {file_id!r}: it was never stored here or has been deleted"
                )
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        # The row is committed away first: a crash now leaves an orphan blob,
        # which purge_expired removes, never a row without its blob.
        self._drop_unreferenced({record.sha256})

    def _drop_unreferenced(self, hashes: Iterable[str]) -> None:
        with self._write() as conn:
            for sha256 in hashes:
                if conn.execute("SELECT 1 FROM files WHERE sha256 = ?", (sha256,)).fetchone():
                    continue
                with suppress(FileNotFoundError):
                    self._blob_for(sha256).unlink()

    def purge_expired(self, now: float) -> int:
        """Delete files expired at ``now`` and content no file refers to.

        Also removes blobs left behind by a crash between a delete and its
        blob removal, and partial uploads in ``tmp/`` older than an hour.

        Args:
            now: Unix time.

        Returns:
            How many files were deleted.
        """
        with self._write() as conn:
            expired = conn.execute(
                "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).fetchall()
            conn.execute(
                "DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            )
        with self._write() as conn:
            referenced = {row[0] for row in conn.execute("SELECT DISTINCT sha256 FROM files")}
            with os.scandir(self._blobs) as subdirs:
                fanout = [sub.path for sub in subdirs if sub.is_dir(follow_symlinks=False)]
            for sub in fanout:
                with os.scandir(sub) as blobs:
                    orphans = [
                        blob.path
                        for blob in blobs
                        if _HEX64.fullmatch(blob.name) and blob.name not in referenced
                    ]
                for orphan in orphans:
                    with suppress(FileNotFoundError):
                        os.unlink(orphan)
        with os.scandir(self._tmp) as partials:
            for partial in partials:
                # An add finishing meanwhile renames its file away: not an error.
                with suppress(FileNotFoundError):
                    if partial.stat(follow_symlinks=False).st_mtime < now - _STALE_TEMP_S:
                        os.unlink(partial.path)
        return len(expired)


def _sniff_path(path: Path) -> str | None:
    with builtins.open(path, "rb") as f:
        head = f.read(_HEAD)
    if _signature(head) == "application/zip":
        with suppress(zipfile.BadZipFile, OSError, EOFError, ValueError):
            with zipfile.ZipFile(path) as archive:
                return _ooxml_kind(archive.namelist()) or "application/zip"
    return sniff_mime(head)


# --------------------------------------------------------------------------- workspaces


@dataclass(frozen=True, slots=True)
class ScannedFile:
    """A regular file a scan found new or changed, with the hash of what it read."""

    path: str
    size_bytes: int
    mtime_ns: int
    inode: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What :func:`scan_workspace` found.

    Attributes:
        changed: New or changed regular files, in walk order (names sorted).
        snapshot: Every regular file seen; pass it as ``since`` next time.
        removed: Paths of the previous snapshot that are gone.
        skipped: ``(path, reason)`` for what was not collected: symlinks,
            FIFOs, sockets, devices, unreadable files, files that changed while
            being read, and files left out by a cap.
        truncated: A cap left something out.
        truncated_reason: Which cap, and the setting that raises it.
    """

    changed: list[ScannedFile]
    snapshot: Snapshot
    removed: list[str]
    skipped: list[tuple[str, str]]
    truncated: bool
    truncated_reason: str | None


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _hash_regular(dir_fd: int, name: str, seen: os.stat_result) -> tuple[str, int] | str:
    """Hash a file found by the walk, or say why not.

    Returns:
        ``(sha256, bytes read)``, or the reason it was skipped.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return "vanished before it was read"
    except OSError as exc:
        return (
            "replaced by a symlink" if exc.errno == errno.ELOOP else f"unreadable: {exc.strerror}"
        )
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return f"replaced by a {_kind(before.st_mode)}"
        if (before.st_dev, before.st_ino) != (seen.st_dev, seen.st_ino):
            return "replaced while being scanned"
        digest = hashlib.sha256()
        got = 0
        # One byte more than expected, so that growth is seen without reading on.
        left = before.st_size + 1
        while left > 0:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            left -= len(chunk)
        after = os.fstat(fd)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    finally:
        os.close(fd)
    if after.st_nlink == 0:
        return "vanished while being read"
    stamp = (before.st_size, before.st_mtime_ns)
    if (
        got != before.st_size
        or (seen.st_size, seen.st_mtime_ns) != stamp
        or (after.st_size, after.st_mtime_ns) != stamp
    ):
        return "changed while being read"
    return digest.hexdigest(), got


class _Walk:
    def __init__(
        self,
        previous: Mapping[str, tuple[int, int, int]],
        *,
        max_files: int,
        max_bytes: int,
        max_depth: int,
        max_entries: int,
    ) -> None:
        self.previous = previous
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.max_entries = max_entries
        self.changed: list[ScannedFile] = []
        self.snapshot: Snapshot = {}
        self.skipped: list[tuple[str, str]] = []
        self.reasons: list[str] = []
        self.total_bytes = 0
        self.entries = 0
        self.stopped = False

    def cap(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def directory(self, dir_fd: int, prefix: str, depth: int) -> None:
        try:
            with os.scandir(dir_fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.skipped.append((prefix or ".", f"unreadable directory: {exc.strerror}"))
            return
        for entry in entries:
            if self.entries >= self.max_entries:
                self.cap(f"more than {self.max_entries} entries in the workspace (max_entries)")
                self.stopped = True
            if self.stopped:
                return
            self.entries += 1
            rel = prefix + entry.name
            try:
                seen = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(seen.st_mode):
                self.subdirectory(dir_fd, entry.name, rel, depth)
            elif stat.S_ISREG(seen.st_mode):
                self.file(dir_fd, entry.name, rel, seen)
            else:
                self.skipped.append((rel, _kind(seen.st_mode)))

    def subdirectory(self, dir_fd: int, name: str, rel: str, depth: int) -> None:
        if depth >= self.max_depth:
            self.skipped.append((rel + "/", "nested too deep"))
            self.cap(f"directories nested deeper than {self.max_depth} levels (max_depth)")
            return
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            why = "replaced by a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else None
            self.skipped.append((rel + "/", why or f"unreadable directory: {exc.strerror}"))
            return
        try:
            self.directory(child, rel + "/", depth + 1)
        finally:
            os.close(child)

    def file(self, dir_fd: int, name: str, rel: str, seen: os.stat_result) -> None:
        key = (seen.st_size, seen.st_mtime_ns, seen.st_ino)
        if self.previous.get(rel) == key:
            self.snapshot[rel] = key
            return
        # A file left out by a cap still enters the snapshot: it is reported as
        # truncated once, not re-read after every cell.
        if len(self.changed) >= self.max_files:
            self.snapshot[rel] = key
            self.skipped.append((rel, "over the max_files cap"))
            self.cap(f"more than {self.max_files} new or changed files (max_files)")
            return
        if self.total_bytes + seen.st_size > self.max_bytes:
            self.snapshot[rel] = key
            self.skipped.append((rel, "over the max_bytes cap"))
            self.cap(f"new or changed files total more than {_human(self.max_bytes)} (max_bytes)")
            return
        outcome = _hash_regular(dir_fd, name, seen)
        if isinstance(outcome, str):
            self.skipped.append((rel, outcome))
            # Keep the old entry (if any) so the next scan looks at the file again.
            if rel in self.previous:
                self.snapshot[rel] = self.previous[rel]
            return
        digest, size = outcome
        self.snapshot[rel] = key
        self.total_bytes += size
        self.changed.append(ScannedFile(rel, size, seen.st_mtime_ns, seen.st_ino, digest))


def scan_workspace(
    root: str | os.PathLike[str],
    *,
    since: Mapping[str, tuple[int, int, int]] | None,
    max_files: int,
    max_bytes: int,
    max_depth: int = 64,
    max_entries: int = 100_000,
) -> ScanResult:
    """Find the regular files under ``root`` that are new or changed since a snapshot.

    The walk never follows a symlink: directories are opened relative to their
    parent's descriptor with ``O_NOFOLLOW``, so a directory swapped for a link
    mid-walk is refused, and symlinks, FIFOs, sockets and devices are skipped
    without being opened. A file is read through a descriptor opened with
    ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` to be the regular
    file the walk saw; one that vanishes or changes while read is skipped and
    looked at again next time.

    Paths are relative, ``/``-separated ``str``; bytes that are not UTF-8 are
    kept as surrogate escapes (``os.fsdecode``), so ``os.fsencode(path)`` gives
    the exact name back. Such strings cannot be encoded as UTF-8: show them
    through :func:`listed_file_name` (as :class:`FileStore` does for produced
    files).

    A file counts as changed when its size, ``mtime_ns`` or inode differs from
    ``since``.

    Args:
        root: The workspace directory (itself not a symlink).
        since: The previous scan's ``snapshot``, or ``None`` for the first scan.
        max_files: Most new or changed files to collect.
        max_bytes: Most bytes of new or changed files to collect, in total.
        max_depth: Deepest directory nesting walked.
        max_entries: Most directory entries looked at.

    Returns:
        The changed files, the new snapshot, and whether a cap left files out.

    Raises:
        FileError: ``root`` is not a directory that can be opened.
    """
    walk = _Walk(
        since or {},
        max_files=max_files,
        max_bytes=max_bytes,
        max_depth=max_depth,
        max_entries=max_entries,
    )
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise FileError(
            f"cannot scan the workspace {os.fsdecode(root)!r}: {exc.strerror}"
        ) from None
    try:
        walk.directory(root_fd, "", 0)
    finally:
        os.close(root_fd)
    removed = [rel for rel in (since or {}) if rel not in walk.snapshot]
    return ScanResult(
        changed=walk.changed,
        snapshot=walk.snapshot,
        removed=removed,
        skipped=walk.skipped,
        truncated=bool(walk.reasons),
        truncated_reason="; ".join(walk.reasons) or None,
    )


def open_workspace_file(root: str | os.PathLike[str], rel_path: str) -> BinaryIO:
    """Open a file under ``root`` without following any symlink on the way.

    Each directory of ``rel_path`` is opened relative to the previous one with
    ``O_NOFOLLOW``, so code in the sandbox cannot redirect the engine to a host
    file by swapping a directory or the file for a link.

    Args:
        root: The workspace directory.
        rel_path: A path from :func:`scan_workspace` (``/``-separated, relative).

    Raises:
        FileRejected: the path is absolute or has ``..``, a component is a
            symlink, or the file is not a regular file.
    """
    parts = rel_path.split("/")
    if rel_path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FileRejected(
            f"cannot read {listed_file_name(rel_path)!r}: give a relative path without '.' or '..'"
        )
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise FileRejected(
            f"cannot open the workspace {os.fsdecode(root)!r}: {exc.strerror}"
        ) from None
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                why = "it is a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else None
                raise FileRejected(
                    f"cannot read {listed_file_name(rel_path)!r}: {listed_file_name(part)!r}: "
                    f"{why or exc.strerror}"
                ) from None
            os.close(fd)
            fd = child
        return _open_regular(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)
