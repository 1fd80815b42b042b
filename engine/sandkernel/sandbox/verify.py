"""Checking a running kernel against its policy, from inside and from outside (fail closed).

A kernel runs :data:`SELF_CHECK_PROBE` and reports who it runs as, its
mounts and its environment; :func:`verify_isolation_report` compares that
with what the policy renders, and :func:`verify_cgroup_limits` reads the
kernel's cgroup limits on the host. A kernel with any problem is destroyed,
never served.
"""

from __future__ import annotations

from pathlib import Path

from sandkernel.policy import Policy
from sandkernel.sandbox.cgroups import CPU_PERIOD_US, CgroupVersion, KernelCgroup, cpu_quota_us
from sandkernel.sandbox.layout import WORKSPACE_IN_JAIL, KernelLayout
from sandkernel.sandbox.render import render_nsjail_config, sandbox_env
from sandkernel.sandbox.runtime import Runtime

#: Variables ipykernel sets in its own environment once started.
IPYKERNEL_ENV = frozenset(
    {"CLICOLOR", "CLICOLOR_FORCE", "FORCE_COLOR", "GIT_PAGER", "PAGER", "TERM",
     "PYDEVD_USE_FRAME_EVAL", "JPY_PARENT_PID", "JPY_SESSION_NAME"}
)  # fmt: skip

#: Run in a kernel, prints one JSON line: who it runs as, its mounts, its
#: environment and which places it can write. Leaves no name behind. The
#: check itself is ``report()`` in ``kernels/runtime/_sandkernel_setup.py``,
#: imported by every kernel before it starts (``launch.run_kernel``; a forked
#: kernel has it from the zygote, compiled and shared): this cell only calls it.
SELF_CHECK_PROBE = "import _sandkernel_setup as _sk\nprint(_sk.report(), flush=True); del _sk"


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
    quota = cpu_quota_us(policy.cpus)

    def field(path: Path, column: int) -> str | None:
        """One whitespace-separated field of a cgroup file; None (a problem) if unreadable."""
        try:
            return path.read_text().split()[column]
        except (OSError, IndexError) as exc:
            problems.append(f"{path} unreadable ({exc})")
            return None

    def at_most(path: Path, limit: int, field_name: str, *, column: int = 0) -> None:
        text = field(path, column)
        if text is None:
            return
        value = int(text) if text.lstrip("-").isdigit() else None
        if value is None or value < 0 or value > limit:
            problems.append(f"{path} is {text}, above the policy's {limit} ({field_name})")

    def period(path: Path, *, column: int = 0) -> None:
        # The quota is a share of this period: a shorter one grants more CPU.
        text = field(path, column)
        if text is not None and text != str(CPU_PERIOD_US):
            problems.append(f"{path} has a CPU period of {text}, not {CPU_PERIOD_US} (cpus)")

    if cgroup.layout.version is CgroupVersion.V2:
        d = cgroup.dirs["memory"]
        at_most(d / "memory.max", memory, "memory_mb")
        if (d / "memory.swap.max").exists():
            at_most(d / "memory.swap.max", 0, "no swap")
        at_most(d / "pids.max", policy.pids_max, "pids_max")
        at_most(d / "cpu.max", quota, "cpus")
        period(d / "cpu.max", column=1)
    elif cgroup.layout.version is CgroupVersion.V1:
        mem = cgroup.dirs["memory"]
        at_most(mem / "memory.limit_in_bytes", memory, "memory_mb")
        if (mem / "memory.memsw.limit_in_bytes").exists():
            at_most(mem / "memory.memsw.limit_in_bytes", memory, "memory_mb, no swap")
        at_most(cgroup.dirs["pids"] / "pids.max", policy.pids_max, "pids_max")
        at_most(cgroup.dirs["cpu"] / "cpu.cfs_quota_us", quota, "cpus")
        period(cgroup.dirs["cpu"] / "cpu.cfs_period_us")
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
