"""Sandbox policies: what a kernel may use, loaded from TOML.

A :class:`Policy` is the only source of a sandbox's configuration; the nsjail
config is rendered from it by :mod:`sandkernel.sandbox`. Shipped profiles live
in ``policies/*.toml`` (``default``, ``strict``, ``networked``); a user can
pass the path of their own TOML file wherever a policy name is accepted.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from sandkernel._resources import data_dir
from sandkernel.errors import PolicyError
from sandkernel.limits import MAX_TIMEOUT_S

# Syscalls a notebook cell never needs and that widen the kernel's attack
# surface: tracing, namespaces and mounts, kernel keyrings, BPF, perf, module
# loading, io_uring, clock/system administration. Denied with EPERM so that a
# library probing for them fails cleanly instead of being killed.
DEFAULT_SECCOMP_DENY: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog", "vhangup",
    "iopl", "ioperm", "settimeofday", "clock_settime", "adjtimex", "fanotify_init",
)  # fmt: skip

PositiveInt = Annotated[int, Field(gt=0)]

# Upper bounds: a value the kernel or nsjail cannot take would otherwise pass
# here and fail every start of a sandbox (or, for a size, overflow silently).

#: Linux's PID_MAX_LIMIT (64-bit): the most a ``pids.max`` cgroup file takes.
MAX_PIDS: Final = 4_194_304
#: Linux's default ``fs.nr_open``, the most RLIMIT_NOFILE may be raised to. A
#: machine with a higher ``nr_open`` is rare, and a policy may be written on
#: one machine and used on another: the default is the bound, not this host's.
#: (A sandbox's start also refuses more than the engine's own hard limit.)
MAX_NOFILE: Final = 1_048_576
#: The largest size in MiB (2**40 MiB, 1 EiB). Each size becomes a count of
#: bytes in 64 bits: the cgroup's ``memory.max``, a tmpfs's ``size=`` (which
#: takes 2**44 MiB as 0, no limit at all), nsjail's RLIMIT_FSIZE (MiB times
#: 2**20); and /tmp's and /dev/shm's ``nr_inodes=`` (256 per MiB) stays within
#: what a recent tmpfs takes (``ULONG_MAX / 1024``, about 2**54).
MAX_SIZE_MB: Final = 1 << 40
#: The most files a workspace tmpfs holds (``nr_inodes=``). A recent tmpfs takes
#: up to about 2**54, but each file costs kernel memory (about a KiB): 2**32
#: files would already pin terabytes.
MAX_INODES: Final = 1 << 32
#: The longest an interrupt may take after a timeout before the kernel is
#: killed: the grace adds to the wall time of a cell that timed out, and an
#: interrupt that has not worked in a minute will not.
MAX_INTERRUPT_GRACE_S: Final = 60.0

#: A syscall's name as kafel, nsjail's seccomp language, reads it. Python has no
#: table of the syscalls this machine's kernel (or kafel) knows, so only the
#: shape is checked: a name of another shape would also change the rule it is
#: written into (``seccomp_policy`` joins the names into kafel text).
_SYSCALL_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class Policy(BaseModel):
    """Limits and permissions of one sandboxed kernel.

    Units are in the field names. Every field has a safe default, so a policy
    file only lists what it changes.
    """

    # inf and nan are no limit: a timeout of inf overflows the deadline it becomes.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "custom"
    description: str = ""
    network: bool = Field(
        default=False,
        description="Share the host's network. Only for trusted code: it removes "
        "the network namespace, so code can reach anything the host can.",
    )
    memory_mb: int = Field(
        default=1024,
        ge=64,
        le=MAX_SIZE_MB,
        description="cgroup memory limit (no swap), at most 2**40 MiB",
    )
    cpus: float = Field(default=1.0, gt=0, le=1024, description="CPU quota in cores")
    pids_max: int = Field(
        default=256,
        ge=16,
        le=MAX_PIDS,
        description=f"cgroup limit on processes+threads, at most {MAX_PIDS} (Linux's "
        "PID_MAX_LIMIT)",
    )
    wall_timeout_s: float = Field(
        default=60,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="default wall timeout per cell, up to 24 h (the bound of every API)",
    )
    interrupt_grace_s: float = Field(
        default=2.0,
        ge=0,
        le=MAX_INTERRUPT_GRACE_S,
        description="after a timeout, how long an interrupt may take before the kernel is "
        "killed, at most 60 s",
    )
    workspace_mb: int = Field(
        default=1024, ge=1, le=MAX_SIZE_MB, description="size of /mnt/data, at most 2**40 MiB"
    )
    workspace_inodes: PositiveInt = Field(
        default=65536, le=MAX_INODES, description="files in /mnt/data, at most 2**32"
    )
    tmp_mb: int = Field(
        default=256, ge=1, le=MAX_SIZE_MB, description="size of the tmpfs /tmp, at most 2**40 MiB"
    )
    shm_mb: int = Field(
        default=64,
        ge=1,
        le=MAX_SIZE_MB,
        description="size of the tmpfs /dev/shm, at most 2**40 MiB",
    )
    nofile: int = Field(
        default=1024,
        ge=64,
        le=MAX_NOFILE,
        description=f"RLIMIT_NOFILE, at most {MAX_NOFILE} (Linux's default fs.nr_open, "
        "above which it cannot be set; few machines raise it) and, when a sandbox starts, "
        "at most the engine's own hard limit",
    )
    file_size_mb: int = Field(
        default=512,
        ge=1,
        le=MAX_SIZE_MB,
        description="RLIMIT_FSIZE: largest file, at most 2**40 MiB",
    )
    output_max_bytes: int = Field(
        default=1 << 20, ge=1024, description="stdout and stderr kept per cell, each"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="extra environment; any variable but TMPDIR, SHELL, PERL5LIB, PERL5OPT "
        "and PERLLIB makes this policy's kernels start cold, not forked from the zygote "
        "(it may be read as a process starts)",
    )
    readonly_mounts: list[str] = Field(
        default_factory=list,
        description="extra host paths bound read-only at the same path: absolute, without "
        "'..'; not checked when the policy is loaded (it may be written on another "
        "machine), but a path missing on the host fails the sandbox's start",
    )
    seccomp_deny: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SECCOMP_DENY),
        description="syscalls that fail with EPERM, by name (only the form of a name is "
        "checked when the policy is loaded: one nsjail does not know fails the start)",
    )

    @field_validator("readonly_mounts")
    @classmethod
    def _absolute_paths(cls, paths: list[str]) -> list[str]:
        # Each is bound at the same path inside the sandbox, where a relative
        # path has no meaning (nsjail refuses it at the start).
        for path in paths:
            if "\0" in path:
                raise ValueError(f"{path!r} contains a NUL character")
            parts = PurePosixPath(path).parts
            if not path.startswith("/"):
                raise ValueError(f"{path!r} is not an absolute path (like '/opt/data')")
            if ".." in parts:
                raise ValueError(f"{path!r} has a '..' component: give the path it leads to")
            if len(parts) == 1:
                raise ValueError("'/' cannot be bound: it would cover the sandbox's own files")
        return paths

    @field_validator("seccomp_deny")
    @classmethod
    def _syscall_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if _SYSCALL_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"{name[:40]!r} is not a syscall name (lowercase letters, digits and _, "
                    "like 'ptrace')"
                )
        return names


def shipped_policy_names() -> list[str]:
    """Names of the policies shipped with sandkernel."""
    return sorted(p.stem for p in data_dir("policies").glob("*.toml"))


def load_policy(spec: str | Path | Policy | None = None) -> Policy:
    """Load a policy from a shipped name, a TOML path, or pass a Policy through.

    Args:
        spec: ``None`` (the ``default`` policy), a shipped name such as
            ``"strict"``, a path to a TOML file, or a ready :class:`Policy`.

    Raises:
        PolicyError: unknown name, unreadable file, or invalid field (named).
    """
    if isinstance(spec, Policy):
        return spec
    if spec is None:
        spec = "default"
    text = str(spec)
    path = Path(text)
    if not (text.endswith(".toml") or path.is_file()):
        candidate = data_dir("policies") / f"{text}.toml"
        if not candidate.is_file():
            raise PolicyError(
                f"unknown policy {text!r}: use one of {', '.join(shipped_policy_names())} "
                "or the path of a TOML file"
            )
        path = candidate
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"policy file {str(path)!r} is not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {_message(err)}"
            for err in exc.errors()
        )
        raise PolicyError(f"policy file {str(path)!r} is invalid: {problems}") from None


def _message(error: ErrorDetails) -> str:
    # A validator's own message says it all, without pydantic's "Value error, ".
    if error["type"] == "value_error" and "ctx" in error:
        return str(error["ctx"]["error"])
    return error["msg"]
