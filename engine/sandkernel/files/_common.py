"""Pieces the file modules share: reading a host file safely, and sizes in words.

Private to sandkernel's file handling (this package;
:mod:`sandkernel.workspace`, whose scans read what the sandbox wrote; and the
daemon's client, which opens a path to upload as the store does, and
removes what a failed download left, as ``sandkernel files get`` does).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Final

from sandkernel.errors import FileRejected

#: How much is read at a time when content is copied or hashed.
CHUNK_BYTES: Final = 1024 * 1024


def human_size(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: a size as error messages give it."""
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    value = float(size)
    index = 0
    while value >= 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    shown = f"{value:.1f}".removesuffix(".0")
    return f"{shown} {units[index]}"


def open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> BinaryIO:
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
            f"cannot read {os.fsdecode(path)!r}: it is a {file_kind(mode)}, not a regular file"
        )
    return os.fdopen(fd, "rb")


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file is, in words."""
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


def remove_if_same_file(path: Path, written: os.stat_result) -> None:
    """Remove ``path`` if it is still the regular file ``written`` describes (``fstat``).

    For a partial copy a failed download leaves: never what a link or a
    device at ``path`` is, nor a file put there since.
    """
    with contextlib.suppress(OSError):
        found = path.lstat()
        if stat.S_ISREG(found.st_mode) and (found.st_dev, found.st_ino) == (
            written.st_dev,
            written.st_ino,
        ):
            path.unlink()
