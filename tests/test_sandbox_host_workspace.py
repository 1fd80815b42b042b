"""Host folders as a sandbox's /mnt/data.

A folder no sandbox may own is refused before anything is made, and a folder
that cannot be made or given away is refused with the cause, leaving nothing
made behind.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkernel.errors import BadInput
from sandkernel.sandbox import (
    SANDBOX_UID,
    host_workspace,
)

pytestmark = pytest.mark.sandbox


# -- host workspaces: where a sandbox may never own a folder ---------------------------


@pytest.mark.parametrize(
    ("folder", "why"),
    [
        ("/", "it is a system folder"),
        ("/root", "it is a system folder"),
        ("/home", "it is a system folder"),
        ("/tmp", "it is a system folder"),
        ("/var", "it is a system folder"),
        ("/etc", "it is a system folder"),
        # Not there yet, so new and empty: still the system's.
        ("/etc/udev/rules.d/sandkernel-new", "it is inside /etc, a system folder"),
        ("/usr/local/sandkernel-new", "it is inside /usr, a system folder"),
        ("/var/log/sandkernel-new", "it is inside /var/log, a system folder"),
        # Services look for what they run in folders of /var/lib that may not exist yet.
        ("/var/lib/polkit-1/localauthority/50-local.d", "it is inside /var/lib, a system folder"),
        ("/var/lib/sandkernel-new", "it is inside /var/lib, a system folder"),
        ("/dev/shm", "it is a system folder"),
        ("/dev/sandkernel-new", "it is inside /dev, a system folder"),
    ],
)
def test_system_folders_are_refused_as_host_workspaces(folder: str, why: str) -> None:
    # Only checked: a wrong acceptance must not give a real system folder away.
    with pytest.raises(BadInput, match=f"cannot be a sandbox's: {why}"):
        host_workspace.check_host_workspace(Path(folder))


def test_a_folder_that_holds_a_home_is_refused_as_a_host_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "users" / "someone"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(BadInput, match=f"it holds {home}, a home folder"):
        host_workspace.check_host_workspace(tmp_path / "users")


@pytest.mark.parametrize(
    "inside_home", [".local/bin", ".config/systemd/user", ".config/autostart", ".ssh"]
)
def test_a_folder_in_a_homes_hidden_folders_is_refused_even_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inside_home: str
) -> None:
    # What the home's user runs or is configured by: ~/.local/bin is on PATH,
    # systemd runs the units of ~/.config/systemd/user.
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    workspace = home / inside_home
    hidden = home / inside_home.split("/")[0]
    where = "" if hidden == workspace else f"inside {hidden}, "
    with pytest.raises(
        BadInput, match=re.escape(f"it is {where}a hidden folder of {home}, a home folder")
    ):
        host_workspace.claim_host_workspace(workspace)
    assert not workspace.exists()
    assert sorted(p.name for p in home.iterdir()) == [".config"]
    assert list((home / ".config").iterdir()) == []


def test_a_new_folder_in_a_home_outside_its_hidden_folders_is_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    workspace = home / "projects" / "data"
    assert host_workspace.claim_host_workspace(workspace) == workspace
    assert workspace.stat().st_uid == SANDBOX_UID
    assert workspace.parent.stat().st_uid == 0


# -- host workspaces: only in places no other user may change ---------------------------

_SOMEONE = 1000  # a user other than root and the sandbox's


def test_a_folder_inside_another_users_folder_is_refused_naming_it(tmp_path: Path) -> None:
    # They could swap theirs for a link to another place while the sandbox
    # runs, and have the engine read and write there as root.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, _SOMEONE, _SOMEONE)
    workspace = theirs / "project" / "data"
    for call in (host_workspace.check_host_workspace, host_workspace.claim_host_workspace):
        with pytest.raises(
            BadInput, match=re.escape(f"inside {theirs}, which belongs to uid {_SOMEONE}")
        ):
            call(workspace)
    assert list(theirs.iterdir()) == []


def test_a_folder_inside_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(BadInput, match=re.escape(f"inside {shared}, which other users may write")):
        host_workspace.claim_host_workspace(shared / "ws")
    assert list(shared.iterdir()) == []


def test_a_sticky_folder_is_refused_above_another_users_entry_only(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)  # as /tmp: each user renames only their own entries
    workspace = scratch / "ws"
    assert host_workspace.claim_host_workspace(workspace) == workspace
    assert workspace.stat().st_uid == SANDBOX_UID
    (scratch / "theirs").mkdir()
    os.chown(scratch / "theirs", _SOMEONE, _SOMEONE)
    (scratch / "theirs").chmod(0o755)
    with pytest.raises(BadInput, match=re.escape(f"inside {scratch / 'theirs'}, which belongs")):
        host_workspace.claim_host_workspace(scratch / "theirs" / "ws")
    ours = scratch / "ours"
    ours.mkdir(mode=0o755)
    assert host_workspace.claim_host_workspace(ours / "ws") == ours / "ws"
    # Another user's empty folder there is theirs to swap until it is claimed.
    (scratch / "their-ws").mkdir()
    os.chown(scratch / "their-ws", _SOMEONE, _SOMEONE)
    with pytest.raises(BadInput, match=f"which lets uid {_SOMEONE} rename what it holds"):
        host_workspace.claim_host_workspace(scratch / "their-ws")


def test_a_folder_given_to_another_user_after_the_check_is_refused_at_the_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    workspace = parent / "ws"
    checked = host_workspace._checked

    def checked_then_given_away(path: Path, places: Any) -> Path:
        resolved = checked(path, places)
        os.chown(parent, _SOMEONE, _SOMEONE)  # between the check and the claim
        return resolved

    monkeypatch.setattr(host_workspace, "_checked", checked_then_given_away)
    with pytest.raises(BadInput, match=f"which belongs to uid {_SOMEONE}"):
        host_workspace.claim_host_workspace(workspace)
    assert not workspace.exists()


def test_a_read_only_empty_folder_is_given_to_the_sandbox_user_to_write(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    assert host_workspace.claim_host_workspace(folder) == folder
    info = folder.stat()
    assert info.st_uid == SANDBOX_UID and info.st_mode & 0o777 == 0o755


@pytest.fixture
def new_shm_folder() -> Iterator[Path]:
    """A folder that does not exist yet under ``/dev/shm``, removed afterwards."""
    path = Path("/dev/shm") / f"sandkernel-test-ws-{secrets.token_hex(4)}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_new_folder_in_dev_shm_is_claimed(new_shm_folder: Path) -> None:
    # Scratch space, as /tmp is, though /dev holds it (and /dev/shm itself is refused).
    workspace = new_shm_folder / "ws"
    assert host_workspace.claim_host_workspace(workspace) == workspace
    assert workspace.stat().st_uid == SANDBOX_UID
    assert new_shm_folder.stat().st_uid == 0


# -- host workspaces that cannot be made or given: a refusal naming the cause ----------


def test_a_file_on_a_host_workspaces_path_is_refused_naming_it(tmp_path: Path) -> None:
    a_file = tmp_path / "notes"
    a_file.write_text("kept\n")
    workspace = a_file / "sub" / "ws"
    with pytest.raises(
        BadInput, match=re.escape(f"the workspace {workspace} cannot be made: {a_file} is not")
    ):
        host_workspace.claim_host_workspace(workspace)
    assert a_file.read_text() == "kept\n"


def test_a_loop_of_links_is_refused_naming_the_workspace(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.symlink_to(second)
    second.symlink_to(first)
    through = first / "ws"
    with pytest.raises(
        BadInput,
        match=re.escape(f"the workspace {through} cannot be found: a link on its path leads back"),
    ):
        host_workspace.claim_host_workspace(through)
    with pytest.raises(BadInput, match=re.escape(f"the workspace {first} is a link (to {second})")):
        host_workspace.claim_host_workspace(first)


def test_a_file_system_that_refuses_the_owner_change_is_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As NFS with root squashing or vfat answer a chown.
    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    kept = tmp_path / "kept"
    (kept / "empty").mkdir(parents=True)
    monkeypatch.setattr(os, "fchown", refuse)
    why = re.escape(f"to the sandbox user (uid {SANDBOX_UID}): {os.strerror(errno.EPERM)}")
    new = kept / "made" / "ws"
    with pytest.raises(BadInput, match=re.escape(f"the workspace {new} cannot be given ") + why):
        host_workspace.claim_host_workspace(new)
    # Only what the claim made is gone: a folder that was there stays.
    empty = kept / "empty"
    with pytest.raises(BadInput, match=re.escape(f"the workspace {empty} cannot be given ") + why):
        host_workspace.claim_host_workspace(empty)
    assert [p.name for p in kept.iterdir()] == ["empty"]
    assert empty.stat().st_uid == 0
