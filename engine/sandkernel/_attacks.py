"""``sandkernel doctor --attack``: a quick subset of the attack catalogue, on this machine.

The full catalogue is the test suite's ``tests/security``; these dozen
attacks run in a few seconds against the installed engine, in real sandboxes
of the ``default`` policy, and say which held. Each is hostile code run in
a kernel plus a verdict on what it reported (some also prepare something on
the host first: a listener, a secret in the environment).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

#: Defined in the sandbox before an attack (here and in the test suite's
#: catalogue, tests/security): ``attempt(f)`` runs ``f`` and says ``"allowed"``
#: or the errno name it failed with; ``call(nr, *args)`` makes a raw system
#: call the same way (a child made by a clone that got through exits).
PRELUDE = textwrap.dedent("""
    import ctypes, errno as _errno, json, os, socket
    _libc = ctypes.CDLL(None, use_errno=True)
    def _name(code):
        return _errno.errorcode.get(code, str(code))
    def attempt(f):
        try:
            f()
        except OSError as e:
            return _name(e.errno) if e.errno else type(e).__name__
        except Exception as e:
            return type(e).__name__
        return "allowed"
    def call(nr, *args):
        rc = _libc.syscall(nr, *[ctypes.c_long(a) for a in args])
        if rc == 0 and nr in (56,):
            _libc._exit(0)
        return "allowed" if rc >= 0 else _name(ctypes.get_errno())
""")


@dataclass
class AttackOutcome:
    name: str
    held: bool
    detail: str


@dataclass(frozen=True)
class _Attack:
    name: str
    #: sets ``result``; may use ``{port}``, ``{canary}`` and ``{host_path}``
    code: str
    #: result -> (held, detail)
    verdict: Callable[[Any], tuple[bool, str]]
    #: the attack may kill its kernel: run it in a kernel of its own
    destructive: bool = False


def _none_allowed(result: dict[str, str]) -> tuple[bool, str]:
    allowed = sorted(k for k, v in result.items() if v == "allowed")
    if allowed:
        return False, "allowed: " + ", ".join(allowed)
    return True, ", ".join(f"{k} {v}" for k, v in sorted(result.items()))


def _all_eperm(result: dict[str, str]) -> tuple[bool, str]:
    other = sorted(f"{k} {v}" for k, v in result.items() if v != "EPERM")
    return not other, ("all EPERM" if not other else "not EPERM: " + ", ".join(other))


ATTACKS: tuple[_Attack, ...] = (
    _Attack(
        "host files",
        """
        paths = ['/etc/shadow', '/root/.ssh', '/home', '/var/log', {host_path!r},
                 '/proc/1/root/etc/shadow']
        result = {p: 'allowed' if os.path.exists(p) else 'absent' for p in paths}
        """,
        _none_allowed,
    ),
    _Attack(
        "host environment",
        """
        seen = []
        for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                seen.append(open(f'/proc/{pid}/environ', 'rb').read())
            except OSError:
                pass
        result = {'canary': 'allowed' if any({canary!r}.encode() in e for e in seen) else 'absent'}
        """,
        _none_allowed,
    ),
    _Attack(
        "network egress",
        """
        def tcp(addr):
            with socket.create_connection(addr, timeout=2):
                pass
        def udp():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(b'x', ('8.8.8.8', 53))
                s.recvfrom(1)
        result = {'tcp': attempt(lambda: tcp(('1.1.1.1', 443))), 'udp_dns': attempt(udp),
                  'resolve': attempt(lambda: socket.getaddrinfo('example.com', 443))}
        """,
        _none_allowed,
    ),
    _Attack(
        "host loopback service",
        """
        def tcp():
            with socket.create_connection(('127.0.0.1', {port}), timeout=2):
                pass
        result = {'tcp_127.0.0.1': attempt(tcp)}
        """,
        _none_allowed,
    ),
    _Attack(
        "vsock and other socket families",
        """
        families = {'vsock': (40, 1, 0), 'packet': (17, 3, 0), 'raw_icmp': (2, 3, 1),
                    'netlink_uevent': (16, 3, 15), 'bluetooth': (31, 3, 0), 'key': (15, 3, 2)}
        result = {n: attempt(lambda a=a: socket.socket(*a).close()) for n, a in families.items()}
        """,
        _none_allowed,
    ),
    _Attack(
        "namespaces, mounts, ptrace, bpf, io_uring",
        """
        import platform
        calls = {'unshare_user': (272, 0x10000000), 'unshare_net': (272, 0x40000000),
                 'setns': (308, 0, 0), 'mount': (165, 0, 0, 0, 0, 0), 'chroot': (161, 0),
                 'pivot_root': (155, 0, 0), 'ptrace_attach': (101, 16, 1, 0, 0),
                 'bpf': (321, 0, 0, 0), 'io_uring_setup': (425, 0, 0), 'keyctl': (250, 0),
                 'perf_event_open': (298, 0, 0, 0, 0, 0), 'userfaultfd': (323, 0)}
        result = ({n: call(*a) for n, a in calls.items()} if platform.machine() == 'x86_64'
                  else {'skipped (not x86_64)': 'EPERM'})
        """,
        _all_eperm,
    ),
    _Attack(
        "privileges",
        """
        import subprocess
        capsh = ''
        if os.path.exists('/usr/sbin/capsh'):
            capsh = subprocess.run(['/usr/sbin/capsh', '--print'], capture_output=True,
                                   text=True, timeout=10).stdout
        result = {'setuid0': attempt(lambda: os.setuid(0)),
                  'setresgid0': attempt(lambda: os.setresgid(0, 0, 0)),
                  'setuid_binary': 'allowed' if 'euid=0(' in capsh else 'no root',
                  'uid': 'allowed' if os.getuid() == 0 else str(os.getuid())}
        """,
        _none_allowed,
    ),
    _Attack(
        "writes to the system and runtime",
        """
        import site
        def write(p):
            def go():
                with open(p, 'w') as f:
                    f.write('x')
            return attempt(go)
        result = {p: write(p) for p in ('/usr/evil', '/etc/passwd', '/opt/sandkernel/evil.py',
                                        site.getsitepackages()[0] + '/evil.pth', '/dev/evil',
                                        '/proc/sys/kernel/core_pattern', '/evil')}
        """,
        _none_allowed,
    ),
    _Attack(
        "filling the connection folder",
        """
        def fill():
            with open('/run/sandkernel/fill', 'wb') as f:
                for _ in range(256):
                    f.write(b'x' * (1 << 20)); f.flush()
        result = {'256 MiB into /run/sandkernel': attempt(fill)}
        os.remove('/run/sandkernel/fill')
        """,
        _none_allowed,
    ),
    _Attack(
        "fork bomb",
        """
        import subprocess, sys, time
        bomb = subprocess.Popen([sys.executable, '-c', 'import os\\nwhile True:\\n    try:\\n'
                                 '        os.fork()\\n    except OSError:\\n        pass'],
                                start_new_session=True)
        peak, end = 0, time.monotonic() + 2
        while time.monotonic() < end:
            peak = max(peak, len([p for p in os.listdir('/proc') if p.isdigit()]))
            time.sleep(0.05)
        os.killpg(bomb.pid, 9)
        bomb.wait()
        result = {'peak': peak}
        """,
        lambda r: (r["peak"] <= _pids_max(), f"{r['peak']} processes at most"),
        destructive=True,
    ),
    _Attack(
        "memory bomb",
        "hoard = []\nwhile True:\n    hoard.append(bytearray(32 << 20))",
        lambda r: (r == "oom", f"status {r}"),
        destructive=True,
    ),
)


def _pids_max() -> int:
    from sandkernel.policy import load_policy

    return load_policy("default").pids_max


async def _attack_all(python: str | None) -> list[AttackOutcome]:
    import secrets
    import socket

    from sandkernel.kernel import SandboxedKernel
    from sandkernel.policy import load_policy
    from sandkernel.sandbox import Runtime, SandboxHost

    policy = load_policy("default")
    canary = f"sandkernel-canary-{secrets.token_hex(8)}"
    # A secret in the engine's environment: no process of the sandbox may see it.
    os.environ["SANDKERNEL_ATTACK_CANARY"] = canary
    outcomes: list[AttackOutcome] = []
    try:
        with (
            SandboxHost(runtime=Runtime.detect(python)) as host,
            socket.socket() as listener,
        ):
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            values = {"port": listener.getsockname()[1], "canary": canary}
            shared = SandboxedKernel(host, policy)
            await shared.start()
            try:
                values["host_path"] = str(shared.workspace.parent / "connection.json")
                for attack in ATTACKS:
                    outcomes.append(await _one(host, policy, shared, attack, values))
            finally:
                await shared.shutdown()
    finally:
        os.environ.pop("SANDKERNEL_ATTACK_CANARY", None)
    return outcomes


async def _one(
    host: Any, policy: Any, shared: Any, attack: _Attack, values: dict[str, Any]
) -> AttackOutcome:
    from sandkernel.kernel import SandboxedKernel

    code = textwrap.dedent(attack.code)
    for key, value in values.items():
        code = code.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}", str(value))
    kernel = SandboxedKernel(host, policy) if attack.destructive else shared
    try:
        if attack.destructive:
            await kernel.start()
        if attack.name == "memory bomb":
            r = await kernel.execute(code, timeout_s=60)
            held, detail = attack.verdict(r.status)
        else:
            r = await kernel.execute(PRELUDE + code + "\nprint(json.dumps(result))", timeout_s=60)
            if r.status != "ok":
                return AttackOutcome(attack.name, False, f"could not run: {r.status} {r.error}")
            held, detail = attack.verdict(json.loads(r.stdout.strip().splitlines()[-1]))
    finally:
        if attack.destructive:
            await kernel.shutdown()
    return AttackOutcome(attack.name, held, detail)


def attack_outcomes(python: str | None = None) -> list[AttackOutcome]:
    """Run the quick attack subset in real sandboxes; what happened to each attack."""
    import asyncio

    return asyncio.run(_attack_all(python))


def print_attacks(outcomes: list[AttackOutcome]) -> None:
    """The human report: one line per attack, then ``N attacks tried, N held``."""
    held = sum(o.held for o in outcomes)
    print("sandkernel doctor --attack")
    for o in outcomes:
        print(f"  [{'held' if o.held else 'NOT HELD'}] {o.name:42} {o.detail}")
    print(f"\n{len(outcomes)} attacks tried, {held} held")


def attacks_json(outcomes: list[AttackOutcome]) -> dict[str, Any]:
    return {
        "attacks": [asdict(o) for o in outcomes],
        "tried": len(outcomes),
        "held": sum(o.held for o in outcomes),
    }
