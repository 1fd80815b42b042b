"""Moving files between the store and a kernel's ``/mnt/data``.

* **In**: a stored file is copied into the workspace under its name. Agent
  files are owned by root and read-only: the workspace is a sticky,
  world-writable folder (like ``/tmp``), so the sandbox user can neither
  change nor delete nor rename them. Session files belong to the sandbox user.
  Files are created with ``O_EXCL | O_NOFOLLOW``, so a name the code in the
  sandbox planted (a symlink, say) is never written through; a name already
  taken gets the file id appended, predictably.
* **Out**: after each cell, new and changed regular files are registered in
  the store (see :func:`~sandkernel.files.scan_workspace`: no symlink is ever
  followed), and so are images the cell displayed. Both come back on the
  result as :class:`~sandkernel.results.ProducedFile`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sandkernel.errors import SandkernelError
from sandkernel.files import (
    FileStore,
    Snapshot,
    StoredFile,
    open_workspace_file,
    scan_workspace,
)
from sandkernel.results import ExecutionResult, ProducedFile
from sandkernel.sandbox import SANDBOX_GID, SANDBOX_UID, WORKSPACE_IN_JAIL

#: Displayed image types that become files, with their extension.
_IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg"}


@dataclass(frozen=True)
class OutputCaps:
    """Bounds on what one cell, and one session, may add to the store.

    ``max_session_bytes`` bounds the produced files a session keeps in the
    store: without it, a session that rewrites its files every cell would
    grow the host's store by a version per cell. When a new file does not
    fit, the oldest superseded versions (of a path produced again since, and
    displayed images of earlier cells) are deleted first; what still does not
    fit is not stored, and the result says so.
    """

    max_files: int = 100
    max_bytes: int = 256 << 20
    retention_s: float | None = 7 * 24 * 3600
    max_session_bytes: int | None = None


class _SessionQuota:
    """The room left under :attr:`OutputCaps.max_session_bytes` for one session."""

    def __init__(self, store: FileStore, session_id: str, state: WorkspaceState, cap: int | None):
        self.store, self.session_id, self.state, self.cap = store, session_id, state, cap
        self.used = (
            0 if cap is None else store.stored_bytes(session_id=session_id, origin="produced")
        )
        self.evicted = 0

    def make_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit, after deleting superseded versions if needed."""
        if self.cap is None or self.used + size <= self.cap:
            return True
        if size > self.cap:
            return False
        current = set(self.state.latest.values())
        for old in self.store.list(session_id=self.session_id, origin="produced"):
            if self.used + size <= self.cap:
                break
            if old.id in current:
                continue
            try:
                self.store.delete(old.id)
            except SandkernelError:
                continue  # deleted meanwhile
            self.used -= old.size_bytes
            self.evicted += 1
        return self.used + size <= self.cap

    def refused(self, what: str, size: int) -> str:
        assert self.cap is not None
        return (
            f"{what} ({size} bytes) not stored: the session's produced files would exceed "
            f"its {self.cap}-byte cap (max_session_produced_bytes); delete files or "
            "write smaller ones"
        )


@dataclass
class WorkspaceState:
    """What the engine knows of one session's workspace between cells."""

    snapshot: Snapshot = field(default_factory=dict)
    #: in-sandbox path -> file id of what was placed there or produced last
    latest: dict[str, str] = field(default_factory=dict)


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def place_file(
    store: FileStore,
    stored: StoredFile,
    workspace: Path,
    state: WorkspaceState,
    *,
    read_only: bool,
    subdir: str = "",
) -> str:
    """Copy a stored file into the workspace; return its path in the sandbox.

    Args:
        store: where the content is.
        stored: the file to copy (placed under its stored name).
        workspace: host path of the kernel's ``/mnt/data``.
        state: updated so the copy does not count as produced.
        read_only: owned by root, mode 0444 (agent files); else the sandbox
            user's, mode 0644.
        subdir: a relative folder inside the workspace (only used to restore
            files into a fresh workspace, before any code ran there).
    """
    stem, dot, ext = stored.name.rpartition(".")
    suffixed = (
        f"{stem}-{stored.id[5:13]}.{ext}" if dot and stem else f"{stored.name}-{stored.id[5:13]}"
    )
    prefix = f"{subdir}/" if subdir else ""
    target_dir = workspace / subdir if subdir else workspace
    dir_fd = os.open(target_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for candidate in (stored.name, suffixed):
            if _same_file_there(target_dir, candidate, stored):
                return _record(state, workspace, prefix + candidate, stored.id)
            try:
                fd = os.open(
                    candidate,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
            except FileExistsError:
                continue
            try:
                with store.open(stored.id) as src, os.fdopen(fd, "wb", closefd=False) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                if read_only:
                    os.fchown(fd, 0, 0)
                    os.fchmod(fd, 0o444)
                else:
                    os.fchown(fd, SANDBOX_UID, SANDBOX_GID)
                    os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            return _record(state, workspace, prefix + candidate, stored.id)
    finally:
        os.close(dir_fd)
    raise FileExistsError(
        errno.EEXIST, f"cannot place {stored.name!r}: it and {suffixed!r} are both taken"
    )


def restore_files(
    store: FileStore, files: dict[str, str], workspace: Path, state: WorkspaceState
) -> list[str]:
    """Put a session's files back into a fresh workspace (after its kernel died).

    Args:
        files: in-sandbox path -> file id (a previous :attr:`WorkspaceState.latest`).

    Returns:
        The paths that could not be restored (their file expired or was deleted).
    """
    lost = []
    for path, file_id in files.items():
        rel = PurePosixPath(path).relative_to(WORKSPACE_IN_JAIL)
        try:
            stored = store.get(file_id)
        except SandkernelError:
            lost.append(path)
            continue
        subdir = str(rel.parent) if str(rel.parent) != "." else ""
        if subdir:
            # Fresh workspace, no code has run in it yet: plain makedirs is safe.
            (workspace / subdir).mkdir(parents=True, exist_ok=True)
            for part in range(1, len(rel.parent.parts) + 1):
                os.chown(workspace.joinpath(*rel.parent.parts[:part]), SANDBOX_UID, SANDBOX_GID)
        if stored.name != rel.name:
            stored = stored.model_copy(update={"name": rel.name})
        place_file(store, stored, workspace, state, read_only=False, subdir=subdir)
    return lost


def _same_file_there(directory: Path, name: str, stored: StoredFile) -> bool:
    """The name already holds exactly this file (placed earlier, unchanged)."""
    try:
        with open_workspace_file(directory, name) as f:
            if os.fstat(f.fileno()).st_size != stored.size_bytes:
                return False
            digest = hashlib.sha256()
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            return digest.hexdigest() == stored.sha256
    except (OSError, SandkernelError):
        return False


def _record(state: WorkspaceState, workspace: Path, rel: str, file_id: str) -> str:
    state.snapshot[rel] = _stat_key(workspace / rel)
    path = f"{WORKSPACE_IN_JAIL}/{rel}"
    state.latest[path] = file_id
    return path


def write_workspace_file(workspace: Path, rel: str, data: bytes) -> None:
    """Write ``data`` at a relative path in the workspace, as the sandbox user's file.

    Missing folders are created; no symlink is followed on the way (each
    folder is opened with ``O_NOFOLLOW`` relative to its parent), and an
    existing file is replaced only if it is a regular file.
    """
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise FileExistsError(errno.EINVAL, f"not a relative path: {rel!r}")
    fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chown(part, SANDBOX_UID, SANDBOX_GID, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open(
            parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=fd
        )
        try:
            os.fchown(out, SANDBOX_UID, SANDBOX_GID)
            with os.fdopen(out, "wb", closefd=False) as f:
                f.write(data)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def read_workspace_file(workspace: Path, rel: str, max_bytes: int = 256 << 20) -> bytes | None:
    """A regular file's bytes (no symlink followed), or None if absent, odd or too large."""
    try:
        with open_workspace_file(workspace, rel) as f:
            data = f.read(max_bytes + 1)
    except (OSError, SandkernelError):
        return None
    return None if len(data) > max_bytes else data


def collect_outputs(
    store: FileStore,
    workspace: Path,
    state: WorkspaceState,
    result: ExecutionResult,
    *,
    session_id: str,
    caps: OutputCaps,
) -> ExecutionResult:
    """Register what the cell produced and return the result with its ``files``."""
    scan = scan_workspace(
        workspace, since=state.snapshot, max_files=caps.max_files, max_bytes=caps.max_bytes
    )
    produced: list[ProducedFile] = []
    notes = [scan.truncated_reason] if scan.truncated_reason else []
    quota = _SessionQuota(store, session_id, state, caps.max_session_bytes)
    for entry in scan.changed:
        path = f"{WORKSPACE_IN_JAIL}/{entry.path}"
        if not quota.make_room(entry.size_bytes):
            notes.append(quota.refused(entry.path, entry.size_bytes))
            continue
        try:
            with open_workspace_file(workspace, entry.path) as f:
                stored = store.add_stream(
                    f,
                    PurePosixPath(entry.path).name,
                    origin="produced",
                    session_id=session_id,
                    execution_count=result.execution_count,
                    path=path,
                    retention_s=caps.retention_s,
                )
        except OSError:
            continue  # vanished or replaced since the scan: the next scan sees it
        except Exception as exc:  # noqa: BLE001 - one odd file must not lose the result
            notes.append(f"{entry.path}: not stored ({exc})")
            continue
        state.latest[path] = stored.id
        quota.used += stored.size_bytes
        produced.append(_produced(stored, path, "workspace"))
    state.snapshot = scan.snapshot
    for path in scan.removed:
        state.latest.pop(f"{WORKSPACE_IN_JAIL}/{path}", None)
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
    images = [d for d in result.displays if any(t in d.data for t in _IMAGE_TYPES)]
    for n, display in enumerate(images, 1):
        if len(produced) >= room:
            notes.append(f"more displayed images than the {caps.max_files}-file cap (max_files)")
            break
        mime = next(t for t in _IMAGE_TYPES if t in display.data)
        payload = display.data[mime]
        try:
            if mime == "image/svg+xml":
                data = (payload if isinstance(payload, str) else "".join(payload)).encode()
            else:
                data = base64.b64decode(payload, validate=False)
        except (binascii.Error, TypeError, ValueError):
            notes.append(f"displayed {mime} #{n} is not valid base64")
            continue
        name = f"image-{result.execution_count or 0}-{n}.{_IMAGE_TYPES[mime]}"
        if not quota.make_room(len(data)):
            notes.append(quota.refused(name, len(data)))
            continue
        stored = store.add_bytes(
            data,
            name,
            origin="produced",
            session_id=session_id,
            execution_count=result.execution_count,
            retention_s=caps.retention_s,
            mime=mime,
        )
        quota.used += stored.size_bytes
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
