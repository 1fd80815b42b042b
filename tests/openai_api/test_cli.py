"""``sandkernel serve --model-url/--model-key-file``, carried in DaemonConfig."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sandkernel.daemon.cli import add_daemon_parsers, daemon_config
from sandkernel.daemon.server import DaemonConfig
from sandkernel.errors import DaemonError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_daemon_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_serve_carries_the_model_endpoint_and_puts_the_state_beside_the_store(
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text("sk-local\n")
    store = tmp_path / "files"
    config = daemon_config(
        parse(
            "--model-url",
            "http://127.0.0.1:8081/v1",
            "--model-key-file",
            str(key),
            "--store",
            str(store),
        )  # fmt: skip
    )
    assert config.model_url == "http://127.0.0.1:8081/v1"
    assert config.model_key() == "sk-local"
    assert config.openai_state == tmp_path / "files-openai.sqlite3"
    assert "sk-local" not in repr(config)
    bare = daemon_config(parse("--store", str(store)))
    assert bare.model_url is None and bare.model_key() is None


def test_an_unreadable_key_file_names_the_option(tmp_path: Path) -> None:
    config = DaemonConfig(
        socket_path=tmp_path / "d.sock",
        records_path=tmp_path / "records.sqlite3",
        model_key_file=tmp_path / "missing",
    )
    with pytest.raises(DaemonError, match="--model-key-file"):
        config.model_key()
    assert config.openai_state == tmp_path / "records-openai.sqlite3"
