"""One engine's claim on the host: kernel folders, owner locks and sweeping.

Each engine holds a ``flock`` on an owner file for its lifetime. Kernel ids
are ``<owner>-<random>``; what a killed engine left behind (folders, mounts,
cgroups, processes) is removed by the next engine's sweep, without touching
the kernels of another engine that is still alive: anything whose owner
lock is free is an orphan.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sandkernel.errors import BadInput, SandboxUnavailable
from sandkernel.policy import Policy
from sandkernel.sandbox.cgroups import (
    CgroupLayout,
    CgroupVersion,
    KernelCgroup,
    ensure_cgroup_parents,
)
from sandkernel.sandbox.layout import SANDBOX_GID, SANDBOX_UID, KernelLayout
from sandkernel.sandbox.mounts import mount_tmpfs, mounts_under, unmount
from sandkernel.sandbox.runtime import Runtime, find_nsjail

#: Size and files of the tmpfs that holds one kernel's runtime folder (config,
#: logs, the kernel's own output, the connection dir bound into the sandbox).
KERNEL_DIR_MB = 16
KERNEL_DIR_INODES = 512

# The wrapper joins the kernel's cgroups, then becomes nsjail, so nsjail and
# everything under it is accounted to the cgroup the engine created and limited.
_JOIN_AND_EXEC = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)


def default_runtime_root() -> Path:
    """``$SANDKERNEL_RUNTIME_DIR``, else ``/run/sandkernel``."""
    return Path(os.environ.get("SANDKERNEL_RUNTIME_DIR") or "/run/sandkernel")


def owners_dir() -> Path:
    """Where every engine on this host keeps its owner lock (``/run/sandkernel/owners``)."""
    return Path(os.environ.get("SANDKERNEL_OWNERS_DIR") or "/run/sandkernel/owners")


_OWNER_RE = re.compile(r"^(?P<owner>\d+-[0-9a-f]{8})-[0-9a-f]{8}$")

# -- host workspaces -----------------------------------------------------------
#
# A host folder bound as /mnt/data is chowned to the sandbox user, for good:
# whatever is in it becomes the sandbox's to rename, replace or link away.
# So it must hold nothing but what a sandbox may own: it is new, empty, or
# already the sandbox user's (a sandbox used it before). Unlike the tmpfs
# workspace it has no size cap: the policy's ``workspace_mb`` and
# ``workspace_inodes`` size that tmpfs only; here each file is still capped
# by ``file_size_mb`` (RLIMIT_FSIZE), their total is not.

#: Never a sandbox's, nor anything below them: the system's programs,
#: configuration, devices and kernel interfaces, and folders that services
#: write as root. An empty one handed over would be enough: a file the
#: sandbox puts in an empty ``/etc/udev/rules.d`` runs as root, and a link it
#: plants in a service's log folder is written through as root.
_SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
    "/run", "/sbin", "/sys", "/usr", "/var/cache", "/var/log", "/var/mail", "/var/spool",
)  # fmt: skip
#: Never a sandbox's themselves (a new folder made in one of them may be).
_SYSTEM_FOLDERS = (
    "/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/var", "/var/lib",
    "/tmp", "/var/tmp",  # noqa: S108 - refused here, not used
)  # fmt: skip


@dataclass(frozen=True)
class _Protected:
    path: Path
    what: str
    #: also everything below it (else only the folder itself, and what holds it)
    tree: bool


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


def _protected(also_refused: Iterable[Path]) -> list[_Protected]:
    found = [_Protected(Path(p), "a system folder", True) for p in _SYSTEM_TREES]
    found += [_Protected(Path(p), "a system folder", False) for p in _SYSTEM_FOLDERS]
    found += [_Protected(home, "a home folder", False) for home in _homes()]
    found += [_Protected(Path(p), "the engine's own folder", True) for p in also_refused]
    # Compared resolved, as the workspace is (/lib may be a link to /usr/lib).
    return [_Protected(p.path.resolve(), p.what, p.tree) for p in found]


#: What a refusal tells the caller to do about the files they meant to give.
_UPLOAD_INSTEAD = (
    "to give the code files, upload them instead "
    "(`sandkernel run -i FILE`, or `session.upload` in the API)"
)


def _location_problem(resolved: Path, also_refused: Iterable[Path]) -> str | None:
    places = _protected(also_refused)
    for place in places:
        if resolved == place.path:
            instead = "a folder outside it" if place.tree else "a new folder inside it"
            return f"it is {place.what}. Give {instead}"
    for place in places:
        if place.path.is_relative_to(resolved):
            return f"it holds {place.path}, {place.what}. Give a new or empty folder"
        if place.tree and resolved.is_relative_to(place.path):
            return f"it is inside {place.path}, {place.what}. Give a folder outside it"
    return None


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


def check_host_workspace(workspace: Path, *, also_refused: Iterable[Path] = ()) -> Path:
    """Refuse a host folder that no sandbox may own as its ``/mnt/data``; change nothing.

    A host workspace becomes the sandbox user's for good, with all it holds,
    so it must be a folder that does not exist yet, an empty one, or one
    already the sandbox user's (a sandbox used it before). Never a link, a
    system folder or a home folder (even an empty one), nor a folder inside
    one a sandbox owns (code running there could swap its folders for links).

    Args:
        workspace: the folder as the caller gave it.
        also_refused: more folders that no sandbox may own, nor anything in or
            above them (the engine's runtime folder, its file store).

    Returns:
        The folder's resolved path.

    Raises:
        BadInput: it may not be a sandbox's; the message says why and what to give.
    """
    if workspace.is_symlink():
        raise BadInput(
            f"the workspace {workspace} is a link (to {workspace.resolve()}): "
            "give a folder, not a link to one"
        )
    resolved = workspace.resolve()
    problem = _location_problem(resolved, also_refused)
    if problem is not None:
        raise BadInput(
            f"the workspace {resolved} cannot be a sandbox's: {problem}; {_UPLOAD_INSTEAD}"
        )
    for parent in resolved.parents:
        with contextlib.suppress(FileNotFoundError):
            if parent.lstat().st_uid == SANDBOX_UID:
                raise BadInput(
                    f"the workspace {resolved} is inside {parent}, a sandbox's folder: "
                    "code running there could swap its folders for links. "
                    "Give a folder outside it"
                )
    try:
        info = resolved.lstat()
    except FileNotFoundError:
        return resolved  # made when claimed
    except NotADirectoryError:
        raise BadInput(f"the workspace {resolved} is not a folder") from None
    is_empty = stat.S_ISDIR(info.st_mode) and info.st_uid != SANDBOX_UID and _is_empty(resolved)
    problem = _foreign_contents_problem(resolved, info, is_empty)
    if problem is not None:
        raise BadInput(problem)
    return resolved


def claim_host_workspace(workspace: Path, *, also_refused: Iterable[Path] = ()) -> Path:
    """Check a host folder as :func:`check_host_workspace` does, make it, give it to the sandbox.

    Returns:
        The folder's resolved path, now owned by the sandbox user.

    Raises:
        BadInput: see :func:`check_host_workspace`; nothing on the host changed.
    """
    resolved = check_host_workspace(workspace, also_refused=also_refused)
    try:
        resolved.mkdir(parents=True, exist_ok=True)
        # No link followed at the end, and what is chowned is what was checked
        # just before, on this very descriptor, whatever happens to the path.
        fd = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileExistsError, NotADirectoryError):
        raise BadInput(f"the workspace {resolved} is not a folder") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise BadInput(f"the workspace {resolved} became a link: give a folder") from None
    try:
        info = os.fstat(fd)
        is_empty = info.st_uid != SANDBOX_UID and _is_empty(fd)
        problem = _foreign_contents_problem(resolved, info, is_empty)
        if problem is not None:
            raise BadInput(problem)
        os.fchown(fd, SANDBOX_UID, SANDBOX_GID)
    finally:
        os.close(fd)
    return resolved


class SandboxHost:
    """One engine's claim on the host: creates and destroys kernel sandboxes.

    Holds an exclusive ``flock`` on ``<owners_dir>/<owner>.lock`` for its
    lifetime. Kernel ids are ``<owner>-<random>``; :meth:`sweep` removes the
    folders, cgroups, mounts and processes of every owner whose lock is free,
    that is, of engines that died without cleaning up.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        runtime: Runtime | None = None,
        sweep: bool = True,
    ) -> None:
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                "sandkernel's sandbox needs root (cgroups, mounts and the uid switch); "
                "run the engine as root, see `sandkernel doctor`"
            )
        self.root = root or default_runtime_root()
        self.nsjail = find_nsjail()
        self.runtime = runtime or Runtime.detect()
        self.cgroups = CgroupLayout.detect()
        if self.cgroups.version is CgroupVersion.NONE:
            raise SandboxUnavailable(
                "no usable cgroups (need memory, pids and cpu on v1 or v2): "
                "memory and process limits cannot be enforced; see `sandkernel doctor`"
            )
        ensure_cgroup_parents(self.cgroups)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        # One place for every engine's lock, whatever its runtime root: cgroups
        # are shared by all engines on the host, so a sweep must be able to
        # tell a live owner from a dead one even when it used another root.
        owners = self.owners_dir = owners_dir()
        owners.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_path = owners / f"{self.owner}.lock"
        self._lock_fd: int | None = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if sweep:
            self.sweep()

    # -- kernels -----------------------------------------------------------

    def new_kernel_id(self) -> str:
        return f"{self.owner}-{secrets.token_hex(4)}"

    def prepare(
        self, kernel_id: str, policy: Policy, workspace: Path | None = None
    ) -> KernelLayout:
        """Create a kernel's folder, workspace and cgroup.

        Args:
            kernel_id: from :meth:`new_kernel_id`.
            policy: its limits (cgroup and workspace size).
            workspace: a host folder to bind as ``/mnt/data`` instead of a
                fresh size-limited tmpfs; it must be new, empty or already the
                sandbox user's (see :func:`check_host_workspace`), becomes the
                sandbox user's and is kept. Its size is not capped (only each
                file's, by the policy's ``file_size_mb``).

        Raises:
            BadInput: the workspace may not be a sandbox's (nothing was made).
        """
        if workspace is not None:
            # Claimed before anything is made: a refusal leaves nothing to undo.
            workspace = claim_host_workspace(workspace, also_refused=(self.root, self.owners_dir))
        layout = KernelLayout(kernel_id, self.root / kernel_id)
        layout.root.mkdir(mode=0o700)
        # The folder is a small tmpfs of its own: the connection dir is
        # writable from inside, and the kernel's stdout/stderr (which code in
        # the sandbox can reach through the descriptors it inherits) go to
        # ``kernel.out`` here. Neither may fill the host's disk or /run.
        mount_tmpfs(layout.root, size_mb=KERNEL_DIR_MB, inodes=KERNEL_DIR_INODES, mode=0o700)
        conn = layout.connection_dir
        conn.mkdir(mode=0o700)
        os.chown(conn, SANDBOX_UID, SANDBOX_GID)
        ws = layout.workspace
        if workspace is None:
            ws.mkdir(mode=0o700)
            # Sticky and world-writable, like /tmp: the sandbox user creates and
            # owns its files, while files the engine places as root (an agent's)
            # can be neither changed, deleted nor renamed from inside.
            mount_tmpfs(
                ws, size_mb=policy.workspace_mb, inodes=policy.workspace_inodes, mode=0o1777
            )
        else:
            ws.symlink_to(workspace)
        KernelCgroup(self.cgroups, kernel_id).create(policy)
        return layout

    def cgroup(self, kernel_id: str) -> KernelCgroup:
        return KernelCgroup(self.cgroups, kernel_id)

    def launch_argv(self, layout: KernelLayout) -> list[str]:
        """The host command that starts the kernel's nsjail inside its cgroup."""
        procs = [str(p) for p in self.cgroup(layout.kernel_id).procs_files]
        return [
            "/bin/sh", "-c", _JOIN_AND_EXEC, "sandkernel-join", *procs, "--",
            str(self.nsjail), "--config", str(layout.config_file),
        ]  # fmt: skip

    def destroy(self, kernel_id: str) -> None:
        """Kill what is left in the kernel's cgroup, unmount, remove every trace."""
        _destroy(self.cgroups, self.root / kernel_id, kernel_id)

    # -- orphans -----------------------------------------------------------

    def sweep(self) -> list[str]:
        """Remove what dead engines left behind. Returns the kernel ids removed."""
        removed: list[str] = []
        alive: dict[str, bool] = {}
        candidates: set[str] = set()
        with contextlib.suppress(OSError):
            candidates.update(p.name for p in self.root.iterdir())
        for parent in self.cgroups.parent_dirs():
            with contextlib.suppress(OSError):
                candidates.update(p.name for p in parent.iterdir() if p.is_dir())
        for name in sorted(candidates):
            match = _OWNER_RE.match(name)
            if not match:
                continue
            owner = match["owner"]
            if owner not in alive:
                alive[owner] = self._owner_alive(owner)
            if not alive[owner]:
                _destroy(self.cgroups, self.root / name, name)
                removed.append(name)
        for owner, is_alive in alive.items():
            if not is_alive:
                with contextlib.suppress(FileNotFoundError):
                    (self.owners_dir / f"{owner}.lock").unlink()
        return removed

    def _owner_alive(self, owner: str) -> bool:
        if owner == self.owner:
            return True
        path = self.owners_dir / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def close(self) -> None:
        """Release the owner lock (call after every kernel was destroyed)."""
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> SandboxHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _destroy(layout: CgroupLayout, root: Path, kernel_id: str) -> None:
    cgroup = KernelCgroup(layout, kernel_id)
    cgroup.kill_all()
    for point in mounts_under(root):
        unmount(point)
    unmount(root)
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
    # A killed process leaves its cgroup asynchronously: retry briefly.
    deadline = time.monotonic() + 5
    while not cgroup.remove() and time.monotonic() < deadline:
        cgroup.kill_all()
        time.sleep(0.005)
