"""The daemon against its own OpenAPI schema, fuzzed by schemathesis with every check.

A real daemon process over loopback TCP with its bearer token: schemathesis
reads ``/openapi.json`` and sends each operation valid and invalid requests
(a bounded number), then checks every answer: no 5xx, a documented status,
content type and headers, a body matching the documented schema, invalid
input refused with a 4xx, valid input accepted, 405 with the right
``Allow`` for undocumented methods.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from tests.daemon.conftest import spawn_daemon, stop_process  # noqa: E402

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(300)]

TOKEN = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Examples per operation and phase: enough to reach every field, small enough for ~1 minute.
MAX_EXAMPLES = 25
NDJSON = "application/x-ndjson"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@schemathesis.serializer(NDJSON)
def _ndjson(ctx: Any, value: Any) -> bytes:
    # /v1/runs takes a RunRequest a line; its schema there is a string.
    return value.encode() if isinstance(value, str) else json.dumps(value).encode()


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A daemon process on loopback TCP (a small engine: few sessions, one batch worker)."""
    folder = Path(tmp_path_factory.mktemp("fuzz"))
    sockets = Path("/tmp") / f"skf-{secrets.token_hex(4)}"
    port = _free_port()
    daemon = spawn_daemon(
        sockets / "daemon.sock", folder / "store", folder / "log",
        "--tcp", f"127.0.0.1:{port}", f"--token={TOKEN}", "--max-sessions", "4",
        "--batch-workers", "1", "--session-ttl", "120", "--acquire-timeout", "5",
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(daemon.process)
        shutil.rmtree(sockets, ignore_errors=True)
        assert "Traceback" not in daemon.log_text(), daemon.log_text()[-5000:]


def _failures(events: Any) -> tuple[list[str], int]:
    """Every check failure and engine error of a run, described; and the cases sent."""
    from schemathesis.engine import Status
    from schemathesis.engine import events as engine_events

    found: list[str] = []
    sent = 0
    for event in events:
        if isinstance(event, engine_events.ScenarioFinished | engine_events.FuzzScenarioFinished):
            recorder = event.recorder
            sent += len(recorder.interactions)
            for checks in recorder.checks.values():
                for check in checks:
                    if check.status is Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        found.append(
                            f"{recorder.label}: {check.name}: {failure.title}\n{failure.message}\n"
                            f"  {check.failure_info.code_sample}"
                        )
        elif isinstance(event, engine_events.NonFatalError | engine_events.FatalError):
            found.append(
                f"engine error: {event.info.format() if hasattr(event, 'info') else event}"
            )
    return found, sent


#: The run's settings, in schemathesis' configuration format. Every check is on; where
#: one is tuned, the comment says why.
CONFIG = f"""
headers = {{ Authorization = "Bearer {TOKEN}" }}
workers = 1
request-timeout = 30

[generation]
max-examples = {MAX_EXAMPLES}
deterministic = true

[checks.positive_data_acceptance]
# 410 answers a session that ended (closed, expired, lost): the session's state, not
# the request's data, which schemathesis counts as refused.
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "410", "429", "5xx"]

[checks.negative_data_rejection]
# The same 410: a session found ended is answered before the request's data is read.
expected-statuses = ["400", "401", "403", "404", "406", "410", "413", "415", "422", "5xx"]

[checks.not_a_server_error]
# 503 with Retry-After is the documented answer of an engine whose sandboxes are all
# taken (PoolExhausted): a small engine under a fuzzer's load, not a fault.
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[checks.use_after_free]
# DELETE /v1/sessions/{{id}} closes a session; by design the daemon keeps answering for an
# ended session (its info, state `closed`, and its files, kept in the store), which this
# check takes for a deleted resource still served.
enabled = false

[[operations]]
include-method = "POST"
include-path-regex = "^/v1/(sessions/[^/]+/)?files$"
# The store refuses an upload by its name, type and content (FileRejected, 422) or size
# (413), which the schema of a multipart file part cannot express.
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "410", "413", "422", "429", "5xx",
]

[[operations]]
include-method = "POST"
include-path = "/v1/runs"
# An NDJSON body's lines are runs answered one by one: a line that is not a run gets its
# error line and the others still run (200), by design. Its schema can only call the
# body a string, so whatever schemathesis sends as a schema-violating case is still a
# string on the wire. (A JSON body is read as /v1/run's, which keeps the check.)
checks.negative_data_rejection.enabled = false
"""


def test_the_daemon_keeps_to_its_schema(daemon_url: str) -> None:
    config = schemathesis.config.SchemathesisConfig.from_str(CONFIG)
    schema = schemathesis.openapi.from_url(
        f"{daemon_url}/openapi.json", config=config, headers=AUTH
    )
    failures, sent = _failures(schemathesis.engine.from_schema(schema).execute())
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert sent > 100  # the run reached the daemon
