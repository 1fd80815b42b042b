"""Mounts on the host: a kernel's size-limited tmpfs folders, and their removal."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from pathlib import Path

# The C library is already in this process: its symbols are found without a
# search (`ctypes.util.find_library` runs `ldconfig -p` in a subprocess).
_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2


def mount_tmpfs(path: Path, *, size_mb: int, inodes: int, mode: int = 0o700) -> None:
    """Mount a size- and inode-limited tmpfs owned by root at ``path`` (host namespace)."""
    options = f"size={size_mb}m,nr_inodes={inodes},mode={mode:04o},uid=0,gid=0"
    rc = _libc.mount(
        b"sandkernel", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs at {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    """Lazily unmount ``path``; not mounted is fine."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this mount namespace (deepest first)."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
