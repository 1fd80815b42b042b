"""One engine's claim on the host: kernel folders, owner locks and sweeping.

Each engine holds a ``flock`` on an owner file for its lifetime. Kernel ids
are ``<owner>-<random>``; what a killed engine left behind (folders, mounts,
cgroups, processes) is removed by the next engine's sweep, without touching
the kernels of another engine that is still alive: anything whose owner
lock is free is an orphan.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import resource
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from sandkernel.errors import BadInput, KernelStartFailed, SandboxUnavailable
from sandkernel.sandbox.cgroups import (
    CgroupLayout,
    CgroupVersion,
    KernelCgroup,
    ensure_cgroup_parents,
)
from sandkernel.sandbox.host_workspace import claim_host_workspace
from sandkernel.sandbox.layout import SANDBOX_GID, SANDBOX_UID, KernelLayout
from sandkernel.sandbox.mounts import mount_tmpfs, mounts_under, unmount
from sandkernel.sandbox.runtime import Runtime, find_nsjail

if TYPE_CHECKING:
    # Neither is imported with the host: a batch pool's sandboxes can be
    # prepared and spawned before the policy model and nsjail's config
    # classes are loaded (batch/prestart.py).
    from sandkernel.sandbox.limits import JailLimits
    from sandkernel.sandbox.render import ConfigRenderer

#: Size and files of the tmpfs that holds one kernel's runtime folder (config,
#: logs, the kernel's own output, the connection dir bound into the sandbox).
KERNEL_DIR_MB = 16
KERNEL_DIR_INODES = 512

# The wrapper joins the kernel's cgroups, then becomes nsjail, so nsjail and
# everything under it is accounted to the cgroup the engine created and limited.
_JOIN_AND_EXEC = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)

#: The longest path a Unix socket can have (``sun_path`` less its NUL).
_SOCKET_PATH_MAX = 107
#: What a kernel adds to the runtime root in the paths of the links the engine
#: connects to its sockets through, ``/<kernel id>/pin/k-<n>`` (provisioner.py),
#: at most: an owner's pid of 7 digits (pid_max is 2**22 at most), ``n`` of 5.
_KERNEL_SOCKET_SUFFIX_MAX = len("/4194304-0123abcd-0123abcd/pin/k-12345")


def default_runtime_root() -> Path:
    """``$SANDKERNEL_RUNTIME_DIR``, else ``/run/sandkernel``."""
    return Path(os.environ.get("SANDKERNEL_RUNTIME_DIR") or "/run/sandkernel")


def _check_root_length(root: Path) -> None:
    """Refuse a runtime root too long for its kernels' socket paths, before anything is made.

    Otherwise every kernel would start and then fail to connect ("File name
    too long"), after its sandbox's whole start.
    """
    longest = _SOCKET_PATH_MAX - _KERNEL_SOCKET_SUFFIX_MAX
    length = len(os.fsencode(root))
    if length > longest:
        raise BadInput(
            f"runtime folder {str(root)!r} is {length} bytes long, longer than the {longest} "
            f"its kernels' socket paths leave room for (a Unix socket's path holds "
            f"{_SOCKET_PATH_MAX} bytes): choose a shorter runtime_dir (--runtime-dir, "
            "SANDKERNEL_RUNTIME_DIR)"
        )


def owners_dir() -> Path:
    """Where every engine on this host keeps its owner lock (``/run/sandkernel/owners``)."""
    return Path(os.environ.get("SANDKERNEL_OWNERS_DIR") or "/run/sandkernel/owners")


_OWNER_RE = re.compile(r"^(?P<owner>\d+-[0-9a-f]{8})-[0-9a-f]{8}$")


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
        refused_workspaces: Iterable[Path] = (),
    ) -> None:
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                "sandkernel's sandbox needs root (cgroups, mounts and the uid switch); "
                "run the engine as root, see `sandkernel doctor`"
            )
        self.root = root or default_runtime_root()
        _check_root_length(self.root)
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
        #: folders no host workspace may be in: the engine's own (its runtime, its
        #: owners' locks, and what it adds: its file store), checked at the claim
        self.refused_workspaces: tuple[Path, ...] = (self.root, owners, *refused_workspaces)
        self.owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_path = owners / f"{self.owner}.lock"
        self._lock_fd: int | None = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if sweep:
            self.sweep()

    @cached_property
    def configs(self) -> ConfigRenderer:
        """Its jails' nsjail configs, each policy's rendered once."""
        from sandkernel.sandbox.render import ConfigRenderer

        return ConfigRenderer()

    # -- kernels -----------------------------------------------------------

    def new_kernel_id(self) -> str:
        return f"{self.owner}-{secrets.token_hex(4)}"

    def prepare(
        self, kernel_id: str, policy: JailLimits, workspace: Path | None = None
    ) -> KernelLayout:
        """Create a kernel's folder, workspace and cgroup.

        Args:
            kernel_id: from :meth:`new_kernel_id`.
            policy: its limits (cgroup and workspace size): a
                :class:`~sandkernel.policy.Policy`, or only its limits.
            workspace: a host folder to bind as ``/mnt/data`` instead of a
                fresh size-limited tmpfs; it must be new, empty or already the
                sandbox user's (see :func:`check_host_workspace`), becomes the
                sandbox user's and is kept. Its size is not capped (only each
                file's, by the policy's ``file_size_mb``).

        Raises:
            BadInput: the workspace may not be a sandbox's (nothing was made).
            KernelStartFailed: the policy's rlimits are above the engine's own
                (nothing was made), or a folder, mount or cgroup could not be
                made (says which, and the policy's settings it was made from;
                what was made is left for :meth:`destroy`).
        """
        _check_rlimits(policy)
        if workspace is not None:
            # Claimed before anything is made: a refusal leaves nothing to undo.
            workspace = claim_host_workspace(workspace, also_refused=self.refused_workspaces)
        layout = KernelLayout(kernel_id, self.root / kernel_id)
        with _preparing(f"make the kernel's folder {layout.root}", "in the engine's runtime_dir"):
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
            with _preparing(
                "mount the workspace's tmpfs",
                f"sized by the policy's workspace_mb = {policy.workspace_mb} and "
                f"workspace_inodes = {policy.workspace_inodes}",
            ):
                ws.mkdir(mode=0o700)
                # Sticky and world-writable, like /tmp: the sandbox user creates and
                # owns its files, while files the engine places as root (an agent's)
                # can be neither changed, deleted nor renamed from inside.
                mount_tmpfs(
                    ws, size_mb=policy.workspace_mb, inodes=policy.workspace_inodes, mode=0o1777
                )
        else:
            with _preparing(f"link the host workspace {workspace}", f"at {ws}"):
                ws.symlink_to(workspace)
        with _preparing(
            "create the kernel's cgroup",
            f"with the policy's memory_mb = {policy.memory_mb}, cpus = {policy.cpus:g} and "
            f"pids_max = {policy.pids_max}",
        ):
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


#: The policy's rlimits as nsjail sets them: field, resource, the resource's units per
#: unit of the field, the field's unit, and how the engine's own limit is raised.
_RLIMITS = (
    ("nofile", resource.RLIMIT_NOFILE, 1, "open files", "`ulimit -Hn`, LimitNOFILE="),
    ("file_size_mb", resource.RLIMIT_FSIZE, 1 << 20, "MiB per file", "`ulimit -Hf`, LimitFSIZE="),
)


def _check_rlimits(policy: JailLimits) -> None:
    """Refuse rlimits above the engine's own hard limits, which a sandbox cannot exceed.

    nsjail sets them once it has dropped its privileges, so it cannot raise
    the hard limits it inherited from the engine: above them the start fails
    (EPERM), after the sandbox was built. The policy's bounds are Linux's
    (``nofile``: the default ``fs.nr_open``); a host may set lower ones.
    """
    for field, limit, unit, what, how in _RLIMITS:
        value: int = getattr(policy, field)
        hard = resource.getrlimit(limit)[1]
        if hard != resource.RLIM_INFINITY and value * unit > hard:
            raise KernelStartFailed(
                f"the policy's {field} = {value} is above this engine's own hard limit of "
                f"{hard // unit} {what}, which a sandbox cannot exceed: lower {field}, or start "
                f"the engine with a higher limit ({how} in a systemd unit)"
            )


@contextlib.contextmanager
def _preparing(action: str, settings: str) -> Iterator[None]:
    """An OSError while doing ``action`` becomes a :class:`KernelStartFailed` saying so.

    The host's refusal (a full disk, a value the kernel does not take) is no
    traceback for the user: the message names the step, the ``settings`` it
    used and the command that checks the sandbox.
    """
    try:
        yield
    except OSError as exc:
        raise KernelStartFailed(
            f"the sandbox could not be prepared: cannot {action} ({settings}): {exc}; "
            "run `sandkernel doctor` to check the sandbox"
        ) from exc


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
