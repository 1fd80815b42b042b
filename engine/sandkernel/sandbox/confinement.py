"""A sandboxed process seen from outside: its seccomp filters, namespaces, credentials, limits.

The engine (root) reads what the kernel itself could lie about:

* :func:`seccomp_filters` reads a process's filters as BPF programs with
  ``PTRACE_SECCOMP_GET_FILTER`` (root with ``CAP_SYS_ADMIN``, the process
  briefly stopped by ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``);
* :func:`confinement` gathers the rest from ``/proc/<pid>``;
* :func:`compare_confinement` lists every way a process is less confined
  than a reference one (a zygote-forked kernel against its sandbox's init,
  which nsjail confined itself);
* :func:`fd_targets` and :func:`descriptors_naming` tell a process holding a
  descriptor of another (a forked kernel, one of the zygote's).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_PTRACE_SECCOMP_GET_FILTER = 0x420C
_WALL = 0x40000000
_ENOENT = 2
#: Namespaces a sandbox has of its own (``pid`` is the process's, not its children's).
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
_STATUS_FIELDS = (
    "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
    "NoNewPrivs", "Seccomp", "Seccomp_filters",
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, pid: int, addr: int = 0, data: ctypes.c_void_p | None = None) -> int:
    result: int = _libc.ptrace(request, pid, ctypes.c_void_p(addr), data)
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"ptrace({request:#x}, {pid}): {os.strerror(errno)}")
    return result


def seccomp_filters(pid: int) -> list[bytes]:
    """The seccomp BPF programs of ``pid``, oldest first (the order to install them in).

    Blocking (a stop and a wait): call it in a thread, which becomes the
    tracer for the duration. The process resumes where it was.

    Raises:
        OSError: no such process, not permitted, or the kernel lacks
            ``CONFIG_CHECKPOINT_RESTORE``.
    """
    _ptrace(_PTRACE_SEIZE, pid)
    try:
        _ptrace(_PTRACE_INTERRUPT, pid)
        os.waitpid(pid, _WALL)
        programs: list[bytes] = []
        index = 0
        while True:
            try:
                count = _ptrace(_PTRACE_SECCOMP_GET_FILTER, pid, index)
            except OSError as exc:
                if exc.errno == _ENOENT:
                    break
                raise
            buffer = ctypes.create_string_buffer(count * 8)
            _ptrace(_PTRACE_SECCOMP_GET_FILTER, pid, index, ctypes.cast(buffer, ctypes.c_void_p))
            programs.append(buffer.raw)
            index += 1
    finally:
        with contextlib.suppress(OSError):
            _ptrace(_PTRACE_DETACH, pid)
    programs.reverse()  # index 0 is the most recently installed
    return programs


@dataclass(frozen=True)
class Confinement:
    """What confines one process, as the host sees it."""

    pid: int
    namespaces: dict[str, int]
    root: tuple[int, int]
    status: dict[str, str]
    cgroups: str
    limits: dict[str, tuple[int, int]]
    nice: int = 0


def confinement(pid: int) -> Confinement:
    """Read ``pid``'s namespaces, root, credentials, capabilities, cgroups, rlimits and nice."""
    proc = Path(f"/proc/{pid}")
    namespaces = {ns: os.stat(proc / "ns" / ns).st_ino for ns in NAMESPACES}
    root = os.stat(proc / "root")
    status: dict[str, str] = {}
    for line in (proc / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            status[key] = " ".join(value.split())
    limits = limits_of(pid)
    cgroups = (proc / "cgroup").read_text()
    # The fields after "pid (comm)": state is the first, nice the 17th.
    nice = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[16])
    return Confinement(pid, namespaces, (root.st_dev, root.st_ino), status, cgroups, limits, nice)


def limits_of(pid: int) -> dict[str, tuple[int, int]]:
    """``pid``'s rlimits (soft, hard) by name, from ``/proc/<pid>/limits``.

    Not ``prlimit(pid)``: that needs CAP_SYS_RESOURCE, which a container's
    root may lack.
    """
    limits: dict[str, tuple[int, int]] = {}
    for row in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name, values = row[:26].strip(), row[26:].split()
        soft, hard = (resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in values[:2])
        limits[name] = (soft, hard)
    return limits


def nspid(pid: int) -> list[int]:
    """``pid`` in each PID namespace it is in, outermost first (``NSpid``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    return [pid]


def compare_confinement(process: Confinement, reference: Confinement) -> list[str]:
    """Every way ``process`` is confined differently from ``reference``; empty if none.

    ``Seccomp_filters`` is left out: the filters themselves are compared by
    the caller, program by program.
    """
    problems = []
    for ns, inode in reference.namespaces.items():
        if process.namespaces.get(ns) != inode:
            problems.append(f"not in the sandbox's {ns} namespace")
    if process.root != reference.root:
        problems.append("its root is not the sandbox's")
    for key, value in reference.status.items():
        if key != "Seccomp_filters" and process.status.get(key) != value:
            problems.append(f"{key} is {process.status.get(key)!r}, the sandbox's is {value!r}")
    if process.cgroups != reference.cgroups:
        problems.append("not in the sandbox's cgroups")
    for name, limit in reference.limits.items():
        if process.limits.get(name) != limit:
            problems.append(f"{name} is {process.limits.get(name)}, the sandbox's is {limit}")
    if process.nice != reference.nice:
        problems.append(f"its nice value is {process.nice}, the sandbox's is {reference.nice}")
    return problems


def fd_targets(pid: int) -> dict[int, str]:
    """What each of ``pid``'s descriptors names, as ``/proc/<pid>/fd``'s links read here.

    ``socket:[inode]`` and ``pipe:[inode]`` name one object; a path names one
    file (seen from this process's root); ``anon_inode:[kind]`` only a kind
    (eventfd, pidfd...). A descriptor closed while the folder is read is left out.

    Raises:
        OSError: no such process (FileNotFoundError), or not permitted.
    """
    # Links read relative to the folder's descriptor: a third less CPU than by
    # path (70 µs for 50 descriptors).
    folder = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    targets: dict[int, str] = {}
    try:
        for name in os.listdir(folder):
            with contextlib.suppress(FileNotFoundError):
                targets[int(name)] = os.readlink(name, dir_fd=folder)
    finally:
        os.close(folder)
    return targets


def descriptors_naming(fds: Mapping[int, str], targets: Collection[str]) -> list[tuple[int, str]]:
    """The descriptors of ``fds`` (:func:`fd_targets`) that name one of ``targets``, by fd.

    An ``anon_inode`` of the same kind counts, although it may be another
    object of that kind: stricter than needed, for a process (the zygote)
    that holds no such descriptor between requests.
    """
    return sorted((fd, target) for fd, target in fds.items() if target in targets)
