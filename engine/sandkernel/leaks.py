"""Leak accounting: what sandkernel holds on this host, as a comparable snapshot.

A :class:`LeakSnapshot` counts what an engine creates and must give back:

* **processes**: every nsjail and ``sandkernel-join`` wrapper, and every
  process inside a sandkernel cgroup;
* **zombies**: exited children nobody reaped, of this process or in those cgroups;
* **cgroups**: per-kernel cgroup directories (every controller);
* **mounts**: workspace and runtime-folder tmpfs mounts, and anything mounted
  under a runtime root;
* **runtime dirs**: kernel folders under the runtime roots, and owner locks;
* **fds** and **RSS** of this process (the engine's).

Take one before, one after, and compare::

    baseline = leaks.snapshot(owner_prefix=f"{os.getpid()}-")
    ...  # sessions, faults, restarts
    assert leaks.wait_for_baseline(baseline, timeout_s=10) == []

``owner_prefix`` narrows everything host-wide to kernels whose id starts with
it (kernel ids are ``<engine pid>-<random>-<random>``), so engines of other
processes on the same host do not count. Processes exit and cgroups empty
asynchronously after a kill: :func:`wait_for_baseline` polls until the
snapshot is back to the baseline or the deadline passes.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sandkernel.sandbox import (
    CgroupLayout,
    CgroupVersion,
    default_runtime_root,
    iter_sandkernel_cgroups,
    owners_dir,
)

__all__ = ["LeakSnapshot", "leaks_since", "snapshot", "wait_for_baseline"]

#: A kernel id: ``<owner pid>-<8 hex>-<8 hex>``; owners are ``<pid>-<8 hex>``.
_KERNEL_ID = re.compile(r"\d+-[0-9a-f]{8}-[0-9a-f]{8}")
_OWNER_LOCK = re.compile(r"(\d+-[0-9a-f]{8})\.lock")
#: The source name sandkernel gives the tmpfs mounts it makes (``mount_tmpfs``).
_TMPFS_SOURCE = "sandkernel"
_DEFAULT_RSS_SLACK = 64 << 20

_Filter = Callable[[str], bool]


@dataclass(frozen=True)
class LeakSnapshot:
    """What sandkernel holds at one moment. Compare two with :meth:`leaks_since`.

    Attributes:
        processes: pid -> short command line, for nsjail, its wrapper and
            everything in a sandkernel cgroup.
        zombies: pids of unreaped children of this process or in those cgroups.
        cgroups: per-kernel cgroup directories.
        mounts: mount points made by sandkernel.
        runtime_dirs: kernel folders and owner lock files.
        fds: this process's open descriptors, counted by kind (``socket``,
            ``pipe``, ``anon_inode:[eventfd]``, or the path of a file).
        rss_bytes: this process's resident memory.
    """

    processes: Mapping[int, str] = field(default_factory=dict)
    zombies: frozenset[int] = frozenset()
    cgroups: frozenset[str] = frozenset()
    mounts: frozenset[str] = frozenset()
    runtime_dirs: frozenset[str] = frozenset()
    fds: Mapping[str, int] = field(default_factory=dict)
    rss_bytes: int = 0

    def counts(self) -> dict[str, int]:
        """The figures as numbers, for reports."""
        return {
            "processes": len(self.processes),
            "zombies": len(self.zombies),
            "cgroups": len(self.cgroups),
            "mounts": len(self.mounts),
            "runtime_dirs": len(self.runtime_dirs),
            "fds": sum(self.fds.values()),
            "rss_mb": self.rss_bytes >> 20,
        }

    def leaks_since(
        self,
        baseline: LeakSnapshot,
        *,
        rss_slack_bytes: int | None = _DEFAULT_RSS_SLACK,
        fd_slack: int | None = 0,
    ) -> list[str]:
        """What this snapshot holds that ``baseline`` did not, one line per leak.

        Args:
            baseline: the snapshot taken before.
            rss_slack_bytes: RSS growth tolerated (allocators keep freed
                memory); ``None`` ignores RSS.
            fd_slack: extra descriptors of one kind tolerated; ``None`` ignores
                descriptors (they are the whole process's: other engines of the
                process open and close them too).
        """
        found: list[str] = []
        for pid in sorted(set(self.processes) - set(baseline.processes)):
            found.append(f"process {pid}: {self.processes[pid]}")
        found += [f"zombie {pid}" for pid in sorted(self.zombies - baseline.zombies)]
        found += [f"cgroup {p}" for p in sorted(self.cgroups - baseline.cgroups)]
        found += [f"mount {p}" for p in sorted(self.mounts - baseline.mounts)]
        found += [f"runtime dir {p}" for p in sorted(self.runtime_dirs - baseline.runtime_dirs)]
        if fd_slack is not None:
            for kind, count in sorted(self.fds.items()):
                extra = count - baseline.fds.get(kind, 0)
                if extra > fd_slack:
                    found.append(f"{extra} more fd(s) {kind}")
        if rss_slack_bytes is not None and self.rss_bytes - baseline.rss_bytes > rss_slack_bytes:
            grown = (self.rss_bytes - baseline.rss_bytes) >> 20
            found.append(f"RSS grew by {grown} MiB (more than {rss_slack_bytes >> 20} MiB)")
        return found


def snapshot(
    *,
    roots: Iterable[str | os.PathLike[str]] | None = None,
    owner_prefix: str | None = None,
    cgroups: CgroupLayout | None = None,
) -> LeakSnapshot:
    """Count what sandkernel holds now.

    Args:
        roots: runtime roots to look in (default: :func:`default_runtime_root`).
        owner_prefix: only kernels whose id starts with this (e.g.
            ``f"{os.getpid()}-"`` for the engines of this process); default all.
        cgroups: the cgroup layout (default: detected).
    """
    root_paths = [Path(r) for r in roots] if roots is not None else [default_runtime_root()]
    layout = cgroups if cgroups is not None else CgroupLayout.detect()

    def mine(name: str) -> bool:
        return owner_prefix is None or name.startswith(owner_prefix)

    cgroup_dirs = _cgroup_dirs(layout, mine)
    in_cgroups = _cgroup_pids(cgroup_dirs)
    table = _process_table()
    processes: dict[int, str] = {}
    zombies: set[int] = set()
    me = os.getpid()
    for pid, (state, ppid, cmdline) in table.items():
        ours = pid in in_cgroups or _is_sandbox_launcher(cmdline, mine)
        if ours:
            processes[pid] = cmdline[:200]
        if state == "Z" and (ours or ppid == me):
            zombies.add(pid)
    return LeakSnapshot(
        processes=processes,
        zombies=frozenset(zombies),
        cgroups=frozenset(str(d) for d in cgroup_dirs),
        mounts=frozenset(_mounts(root_paths, mine)),
        runtime_dirs=frozenset(_runtime_dirs(root_paths, mine)),
        fds=_fd_kinds(),
        rss_bytes=_rss_bytes(),
    )


def leaks_since(
    baseline: LeakSnapshot,
    *,
    roots: Iterable[str | os.PathLike[str]] | None = None,
    owner_prefix: str | None = None,
    rss_slack_bytes: int | None = _DEFAULT_RSS_SLACK,
    fd_slack: int | None = 0,
) -> list[str]:
    """Leaks now compared with ``baseline``: a fresh :func:`snapshot`, compared.

    ``roots`` and ``owner_prefix`` are :func:`snapshot`'s; ``rss_slack_bytes``
    and ``fd_slack`` are :meth:`LeakSnapshot.leaks_since`'s.
    """
    current = snapshot(roots=roots, owner_prefix=owner_prefix)
    return current.leaks_since(baseline, rss_slack_bytes=rss_slack_bytes, fd_slack=fd_slack)


def wait_for_baseline(
    baseline: LeakSnapshot,
    *,
    timeout_s: float = 10.0,
    roots: Iterable[str | os.PathLike[str]] | None = None,
    owner_prefix: str | None = None,
    rss_slack_bytes: int | None = _DEFAULT_RSS_SLACK,
    fd_slack: int | None = 0,
) -> list[str]:
    """Poll until nothing leaks compared with ``baseline``; return what still does.

    Killed processes leave their cgroups, and the kernel frees them, a moment
    after the kill: this waits for that, up to ``timeout_s``. Blocking: call
    it from a thread in async code.
    """
    roots = list(roots) if roots is not None else None
    deadline = time.monotonic() + timeout_s
    while True:
        found = leaks_since(
            baseline,
            roots=roots,
            owner_prefix=owner_prefix,
            rss_slack_bytes=rss_slack_bytes,
            fd_slack=fd_slack,
        )
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)  # polled: a process's exit has no event to wait on here


# ---------------------------------------------------------------------------
# the parts


def _cgroup_dirs(layout: CgroupLayout, mine: _Filter) -> list[Path]:
    if layout.version is CgroupVersion.NONE:
        return []
    return sorted(d for d in iter_sandkernel_cgroups(layout) if mine(d.name))


def _cgroup_pids(dirs: Iterable[Path]) -> set[int]:
    pids: set[int] = set()
    for d in dirs:
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
    return pids


def _process_table() -> dict[int, tuple[str, int, str]]:
    """pid -> (state, ppid, command line) of every process on the host."""
    table: dict[int, tuple[str, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # exited meanwhile
        # The command name is in parentheses and may hold spaces: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 2:
            continue
        table[pid] = (fields[0], int(fields[1]), cmdline)
    return table


def _is_sandbox_launcher(cmdline: str, mine: _Filter) -> bool:
    """nsjail started by sandkernel, or the wrapper that puts it in its cgroup."""
    if "sandkernel-join" not in cmdline and "nsjail" not in cmdline:
        return False
    ids = _KERNEL_ID.findall(cmdline)
    return bool(ids) and any(mine(i) for i in ids)


def _mounts(roots: list[Path], mine: _Filter) -> list[str]:
    found: list[str] = []
    prefixes = [str(r).rstrip("/") + "/" for r in roots]
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            source = fields[fields.index("-") + 2] if "-" in fields else ""
            under_root = any(point.startswith(p) for p in prefixes)
            if not under_root and source != _TMPFS_SOURCE:
                continue
            ids = _KERNEL_ID.findall(point)
            if (ids and mine(ids[0])) or (not ids and under_root):
                found.append(point)
    return found


def _runtime_dirs(roots: list[Path], mine: _Filter) -> list[str]:
    found: list[str] = []
    for root in roots:
        with contextlib.suppress(OSError):
            found += [
                str(p) for p in root.iterdir() if _KERNEL_ID.fullmatch(p.name) and mine(p.name)
            ]
    with contextlib.suppress(OSError):
        for lock in owners_dir().iterdir():
            match = _OWNER_LOCK.fullmatch(lock.name)
            if match and mine(match[1] + "-"):
                found.append(str(lock))
    return found


def _fd_kinds() -> dict[str, int]:
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory listing's own descriptor, closed meanwhile
        kinds[re.sub(r"^(socket|pipe):\[\d+\]$", r"\1", target)] += 1
    return dict(kinds)


def _rss_bytes() -> int:
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident * os.sysconf("SC_PAGE_SIZE")
