"""`sandkernel doctor --model-url`: does the chat endpoint of the OpenAI-compatible API answer."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sandkernel.doctor import check_model_endpoint


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
