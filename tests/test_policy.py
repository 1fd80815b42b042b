from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sandkernel.errors import PolicyError
from sandkernel.limits import MAX_TIMEOUT_S
from sandkernel.policy import (
    DEFAULT_SECCOMP_DENY,
    MAX_INODES,
    MAX_INTERRUPT_GRACE_S,
    MAX_NOFILE,
    MAX_PIDS,
    MAX_SIZE_MB,
    Policy,
    load_policy,
    shipped_policy_names,
)
from sandkernel.sandbox import (
    KernelLayout,
    Runtime,
    render_config_text,
    render_nsjail_config,
    seccomp_policy,
)
from sandkernel.sandbox import render as render_module
from sandkernel.sandbox.render import ConfigRenderer

SNAPSHOTS = Path(__file__).parent / "snapshots"


def test_shipped_policies_are_default_strict_networked() -> None:
    assert {"default", "strict", "networked"} <= set(shipped_policy_names())


def test_default_policy_has_the_documented_limits() -> None:
    p = load_policy()
    assert p.name == "default"
    assert (p.network, p.memory_mb, p.cpus, p.pids_max) == (False, 1024, 1.0, 256)
    assert (p.wall_timeout_s, p.workspace_mb, p.tmp_mb, p.nofile) == (60, 1024, 256, 1024)
    assert p.file_size_mb > 0


def test_strict_is_tighter_than_default_everywhere() -> None:
    d, s = load_policy("default"), load_policy("strict")
    assert not s.network
    for field in ("memory_mb", "cpus", "pids_max", "wall_timeout_s", "workspace_mb", "tmp_mb"):
        assert getattr(s, field) < getattr(d, field), field


def test_networked_policy_is_the_only_one_with_network() -> None:
    assert load_policy("networked").network
    assert "TRUSTED" in load_policy("networked").description


def test_unknown_field_is_rejected_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text("memroy_mb = 512\n")
    with pytest.raises(PolicyError, match="memroy_mb"):
        load_policy(f)


def test_bad_value_is_rejected_naming_the_field(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text("memory_mb = -5\n")
    with pytest.raises(PolicyError, match="memory_mb"):
        load_policy(f)


def test_invalid_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("memory_mb = = 3\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(f)
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "absent.toml")
    with pytest.raises(PolicyError, match="unknown policy 'nope'.*default"):
        load_policy("nope")


def test_user_policy_file_overrides_only_what_it_lists(tmp_path: Path) -> None:
    f = tmp_path / "small.toml"
    f.write_text('memory_mb = 300\nenv = { "FOO" = "bar" }\n')
    p = load_policy(str(f))
    assert p.name == "small" and p.memory_mb == 300 and p.env == {"FOO": "bar"}
    assert p.pids_max == Policy().pids_max


def test_seccomp_denies_namespaces_and_ptrace() -> None:
    text = seccomp_policy(load_policy())
    for syscall in ("ptrace", "unshare", "setns", "mount", "bpf", "keyctl", "io_uring_setup"):
        assert syscall in text
    assert "clone_flags" in text and text.endswith("DEFAULT ALLOW")


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("usr/bin", "usr/lib", "usr/sbin", "lib64"):
        (root / d).mkdir(parents=True)
    os.symlink("usr/bin", root / "bin")
    os.symlink("usr/lib", root / "lib")
    os.symlink("usr/sbin", root / "sbin")
    return root


def _rendered(policy: Policy, host_root: Path, **kwargs: Any) -> str:
    """The config text of a kernel with fixed paths, rendered against a fake root."""
    config = render_nsjail_config(
        policy,
        KernelLayout("1-00000000-00000000", Path("/run/sandkernel/1-00000000-00000000")),
        Runtime(python="/opt/python/bin/python", mounts=("/opt/python",)),
        ["/opt/python/bin/python", "/opt/sandkernel/launch.py", "-f", "/run/sandkernel/k.json"],
        host_root=host_root,
        kernel_runtime=Path("/usr/share/sandkernel/runtime"),
        **kwargs,
    )
    return render_config_text(config)


@pytest.mark.parametrize("name", shipped_policy_names())
def test_rendered_config_matches_snapshot(name: str, tmp_path: Path) -> None:
    """Pins the nsjail config each shipped policy renders to (machine-independent)."""
    text = _rendered(load_policy(name), _fake_root(tmp_path))
    snapshot = SNAPSHOTS / f"policy_{name}.txtpb"
    if os.environ.get("SANDKERNEL_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text(), f"rendering of {name} changed; review and update"


def test_descriptors_passed_to_the_command_are_all_that_the_config_adds(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    plain = _rendered(load_policy(), root).splitlines()
    passing = _rendered(load_policy(), root, pass_fds=(7, 12)).splitlines()
    assert [line for line in passing if line not in plain] == ["pass_fd: 7", "pass_fd: 12"]
    assert [line for line in plain if line not in passing] == []


_RUNTIME = Runtime(python="/opt/python/bin/python", mounts=("/opt/python",))
_ARGV = ["/opt/python/bin/python", "/opt/sandkernel/launch.py"]


def _in_full(policy: Policy, layout: KernelLayout, pass_fds: tuple[int, ...] = ()) -> str:
    return render_config_text(
        render_nsjail_config(policy, layout, _RUNTIME, _ARGV, pass_fds=pass_fds)
    )


@pytest.mark.parametrize(
    "layout",
    [
        KernelLayout("1-0a0b0c0d-00000001", Path("/run/sandkernel/1-0a0b0c0d-00000001")),
        KernelLayout("22-ffffffff-12345678", Path("/var/tmp/rt,x=1@h:2/22-ffffffff-12345678")),
        # what the text format escapes: rendered in full
        KernelLayout("3-00000000-00000003", Path('/tmp/my "runtime"\\/3-00000000-00000003')),
        KernelLayout("4-00000000-00000004", Path("/tmp/données\n/4-00000000-00000004")),
    ],
)
def test_a_kept_rendering_gives_each_kernel_the_text_of_its_own_full_rendering(
    layout: KernelLayout,
) -> None:
    renderer = ConfigRenderer()
    networked = load_policy("networked")
    first = KernelLayout("9-00000000-00000009", Path("/run/other/9-00000000-00000009"))
    for policy, pass_fds in [(load_policy(), ()), (networked, ()), (networked, (7,))]:
        # the second kernel's text is made from the first's rendering
        assert renderer.text(policy, first, _RUNTIME, _ARGV, pass_fds=pass_fds) == _in_full(
            policy, first, pass_fds
        )
        text = renderer.text(policy, layout, _RUNTIME, _ARGV, pass_fds=pass_fds)
        assert text == _in_full(policy, layout, pass_fds)


def test_a_policy_is_rendered_once_for_all_its_kernels_and_again_once_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendered: list[str] = []
    full = render_module.render_nsjail_config

    def counted(policy: Policy, layout: KernelLayout, *args: Any, **kwargs: Any) -> Any:
        rendered.append(layout.kernel_id)
        return full(policy, layout, *args, **kwargs)

    monkeypatch.setattr(render_module, "render_nsjail_config", counted)
    renderer = ConfigRenderer()
    layouts = [KernelLayout(f"{i}-00000000-0000000{i}", Path(f"/run/k{i}")) for i in range(3)]
    texts = {renderer.text(load_policy(), layout, _RUNTIME, _ARGV) for layout in layouts}
    assert len(rendered) == 1 and len(texts) == 3
    smaller = load_policy().model_copy(update={"memory_mb": 256})
    renderer.text(smaller, layouts[0], _RUNTIME, _ARGV)
    renderer.text(smaller, layouts[1], _RUNTIME, _ARGV)
    assert len(rendered) == 2


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        # each above what the kernel or nsjail takes: it failed every sandbox's start
        ("pids_max = 5000000", "pids_max: Input should be less than or equal to 4194304"),
        ("nofile = 2000000", "nofile: Input should be less than or equal to 1048576"),
        ("workspace_inodes = 99999999999999999", "workspace_inodes: Input should be less"),
        # each would overflow the bytes it becomes (tmpfs takes 2**44 MiB as no limit)
        ("file_size_mb = 100000000000000", "file_size_mb: Input should be less than or equal"),
        (f"workspace_mb = {1 << 44}", "workspace_mb: Input should be less than or equal"),
        (f"tmp_mb = {1 << 44}", "tmp_mb: Input should be less than or equal"),
        (f"shm_mb = {1 << 44}", "shm_mb: Input should be less than or equal"),
        (f"memory_mb = {1 << 44}", "memory_mb: Input should be less than or equal"),
        # no deadline can be that far
        ("wall_timeout_s = inf", "wall_timeout_s: Input should be a finite number"),
        ("wall_timeout_s = nan", "wall_timeout_s: Input should be a finite number"),
        ("wall_timeout_s = 86401", "wall_timeout_s: Input should be less than or equal to 86400"),
        ("interrupt_grace_s = inf", "interrupt_grace_s: Input should be a finite number"),
        ("interrupt_grace_s = 61", "interrupt_grace_s: Input should be less than or equal to 60"),
    ],
)
def test_a_value_no_sandbox_can_take_is_refused_at_load_naming_the_field(
    tmp_path: Path, setting: str, problem: str
) -> None:
    f = tmp_path / "p.toml"
    f.write_text(setting + "\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(f)
    assert str(refused.value).startswith(f"policy file {str(f)!r} is invalid: {problem}")


def test_the_upper_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    sizes = ("memory_mb", "workspace_mb", "tmp_mb", "shm_mb", "file_size_mb")
    f.write_text(
        "".join(f"{field} = {MAX_SIZE_MB}\n" for field in sizes)
        + f"pids_max = {MAX_PIDS}\nnofile = {MAX_NOFILE}\nworkspace_inodes = {MAX_INODES}\n"
        + f"wall_timeout_s = {MAX_TIMEOUT_S}\ninterrupt_grace_s = {MAX_INTERRUPT_GRACE_S}\n"
    )
    p = load_policy(f)
    assert (p.pids_max, p.nofile, p.workspace_inodes) == (4_194_304, 1_048_576, 1 << 32)
    assert p.file_size_mb == p.memory_mb == 1 << 40
    assert (p.wall_timeout_s, p.interrupt_grace_s) == (24 * 3600, 60)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("relative/path", "'relative/path' is not an absolute path (like '/opt/data')"),
        ("./data", "'./data' is not an absolute path (like '/opt/data')"),
        ("/opt/../etc", "'/opt/../etc' has a '..' component: give the path it leads to"),
        ("/opt/data/..", "'/opt/data/..' has a '..' component: give the path it leads to"),
        ("/opt/x\\u0000y", "'/opt/x\\x00y' contains a NUL character"),
        ("/", "'/' cannot be bound: it would cover the sandbox's own files"),
    ],
)
def test_a_readonly_mount_that_is_no_absolute_path_is_refused_at_load(
    tmp_path: Path, path: str, problem: str
) -> None:
    """nsjail refused it only at the start: "Failed to mount mandatory point"."""
    f = tmp_path / "p.toml"
    f.write_text(f'readonly_mounts = ["/opt/fine", "{path}"]\n')
    with pytest.raises(PolicyError) as refused:
        load_policy(f)
    assert str(refused.value) == f"policy file {str(f)!r} is invalid: readonly_mounts: {problem}"


def test_a_readonly_mount_need_not_exist_when_the_policy_is_loaded(tmp_path: Path) -> None:
    """A policy may be written on another machine: a missing path fails the start only."""
    f = tmp_path / "p.toml"
    f.write_text(f'readonly_mounts = ["{tmp_path}/absent", "/opt/./data/"]\n')
    assert load_policy(f).readonly_mounts == [f"{tmp_path}/absent", "/opt/./data/"]


@pytest.mark.parametrize(
    "name", ["ptrace } ALLOW { execve", "Ptrace", "1ptrace", "", "ptrace,bpf", "ptrace "]
)
def test_a_seccomp_deny_entry_that_is_no_syscall_name_is_refused_at_load(
    tmp_path: Path, name: str
) -> None:
    f = tmp_path / "p.toml"
    f.write_text(f'seccomp_deny = ["ptrace", "{name}"]\n')
    with pytest.raises(PolicyError) as refused:
        load_policy(f)
    assert f"is invalid: seccomp_deny: {name!r} is not a syscall name" in str(refused.value)


def test_the_default_seccomp_deny_list_has_the_form_of_syscall_names() -> None:
    # A default is not validated: given as a value, it is.
    names = [*DEFAULT_SECCOMP_DENY, "_sysctl", "sync_file_range2"]
    assert Policy(seccomp_deny=names).seccomp_deny == names
