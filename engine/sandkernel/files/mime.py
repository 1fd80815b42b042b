"""Supported types: the extensions a code interpreter accepts, and the type a name implies.

:data:`MIME_TYPES` is the table uploads are checked against (see
:func:`~sandkernel.files.upload.check_upload`); :func:`mime_for_name` gives
the type of any file name, produced files included.
"""

from __future__ import annotations

import functools
import mimetypes
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

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
        # Data files pandas reads as they are (read_json(lines=True), read_csv(sep="\t")).
        ".jsonl": ("application/jsonl", "application/x-ndjson"),
        ".md": ("text/markdown",),
        ".pdf": ("application/pdf",),
        ".php": ("text/x-php",),
        ".pptx": (_SLIDES,),
        ".py": ("text/x-python", "text/x-script.python"),
        ".rb": ("text/x-ruby",),
        ".tex": ("text/x-tex",),
        ".tsv": ("text/tab-separated-values",),
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


#: What a file of no known type is stored as.
OCTET_STREAM: Final = "application/octet-stream"

#: Office Open XML type -> the folder of its main parts inside the zip.
OOXML_PARTS: Final[Mapping[str, str]] = MappingProxyType(
    {_WORD: "word/", _SHEET: "xl/", _SLIDES: "ppt/"}
)
#: Types whose content is a zip archive.
ZIP_FAMILY: Final = frozenset({"application/zip", *OOXML_PARTS})
_TEXTUAL_APPLICATION: Final = frozenset(
    {
        "application/csv",
        "application/json",
        "application/jsonl",
        "application/x-ndjson",
        "application/xml",
        "application/typescript",
        "application/javascript",
        "application/x-sh",
    }
)


def extension(name: str) -> str:
    """A name's extension, lowercase and with its dot (``""`` if none)."""
    return os.path.splitext(name)[1].lower()


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
    ext = extension(name)
    if not ext:
        return None
    if ext in MIME_TYPES:
        return MIME_TYPES[ext][0]
    return _stdlib_types().guess_type("file" + ext, strict=False)[0]


def is_textual(mime: str) -> bool:
    """Whether content of this type must be text."""
    return (
        mime.startswith("text/") or mime in _TEXTUAL_APPLICATION or mime.endswith(("+xml", "+json"))
    )
