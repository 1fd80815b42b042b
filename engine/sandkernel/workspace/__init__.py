"""Workspaces: a kernel's ``/mnt/data`` on the host, and files moving in and out of it.

=============  ==========================================================
``scan``       the files a cell created or changed, found and read
               without ever following a symlink (:func:`scan_workspace`)
``place``      stored files copied in (:func:`place_file`), a session's
               files restored after a restart, single files read/written
``collect``    what a cell produced, registered in the store within the
               caps of :class:`OutputCaps` (:func:`collect_outputs`), and
               what a session produced (:class:`ProducedVersions`)
``session``    :class:`SessionWorkspace`: one session's files, built from
               the store, the caps and its ids; what a session holds
=============  ==========================================================
"""

from __future__ import annotations

from sandkernel.workspace.collect import OutputCaps, ProducedVersions, collect_outputs
from sandkernel.workspace.place import (
    WorkspaceState,
    place_file,
    read_workspace_file,
    restore_files,
    write_workspace_file,
)
from sandkernel.workspace.scan import (
    ScannedFile,
    ScanResult,
    Snapshot,
    open_workspace_file,
    scan_workspace,
)
from sandkernel.workspace.session import SessionWorkspace

__all__ = [
    "OutputCaps",
    "ProducedVersions",
    "ScanResult",
    "ScannedFile",
    "SessionWorkspace",
    "Snapshot",
    "WorkspaceState",
    "collect_outputs",
    "open_workspace_file",
    "place_file",
    "read_workspace_file",
    "restore_files",
    "scan_workspace",
    "write_workspace_file",
]
