"""The Containers API under /openai: containers are sessions, their files the session's."""

from __future__ import annotations

import io
import time
import zipfile

import anyio
import openai
import pytest

from sandkernel.errors import SessionError
from sandkernel.files import StoredFile
from sandkernel.openai_api.containers import Containers, _current
from sandkernel.openai_api.errors import APIError
from tests.openai_api.conftest import ASSISTANTS_DEPRECATED, OpenAIDaemonFactory, deleted_once_each

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def test_containers_create_list_retrieve_delete(openai_daemon: OpenAIDaemonFactory) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()

    def create() -> tuple[str, str]:
        first = client.containers.create(
            name="first", expires_after={"anchor": "last_active_at", "minutes": 5}
        )
        assert (first.name, first.status, first.object) == ("first", "running", "container")
        assert first.expires_after is not None and first.expires_after.minutes == 5
        second = client.containers.create(name="second")
        assert client.containers.retrieve(first.id).name == "first"
        assert [c.id for c in client.containers.list()] == [second.id, first.id]
        assert [c.id for c in client.containers.list(order="asc", limit=1).data] == [first.id]
        assert [c.id for c in client.containers.list(name="first")] == [first.id]
        assert client.containers.list(name="third").data == []
        with pytest.raises(openai.BadRequestError) as refused:
            client.containers.create(name="big", memory_limit="64g")
        assert refused.value.body is not None and "memory_limit" in str(refused.value.body)
        return first.id, second.id

    first_id, second_id = await anyio.to_thread.run_sync(create)
    session = await native.get_session(first_id)  # the container is a session of that id
    assert (await session.run("print(6 * 7)")).stdout.strip() == "42"

    def delete() -> None:
        client.containers.delete(second_id)
        with pytest.raises(openai.NotFoundError):
            client.containers.retrieve(second_id)
        assert [c.id for c in client.containers.list()] == [first_id]

    await anyio.to_thread.run_sync(delete)
    with pytest.raises(SessionError):
        await native.get_session(second_id)
    assert "container.deleted" in daemon.clients.checked.bodies
    assert daemon.clients.checked.bodies.count("container") >= 3


async def test_container_files_round_trip_with_sources_and_paths(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()
    data = _zip({"table.csv": bytes(range(256)) * 3})

    def upload() -> tuple[str, str, str]:
        uploaded = client.files.create(file=("seed.csv", b"a,b\n1,2\n"), purpose="assistants")
        container = client.containers.create(name="files", file_ids=[uploaded.id])
        direct = client.containers.files.create(container.id, file=("blob.zip", data))
        assert (direct.source, direct.path, direct.bytes) == (
            "user",
            "/mnt/data/blob.zip",
            len(data),
        )
        other = client.files.create(file=("more.txt", b"more"), purpose="assistants")
        by_id = client.containers.files.create(container.id, file_id=other.id)
        assert (by_id.source, by_id.path) == ("user", "/mnt/data/more.txt")
        return container.id, direct.id, by_id.id

    container_id, blob_id, _ = await anyio.to_thread.run_sync(upload)
    session = await native.get_session(container_id)
    result = await session.run(
        "import os\n"
        "print(sorted(os.listdir('/mnt/data')))\n"
        "open('/mnt/data/made.txt', 'w').write('from code')\n"
    )
    assert result.stdout.strip() == "['blob.zip', 'more.txt', 'seed.csv']"

    def check() -> None:
        listed = {f.path: f for f in client.containers.files.list(container_id)}
        assert set(listed) == {
            "/mnt/data/seed.csv",
            "/mnt/data/blob.zip",
            "/mnt/data/more.txt",
            "/mnt/data/made.txt",
        }
        assert listed["/mnt/data/made.txt"].source == "assistant"
        assert {listed[p].source for p in listed if p != "/mnt/data/made.txt"} == {"user"}
        made = listed["/mnt/data/made.txt"]
        got = client.containers.files.content.retrieve(made.id, container_id=container_id)
        assert got.read() == b"from code"
        blob = client.containers.files.content.retrieve(blob_id, container_id=container_id)
        assert blob.read() == data
        assert client.containers.files.retrieve(blob_id, container_id=container_id).bytes == len(
            data
        )
        client.containers.files.delete(blob_id, container_id=container_id)
        with pytest.raises(openai.NotFoundError):
            client.containers.files.retrieve(blob_id, container_id=container_id)
        assert len(client.containers.files.list(container_id).data) == 3
        # Container files are not the Files API's.
        assert {f.filename for f in client.files.list()} == {"seed.csv", "more.txt"}

    await anyio.to_thread.run_sync(check)
    assert "container.file.deleted" in daemon.clients.checked.bodies

    def delete_container() -> None:
        client.containers.delete(container_id)
        # The files given by id were copied in: the uploads outlive the container.
        assert {f.filename for f in client.files.list()} == {"seed.csv", "more.txt"}

    await anyio.to_thread.run_sync(delete_container)


@ASSISTANTS_DEPRECATED[0]
@ASSISTANTS_DEPRECATED[1]
async def test_a_container_file_is_not_a_file_of_the_files_api(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    """As OpenAI's: /files neither shows, serves nor deletes a container's files, by any id."""
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()

    def attempt() -> tuple[str, str]:
        uploaded = client.files.create(file=("seed.csv", b"a,b\n"), purpose="assistants")
        container = client.containers.create(name="own", file_ids=[uploaded.id])
        direct = client.containers.files.create(container.id, file=("mine.txt", b"mine"))
        [copied] = [f for f in client.containers.files.list(container.id) if f.id != direct.id]
        for file_id in (direct.id, copied.id):
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(file_id)
            with pytest.raises(openai.NotFoundError):
                client.files.content(file_id)
            with pytest.raises(openai.NotFoundError):
                client.files.delete(file_id)
            # Nor is it a file to give by id.
            with pytest.raises(openai.BadRequestError, match="No file found"):
                client.containers.create(name="other", file_ids=[file_id])
            with pytest.raises(openai.BadRequestError, match="No file found"):
                client.beta.assistants.create(
                    model="m",
                    tools=[{"type": "code_interpreter"}],
                    tool_resources={"code_interpreter": {"file_ids": [file_id]}},
                )
        listed = client.containers.files.list(container.id)
        assert {f.path for f in listed} == {"/mnt/data/seed.csv", "/mnt/data/mine.txt"}
        assert client.files.retrieve(uploaded.id).filename == "seed.csv"
        return container.id, direct.id

    container_id, direct_id = await anyio.to_thread.run_sync(attempt)
    assert [
        c.name for c in await anyio.to_thread.run_sync(lambda: client.containers.list().data)
    ] == ["own"]
    assert (await native.download(direct_id)) == b"mine"
    session = await native.get_session(container_id)
    assert (await session.run("print(open('/mnt/data/mine.txt').read())")).stdout == "mine\n"


async def test_an_ended_container_is_expired_and_refuses_files(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    container = await anyio.to_thread.run_sync(lambda: client.containers.create(name="short"))
    # The session ending is what its time to live running out does.
    await daemon.running.client().close_session(container.id)

    def check() -> None:
        assert client.containers.retrieve(container.id).status == "expired"
        with pytest.raises(openai.BadRequestError) as refused:
            client.containers.files.create(container.id, file=("x.txt", b"x"))
        assert "expired" in refused.value.message

    await anyio.to_thread.run_sync(check)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


#: Seconds in one of ``expires_after``'s minutes while the expiry test runs.
SHORT_MINUTE_S = 1.0
SEED_CSV = b"x,y\n1,2\n"


async def test_an_idle_container_expires_after_its_minutes_and_keeps_its_files(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Containers, "minute_s", SHORT_MINUTE_S)
    daemon = await openai_daemon(engine_options={"reap_interval_s": 0.1})
    client = daemon.openai()
    native = daemon.running.client()
    container = await anyio.to_thread.run_sync(
        lambda: client.containers.create(
            name="idle", expires_after={"anchor": "last_active_at", "minutes": 2}
        )
    )
    uploaded = await anyio.to_thread.run_sync(
        lambda: client.containers.files.create(container.id, file=("in.csv", SEED_CSV))
    )
    # Adding the file was the container's last use: its two "minutes" count from here.
    last_used = time.monotonic()
    session = await native.get_session(container.id)
    await session.run("open('/mnt/data/out.txt', 'w').write('made before expiry')")

    def wait_for_expiry() -> float:
        assert client.containers.retrieve(container.id).status == "running"
        deadline = time.monotonic() + 30 * SHORT_MINUTE_S
        while client.containers.retrieve(container.id).status == "running":
            assert time.monotonic() < deadline, "the container did not expire"
        return time.monotonic() - last_used

    idle_s = await anyio.to_thread.run_sync(wait_for_expiry)
    assert idle_s >= 2 * SHORT_MINUTE_S * 0.9  # not before its minutes were up

    def check() -> None:
        assert client.containers.retrieve(container.id).status == "expired"
        assert container.id in [c.id for c in client.containers.list() if c.status == "expired"]
        with pytest.raises(openai.BadRequestError) as refused:
            client.containers.files.create(container.id, file=("late.txt", b"late"))
        assert refused.value.code == "container_expired"
        # Its files stay in the store: listed and downloadable under the container.
        listed = {f.path: f for f in client.containers.files.list(container.id)}
        assert set(listed) == {"/mnt/data/in.csv", "/mnt/data/out.txt"}
        content = client.containers.files.content.retrieve
        assert content(uploaded.id, container_id=container.id).read() == SEED_CSV
        made = listed["/mnt/data/out.txt"].id
        assert content(made, container_id=container.id).read() == b"made before expiry"

    await anyio.to_thread.run_sync(check)


async def test_a_path_written_twice_is_one_file_and_deleting_it_brings_back_no_older_one(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()
    container = await anyio.to_thread.run_sync(lambda: client.containers.create(name="twice"))
    session = await native.get_session(container.id)
    await session.run("open('/mnt/data/notes.txt', 'w').write('first')")
    await session.run("open('/mnt/data/notes.txt', 'w').write('second')")
    await session.run("open('/mnt/data/other.txt', 'w').write('other')")

    def check() -> None:
        listed = {f.path: f for f in client.containers.files.list(container.id)}
        assert set(listed) == {"/mnt/data/notes.txt", "/mnt/data/other.txt"}
        newest = listed["/mnt/data/notes.txt"]
        content = client.containers.files.content.retrieve(newest.id, container_id=container.id)
        assert content.read() == b"second"
        page = client.containers.files.list(container.id, limit=1, order="asc")
        assert len(page.data) == 1 and page.has_more
        client.containers.files.delete(newest.id, container_id=container.id)
        after = [f.path for f in client.containers.files.list(container.id)]
        assert after == ["/mnt/data/other.txt"]

    await anyio.to_thread.run_sync(check)


async def test_a_container_whose_files_cannot_be_put_in_is_not_left_running(
    openai_daemon: OpenAIDaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_room(self: Containers, session: object, stored: object) -> None:
        raise APIError(400, "no room for it in the workspace", param="file_ids")

    monkeypatch.setattr(Containers, "_add", no_room)
    daemon = await openai_daemon()
    client = daemon.openai()

    def check() -> None:
        uploaded = client.files.create(file=("seed.csv", b"a,b\n1,2\n"), purpose="assistants")
        with pytest.raises(openai.BadRequestError, match="no room"):
            client.containers.create(name="full", file_ids=[uploaded.id])
        assert client.containers.list().data == []

    await anyio.to_thread.run_sync(check)
    assert [s.state for s in await daemon.running.client().sessions()] == ["closed"]


async def test_an_upload_beside_a_file_the_code_wrote_keeps_its_own_path_and_survives_it(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()
    container = await anyio.to_thread.run_sync(lambda: client.containers.create(name="beside"))
    session = await native.get_session(container.id)
    await session.run("open('/mnt/data/data.csv', 'w').write('code v1')")
    upload = await anyio.to_thread.run_sync(
        lambda: client.containers.files.create(container.id, file=("data.csv", b"user upload"))
    )
    # The code's file keeps its name: the upload is placed beside it, and says where.
    assert upload.path != "/mnt/data/data.csv"
    assert upload.path.startswith("/mnt/data/data-") and upload.path.endswith(".csv")
    seen = await session.run(f"print(open({upload.path!r}).read())")
    assert seen.stdout.strip() == "user upload"
    await session.run("open('/mnt/data/data.csv', 'w').write('code v2')")

    def check() -> None:
        listed = {(f.path, f.source): f.id for f in client.containers.files.list(container.id)}
        code_file = listed.get(("/mnt/data/data.csv", "assistant"))
        assert listed == {
            (upload.path, "user"): upload.id,
            ("/mnt/data/data.csv", "assistant"): code_file,
        }
        assert code_file is not None
        got = client.containers.files.content.retrieve(code_file, container_id=container.id)
        assert got.read() == b"code v2"
        client.containers.files.delete(code_file, container_id=container.id)
        # Deleting the code's file (and its earlier version) leaves the user's upload.
        (left,) = client.containers.files.list(container.id)
        assert (left.id, left.path, left.source) == (upload.id, upload.path, "user")
        kept = client.containers.files.content.retrieve(upload.id, container_id=container.id)
        assert kept.read() == b"user upload"

    await anyio.to_thread.run_sync(check)


async def test_an_upload_the_code_rewrote_stays_listed_and_is_not_deleted_with_the_code_file(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()
    container = await anyio.to_thread.run_sync(lambda: client.containers.create(name="rewrite"))
    upload = await anyio.to_thread.run_sync(
        lambda: client.containers.files.create(container.id, file=("data.csv", b"user upload"))
    )
    assert upload.path == "/mnt/data/data.csv"
    session = await native.get_session(container.id)
    await session.run("open('/mnt/data/data.csv', 'w').write('cleaned')")

    def check() -> None:
        listed = {(f.source, f.path): f.id for f in client.containers.files.list(container.id)}
        assert set(listed) == {("user", upload.path), ("assistant", "/mnt/data/data.csv")}
        client.containers.files.delete(listed["assistant", upload.path], container_id=container.id)
        (left,) = client.containers.files.list(container.id)
        assert left.id == upload.id
        kept = client.containers.files.content.retrieve(upload.id, container_id=container.id)
        assert kept.read() == b"user upload"

    await anyio.to_thread.run_sync(check)


async def test_an_upload_replaced_by_a_later_upload_of_its_name_is_not_listed(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()
    native = daemon.running.client()
    container = await anyio.to_thread.run_sync(lambda: client.containers.create(name="again"))

    def upload_twice() -> tuple[str, str]:
        first = client.containers.files.create(container.id, file=("data.csv", b"first"))
        second = client.containers.files.create(container.id, file=("data.csv", b"second"))
        assert first.path == second.path == "/mnt/data/data.csv"
        return first.id, second.id

    first_id, second_id = await anyio.to_thread.run_sync(upload_twice)
    session = await native.get_session(container.id)
    seen = await session.run(
        "import os\nprint(os.listdir('/mnt/data'), open('/mnt/data/data.csv').read())"
    )
    assert seen.stdout.strip() == "['data.csv'] second"

    def check() -> None:
        listed = [(f.id, f.path) for f in client.containers.files.list(container.id)]
        assert listed == [(second_id, "/mnt/data/data.csv")]
        # Still downloadable by id, as an earlier version of a code file is.
        got = client.containers.files.content.retrieve(first_id, container_id=container.id)
        assert got.read() == b"first"

    await anyio.to_thread.run_sync(check)


def test_an_upload_without_a_recorded_place_is_listed_unless_a_later_one_took_its_name() -> None:
    def upload(n: int, path: str | None, name: str = "data.csv") -> StoredFile:
        return StoredFile(
            id=f"file-{n:024x}",
            name=name,
            mime_type="text/csv",
            size_bytes=1,
            sha256="0" * 64,
            created_at=float(n),
            origin="uploaded",
            session_id="cntr-x",
            path=path,
        )

    # Stored before placements were recorded: no path, nothing took its place.
    older = upload(1, None)
    assert [f.id for f in _current("cntr-x", [older])] == [older.id]
    # Replaced at its path by a later upload of its name: only the later one is there.
    later = upload(2, "/mnt/data/data.csv")
    assert [f.id for f in _current("cntr-x", [older, later])] == [later.id]
    # A later upload placed elsewhere (its name was taken) took nobody's place.
    beside = upload(3, "/mnt/data/data-00000000.csv", name="data.csv")
    assert [f.id for f in _current("cntr-x", [older, beside])] == [older.id, beside.id]


async def test_a_container_deleted_twice_at_once_is_deleted_once(
    openai_daemon: OpenAIDaemonFactory,
) -> None:
    daemon = await openai_daemon()
    client = daemon.openai()

    def exercise() -> None:
        ids = [client.containers.create(name=f"c{i}").id for i in range(5)]
        deleted_once_each(client.containers.delete, ids)
        assert client.containers.list().data == []

    await anyio.to_thread.run_sync(exercise)
