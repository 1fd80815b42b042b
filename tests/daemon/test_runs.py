"""One-shot runs over HTTP: SandboxFusion's `/run_code` and `/run_jupyter`, and `/v1/run(s)`.

The SandboxFusion bodies are the ones its documentation shows (a `language`,
`code`, optional `stdin`, `run_timeout`, `memory_limit_MB`, `files` as
path -> base64, `fetch_files`), posted by a plain HTTP client with no token,
as verl and SandboxFusion's own SDK send them.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import anyio
import httpx
import pytest

from sandkernel.batch import RunRequest
from sandkernel.daemon.errors import DaemonError
from sandkernel.daemon.server import DaemonConfig
from sandkernel.session import Session
from tests.daemon.conftest import DaemonFactory, RunningDaemon

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

RESPONSE_FIELDS = {
    "status", "message", "compile_result", "run_result", "executor_pod_name", "files",
}  # fmt: skip
RUN_RESULT_FIELDS = {"status", "execution_time", "return_code", "stdout", "stderr"}
BATCH_ONLY = {"pool_size": 0, "batch_workers": 1}


async def fusion_daemon(daemon_factory: DaemonFactory, **config: Any) -> RunningDaemon:
    config.setdefault("fusion_without_token", True)
    return await daemon_factory(engine_options=BATCH_ONLY, tcp=("127.0.0.1", 0), **config)


def loopback(running: RunningDaemon, **kwargs: Any) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=running.url, timeout=60, **kwargs)
    running.clients.append(client)
    return client


async def run_code(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/run_code", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert set(answer) == RESPONSE_FIELDS
    assert answer["compile_result"] is None  # python and pytest compile nothing
    if answer["run_result"] is not None:
        assert set(answer["run_result"]) == RUN_RESULT_FIELDS
    return answer


async def test_run_code_answers_sandboxfusion_bodies_field_by_field(
    daemon_factory: DaemonFactory,
) -> None:
    running = await fusion_daemon(daemon_factory)
    http = loopback(running)

    r = await run_code(http, {"code": 'print("Hello, world!")', "language": "python"})
    assert (r["status"], r["message"], r["files"]) == ("Success", "", {})
    assert isinstance(r["executor_pod_name"], str) and r["executor_pod_name"]
    rr = r["run_result"]
    assert (rr["status"], rr["return_code"], rr["stdout"], rr["stderr"]) == (
        "Finished", 0, "Hello, world!\n", "",
    )  # fmt: skip
    assert 0 < rr["execution_time"] < 10

    r = await run_code(
        http, {"code": "print(input()[::-1])", "stdin": "sandbox", "language": "python"}
    )
    assert r["status"] == "Success" and r["run_result"]["stdout"] == "xobdnas\n"

    r = await run_code(http, {"code": "import sys\nsys.exit(1)", "language": "python"})
    assert r["status"] == "Failed"
    assert (r["run_result"]["status"], r["run_result"]["return_code"]) == ("Finished", 1)

    r = await run_code(
        http, {"code": "def f():\n    raise ValueError('boom')\nf()", "language": "python"}
    )
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 1
    stderr = r["run_result"]["stderr"]
    assert stderr.startswith("Traceback (most recent call last):")
    assert "in f" in stderr and stderr.rstrip().endswith("ValueError: boom")

    started = time.monotonic()
    r = await run_code(
        http, {"code": "while True:\n    pass", "language": "python", "run_timeout": 1}
    )
    assert time.monotonic() - started < 1 + 1
    assert r["status"] == "Failed" and r["run_result"]["status"] == "TimeLimitExceeded"

    r = await run_code(
        http,
        {"code": "x = bytearray(400 * 1024 * 1024)\nprint('allocated')", "language": "python",
         "memory_limit_MB": 128},
    )  # fmt: skip
    assert r["status"] == "Failed" and r["run_result"]["return_code"] != 0
    assert "allocated" not in r["run_result"]["stdout"]
    assert "MemoryError" in r["run_result"]["stderr"]

    blob = bytes(range(256)) * 64
    r = await run_code(
        http,
        {
            "code": "import pathlib\n"
            "data = pathlib.Path('data/in.bin').read_bytes()\n"
            "pathlib.Path('out.bin').write_bytes(data[::-1])\n",
            "language": "python",
            "files": {"data/in.bin": base64.b64encode(blob).decode()},
            "fetch_files": ["out.bin", "never-written.txt"],
        },
    )
    assert r["status"] == "Success", r
    assert set(r["files"]) == {"out.bin"}
    assert base64.b64decode(r["files"]["out.bin"]) == blob[::-1]

    r = await run_code(
        http,
        {"code": "def test_sum():\n    assert 1 + 1 == 2\n\ndef test_wrong():\n    assert 2 == 3\n",
         "language": "pytest"},
    )  # fmt: skip
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 1
    assert "1 failed, 1 passed" in r["run_result"]["stdout"]

    r = await run_code(http, {"code": "int main() { return 0; }", "language": "cpp"})
    assert r["status"] == "SandboxError" and r["run_result"] is None
    assert "cpp" in r["message"] and "python, pytest" in r["message"]

    ping = await http.get("/v1/ping")
    assert (ping.status_code, ping.text) == (200, "pong")


async def test_run_jupyter_runs_cells_in_a_kernel_used_once(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory(
        engine_options={"pool_size": 1},  # the batch path starts only when used
        tcp=("127.0.0.1", 0),
        fusion_without_token=True,
    )
    http = loopback(running)
    body = {
        "cells": ["x = 40 + 2", "print(x)", "open('answer.txt', 'w').write(str(x))", "1/0"],
        # A path no file can have (a lone surrogate) is skipped, as /run_code skips it.
        "fetch_files": ["answer.txt", "\ud800"],
    }
    json_body = json.dumps(body)  # the surrogate escaped: valid JSON, as a client sends it
    response = await http.post(
        "/run_jupyter", content=json_body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    r = response.json()
    assert set(r) == {"status", "message", "driver", "cells", "executor_pod_name", "files"}
    assert len(r["cells"]) == 4
    assert r["cells"][1]["stdout"] == "42\n"
    assert r["cells"][3]["error"] and r["cells"][3]["error"][0]["ename"] == "ZeroDivisionError"
    assert base64.b64decode(r["files"]["answer.txt"]) == b"42" and len(r["files"]) == 1
    # Used once: a second request does not see the first one's variables.
    response = await http.post("/run_jupyter", json={"cells": ["print(x)"]})
    assert response.json()["cells"][0]["error"][0]["ename"] == "NameError"


async def test_run_jupyter_whose_client_went_interrupts_its_cells_and_frees_the_kernel(
    daemon_factory: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await daemon_factory(engine_options={"pool_size": 1})
    made: list[Session] = []
    make = running.engine.session

    async def session(*args: Any, **kwargs: Any) -> Session:
        made.append(await make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(running.engine, "session", session)
    gone = running.raw()
    body = {"cells": ["import time\ntime.sleep(60)"], "total_timeout": 120}
    with pytest.raises(httpx.TimeoutException):
        await gone.post("/run_jupyter", json=body, timeout=2)  # gives up, hangs up
    await gone.aclose()
    (used,) = made
    kernel = used.kernel
    if kernel is not None:  # else: already ended
        # Not the 60 s its cell would take: the cell interrupted, the session closed.
        with anyio.fail_after(15):
            await kernel.wait_ended()
    assert used.closed


@pytest.mark.parametrize("path", ["/v1/run", "/run_code"])
async def test_a_one_shot_run_whose_client_went_frees_its_sandbox(
    daemon_factory: DaemonFactory, path: str
) -> None:
    running = await daemon_factory(engine_options={"pool_size": 0, "batch_workers": 1})
    http = running.raw()
    sleep = "import time\ntime.sleep(60)"
    body = {"code": sleep, "timeout_s": 120} if path == "/v1/run" else {
        "code": sleep, "language": "python", "run_timeout": 120}  # fmt: skip
    assert (await http.post("/v1/run", json={"code": "1"}, timeout=60)).status_code == 200
    gone = running.raw()
    with pytest.raises(httpx.TimeoutException):
        await gone.post(path, json=body, timeout=2)  # gives up, hangs up
    await gone.aclose()
    # The one sandbox is not held for the 60 s: the next run has it at once.
    with anyio.fail_after(20):
        after = await http.post("/v1/run", json={"code": "print('next')"}, timeout=60)
    assert after.json()["stdout"] == "next\n"


async def test_malformed_sandboxfusion_bodies_get_a_clear_4xx(
    daemon_factory: DaemonFactory,
) -> None:
    running = await fusion_daemon(daemon_factory, max_upload_bytes=1 << 20)
    http = loopback(running)
    headers = {"content-type": "application/json"}

    def error_of(response: httpx.Response) -> dict[str, Any]:
        error: dict[str, Any] = response.json()["error"]
        assert error["type"] and error["message"]
        return error

    r = await http.post("/run_code", content=b'{"code": "print(1)",', headers=headers)
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = await http.post("/run_code", json={"language": "python"})
    assert r.status_code == 422 and "code" in error_of(r)["message"]
    r = await http.post("/run_code", json={"code": "1", "language": "python", "run_timeout": "x"})
    assert r.status_code == 422 and "run_timeout" in error_of(r)["message"]
    r = await http.post("/run_code", json=["not", "an", "object"])
    assert r.status_code == 422
    r = await http.post("/run_jupyter", json={"cells": "print(1)"})
    assert r.status_code == 422 and "cells" in error_of(r)["message"]
    big = {"code": "print(1)", "language": "python", "files": {"a.bin": "A" * (2 << 20)}}
    r = await http.post("/run_code", json=big)
    assert r.status_code == 413 and error_of(r)["type"] == "RequestTooLarge"
    # A path that leaves the working folder is the request's fault, said by name.
    r = await run_code(http, {"code": "1", "language": "python", "files": {"../escape": ""}})
    assert r["status"] == "SandboxError" and "'../escape'" in r["message"]
    # The daemon still serves after all of that.
    r = await run_code(http, {"code": "print('still here')", "language": "python"})
    assert r["run_result"]["stdout"] == "still here\n"


async def test_input_no_run_can_be_given_is_a_sandbox_error_as_sandboxfusion_answers_it(
    daemon_factory: DaemonFactory,
) -> None:
    """JSON's "\\ud800" is a lone surrogate: text no file or stdin holds as UTF-8.

    SandboxFusion answers a request it cannot run with 200 and SandboxError,
    as /run_code does for a file path no file system takes.
    """
    running = await fusion_daemon(daemon_factory)
    http = loopback(running)
    headers = {"content-type": "application/json"}
    bodies = {
        "stdin": '{"code": "print(1)", "language": "python", "stdin": "a\\ud800b"}',
        "code": '{"code": "def test_a():\\n    assert \'\\ud800\'\\n", "language": "pytest"}',
    }
    for field, body in bodies.items():
        response = await http.post("/run_code", content=body.encode(), headers=headers)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == RESPONSE_FIELDS
        assert (answer["status"], answer["run_result"], answer["files"]) == (
            "SandboxError", None, {},
        )  # fmt: skip
        assert answer["message"].startswith(f"{field}: text with a lone surrogate"), answer
    r = await run_code(http, {"code": "print('still here')", "language": "python"})
    assert r["run_result"]["stdout"] == "still here\n"


async def test_without_the_flag_fusion_routes_need_the_token(
    daemon_factory: DaemonFactory,
) -> None:
    running = await fusion_daemon(daemon_factory, token="s3cret", fusion_without_token=False)
    body = {"code": "print(1)", "language": "python"}
    anonymous = loopback(running)
    r = await anonymous.post("/run_code", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "Unauthorized"
    authorized = loopback(running, headers={"authorization": "Bearer s3cret"})
    r = await authorized.post("/run_code", json=body)
    assert r.status_code == 200 and r.json()["run_result"]["stdout"] == "1\n"


async def test_with_the_flag_only_fusion_routes_are_open(daemon_factory: DaemonFactory) -> None:
    running = await fusion_daemon(daemon_factory, token="s3cret")
    anonymous = loopback(running)
    assert (await anonymous.get("/v1/ping")).status_code == 200
    for method, path in [("GET", "/v1/stats"), ("POST", "/v1/sessions"), ("POST", "/v1/run")]:
        r = await anonymous.request(method, path, json={"code": "1"})
        assert r.status_code == 401, (path, r.text)


def test_the_flag_is_refused_off_loopback(tmp_path: Any) -> None:
    common = {"socket_path": tmp_path / "s.sock", "records_path": tmp_path / "r.sqlite3"}
    for tcp in [None, ("0.0.0.0", 8080), ("192.0.2.1", 8080)]:
        with pytest.raises(DaemonError, match="loopback"):
            DaemonConfig(tcp=tcp, fusion_without_token=True, **common)
    assert DaemonConfig(tcp=("::1", 0), fusion_without_token=True, **common).token is None


async def test_v1_run_and_the_ndjson_batch_tag_results_with_their_ids(
    daemon_factory: DaemonFactory,
) -> None:
    running = await daemon_factory(engine_options=BATCH_ONLY)
    raw = running.raw()
    r = await raw.post("/v1/run", json={"code": "import sys; print(sys.argv[1:])", "argv": ["a"]})
    assert r.status_code == 200 and r.json()["stdout"] == "['a']\n"

    lines = [json.dumps({"id": i, "code": f"print({i} * {i})"}) for i in range(6)] + [
        '{"id": "bad", "code": 3}',
        "this is not json",
        json.dumps({"id": "x", "code": "1/0"}),
    ]
    r = await raw.post(
        "/v1/runs",
        content="\n".join(lines).encode(),
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    answers = [json.loads(line) for line in r.text.splitlines() if line]
    assert len(answers) == 9
    results = {a["id"]: a for a in answers if "status" in a}
    assert {i: results[i]["stdout"] for i in range(6)} == {i: f"{i * i}\n" for i in range(6)}
    assert results["x"]["status"] == "error" and "ZeroDivisionError" in results["x"]["stderr"]
    refused = sorted((a["line"], a["id"]) for a in answers if "error" in a)
    assert refused == [(7, "bad"), (8, None)]

    r = await raw.post("/v1/runs", json={"runs": [{"code": "print(7)", "id": "j"}]})
    assert [json.loads(line)["stdout"] for line in r.text.splitlines()] == ["7\n"]
    # Characters str.splitlines (and so most line readers) splits on stay inside their line.
    odd = "a\u2028b\u2029c\x85d"
    r = await raw.post("/v1/runs", json={"runs": [{"code": f"print({odd!r})"}]})
    assert [json.loads(line)["stdout"] for line in r.text.splitlines()] == [odd + "\n"]
    r = await raw.post("/v1/runs", json={"runs": [{"code": 1}]})
    assert r.status_code == 422
    misspelt = {"runs": [{"code": "print(7)"}], "concurency": 4}
    r = await raw.post("/v1/runs", json=misspelt)
    assert r.status_code == 422 and "concurency" in r.text  # refused, as /v1/run refuses


async def test_the_clients_run_once_and_run_many_mirror_the_engine(
    daemon_factory: DaemonFactory,
) -> None:
    running = await daemon_factory(engine_options=BATCH_ONLY)
    client = running.client()
    result = await client.run_once(
        "import sys\ndata = sys.stdin.read()\nopen('o.txt', 'w').write(data.upper())\nsys.exit(3)",
        stdin="piped",
        fetch_files=["o.txt"],
    )
    assert (result.status, result.return_code) == ("error", 3)
    assert [(f.path, f.content) for f in result.files] == [("o.txt", b"PIPED")]
    requests = [RunRequest(code=f"print({n})", id=n) for n in range(10)]
    seen = {r.id: r.stdout async for r in client.run_many(requests, concurrency=4)}
    assert seen == {n: f"{n}\n" for n in range(10)}

    from sandkernel.daemon.client import Client

    def blocking() -> list[str]:
        with Client(running.socket) as sync_client:
            once = sync_client.run_once("print('sync')")
            many = [r.stdout for r in sync_client.run_many([RunRequest(code="print(2)")])]
        return [once.stdout, *many]

    assert await anyio.to_thread.run_sync(blocking) == ["sync\n", "2\n"]
