"""Admission control of one-shot runs: the bookkeeping, the daemon's 503s, the flags.

The slow runs are programs that sleep inside the sandbox. The tests never
wait on time themselves: they check the order in which answers came back (every
refusal before the first admitted run's result) and wait on responses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandkernel.daemon.admission import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_BYTES,
    MIN_DEFAULT_QUEUED_RUNS,
    QUEUED_RUNS_PER_WORKER,
    RunAdmission,
    default_max_queued_runs,
)
from sandkernel.daemon.cli import add_daemon_parsers, daemon_config
from sandkernel.daemon.client import AsyncClient
from sandkernel.daemon.errors import DaemonError, RunQueueFull
from sandkernel.daemon.server import DaemonConfig
from tests.daemon.conftest import DaemonFactory, RunningDaemon, spawn_daemon, stop_process

BATCH_ONLY = {"pool_size": 0, "batch_workers": 1}
# A run sleeps SLOW_S in its sandbox; its timeout is less than two of them, so
# the second of two runs queued on one worker finishes only if its timeout
# started when it was forked, not when it was queued.
SLOW_S = 2.0
TIMEOUT_S = 3.5


def slow_program(tag: str) -> str:
    return f"import time\ntime.sleep({SLOW_S})\nprint('done', {tag!r})"


def assert_run_queue_full(response: httpx.Response, *, mentions: str) -> None:
    """The daemon's overload answer: 503, Retry-After, its error body naming the limit."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["type"] == "RunQueueFull"
    assert mentions in error["message"] and "retry after 1 s" in error["message"]


# -- the bookkeeping, without a daemon ---------------------------------------------------


def test_runs_are_admitted_up_to_the_bound_and_counted_until_released() -> None:
    admission = RunAdmission(max_runs=2, max_body_bytes=1000)
    first, second = admission.admit(10), admission.admit(None)
    with pytest.raises(RunQueueFull, match="holds 2 one-shot runs.*--max-queued-runs 2"):
        admission.admit(10)
    assert (admission.runs, admission.body_bytes, admission.refused_total) == (2, 10, 1)
    first.release()
    first.release()  # a second release gives nothing back twice
    assert (admission.runs, admission.body_bytes) == (1, 0)
    third = admission.admit(5)
    second.release()
    third.release()
    assert (admission.runs, admission.body_bytes, admission.admitted_total) == (0, 0, 3)


def test_body_bytes_are_bounded_but_one_body_alone_always_fits() -> None:
    admission = RunAdmission(max_runs=10, max_body_bytes=1000)
    alone = admission.admit(5000)  # over the budget, but nothing else holds bytes
    with pytest.raises(RunQueueFull, match="5000 bytes.*1 more.*--max-queued-mb"):
        admission.admit(1)
    alone.release()
    held = admission.admit(600)
    with pytest.raises(RunQueueFull, match="--max-queued-mb"):
        admission.admit(500)
    chunked = admission.admit(None)  # no declared length: counted as it arrives
    chunked.hold_body_bytes(300)
    with pytest.raises(RunQueueFull):
        chunked.hold_body_bytes(200)
    assert admission.body_bytes == 900
    held.release()
    chunked.hold_body_bytes(5000)  # alone now
    chunked.release()
    assert (admission.runs, admission.body_bytes) == (0, 0)


def test_a_ticket_takes_free_run_slots_without_waiting_and_gives_back_spare_ones() -> None:
    admission = RunAdmission(max_runs=4, max_body_bytes=1000)
    other = admission.admit(None)
    batch = admission.admit(None)
    assert batch.hold_runs(10) == 3  # all that is free: 4 - the other run
    assert admission.runs == 4
    with pytest.raises(RunQueueFull):
        admission.admit(None)
    assert batch.hold_runs(2) == 2 and admission.runs == 3
    assert batch.hold_runs(0) == 1  # a ticket always keeps the slot it was admitted with
    other.release()
    assert batch.hold_runs(3) == 3
    batch.release()
    assert admission.runs == 0
    with pytest.raises(RuntimeError, match="released"):
        batch.hold_runs(1)


def test_the_default_bound_follows_the_batch_workers() -> None:
    assert default_max_queued_runs(1) == MIN_DEFAULT_QUEUED_RUNS
    assert default_max_queued_runs(16) == 16 * QUEUED_RUNS_PER_WORKER
    assert default_max_queued_runs(None) == default_max_queued_runs(os.cpu_count())
    with pytest.raises(ValueError, match="at least 1"):
        RunAdmission(max_runs=0, max_body_bytes=1)


def test_the_serve_flags_reach_the_daemon_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_daemon_parsers(parser.add_subparsers(dest="command"))
    common = ["serve", "--socket", str(tmp_path / "d.sock"), "--store", str(tmp_path / "s")]
    config = daemon_config(parser.parse_args(common))
    assert config.max_queued_runs is None  # derived from the batch workers when the app is built
    assert config.max_queued_bytes == DEFAULT_MAX_QUEUED_BYTES
    assert config.max_connections == DEFAULT_MAX_CONNECTIONS
    flags = ["--max-queued-runs", "7", "--max-queued-mb", "2", "--max-connections", "99"]
    config = daemon_config(parser.parse_args([*common, *flags]))
    assert (config.max_queued_runs, config.max_queued_bytes, config.max_connections) == (
        7,
        2 << 20,
        99,
    )
    with pytest.raises(SystemExit):  # refused by the parser, naming the range
        parser.parse_args([*common, "--max-queued-runs", "0"])
    with pytest.raises(DaemonError, match="--max-queued-runs"):
        DaemonConfig(socket_path=tmp_path / "s", records_path=tmp_path / "r", max_queued_runs=0)
    with pytest.raises(DaemonError, match="--max-queued-mb"):
        DaemonConfig(socket_path=tmp_path / "s", records_path=tmp_path / "r", max_queued_bytes=0)


def test_the_open_files_limit_is_raised_to_fit_the_connections(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    from sandkernel.daemon import server

    limits = {"soft": 1024, "hard": 8192}

    def getrlimit(which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return limits["soft"], limits["hard"]

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and value[1] == limits["hard"]
        limits["soft"] = value[0]

    monkeypatch.setattr(resource, "getrlimit", getrlimit)
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert server.raise_open_files_limit(4096) == 4096 + 1024 == limits["soft"]
    assert server.raise_open_files_limit(100) == 4096 + 1024  # never lowered
    assert not caplog.records
    assert server.raise_open_files_limit(10_000) == 8192  # the hard limit, and a warning
    assert "raise it (ulimit -n" in caplog.text and "--max-connections" in caplog.text


# -- the daemon --------------------------------------------------------------------------


async def bounded_daemon(daemon_factory: DaemonFactory, **config: Any) -> RunningDaemon:
    """One batch worker, no kernels, SandboxFusion's routes open on loopback TCP."""
    return await daemon_factory(
        engine_options=BATCH_ONLY, tcp=("127.0.0.1", 0), fusion_without_token=True, **config
    )


def loopback(running: RunningDaemon) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=running.url, timeout=60)
    running.clients.append(client)
    return client


def fusion_body(code: str, **extra: Any) -> dict[str, Any]:
    return {"code": code, "language": "python", "run_timeout": TIMEOUT_S, **extra}


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_runs_beyond_the_bound_are_refused_at_once_over_the_socket_and_tcp(
    daemon_factory: DaemonFactory,
) -> None:
    running = await bounded_daemon(daemon_factory, max_queued_runs=2)
    tcp, unix = loopback(running), running.raw()
    answers: list[tuple[str, str, httpx.Response]] = []  # in the order they came back

    async def over_tcp(tag: str) -> None:
        response = await tcp.post("/run_code", json=fusion_body(slow_program(tag)))
        answers.append(("tcp", tag, response))

    async def over_socket(tag: str) -> None:
        body = {"code": slow_program(tag), "timeout_s": TIMEOUT_S}
        response = await unix.post("/v1/run", json=body)
        answers.append(("socket", tag, response))

    # Six runs at once for two places: at least one refusal on each transport.
    async with asyncio.timeout(60):
        await asyncio.gather(
            *(over_tcp(f"t{i}") for i in range(3)), *(over_socket(f"s{i}") for i in range(3))
        )

    statuses = [response.status_code for _, _, response in answers]
    assert sorted(statuses) == [200, 200, 503, 503, 503, 503], [r.text for *_, r in answers]
    # Every refusal came back before either admitted run had finished.
    assert statuses == [503, 503, 503, 503, 200, 200]
    assert {"tcp", "socket"} == {where for where, _, r in answers if r.status_code == 503}
    for _, _, response in answers[:4]:
        assert_run_queue_full(response, mentions="--max-queued-runs 2")
    # The two admitted ran, one after the other on the one worker, and both
    # finished: the second's timeout started at its fork, not in the queue.
    for where, tag, response in answers[4:]:
        if where == "tcp":
            result = response.json()
            assert result["status"] == "Success", result
            assert result["run_result"]["stdout"] == f"done {tag}\n"
        else:
            result = response.json()
            assert (result["status"], result["stdout"]) == ("ok", f"done {tag}\n"), result

    # Afterwards the daemon serves normally: both places are free again.
    async with asyncio.timeout(60):
        again = await asyncio.gather(
            tcp.post("/run_code", json=fusion_body("print('after', 1)")),
            unix.post("/v1/run", json={"code": "print('after', 2)"}),
        )
    assert [r.status_code for r in again] == [200, 200]
    assert again[0].json()["run_result"]["stdout"] == "after 1\n"
    assert again[1].json()["stdout"] == "after 2\n"


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_a_batch_counts_each_line_in_flight_against_the_bound(
    daemon_factory: DaemonFactory,
) -> None:
    running = await bounded_daemon(daemon_factory, max_queued_runs=2)
    tcp, unix = loopback(running), running.raw()
    lines = [
        {"id": "quick", "code": "print('quick')"},
        {"id": "slow-1", "code": slow_program("slow-1"), "timeout_s": TIMEOUT_S},
        {"id": "slow-2", "code": slow_program("slow-2"), "timeout_s": TIMEOUT_S},
    ]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    seen: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(60):
        async with unix.stream(
            "POST",
            "/v1/runs?concurrency=3",
            content=body,
            headers={"content-type": "application/x-ndjson"},
        ) as response:
            assert response.status_code == 200
            results = aiter(response.aiter_lines())
            first = json.loads(await anext(results))
            assert first["id"] == "quick" and first["stdout"] == "quick\n"
            # Two lines are in flight now (the second slow one took the quick
            # one's place): the batch holds both places, nothing else fits.
            refused = await tcp.post("/run_code", json=fusion_body("print(1)"))
            assert_run_queue_full(refused, mentions="--max-queued-runs 2")
            async for line in results:
                if line:
                    result = json.loads(line)
                    seen[result["id"]] = result
    assert {tag: (r["status"], r["stdout"]) for tag, r in seen.items()} == {
        "slow-1": ("ok", "done slow-1\n"),
        "slow-2": ("ok", "done slow-2\n"),
    }
    # The batch's places were given back when it ended.
    async with asyncio.timeout(60):
        after = await asyncio.gather(
            tcp.post("/run_code", json=fusion_body("print(2)")),
            unix.post("/v1/runs", json={"runs": [{"code": "print(3)"}], "concurrency": 2}),
        )
    assert after[0].status_code == 200 and after[0].json()["run_result"]["stdout"] == "2\n"
    assert after[1].status_code == 200 and json.loads(after[1].text)["stdout"] == "3\n"


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_queued_bodies_are_bounded_in_bytes_declared_or_chunked(
    daemon_factory: DaemonFactory,
) -> None:
    running = await bounded_daemon(daemon_factory, max_queued_runs=8, max_queued_bytes=4000)
    tcp, unix = loopback(running), running.raw()
    padding = "#" * 3000
    held = json.dumps({"code": f"{slow_program('held')}\n{padding}", "timeout_s": TIMEOUT_S})

    async def chunked(size: int) -> AsyncIterator[bytes]:
        text = json.dumps({"code": "print('chunked')\n" + "#" * size})
        for start in range(0, len(text), 500):
            yield text[start : start + 500].encode()

    async with asyncio.timeout(60):
        async with unix.stream(
            "POST",
            "/v1/runs",
            content=held.encode(),
            headers={"content-type": "application/x-ndjson"},
        ) as batch:
            # Its headers came: it was admitted and its 3000-odd bytes are held.
            assert batch.status_code == 200
            big = fusion_body("print('big')\n" + "#" * 1500)
            assert_run_queue_full(await tcp.post("/run_code", json=big), mentions="--max-queued-mb")
            as_json = {"content-type": "application/json"}
            refused = await unix.post("/v1/run", content=chunked(1500), headers=as_json)
            assert "content-length" not in refused.request.headers
            assert_run_queue_full(refused, mentions="--max-queued-mb")
            small = await unix.post("/v1/run", content=chunked(100), headers=as_json)
            assert small.status_code == 200, small.text
            assert small.json()["stdout"] == "chunked\n"
            result = json.loads((await batch.aread()).decode())
            assert (result["status"], result["stdout"]) == ("ok", "done held\n")
        answered = await tcp.post("/run_code", json=big)
    assert answered.status_code == 200 and answered.json()["run_result"]["stdout"] == "big\n"


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_connections_past_the_limit_are_refused_and_closed(
    daemon_factory: DaemonFactory,
) -> None:
    running = await bounded_daemon(daemon_factory, max_connections=3)
    idle = [await asyncio.open_unix_connection(str(running.socket)) for _ in range(3)]
    probe = running.raw()
    try:
        async with asyncio.timeout(30):
            refused = await probe.get("/v1/ping")  # a fourth connection
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        _, writer = idle.pop()
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(30):
            # The server sees that end when it next reads the connection: asked
            # again until then, bounded by the deadline.
            while (answer := await probe.get("/v1/ping")).status_code != 200:
                assert answer.status_code == 503
        assert answer.text == "pong"  # the third connection is served
    finally:
        for _, writer in idle:
            writer.close()
            await writer.wait_closed()


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_the_overload_answer_is_in_the_schema_of_every_run_route(
    daemon_factory: DaemonFactory,
) -> None:
    running = await bounded_daemon(daemon_factory)
    schema = (await running.raw().get("/openapi.json")).json()
    for path in ["/v1/run", "/v1/runs", "/run_code", "/run_jupyter"]:
        overloaded = schema["paths"][path]["post"]["responses"]["503"]
        assert "RunQueueFull" in overloaded["description"], path
        assert overloaded["headers"]["Retry-After"]["schema"] == {"type": "integer"}
        assert overloaded["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"
        }


@pytest.mark.sandbox
@pytest.mark.slow
@pytest.mark.anyio
async def test_the_max_queued_runs_flag_bounds_a_daemon_process(
    short_dir: Path, tmp_path: Path
) -> None:
    socket = short_dir / "run" / "daemon.sock"
    daemon = await asyncio.to_thread(
        spawn_daemon,
        socket,
        tmp_path / "store",
        tmp_path / "log",
        "--pool-size", "0", "--batch-workers", "1", "--max-queued-runs", "1",
    )  # fmt: skip
    try:
        async with AsyncClient(socket) as client:
            outcomes = await asyncio.gather(
                client.run_once(slow_program("a"), timeout_s=TIMEOUT_S),
                client.run_once(slow_program("b"), timeout_s=TIMEOUT_S),
                return_exceptions=True,
            )
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(refused) == 1 and isinstance(refused[0], RunQueueFull), outcomes
            assert refused[0].status_code == 503 and "--max-queued-runs 1" in str(refused[0])
            (admitted,) = [o for o in outcomes if not isinstance(o, BaseException)]
            assert admitted.status == "ok" and admitted.stdout.startswith("done ")
            assert (await client.run_once("print('after')")).stdout == "after\n"
    finally:
        await asyncio.to_thread(stop_process, daemon.process)
