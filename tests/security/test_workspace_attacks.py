"""Host workspace attacks: a folder of the caller's given to a session as ``/mnt/data``.

Such a folder becomes the sandbox user's for good, with everything in it, so
the code could rename or replace whatever it holds. The engine must refuse,
before it changes anything, a folder holding files that are not the
sandbox's, a link, a system or home folder or a home's hidden folder, a
folder of the engine's own and one inside a folder a sandbox owns, also when
a folder on the path is swapped for a link after the check, or when a bind
mount shows a protected folder under another name. Where a wrong acceptance
would let the attack run, it runs, and the folder is compared with what it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkernel.engine import Engine
from sandkernel.errors import BadInput
from sandkernel.sandbox import host_workspace
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


async def test_a_settings_folder_in_the_users_home_is_refused_and_not_made(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the desktop session starts at the user's next login.
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    autostart = home / ".config" / "autostart"
    before = snapshot(home)
    why = await refusal(
        engine,
        autostart,
        "open('/mnt/data/x.desktop', 'w').write('[Desktop Entry]\\nExec=sh -c pwned\\n')",
    )
    assert snapshot(home) == before
    assert f"it is inside {home / '.config'}, a hidden folder of {home}, a home folder" in why


@pytest.fixture(params=["/run", "/var/lib"])
def new_system_folder(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A folder that does not exist yet in a system tree, removed afterwards whatever made it."""
    path = Path(request.param) / f"sandkernel-test-ws-{secrets.token_hex(4)}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_a_new_folder_in_a_system_tree_is_refused_and_not_made(
    engine: Engine, new_system_folder: Path
) -> None:
    why = await refusal(engine, new_system_folder)
    assert not await asyncio.to_thread(new_system_folder.exists)
    assert f"it is inside {new_system_folder.parent}, a system folder" in why


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


# -- the place changes under the claim -------------------------------------------------
#
# ``guarded`` stands for a folder such as /etc/udev, given as one no sandbox
# may own: an empty ``rules.d`` in it, handed over, is code run as root.


def swap_for_link(folder: Path, target: Path) -> None:
    """What whoever may write ``folder``'s parent can do at any moment."""
    folder.rename(folder.with_name(f"{folder.name}-moved"))
    folder.symlink_to(target)


@pytest.mark.parametrize("when", ["after the check", "while the folder is made"])
def test_a_folder_on_the_path_swapped_for_a_link_gives_nothing_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    guarded = tmp_path / "guarded"
    (guarded / "rules.d").mkdir(parents=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    workspace = shared / "rules.d"
    if when == "after the check":
        workspace.mkdir()
        checked_only = host_workspace._checked

        def check_then_swap(*args: Any, **kwargs: Any) -> Path:
            checked = checked_only(*args, **kwargs)
            swap_for_link(shared, guarded)
            return checked

        monkeypatch.setattr(host_workspace, "_checked", check_then_swap)
        why = f"{shared} became a link after it was checked"
    else:
        made_only = os.mkdir

        def swap_then_make(*args: Any, **kwargs: Any) -> None:
            if not shared.is_symlink():
                swap_for_link(shared, guarded)
            made_only(*args, **kwargs)

        monkeypatch.setattr(os, "mkdir", swap_then_make)
        why = f"the folder made or found there is {tmp_path / 'shared-moved' / 'rules.d'} now"
    before = snapshot(guarded)
    with pytest.raises(BadInput, match=re.escape(f"{workspace} cannot be claimed: {why}")):
        host_workspace.claim_host_workspace(workspace, also_refused=(guarded,))
    monkeypatch.undo()
    assert snapshot(guarded) == before
    # What the claim made where the folder was is gone again; what was there stays.
    moved = tmp_path / "shared-moved"
    was_there = when == "after the check"
    assert [p.name for p in moved.iterdir()] == (["rules.d"] if was_there else [])
    if was_there:
        assert (moved / "rules.d").stat().st_uid == 0


#: Run in a private mount namespace with its bind mounts (see below): each
#: workspace's refusal, "" for an acceptance.
_CLAIMS_THROUGH_BIND_MOUNTS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from sandkernel.errors import BadInput
    from sandkernel.sandbox.host_workspace import check_host_workspace, claim_host_workspace
    guarded, alias, host = map(Path, sys.argv[1:4])
    tries = {
        "alias/rules.d": lambda: claim_host_workspace(alias / "rules.d", also_refused=[guarded]),
        "alias": lambda: claim_host_workspace(alias, also_refused=[guarded]),
        # Checked only: a wrong acceptance of these changes nothing.
        "host/etc/profile.d": lambda: check_host_workspace(host / "etc" / "profile.d"),
        "host/var/lib/new": lambda: check_host_workspace(host / "var" / "lib" / "new"),
        "host": lambda: check_host_workspace(host),
    }
    refusals = {}
    for name, attempt in tries.items():
        try:
            attempt()
        except BadInput as exc:
            refusals[name] = str(exc)
        else:
            refusals[name] = ""
    print(json.dumps(refusals))
""")


def test_a_protected_folder_bound_under_another_name_is_refused(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is needed for a private mount namespace")
    guarded = tmp_path / "guarded"
    (guarded / "rules.d").mkdir(parents=True)
    alias, host = tmp_path / "alias", tmp_path / "host"
    alias.mkdir()
    host.mkdir()
    before = snapshot(guarded)
    # The mounts live in a namespace of their own, gone with its last process.
    mount_then_run = (
        'mount --bind "$1" "$2" && mount --bind / "$3" || exit 99; exec "$4" -c "$5" "$1" "$2" "$3"'
    )
    argv = [
        unshare, "--mount", "--propagation", "private", "sh", "-c", mount_then_run, "sh",
        str(guarded), str(alias), str(host), sys.executable, _CLAIMS_THROUGH_BIND_MOUNTS,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode == 99:
        pytest.skip(f"no bind mount in a private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    refusals = json.loads(proc.stdout)
    assert snapshot(guarded) == before
    engines = "the engine's own folder"
    assert f"it is inside {alias} ({guarded} mounted there), {engines}" in refusals["alias/rules.d"]
    assert f"it is {guarded} mounted again, {engines}" in refusals["alias"]
    etc = f"it is inside {host / 'etc'} (/etc mounted there), a system folder"
    assert etc in refusals["host/etc/profile.d"]
    var_lib = f"it is inside {host / 'var' / 'lib'} (/var/lib mounted there), a system folder"
    assert var_lib in refusals["host/var/lib/new"]
    assert "it is / mounted again, a system folder" in refusals["host"]
