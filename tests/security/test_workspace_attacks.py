"""Host workspace attacks: a folder of the caller's given to a session as ``/mnt/data``.

Such a folder becomes the sandbox user's for good, with everything in it, so
the code could rename or replace whatever it holds. The engine must refuse,
before it changes anything, a folder holding files that are not the
sandbox's, a link, a system or home folder, a folder of the engine's own and
one inside a folder a sandbox owns. Where a wrong acceptance would let the
attack run, it runs, and the folder is compared with what it was.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandkernel.engine import Engine
from sandkernel.errors import BadInput
from tests.security.conftest import EngineBox

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

#: The code's try at the folder's files: a profile of the user's, replaced.
REPLACE_PROFILE = (
    "import os\n"
    "os.rename('/mnt/data/.bashrc', '/mnt/data/old')\n"
    "open('/mnt/data/.bashrc', 'w').write('echo PWNED\\n')"
)

Snapshot = dict[str, tuple[int, int, int, bytes | None]]


@pytest.fixture
async def engine(engines: EngineBox) -> Engine:
    # Host workspaces start cold, outside the pool: warm kernels would be waste.
    return await engines.get("host-workspace", pool_size=0)


def snapshot(folder: Path) -> Snapshot:
    """Owner, group, mode and content of a folder and of everything in it."""
    found: Snapshot = {}
    for where, dirs, files in os.walk(folder):
        for path in [Path(where), *(Path(where, d) for d in dirs)]:
            info = path.lstat()
            found[str(path)] = (info.st_uid, info.st_gid, info.st_mode, None)
        for name in files:
            path = Path(where, name)
            info = path.lstat()
            found[str(path)] = (info.st_uid, info.st_gid, info.st_mode, path.read_bytes())
    return found


async def refusal(engine: Engine, workspace: Path, attack: str = "") -> str:
    """Why the engine refused ``workspace``; ``""`` if it took it (and the attack ran)."""
    try:
        session = await engine.session(workspace=workspace)
    except BadInput as exc:
        return str(exc)
    try:
        if attack:
            await session.run(attack)
    finally:
        await engine.close_session(session.id)
    return ""


async def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(
    engine: Engine, tmp_path: Path
) -> None:
    home = tmp_path / "home2"
    home.mkdir(mode=0o750)
    (home / ".bashrc").write_text("echo root-profile\n")
    before = snapshot(home)
    why = await refusal(engine, home, REPLACE_PROFILE)
    assert snapshot(home) == before
    assert f"the workspace {home} is not empty and is not a sandbox's" in why
    # It says what to give instead: a new or empty folder, and files as uploads.
    assert "does not exist yet or is empty" in why
    assert "`sandkernel run -i FILE`" in why and "`session.upload`" in why


async def test_a_link_to_an_empty_folder_is_refused_and_the_folder_stays_its_owners(
    engine: Engine, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(target)
    why = await refusal(engine, link, "open('/mnt/data/planted', 'w').write('x')")
    assert snapshot(target) == before
    assert f"the workspace {link} is a link" in why


async def test_the_users_home_is_refused_even_empty(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    why = await refusal(engine, home, "open('/mnt/data/.bashrc', 'w').write('echo PWNED\\n')")
    assert snapshot(home) == before
    assert f"the workspace {home} cannot be a sandbox's: it is a home folder" in why


@pytest.fixture
def new_system_folder() -> Iterator[Path]:
    """A folder that does not exist yet under ``/run``, removed afterwards whatever made it."""
    path = Path("/run") / f"sandkernel-test-ws-{secrets.token_hex(4)}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_new_folder_in_a_system_tree_is_refused_and_not_made(
    engine: Engine, new_system_folder: Path
) -> None:
    why = await refusal(engine, new_system_folder)
    assert not await asyncio.to_thread(new_system_folder.exists)
    assert "it is inside /run, a system folder" in why


async def test_a_folder_of_the_engines_file_store_is_refused(
    engines: EngineBox, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    engine = await engines.get("host-workspace-store", pool_size=0, store_dir=store)
    await engine.list_files()  # the store and its folders exist
    # Empty, and the engine writes its files there before renaming them into place.
    spare = store / "tmp"
    assert spare.is_dir() and not any(spare.iterdir())
    before = snapshot(spare)
    why = await refusal(engine, spare)
    assert snapshot(spare) == before
    assert f"it is inside {store}, the engine's own folder" in why


async def test_a_folder_inside_a_sandboxs_folder_is_refused(engine: Engine, tmp_path: Path) -> None:
    used = tmp_path / "used"
    assert await refusal(engine, used, "import os; os.mkdir('/mnt/data/inner')") == ""
    inner = used / "inner"
    assert inner.is_dir()
    why = await refusal(engine, inner)
    assert f"the workspace {inner} is inside {used}, a sandbox's folder" in why
