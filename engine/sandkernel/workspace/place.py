"""Files into a workspace: stored files placed in a kernel's ``/mnt/data``.

A stored file is copied into the workspace under its name. Agent files are
owned by root and read-only: the workspace is a sticky, world-writable folder
(like ``/tmp``), so the sandbox user can neither change nor delete nor rename
them. Session files belong to the sandbox user. Files are created with
``O_EXCL | O_NOFOLLOW``, so a name the code in the sandbox planted (a
symlink, say) is never written through; a name already taken gets the file
id appended, predictably (then a count: ``data-1a2b3c4d-2.csv``). The one
name that is written over is that of a file the caller says the new one
replaces, and only while the workspace holds that file there unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

from sandkernel.errors import FileRejected, FileTooLarge, SandkernelError
from sandkernel.files import FileStore, StoredFile, listed_file_name, raw_file_name
from sandkernel.sandbox import SANDBOX_GID, SANDBOX_UID, WORKSPACE_IN_JAIL
from sandkernel.workspace.scan import DirStamps, Snapshot, open_workspace_file


@dataclass
class WorkspaceState:
    """What the engine knows of one session's workspace between cells."""

    snapshot: Snapshot = field(default_factory=dict)
    #: in-sandbox path -> file id of what was placed there or produced last
    latest: dict[str, str] = field(default_factory=dict)
    #: the directories' stamps when ``snapshot`` was taken, if they can prove the
    #: tree unchanged since (see ``workspace_unchanged``); None: scan next time
    dirs: DirStamps | None = None
    #: the symlinks, FIFOs, sockets and devices the last scan found (``ScanResult.not_regular``):
    #: a result has said they were not collected
    not_regular: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: held while a file is placed (from its copy to its entries above) and while a
    #: collect takes in what it found: the engine places an agent's files without
    #: waiting for a cell, so a collect can tell a file placed meanwhile from one
    #: the cell wrote (see :func:`~sandkernel.workspace.collect.collect_outputs`)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


#: The longest file name Linux takes, in bytes.
_NAME_MAX = 255


def _suffixed(name: str, tag: str) -> str:
    """``name`` with ``-tag`` before its extension, its stem cut to keep it a legal name."""
    stem, dot, ext = name.rpartition(".")
    if not (dot and stem):
        stem, ext = name, ""
    tail = f"-{tag}" + (f".{ext}" if ext else "")
    room = _NAME_MAX - len(tail.encode())
    if room < 1:  # an extension as long as a name: the tag goes at the end
        stem, tail = name, f"-{tag}"
        room = _NAME_MAX - len(tail.encode())
    # Cut between characters, counting the bytes the file system sees (os.fsencode).
    kept = 0
    for index, char in enumerate(stem):
        size = len(char.encode("utf-8", "surrogateescape"))
        if kept + size > room:
            return stem[:index] + tail
        kept += size
    return stem + tail


#: The suffixed names a file is tried under when its own is taken: its id's
#: first 8 hex digits, then those and a count up to this (``data-1a2b3c4d-100.csv``).
MAX_COPIES: Final = 100


def own_name(stored: StoredFile) -> str:
    """The name on disk of ``stored`` (``os.fsdecode``'s form), which it is listed under escaped.

    A produced file's name is listed printable (:func:`listed_file_name`); an
    upload's has nothing to escape, and is its own.
    """
    try:
        return os.fsdecode(raw_file_name(stored.name))
    except ValueError:  # not a listed name (none is stored so): taken as it is
        return stored.name


def candidate_names(stored: StoredFile) -> Iterator[str]:
    """The names on disk ``stored`` is placed under, in the order they are tried.

    Its own name, then suffixed with its id: predictable, so the same file
    lands where it did before. A count follows for a file attached again
    after the code changed its earlier copies (each attach gives the file's
    stored content a name of its own, and never writes over the code's work).
    """
    name = own_name(stored)
    yield name
    tag = stored.id[5:13]
    yield _suffixed(name, tag)
    for count in range(2, MAX_COPIES + 1):
        yield _suffixed(name, f"{tag}-{count}")


def place_file(
    store: FileStore,
    stored: StoredFile,
    workspace: Path,
    state: WorkspaceState,
    *,
    read_only: bool,
    subdir: str = "",
    replacing: StoredFile | None = None,
) -> str:
    """Copy a stored file into the workspace; return its path in the sandbox (on disk's form).

    A name that already holds exactly this file is where it is (placing it
    again changes nothing); a taken name is left alone and the next of
    :func:`candidate_names` tried.

    Args:
        store: where the content is.
        stored: the file to copy (placed under its stored name).
        workspace: host path of the kernel's ``/mnt/data``.
        state: updated so the copy does not count as produced.
        read_only: owned by root, mode 0444 (agent files); else the sandbox
            user's, mode 0644.
        subdir: a relative folder inside the workspace (only used to restore
            files into a fresh workspace, before any code ran there).
        replacing: a file ``stored`` supersedes (an earlier upload of the same
            name): if the workspace still holds it, unchanged, under
            ``stored``'s name, the new file takes that name over.

    Raises:
        FileTooLarge: the workspace has no room for the file.
        FileRejected: every name tried is taken, or the workspace refuses the copy.
    """
    # Held from before the file appears until its entries are in ``state``: a
    # collect taking in its scan meanwhile waits for them, and so never takes
    # the copy (whole or half-written) for a file the cell wrote.
    with state.lock:
        return _place_locked(store, stored, workspace, state, read_only, subdir, replacing)


def _place_locked(
    store: FileStore,
    stored: StoredFile,
    workspace: Path,
    state: WorkspaceState,
    read_only: bool,
    subdir: str,
    replacing: StoredFile | None,
) -> str:
    prefix = f"{subdir}/" if subdir else ""
    where = f"{WORKSPACE_IN_JAIL}/{subdir}" if subdir else WORKSPACE_IN_JAIL
    try:
        dir_fd = _open_folder(
            workspace, PurePosixPath(subdir).parts if subdir else (), create=False
        )
    except OSError as exc:
        raise _not_placed(stored, where, exc) from None
    own = own_name(stored)
    try:
        for candidate in candidate_names(stored):
            if _same_file_there(workspace, prefix + candidate, stored):
                return _record(state, workspace, prefix + candidate, stored.id)
            if (
                replacing is not None
                and candidate == own
                and _same_file_there(workspace, prefix + candidate, replacing)
            ):
                # Written beside it, then renamed over it: the name never holds
                # half a file, and a reader that has the old one open keeps it.
                try:
                    _copy_in(
                        store, stored, dir_fd, f".sandkernel-{stored.id}", where,
                        read_only=read_only, rename_to=candidate,
                    )  # fmt: skip
                except FileExistsError:
                    pass  # the code planted that name: the old file stays, the new one is suffixed
                else:
                    return _record(state, workspace, prefix + candidate, stored.id)
            try:
                _copy_in(store, stored, dir_fd, candidate, where, read_only=read_only)
            except FileExistsError:
                continue
            return _record(state, workspace, prefix + candidate, stored.id)
    finally:
        os.close(dir_fd)
    last = _suffixed(stored.name, f"{stored.id[5:13]}-{MAX_COPIES}")
    raise FileRejected(
        f"cannot place {stored.name!r} in {where}: that name and its {MAX_COPIES} suffixed "
        f"forms (up to {last!r}) are all taken; delete or rename some of those files "
        "(from the session's code) and try again"
    )


def _copy_in(
    store: FileStore,
    stored: StoredFile,
    dir_fd: int,
    name: str,
    where: str,
    *,
    read_only: bool,
    rename_to: str | None = None,
) -> None:
    """Write ``stored`` as the new file ``name`` of the folder (then rename it to ``rename_to``).

    Raises:
        FileExistsError: ``name`` is taken; nothing was written.
        FileTooLarge: no room for it; nothing is left behind.
        FileRejected: the workspace refused the copy; nothing is left behind.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        raise
    except OSError as exc:
        raise _not_placed(stored, where, exc) from None
    try:
        with store.open(stored.id) as src, os.fdopen(fd, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if read_only:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o444)
        else:
            os.fchown(fd, SANDBOX_UID, SANDBOX_GID)
            os.fchmod(fd, 0o644)
        if rename_to is not None:
            os.rename(name, rename_to, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        # Not left half-written: made by root in a sticky folder, the
        # sandbox could never remove it, nor get its space back.
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise _not_placed(stored, where, exc) from None
        raise
    finally:
        os.close(fd)


def _not_placed(stored: StoredFile, where: str, exc: OSError) -> FileRejected:
    """The error for a copy the workspace refused: a full one is FileTooLarge."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return FileTooLarge(
            f"no room for {stored.name!r} ({stored.size_bytes} bytes) in the "
            "workspace: delete files there, or give the policy a larger workspace_mb"
        )
    # Its strerror only: the host's paths are no business of the sandbox's user.
    return FileRejected(f"cannot place {stored.name!r} in {where}: {exc.strerror or exc}")


def restore_files(
    store: FileStore, files: dict[str, str], workspace: Path, state: WorkspaceState
) -> list[str]:
    """Put a session's files back into a fresh workspace (after its kernel died).

    Args:
        files: in-sandbox path -> file id (a previous :attr:`WorkspaceState.latest`).

    Returns:
        The paths that could not be restored (their file expired or was deleted).
        An agent's file among ``files`` is not restored: it is the agent's to
        place, read-only, where its name is free.
    """
    lost = []
    for path, file_id in files.items():
        rel = PurePosixPath(path).relative_to(WORKSPACE_IN_JAIL)
        try:
            stored = store.get(file_id)
        except SandkernelError:
            lost.append(path)
            continue
        if stored.session_id is None and stored.agent_id is not None:
            continue
        subdir = str(rel.parent) if str(rel.parent) != "." else ""
        listed = listed_file_name(rel.name)  # a stored name's form
        if stored.name != listed:
            stored = stored.model_copy(update={"name": listed})
        try:
            if subdir:
                # Not followed through a link: a host folder bound as the workspace
                # keeps what the dead kernel left there, links included.
                os.close(_open_folder(workspace, rel.parent.parts, create=True))
            place_file(store, stored, workspace, state, read_only=False, subdir=subdir)
        except FileTooLarge:
            raise  # no room in the fresh workspace: the restart fails, saying so
        except (OSError, FileRejected):
            lost.append(path)  # its place is a link or a file now: not restored there
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
    state.dirs = None  # the tree changed: the next collect scans it
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
    fd = _open_folder(workspace, parts[:-1], create=True)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        out = os.open(parts[-1], flags, 0o644, dir_fd=fd)
        try:
            if not stat.S_ISREG(os.fstat(out).st_mode):  # a FIFO or a device planted there
                raise FileExistsError(errno.EEXIST, f"{rel!r} is not a regular file")
            os.ftruncate(out, 0)
            os.fchown(out, SANDBOX_UID, SANDBOX_GID)
            with os.fdopen(out, "wb", closefd=False) as f:
                f.write(data)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _open_folder(workspace: Path, parts: tuple[str, ...], *, create: bool) -> int:
    """A descriptor of ``workspace/<parts>``, reached without following any link.

    Each folder is opened relative to its parent with ``O_NOFOLLOW``; with
    ``create``, a missing one is made (the sandbox user's, as code in the
    sandbox would have made it).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(workspace, flags)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, SANDBOX_UID, SANDBOX_GID, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_workspace_file(workspace: Path, rel: str, max_bytes: int = 256 << 20) -> bytes | None:
    """A regular file's bytes (no symlink followed), or None if absent, odd or too large.

    Odd includes a name no file can have (text that is not UTF-8: a lone surrogate).
    """
    try:
        with open_workspace_file(workspace, rel) as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError, SandkernelError):
        return None
    return None if len(data) > max_bytes else data
