"""The supported-type table and the type a name implies."""

from __future__ import annotations

import pytest

from sandkernel.files import MIME_TYPES, mime_for_name
from tests.files._samples import SAMPLES


def test_mime_table_lists_the_documented_types() -> None:
    assert set(MIME_TYPES) == set(SAMPLES)
    assert MIME_TYPES[".py"] == ("text/x-python", "text/x-script.python")
    assert MIME_TYPES[".xml"] == ("application/xml", "text/xml")
    assert MIME_TYPES[".jpg"] == MIME_TYPES[".jpeg"] == ("image/jpeg",)
    assert MIME_TYPES[".csv"] == ("application/csv",)
    with pytest.raises(TypeError):
        MIME_TYPES[".exe"] = ("application/x-msdownload",)  # type: ignore[index]


def test_mime_for_name_prefers_the_table_then_the_builtin_one() -> None:
    assert mime_for_name("report.CSV") == "application/csv"
    assert mime_for_name("dir/script.py") == "text/x-python"
    assert mime_for_name("drawing.svg") == "image/svg+xml"
    assert mime_for_name("Makefile") is None
    assert mime_for_name("x.unknown-ext") is None
