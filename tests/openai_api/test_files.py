"""The Files API under /openai, with the real openai clients, on the engine's file store."""

from __future__ import annotations

import io

import anyio
import httpx
import openai
import pytest

from sandkernel.errors import FileNotFoundInStore
from tests.openai_api.conftest import TOKEN, OpenAIDaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
NO_KERNELS = {"pool_size": 0}


async def test_upload_list_retrieve_download_delete_with_azure_and_openai_clients(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    azure, plain = daemon.azure(), daemon.openai()

    def exercise() -> None:
        csv = azure.files.create(file=("sales.csv", b"month,units\n1,3\n"), purpose="assistants")
        assert (csv.filename, csv.bytes, csv.purpose, csv.status) == (
            "sales.csv",
            16,
            "assistants",
            "processed",
        )
        py = plain.files.create(file=("speech.py", b"print('hi')\n"), purpose="assistants")
        assert plain.files.retrieve(csv.id).id == csv.id
        assert azure.files.retrieve(py.id).filename == "speech.py"
        assert [f.id for f in azure.files.list()] == [py.id, csv.id]  # newest first
        assert [f.id for f in plain.files.list(order="asc")] == [csv.id, py.id]
        page = plain.files.list(order="asc", limit=1)
        assert [f.id for f in page.data] == [csv.id] and page.has_more
        assert [f.id for f in plain.files.list(order="asc", after=csv.id)] == [py.id]
        assert azure.files.content(csv.id).read() == b"month,units\n1,3\n"
        deleted = plain.files.delete(csv.id)
        assert deleted.deleted and deleted.id == csv.id
        with pytest.raises(openai.NotFoundError) as missing:
            azure.files.retrieve(csv.id)
        assert csv.id in missing.value.message
        assert [f.id for f in plain.files.list()] == [py.id]

    await anyio.to_thread.run_sync(exercise)
    assert daemon.clients.checked.bodies.count("file") >= 5
    assert "list" in daemon.clients.checked.bodies


async def test_ids_are_the_engine_store_ids_on_both_apis(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    native = daemon.running.client()
    stored = await native.upload(io.BytesIO(b"a,b\n1,2\n"), "native.csv")
    plain = daemon.openai()

    uploaded = await anyio.to_thread.run_sync(
        lambda: plain.files.create(file=("via-openai.txt", b"hello\n"), purpose="assistants")
    )
    seen = await anyio.to_thread.run_sync(lambda: plain.files.retrieve(stored.id))
    assert (seen.id, seen.filename, seen.bytes) == (stored.id, "native.csv", 8)
    assert (await native.file(uploaded.id)).name == "via-openai.txt"
    assert await native.download(uploaded.id) == b"hello\n"
    await anyio.to_thread.run_sync(lambda: plain.files.delete(stored.id))
    with pytest.raises(FileNotFoundInStore):
        await native.file(stored.id)


async def test_uploads_are_checked_as_the_engine_checks_them(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    plain = daemon.openai()

    def refused() -> None:
        with pytest.raises(openai.BadRequestError) as exe:
            plain.files.create(file=("tool.exe", b"MZ\x90\x00"), purpose="assistants")
        assert exe.value.status_code == 400 and ".exe" in exe.value.message
        assert exe.value.param == "file"
        with pytest.raises(openai.BadRequestError) as png:
            plain.files.create(file=("fake.png", b"not a png at all"), purpose="assistants")
        assert png.value.param == "file"
        with pytest.raises(openai.BadRequestError) as purpose:
            plain.files.create(file=("ok.txt", b"fine\n"), purpose="fine-tune")
        assert purpose.value.param == "purpose" and "assistants" in purpose.value.message
        with pytest.raises(openai.NotFoundError):
            plain.files.content("file-000000000000000000000000")

    await anyio.to_thread.run_sync(refused)
    assert len(daemon.clients.checked.errors) == 4


async def test_a_missing_or_wrong_key_is_401_over_tcp_and_the_socket_needs_none(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    wrong_azure = daemon.azure(api_key="not-the-token")
    wrong_bearer = daemon.openai(api_key="not-the-token")

    def refused() -> None:
        for client in (wrong_azure, wrong_bearer):
            with pytest.raises(openai.AuthenticationError) as denied:
                client.files.list()
            assert denied.value.status_code == 401
            assert denied.value.code == "invalid_api_key"

    await anyio.to_thread.run_sync(refused)
    async with httpx.AsyncClient(base_url=daemon.endpoint) as raw:
        bare = await raw.get("/openai/files")
        assert bare.status_code == 401
        assert set(bare.json()["error"]) == {"message", "type", "param", "code"}
        keyed = await raw.get("/openai/v1/files", headers={"api-key": TOKEN})
        assert keyed.status_code == 200 and keyed.json()["object"] == "list"
    over_socket = daemon.running.raw()
    answer = await over_socket.get("/openai/files?api-version=2024-05-01-preview")
    assert answer.status_code == 200 and answer.json()["data"] == []


async def test_a_list_of_files_without_a_limit_has_them_all(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon(engine_options=NO_KERNELS)
    client = daemon.openai()

    def exercise() -> None:
        uploaded = [
            client.files.create(file=(f"f{i}.txt", b"x"), purpose="assistants").id
            for i in range(25)
        ]
        # One page, as OpenAI's (its default limit is 10,000).
        page = client.files.list(order="asc")
        assert [f.id for f in page.data] == uploaded and not page.has_more

    await anyio.to_thread.run_sync(exercise)
