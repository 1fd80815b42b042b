"""The daemon's client raises the very class the embedded engine raises, with its status.

One engine, called directly and through the daemon that serves it, in the same
state: each refusal must come back as the same class of :mod:`sandkernel.errors`
(another library's error as the class it crosses the daemon as: a ``ValueError``
is an ``InvalidRequest``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from sandkernel import errors
from sandkernel.errors import (
    BadInput,
    FileNotFoundInStore,
    FileRejected,
    InvalidRequest,
    RunQueueFull,
    SandkernelError,
    SessionClosed,
    SessionExpired,
    SessionNotFound,
    error_class_of,
)
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def raised(call: Awaitable[Any]) -> Exception:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("no error was raised")


async def assert_same_error(
    embedded: Awaitable[Any], remote: Awaitable[Any], expected: type[SandkernelError]
) -> None:
    here, there = await raised(embedded), await raised(remote)
    assert error_class_of(here) is expected, repr(here)
    assert type(there) is expected, repr(there)
    assert getattr(errors, expected.__name__) is expected
    if isinstance(here, SandkernelError):
        assert str(there) == str(here)


async def test_the_client_raises_the_embedded_engines_class(daemon_factory: DaemonFactory) -> None:
    now = [1000.0]
    running = await daemon_factory(
        engine_options={"session_ttl_s": 100, "reap_interval_s": 3600, "clock": lambda: now[0]}
    )
    engine, client = running.engine, running.client()

    await assert_same_error(
        engine.get_session("never-opened"), client.get_session("never-opened"), SessionNotFound
    )

    closed = await client.session("closed-one")
    await closed.close()
    await assert_same_error(
        engine.get_session("closed-one"), client.get_session("closed-one"), SessionClosed
    )
    await assert_same_error(
        engine.session("closed-one"), client.session("closed-one"), SessionClosed
    )

    expiring = await client.session("expiring")
    assert (await expiring.run("1 + 1")).text == "2"
    embedded_expiring = await engine.get_session("expiring")
    now[0] += 101
    assert await engine.reap() == ["expiring"]
    await assert_same_error(engine.session("expiring"), client.session("expiring"), SessionExpired)
    await assert_same_error(embedded_expiring.run("1"), expiring.run("1"), SessionExpired)

    missing = "file-000000000000000000000000"
    await assert_same_error(engine.file(missing), client.file(missing), FileNotFoundInStore)
    await assert_same_error(engine.download(missing), client.download(missing), FileNotFoundInStore)
    await assert_same_error(
        engine.upload(b"MZ\x90\x00", "tool.exe"),
        client.upload(b"MZ\x90\x00", "tool.exe"),
        FileRejected,
    )

    # A bad id is refused at the daemon's edge, by its request schema, before
    # the engine sees it: an InvalidRequest (a BadInput, a ValueError) with the
    # engine's own words, where the engine raises the BadInput itself.
    here = await raised(engine.session("not a valid id/../"))
    there = await raised(client.session("not a valid id/../"))
    assert type(here) is BadInput and type(there) is InvalidRequest
    assert isinstance(there, BadInput) and isinstance(there, ValueError)
    assert str(here) in str(there)


async def test_a_path_the_engine_refuses_the_client_refuses_alike_without_blocking(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    running = await daemon_factory()
    engine, client = running.engine, running.client()
    session = await client.session("paths")
    (tmp_path / "real.csv").write_text("a,b\n1,2\n")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    (tmp_path / "folder.csv").mkdir()
    os.mkfifo(tmp_path / "fifo.csv")  # with no writer: opening it to read would wait
    for name in ("missing.csv", "link.csv", "folder.csv", "fifo.csv"):
        path = tmp_path / name
        async with asyncio.timeout(30):
            await assert_same_error(engine.upload(path), client.upload(path), FileRejected)
            await assert_same_error(engine.upload(str(path)), session.upload(path), FileRejected)
    assert await engine.list_files() == []


async def test_a_full_run_queue_is_run_queue_full_with_503(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory(
        max_queued_runs=1, engine_options={"pool_size": 0, "batch_workers": 1}
    )
    client = running.client()
    slow = "import time\ntime.sleep(3)\nprint('done')"
    outcomes = await asyncio.gather(
        client.run_once(slow, timeout_s=30), client.run_once(slow, timeout_s=30),
        return_exceptions=True,
    )  # fmt: skip
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1, outcomes
    (full,) = refused
    assert type(full) is RunQueueFull and full.status_code == RunQueueFull.http_status == 503
    assert "--max-queued-runs 1" in str(full)
