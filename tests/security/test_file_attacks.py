"""File attacks: what a sandbox plants in its workspace, and what a client uploads.

The engine reads the workspace as root after every cell and writes uploads
into it: links, special files and odd names must not make it read or write
anything else, and archives must not carry bombs or paths out of their folder.
Sessions share one engine; each attack uses sessions of its own.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from sandkernel.engine import Engine
from sandkernel.errors import FileNotFoundInStore, FileRejected
from tests.security._support import run, run_json
from tests.security.conftest import EngineBox

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture
async def engine(engines: EngineBox) -> Engine:
    return await engines.get(
        "files", pool_size=2, max_upload_bytes=4 << 20, max_produced_bytes=8 << 20,
        max_produced_files=50,
    )  # fmt: skip


async def _no_secret_stored(engine: Engine, secret: bytes) -> None:
    for stored in await engine.list_files():
        assert secret not in await engine.download(stored.id), stored


# ------------------------------------------------------------------ links and special files


async def test_upload_through_a_planted_symlink_does_not_write_the_host(
    engine: Engine, host_secret: Path
) -> None:
    before = await asyncio.to_thread(host_secret.read_bytes)
    s = await engine.session()
    r = await s.run(
        f"import os\nos.symlink({str(host_secret)!r}, '/mnt/data/data.csv')\n"
        f"os.symlink({str(host_secret.parent)!r}, '/mnt/data/dir')"
    )
    assert r.status == "ok"
    stored = await s.upload(b"a,b\n1,2\n", "data.csv")
    result = await run_json(
        s,
        """
        result = {n: os.path.islink('/mnt/data/' + n) for n in os.listdir('/mnt/data')}
        """,
    )
    await s.close()
    assert await asyncio.to_thread(host_secret.read_bytes) == before
    assert result["data.csv"] is True  # the link is still a link: the upload went beside it
    assert sum(1 for name, link in result.items() if not link) == 1
    assert stored.name == "data.csv"


async def test_directory_swapped_for_a_symlink_while_collecting_never_reads_the_host(
    engine: Engine, host_secret: Path
) -> None:
    """A thread keeps exchanging a folder and a link to the host while cells end."""
    s = await engine.session()
    r = await s.run(
        f"""
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('/mnt/data/d', exist_ok=True)
open('/mnt/data/d/{host_secret.name}', 'w').write('decoy\\n')
os.symlink({str(host_secret.parent)!r}, '/mnt/data/x')
stop = threading.Event()
def swap():
    while not stop.is_set():  # renameat2(RENAME_EXCHANGE): atomic swap of d and x
        libc.syscall(316, -100, b'/mnt/data/d', -100, b'/mnt/data/x', 2)
threading.Thread(target=swap, daemon=True).start()
"""
    )
    assert r.status == "ok", r
    for n in range(6):
        r = await s.run(f"open('/mnt/data/out{n}.txt', 'w').write('{n}')")
        assert r.status == "ok"
    await s.run("stop.set()")
    await s.close()
    await _no_secret_stored(engine, b"HOST-SECRET")


async def test_hardlinks_to_host_and_agent_files_are_refused(engine: Engine) -> None:
    agent = f"agent-{secrets.token_hex(4)}"
    await engine.upload(b"agent only\n", "shared.txt", agent_id=agent)
    s = await engine.session(agent_id=agent)
    result = await run_json(
        s,
        """
        result = {
            'etc_passwd': attempt(lambda: os.link('/etc/passwd', '/mnt/data/p')),
            'runtime': attempt(lambda: os.link('/opt/sandkernel/launch.py', '/mnt/data/l')),
            'agent_file': attempt(lambda: os.link('/mnt/data/shared.txt', '/mnt/data/mine.txt')),
            'proc_exe': attempt(lambda: os.link('/proc/self/exe', '/mnt/data/exe')),
            'rename_over_agent_file': attempt(lambda: (open('/mnt/data/x.txt', 'w').close(),
                                                       os.rename('/mnt/data/x.txt',
                                                                 '/mnt/data/shared.txt'))),
        }
        """,
    )
    r = await s.run("print(open('/mnt/data/shared.txt').read(), end='')")
    await s.close()
    assert "allowed" not in result.values(), result
    assert r.stdout == "agent only\n"


async def test_fifos_sockets_and_device_nodes_do_not_stall_or_feed_collection(
    engine: Engine,
) -> None:
    s = await engine.session()
    started = time.monotonic()
    result = await run_json(
        s,
        """
        os.mkfifo('/mnt/data/out.csv')
        listener = socket.socket(socket.AF_UNIX)
        listener.bind('/mnt/data/sock.txt')
        result = {
            'mknod_char': attempt(lambda: os.mknod('/mnt/data/mem.txt', 0o666 | 0o020000,
                                                   os.makedev(1, 1))),
            'mknod_block': attempt(lambda: os.mknod('/mnt/data/disk.txt', 0o666 | 0o060000,
                                                    os.makedev(8, 0))),
        }
        open('/mnt/data/real.txt', 'w').write('real')
        """,
    )
    elapsed = time.monotonic() - started
    placed = await s.upload(b"x,y\n", "out.csv")  # a FIFO holds the name: no hang
    r = await s.run("import os; print(sorted(os.listdir('/mnt/data')))")
    await s.close()
    assert "allowed" not in result.values(), result
    assert elapsed < 10
    assert placed.name == "out.csv" and "real.txt" in r.stdout


async def test_odd_file_names_are_collected_safely(engine: Engine) -> None:
    s = await engine.session()
    r = await s.run(
        """
import os
names = ['new\\nline.txt', 'tab\\there.txt', 'a' * 251 + '.txt', '-dash.txt', '.hidden.txt',
         'sp ace.txt', 'emoji-\\U0001F600.txt', 'C:\\\\evil.txt', 'esc-\\x1b[31m.txt',
         'del-\\x7f.txt']
for n in names:
    with open('/mnt/data/' + n, 'w') as f:
        f.write('content of ' + n)
print(len(os.listdir('/mnt/data')))
"""
    )
    assert r.status == "ok", r
    assert r.stdout.strip() == "10"
    assert len(r.files) == 10
    for produced in r.files:
        assert all(c.isprintable() for c in produced.name), repr(produced.name)
        assert (await engine.download(produced.id)).startswith(b"content of ")
    assert (await s.run("1 + 1")).text == "2"
    await s.close()


async def test_a_file_name_with_bidi_controls_cannot_disguise_its_extension(
    engine: Engine,
) -> None:
    s = await engine.session()
    r = await s.run("open('/mnt/data/report\\u202etxt.exe', 'w').write('MZ')")
    await s.close()
    assert r.status == "ok", r
    (produced,) = r.files
    assert all(c.isprintable() for c in produced.name), repr(produced.name)


async def test_a_file_name_that_is_not_utf8_leaves_the_result_serialisable(
    engine: Engine,
) -> None:
    s = await engine.session()
    r = await s.run("open(b'/mnt/data/\\xff\\xfe-latin1.txt', 'wb').write(b'data')")
    await s.close()
    assert r.status == "ok", r
    try:
        r.model_dump_json()
    except ValueError as exc:  # pydantic's serialisation error
        raise AssertionError(f"the result cannot be sent as JSON: {exc}") from None


# --------------------------------------------------------------------------- sizes and shapes


async def test_sparse_huge_file_is_not_read_into_the_store(engine: Engine) -> None:
    s = await engine.session()
    started = time.monotonic()
    r = await s.run(
        "with open('/mnt/data/huge.bin', 'wb') as f:\n    f.truncate(400 << 20)\n"
        "open('/mnt/data/small.txt', 'w').write('ok')"
    )
    elapsed = time.monotonic() - started
    await s.close()
    assert r.status == "ok"
    assert [f.name for f in r.files] == ["small.txt"]
    assert r.files_truncated and "max_bytes" in (r.files_note or "")
    assert elapsed < 10


async def test_deep_and_wide_workspaces_are_walked_within_caps(engine: Engine) -> None:
    s = await engine.session()
    started = time.monotonic()
    r = await s.run(
        """
import os
path = '/mnt/data'
for i in range(150):
    path += '/d'
    os.mkdir(path)
open(path + '/deep.txt', 'w').write('deep')
os.mkdir('/mnt/data/wide')
for i in range(3000):
    open(f'/mnt/data/wide/{i}.txt', 'w').close()
"""
    )
    elapsed = time.monotonic() - started
    assert r.status == "ok", r
    assert r.files_truncated and len(r.files) <= 50
    assert "deep.txt" not in [f.name for f in r.files]
    assert elapsed < 30
    assert (await s.run("1 + 1")).text == "2"
    await s.close()


async def test_uploads_over_the_size_cap_are_refused(engine: Engine) -> None:
    with pytest.raises(FileRejected, match="4"):
        await engine.upload(b"x" * ((4 << 20) + 1), "big.txt")


# --------------------------------------------------------------------------- archives


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _declaring_size(data: bytes, size: int) -> bytes:
    """The zip with its one entry's uncompressed size rewritten (a bomb's header)."""
    raw = bytearray(data)
    central = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, size)
    struct.pack_into("<I", raw, 22, size)  # the local header says the same
    return bytes(raw)


def _declaring_entries(data: bytes, entries: int) -> bytes:
    """The zip with a ZIP64 end record that declares ``entries`` entries."""
    end = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", data, end + 12)
    body = data[:end]
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0,
                         entries, entries, cd_size, cd_offset)  # fmt: skip
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, len(body), 1)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF,
                       0xFFFFFFFF, 0xFFFFFFFF, 0)  # fmt: skip
    return body + record + locator + eocd


async def test_zip_bombs_are_refused(engine: Engine) -> None:
    small = _zip({"zeros.bin": b"\0" * (1 << 20)})
    with pytest.raises(FileRejected, match="unpacks to"):
        await engine.upload(_declaring_size(small, 0xFFFFFFF0), "bomb.zip")
    with pytest.raises(FileRejected, match="entries"):
        await engine.upload(_declaring_entries(small, 10_000_000), "many.zip")
    assert await engine.list_files() == [] or all(
        f.name not in ("bomb.zip", "many.zip") for f in await engine.list_files()
    )


async def test_path_traversing_archives_are_refused(engine: Engine) -> None:
    for name in ("../../etc/cron.d/evil", "/etc/passwd", "C:\\Windows\\evil.dll", "a/../../b"):
        with pytest.raises(FileRejected, match="outside"):
            await engine.upload(_zip({"ok.txt": b"fine", name: b"evil"}), "evil.zip")
    for member in ("../evil.txt", "/abs.txt"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(member)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        with pytest.raises(FileRejected, match="outside"):
            await engine.upload(buffer.getvalue(), "evil.tar")


async def test_archives_with_links_out_of_their_folder_are_refused(engine: Engine) -> None:
    for kind, target in ((tarfile.SYMTYPE, "/etc/shadow"), (tarfile.LNKTYPE, "../../x"),
                         (tarfile.SYMTYPE, "../../../root")):  # fmt: skip
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo("innocent.txt")
            info.type = kind
            info.linkname = target
            tar.addfile(info)
        with pytest.raises(FileRejected, match="outside"):
            await engine.upload(buffer.getvalue(), "links.tar")


# --------------------------------------------------------------------------- other sessions' files


async def test_another_sessions_and_agents_file_ids_are_not_found(engine: Engine) -> None:
    owner = await engine.session()
    thief = await engine.session(agent_id=f"thief-{secrets.token_hex(3)}")
    uploaded = await owner.upload(b"owner's upload\n", "mine.txt")
    produced = (await owner.run("open('/mnt/data/made.txt', 'w').write('owner made')")).files[0]
    other_agent = await engine.upload(
        b"another agent's\n", "agent.txt", agent_id=f"victim-{secrets.token_hex(3)}"
    )
    for file_id in (uploaded.id, produced.id, other_agent.id, f"file-{secrets.token_hex(12)}"):
        with pytest.raises(FileNotFoundInStore):
            await thief.attach([file_id])
        with pytest.raises(FileNotFoundInStore):
            await thief.run("1", file_ids=[file_id])
    r = await run(thief, "import os; print(sorted(os.listdir('/mnt/data')))")
    assert r.stdout.strip() == "[]"
    assert {f.id for f in await thief.files()}.isdisjoint(
        {uploaded.id, produced.id, other_agent.id}
    )
    await owner.close()
    await thief.close()


async def test_a_session_cannot_grow_the_host_store_without_bound(engines: EngineBox) -> None:
    from tests.security.conftest import TIGHT

    engine = await engines.get("store", policy=TIGHT, pool_size=1, max_produced_bytes=16 << 20)
    s = await engine.session()
    for _ in range(5):  # fresh content every cell: nothing deduplicates
        r = await s.run(
            "import os\nfor i in range(2):\n"
            "    open(f'/mnt/data/blob{i}.bin', 'wb').write(os.urandom(7 << 20))"
        )
        assert r.status == "ok", r
    stored = sum(f.size_bytes for f in await s.files())
    # The last cell's versions are whole and downloadable; older ones made room.
    assert sorted(f.name for f in r.files) == ["blob0.bin", "blob1.bin"]
    assert not r.files_truncated and "superseded" in (r.files_note or ""), r.files_note
    for f in r.files:
        assert len(await engine.download(f.id)) == 7 << 20
    await s.close()
    assert stored <= TIGHT.workspace_mb << 20, f"one session stored {stored >> 20} MiB"
