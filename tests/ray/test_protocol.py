"""Ids that carry their node, and per-node paths: pure functions, no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from sandkernel.limits import id_problem  # noqa: E402 - after the skip
from sandkernel.ray._protocol import (  # noqa: E402 - after the skip
    MAX_NAME_LENGTH,
    check_name,
    claimed_from_elsewhere,
    cluster_file_id,
    expand_path,
    file_tag,
    node_tag,
    owner_id,
    parse_session_id,
    session_id_of,
)

pytestmark = pytest.mark.ray

NODE = "3fa2c1d0" + "ab" * 24


def test_node_tag_is_the_first_eight_hex_digits() -> None:
    assert node_tag(NODE) == "3fa2c1d0"
    assert node_tag(NODE.upper()) == "3fa2c1d0"
    with pytest.raises(ValueError, match="not a Ray node id"):
        node_tag("not-hex!")


def test_session_ids_carry_the_tag_and_round_trip() -> None:
    session_id = session_id_of("3fa2c1d0", "thread-42")
    assert session_id == "3fa2c1d0.thread-42"
    assert parse_session_id(session_id) == ("3fa2c1d0", "thread-42")
    assert parse_session_id("3fa2c1d0.a.b") == ("3fa2c1d0", "a.b")
    for bare in ("thread-42", "conv.1", "3FA2C1D0.x", "3fa2c1d.x", "3fa2c1d0"):
        assert parse_session_id(bare) is None, bare


def test_names_are_checked_and_leave_room_for_the_tag() -> None:
    check_name("a" * MAX_NAME_LENGTH)
    assert len(session_id_of("3fa2c1d0", "a" * MAX_NAME_LENGTH)) == 128
    for bad in ("a" * (MAX_NAME_LENGTH + 1), "", "-x", "x y", "x/y"):
        with pytest.raises(ValueError, match="invalid session id"):
            check_name(bad)


def test_file_ids_keep_the_local_shape_and_name_their_node() -> None:
    local = "file-" + "0123456789abcdef01234567"
    cluster = cluster_file_id("3fa2c1d0", local)
    assert cluster == "file-3fa2c1d00123456789abcdef"
    assert len(cluster) == len(local)
    assert file_tag(cluster) == "3fa2c1d0"
    assert file_tag("file-short") is None
    assert file_tag("3fa2c1d0.thread") is None
    with pytest.raises(ValueError, match="not a stored file id"):
        cluster_file_id("3fa2c1d0", "file-xyz")


def test_a_file_claimed_from_another_node_names_that_nodes_session() -> None:
    recorded = claimed_from_elsewhere("0b199042.thread-42")
    assert owner_id("3fa2c1d0", recorded) == "0b199042.thread-42"
    assert owner_id("3fa2c1d0", "thread-42") == "3fa2c1d0.thread-42"
    # No session of the node's own engine can have that id.
    assert id_problem(recorded, "session") is not None


def test_per_node_paths_expand_tag_and_id() -> None:
    assert expand_path(None, NODE) is None
    assert expand_path("/run/sk/{node}", NODE) == Path("/run/sk/3fa2c1d0")
    assert expand_path("/srv/{node_id}/files", NODE) == Path(f"/srv/{NODE}/files")
    assert expand_path(Path("/plain"), NODE) == Path("/plain")
