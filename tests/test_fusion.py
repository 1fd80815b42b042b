"""SandboxFusion-compatible /run_jupyter semantics, through a real engine."""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable

import pytest

from sandkernel import Engine
from sandkernel.fusion import RunJupyterRequest, RunStatus, run_jupyter

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
EngineFactory = Callable[..., Awaitable[Engine]]


async def test_documented_example_cells(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    request = RunJupyterRequest.model_validate(
        {
            "cells": [
                "a = 123",
                "a",
                "print(a)",
                'import sys; sys.stderr.write("stderr message")',
                'raise RuntimeError("error message")',
            ]
        }
    )
    response = await run_jupyter(engine, request)
    assert response.status is RunStatus.Success and response.message == ""
    assert response.driver is not None and response.driver.status == "Finished"
    c = response.cells
    assert len(c) == 5
    assert (c[0].stdout, c[0].display, c[0].error) == ("", [], [])
    assert c[1].display == [{"text/plain": "123"}]
    assert c[2].stdout == "123\n"
    assert c[3].stderr == "stderr message" and c[3].display == [{"text/plain": "14"}]
    (error,) = c[4].error
    assert error["ename"] == "RuntimeError" and error["evalue"] == "error message"
    assert any("error message" in line for line in error["traceback"])
    stats = engine.stats()
    assert stats.pool.in_use == 0 and stats.sessions_closed == 1  # used once, destroyed


async def test_files_in_and_fetch_files_out_are_byte_identical(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    payload = bytes(range(256)) * 10
    request = RunJupyterRequest(
        cells=[
            "data = open('in/blob.bin', 'rb').read()",
            "open('out.bin', 'wb').write(data[::-1])",
        ],
        files={"in/blob.bin": base64.b64encode(payload).decode()},
        fetch_files=["out.bin", "missing.txt"],
    )
    response = await run_jupyter(engine, request)
    assert response.status is RunStatus.Success, response
    assert base64.b64decode(response.files["out.bin"]) == payload[::-1]
    assert "missing.txt" not in response.files


async def test_total_timeout_gives_failed_with_time_limit(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    started = time.monotonic()
    response = await run_jupyter(
        engine, RunJupyterRequest(cells=["x = 1", "while True: pass", "y = 2"], total_timeout=2)
    )
    assert time.monotonic() - started < 2 + 1.5
    assert response.status is RunStatus.Failed
    assert response.driver is not None and response.driver.status == "TimeLimitExceeded"
    assert len(response.cells) == 2


async def test_memory_limit_is_applied(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    response = await run_jupyter(
        engine,
        RunJupyterRequest(cells=["b = bytearray(300 * 1024 * 1024)"], memory_limit_MB=128),
    )
    assert response.status is RunStatus.Failed
    assert "out of memory" in response.message


async def test_bad_files_are_a_sandbox_error_naming_the_problem(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    for files, why in (({"/etc/x": ""}, "must be relative"), ({"a.txt": "@@@"}, "base64")):
        response = await run_jupyter(engine, RunJupyterRequest(cells=["1"], files=files))
        assert response.status is RunStatus.SandboxError and why in response.message
