"""Files out of a workspace: what a cell produced, registered in the store.

After each cell, new and changed regular files are registered in the store
(see :func:`~sandkernel.workspace.scan.scan_workspace`: no symlink is ever
followed), and so are images the cell displayed. Both come back on the result
as :class:`~sandkernel.results.ProducedFile`, within the caps of
:class:`OutputCaps`. What a cell made that is not a regular file (a symlink,
a FIFO, a socket, a device) is not stored: its result's ``files_note`` names it.
"""

from __future__ import annotations

import base64
import binascii
import sqlite3
from collections.abc import Container, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final

from sandkernel.errors import FileError, SandkernelError
from sandkernel.files import FileStore, StoredFile, listed_file_name
from sandkernel.results import DisplayOutput, ExecutionResult, ProducedFile
from sandkernel.sandbox import WORKSPACE_IN_JAIL
from sandkernel.workspace.place import WorkspaceState
from sandkernel.workspace.scan import open_workspace_file, scan_workspace

#: Displayed image types that become files, with their extension.
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg"}


@dataclass(frozen=True)
class OutputCaps:
    """Bounds on what one cell, and one session, may add to the store.

    ``max_session_bytes`` bounds the produced files a session keeps in the
    store: without it, a session that rewrites its files every cell would
    grow the host's store by a version per cell. When a new file does not
    fit, the oldest superseded versions (of a path produced again since, and
    displayed images of earlier cells) are deleted first; what still does not
    fit is not stored, and the result says so. A file of the cell being
    collected is never deleted to make room: its result lists it. Only the
    session's own files count (see :class:`ProducedVersions`): one the code
    removed from the workspace is not superseded, and files of an earlier
    session of the same id are never deleted for this one.
    """

    max_files: int = 100
    max_bytes: int = 256 << 20
    retention_s: float | None = 7 * 24 * 3600
    max_session_bytes: int | None = None


@dataclass
class ProducedVersions:
    """The files one session produced, oldest first: what its byte cap counts and may delete.

    Only what this session stored: the files an earlier session of its id
    produced (before ``if_expired="new"``, or before the engine restarted)
    stay downloadable, and are neither counted against this one's cap nor
    deleted to make room in it. The record outlives the session's kernels: a
    restart's fresh workspace is still the same session's.
    """

    #: file id -> (its path in the sandbox, "" for a displayed image; its size in bytes)
    files: dict[str, tuple[str, int]] = field(default_factory=dict)

    def superseded(self, keep: Container[str]) -> list[str]:
        """The versions that may be deleted to make room, oldest first.

        A file of a path the session produced again since, and an image an
        earlier cell displayed; never the last version of a path (a file the
        code removed from the workspace included), nor one of ``keep``.
        """
        last = {path: file_id for file_id, (path, _) in self.files.items() if path}
        return [
            file_id
            for file_id, (path, _) in self.files.items()
            if file_id not in keep and (not path or last[path] != file_id)
        ]


class _SessionQuota:
    """The room left under :attr:`OutputCaps.max_session_bytes` for one session."""

    def __init__(
        self,
        store: FileStore,
        session_id: str,
        state: WorkspaceState,
        versions: ProducedVersions,
        cap: int | None,
    ) -> None:
        self.store, self.session_id, self.state, self.cap = store, session_id, state, cap
        self.versions = versions
        self._counted = False
        self.evicted = 0
        #: what this cell stored: its result lists these, so they are not superseded
        self.kept: set[str] = set()

    @cached_property
    def used(self) -> int:
        """What the session's files hold: at most the record's sizes (some may have
        been deleted or expired since), until the store is asked. Added up when first
        needed: most cells store nothing."""
        return sum(size for _, size in self.versions.files.values())

    def _count(self) -> None:
        """Make :attr:`used` exact: drop from the record what the store no longer has."""
        alive = {f.id for f in self.store.list(session_id=self.session_id, origin="produced")}
        for file_id in [i for i in self.versions.files if i not in alive]:
            del self.versions.files[file_id]
        self.used = sum(size for _, size in self.versions.files.values())
        self._counted = True

    def make_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit, after deleting superseded versions if needed."""
        if self.cap is None or self.used + size <= self.cap:
            return True
        if size > self.cap:
            return False
        if not self._counted:
            # Most cells fit under the record's upper bound: only those that do
            # not pay for asking the store.
            self._count()
        # What the workspace holds is what a restart puts back: never deleted
        # (an earlier version attached again, say). A copy, taken at once: an
        # agent's file may be placed meanwhile, from another thread.
        keep = set(dict(self.state.latest).values()) | self.kept
        for old in self.versions.superseded(keep):
            if self.used + size <= self.cap:
                break
            try:
                self.store.delete(old)
            except SandkernelError:
                pass  # deleted meanwhile: its bytes are free all the same
            else:
                self.evicted += 1
            self.used -= self.versions.files.pop(old)[1]
        return self.used + size <= self.cap

    def stored(self, stored: StoredFile, path: str) -> None:
        """Count a file this cell stored (at ``path``; "" if displayed), and keep it."""
        self.used += stored.size_bytes
        self.kept.add(stored.id)
        self.versions.files[stored.id] = (path, stored.size_bytes)

    def withdrawn(self, stored: StoredFile) -> None:
        """Stop counting a file this cell stored and then found not to be its own."""
        self.used -= stored.size_bytes
        self.kept.discard(stored.id)
        self.versions.files.pop(stored.id, None)

    def refused(self, what: str, size: int) -> str:
        assert self.cap is not None
        return (
            f"{what} ({size} bytes) not stored: the session's produced files would exceed "
            f"its {self.cap}-byte cap (max_session_produced_bytes); delete files or "
            "write smaller ones"
        )


def collect_outputs(
    store: FileStore,
    workspace: Path,
    state: WorkspaceState,
    result: ExecutionResult,
    *,
    session_id: str,
    caps: OutputCaps,
    versions: ProducedVersions,
) -> ExecutionResult:
    """Register what the cell produced and return the result with its ``files``.

    ``versions`` is the session's record of what it produced (what its byte
    cap counts); the files this cell stores are added to it.
    """
    # The engine places an agent's files without waiting for a running cell,
    # so even while this collect runs. Each placement records its file in
    # state.snapshot (under state.lock), which nothing else changes until the
    # collect takes its scan in: a path whose entry is not the one in ``since``
    # holds a file placed meanwhile, neither produced by the cell nor to be
    # forgotten by it.
    since = dict(state.snapshot)
    quota = _SessionQuota(store, session_id, state, versions, caps.max_session_bytes)
    try:
        scan = scan_workspace(
            workspace, since=since, max_files=caps.max_files, max_bytes=caps.max_bytes
        )
    except FileError as exc:
        # The folder is gone or cannot be opened (a host workspace removed or
        # replaced under the session): the cell ran, and its result stands.
        notes = [f"the workspace's files were not collected ({exc})"]
        displayed = _store_displays(store, result, session_id=session_id, caps=caps,
                                    quota=quota, room=caps.max_files, notes=notes)  # fmt: skip
        return result.model_copy(
            update={"files": displayed, "files_truncated": True, "files_note": "; ".join(notes)}
        )
    notes = [scan.truncated_reason] if scan.truncated_reason else []
    # Noted once each: every later scan finds them again, and they are no later cell's doing.
    made = {
        rel: seen[0] for rel, seen in scan.not_regular.items() if state.not_regular.get(rel) != seen
    }
    if made:
        notes.append(_not_regular_note(made))
    #: changed files not stored, that the next collect reads again
    retry: list[str] = []
    #: (relative path, what was stored of it), taken in below
    stored_files: list[tuple[str, StoredFile]] = []
    for entry in scan.changed:
        if state.snapshot.get(entry.path) != since.get(entry.path):
            continue  # placed since the collect began: not the cell's
        path = f"{WORKSPACE_IN_JAIL}/{entry.path}"
        if not quota.make_room(entry.size_bytes):
            notes.append(quota.refused(entry.path, entry.size_bytes))
            continue
        try:
            with _read_back(workspace, entry.path, entry.size_bytes) as source:
                stored = store.add_stream(
                    source,
                    PurePosixPath(entry.path).name,
                    origin="produced",
                    session_id=session_id,
                    execution_count=result.execution_count,
                    path=path,
                    retention_s=caps.retention_s,
                )
        except _ChangedSinceScan:
            retry.append(entry.path)  # grown or unreadable since the scan: not noted
            continue
        except _STORE_FAILURES as exc:
            # The store failed (a full or failing disk), not the file: it is
            # still there, and a later cell stores it once the store can.
            retry.append(entry.path)
            why = f"{_reason(exc)}; a later cell stores it once the store can"
            notes.append(f"{listed_file_name(entry.path)}: not stored ({why})")
            continue
        except Exception as exc:  # noqa: BLE001 - one odd file must not lose the result
            # Refused, or failing for a reason of its own: trying it again as it
            # is would fail again, and cost a read and a copy every cell. It is
            # noted once, and tried again when it changes, which any scan sees.
            notes.append(f"{listed_file_name(entry.path)}: not stored ({_reason(exc)})")
            continue
        if stored.sha256 != entry.sha256:
            store.delete(stored.id)  # rewritten since the scan: the caps held for what it read
            retry.append(entry.path)
            continue
        quota.stored(stored, path)
        stored_files.append((entry.path, stored))
    produced: list[ProducedFile] = []
    #: stored, then found to be the copy of a file placed meanwhile
    not_produced: list[str] = []
    # Storing takes a while (each file is synced to disk): what was placed is
    # taken again after it, once no placement is under way (one holds the lock
    # from before its file appears until its entries are in), so that a file
    # placed during the store loop is as known as one placed during the walk.
    with state.lock:
        placed = {p: k for p, k in state.snapshot.items() if since.get(p) != k}
        for rel, stored in stored_files:
            if rel in placed:
                # Read by the scan before the placement recorded it (whole, or
                # half-written): the placed file, not the cell's.
                quota.withdrawn(stored)
                not_produced.append(stored.id)
                continue
            path = f"{WORKSPACE_IN_JAIL}/{rel}"
            state.latest[path] = stored.id
            produced.append(_produced(stored, path, "workspace"))
        snapshot = dict(scan.snapshot)
        for rel in retry:
            # Its entry as before this scan (as the scan's look_again keeps one): the
            # next scan finds it new or changed, even if its size and times are the same.
            if rel in since:
                snapshot[rel] = since[rel]
            else:
                snapshot.pop(rel, None)
        # A placed file's entry as its placement left it: not found new next time.
        snapshot.update(placed)
        state.snapshot = snapshot
        state.not_regular = scan.not_regular
        # Placed since the walk, or left to retry: the tree is not proved unchanged.
        state.dirs = None if placed or retry else scan.dirs
        for rel in scan.removed:
            if rel not in placed:  # gone, then placed again meanwhile: it is there
                state.latest.pop(f"{WORKSPACE_IN_JAIL}/{rel}", None)
    for file_id in not_produced:
        with suppress(SandkernelError, *_STORE_FAILURES):
            store.delete(file_id)  # else left listed as the session's: harmless, and rare
    produced += _store_displays(store, result, session_id=session_id, caps=caps, quota=quota,
                                room=caps.max_files - len(produced), notes=notes)  # fmt: skip
    truncated = bool(notes)
    if quota.evicted:  # not a truncation: what this cell produced is all there
        notes.append(
            f"{quota.evicted} superseded version(s) of earlier cells' files deleted to stay "
            "within the session's cap (max_session_produced_bytes)"
        )
    if not produced and not notes:
        return result
    return result.model_copy(
        update={
            "files": produced,
            "files_truncated": truncated,
            "files_note": "; ".join(notes) or None,
        }
    )


#: The most symlinks, FIFOs, sockets and devices a note names; the rest are counted.
_NOT_REGULAR_NAMED: Final = 5


def _not_regular_note(made: dict[str, str]) -> str:
    """The note for what a cell made that is not a regular file (path -> what it is)."""
    shown = list(made.items())[:_NOT_REGULAR_NAMED]
    names = ", ".join(f"{listed_file_name(rel)} (a {kind})" for rel, kind in shown)
    more = f" and {len(made) - len(shown)} more" if len(made) > len(shown) else ""
    return f"not collected (not regular files): {names}{more}"


#: What the store raises when its own disk or database fails, not the file.
_STORE_FAILURES: Final = (OSError, sqlite3.Error)


class _ChangedSinceScan(Exception):
    """A produced file could not be read back as the scan saw it: the next scan looks again."""


@contextmanager
def _read_back(workspace: Path, rel: str, size: int) -> Iterator[_AsScanned]:
    """A produced file opened again for the store, as :class:`_AsScanned` reads it.

    Failing to open it is the workspace's doing (the file went, or changed
    kind, since the scan), never to be taken for the store's: a
    :class:`_ChangedSinceScan`, or the :class:`~sandkernel.errors.FileRejected`
    of a link or a file that is not regular.
    """
    try:
        f = open_workspace_file(workspace, rel)
    except OSError as exc:
        raise _ChangedSinceScan(f"the file could not be opened again: {exc.strerror}") from exc
    with f:
        yield _AsScanned(f, size)


class _AsScanned:
    """A produced file read back for the store: at most the size the scan saw.

    The caps were checked against the scan's size; the sandbox may have grown
    the file since. More data than that, or a read that fails, is a
    :class:`_ChangedSinceScan` (the file is left for the next scan), never
    stored; being none of the store's errors, it is never taken for one.
    """

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self._left = size

    def read(self, size: int = -1) -> bytes:
        try:
            if self._left <= 0:
                if self._f.read(1):
                    raise _ChangedSinceScan("the file grew after the scan")
                return b""
            chunk = self._f.read(self._left if size < 0 else min(size, self._left))
        except OSError as exc:
            raise _ChangedSinceScan(f"the file could not be read again: {exc.strerror}") from exc
        self._left -= len(chunk)
        return chunk


def _reason(exc: Exception) -> str:
    """Why a file was not stored, without the host's paths (an OSError's strerror only)."""
    if isinstance(exc, OSError):
        return f"the file store failed: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, sqlite3.Error):
        return f"the file store failed: {exc}"
    if isinstance(exc, SandkernelError):
        return str(exc)
    # Not an error of ours: its type says more than its message alone.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def shown_images(result: ExecutionResult) -> list[DisplayOutput]:
    """The images a cell displayed, then its value if that is one (``Image(...)`` last)."""
    shown = [*result.displays, *([result.value] if result.value is not None else [])]
    return [d for d in shown if IMAGE_TYPES.keys() & d.data.keys()]


def _store_displays(
    store: FileStore,
    result: ExecutionResult,
    *,
    session_id: str,
    caps: OutputCaps,
    quota: _SessionQuota,
    room: int,
    notes: list[str],
) -> list[ProducedFile]:
    produced: list[ProducedFile] = []
    images = shown_images(result)
    for n, display in enumerate(images, 1):
        if len(produced) >= room:
            notes.append(f"more displayed images than the {caps.max_files}-file cap (max_files)")
            break
        mime = next(t for t in IMAGE_TYPES if t in display.data)
        payload = display.data[mime]
        try:
            if mime == "image/svg+xml":
                data = (payload if isinstance(payload, str) else "".join(payload)).encode()
            else:
                data = base64.b64decode(payload, validate=False)
        except (binascii.Error, TypeError, ValueError):
            notes.append(f"displayed {mime} #{n} is not valid base64")
            continue
        name = f"image-{result.execution_count or 0}-{n}.{IMAGE_TYPES[mime]}"
        if not quota.make_room(len(data)):
            notes.append(quota.refused(name, len(data)))
            continue
        try:
            stored = store.add_bytes(
                data,
                name,
                origin="produced",
                session_id=session_id,
                execution_count=result.execution_count,
                retention_s=caps.retention_s,
                mime=mime,
            )
        except Exception as exc:  # noqa: BLE001 - a full store must not lose the result
            notes.append(f"{name}: not stored ({_reason(exc)})")
            continue
        quota.stored(stored, "")
        produced.append(_produced(stored, "", "display"))
    return produced


def _produced(stored: StoredFile, path: str, source: str) -> ProducedFile:
    return ProducedFile(
        id=stored.id,
        name=stored.name,
        path=stored.path or path,  # the store's printable form of the path
        mime_type=stored.mime_type,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        execution_count=stored.execution_count,
        source="display" if source == "display" else "workspace",
    )
