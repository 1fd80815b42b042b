"""Rendering the nsjail configuration of a sandbox from its :class:`~sandkernel.policy.Policy`.

The policy is the only source of the configuration: its mounts, environment,
namespaces, rlimits and seccomp filter are rendered here (protobuf text, as
nsjail reads it with ``--config``), and a snapshot test pins the rendering of
every shipped policy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from nsjail.config import Exe, IdMap, MountPt, NsJailConfig
from nsjail.enums import LogLevel, Mode, RLimitType
from nsjail.serializers import to_textproto

from sandkernel._resources import data_dir
from sandkernel.policy import Policy
from sandkernel.sandbox.layout import (
    CONNECTION_DIR_IN_JAIL,
    RUNTIME_IN_JAIL,
    SANDBOX_GID,
    SANDBOX_UID,
    STAND_IN,
    WORKSPACE_IN_JAIL,
    KernelLayout,
    fill_stand_in,
    stands_in,
)
from sandkernel.sandbox.runtime import Runtime

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
    pass_fds: Sequence[int] = (),
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
        pass_fds: descriptors of the engine's that the command inherits, at
            the same numbers (nsjail closes every other one).
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
        pass_fd=list(pass_fds),
    )


def render_config_text(config: NsJailConfig) -> str:
    """The nsjail config in protobuf text format, as written to ``--config``."""
    return str(to_textproto(config)) + "\n"


class ConfigRenderer:
    """Renders kernels' nsjail configs as text, each policy's once.

    Two kernels' configurations differ only in their id and folder. Rendering
    one costs about a millisecond of each kernel's start: this renders it
    once per policy, runtime, command and passed descriptors, and puts each
    kernel's id and folder in. An id or folder that the text format would
    escape is rendered in full instead.

    Args:
        keep: renderings kept; past it, all are dropped and made again.
    """

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._texts: dict[tuple[str, Runtime, tuple[str, ...], tuple[int, ...]], str] = {}

    def text(
        self,
        policy: Policy,
        layout: KernelLayout,
        runtime: Runtime,
        argv: list[str],
        *,
        pass_fds: Sequence[int] = (),
    ) -> str:
        """``render_config_text(render_nsjail_config(...))`` of these arguments."""
        if not stands_in(layout):
            config = render_nsjail_config(policy, layout, runtime, argv, pass_fds=pass_fds)
            return render_config_text(config)
        return fill_stand_in(self.template(policy, runtime, argv, pass_fds=pass_fds), layout)

    def template(
        self,
        policy: Policy,
        runtime: Runtime,
        argv: list[str],
        *,
        pass_fds: Sequence[int] = (),
    ) -> str:
        """The config of these arguments for the stand-in kernel (:data:`~.layout.STAND_IN`).

        :func:`~.layout.fill_stand_in` makes it a kernel's own config.
        """
        key = (policy.model_dump_json(), runtime, tuple(argv), tuple(pass_fds))
        text = self._texts.get(key)
        if text is None:
            if len(self._texts) >= self.keep:
                self._texts.clear()
            config = render_nsjail_config(policy, STAND_IN, runtime, argv, pass_fds=pass_fds)
            text = self._texts[key] = render_config_text(config)
        return text
