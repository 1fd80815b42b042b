"""Names: an upload's name, and the listed form of a produced file's name."""

from __future__ import annotations

import json
import os
import random
import sys
import unicodedata
from pathlib import Path
from urllib.parse import quote

import pytest

from sandkernel.errors import FileRejected
from sandkernel.files import (
    FileStore,
    StoredFile,
    check_upload,
    listed_file_name,
    raw_file_name,
    safe_name,
)

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("data.csv", "data.csv"),
        ("../x.csv", "x.csv"),
        ("/etc/x.csv", "x.csv"),
        ("a/../../b.csv", "b.csv"),
        ("folder/sub/data.csv", "data.csv"),
        ("C:\\Users\\me\\data.csv", "data.csv"),
        ("..\\..\\win.csv", "win.csv"),
        ("r\u00e9sum\u00e9 2024.md", "r\u00e9sum\u00e9 2024.md"),
    ],
)
def test_traversing_and_absolute_names_reduce_to_their_basename(
    store: FileStore, given: str, kept: str
) -> None:
    assert safe_name(given) == kept
    stored = store.add_bytes(b"a,b\n" if kept.endswith(".csv") else b"# t\n", given)
    assert stored.name == kept
    assert "/" not in stored.name and "\\" not in stored.name


def test_traversal_to_a_file_without_a_supported_extension_is_refused() -> None:
    with pytest.raises(FileRejected, match="'passwd' has no extension"):
        check_upload("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("..", "names a directory"),
        ("../", "names a directory"),
        ("a/..", "names a directory"),
        ("dir/", "names a directory"),
        (".", "names a directory"),
        ("x\x00.csv", "NUL byte"),
        ("a\nb.csv", "line break"),
        ("a\rb.csv", "line break"),
        ("tab\there.csv", r"invisible character U\+0009"),
        ("report\u202etxt.csv", r"invisible character U\+202E"),
        ("bad\udcff.csv", "not valid Unicode"),
        ("\u00e9" * 126 + ".txt", "names are limited to 255 bytes"),
        ("d/" * 2100 + "x.csv", "the limit is 4096"),
    ],
)
def test_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(FileRejected, match=why):
        safe_name(name)
    with pytest.raises(FileRejected, match=why):
        check_upload(name, b"a,b\n")


def test_a_name_of_exactly_255_bytes_is_kept() -> None:
    name = "a" * 251 + ".txt"
    assert safe_name(name) == name


# --------------------------------------------------------------------------- listed names

# Pieces that look alike once escaped naively: escapes spelt out literally,
# the characters they stand for, bytes that are not UTF-8, partial UTF-8
# sequences that adjacent pieces may complete, and characters that do show.
_TRICKY_PIECES: tuple[bytes, ...] = (
    b"\\", b"\\\\", b"\\n", b"\\x", b"\\xff", b"\\u202e", b"\\U0001f600", b"\\q",
    b"n", b"x", b"u", b"f", b"0", b".txt", b" ", b"/",
    b"\n", b"\t", b"\r", b"\x00", b"\x1b", b"\x7f",
    b"\xff", b"\x80", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xf0\x9f\x98",
    "\u00e9".encode(), "\x85".encode(), "\u00a0".encode(), "\u200d".encode(),
    "\u202e".encode(), "\u2028".encode(), "\ue000".encode(), "\U0001f600".encode(),
    "\U000e0001".encode(), "\U0010ffff".encode(), "\u4e2d".encode(),
)  # fmt: skip


def _tricky_names(count: int, seed: int) -> set[bytes]:
    rng = random.Random(seed)
    return {b"".join(rng.choices(_TRICKY_PIECES, k=rng.randint(1, 8))) for _ in range(count)}


def _shows_as_itself(listed: str) -> bool:
    """Fit for JSON, SQLite and an HTTP header: valid Unicode, every character visible."""
    listed.encode("utf-8")  # raises on a surrogate
    hidden = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
    return not any(unicodedata.category(char) in hidden for char in listed)


@pytest.mark.parametrize(
    "name",
    ["data.csv", "sp ace.txt", "-dash.txt", ".hidden", "C:evil.txt", "r\u00e9sum\u00e9.md",
     "emoji-\U0001f600.txt", "\u4e2d\u6587.txt", "nbsp\u00a0kept.txt", "a" * 251 + ".txt"],
)  # fmt: skip
def test_printable_names_without_a_backslash_are_listed_as_they_are(name: str) -> None:
    assert listed_file_name(name) == name
    assert listed_file_name(name.encode()) == name
    assert raw_file_name(name) == name.encode()


@pytest.mark.parametrize(
    ("raw", "listed"),
    [
        (b"sk new\nline.txt", "sk new\\nline.txt"),
        (b"sk new\\nline.txt", "sk new\\\\nline.txt"),
        (b"bad\xff.txt", "bad\\xff.txt"),
        (b"tab\there\r.txt", "tab\\there\\r.txt"),
        (b"\\x41.txt", "\\\\x41.txt"),
        (b"C:\\evil.txt", "C:\\\\evil.txt"),
        ("report\u202etxt.exe".encode(), "report\\u202etxt.exe"),
        (b"esc-\x1b[31m-del-\x7f.txt", "esc-\\u001b[31m-del-\\u007f.txt"),
        ("tag\U000e0001-pua\ue000.txt".encode(), "tag\\U000e0001-pua\\ue000.txt"),
        # U+0085 (the UTF-8 bytes c2 85) and the lone byte 85 are different names.
        ("nel\x85.txt".encode(), "nel\\u0085.txt"),
        (b"nel\x85.txt", "nel\\x85.txt"),
        (b"cut\xc3.txt", "cut\\xc3.txt"),
        (b"surrogate\xed\xa0\x80.txt", "surrogate\\xed\\xa0\\x80.txt"),
        (b"sub dir/new\nline.txt", "sub dir/new\\nline.txt"),
    ],
)
def test_names_are_listed_with_reversible_escapes(raw: bytes, listed: str) -> None:
    assert listed_file_name(raw) == listed
    assert listed_file_name(os.fsdecode(raw)) == listed
    assert raw_file_name(listed) == raw
    assert _shows_as_itself(listed)


def test_every_one_and_two_byte_name_round_trips_under_its_own_listed_name() -> None:
    names = [bytes([a]) for a in range(256)] + [
        bytes([a, b]) for a in range(256) for b in range(256)
    ]
    listed: dict[str, bytes] = {}
    for raw in names:
        shown = listed_file_name(raw)
        assert raw_file_name(shown) == raw, (raw, shown)
        assert listed.setdefault(shown, raw) == raw, f"{raw!r} and {listed[shown]!r} -> {shown!r}"
    assert len(listed) == len(names)


def test_every_character_round_trips_and_only_visible_ones_are_listed() -> None:
    # Characters 4096 at a time: a name round-trips only if each of them does.
    for start in range(0, sys.maxunicode + 1, 4096):
        codes = range(start, min(start + 4096, sys.maxunicode + 1))
        # Surrogates are not characters: UTF-8 cannot hold them.
        raw = "".join(chr(c) for c in codes if not 0xD800 <= c <= 0xDFFF).encode()
        shown = listed_file_name(raw)
        assert raw_file_name(shown) == raw, hex(start)
        assert _shows_as_itself(shown), hex(start)


def test_tricky_names_round_trip_and_never_share_a_listed_name() -> None:
    names = _tricky_names(20_000, seed=20240611)
    listed: dict[str, bytes] = {}
    for raw in names:
        shown = listed_file_name(raw)
        assert raw_file_name(shown) == raw, (raw, shown)
        assert os.fsencode(os.fsdecode(raw_file_name(shown))) == raw
        assert _shows_as_itself(shown), shown
        assert json.loads(json.dumps(shown)) == shown
        assert listed.setdefault(shown, raw) == raw, f"{raw!r} and {listed[shown]!r} -> {shown!r}"


def test_names_a_scan_decodes_are_listed_like_their_bytes() -> None:
    # os.fsdecode's surrogate escapes and the bytes they stand for: one name.
    assert listed_file_name("bad\udcff.txt") == listed_file_name(b"bad\xff.txt") == "bad\\xff.txt"
    # The two bytes of "é", decoded one by one elsewhere, are still "é".
    assert listed_file_name("caf\udcc3\udca9.md") == "caf\u00e9.md"
    # A lone surrogate stands for no byte: it is listed apart from the bytes
    # that UTF-8 would give it, and names no file.
    assert listed_file_name("a\ud800b") == "a\\ud800b" != listed_file_name(b"a\xed\xa0\x80b")
    with pytest.raises(ValueError, match=r"\\ud800 is a lone surrogate"):
        raw_file_name("a\\ud800b")


def test_names_safe_name_accepts_need_no_escape() -> None:
    rng = random.Random(7)
    accepted = 0
    for raw in _tricky_names(5_000, seed=11):
        try:
            kept = safe_name(os.fsdecode(raw).replace("/", "_") + ".txt")
        except FileRejected:
            continue
        accepted += 1
        assert listed_file_name(kept) == kept and raw_file_name(kept) == kept.encode()
    for _ in range(2_000):
        name = "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randint(1, 12)))
        try:
            kept = safe_name(name)
        except FileRejected:
            continue
        accepted += 1
        assert listed_file_name(kept) == kept
    assert accepted > 1_000  # the property was checked on many names, not vacuously


@pytest.mark.parametrize(
    ("listed", "why"),
    [
        ("trailing\\", r"backslash at index 8 starts no escape"),
        ("a\\qb", r"backslash at index 1 starts no escape"),
        ("short\\x4", r"backslash at index 5 starts no escape"),
        ("short\\u12", r"backslash at index 5 starts no escape"),
        ("big\\U00110000", r"past U\+10FFFF"),
        ("\\udcff", r"\\udcff is a lone surrogate"),
        ("\\ud83d\\ude00", r"\\ud83d is a lone surrogate"),
        ("given\ud800as is", r"\\ud800 is a lone surrogate"),
    ],
)
def test_raw_file_name_refuses_what_no_listed_name_is(listed: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        raw_file_name(listed)


def test_look_alike_produced_names_are_stored_apart_and_map_back(store: FileStore) -> None:
    raws = {b"sk new\nline.txt": b"line feed", b"sk new\\nline.txt": b"backslash n",
            b"bad\xff.txt": b"not utf-8"}  # fmt: skip
    stored = {
        raw: store.add_bytes(data, os.fsdecode(b"out/" + raw), origin="produced",
                             session_id="s", path=os.fsdecode(b"/mnt/data/out/" + raw))
        for raw, data in raws.items()
    }  # fmt: skip
    assert len({s.name for s in stored.values()}) == 3
    assert len({s.path for s in stored.values()}) == 3
    for raw, record in stored.items():
        again = store.get(record.id)  # through SQLite
        assert again == record
        assert raw_file_name(again.name) == raw
        assert again.path is not None and raw_file_name(again.path) == b"/mnt/data/out/" + raw
        assert store.read_bytes(record.id) == raws[raw]
        assert StoredFile.model_validate_json(record.model_dump_json()) == record
        header = f"attachment; filename*=UTF-8''{quote(record.name)}"
        assert header.isascii() and header.isprintable()


def test_the_daemons_schema_tells_clients_how_names_are_escaped(tmp_path: Path) -> None:
    from sandkernel.daemon.app import create_app
    from sandkernel.daemon.records import SessionRecords
    from sandkernel.engine import Engine

    app = create_app(Engine(store_dir=tmp_path / "store"), SessionRecords(tmp_path / "r.sqlite3"))
    schemas = app.openapi()["components"]["schemas"]
    stored_name = schemas["StoredFile"]["properties"]["name"]["description"]
    for escape in ("`\\\\`", "`\\n`", "`\\t`", "`\\r`", "`\\xNN`", "`\\uXXXX`", "`\\UXXXXXXXX`"):
        assert escape in stored_name
    for model in ("StoredFile", "ProducedFile"):
        properties = schemas[model]["properties"]
        assert "raw_file_name" in properties["name"]["description"]
        assert "escaped" in properties["path"]["description"]
