"""cgroup v1/v2 detection and per-kernel limits, against fake cgroup trees.

This host runs v1; most users run v2. The files the engine writes and reads
are checked on both layouts here, without real cgroups.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandkernel.policy import Policy
from sandkernel.sandbox import CgroupLayout, CgroupVersion, KernelCgroup
from sandkernel.sandbox.cgroups import UsageReader


def _mounts(tmp_path: Path, lines: list[str]) -> str:
    f = tmp_path / "mounts"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


def test_detects_v2_when_its_root_offers_memory_pids_cpu(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    layout = CgroupLayout.detect(_mounts(tmp_path, [f"cgroup2 {root} cgroup2 rw,nosuid 0 0"]))
    assert layout.version is CgroupVersion.V2
    assert set(layout.mounts.values()) == {root}


def test_hybrid_host_without_v2_controllers_uses_v1(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("\n")
    lines = [f"cgroup2 {unified} cgroup2 rw 0 0"] + [
        f"cgroup {tmp_path / c} cgroup rw,{opts} 0 0"
        for c, opts in (("memory", "memory"), ("pids", "pids"), ("cpu,cpuacct", "cpu,cpuacct"))
    ]
    layout = CgroupLayout.detect(_mounts(tmp_path, lines))
    assert layout.version is CgroupVersion.V1
    assert layout.mounts["cpu"] == layout.mounts["cpuacct"] == tmp_path / "cpu,cpuacct"


def test_no_usable_controllers_is_none(tmp_path: Path) -> None:
    layout = CgroupLayout.detect(_mounts(tmp_path, ["proc /proc proc rw 0 0"]))
    assert layout.version is CgroupVersion.NONE


def test_v2_limits_usage_and_lowering(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    layout = CgroupLayout(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")})
    cg = KernelCgroup(layout, "1-aaaaaaaa-bbbbbbbb")
    cg.create(Policy(memory_mb=512, pids_max=64, cpus=1.5))
    d = root / "sandkernel" / "1-aaaaaaaa-bbbbbbbb"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (d / "memory.max").read_text() == str(512 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "150000 100000"
    (d / "cpu.stat").write_text("usage_usec 2500\nuser_usec 2000\n")
    (d / "memory.peak").write_text("4096\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "pids.events").write_text("max 7\n")
    usage = cg.usage()
    assert (usage.cpu_ns, usage.peak_memory_bytes, usage.oom_kills) == (2_500_000, 4096, 1)
    assert usage.pids_limit_hits == 7
    cg.lower_memory_limit(128 << 20)
    assert (d / "memory.max").read_text() == str(128 << 20)
    cg.lower_memory_limit(1 << 40)  # never raised above the policy
    assert (d / "memory.max").read_text() == str(128 << 20)


def test_v1_limits_usage_and_lowering(tmp_path: Path) -> None:
    mounts = {c: tmp_path / c for c in ("memory", "pids", "cpu", "cpuacct")}
    layout = CgroupLayout(CgroupVersion.V1, mounts)
    for m in mounts.values():
        m.mkdir()
    cg = KernelCgroup(layout, "1-aaaaaaaa-cccccccc")
    cg.create(Policy(memory_mb=256, pids_max=32, cpus=0.5))
    mem = mounts["memory"] / "sandkernel" / "1-aaaaaaaa-cccccccc"
    assert (mem / "memory.limit_in_bytes").read_text() == str(256 << 20)
    assert (mounts["pids"] / "sandkernel" / "1-aaaaaaaa-cccccccc" / "pids.max").read_text() == "32"
    cpu = mounts["cpu"] / "sandkernel" / "1-aaaaaaaa-cccccccc"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (mem / "memory.max_usage_in_bytes").write_text("8192\n")
    (mounts["cpuacct"] / "sandkernel" / "1-aaaaaaaa-cccccccc" / "cpuacct.usage").write_text("99\n")
    usage = cg.usage()
    assert (usage.cpu_ns, usage.peak_memory_bytes, usage.oom_kills) == (99, 8192, 2)
    cg.lower_memory_limit(64 << 20)
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert cg.procs_files == sorted(
        m / "sandkernel" / "1-aaaaaaaa-cccccccc" / "cgroup.procs" for m in mounts.values()
    )


def test_usage_reader_rereads_kept_files_resets_peak_and_closes(tmp_path: Path) -> None:
    mounts = {c: tmp_path / c for c in ("memory", "pids", "cpu", "cpuacct")}
    layout = CgroupLayout(CgroupVersion.V1, mounts)
    for m in mounts.values():
        m.mkdir()
    cg = KernelCgroup(layout, "1-aaaaaaaa-dddddddd")
    cg.create(Policy(memory_mb=256, pids_max=32, cpus=0.5))
    mem = mounts["memory"] / "sandkernel" / "1-aaaaaaaa-dddddddd"
    cpuacct = mounts["cpuacct"] / "sandkernel" / "1-aaaaaaaa-dddddddd" / "cpuacct.usage"
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (mem / "memory.max_usage_in_bytes").write_text("8192\n")
    cpuacct.write_text("100\n")
    reader = UsageReader(cg)
    first = reader.read()
    assert (first.cpu_ns, first.peak_memory_bytes, first.oom_kills) == (100, 8192, 0)
    assert first.pids_limit_hits == 0  # no pids.events: unknown reads as none
    # Kept descriptors see each new value (a real cgroup file is rendered per read).
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    cpuacct.write_text("250\n")
    (mounts["pids"] / "sandkernel" / "1-aaaaaaaa-dddddddd" / "pids.events").write_text("max 4\n")
    second = reader.read(peak=False)
    assert (second.cpu_ns, second.peak_memory_bytes, second.oom_kills) == (250, None, 3)
    assert second.pids_limit_hits == 4
    reader.reset_peak()
    assert (mem / "memory.max_usage_in_bytes").read_text().startswith("0")
    reader.close()
    reader.close()
    assert reader.read().cpu_ns == 250  # reopened on demand
    reader.close()


def test_usage_reader_of_a_removed_cgroup_reads_unknown(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    layout = CgroupLayout(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")})
    reader = UsageReader(KernelCgroup(layout, "1-aaaaaaaa-eeeeeeee"))
    usage = reader.read()
    assert (usage.cpu_ns, usage.peak_memory_bytes, usage.oom_kills) == (None, None, 0)
    reader.close()


def test_a_shorter_cpu_period_than_the_policys_is_a_limit_not_in_place(tmp_path: Path) -> None:
    """The quota is a share of the period: quota 100000 of a 50000 period is two CPUs."""
    from sandkernel.sandbox.verify import verify_cgroup_limits

    policy = Policy(memory_mb=256, pids_max=32, cpus=1)
    root = tmp_path / "cg2"
    root.mkdir()
    v2 = KernelCgroup(CgroupLayout(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")}),
                      "1-aaaaaaaa-dddddddd")  # fmt: skip
    v2.create(policy)
    v2.procs_files[0].write_text("4242\n")
    cpu_max = root / "sandkernel" / "1-aaaaaaaa-dddddddd" / "cpu.max"
    assert verify_cgroup_limits(v2, policy) == []
    cpu_max.write_text("100000 50000")
    assert any("CPU period of 50000" in p for p in verify_cgroup_limits(v2, policy))

    mounts = {c: tmp_path / c for c in ("memory", "pids", "cpu", "cpuacct")}
    for m in mounts.values():
        m.mkdir()
    v1 = KernelCgroup(CgroupLayout(CgroupVersion.V1, mounts), "1-aaaaaaaa-eeeeeeee")
    v1.create(policy)
    for procs in v1.procs_files:
        procs.write_text("4242\n")
    period = mounts["cpu"] / "sandkernel" / "1-aaaaaaaa-eeeeeeee" / "cpu.cfs_period_us"
    period.write_text("100000")
    assert verify_cgroup_limits(v1, policy) == []
    period.write_text("50000")
    assert any("CPU period of 50000" in p for p in verify_cgroup_limits(v1, policy))


def test_kill_all_signals_only_processes_still_in_the_cgroup(tmp_path: Path) -> None:
    """A pid listed, then gone from the cgroup (and perhaps reused), is not signalled."""
    import subprocess

    mounts = {c: tmp_path / c for c in ("memory", "pids", "cpu", "cpuacct")}
    for m in mounts.values():
        m.mkdir()
    cg = KernelCgroup(CgroupLayout(CgroupVersion.V1, mounts), "1-aaaaaaaa-ffffffff")
    cg.create(Policy())
    bystander = subprocess.Popen(["sleep", "60"])
    member = subprocess.Popen(["sleep", "60"])
    try:
        listings = iter([[bystander.pid], [], [member.pid], [member.pid]])
        cg.pids = lambda: next(listings, [])  # type: ignore[method-assign]
        cg.kill_all()
        assert bystander.poll() is None  # listed once, not a member when signalled
        assert member.wait(timeout=10) == -9
    finally:
        for process in (bystander, member):
            process.kill()
            process.wait()


def test_v2_in_a_cgroup_namespace_moves_its_processes_to_a_leaf_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace's root holds the container's processes: controllers need them out."""
    import errno

    from sandkernel.sandbox import cgroups

    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.procs").write_text("1\n42\n")
    real_write = cgroups._write

    def write(path: Path, value: str) -> None:
        # As the kernel: no controllers for children while the root holds processes.
        if path == root / "cgroup.subtree_control" and (root / "cgroup.procs").read_text():
            raise OSError(errno.EBUSY, "Device or resource busy")
        if path.name == "cgroup.procs":  # a move: out of the root, into the leaf
            (root / "cgroup.procs").write_text(
                "".join(f"{p}\n" for p in (root / "cgroup.procs").read_text().split() if p != value)
            )
            with path.open("a") as f:
                f.write(f"{value}\n")
            return
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    layout = CgroupLayout(CgroupVersion.V2, {c: root for c in ("memory", "pids", "cpu")})
    cgroups.ensure_cgroup_parents(layout)
    assert (root / "sandkernel-engine" / "cgroup.procs").read_text() == "1\n42\n"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (root / "sandkernel" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"


def test_a_read_only_cgroup_mount_is_said_to_be_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from sandkernel.errors import SandboxUnavailable
    from sandkernel.sandbox import cgroups

    def read_only(path: Path, value: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cgroups, "_write", read_only)
    layout = CgroupLayout(CgroupVersion.V2, {c: tmp_path for c in ("memory", "pids", "cpu")})
    with pytest.raises(SandboxUnavailable, match="the cgroup mount is read-only"):
        cgroups.ensure_cgroup_parents(layout)


def test_doctor_fails_cgroups_it_finds_but_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from sandkernel import doctor
    from sandkernel.sandbox import cgroups

    def read_only(path: Path, value: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    layout = CgroupLayout(CgroupVersion.V2, {c: tmp_path for c in ("memory", "pids", "cpu")})
    monkeypatch.setattr(doctor.CgroupLayout, "detect", classmethod(lambda cls: layout))
    monkeypatch.setattr(cgroups, "_write", read_only)
    checks, _ = doctor._prerequisites(None)
    (check,) = [c for c in checks if c.name == "cgroups"]
    assert not check.ok and "read-only" in check.detail, check
