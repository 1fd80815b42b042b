"""Files: upload checks and a durable, content-addressed store.

None of it starts a kernel or a process. One module per concept:

=============  ==========================================================
``mime``       the supported types (:data:`MIME_TYPES`) and the type a
               name implies (:func:`mime_for_name`)
``sniff``      the type of a content, from its bytes (:func:`sniff_mime`)
``names``      an upload's name (:func:`safe_name`); the printable,
               reversible form a produced file's name is listed under
               (:func:`listed_file_name`, :func:`raw_file_name`)
``archives``   zip and tar checks: bombs, paths that leave their folder
``upload``     :func:`check_upload`: name, type, size, content, archives
``store``      :class:`FileStore`: metadata in SQLite, content by SHA-256,
               expiry and purge; :class:`StoredFile`, its records
=============  ==========================================================

Scanning a kernel's workspace (:func:`scan_workspace`,
:func:`open_workspace_file`) lives beside the workspace code, in
:mod:`sandkernel.workspace`; it is re-exported here on first use, so that
the store does not load what placing files in a sandbox needs.
"""

from __future__ import annotations

import importlib

from sandkernel.files.mime import MIME_TYPES, mime_for_name
from sandkernel.files.names import listed_file_name, raw_file_name, safe_name
from sandkernel.files.sniff import sniff_mime
from sandkernel.files.store import FileStore, Origin, Scope, StoredFile, UploadSource
from sandkernel.files.upload import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    DEFAULT_MAX_ARCHIVE_ENTRIES,
    DEFAULT_MAX_UPLOAD_BYTES,
    check_upload,
)

# Not typing.TYPE_CHECKING, as in sandkernel/__init__.py: type checkers treat
# any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sandkernel.workspace.scan import (
        ScannedFile,
        ScanResult,
        Snapshot,
        open_workspace_file,
        scan_workspace,
    )

#: Names defined in :mod:`sandkernel.workspace.scan`, imported from there on first use.
_SCAN_NAMES = frozenset(
    {"ScanResult", "ScannedFile", "Snapshot", "open_workspace_file", "scan_workspace"}
)

__all__ = [
    "DEFAULT_MAX_ARCHIVE_BYTES",
    "DEFAULT_MAX_ARCHIVE_ENTRIES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MIME_TYPES",
    "FileStore",
    "Origin",
    "ScanResult",
    "ScannedFile",
    "Scope",
    "Snapshot",
    "StoredFile",
    "UploadSource",
    "check_upload",
    "listed_file_name",
    "mime_for_name",
    "open_workspace_file",
    "raw_file_name",
    "safe_name",
    "scan_workspace",
    "sniff_mime",
]


# Runtime only, as in sandkernel/__init__.py: a module __getattr__ that type
# checkers saw would make every misspelt name type-check as Any.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        if name not in _SCAN_NAMES:
            raise AttributeError(f"module 'sandkernel.files' has no attribute {name!r}")
        value = getattr(importlib.import_module("sandkernel.workspace.scan"), name)
        globals()[name] = value
        return value
