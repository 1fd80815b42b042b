"""From a :class:`~sandkernel.policy.Policy` to a running nsjail, and back to nothing.

Everything a sandbox needs on the host, one module per concept:

============  ================================================================
``runtime``   the nsjail binary, and the Python runtime bound into the jail
``layout``    paths inside the jail, and one kernel's runtime folder on the host
``limits``    what a jail is prepared with: a policy's limits, or only those
``cgroups``   cgroups v1 or v2 (detected at start), one per kernel, created and
              limited by the engine; nsjail starts inside it
``mounts``    the size-limited tmpfs folders (runtime folder, workspace)
``render``    the nsjail config (protobuf text) rendered from a policy
``verify``    a running kernel checked against its policy (fail closed)
``host``      one engine's claim on the host: kernel folders, the owner lock,
              sweeping what dead engines left
``jail``      one sandbox's lifecycle, the same for a kernel and a batch
              worker: prepare → spawn → wait → log tail → destroy
============  ================================================================

The names below are imported from their module on first use, so taking a
constant (``from sandkernel.sandbox import WORKSPACE_IN_JAIL``) does not load
nsjail's config classes.
"""

from __future__ import annotations

from sandkernel._lazy import lazy_exports

# Not ``typing.TYPE_CHECKING``, as in ``sandkernel/__init__.py``: type
# checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandkernel.sandbox.cgroups import (
        CGROUP_PARENT,
        CgroupLayout,
        CgroupUsage,
        CgroupVersion,
        KernelCgroup,
        ensure_cgroup_parents,
        iter_sandkernel_cgroups,
    )
    from sandkernel.sandbox.host import (
        KERNEL_DIR_INODES,
        KERNEL_DIR_MB,
        SandboxHost,
        default_runtime_root,
        owners_dir,
    )
    from sandkernel.sandbox.jail import Jail, wait_exit
    from sandkernel.sandbox.layout import (
        CONNECTION_DIR_IN_JAIL,
        RUNTIME_IN_JAIL,
        SANDBOX_GID,
        SANDBOX_UID,
        WORKSPACE_IN_JAIL,
        KernelLayout,
    )
    from sandkernel.sandbox.mounts import mount_tmpfs, mounts_under, unmount
    from sandkernel.sandbox.render import (
        render_config_text,
        render_nsjail_config,
        sandbox_env,
        seccomp_policy,
    )
    from sandkernel.sandbox.runtime import Runtime, find_nsjail
    from sandkernel.sandbox.verify import (
        IPYKERNEL_ENV,
        SELF_CHECK_PROBE,
        expected_mounts,
        verify_cgroup_limits,
        verify_isolation_report,
    )

#: Re-exported name -> the module (under ``sandkernel.sandbox.``) that defines it.
_WHERE: dict[str, str] = {
    "CGROUP_PARENT": "cgroups",
    "CgroupLayout": "cgroups",
    "CgroupUsage": "cgroups",
    "CgroupVersion": "cgroups",
    "KernelCgroup": "cgroups",
    "ensure_cgroup_parents": "cgroups",
    "iter_sandkernel_cgroups": "cgroups",
    "KERNEL_DIR_INODES": "host",
    "KERNEL_DIR_MB": "host",
    "SandboxHost": "host",
    "default_runtime_root": "host",
    "owners_dir": "host",
    "Jail": "jail",
    "wait_exit": "jail",
    "CONNECTION_DIR_IN_JAIL": "layout",
    "RUNTIME_IN_JAIL": "layout",
    "SANDBOX_GID": "layout",
    "SANDBOX_UID": "layout",
    "WORKSPACE_IN_JAIL": "layout",
    "KernelLayout": "layout",
    "mount_tmpfs": "mounts",
    "mounts_under": "mounts",
    "unmount": "mounts",
    "render_config_text": "render",
    "render_nsjail_config": "render",
    "sandbox_env": "render",
    "seccomp_policy": "render",
    "Runtime": "runtime",
    "find_nsjail": "runtime",
    "IPYKERNEL_ENV": "verify",
    "SELF_CHECK_PROBE": "verify",
    "expected_mounts": "verify",
    "verify_cgroup_limits": "verify",
    "verify_isolation_report": "verify",
}

__all__ = [
    "CGROUP_PARENT",
    "CONNECTION_DIR_IN_JAIL",
    "CgroupLayout",
    "CgroupUsage",
    "CgroupVersion",
    "IPYKERNEL_ENV",
    "Jail",
    "KERNEL_DIR_INODES",
    "KERNEL_DIR_MB",
    "KernelCgroup",
    "KernelLayout",
    "RUNTIME_IN_JAIL",
    "Runtime",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "SELF_CHECK_PROBE",
    "SandboxHost",
    "WORKSPACE_IN_JAIL",
    "default_runtime_root",
    "ensure_cgroup_parents",
    "expected_mounts",
    "find_nsjail",
    "iter_sandkernel_cgroups",
    "mount_tmpfs",
    "mounts_under",
    "owners_dir",
    "render_config_text",
    "render_nsjail_config",
    "sandbox_env",
    "seccomp_policy",
    "unmount",
    "verify_cgroup_limits",
    "verify_isolation_report",
    "wait_exit",
]

# Runtime only: a module ``__getattr__`` that type checkers saw would make
# every misspelt ``sandkernel.sandbox.X`` type-check as Any.
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
