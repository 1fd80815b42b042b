"""File names: what an upload is called, and how a produced file's name is listed.

* :func:`safe_name` reduces a client's name to its last component and refuses
  names that hide what they are (invisible characters, no valid Unicode).
* A name seen in a workspace may be any bytes. It is kept byte-exact as
  ``str`` with surrogate escapes (as ``os.fsdecode`` gives it) and listed
  under a printable form, :func:`listed_file_name`, which
  :func:`raw_file_name` turns back into the exact bytes.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from sandkernel.errors import FileRejected

_MAX_NAME_BYTES: Final = 255  # NAME_MAX on Linux: longer names cannot be created
_MAX_RAW_NAME_BYTES: Final = 4096  # PATH_MAX: a longer "name" is not a name


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
    chars: list[str] = []
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


def produced_name(name: str) -> str:
    """The name a produced file is stored under: its last component, listed."""
    base = listed_file_name(name.rsplit("/", 1)[-1])
    if base in ("", ".", ".."):
        raise FileRejected(
            f"file rejected: {listed_file_name(name)!r} names a directory, not a file"
        )
    return base
