from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandkernel.errors import PolicyError
from sandkernel.policy import Policy, load_policy, shipped_policy_names
from sandkernel.sandbox import (
    KernelLayout,
    Runtime,
    render_config_text,
    render_nsjail_config,
    seccomp_policy,
)

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


@pytest.mark.parametrize("name", shipped_policy_names())
def test_rendered_config_matches_snapshot(name: str, tmp_path: Path) -> None:
    """Pins the nsjail config each shipped policy renders to (machine-independent)."""
    config = render_nsjail_config(
        load_policy(name),
        KernelLayout("1-00000000-00000000", Path("/run/sandkernel/1-00000000-00000000")),
        Runtime(python="/opt/python/bin/python", mounts=("/opt/python",)),
        ["/opt/python/bin/python", "/opt/sandkernel/launch.py", "-f", "/run/sandkernel/k.json"],
        host_root=_fake_root(tmp_path),
        kernel_runtime=Path("/usr/share/sandkernel/runtime"),
    )
    text = render_config_text(config)
    snapshot = SNAPSHOTS / f"policy_{name}.txtpb"
    if os.environ.get("SANDKERNEL_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text(), f"rendering of {name} changed; review and update"
