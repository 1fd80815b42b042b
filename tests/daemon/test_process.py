"""The daemon as a real process: SIGKILL and restart, SIGTERM, refusals at start."""

from __future__ import annotations

import os
import signal
import socket as socket_module
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sandkernel.daemon.client import Client
from sandkernel.daemon.errors import SessionLost
from sandkernel.errors import FileTooLarge
from tests.daemon.conftest import leftovers_of, spawn_daemon, stop_process

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]


def test_after_sigkill_and_restart_files_survive_and_old_sessions_are_lost(
    short_dir: Path, tmp_path: Path
) -> None:
    socket, store, log = short_dir / "run" / "daemon.sock", tmp_path / "store", tmp_path / "log"
    first = spawn_daemon(socket, store, log)
    second = None
    try:
        with Client(socket) as client:
            session = client.session("before-crash")
            made = session.run("open('/mnt/data/kept.txt', 'w').write('survives a crash')")
            (produced,) = made.files
            uploaded = client.upload(b"a,b\n1,2\n", "in.csv", session_id="before-crash")
            assert session.run("1 + 1").text == "2"
        survivor = Client(socket)
        kept = survivor.get_session("before-crash")
        assert stop_process(first.process, signal.SIGKILL) == -signal.SIGKILL
        assert socket.exists()  # a killed daemon cannot remove its socket

        second = spawn_daemon(socket, store, log)
        assert leftovers_of(first.pid) == [], "the restarted daemon did not sweep the dead one"
        with Client(socket) as client:
            assert client.download(produced.id) == b"survives a crash"
            assert client.download(uploaded.id) == b"a,b\n1,2\n"
            assert {f.id for f in client.list_files(session_id="before-crash")} == {
                produced.id,
                uploaded.id,
            }
            with pytest.raises(SessionLost, match="lost: the daemon restarted at .*crashed"):
                client.get_session("before-crash")
            with pytest.raises(SessionLost, match='if_expired="new"'):
                client.session("before-crash")
        # A session a client held across the restart: closing it is done, as for any
        # ended session (its kernel ended with the daemon that ran it).
        kept.close()
        survivor.close()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket))) as raw:
            for method, path in [
                ("GET", "/v1/sessions/before-crash"),
                ("POST", "/v1/sessions/before-crash/execute"),
                ("DELETE", "/v1/sessions/before-crash"),
            ]:
                body = {"code": "1"} if method == "POST" else None
                response = raw.request(method, f"http://sandkernel{path}", json=body)
                assert response.status_code == 410, (method, path, response.text)
                assert response.json()["error"]["type"] == "SessionLost"
        with Client(socket) as client:
            fresh = client.session("before-crash", if_expired="new")
            result = fresh.run("'kept' in dir()")
            assert result.text == "False" and result.status == "ok"
            assert client.download(produced.id) == b"survives a crash"
    finally:
        stop_process(first.process, signal.SIGKILL)
        if second is not None:
            code = stop_process(second.process)
            assert code == 0, second.log_text()
    assert not socket.exists(), "a cleanly stopped daemon removes its socket"
    assert leftovers_of(first.pid) == [] and leftovers_of(second.pid) == []


def test_sigterm_ends_every_kernel_and_records_a_clean_stop(
    short_dir: Path, tmp_path: Path
) -> None:
    socket, store, log = short_dir / "daemon.sock", tmp_path / "store", tmp_path / "log"
    daemon = spawn_daemon(socket, store, log)
    try:
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600
        with Client(socket) as client:
            for name in ("a", "b"):
                assert client.session(name).run("x = 1").status == "ok"
            assert client.stats().sessions_active == 2
    finally:
        code = stop_process(daemon.process)
    assert code == 0, daemon.log_text()
    assert "every kernel ended" in daemon.log_text()
    assert leftovers_of(daemon.pid) == []
    assert not socket.exists()
    again = spawn_daemon(socket, store, log)
    try:
        with Client(socket) as client, pytest.raises(SessionLost, match="stopped at"):
            client.get_session("a")
    finally:
        assert stop_process(again.process) == 0


def test_tcp_without_a_token_is_refused_at_start(short_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SANDKERNEL_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "sandkernel.daemon", "serve", "--socket", str(short_dir / "s"),
         "--store", str(tmp_path / "store"), "--tcp", "0"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "needs a bearer token" in done.stderr and "--token" in done.stderr
    assert not (short_dir / "s").exists()


def test_a_tcp_port_in_use_is_refused_in_one_line(short_dir: Path, tmp_path: Path) -> None:
    with socket_module.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sandkernel.daemon", "serve", "--socket", str(short_dir / "s"),
             "--store", str(tmp_path / "store"), "--runtime-dir", str(short_dir / "rt"),
             "--pool-size", "0", "--tcp", str(port), "--token", "abc"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (refusal,) = [line for line in done.stderr.splitlines() if line.startswith("sandkernel:")]
    assert f"cannot listen on 127.0.0.1:{port}" in refusal and "another port" in refusal
    assert not (short_dir / "s").exists()


def test_a_second_daemon_on_the_same_socket_is_refused(short_dir: Path, tmp_path: Path) -> None:
    socket, log = short_dir / "daemon.sock", tmp_path / "log"
    first = spawn_daemon(socket, tmp_path / "store", log)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sandkernel.daemon", "serve", "--socket", str(socket),
             "--store", str(tmp_path / "store2"), "--runtime-dir", str(short_dir / "rt"),
             "--pool-size", "0"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert f"a daemon already listens at {socket}" in done.stderr
        with Client(socket) as client:
            assert client.health().pid == first.pid  # untouched
    finally:
        assert stop_process(first.process) == 0


def test_max_upload_mb_lets_a_file_of_that_size_through_and_refuses_a_byte_more(
    short_dir: Path, tmp_path: Path
) -> None:
    socket, store, log = short_dir / "run" / "daemon.sock", tmp_path / "store", tmp_path / "log"
    daemon = spawn_daemon(socket, store, log, "--max-upload-mb", "2")
    try:
        row = b"0123456789,abcdefghijklmnopqrstuvwxyz\n"  # 38 bytes
        at_cap = b"n,s\n" + row * ((2 << 20) // len(row))
        at_cap += b"#" * ((2 << 20) - len(at_cap) - 1) + b"\n"
        assert len(at_cap) == 2 << 20
        with Client(socket) as client:
            assert client.upload(at_cap, "at-cap.csv").size_bytes == 2 << 20
            with pytest.raises(FileTooLarge, match="--max-upload-mb") as refused:
                client.upload(at_cap + b"\n", "over.csv")
            assert "EngineConfig.max_upload_bytes" in str(refused.value)
            assert [f.name for f in client.list_files()] == ["at-cap.csv"]
    finally:
        assert stop_process(daemon.process) == 0, daemon.log_text()


def test_max_upload_mb_leaves_the_files_a_cell_writes_to_their_own_caps(
    short_dir: Path, tmp_path: Path
) -> None:
    socket, store, log = short_dir / "run" / "daemon.sock", tmp_path / "store", tmp_path / "log"
    daemon = spawn_daemon(socket, store, log, "--max-upload-mb", "1")
    try:
        with Client(socket) as client:
            session = client.session("writes")
            made = session.run("open('/mnt/data/big.bin', 'wb').write(b'x' * (2 << 20))")
            assert [(f.name, f.size_bytes) for f in made.files] == [("big.bin", 2 << 20)]
            assert not made.files_truncated, made.files_note
            assert client.download(made.files[0].id) == b"x" * (2 << 20)
            with pytest.raises(FileTooLarge, match="--max-upload-mb"):
                client.upload(b"y" * ((1 << 20) + 1), "big.txt", session_id="writes")
    finally:
        assert stop_process(daemon.process) == 0, daemon.log_text()
