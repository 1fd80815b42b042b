"""Host folders given as a sandbox's ``/mnt/data``: which may become a sandbox's, and claiming one.

A host folder bound as /mnt/data is chowned to the sandbox user, for good:
whatever is in it becomes the sandbox's to rename, replace or link away.
:func:`check_host_workspace` refuses a folder no sandbox may own;
:func:`claim_host_workspace` checks it again through folders opened one by
one (no link followed) and gives it to the sandbox user.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import pwd
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandkernel.errors import BadInput
from sandkernel.sandbox.layout import SANDBOX_GID, SANDBOX_UID

# A folder that becomes a sandbox's must hold nothing but what a sandbox may
# own: it is new, empty, or already the sandbox user's (a sandbox used it
# before). Unlike the tmpfs workspace it has no size cap: the policy's
# ``workspace_mb`` and ``workspace_inodes`` size that tmpfs only; here each
# file is still capped by ``file_size_mb`` (RLIMIT_FSIZE), their total is not.
#
# Its place is checked on the path, then again on the folders themselves:
# whoever may write a folder on the path can swap it for a link between the
# check and the chown, so the claim opens each folder from / without following
# a link and checks what it opened. Folders are compared by name and by
# (device, inode) too: a bind mount shows a protected folder under another name.

#: Never a sandbox's, nor anything below them: the system's programs,
#: configuration, devices and kernel interfaces, and folders that services
#: write as root. An empty one handed over would be enough: a file the
#: sandbox puts in an empty ``/etc/udev/rules.d`` runs as root, and a link it
#: plants in a service's log folder is written through as root. Services also
#: look for what they run in folders of ``/var/lib`` that need not exist yet
#: (polkit's ``localauthority`` rules).
_SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
    "/run", "/sbin", "/sys", "/usr", "/var/cache", "/var/lib", "/var/log", "/var/mail",
    "/var/spool",
)  # fmt: skip
#: Never a sandbox's themselves (a new folder made in one of them may be).
_SYSTEM_FOLDERS = (
    "/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/var",
    "/tmp", "/var/tmp",  # noqa: S108 - refused here, not used
)  # fmt: skip
#: Scratch space inside a system tree: never a sandbox's itself, but a new
#: folder made in it may be, as in ``/tmp`` (nothing of the system's is looked
#: for in such a folder).
_SCRATCH_FOLDERS = ("/dev/shm",)  # noqa: S108 - checked here, not used


class _Reach(enum.Enum):
    """What a protected folder keeps from a sandbox besides itself (and what holds it)."""

    #: nothing more
    FOLDER = enum.auto()
    #: everything below it
    TREE = enum.auto()
    #: its hidden folders and all below them: the account's programs find
    #: settings and commands to run there (``~/.config/autostart``, ``~/.local/bin``)
    HOME = enum.auto()
    #: nothing more, and what is below it is not part of the tree that holds it
    SCRATCH = enum.auto()


@dataclass(frozen=True)
class _Protected:
    path: Path
    what: str
    reach: _Reach
    #: (st_dev, st_ino), which a bind mount of it shares; None if it does not exist
    identity: tuple[int, int] | None


#: What each folder from ``/`` down to a workspace is (``lstat`` or ``fstat``),
#: None where it does not exist.
type _Chain = Sequence[os.stat_result | None]

#: A folder opened to be checked and claimed: never through a link.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _homes() -> set[Path]:
    # Every account's, not only the caller's: an engine running as root for a
    # daemon must not hand a user's home over either.
    homes: set[Path] = set()
    with contextlib.suppress(RuntimeError, KeyError):
        homes.add(Path.home())
    sudo_user = os.environ.get("SUDO_USER")
    with contextlib.suppress(KeyError):
        if sudo_user:
            homes.add(Path(pwd.getpwnam(sudo_user).pw_dir))
    homes.update(Path(entry.pw_dir) for entry in pwd.getpwall())
    # An empty home would read as the current folder.
    return {home for home in homes if home.is_absolute()}


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)


def _protected(also_refused: Iterable[Path]) -> list[_Protected]:
    wanted = [(Path(p), "a system folder", _Reach.TREE) for p in _SYSTEM_TREES]
    wanted += [(Path(p), "a system folder", _Reach.FOLDER) for p in _SYSTEM_FOLDERS]
    wanted += [(Path(p), "a system folder", _Reach.SCRATCH) for p in _SCRATCH_FOLDERS]
    wanted += [(home, "a home folder", _Reach.HOME) for home in _homes()]
    wanted += [(Path(p), "the engine's own folder", _Reach.TREE) for p in also_refused]
    places: list[_Protected] = []
    for path, what, reach in wanted:
        # Compared resolved, as the workspace is (/lib may be a link to /usr/lib).
        try:
            real = path.resolve()
        except (RuntimeError, OSError):  # a loop of links: no folder to compare with there
            real = path.absolute()
        try:
            identity: tuple[int, int] | None = _identity(real.stat())
        except OSError:
            identity = None
        places.append(_Protected(real, what, reach, identity))
    return places


#: What a refusal tells the caller to do about the files they meant to give.
_UPLOAD_INSTEAD = (
    "to give the code files, upload them instead "
    "(`sandkernel run -i FILE`, or `session.upload` in the API)"
)


def _levels(resolved: Path) -> list[Path]:
    """``/``, then each folder on the way down to ``resolved``, then ``resolved``."""
    return [Path(*resolved.parts[: depth + 1]) for depth in range(len(resolved.parts))]


def _is(place: _Protected, level: Path, info: os.stat_result | None) -> bool:
    return level == place.path or (info is not None and _identity(info) == place.identity)


def _named(place: _Protected, level: Path) -> str:
    return str(level) if level == place.path else f"{level} ({place.path} mounted there)"


def _location_problem(resolved: Path, chain: _Chain, places: Sequence[_Protected]) -> str | None:
    for place in places:
        if _is(place, resolved, chain[-1]):
            instead = (
                "a folder outside it" if place.reach is _Reach.TREE else "a new folder inside it"
            )
            what = (
                place.what
                if resolved == place.path
                else f"{place.path} mounted again, {place.what}"
            )
            return f"it is {what}. Give {instead}"
    for place in places:
        if place.path.is_relative_to(resolved):
            return f"it holds {place.path}, {place.what}. Give a new or empty folder"
    # The outermost folder that keeps what is below it wins, unless a scratch
    # folder lies between it and the workspace.
    inside: str | None = None
    levels = _levels(resolved)
    for depth in range(len(levels) - 1):
        level, info, below = levels[depth], chain[depth], resolved.parts[depth + 1]
        matches = [place for place in places if _is(place, level, info)]
        tree = next((place for place in matches if place.reach is _Reach.TREE), None)
        home = next((place for place in matches if place.reach is _Reach.HOME), None)
        if tree is not None:
            inside = inside or (
                f"it is inside {_named(tree, level)}, {tree.what}. Give a folder outside it"
            )
        elif home is not None and below.startswith("."):
            hidden = level / below
            where = "" if hidden == resolved else f"inside {hidden}, "
            inside = inside or (
                f"it is {where}a hidden folder of {_named(home, level)}, {home.what}: its "
                "user's programs find settings and commands to run there. "
                "Give a folder outside it"
            )
        elif any(place.reach is _Reach.SCRATCH for place in matches):
            inside = None
    return inside


def _refuse_place(resolved: Path, chain: _Chain, places: Sequence[_Protected]) -> None:
    """Refuse a workspace whose place no sandbox may own, given what each folder above it is."""
    problem = _location_problem(resolved, chain, places)
    if problem is not None:
        raise BadInput(
            f"the workspace {resolved} cannot be a sandbox's: {problem}; {_UPLOAD_INSTEAD}"
        )
    levels = _levels(resolved)
    above = list(zip(levels[:-1], chain[:-1], strict=True))
    for parent, info in reversed(above):
        if info is not None and info.st_uid == SANDBOX_UID:
            raise BadInput(
                f"the workspace {resolved} is inside {parent}, a sandbox's folder: "
                "code running there could swap its folders for links. "
                "Give a folder outside it"
            )
    for parent, info in above:
        if info is not None and not stat.S_ISDIR(info.st_mode):
            raise BadInput(f"the workspace {resolved} cannot be made: {parent} is not a folder")
    for depth, (parent, info) in reversed(list(enumerate(above))):
        changer = _who_may_swap(info, chain[depth + 1], below_is_workspace=depth + 1 == len(above))
        if changer is not None:
            raise BadInput(
                f"the workspace {resolved} is inside {parent}, which {changer}: they could "
                "swap the folders below it for links while the sandbox runs, and have the "
                "engine read or write elsewhere with its rights. Give a folder in a place "
                "that only root may change"
            )


def _who_may_swap(
    info: os.stat_result | None, below: os.stat_result | None, *, below_is_workspace: bool
) -> str | None:
    """Who, besides the engine's user, may rename or replace what is in a folder; None if none.

    A sticky folder (``/tmp``) lets each user rename only their own entries:
    it is safe above an entry of the engine's user, and above a workspace
    that is new or already the sandbox user's (whom only sandboxes run as);
    not above one another user owns until it is claimed.
    """
    if info is None:
        return None  # made by the engine when claimed
    trusted = {0, os.geteuid()}
    if info.st_uid not in trusted:
        return f"belongs to uid {info.st_uid}"
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if not writable:
        return None
    if not info.st_mode & stat.S_ISVTX:
        return "other users may write"
    if (
        below is None
        or below.st_uid in trusted
        or (below_is_workspace and below.st_uid == SANDBOX_UID)
    ):
        return None
    return f"lets uid {below.st_uid} rename what it holds"


def _path_chain(resolved: Path) -> list[os.stat_result | None]:
    chain: list[os.stat_result | None] = []
    for level in _levels(resolved):
        if chain and (chain[-1] is None or not stat.S_ISDIR(chain[-1].st_mode)):
            chain.append(None)  # nothing is below what is missing or is not a folder
            continue
        try:
            chain.append(level.lstat())
        except FileNotFoundError:
            chain.append(None)
    return chain


def _foreign_contents_problem(path: Path, info: os.stat_result, is_empty: bool) -> str | None:
    if not stat.S_ISDIR(info.st_mode):
        return f"the workspace {path} is not a folder"
    if info.st_uid == SANDBOX_UID or is_empty:
        return None
    return (
        f"the workspace {path} is not empty and is not a sandbox's (it belongs to uid "
        f"{info.st_uid}): a sandbox would own everything in it, and could rename or "
        "replace those files. Give a folder that does not exist yet or is empty (or one "
        f"a sandbox used before); {_UPLOAD_INSTEAD}"
    )


def _is_empty(folder: Path | int) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def _unresolvable(workspace: Path, exc: RuntimeError | OSError) -> BadInput:
    # A loop of links: Python 3.12 raises RuntimeError, later ones OSError(ELOOP).
    if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
        return BadInput(
            f"the workspace {workspace} cannot be found: a link on its path leads back "
            f"to itself ({exc}). Give a folder whose path has no loop of links"
        )
    return BadInput(f"the workspace {workspace} cannot be checked: {exc.strerror or exc}")


def _link_target(link: Path) -> Path:
    try:
        return link.resolve()
    except (RuntimeError, OSError):  # a loop: where it points is what can be told
        return link.parent / os.readlink(link)


def check_host_workspace(workspace: Path, *, also_refused: Iterable[Path] = ()) -> Path:
    """Refuse a host folder that no sandbox may own as its ``/mnt/data``; change nothing.

    A host workspace becomes the sandbox user's for good, with all it holds,
    so it must be a folder that does not exist yet, an empty one, or one
    already the sandbox user's (a sandbox used it before). Never a link, a
    system folder (a new one under ``/dev/shm`` may be), a home folder (even an
    empty one) or a folder in a home's hidden ones (``~/.config``,
    ``~/.local``), under any name a bind mount gives them, nor a folder inside
    one a sandbox owns (code running there could swap its folders for links)
    or one another user may change (they could, while the sandbox runs, and
    the engine reaches the workspace by its path: a sticky folder such as
    ``/tmp`` is fine above a folder of the engine's user or the workspace).

    Args:
        workspace: the folder as the caller gave it.
        also_refused: more folders that no sandbox may own, nor anything in or
            above them (the engine's runtime folder, its file store).

    Returns:
        The folder's resolved path.

    Raises:
        BadInput: it may not be a sandbox's; the message says why and what to give.
    """
    return _checked(workspace, _protected(also_refused))


def _checked(workspace: Path, places: Sequence[_Protected]) -> Path:
    """:func:`check_host_workspace`, against ``places`` worked out by the caller."""
    try:
        if workspace.is_symlink():
            raise BadInput(
                f"the workspace {workspace} is a link (to {_link_target(workspace)}): "
                "give a folder, not a link to one"
            )
        resolved = workspace.resolve()
    except (RuntimeError, OSError) as exc:
        raise _unresolvable(workspace, exc) from None
    try:
        chain = _path_chain(resolved)
        _refuse_place(resolved, chain, places)
        info = chain[-1]
        if info is None:
            return resolved  # made when claimed
        is_empty = stat.S_ISDIR(info.st_mode) and info.st_uid != SANDBOX_UID and _is_empty(resolved)
    except OSError as exc:
        raise BadInput(
            f"the workspace {resolved} cannot be checked: {exc.strerror or exc}"
        ) from None
    problem = _foreign_contents_problem(resolved, info, is_empty)
    if problem is not None:
        raise BadInput(problem)
    return resolved


def _open_level(resolved: Path, level: Path, dir_fd: int) -> int:
    """Open the folder ``level`` in the one ``dir_fd`` is, never through a link."""
    try:
        return os.open(level.name, _FOLDER_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        # O_NOFOLLOW | O_DIRECTORY answers ENOTDIR for a link, as for a file.
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            is_link = stat.S_ISLNK(
                os.stat(level.name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            )
        except OSError:
            is_link = False
    if is_link and level == resolved:
        raise BadInput(
            f"the workspace {resolved} became a link after it was checked: "
            "give a folder, not a link to one"
        )
    if is_link:
        raise BadInput(
            f"the workspace {resolved} cannot be claimed: {level} became a link after it "
            "was checked. Give a folder in a place that only root may change"
        )
    if level == resolved:
        raise BadInput(f"the workspace {resolved} is not a folder")
    raise BadInput(f"the workspace {resolved} cannot be made: {level} is not a folder")


def _fd_chain(fds: Sequence[int], depth: int) -> list[os.stat_result | None]:
    found: list[os.stat_result | None] = [os.fstat(fd) for fd in fds]
    return found + [None] * (depth - len(fds))


def claim_host_workspace(workspace: Path, *, also_refused: Iterable[Path] = ()) -> Path:
    """Check a host folder as :func:`check_host_workspace` does, make it, give it to the sandbox.

    The checks are run again on the folders themselves, opened one by one
    from ``/`` without following a link, so what is given is what was checked
    even if a folder on the path is swapped meanwhile.

    Returns:
        The folder's resolved path, now owned by the sandbox user.

    Raises:
        BadInput: see :func:`check_host_workspace`, or the folder could not be
            made or given to the sandbox user; nothing on the host changed (a
            folder made for it is removed again).
    """
    places = _protected(also_refused)
    resolved = _checked(workspace, places)
    levels = _levels(resolved)
    fds: list[int] = []  # fds[depth] is the folder levels[depth]
    made: list[int] = []  # the depths of the folders made here
    try:
        try:
            fds.append(os.open("/", _FOLDER_FLAGS))
            for level in levels[1:]:
                try:
                    fds.append(_open_level(resolved, level, fds[-1]))
                except FileNotFoundError:
                    break
            # Judged by what they are now, not by the path checked before, and
            # before anything is made among them.
            _refuse_place(resolved, _fd_chain(fds, len(levels)), places)
            for level in levels[len(fds) :]:
                try:
                    os.mkdir(level.name, 0o777, dir_fd=fds[-1])
                except FileExistsError:
                    pass  # made meanwhile by someone else: checked below as the rest is
                else:
                    made.append(len(fds))
                fds.append(_open_level(resolved, level, fds[-1]))
            folder = fds[-1]
            # Each folder was reached through the one above, but any of them
            # may have been moved since: the folder must still be where it was
            # checked, whose place is checked again on what was opened.
            where = Path(os.readlink(f"/proc/self/fd/{folder}"))
            if where != resolved:
                raise BadInput(
                    f"the workspace {resolved} cannot be claimed: the folder made or found "
                    f"there is {where} now, a folder on its path was moved after it was "
                    "checked. Give a folder in a place that only root may change"
                )
            _refuse_place(resolved, _fd_chain(fds, len(levels)), places)
            info = os.fstat(folder)
            is_empty = info.st_uid != SANDBOX_UID and _is_empty(folder)
            problem = _foreign_contents_problem(resolved, info, is_empty)
            if problem is not None:
                raise BadInput(problem)
            try:
                os.fchown(folder, SANDBOX_UID, SANDBOX_GID)
                # Its owner may use it, as a sandbox's /mnt/data must be (a
                # read-only folder would fail the kernel's self-check).
                os.fchmod(folder, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
            except OSError as exc:
                raise BadInput(
                    f"the workspace {resolved} cannot be given to the sandbox user "
                    f"(uid {SANDBOX_UID}): {exc.strerror or exc}. Its file system does not "
                    "let root change owners there (NFS with root squashing, vfat, some FUSE "
                    "mounts): give a folder on a local file system"
                ) from None
        except OSError as exc:
            raise BadInput(
                f"the workspace {resolved} cannot be claimed: {exc.strerror or exc}"
            ) from None
    except BaseException:
        # Only what was made here, and only while still empty.
        for depth in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(levels[depth].name, dir_fd=fds[depth - 1])
        raise
    finally:
        for opened in fds:
            os.close(opened)
    return resolved
