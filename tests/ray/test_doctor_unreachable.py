"""`sandkernel doctor --ray` where nothing answers: its own message, soon, not Ray's retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def _closed_port() -> int:
    """A loopback port nothing listens on (the kernel just handed it out and took it back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("given", ["--ray ADDRESS", "RAY_ADDRESS"])
def test_doctor_says_it_cannot_reach_ray_at_an_address_where_nothing_listens(given: str) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if given == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    args = ["--ray", address] if given == "--ray ADDRESS" else ["--ray"]
    proc = subprocess.run(
        [sys.executable, "-m", "sandkernel.cli", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,  # Ray's own retries take many minutes
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sandkernel doctor --ray: cannot reach Ray at " in proc.stderr, proc.stderr
    assert address in proc.stderr and "Connection refused" in proc.stderr
    assert "Traceback" not in proc.stderr
