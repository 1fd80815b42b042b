"""Files in and out of real sandboxed sessions: scopes, produced files, attacks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sandkernel import Engine, raw_file_name
from sandkernel.errors import BadInput, FileNotFoundInStore, FileRejected
from sandkernel.files import MIME_TYPES
from sandkernel.policy import load_policy
from sandkernel.workspace import SessionWorkspace
from tests.files._samples import SAMPLES

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
EngineFactory = Callable[..., Awaitable[Engine]]


async def test_every_supported_type_uploads_appears_and_comes_back_identical(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session("types")
    uploaded = {}
    for ext, make in sorted(SAMPLES.items()):
        data = make()
        stored = await session.upload(data, f"sample{ext}")
        assert stored.mime_type == MIME_TYPES[ext][0]
        uploaded[f"sample{ext}"] = hashlib.sha256(data).hexdigest()
        assert await engine.download(stored.id) == data
    r = await session.run(
        "import hashlib, json, os\n"
        "print(json.dumps({n: hashlib.sha256(open(n, 'rb').read()).hexdigest()\n"
        "                  for n in os.listdir('/mnt/data')}))"
    )
    assert json.loads(r.stdout) == uploaded
    assert r.files == []  # inputs are not reported as produced


async def test_unsupported_and_mislabelled_uploads_are_refused_clearly(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    with pytest.raises(FileRejected, match=r"\.exe is not a supported type; allowed: .*\.csv"):
        await engine.upload(b"MZ\x90\x00", "tool.exe")
    with pytest.raises(FileRejected, match="image/png"):
        await engine.upload(SAMPLES[".png"](), "data.csv")
    assert await engine.list_files() == []


async def test_agent_files_are_in_every_session_of_the_agent_read_only(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=3)
    stored = await engine.upload(b"region,sales\nnorth,10\n", "shared.csv", agent_id="analyst")
    mine1 = await engine.session("m1", agent_id="analyst")
    mine2 = await engine.session("m2", agent_id="analyst")
    other = await engine.session("o1", agent_id="someone-else")
    for s in (mine1, mine2):
        r = await s.run("print(open('/mnt/data/shared.csv').read(), end='')")
        assert r.stdout == "region,sales\nnorth,10\n"
    r = await other.run("import os; print(os.path.exists('/mnt/data/shared.csv'))")
    assert r.stdout.strip() == "False"
    r = await mine1.run(
        "import os\n"
        "def attempt(f):\n"
        "    try:\n"
        "        f(); return 'done'\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        "p = '/mnt/data/shared.csv'\n"
        "print([attempt(lambda: open(p, 'a').write('x')), attempt(lambda: os.remove(p)),\n"
        "       attempt(lambda: os.rename(p, '/mnt/data/moved.csv')),\n"
        "       attempt(lambda: os.chmod(p, 0o666))])"
    )
    assert "done" not in r.stdout, r.stdout
    assert await engine.download(stored.id) == b"region,sales\nnorth,10\n"
    late = await engine.upload(b"added later\n", "late.txt", agent_id="analyst")
    r = await mine2.run("print(open('/mnt/data/late.txt').read(), end='')")
    assert r.stdout == "added later\n" and late.agent_id == "analyst"


async def test_an_agent_file_given_while_a_session_of_the_agent_is_made_reaches_it(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await engine_factory(pool_size=1)
    await engine.upload(b"a\n", "early.txt", agent_id="analyst")
    prepare = SessionWorkspace.prepare
    given: list[str] = []

    async def given_meanwhile(self: SessionWorkspace, folder: Path, *, restart: bool) -> None:
        await prepare(self, folder, restart=restart)
        # After the agent's files were listed, before the session is a live one.
        given.append((await engine.upload(b"b\n", "late.txt", agent_id="analyst")).id)

    monkeypatch.setattr(SessionWorkspace, "prepare", given_meanwhile)
    session = await engine.session("m1", agent_id="analyst")
    monkeypatch.undo()
    assert given
    r = await session.run("import os; print(sorted(os.listdir('/mnt/data')))")
    assert r.stdout == "['early.txt', 'late.txt']\n"


async def test_an_agent_file_given_while_a_restart_fills_the_workspace_reaches_it(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await engine_factory(pool_size=1)
    await engine.upload(b"a\n", "early.txt", agent_id="analyst")
    session = await engine.session("m1", agent_id="analyst")
    assert (await session.run("import os; os._exit(3)")).status == "dead"
    prepare = SessionWorkspace.prepare
    given: list[str] = []

    async def given_meanwhile(self: SessionWorkspace, folder: Path, *, restart: bool) -> None:
        await prepare(self, folder, restart=restart)
        # After the agent's files were listed, before the fresh kernel is the session's.
        given.append((await engine.upload(b"b\n", "late.txt", agent_id="analyst")).id)

    monkeypatch.setattr(SessionWorkspace, "prepare", given_meanwhile)
    r = await session.run("import os; print(sorted(os.listdir('/mnt/data')))", restart=True)
    monkeypatch.undo()
    assert given and r.state_lost
    assert r.stdout == "['early.txt', 'late.txt']\n"


async def test_an_agent_upload_skips_a_session_with_no_room_and_reaches_the_others(
    engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    policy = load_policy("default").model_copy(update={"workspace_mb": 4})
    engine = await engine_factory(pool_size=2, policy=policy)
    full = await engine.session("full", agent_id="analyst")
    other = await engine.session("other", agent_id="analyst")
    filled = await full.run("open('/mnt/data/fill.bin', 'wb').write(b'x' * ((4 << 20) - 16384))")
    assert filled.status == "ok", filled
    stored = await engine.upload(b"a,b\n" * 10_000, "kb.csv", agent_id="analyst")
    assert [f.id for f in await engine.list_files(agent_id="analyst")] == [stored.id]
    r = await other.run("print(len(open('/mnt/data/kb.csv').read()))")
    assert r.stdout.strip() == "40000"
    r = await full.run("import os; print(os.path.exists('/mnt/data/kb.csv'))")
    assert r.stdout.strip() == "False"
    assert "session full did not get kb.csv" in caplog.text


async def test_a_longest_name_taken_twice_gets_a_suffixed_name_that_is_still_legal(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("long")
    name = "a" * 251 + ".txt"  # 255 bytes, the most a name can have
    await s.run(f"open('/mnt/data/{name}', 'w').write('one')")  # the code's file
    second = await s.upload(b"two", name)
    assert second.path == f"/mnt/data/{'a' * 242}-{second.id[5:13]}.txt"
    r = await s.run(
        "import os\n"
        "names = sorted(os.listdir('/mnt/data'))\n"
        "print([(len(n.encode()), n[-13:], open(n).read()) for n in names])"
    )
    assert r.stdout.strip() == str(
        [(255, "-" + second.id[5:13] + ".txt", "two"), (255, "aaaaaaaaa.txt", "one")]
    )


async def test_a_corrected_upload_is_read_at_the_path_of_the_one_it_replaces(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("again")
    first = await s.upload(b"month,sales\njan,1\n", "data.csv")
    assert (await s.run("print(len(open('/mnt/data/data.csv').readlines()))")).stdout == "2\n"
    corrected = await s.upload(b"month,sales\njan,1\nfeb,999\n", "data.csv")
    assert first.path == corrected.path == "/mnt/data/data.csv"
    r = await s.run(
        "import os\nprint(sorted(os.listdir('/mnt/data')), open('/mnt/data/data.csv').read())"
    )
    assert r.stdout == "['data.csv'] month,sales\njan,1\nfeb,999\n\n"
    assert r.files == []
    assert {f.id: f.path for f in await s.files()} == {
        first.id: None,  # still stored, no longer in the sandbox
        corrected.id: "/mnt/data/data.csv",
    }


async def test_after_a_restart_a_session_file_keeps_its_name_over_an_agent_file(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("own", agent_id="analyst")
    await s.run("open('/mnt/data/report.txt', 'w').write('my results')")
    agents = await engine.upload(b"template", "report.txt", agent_id="analyst")
    show = (
        "import os\n"
        "for n in sorted(os.listdir('/mnt/data')):\n"
        "    st = os.stat(n)\n"
        "    print(n, st.st_uid, oct(st.st_mode & 0o777), open(n).read())"
    )
    before = (await s.run(show)).stdout
    assert (await s.run("import os; os._exit(3)")).status == "dead"
    after = await s.run(show, restart=True)
    assert after.state_lost and after.stdout == before
    assert after.stdout.splitlines() == [
        f"report-{agents.id[5:13]}.txt 0 0o444 template",
        "report.txt 65534 0o644 my results",
    ]


async def test_a_restart_says_which_files_it_could_not_put_back(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("own")
    made = await s.run(
        "open('/mnt/data/kept.txt', 'w').write('k'); open('/mnt/data/gone.txt', 'w').write('g')"
    )
    await engine.delete_file({f.name: f for f in made.files}["gone.txt"].id)
    assert (await s.run("import os; os._exit(3)")).status == "dead"
    after = await s.run("import os; print(sorted(os.listdir('/mnt/data')))", restart=True)
    assert after.state_lost and after.stdout == "['kept.txt']\n"
    assert after.files_note == (
        "not put back after the kernel restarted (deleted, or expired): /mnt/data/gone.txt"
    )
    assert (await s.run("1")).files_note is None


async def test_csv_png_and_shown_figure_come_back_as_three_files(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("out")
    r = await s.run(
        "import hashlib, json, matplotlib.pyplot as plt\n"
        "open('/mnt/data/table.csv', 'w').write('a,b\\n1,2\\n')\n"
        "fig, ax = plt.subplots(); ax.plot([1, 2, 3])\n"
        "fig.savefig('/mnt/data/chart.png')\n"
        "print(json.dumps({n: hashlib.sha256(open(n, 'rb').read()).hexdigest()\n"
        "                  for n in ('table.csv', 'chart.png')}))\n"
        "plt.show()"
    )
    assert r.status == "ok", r
    inside = json.loads(r.stdout)
    by_name = {f.name: f for f in r.files}
    assert set(by_name) == {"table.csv", "chart.png", "image-1-1.png"}
    assert by_name["table.csv"].mime_type == "application/csv"
    assert by_name["chart.png"].mime_type == "image/png"
    assert by_name["image-1-1.png"].mime_type == "image/png"
    assert by_name["image-1-1.png"].source == "display"
    assert by_name["table.csv"].path == "/mnt/data/table.csv"
    for name in ("table.csv", "chart.png"):
        assert by_name[name].sha256 == inside[name]
    for f in r.files:
        data = await engine.download(f.id)
        assert hashlib.sha256(data).hexdigest() == f.sha256 and len(data) == f.size_bytes
    again = await s.run("x = 1")
    assert again.files == []  # unchanged files are not reported twice
    # An image as the cell's value is a produced file too, as a displayed one is.
    value = await s.run("from IPython.display import Image\nImage('/mnt/data/chart.png')")
    (shown,) = value.files
    assert shown.source == "display" and shown.mime_type == "image/png"
    assert shown.sha256 == inside["chart.png"]


async def test_symlink_to_a_host_secret_is_not_followed(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_bytes(b"HOST-SECRET-91c2 do not leak")
    engine = await engine_factory()
    s = await engine.session("links")
    r = await s.run(
        "import os\n"
        f"os.symlink({str(secret)!r}, '/mnt/data/leak.txt')\n"
        "os.symlink('/proc/1/root/etc/passwd', '/mnt/data/leak2.txt')\n"
        "os.mkdir('/mnt/data/d'); os.symlink('/etc', '/mnt/data/d/etc')\n"
        "os.mkfifo('/mnt/data/pipe.txt')\n"
        "open('/mnt/data/fine.txt', 'w').write('ok')"
    )
    assert r.status == "ok", r
    assert [f.name for f in r.files] == ["fine.txt"]
    for stored in await engine.list_files():
        assert b"HOST-SECRET" not in await engine.download(stored.id)
    assert r.files_truncated and r.files_note == (
        "not collected (not regular files): d/etc (a symlink), leak.txt (a symlink), "
        "leak2.txt (a symlink), pipe.txt (a FIFO)"
    )
    again = await s.run("1")
    assert not again.files_truncated and again.files_note is None  # said once


async def test_traversing_and_absolute_names_stay_inside(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("names")
    for name in ("../../etc/evil.csv", "/etc/cron.d/evil2.csv"):
        stored = await engine.upload(b"x,y\n", name)
        (path,) = await s.attach([stored.id])
        assert path.startswith("/mnt/data/") and ".." not in path
    r = await s.run("import os; print(sorted(os.listdir('/mnt/data')))")
    assert r.stdout.strip() == "['evil.csv', 'evil2.csv']"
    workspace_parent = s.kernel.workspace.parent if s.kernel else None
    assert workspace_parent is not None and not (workspace_parent / "evil.csv").exists()


async def test_output_caps_hold_and_are_flagged(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(max_produced_files=3, max_upload_bytes=1000)
    s = await engine.session("caps")
    r = await s.run("for i in range(10): open(f'/mnt/data/f{i}.txt', 'w').write(str(i))")
    assert len(r.files) == 3 and r.files_truncated
    assert "max_files" in (r.files_note or "")
    with pytest.raises(FileRejected, match="1000"):
        await engine.upload(b"a" * 2000, "big.txt")


async def test_ids_stay_valid_after_an_engine_restart(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    store_dir = tmp_path / "durable"
    first = await engine_factory(store_dir=store_dir)
    s = await first.session("before")
    r = await s.run("open('/mnt/data/kept.txt', 'w').write('survives restarts')")
    (produced,) = r.files
    uploaded = await first.upload(b"uploaded\n", "in.txt")
    await first.aclose()
    second = await engine_factory(store_dir=store_dir)
    assert await second.download(produced.id) == b"survives restarts"
    assert await second.download(uploaded.id) == b"uploaded\n"
    assert (await second.file(produced.id)).session_id == "before"


async def test_produced_files_stay_downloadable_after_the_session_expires(
    engine_factory: EngineFactory,
) -> None:
    now = [0.0]
    engine = await engine_factory(session_ttl_s=10, reap_interval_s=3600, clock=lambda: now[0])
    s = await engine.session("gone")
    r = await s.run("open('/mnt/data/report.md', 'w').write('# done')")
    now[0] = 11
    assert await engine.reap() == ["gone"]
    assert await engine.download(r.files[0].id) == b"# done"
    assert [f.name for f in await s.files()] == ["report.md"]


async def test_a_session_cannot_use_another_sessions_file(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=2)
    a, b = await engine.session("fa"), await engine.session("fb")
    mine = await a.upload(b"private to a\n", "a.txt")
    r = await a.run("open('/mnt/data/out.txt', 'w').write('made by a')")
    for file_id in (mine.id, r.files[0].id):
        with pytest.raises(FileNotFoundInStore):
            await b.run("1", file_ids=[file_id])
    private = await engine.upload(b"agent only\n", "agent.txt", agent_id="x")
    with pytest.raises(FileNotFoundInStore):
        await b.attach([private.id])


async def test_restart_after_a_crash_restores_the_sessions_files(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=2)
    s = await engine.session("crash")
    await s.upload(b"input\n", "in.txt")
    await s.run(
        "import os; os.makedirs('/mnt/data/out'); open('/mnt/data/out/r.txt','w').write('r')"
    )
    dead = await s.run("import os; os._exit(1)")
    assert dead.status == "dead"
    # Uploaded while there is no kernel: placed in the workspace the restart makes.
    await s.upload(b"late\n", "late.txt")
    r = await s.run(
        "print(open('/mnt/data/in.txt').read() + open('/mnt/data/out/r.txt').read()"
        " + open('/mnt/data/late.txt').read())",
        restart=True,
    )
    assert r.state_lost and r.stdout == "input\nrlate\n\n"
    assert r.files == []


async def test_an_upload_to_a_session_keeps_its_retention(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    s = await engine.session("kept")
    stored = await engine.upload(b"a\n", "a.txt", session_id=s.id, retention_s=60)
    assert stored.session_id == "kept" and stored.expires_at is not None
    assert (await engine.file(stored.id)).expires_at == stored.expires_at
    assert (await s.run("print(open('/mnt/data/a.txt').read(), end='')")).stdout == "a\n"
    with pytest.raises(BadInput, match="not both"):
        await engine.upload(b"b\n", "b.txt", session_id=s.id, agent_id="x")


async def test_look_alike_and_undecodable_names_are_listed_apart_and_map_back(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    s = await engine.session("odd-names")
    contents = {
        b"sk new\nline.txt": b"a line feed in the name\n",
        b"sk new\\nline.txt": b"a backslash and n in the name\n",
        b"bad\xff.txt": b"a name that is not UTF-8\n",
    }
    # Bytes paths, so that the names reach the disk exactly as written here.
    code = "import os\n" + "".join(
        f"fd = os.open({b'/mnt/data/' + raw!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n"
        f"os.write(fd, {data!r}); os.close(fd)\n"
        for raw, data in contents.items()
    )
    r = await s.run(code)
    assert r.status == "ok", r
    assert r == type(r).model_validate_json(r.model_dump_json())  # fit for JSON
    by_raw = {raw_file_name(f.name): f for f in r.files}
    assert len(r.files) == 3 and set(by_raw) == set(contents)
    assert {f.name for f in r.files} == {
        "sk new\\nline.txt",
        "sk new\\\\nline.txt",
        "bad\\xff.txt",
    }
    for raw, produced in by_raw.items():
        assert await engine.download(produced.id) == contents[raw]
        assert raw_file_name(produced.path) == b"/mnt/data/" + raw
        assert (await engine.file(produced.id)).name == produced.name
    assert {f.name for f in await s.files()} == {f.name for f in r.files}
    # The listed path, mapped back, opens the very file in the sandbox.
    paths = [raw_file_name(f.path) for f in r.files]
    check = await s.run(f"print([open(p, 'rb').read() for p in {paths!r}])")
    assert check.status == "ok", check
    assert check.stdout.strip() == repr([contents[raw_file_name(f.name)] for f in r.files])
