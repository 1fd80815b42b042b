"""The daemon's parts that need no sandbox: events, error mapping, records, sockets, options."""

from __future__ import annotations

import argparse
import os
import socket
import stat
from pathlib import Path

import pytest

from sandkernel.daemon import sse
from sandkernel.daemon.cli import _tcp_address, add_daemon_parsers, daemon_config, engine_config
from sandkernel.daemon.errors import (
    DaemonError,
    InvalidRequest,
    RequestTooLarge,
    SessionLost,
    Unauthorized,
    error_from_response,
    error_type_for,
    status_for,
)
from sandkernel.daemon.records import SessionRecords
from sandkernel.daemon.server import DaemonConfig, bind_tcp_socket, bind_unix_socket
from sandkernel.errors import (
    FileRejected,
    FileTooLarge,
    KernelDead,
    PoolExhausted,
    SessionExpired,
    SessionLimitReached,
    SessionNotFound,
)
from sandkernel.files import DEFAULT_MAX_UPLOAD_BYTES


def test_events_round_trip_through_the_decoder() -> None:
    stream = b"".join(
        [
            sse.encode_json("stdout", {"msg_type": "stream", "content": {"text": "a\nb"}}),
            sse.KEEPALIVE,
            sse.encode(sse.RESULT, '{"status": "ok"}'),
        ]
    ).decode()
    decoder = sse.Decoder()
    events = [e for line in stream.split("\n") if (e := decoder.feed(line)) is not None]
    assert [e.event for e in events] == ["stdout", "result"]
    assert events[0].data == '{"msg_type":"stream","content":{"text":"a\\nb"}}'


@pytest.mark.parametrize(
    ("message", "event"),
    [
        ({"msg_type": "stream", "content": {"name": "stdout", "text": "x"}}, "stdout"),
        ({"msg_type": "stream", "content": {"name": "stderr", "text": "x"}}, "stderr"),
        ({"header": {"msg_type": "display_data"}, "content": {"data": {}}}, "display"),
        ({"msg_type": "execute_result", "content": {}}, "execute_result"),
        ({"msg_type": "error", "content": {"ename": "E"}}, "traceback"),
        ({"msg_type": "status", "content": {"execution_state": "idle"}}, None),
        ({"msg_type": "execute_input", "content": {}}, None),
    ],
)
def test_only_outputs_are_forwarded_under_their_event_name(
    message: dict[str, object], event: str | None
) -> None:
    found = sse.output_event(message)
    assert (found[0] if found else None) == event


def test_every_engine_error_has_its_status_and_comes_back_as_its_class() -> None:
    cases = [
        (SessionNotFound("x"), 404),
        (SessionExpired("x"), 410),
        (SessionLost("x"), 410),
        (KernelDead("x"), 409),
        (SessionLimitReached("x"), 429),
        (PoolExhausted("x"), 503),
        (FileRejected("upload rejected: .exe is not a supported type"), 422),
        (FileTooLarge("upload rejected: 'a' is larger than the 1 KiB size cap"), 413),
        (ValueError("invalid session id"), 400),
        (RuntimeError("bug"), 500),
    ]
    for exc, status in cases:
        assert status_for(exc) == status, exc
        if status < 500:
            back = error_from_response(status, error_type_for(exc), str(exc))
            expected = InvalidRequest if isinstance(exc, ValueError) else type(exc)
            assert type(back) is expected and str(back) == str(exc)
    assert isinstance(error_from_response(401, "Unauthorized", "m"), Unauthorized)
    assert isinstance(error_from_response(413, "RequestTooLarge", "m"), RequestTooLarge)
    unknown = error_from_response(418, "Teapot", "short and stout")
    assert type(unknown) is DaemonError and unknown.status_code == 418
    assert unknown.error_type == "Teapot"
    assert type(error_from_response(400, "NotAnError", "m")) is InvalidRequest


def test_records_tell_sessions_of_earlier_runs_and_how_they_ended(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    first = SessionRecords(path)
    first.open(now=1000.0)
    first.record("crashed-run", None, now=1001.0)
    assert first.lost("crashed-run") is None and "crashed-run" in first
    first._require_open().close()  # a crash: no finish()
    first._conn = None

    second = SessionRecords(path)
    second.open(now=2000.0)
    lost = second.lost("crashed-run")
    assert isinstance(lost, SessionLost)
    assert "restarted at 1970-01-01T00:33:20+00:00" in str(lost) and "crashed" in str(lost)
    second.record("clean-run", "agent-1")
    assert second.lost("never-seen") is None
    second.finish(now=2500.0)

    third = SessionRecords(path)
    third.open(now=3000.0)
    assert "stopped at 1970-01-01T00:41:40+00:00" in str(third.lost("clean-run"))
    assert third.lost("crashed-run") is not None
    third.record("crashed-run", None)  # a new session under the old id
    assert third.lost("crashed-run") is None
    third.finish()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_records_keep_a_bounded_memory_of_what_they_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sandkernel.daemon.records._RECORDED_IN_MEMORY", 3)
    records = SessionRecords(tmp_path / "records.sqlite3")
    records.open()
    for i in range(10):
        records.record(f"s{i}", None)
        assert f"s{i}" in records and len(records._recorded) <= 3
    records.record("s0", None)  # forgotten in memory: written again, the same record
    records.finish()
    again = SessionRecords(tmp_path / "records.sqlite3")
    again.open()
    assert all(again.lost(f"s{i}") is not None for i in range(10))
    again.finish()


@pytest.mark.anyio
async def test_a_session_live_or_ended_is_looked_up_by_its_id_not_in_the_whole_list(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from sandkernel.daemon.routes.lookup import SessionLookup
    from sandkernel.errors import SessionLost, SessionNotFound

    listed: list[str] = []

    class Engine:
        async def session_info(self, session_id: str) -> SimpleNamespace:
            if session_id not in ("alive", "ended"):
                raise SessionNotFound(session_id)
            return SimpleNamespace(id=session_id)

        async def sessions(self) -> list[SimpleNamespace]:
            listed.append("listed")
            return [SimpleNamespace(id="alive"), SimpleNamespace(id="ended")]

    records = SessionRecords(tmp_path / "records.sqlite3")
    records.open()
    records.record("gone-in-restart", None)
    records.finish()
    records = SessionRecords(tmp_path / "records.sqlite3")
    records.open()
    lookup = SessionLookup(Engine(), records)  # type: ignore[arg-type]
    assert (await lookup.info("alive")).id == "alive"
    assert (await lookup.info("ended")).id == "ended"
    assert listed == []
    with pytest.raises(SessionNotFound):
        await lookup.info("unknown")
    with pytest.raises(SessionLost):
        await lookup.info("gone-in-restart")
    records.finish()


def test_the_socket_is_0600_and_unsafe_places_are_refused(tmp_path: Path) -> None:
    base = Path("/tmp") / f"skd-parts-{os.getpid()}"
    base.mkdir(mode=0o700)
    try:
        path = base / "a" / "daemon.sock"
        sock = bind_unix_socket(path)
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            with pytest.raises(DaemonError, match="already listens"):
                bind_unix_socket(path)
        finally:
            sock.close()
        again = bind_unix_socket(path)  # a stale socket file is replaced
        again.close()
        path.unlink()
        path.write_text("not a socket")
        with pytest.raises(DaemonError, match="is not a socket"):
            bind_unix_socket(path)
        open_dir = base / "open"
        open_dir.mkdir()
        open_dir.chmod(0o777)
        with pytest.raises(DaemonError, match="writable by it alone"):
            bind_unix_socket(open_dir / "daemon.sock")
        assert not (open_dir / "daemon.sock").exists()
    finally:
        for p in sorted(base.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        base.rmdir()


def test_tcp_without_a_token_is_refused_by_the_config(tmp_path: Path) -> None:
    with pytest.raises(DaemonError, match="needs a bearer token"):
        DaemonConfig(tmp_path / "s", tmp_path / "r", tcp=("127.0.0.1", 0))
    config = DaemonConfig(tmp_path / "s", tmp_path / "r", tcp=("127.0.0.1", 0), token="s3cret-xyz")
    assert config.token == "s3cret-xyz" and "s3cret-xyz" not in repr(config)  # kept out of logs


def test_command_line_options() -> None:
    parser = argparse.ArgumentParser()
    add_daemon_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--tcp", "8765", "--pool-size", "4", "--prewarm", ""])
    assert args.daemon_command == "serve" and args.pool_size == 4 and args.prewarm == ()
    args = parser.parse_args(["serve", "--prewarm", "numpy, os.path,"])
    assert args.prewarm == ("numpy", "os.path")
    assert args.batch_workers is None and not args.fusion_without_token
    args = parser.parse_args(["serve", "--batch-workers", "3", "--fusion-without-token"])
    assert args.batch_workers == 3 and args.fusion_without_token
    assert _tcp_address("8765") == ("127.0.0.1", 8765)
    assert _tcp_address("0.0.0.0:1") == ("0.0.0.0", 1)
    assert _tcp_address("[::1]:99") == ("::1", 99)
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        _tcp_address("host:port")
    with pytest.raises(argparse.ArgumentTypeError, match="0-65535"):
        _tcp_address("99999")
    assert parser.parse_args(["serve", "--tcp", "[::1]:99"]).tcp == ("::1", 99)
    mcp = parser.parse_args(["mcp", "--socket", "/run/x.sock"])
    assert mcp.daemon_command == "mcp" and mcp.socket == "/run/x.sock"


def test_a_prewarm_module_that_is_not_a_module_name_is_an_argument_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="sandkernel")
    add_daemon_parsers(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["serve", "--prewarm", "numpy pandas"])
    assert exited.value.code == 2
    assert "argument --prewarm: 'numpy pandas' is not a module name" in capsys.readouterr().err


def test_max_upload_mb_caps_each_file_with_the_body_limit_just_above_it() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    add_daemon_parsers(commands)
    args = parser.parse_args(["serve", "--max-upload-mb", "3", "--store", "/tmp/x"])
    assert engine_config(args).max_upload_bytes == 3 << 20
    body_limit = daemon_config(args).max_upload_bytes
    # Room for a file of the cap's size, its multipart framing and form fields; no more.
    assert (3 << 20) + (16 << 10) <= body_limit <= (3 << 20) + (1 << 20)
    # Not given: the engine's own cap, which the help names.
    default = parser.parse_args(["serve", "--store", "/tmp/x"])
    assert engine_config(default).max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    assert daemon_config(default).max_upload_bytes > DEFAULT_MAX_UPLOAD_BYTES
    assert engine_config(parser.parse_args(["mcp"])).max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    shown = " ".join(commands.choices["serve"].format_help().split())
    assert f"(default: {DEFAULT_MAX_UPLOAD_BYTES >> 20}, the engine's max_upload_bytes)" in shown


def test_bind_helper_leaves_no_socket_on_failure(tmp_path: Path) -> None:
    # A path too long for AF_UNIX: the bind fails and nothing stays open or on disk.
    deep = Path("/tmp") / ("x" * 120) / "daemon.sock"
    with pytest.raises(OSError):
        bind_unix_socket(deep)
    assert not deep.exists()
    deep.parent.rmdir()


def test_accepted_tcp_connections_do_not_wait_for_delayed_acks() -> None:
    # Nagle's algorithm on the server side holds a response's second write
    # until the client ACKs the first, which it delays by ~40 ms on a
    # kept-alive connection: every accepted connection must have TCP_NODELAY.
    with bind_tcp_socket("127.0.0.1", 0) as listener:
        with socket.create_connection(listener.getsockname()[:2]) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert client.fileno() >= 0


def test_a_taken_tcp_port_is_refused_saying_where_and_what_to_do() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(DaemonError) as refused:
            bind_tcp_socket("127.0.0.1", port)
    message = str(refused.value)
    assert f"127.0.0.1:{port}" in message and "--tcp" in message and "stop" in message
    assert "\n" not in message
