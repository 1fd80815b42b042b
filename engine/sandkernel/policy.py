"""Sandbox policies: what a kernel may use, loaded from TOML.

A :class:`Policy` is the only source of a sandbox's configuration; the nsjail
config is rendered from it by :mod:`sandkernel.sandbox`. Shipped profiles live
in ``policies/*.toml`` (``default``, ``strict``, ``networked``); a user can
pass the path of their own TOML file wherever a policy name is accepted.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandkernel._resources import data_dir
from sandkernel.errors import PolicyError

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


class Policy(BaseModel):
    """Limits and permissions of one sandboxed kernel.

    Units are in the field names. Every field has a safe default, so a policy
    file only lists what it changes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    description: str = ""
    network: bool = Field(
        default=False,
        description="Share the host's network. Only for trusted code: it removes "
        "the network namespace, so code can reach anything the host can.",
    )
    memory_mb: int = Field(default=1024, ge=64, description="cgroup memory limit (no swap)")
    cpus: float = Field(default=1.0, gt=0, le=1024, description="CPU quota in cores")
    pids_max: int = Field(default=256, ge=16, description="cgroup limit on processes+threads")
    wall_timeout_s: float = Field(default=60, gt=0, description="default wall timeout per cell")
    interrupt_grace_s: float = Field(
        default=2.0, ge=0, description="after a timeout, how long an interrupt may take"
    )
    workspace_mb: int = Field(default=1024, ge=1, description="size of /mnt/data")
    workspace_inodes: PositiveInt = Field(default=65536, description="files in /mnt/data")
    tmp_mb: int = Field(default=256, ge=1, description="size of the tmpfs /tmp")
    shm_mb: int = Field(default=64, ge=1, description="size of the tmpfs /dev/shm")
    nofile: int = Field(default=1024, ge=64, description="RLIMIT_NOFILE")
    file_size_mb: int = Field(default=512, ge=1, description="RLIMIT_FSIZE: largest file")
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
        default_factory=list, description="extra host paths bound read-only at the same path"
    )
    seccomp_deny: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SECCOMP_DENY),
        description="syscalls that fail with EPERM",
    )


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
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PolicyError(f"policy file {str(path)!r} is invalid: {problems}") from None
