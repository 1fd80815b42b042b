"""The public surface and the packaged data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sandkernel

REPO = Path(__file__).resolve().parents[1]


def test_public_api_is_exactly_this() -> None:
    assert sandkernel.__all__ == sorted(sandkernel.__all__)
    assert sandkernel.__all__ == [
        "BadInput", "ChatModel", "DisplayOutput", "Engine", "EngineAPI", "EngineClosed",
        "EngineConfig", "EngineStats", "ErrorInfo", "ExecutionResult", "FetchedFile", "FileLost",
        "FileNotFoundInStore", "FileRejected", "FileTooLarge", "HostUnreachable", "KernelDead",
        "KernelStartFailed", "LoopResult", "ModelCallFailed", "OpenAIChatModel", "PYTHON_TOOL",
        "Policy", "PolicyError", "PoolExhausted", "ProducedFile", "RunRequest", "RunResult",
        "SandboxHost", "SandboxUnavailable", "SandboxedKernel", "SandkernelError",
        "SelfCheckFailed", "Session", "SessionAPI", "SessionClosed", "SessionError",
        "SessionExpired", "SessionInfo", "SessionLimitReached", "SessionLost", "SessionNotFound",
        "SessionState", "StoredFile", "Usage", "format_result", "listed_file_name", "load_policy",
        "raw_file_name", "run_loop",
    ]  # fmt: skip
    for name in sandkernel.__all__:
        assert getattr(sandkernel, name) is not None


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(sandkernel, n) for n in sandkernel.__all__ if n.endswith(("Error", "ed"))]
    for cls in errors:
        if isinstance(cls, type) and issubclass(cls, Exception):
            assert issubclass(cls, sandkernel.SandkernelError), cls


@pytest.mark.slow
def test_wheel_contains_policies_kernel_spec_runtime_and_py_typed(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("sandkernel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "sandkernel/_data/policies/default.toml",
        "sandkernel/_data/policies/strict.toml",
        "sandkernel/_data/policies/networked.toml",
        "sandkernel/_data/kernels/sandkernel-python/kernel.json",
        "sandkernel/_data/kernels/runtime/launch.py",
        "sandkernel/_data/kernels/runtime/_sandkernel_kernel.py",
        "sandkernel/_data/kernels/runtime/_sandkernel_setup.py",
        "sandkernel/_data/kernels/runtime/forkserver.py",
        "sandkernel/_data/kernels/runtime/start_forkserver.py",
        "sandkernel/_data/kernels/runtime/frames.py",
        "sandkernel/_data/kernels/runtime/hugepages.py",
        "sandkernel/_data/kernels/runtime/immortal.py",
        "sandkernel/_data/kernels/runtime/zygote.py",
        "sandkernel/_data/kernels/requirements.txt",
        "sandkernel/py.typed",
    ):
        assert expected in names, expected
    # Bytecode is written where the package is installed, for its interpreter.
    assert not [n for n in names if n.endswith(".pyc")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sandkernel-provisioner = sandkernel.provisioner:SandboxProvisioner" in text
