"""`sandkernel doctor --model-url`: does the chat endpoint of the OpenAI-compatible API answer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandkernel import doctor
from sandkernel.doctor import Check, check_model_endpoint


class _Models(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.headers.get("Authorization") == "Bearer wrong":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"object": "list", "data": [{"id": "qwen2.5-coder"}]}).encode()
        status = 200 if self.path == "/v1/models" else 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_an_answering_endpoint_is_ok_and_lists_its_models(model_server: str) -> None:
    check = check_model_endpoint(model_server)
    assert check.ok and "qwen2.5-coder" in check.detail and not check.critical


def test_a_wrong_root_or_key_says_what_to_fix(model_server: str) -> None:
    wrong_root = check_model_endpoint(model_server.removesuffix("/v1"))
    assert not wrong_root.ok and "404" in wrong_root.detail and "/v1" in (wrong_root.fix or "")
    refused = check_model_endpoint(model_server, "wrong")
    assert not refused.ok and "--model-key-file" in (refused.fix or "")


def test_nothing_listening_is_reported_not_raised() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check = check_model_endpoint(f"http://127.0.0.1:{port}/v1", timeout_s=2)
    assert not check.ok and "--model-url" in (check.fix or "")


def test_a_mistyped_url_is_reported_not_raised() -> None:
    check = check_model_endpoint("http://127.0.0.1:8o80/v1", timeout_s=2)
    assert not check.ok and not check.critical
    assert (
        check.detail == "http://127.0.0.1:8o80/v1/models is not a valid URL: Invalid port: '8o80'"
    )
    assert "--model-url" in (check.fix or "")


def test_doctor_with_a_mistyped_url_warns_and_prints_every_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SANDKERNEL_DOCTOR", "")  # run_doctor sets it: put back after the test
    prerequisites = [Check("python", True, "engine on Python 3.12"), Check("root", False, "euid 7")]
    monkeypatch.setattr(doctor, "_prerequisites", lambda python: (prerequisites, None))
    exit_code = doctor.run_doctor(model_url="http://127.0.0.1:8o80/v1")
    printed = capsys.readouterr().out
    assert "  [ok  ] python " in printed and "  [FAIL] root " in printed
    assert (
        "  [warn] model endpoint     http://127.0.0.1:8o80/v1/models is not a valid URL" in printed
    )
    assert exit_code == 1 and "result: UNSAFE or unusable: 2 check(s) failed" in printed
