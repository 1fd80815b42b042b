"""Attacks on the sandbox core: each tries an escape and asserts it failed."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from sandkernel.policy import load_policy
from tests.conftest import KernelFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
REPO = Path(__file__).resolve().parents[2]
HOST_FILE = str(REPO / "pyproject.toml")


async def run_json(kernel_factory: KernelFactory, code: str) -> object:
    k = await kernel_factory()
    r = await k.execute(code + "\nimport json as _j; print(_j.dumps(result))")
    assert r.status == "ok", r
    return json.loads(r.stdout.strip().splitlines()[-1])


async def test_host_files_outside_the_mounts_are_invisible(kernel_factory: KernelFactory) -> None:
    result = await run_json(
        kernel_factory,
        "import os\n"
        "result = {p: os.path.exists(p) for p in "
        f"['/etc/shadow', '/root/.bash_history', '/var/log', '/home', {HOST_FILE!r}]}}",
    )
    assert result == dict.fromkeys(result, False)


async def test_proc_shows_only_sandbox_processes(kernel_factory: KernelFactory) -> None:
    result = await run_json(
        kernel_factory,
        "import os\n"
        "result = {p: open(f'/proc/{p}/cmdline','rb').read().decode(errors='replace') "
        "for p in os.listdir('/proc') if p.isdigit()}",
    )
    assert isinstance(result, dict)
    assert str(os.getpid()) not in result
    assert all("pytest" not in cmd for cmd in result.values())
    assert len(result) <= 3


async def test_outbound_tcp_dns_and_host_loopback_fail(kernel_factory: KernelFactory) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = await run_json(
            kernel_factory,
            "import socket\n"
            "def attempt(f):\n"
            "    try:\n"
            "        f(); return 'connected'\n"
            "    except OSError as e:\n"
            "        return type(e).__name__\n"
            "result = {\n"
            " 'tcp': attempt(lambda: socket.create_connection(('1.1.1.1', 53), timeout=2)),\n"
            " 'dns': attempt(lambda: socket.getaddrinfo('example.com', 80)),\n"
            f" 'loopback': attempt(lambda: socket.create_connection(('127.0.0.1', {port}))),\n"
            "}",
        )
    assert isinstance(result, dict)
    assert "connected" not in result.values(), result


async def test_system_dirs_and_runtime_are_read_only(kernel_factory: KernelFactory) -> None:
    import sys

    site = next(p for p in sys.path if p.endswith("site-packages"))
    result = await run_json(
        kernel_factory,
        "import os\n"
        "def write(p):\n"
        "    try:\n"
        "        open(p, 'w').write('x'); return 'written'\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        f"result = [write(p) for p in ['/usr/evil', '/opt/sandkernel/launch.py', "
        f"{site + '/evil.py'!r}, '/etc/passwd', '/evil']]",
    )
    assert isinstance(result, list) and "written" not in result


async def test_host_environment_is_invisible(
    kernel_factory: KernelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDKERNEL_CANARY_SECRET", "hunter2")
    result = await run_json(kernel_factory, "import os\nresult = dict(os.environ)")
    assert isinstance(result, dict)
    assert "SANDKERNEL_CANARY_SECRET" not in result
    assert "hunter2" not in json.dumps(result)


async def test_no_capabilities_no_new_privs_seccomp_filter(kernel_factory: KernelFactory) -> None:
    result = await run_json(
        kernel_factory,
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "result = {k: status[k].strip() for k in ('CapEff', 'CapPrm', 'NoNewPrivs', 'Seccomp')}",
    )
    assert result == {
        "CapEff": "0000000000000000",
        "CapPrm": "0000000000000000",
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }


async def test_namespace_ptrace_and_mount_syscalls_are_denied(
    kernel_factory: KernelFactory,
) -> None:
    result = await run_json(
        kernel_factory,
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(f, *a):\n"
        "    rc = f(*a)\n"
        "    return 'allowed' if rc == 0 else ctypes.get_errno()\n"
        "result = {\n"
        " 'unshare_user': call(libc.unshare, 0x10000000),\n"
        " 'unshare_net': call(libc.unshare, 0x40000000),\n"
        " 'ptrace_attach_1': call(libc.ptrace, 16, 1, 0, 0),\n"
        " 'mount': call(libc.mount, b'none', b'/tmp', b'tmpfs', 0, None),\n"
        " 'setuid0': call(libc.setuid, 0),\n"
        "}",
    )
    assert isinstance(result, dict)
    assert "allowed" not in result.values(), result


async def test_kernel_cannot_read_its_connection_key_from_host_paths(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    host_file = k.workspace.parent / "connection.json"
    assert host_file.exists()
    r = await k.execute(f"import os; print(os.path.exists({str(host_file)!r}))")
    assert r.stdout.strip() == "False"


async def test_networked_policy_really_shares_the_network(kernel_factory: KernelFactory) -> None:
    """The control for the loopback test above: with network on, the host's listener answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        k = await kernel_factory(load_policy("networked"))
        r = await k.execute(
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close()"
        )
    assert r.status == "ok", r
