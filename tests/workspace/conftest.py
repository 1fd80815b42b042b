"""A file store in a temporary folder, closed after each test; fast-changing trees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandkernel.files import FileStore
from sandkernel.workspace import scan


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    with FileStore(tmp_path / "store") as s:
        yield s


@pytest.fixture
def no_stamp_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust directory stamps taken right after a change (the tests change trees fast)."""
    monkeypatch.setattr(scan, "_STAMP_TICK_NS", 0)
