"""A file store in a temporary folder, closed after each test; file systems to break it on."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandkernel.files import FileStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    with FileStore(tmp_path / "store") as s:
        yield s


def _mount(*args: str | Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


def _unmount(path: Path) -> None:
    # Lazy: detached now even if a failed test left a file open in it.
    subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def make_read_only() -> Iterator[Callable[[Path], None]]:
    """Makes a folder read-only until the test ends, by a read-only bind mount over it.

    As the store sees a file system remounted read-only, except that files it
    opened before (its database) stay writable.
    """
    mounted: list[Path] = []

    def make(path: Path) -> None:
        _mount("--bind", path, path)
        mounted.append(path)
        _mount("-o", "remount,ro,bind", path)

    yield make
    for path in reversed(mounted):
        _unmount(path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 1 MiB file system of its own (tmpfs), to fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "sandkernel-test", disk)
    try:
        yield disk
    finally:
        _unmount(disk)
