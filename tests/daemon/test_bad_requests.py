"""Requests the daemon must refuse clearly: a JSON error with a type, and the right status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import httpx
import pytest

from sandkernel.daemon.errors import InvalidRequest, RequestTooLarge, Unauthorized
from sandkernel.errors import (
    FileNotFoundInStore,
    FileRejected,
    KernelDead,
    PolicyError,
    SessionNotFound,
)
from sandkernel.files import StoredFile
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["message"]
    return error


async def test_malformed_json_and_wrong_types_are_400_and_422(
    daemon_factory: DaemonFactory,
) -> None:
    running = await daemon_factory()
    raw = running.raw()
    await running.client().session("s")
    headers = {"content-type": "application/json"}
    bad = await raw.post("/v1/sessions/s/execute", content=b'{"code": "1",', headers=headers)
    assert bad.status_code == 400
    error = error_of(bad)
    assert error["type"] == "InvalidRequest" and "malformed JSON" in error["message"]
    for body, field in [
        ({"code": 5}, "body.code"),
        ({"code": "1", "timeout_s": "10"}, "body.timeout_s"),
        ({"code": "1", "timeout_s": -1}, "body.timeout_s"),
        ({"code": "1", "file_ids": "file-1"}, "body.file_ids"),
        ({"code": "1", "restart": "yes"}, "body.restart"),
        ({"code": "1", "surprise": True}, "body.surprise"),
        ({}, "body.code"),
    ]:
        response = await raw.post("/v1/sessions/s/execute", json=body)
        assert response.status_code == 422, (body, response.text)
        error = error_of(response)
        assert error["type"] == "InvalidRequest"
        assert field in [d["loc"] for d in error["details"]], (body, error)
    response = await raw.post("/v1/sessions", json=["not", "an", "object"])
    assert response.status_code == 422 and error_of(response)["type"] == "InvalidRequest"
    with pytest.raises(InvalidRequest, match="invalid session id") as caught:
        await running.client().session("../../etc")
    assert isinstance(caught.value, ValueError)  # as the embedded engine raises


async def test_unknown_sessions_files_and_routes_are_404(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    raw = running.raw()
    client = running.client()
    for method, path, expected in [
        ("GET", "/v1/sessions/ghost", "SessionNotFound"),
        ("DELETE", "/v1/sessions/ghost", "SessionNotFound"),
        ("POST", "/v1/sessions/ghost/execute", "SessionNotFound"),
        ("GET", "/v1/sessions/ghost/files", "SessionNotFound"),
        ("GET", "/v1/files/file-000000000000000000000000", "FileNotFoundInStore"),
        ("GET", "/v1/files/file-000000000000000000000000/content", "FileNotFoundInStore"),
        ("DELETE", "/v1/files/file-000000000000000000000000", "FileNotFoundInStore"),
        ("GET", "/v1/nothing-here", "NotFound"),
    ]:
        body = {"code": "1"} if path.endswith("execute") else None
        response = await raw.request(method, path, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert error_of(response)["type"] == expected, (method, path)
    with pytest.raises(SessionNotFound, match="ghost"):
        await client.get_session("ghost")
    with pytest.raises(FileNotFoundInStore):
        await client.download("file-000000000000000000000000")
    session = await client.session("mine")
    with pytest.raises(FileNotFoundInStore):
        await session.run("1", file_ids=["file-000000000000000000000000"])
    response = await raw.put("/v1/sessions")
    assert response.status_code == 405 and error_of(response)["type"] == "MethodNotAllowed"


async def test_oversized_bodies_are_413_before_they_are_read(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory(max_json_bytes=64 << 10, max_upload_bytes=256 << 10)
    raw = running.raw()
    client = running.client()
    await client.session("big")
    huge_cell = {"code": "x = '" + "a" * (100 << 10) + "'"}
    response = await raw.post("/v1/sessions/big/execute", json=huge_cell)
    assert response.status_code == 413
    error = error_of(response)
    assert error["type"] == "RequestTooLarge" and "--max-json-kb" in error["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: cut off while reading
        yield b'{"code": "'
        for _ in range(20):
            yield b"a" * (8 << 10)
        yield b'"}'

    response = await raw.post(
        "/v1/sessions/big/execute", content=chunked(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and error_of(response)["type"] == "RequestTooLarge"
    with pytest.raises(RequestTooLarge, match="--max-upload-mb"):
        await client.upload(b"a" * (300 << 10), "big.txt")
    small = await client.upload(b"a" * (200 << 10), "fits.txt")  # JSON limit does not apply
    assert small.size_bytes == 200 << 10
    assert (await (await client.session("big")).run("1 + 1")).text == "2"  # still serving


async def test_engine_refusals_keep_their_class_and_status(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory(engine_options={"max_upload_bytes": 1000})
    raw = running.raw()
    client = running.client()
    with pytest.raises(FileRejected, match=r"\.exe is not a supported type"):
        await client.upload(b"MZ\x90\x00", "tool.exe")
    response = await raw.post("/v1/files", files={"file": ("tool.exe", b"MZ")})
    assert response.status_code == 422 and error_of(response)["type"] == "FileRejected"
    response = await raw.post("/v1/files", files={"file": ("big.txt", b"a" * 2000)})
    assert response.status_code == 413 and error_of(response)["type"] == "FileTooLarge"
    response = await raw.post("/v1/files", data={"name": "x.txt"})
    assert response.status_code == 422 and error_of(response)["type"] == "InvalidRequest"
    policy = running.engine.policy.name
    with pytest.raises(PolicyError, match=f"this daemon runs the policy {policy!r}"):
        await client.session("p", policy="strict" if policy != "strict" else "default")
    assert (await client.session("p", policy=policy)).id == "p"
    session = await client.session("dies")
    died = await session.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert died.status in ("dead", "killed") and not died.kernel_alive
    with pytest.raises(KernelDead, match="restart=True"):
        await session.run("1")
    response = await raw.post("/v1/sessions/dies/execute", json={"code": "1"})
    assert response.status_code == 409 and error_of(response)["type"] == "KernelDead"
    revived = await session.run("1 + 1", restart=True)
    assert revived.text == "2" and revived.state_lost


async def test_tcp_needs_the_token_and_compares_it(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory(tcp=("127.0.0.1", 0), token="s3cret-token")
    async with httpx.AsyncClient(base_url=running.url) as tcp:
        response = await tcp.get("/v1/health")
        assert response.status_code == 401
        assert error_of(response)["type"] == "Unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
        for wrong in ("Bearer s3cret-toke", "Bearer s3cret-token2", "Basic s3cret-token", "s3cret"):
            response = await tcp.get("/v1/health", headers={"Authorization": wrong})
            assert response.status_code == 401, wrong
        response = await tcp.post(
            "/v1/sessions", json={"id": "nope"}, headers={"Authorization": "Bearer wrong"}
        )
        assert response.status_code == 401
    assert "nope" not in [s.id for s in (await running.engine.sessions())]
    with pytest.raises(Unauthorized):
        await running.client(url=running.url, token="wrong").health()
    good = running.client(url=running.url, token="s3cret-token")
    session = await good.session("over-tcp")
    assert (await session.run("6 * 7")).text == "42"
    assert (await running.client().health()).status == "ok"  # the socket needs no token


async def test_a_stalled_client_does_not_hold_up_others(daemon_factory: DaemonFactory) -> None:
    running = await daemon_factory()
    client = running.client()
    session = await client.session("busy")
    stalled = []
    # Half a request line and headers; then a full head whose body never comes.
    reader, writer = await asyncio.open_unix_connection(str(running.socket))
    writer.write(b"POST /v1/sessions/busy/execute HTTP/1.1\r\nHost: x\r\nContent-Le")
    stalled.append(writer)
    reader2, writer2 = await asyncio.open_unix_connection(str(running.socket))
    writer2.write(
        b"POST /v1/sessions/busy/execute HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"code": "1'
    )
    stalled.append(writer2)
    await asyncio.gather(writer.drain(), writer2.drain())
    try:
        started = time.monotonic()
        for i in range(5):
            assert (await session.run(f"{i} + 1")).text == str(i + 1)
        other = await client.session("other")
        assert (await other.run("'still fine'")).text == "'still fine'"
        assert time.monotonic() - started < 10
        assert not reader.at_eof() and not reader2.at_eof()  # they are still waiting
    finally:
        for w in stalled:
            w.close()
            await w.wait_closed()


async def test_shutdown_interrupts_requests_still_running_after_the_grace_time(
    daemon_factory: DaemonFactory,
) -> None:
    from sandkernel.daemon.errors import DaemonError

    running = await daemon_factory(graceful_timeout_s=1)
    session = await running.client().session("long")
    in_cell = asyncio.Event()
    cell = asyncio.create_task(
        session.run(
            "import time\nprint('in the cell', flush=True)\ntime.sleep(60)",
            on_output=lambda message: in_cell.set(),
        )
    )
    async with asyncio.timeout(20):
        await in_cell.wait()
    started = time.monotonic()
    running.daemon.shutdown()
    async with asyncio.timeout(20):
        await running.task
    assert time.monotonic() - started < 10, "shutdown waited for the 60 s cell"
    with pytest.raises(DaemonError):
        await cell
    assert not running.socket.exists()


async def test_a_file_deleted_as_its_download_begins_is_a_404_not_a_200_cut_short(
    daemon_factory: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await daemon_factory()
    engine = running.engine
    gone, kept = [await engine.upload(b"0123456789" * 100, f"{n}.txt") for n in ("gone", "kept")]
    looked_up = engine.file

    async def found_then_deleted(file_id: str) -> StoredFile:
        stored = await looked_up(file_id)
        if file_id == gone.id:
            await engine.delete_file(file_id)  # between the lookup and the read
        return stored

    opened = engine.open_file

    def opened_then_deleted(file_id: str) -> BinaryIO:
        handle = opened(file_id)
        if file_id == kept.id:
            anyio.from_thread.run(engine.delete_file, file_id)  # once it is open
        return handle

    monkeypatch.setattr(engine, "file", found_then_deleted)
    monkeypatch.setattr(engine, "open_file", opened_then_deleted)
    raw = running.raw()
    response = await raw.get(f"/v1/files/{gone.id}/content")
    assert response.status_code == 404, response.text
    assert error_of(response)["type"] == "FileNotFoundInStore"
    # A file deleted once its download has begun is still sent whole.
    response = await raw.get(f"/v1/files/{kept.id}/content")
    assert response.status_code == 200 and response.content == b"0123456789" * 100
    assert (await raw.get(f"/v1/files/{kept.id}")).status_code == 404


async def test_a_stored_copy_damaged_in_place_is_a_404_or_a_download_cut_short_never_whole(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Same size, other bytes: found by the hash as the file is read, before its end is sent."""
    from sandkernel.daemon.errors import DaemonError

    running = await daemon_factory()
    store = running.engine._require_store()
    small = await running.engine.upload(b"0123456789" * 100, "small.txt")
    large = await running.engine.upload(b"0123456789\n" * 300_000, "large.txt")  # 3.3 MiB
    for stored in (small, large):
        with store.blob_path(stored.id).open("r+b") as blob:
            blob.seek(stored.size_bytes - 5)
            blob.write(b"X")
    raw = running.raw()
    response = await raw.get(f"/v1/files/{small.id}/content")
    assert response.status_code == 404, response.text
    assert error_of(response)["type"] == "FileNotFoundInStore"
    assert "is damaged: other bytes" in error_of(response)["message"]
    client = running.client()
    with pytest.raises(FileNotFoundInStore, match="upload the file again"):
        await client.download(small.id)
    # Larger than what is read before the status: the body stops short of
    # its length, and the client says so instead of returning most of it.
    async with raw.stream("GET", f"/v1/files/{large.id}/content") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
    with pytest.raises(DaemonError, match=f"download of '{large.id}' .* was cut short after"):
        await client.download(large.id)
    target = tmp_path / "large.txt"
    with pytest.raises(DaemonError, match="cut short"):
        await client.download_to(large.id, target)
    assert not target.exists()
    # The daemon goes on serving: a sound file still downloads whole.
    sound = await client.upload(b"sound\n", "sound.txt")
    assert await client.download(sound.id) == b"sound\n"
