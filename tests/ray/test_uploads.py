"""An upload's bytes read on the driver's side: the local store's rules, before any node."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("ray")

from sandkernel.errors import BadInput, FileTooLarge  # noqa: E402
from sandkernel.ray._uploads import read_upload  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "source", [b"x" * 1025, bytearray(b"x" * 1025), io.BytesIO(b"x" * 1025)], ids=type
)
async def test_an_upload_past_the_cap_is_file_too_large(source: object) -> None:
    with pytest.raises(FileTooLarge, match="max_upload_bytes"):
        await read_upload(source, "big.txt", 1024)  # type: ignore[arg-type]
    assert await read_upload(b"x" * 1024, "fits.txt", 1024) == (b"x" * 1024, "fits.txt")


async def test_a_stream_whose_read_returns_text_is_refused_as_a_text_stream() -> None:
    class Texts:
        name = "note.txt"

        def read(self, size: int = -1) -> str:
            return "/etc/hostname"

    with pytest.raises(BadInput, match="text stream"):
        await read_upload(Texts(), None, 1024)  # type: ignore[arg-type]
