"""Workspace scans: the files a cell created or changed, read without following a symlink.

A workspace is writable by the code in the sandbox, which may plant symlinks,
FIFOs or devices there, or swap a directory for a link mid-walk: the walk
opens every directory relative to its parent with ``O_NOFOLLOW`` and reads
only regular files, so that code cannot make the engine read a host file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from sandkernel.errors import FileError, FileRejected
from sandkernel.files._common import CHUNK_BYTES, file_kind, human_size, open_regular
from sandkernel.files.names import listed_file_name

#: Relative path -> (size, mtime_ns, inode) of every regular file seen by a scan.
Snapshot = dict[str, tuple[int, int, int]]
#: Relative path of a directory (``""``: the root) -> its (mtime_ns, ctime_ns, inode, size, links).
DirStamps = dict[str, tuple[int, int, int, int, int]]

#: A directory changed this recently before a scan began may change again
#: without its mtime moving: file systems stamp times from a clock that ticks
#: every few milliseconds (one jiffy, at most 10 ms). Such a scan's stamps
#: cannot prove the next tree unchanged.
_STAMP_TICK_NS: Final = 50_000_000
#: Most files and directories :func:`workspace_unchanged` looks at (it runs
#: on the engine's event loop; a bigger tree is scanned in a worker thread).
QUICK_CHECK_MAX_ENTRIES: Final = 64


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
        dirs: The stamps of every directory walked, taken before it was read;
            ``None`` when they cannot prove a later tree unchanged (something
            was skipped or left out, or a directory changed just before the
            scan): see :func:`workspace_unchanged`.
        not_regular: The symlinks, FIFOs, sockets and devices among ``skipped``:
            path -> (what it is, its inode), so that one seen by an earlier
            scan can be told from one made since.
    """

    changed: list[ScannedFile]
    snapshot: Snapshot
    removed: list[str]
    skipped: list[tuple[str, str]]
    truncated: bool
    truncated_reason: str | None
    dirs: DirStamps | None = None
    not_regular: dict[str, tuple[str, int]] = field(default_factory=dict)


_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _hash_regular(dir_fd: int, name: str, seen: os.stat_result) -> tuple[str, int, bool]:
    """Hash a file found by the walk, or say why not.

    Returns:
        ``(sha256, bytes read, True)``, or ``(why it was skipped, bytes read, False)``:
        what was read counts against the scan's budget either way.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return "vanished before it was read", 0, False
    except OSError as exc:
        why = "replaced by a symlink" if exc.errno == errno.ELOOP else f"unreadable: {exc.strerror}"
        return why, 0, False
    got = 0
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return f"replaced by a {file_kind(before.st_mode)}", 0, False
        if (before.st_dev, before.st_ino) != (seen.st_dev, seen.st_ino):
            return "replaced while being scanned", 0, False
        if (before.st_size, before.st_mtime_ns) != (seen.st_size, seen.st_mtime_ns):
            # Changing now: not read at all (the walk's size is what the caps allowed).
            return "changed while being read", 0, False
        digest = hashlib.sha256()
        # One byte more than the walk saw, so that growth is seen without reading on.
        left = seen.st_size + 1
        while left > 0:
            chunk = os.read(fd, min(CHUNK_BYTES, left))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            left -= len(chunk)
        after = os.fstat(fd)
    except OSError as exc:
        return f"unreadable: {exc.strerror}", got, False
    finally:
        os.close(fd)
    if after.st_nlink == 0:
        return "vanished while being read", got, False
    stamp = (before.st_size, before.st_mtime_ns)
    if got != before.st_size or (after.st_size, after.st_mtime_ns) != stamp:
        return "changed while being read", got, False
    return digest.hexdigest(), got, True


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
        self.not_regular: dict[str, tuple[str, int]] = {}
        self.reasons: list[str] = []
        self.total_bytes = 0
        #: every byte read, stored or not: files rewritten while read are read
        #: again next time, and must not make one scan read without end
        self.read_bytes = 0
        self.entries = 0
        self.stopped = False
        self.dirs: DirStamps = {}
        #: no directory was changed too recently for its stamp to be trusted
        self.settled = True
        self.started_ns = time.time_ns()

    def cap(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def directory(self, dir_fd: int, prefix: str, depth: int) -> None:
        try:
            # Before reading it: a change after this is seen by the next check.
            st = os.fstat(dir_fd)
            self.dirs[prefix[:-1]] = _dir_stamp(st)
            if max(st.st_mtime_ns, st.st_ctime_ns) >= self.started_ns - _STAMP_TICK_NS:
                self.settled = False
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
                kind = file_kind(seen.st_mode)
                self.skipped.append((rel, kind))
                self.not_regular[rel] = (kind, seen.st_ino)

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

    def look_again(self, rel: str, why: str) -> None:
        """Skip ``rel`` this time, keeping its old entry (if any): the next scan reads it."""
        self.skipped.append((rel, why))
        if rel in self.previous:
            self.snapshot[rel] = self.previous[rel]

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
            cap = human_size(self.max_bytes)
            self.cap(f"new or changed files total more than {cap} (max_bytes)")
            return
        if self.read_bytes + seen.st_size > 2 * self.max_bytes:
            self.look_again(rel, "over the bytes one scan may read")
            self.cap("files changed while read add up to more than twice max_bytes")
            return
        digest, size, ok = _hash_regular(dir_fd, name, seen)
        self.read_bytes += size
        if not ok:
            self.look_again(rel, digest)
            return
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
    through :func:`~sandkernel.files.listed_file_name` (as
    :class:`~sandkernel.files.FileStore` does for produced files).

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
    conclusive = walk.settled and not walk.skipped and not walk.reasons
    return ScanResult(
        changed=walk.changed,
        snapshot=walk.snapshot,
        removed=removed,
        skipped=walk.skipped,
        truncated=bool(walk.reasons),
        truncated_reason="; ".join(walk.reasons) or None,
        dirs=walk.dirs if conclusive else None,
        not_regular=walk.not_regular,
    )


def _dir_stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size, st.st_nlink)


def workspace_unchanged(
    root: str | os.PathLike[str], snapshot: Mapping[str, tuple[int, int, int]], dirs: DirStamps
) -> bool:
    """Whether a scan now would find exactly ``snapshot`` again, proved cheaply.

    True only if every directory of the last scan (``dirs``, from a
    :class:`ScanResult` that has them) still has its stamp, and every file of
    ``snapshot`` its size, ``mtime_ns`` and inode. That cannot miss a change
    a scan would see: adding, removing or renaming an entry sets its
    directory's mtime and ctime to the current time, which the scan's stamps
    predate by more than a clock tick; and a file's content is judged by the
    same stat fields a scan compares. The walk opens each directory relative
    to its parent with ``O_NOFOLLOW`` and follows no symlink; any surprise
    (a directory gone or replaced, a file not regular) answers False, and so
    does a tree of more than :data:`QUICK_CHECK_MAX_ENTRIES`.
    """
    if len(dirs) + len(snapshot) > QUICK_CHECK_MAX_ENTRIES or "" not in dirs:
        return False
    files: dict[str, list[str]] = {d: [] for d in dirs}
    subdirs: dict[str, list[str]] = {d: [] for d in dirs}
    for rel in snapshot:
        parent, _, name = rel.rpartition("/")
        if parent not in files:
            return False
        files[parent].append(name)
    for rel in dirs:
        if rel:
            parent, _, name = rel.rpartition("/")
            if parent not in subdirs:
                return False
            subdirs[parent].append(name)

    def same(dir_fd: int, rel_dir: str) -> bool:
        if _dir_stamp(os.fstat(dir_fd)) != dirs[rel_dir]:
            return False
        prefix = rel_dir + "/" if rel_dir else ""
        for name in files[rel_dir]:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                return False
            if (st.st_size, st.st_mtime_ns, st.st_ino) != snapshot[prefix + name]:
                return False
        for name in subdirs[rel_dir]:
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                if not same(child, prefix + name):
                    return False
            finally:
                os.close(child)
        return True

    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return False
    try:
        return same(root_fd, "")
    except OSError:
        return False
    finally:
        os.close(root_fd)


def empty_workspace_stamps(root: str | os.PathLike[str]) -> DirStamps | None:
    """The stamps of an empty, settled workspace: what a scan of it would record.

    Lets the first cell of a fresh workspace be checked by
    :func:`workspace_unchanged` instead of a scan. ``None`` if ``root``
    holds anything, cannot be opened, or changed within a clock tick.
    """
    started_ns = time.time_ns()
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)  # before reading it, as a scan does
        with os.scandir(fd) as it:
            if next(it, None) is not None:
                return None
    except OSError:
        return None
    finally:
        os.close(fd)
    if max(st.st_mtime_ns, st.st_ctime_ns) >= started_ns - _STAMP_TICK_NS:
        return None
    return {"": _dir_stamp(st)}


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
        return open_regular(parts[-1], dir_fd=fd)
    finally:
        os.close(fd)
