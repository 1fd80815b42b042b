"""cgroups, v1 or v2 (detected at start): one per kernel, created and limited by the engine.

nsjail is started *inside* the kernel's cgroup (see
:meth:`~sandkernel.sandbox.host.SandboxHost.launch_argv`), so the OOM-kill
counter, CPU time and peak memory are read from a directory that outlives
the kernel, the same way on v1 and v2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from sandkernel.errors import SandboxUnavailable

if TYPE_CHECKING:
    from sandkernel.sandbox.limits import JailLimits

CGROUP_PARENT = "sandkernel"
#: v2, in a cgroup namespace: the leaf the namespace root's own processes move to
ENGINE_LEAF = "sandkernel-engine"
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
#: The CPU controller's period; a policy's ``cpus`` is a quota of it.
CPU_PERIOD_US = 100_000


def cpu_quota_us(cpus: float) -> int:
    """The CPU quota per :data:`CPU_PERIOD_US` that lets a kernel use ``cpus`` CPUs."""
    return max(1000, round(cpus * CPU_PERIOD_US))


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

    def create(self, policy: JailLimits) -> None:
        """Create the cgroup dirs and write the policy's limits."""
        ensure_cgroup_parents(self.layout)
        for d in sorted(set(self.dirs.values())):
            d.mkdir(exist_ok=True)
        memory = policy.memory_mb << 20
        quota = cpu_quota_us(policy.cpus)
        if self.layout.version is CgroupVersion.V2:
            d = self.dirs["memory"]
            _write(d / "memory.max", str(memory))
            with contextlib.suppress(FileNotFoundError):
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(policy.pids_max))
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
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
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
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
        """The counters now, read once (a cell's path keeps a :class:`UsageReader`)."""
        reader = UsageReader(self)
        try:
            return reader.read()
        finally:
            reader.close()

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
            self._kill_members(pids)

    def _kill_members(self, pids: list[int]) -> None:
        """SIGKILL the listed processes still in this cgroup (a listed pid may be reused).

        Each pidfd pins a process; found in the cgroup after it was opened,
        it is the one listed, not a host process that got the number since.
        """
        pidfds: dict[int, int] = {}
        for pid in pids:
            with contextlib.suppress(OSError):  # gone already
                pidfds[pid] = os.pidfd_open(pid)
        try:
            members = set(self.pids())
            for pid, pidfd in pidfds.items():
                if pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            for pidfd in pidfds.values():
                os.close(pidfd)

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


#: Most bytes a usage counter file holds (``cpu.stat`` on v2 is the longest, ~200).
_COUNTER_MAX_BYTES = 4096


class UsageReader:
    """A kernel's usage counters, read through descriptors kept open: one ``pread`` each.

    Opening a cgroup file costs about 20 µs (kernfs builds an open file each
    time), a ``pread`` of an open one about 2.5 µs, and a cell reads the
    counters twice. A read at offset 0 makes the kernel render the file
    afresh, so a kept descriptor never returns a stale value. A file that
    cannot be opened (not there on this kernel, or the cgroup already
    removed) reads as unknown, as a missing file always did, and is tried
    again next time. Call :meth:`close` when done; reads after it reopen.
    """

    def __init__(self, cgroup: KernelCgroup) -> None:
        #: counter -> (path, key in a keyed file or None for a single number)
        self._files: dict[str, tuple[Path, str | None]] = {}
        self._fds: dict[str, int] = {}
        self._peak_resettable = False
        dirs = cgroup.dirs
        if cgroup.layout.version is CgroupVersion.V2:
            d = dirs["memory"]
            self._files = {
                "cpu_usec": (d / "cpu.stat", "usage_usec"),
                "peak": (d / "memory.peak", None),
                "oom_kills": (d / "memory.events", "oom_kill"),
                "pids_max_hits": (d / "pids.events", "max"),
            }
        elif cgroup.layout.version is CgroupVersion.V1:
            mem = dirs["memory"]
            self._files = {
                "peak": (mem / "memory.max_usage_in_bytes", None),
                "oom_kills": (mem / "memory.oom_control", "oom_kill"),
                "pids_max_hits": (dirs["pids"] / "pids.events", "max"),
            }
            if "cpuacct" in dirs:
                self._files["cpu_ns"] = (dirs["cpuacct"] / "cpuacct.usage", None)
            self._peak_resettable = True

    def _fd(self, counter: str) -> int | None:
        fd = self._fds.get(counter)
        if fd is None:
            path = self._files[counter][0]
            # Read-write only where the engine also writes (v1's peak reset).
            mode = os.O_RDWR if counter == "peak" and self._peak_resettable else os.O_RDONLY
            try:
                fd = os.open(path, mode | os.O_CLOEXEC)
            except OSError:
                return None
            self._fds[counter] = fd
        return fd

    def _value(self, counter: str) -> int | None:
        if counter not in self._files:
            return None
        fd = self._fd(counter)
        if fd is None:
            return None
        try:
            data = os.pread(fd, _COUNTER_MAX_BYTES, 0)
        except OSError:
            return None
        key = self._files[counter][1]
        try:
            if key is None:
                return int(data)
            for line in data.split(b"\n"):
                name, _, value = line.partition(b" ")
                if name == key.encode():
                    return int(value)
        except ValueError:
            return None
        return None

    def read(self, *, peak: bool = True) -> CgroupUsage:
        """The counters now (``peak=False``: skip the peak, which only an end needs)."""
        if "cpu_usec" in self._files:
            usec = self._value("cpu_usec")
            cpu_ns = None if usec is None else usec * 1000
        else:
            cpu_ns = self._value("cpu_ns")
        return CgroupUsage(
            cpu_ns=cpu_ns,
            peak_memory_bytes=self._value("peak") if peak else None,
            oom_kills=self._value("oom_kills") or 0,
            pids_limit_hits=self._value("pids_max_hits") or 0,
        )

    def oom_kills(self) -> int | None:
        """The OOM-kill count alone (None if it cannot be read now): one ``pread``."""
        return self._value("oom_kills")

    def open_oom_kills(self) -> int | None:
        """A new read-only descriptor of the file the OOM-kill count is in; None if it cannot be.

        For a reader in another process (the batch path's fork server reads
        the count around each of its runs): an open file of its own, so that
        neither's reads go through the other's. The caller closes it.
        """
        entry = self._files.get("oom_kills")
        if entry is None:
            return None
        try:
            return os.open(entry[0], os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def reset_peak(self) -> None:
        """Start a new peak-memory window (v1; v2's peak is per kernel lifetime)."""
        if self._peak_resettable:
            fd = self._fd("peak")
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.pwrite(fd, b"0", 0)

    def close(self) -> None:
        """Close the descriptors. Idempotent."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def ensure_cgroup_parents(layout: CgroupLayout) -> None:
    """Create ``<mount>/sandkernel`` for each controller (v2: enable the controllers)."""
    try:
        if layout.version is CgroupVersion.V2:
            root = layout.mounts["memory"]
            parent = root / CGROUP_PARENT
            wanted = " ".join(f"+{c}" for c in _V2_CONTROLLERS)
            try:
                _write(root / "cgroup.subtree_control", wanted)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                _leave_the_root(root)
                _write(root / "cgroup.subtree_control", wanted)
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", wanted)
        else:
            for parent in layout.parent_dirs():
                parent.mkdir(exist_ok=True)
    except OSError as exc:
        hint = (
            " (the cgroup mount is read-only: in a container, give it a writable cgroup "
            "namespace, e.g. --cgroupns=private with a read-write /sys/fs/cgroup)"
            if exc.errno == errno.EROFS
            else ""
        )
        raise SandboxUnavailable(
            f"cannot create sandkernel's cgroups ({exc}){hint}: run as root on a host with "
            "cgroups v1 (memory, pids, cpu) or v2 with those controllers; see `sandkernel doctor`"
        ) from None


def _leave_the_root(root: Path) -> None:
    """Move the processes of a v2 mount's root into a leaf, so it can delegate controllers.

    Only the true root cgroup may hold processes and enable controllers for
    its children. In a container with its own cgroup namespace the mount's
    root is the container's cgroup, which holds the container's processes
    (this engine's among them): enabling controllers there fails with EBUSY
    until they live in a leaf of their own (what docker-in-docker does).
    """
    leaf = root / ENGINE_LEAF
    leaf.mkdir(exist_ok=True)
    for pid in (root / "cgroup.procs").read_text().split():
        try:
            _write(leaf / "cgroup.procs", pid)
        except ProcessLookupError:
            pass  # gone meanwhile


def iter_sandkernel_cgroups(layout: CgroupLayout) -> Iterator[Path]:
    """Every per-kernel cgroup dir on the host (for leak checks)."""
    for parent in layout.parent_dirs():
        with contextlib.suppress(OSError):
            yield from (p for p in parent.iterdir() if p.is_dir())
