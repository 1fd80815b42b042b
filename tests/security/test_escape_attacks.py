"""Escapes: reaching the host, the engine or another session from inside a sandbox.

Each test tries one way out and asserts it stayed shut. Most share one
kernel (``kernels.get()``); cross-session attacks use a second one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
from pathlib import Path

import psutil
import pytest

from sandkernel.sandbox import (
    IPYKERNEL_ENV,
    KERNEL_DIR_MB,
    sandbox_env,
    verify_cgroup_limits,
)
from tests.conftest import cell_under_way, runtime_root
from tests.security._support import (
    host_unix_socket,
    nothing_connects,
    run,
    run_json,
    swap_sockets_for_a_link,
)
from tests.security.conftest import EngineBox, KernelBox

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
REPO = Path(__file__).resolve().parents[2]


def _only_denials(result: dict[str, str]) -> list[str]:
    return [name for name, outcome in result.items() if outcome == "allowed"]


# --------------------------------------------------------------------------- host files


async def test_host_files_are_unreachable_through_proc_root_cwd_and_fds(
    kernels: KernelBox, host_secret: Path
) -> None:
    k = await kernels.get()
    targets = [
        str(host_secret),
        str(REPO / "pyproject.toml"),
        str(REPO / ".git"),
        "/etc/shadow",
        "/root/.bash_history",
        "/root/.ssh",
        "/home",
        "/var",
        "/sys",
        "/boot",
    ]
    result = await run_json(
        k,
        f"""
        targets = {targets!r}
        found = []
        for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self', 'thread-self']:
            for via in ('root', 'cwd'):
                base = f'/proc/{{pid}}/{{via}}'
                for t in targets:
                    if os.path.exists(base + t):
                        found.append(base + t)
            fds = f'/proc/{{pid}}/fd'
            for fd in os.listdir(fds) if os.access(fds, os.R_OK) else []:
                for t in targets:
                    if os.path.exists(f'/proc/{{pid}}/fd/{{fd}}/../..' + t):
                        found.append(f'/proc/{{pid}}/fd/{{fd}}' + t)
        result = {{'found': found, 'direct': [t for t in targets if os.path.exists(t)]}}
        """,
    )
    assert result == {"found": [], "direct": []}


async def test_inherited_descriptors_lead_nowhere_on_the_host(kernels: KernelBox) -> None:
    """No descriptor in the sandbox is a host directory, and the one host file
    it holds (its own output log) cannot grow past the kernel folder's tmpfs."""
    k = await kernels.get()
    result = await run_json(
        k,
        """
        import stat
        dirs, logs = [], []
        for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                fds = os.listdir(f'/proc/{pid}/fd')
            except OSError:
                continue
            for fd in fds:
                path = f'/proc/{pid}/fd/{fd}'
                try:
                    target, mode = os.readlink(path), os.stat(path).st_mode
                except OSError:
                    continue
                if stat.S_ISDIR(mode) and not os.path.isdir(target):
                    dirs.append(target)
                if target.endswith('/kernel.out') and pid == str(os.getpid()):
                    logs.append(int(fd))
        written = 0
        outcome = 'no log descriptor'
        if logs:
            chunk = b'x' * (1 << 20)
            try:
                for _ in range(64):
                    written += os.write(logs[0], chunk)
                outcome = 'allowed'
            except OSError as e:
                outcome = _name(e.errno)
        result = {'host_dirs': dirs, 'log_fill': outcome, 'written_mb': written >> 20}
        """,
    )
    assert result["host_dirs"] == []
    assert result["log_fill"] in ("ENOSPC", "EFBIG", "no log descriptor"), result
    assert result["written_mb"] <= KERNEL_DIR_MB


async def test_connection_dir_cannot_fill_the_host(kernels: KernelBox) -> None:
    """/run/sandkernel is writable (the kernel's sockets live there): it is a small tmpfs."""
    k = await kernels.get()
    result = await run_json(
        k,
        """
        def fill():
            with open('/run/sandkernel/fill', 'wb') as f:
                for _ in range(64):
                    f.write(b'x' * (1 << 20)); f.flush()
        def many():
            for i in range(100_000):
                open(f'/run/sandkernel/f{i}', 'w').close()
        result = {'bytes': attempt(fill), 'inodes': attempt(many)}
        for name in os.listdir('/run/sandkernel'):
            if name == 'fill' or name[1:].isdigit():
                os.remove('/run/sandkernel/' + name)
        """,
    )
    assert result == {"bytes": "ENOSPC", "inodes": "ENOSPC"}
    assert (await k.execute("1 + 1")).text == "2"


async def test_dev_is_read_only_and_holds_only_harmless_devices(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        result = {
            'listing': sorted(os.listdir('/dev')),
            'create': attempt(lambda: open('/dev/evil', 'w').close()),
            'mknod': attempt(lambda: os.mknod('/mnt/data/mem', 0o600 | 0o020000, os.makedev(1, 1))),
            'symlink': attempt(lambda: os.symlink('/proc/self/fd/1', '/dev/log')),
        }
        """,
    )
    assert set(result.pop("listing")) <= {"null", "zero", "full", "random", "urandom", "fd", "shm"}
    assert _only_denials(result) == [], result


async def test_proc_and_kernel_tunables_are_read_only(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        def write(path, data):
            return attempt(lambda: open(path, 'w').write(data))
        result = {
            'core_pattern': write('/proc/sys/kernel/core_pattern', '|/tmp/x'),
            'drop_caches': write('/proc/sys/vm/drop_caches', '3'),
            'sysrq': write('/proc/sysrq-trigger', 'b'),
            'ip_forward': write('/proc/sys/net/ipv4/ip_forward', '1'),
            'oom_score_adj': write('/proc/self/oom_score_adj', '-1000'),
            'kcore': attempt(lambda: open('/proc/kcore', 'rb').read(1)),
            'kmsg': attempt(lambda: open('/proc/kmsg', 'rb').read(1)),
            'sys': 'allowed' if os.path.exists('/sys') else 'absent',
            'cgroup_view': open('/proc/self/cgroup').read().split(':')[-1].strip(),
        }
        """,
    )
    assert result.pop("cgroup_view") == "/"  # its own cgroup namespace: no host path
    assert _only_denials(result) == [], result


# --------------------------------------------------------------------------- host processes and env


async def test_host_processes_cannot_be_signalled_or_opened(kernels: KernelBox) -> None:
    k = await kernels.get()
    victim = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        result = await run_json(
            k,
            f"""
            result = {{}}
            for label, pid in (('victim', {victim.pid}), ('engine', {os.getpid()}), ('init', 1)):
                kill = attempt(lambda: os.kill(pid, 9)) if pid != 1 else 'skipped'
                result[label + '_kill'] = kill
                result[label + '_pidfd'] = call(434, pid, 0)
            try:  # a small pid may exist in the sandbox too: it must not be the engine
                result['engine_proc'] = open('/proc/{os.getpid()}/cmdline', 'rb').read().decode()
            except OSError:
                result['engine_proc'] = ''
            """,
        )
        assert victim.returncode is None, "a host process was killed from the sandbox"
    finally:
        victim.kill()
        await victim.wait()
    # The sandbox's own pid 1 may be opened (it is in the sandbox); host pids do not exist.
    result.pop("init_pidfd")
    assert result["victim_kill"] in ("ESRCH", "EPERM")
    assert result["engine_kill"] in ("ESRCH", "EPERM")
    assert result["victim_pidfd"] in ("ESRCH", "EPERM") and result["engine_pidfd"] != "allowed"
    assert "pytest" not in result["engine_proc"]


async def test_host_environment_is_in_no_process_of_the_sandbox(
    kernels: KernelBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"canary-{secrets.token_hex(8)}"
    monkeypatch.setenv("SANDKERNEL_TEST_CANARY", canary)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    k = await kernels.fresh()
    result = await run_json(
        k,
        """
        environs = {}
        for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                environs[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace')
            except OSError:
                pass
        result = environs
        """,
    )
    assert canary not in json.dumps(result)
    allowed = {e.split("=", 1)[0] for e in sandbox_env(k.policy, k.host.runtime)}
    allowed |= IPYKERNEL_ENV
    for text in result.values():
        keys = {item.split("=", 1)[0] for item in text.split("\0") if item}
        assert keys <= allowed, keys - allowed
    await k.shutdown()


# ------------------------------------------------------------------ the engine and other sessions


async def test_daemon_socket_and_host_unix_sockets_are_unreachable(kernels: KernelBox) -> None:
    k = await kernels.get()
    runtime_root().mkdir(parents=True, exist_ok=True)
    path = runtime_root() / f"daemon-{secrets.token_hex(4)}.sock"
    abstract = f"\0sandkernel-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX) as by_path, socket.socket(socket.AF_UNIX) as by_name:
        by_path.bind(str(path))
        by_name.bind(abstract)
        for s in (by_path, by_name):
            s.listen()
            s.setblocking(False)
        try:
            result = await run_json(
                k,
                f"""
                def connect(address):
                    def go():
                        with socket.socket(socket.AF_UNIX) as s:
                            s.settimeout(2)
                            s.connect(address)
                    return attempt(go)
                result = {{
                    'daemon_default': connect('/run/sandkernel/daemon.sock'),
                    'host_path': connect({str(path)!r}),
                    'abstract': connect({abstract!r}),
                }}
                """,
            )
            for s in (by_path, by_name):
                with pytest.raises(BlockingIOError):
                    s.accept()
        finally:
            path.unlink()
    assert _only_denials(result) == [], result


async def test_another_sessions_workspace_is_unreachable(kernels: KernelBox) -> None:
    k = await kernels.get()
    other = await kernels.get("neighbour")
    marker = f"neighbour-secret-{secrets.token_hex(6)}"
    r = await other.execute(f"open('/mnt/data/{marker}.txt', 'w').write({marker!r})")
    assert r.status == "ok"
    result = await run_json(
        k,
        f"""
        found = []
        for place in ('/mnt', '/run', '/tmp', '/dev/shm', '/opt', '/proc/1/root/mnt'):
            for root, dirs, files in os.walk(place):
                found += [os.path.join(root, f) for f in files if {marker!r} in f]
        direct = [p for p in ({str(other.workspace)!r}, {str(other.workspace.parent)!r})
                  if os.path.exists(p)]
        result = {{'found': found, 'direct': direct}}
        """,
    )
    assert result == {"found": [], "direct": []}


async def test_other_kernels_connection_files_keys_and_sockets_are_unreachable(
    kernels: KernelBox,
) -> None:
    k = await kernels.get()
    other = await kernels.get("neighbour")
    assert other._km is not None
    key = other._km.session.key.decode()
    conn = other.workspace.parent / "conn"
    host_paths = [str(other.workspace.parent / "connection.json"), str(conn / "kernel.json")]
    sockets = [str(p) for p in conn.iterdir() if p.is_socket()]
    assert sockets, "the neighbour's ipc sockets were not found on the host"
    result = await run_json(
        k,
        f"""
        def grep(places, needle):
            hits = []
            for place in places:
                for root, dirs, files in os.walk(place):
                    for f in files:
                        try:
                            if needle in open(os.path.join(root, f), 'rb').read(1 << 20):
                                hits.append(os.path.join(root, f))
                        except OSError:
                            pass
            return hits
        def connect(address):
            def go():
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(address)
            return attempt(go)
        own = json.load(open('/run/sandkernel/kernel.json'))
        result = {{
            'read': {{p: attempt(lambda: open(p).read()) for p in {host_paths!r}}},
            'sockets': {{p: connect(p) for p in {sockets!r}}},
            'grep': grep(['/run', '/tmp', '/dev/shm', '/mnt/data', '/opt'], {key!r}.encode()),
            'own_key_differs': own['key'] != {key!r},
        }}
        """,
    )
    assert _only_denials(result["read"]) == [] and _only_denials(result["sockets"]) == []
    assert result["grep"] == [] and result["own_key_differs"]


async def test_a_kernel_socket_swapped_for_a_host_link_is_never_reconnected_through(
    kernels: KernelBox,
) -> None:
    """zmq reconnects by name: the engine must reach the kernel's sockets as first bound.

    The kernel renames its sockets, links a host socket in their place and
    drops the engine's connections to its control socket, so that the
    engine (root, in the host's mounts) reconnects to whatever the names
    now point to.
    """
    k = await kernels.fresh()
    with host_unix_socket() as (path, host_socket):
        swap = await run(k, swap_sockets_for_a_link(path))
        assert swap.status == "ok", swap
        dropped = int(swap.stdout)
        assert dropped >= 1, "no connection of the engine's to the control socket found"
        await nothing_connects(host_socket)
        # The engine's interrupt (sent on the control channel) still reaches the kernel.
        cell = await cell_under_way(k, "print('started', flush=True)\nimport time\ntime.sleep(30)")
        await k.interrupt()
        interrupted = await asyncio.wait_for(cell, 20)
        assert interrupted.error is not None and interrupted.error.name == "KeyboardInterrupt"
        with pytest.raises(BlockingIOError):
            host_socket.accept()
    assert (await k.execute("1 + 1")).text == "2"


async def test_sysv_ipc_and_abstract_sockets_are_private_to_each_kernel(
    kernels: KernelBox,
) -> None:
    k = await kernels.get()
    other = await kernels.get("neighbour")
    name = f"sk-chat-{secrets.token_hex(4)}"
    setup = await run_json(
        k,
        f"""
        IPC_CREAT, IPC_RMID = 0o1000, 0
        shm = _libc.shmget(0x5EED, 4096, IPC_CREAT | 0o666)
        msg = _libc.msgget(0x5EED, IPC_CREAT | 0o666)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind('\\0{name}')
        listener.listen()
        result = {{'shm': shm >= 0, 'msg': msg >= 0}}
        """,
    )
    assert setup == {"shm": True, "msg": True}
    try:
        result = await run_json(
            other,
            f"""
            def connect():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect('\\0{name}')
            result = {{
                'shm': 'allowed' if _libc.shmget(0x5EED, 0, 0) >= 0 else _name(ctypes.get_errno()),
                'msg': 'allowed' if _libc.msgget(0x5EED, 0) >= 0 else _name(ctypes.get_errno()),
                'abstract': attempt(connect),
            }}
            """,
        )
    finally:
        await k.execute("_libc.shmctl(shm, IPC_RMID, None); _libc.msgctl(msg, IPC_RMID, None)")
        await k.execute("listener.close()")
    assert _only_denials(result) == [], result


async def test_writes_do_not_persist_into_the_next_session(engines: EngineBox) -> None:
    engine = await engines.get()
    first = await engine.session()
    planted = await run_json(
        first,
        """
        import site, sys
        startup = '/tmp/.ipython/profile_default/startup'
        os.makedirs(startup, exist_ok=True)
        os.makedirs('/tmp/.config/matplotlib', exist_ok=True)
        def plant(path, text='EVIL = True\\n'):
            def go():
                with open(path, 'w') as f:
                    f.write(text)
            return attempt(go)
        result = {
            'ipython_startup': plant(startup + '/00-evil.py'),
            'sitecustomize': plant('/tmp/sitecustomize.py'),
            'matplotlibrc': plant('/tmp/.config/matplotlib/matplotlibrc', 'backend: agg\\n'),
            'shm': plant('/dev/shm/evil'),
            'workspace': plant('/mnt/data/evil.py'),
            'conn': plant('/run/sandkernel/evil'),
            'site_packages': plant(site.getsitepackages()[0] + '/evil.pth', 'import os\\n'),
            'stdlib': plant(os.path.dirname(os.__file__) + '/evil.py'),
            'runtime': plant('/opt/sandkernel/evil.py'),
            'usr': plant('/usr/lib/evil.py'),
        }
        """,
    )
    # Its own tmpfs places take the files; the shared runtime does not.
    assert planted["ipython_startup"] == "allowed" and planted["workspace"] == "allowed"
    for shared in ("site_packages", "stdlib", "runtime", "usr"):
        assert planted[shared] == "EROFS", planted
    await first.close()
    second = await engine.session()
    result = await run_json(
        second,
        """
        import sys
        paths = ['/tmp/.ipython/profile_default/startup/00-evil.py', '/tmp/sitecustomize.py',
                 '/tmp/.config/matplotlib/matplotlibrc', '/dev/shm/evil', '/mnt/data/evil.py',
                 '/run/sandkernel/evil']
        result = {
            'present': [p for p in paths if os.path.exists(p)],
            'evil_ran': 'EVIL' in globals() or 'sitecustomize' in sys.modules,
        }
        """,
    )
    await second.close()
    assert result == {"present": [], "evil_ran": False}


# ------------------------------------------------------------------ privileges and system calls


async def test_ptrace_and_cross_process_memory_calls_are_denied(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        buf = ctypes.create_string_buffer(16)
        class iovec(ctypes.Structure):
            _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
        local = iovec(ctypes.addressof(buf), 16)
        remote = iovec(0x400000, 16)
        result = {
            'traceme': call(101, 0, 0, 0, 0),
            'attach_init': call(101, 16, 1, 0, 0),
            'seize_init': call(101, 0x4206, 1, 0, 0),
            'vm_readv': call(310, 1, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0),
            'vm_writev': call(311, 1, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0),
            'kcmp': call(312, 1, os.getpid(), 0, 0, 0),
            'pidfd_getfd': call(438, 0, 0, 0),
        }
        """,
    )
    pidfd_getfd = result.pop("pidfd_getfd")
    assert pidfd_getfd != "allowed"
    assert result == dict.fromkeys(result, "EPERM")


async def test_namespace_creation_and_joining_are_denied(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        flags = {'user': 0x10000000, 'net': 0x40000000, 'mnt': 0x00020000, 'pid': 0x20000000,
                 'ipc': 0x08000000, 'uts': 0x04000000, 'cgroup': 0x02000000, 'time': 0x00000080}
        result = {f'unshare_{n}': call(272, f) for n, f in flags.items()}
        result.update({f'clone_{n}': call(56, f | 17, 0, 0, 0, 0) for n, f in flags.items()
                       if n != 'time'})
        for ns in ('net', 'mnt', 'pid', 'user'):
            fd = os.open(f'/proc/1/ns/{ns}', os.O_RDONLY)
            result[f'setns_{ns}'] = call(308, fd, 0)
            os.close(fd)
        result['clone3'] = call(435, 0, 0)
        """,
    )
    assert result.pop("clone3") == "ENOSYS"  # libc falls back to clone(), checked above
    assert result == dict.fromkeys(result, "EPERM")


async def test_mount_and_root_changing_calls_are_denied(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        result = {
            'mount': attempt(lambda: _libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0
                             or (_ for _ in ()).throw(OSError(ctypes.get_errno(), ''))),
            'umount2': call(166, 0, 0), 'pivot_root': call(155, 0, 0), 'chroot': call(161, 0),
            'open_tree': call(428, -100, 0, 0), 'move_mount': call(429, -100, 0, -100, 0, 0),
            'fsopen': call(430, 0, 0), 'fsconfig': call(431, 0, 0, 0, 0, 0),
            'fsmount': call(432, 0, 0, 0), 'fspick': call(433, -100, 0, 0),
            'mount_setattr': call(442, -100, 0, 0, 0, 0),
        }
        """,
    )
    assert result == dict.fromkeys(result, "EPERM")


async def test_kernel_facing_interfaces_are_denied(kernels: KernelBox) -> None:
    """BPF, keyrings, io_uring, perf, userfaultfd, modules, kexec, handles, clocks..."""
    k = await kernels.get()
    result = await run_json(
        k,
        """
        import platform
        calls = {'bpf': 321, 'keyctl': 250, 'add_key': 248, 'request_key': 249,
                 'io_uring_setup': 425, 'io_uring_enter': 426, 'io_uring_register': 427,
                 'perf_event_open': 298, 'userfaultfd': 323, 'init_module': 175,
                 'finit_module': 313, 'delete_module': 176, 'kexec_load': 246,
                 'kexec_file_load': 320, 'open_by_handle_at': 304, 'name_to_handle_at': 303,
                 'syslog': 103, 'reboot': 169, 'swapon': 167, 'swapoff': 168, 'acct': 163,
                 'quotactl': 179, 'vhangup': 153, 'iopl': 172, 'ioperm': 173,
                 'settimeofday': 164, 'clock_settime': 227, 'adjtimex': 159,
                 'fanotify_init': 300}
        result = {'arch': platform.machine()}
        if result['arch'] == 'x86_64':
            result.update({name: call(nr, 0, 0, 0, 0, 0) for name, nr in calls.items()})
        """,
    )
    if result.pop("arch") != "x86_64":
        pytest.skip("system call numbers are x86_64's")
    assert result == dict.fromkeys(result, "EPERM")


async def test_privilege_changes_are_refused(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        PR_SET_NO_NEW_PRIVS = 38
        class cap_header(ctypes.Structure):
            _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]
        class cap_data(ctypes.Structure):
            _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32),
                        ('inheritable', ctypes.c_uint32)]
        header = cap_header(0x20080522, 0)
        data = (cap_data * 2)(cap_data(1 << 21, 1 << 21, 0), cap_data(0, 0, 0))
        open('/mnt/data/mine', 'w').close()
        result = {
            'setuid0': attempt(lambda: os.setuid(0)),
            'setgid0': attempt(lambda: os.setgid(0)),
            'setresuid0': attempt(lambda: os.setresuid(0, 0, 0)),
            'setgroups0': attempt(lambda: os.setgroups([0])),
            'capset_sys_admin': call(126, ctypes.addressof(header), ctypes.addressof(data)),
            'clear_no_new_privs': call(157, PR_SET_NO_NEW_PRIVS, 0, 0, 0, 0),
            'chown_to_root': attempt(lambda: os.chown('/mnt/data/mine', 0, 0)),
            'sethostname': call(170, 0, 0),
            'nice_minus_20': attempt(lambda: os.setpriority(os.PRIO_PROCESS, 0, -20)),
            'uid_now': os.getuid(), 'euid_now': os.geteuid(),
        }
        os.remove('/mnt/data/mine')
        """,
    )
    assert (result.pop("uid_now"), result.pop("euid_now")) == (65534, 65534)
    assert _only_denials(result) == [], result


async def test_setuid_and_file_capability_binaries_grant_nothing(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        import stat, subprocess
        setuid = []
        for d in ('/usr/bin', '/usr/sbin', '/usr/lib', '/usr/libexec'):
            for root, dirs, files in os.walk(d):
                for f in files:
                    p = os.path.join(root, f)
                    try:
                        if os.lstat(p).st_mode & stat.S_ISUID:
                            setuid.append(p)
                    except OSError:
                        pass
        def run(*argv):
            try:
                return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                      stdin=subprocess.DEVNULL).stdout
            except (OSError, subprocess.SubprocessError) as e:
                return type(e).__name__
        os.makedirs('/tmp/target', exist_ok=True)
        result = {
            'setuid_found': setuid,
            'capsh': run('/usr/sbin/capsh', '--print') if '/usr/sbin/capsh' in setuid else '',
            'mount': run('/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp/target'),
            'mounted': os.path.ismount('/tmp/target'),
            'su': run('/usr/bin/su', '-c', 'id -u', 'root'),
        }
        """,
    )
    assert not result["mounted"]
    assert result["su"].strip() != "0"
    if result["capsh"]:
        # A setuid-root capsh reports euid=0 if the bit was honoured.
        assert "euid=65534" in result["capsh"] and "euid=0(" not in result["capsh"]


async def test_limits_cannot_be_raised_from_inside(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fsoft, fhard = resource.getrlimit(resource.RLIMIT_FSIZE)
        more = (hard + 1, hard + 1)
        result = {
            'nofile': attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, more)),
            'fsize': attempt(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (-1, -1))),
            'prlimit_init': attempt(lambda: resource.prlimit(1, resource.RLIMIT_NOFILE, more)),
            'cgroupfs': attempt(lambda: _libc.mount(b'cgroup', b'/tmp', b'cgroup2', 0, None) == 0
                                or (_ for _ in ()).throw(OSError(ctypes.get_errno(), ''))),
        }
        """,
    )
    assert _only_denials(result) == [], result
    assert verify_cgroup_limits(k.cgroup, k.policy) == []


# --------------------------------------------------------------------------- network


async def test_raw_packet_and_ping_sockets_are_refused(kernels: KernelBox) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        result = {
            'packet': attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
            'raw_icmp': attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)),
            'raw_tcp': attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 6)),
            'raw6': attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, 58)),
            'ping': attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 1)),
        }
        """,
    )
    assert _only_denials(result) == [], result


async def test_socket_families_outside_the_network_namespace_are_refused(
    kernels: KernelBox,
) -> None:
    """AF_VSOCK reaches the hypervisor's host from any namespace; others are attack surface."""
    k = await kernels.get()
    result = await run_json(
        k,
        """
        families = {'vsock': (40, 1, 0), 'alg': (38, 5, 0), 'key': (15, 3, 2),
                    'bluetooth': (31, 3, 0), 'can': (29, 3, 1), 'tipc': (30, 5, 0),
                    'rds': (21, 5, 0), 'xdp': (44, 3, 0), 'llc': (26, 2, 0),
                    'pppox': (24, 1, 0), 'x25': (9, 5, 0), 'appletalk': (5, 2, 0),
                    'ax25': (3, 5, 0), 'nfc': (39, 5, 0), 'smc': (43, 1, 0),
                    'mctp': (45, 2, 0), 'qipcrtr': (42, 2, 0), 'rxrpc': (33, 2, 2),
                    'netlink_uevent': (16, 3, 15), 'netlink_audit': (16, 3, 9),
                    'netlink_netfilter': (16, 3, 12), 'netlink_generic': (16, 3, 16)}
        result = {name: attempt(lambda a=a: socket.socket(*a).close())
                  for name, a in families.items()}
        """,
    )
    assert _only_denials(result) == [], result


async def test_network_namespace_has_only_loopback_and_cannot_be_reconfigured(
    kernels: KernelBox,
) -> None:
    k = await kernels.get()
    result = await run_json(
        k,
        """
        import fcntl, struct
        SIOCSIFFLAGS, SIOCADDRT = 0x8914, 0x890B
        def down_lo():
            with socket.socket() as s:
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack('16sH14x', b'lo', 0))
        def add_route():
            with socket.socket() as s:
                fcntl.ioctl(s, SIOCADDRT, b'\\0' * 120)
        result = {
            'interfaces': [name for _, name in socket.if_nameindex()],
            'lo_down': attempt(down_lo), 'add_route': attempt(add_route),
        }
        """,
    )
    assert result.pop("interfaces") == ["lo"]
    assert _only_denials(result) == [], result


async def test_egress_over_ipv4_ipv6_udp_dns_and_host_addresses_fails(
    kernels: KernelBox,
) -> None:
    k = await kernels.get()
    host_ips = sorted(
        {
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        }
    )
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        result = await run_json(
            k,
            f"""
            def tcp(addr, family=socket.AF_INET):
                def go():
                    with socket.socket(family) as s:
                        s.settimeout(2)
                        s.connect(addr)
                return attempt(go)
            def udp_dns():
                query = (b'\\x12\\x34\\x01\\x00\\x00\\x01' + b'\\0' * 6
                         + b'\\x07example\\x03com\\0\\0\\x01\\0\\x01')
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(2)
                    s.sendto(query, ('8.8.8.8', 53))
                    s.recvfrom(512)
            result = {{
                'tcp4': tcp(('1.1.1.1', 443)),
                'tcp6': tcp(('2606:4700:4700::1111', 443), socket.AF_INET6),
                'udp_dns': attempt(udp_dns),
                'resolve': attempt(lambda: socket.getaddrinfo('example.com', 443)),
            }}
            for ip in {host_ips!r}:
                result['host_' + ip] = tcp((ip, {port}))
            """,
        )
        with pytest.raises(BlockingIOError):
            server.accept()
    assert _only_denials(result) == [], result


async def test_host_loopback_tcp_and_udp_services_are_unreachable(kernels: KernelBox) -> None:
    k = await kernels.get()
    with (
        socket.socket() as tcp4,
        socket.socket(socket.AF_INET6) as tcp6,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        tcp4.bind(("127.0.0.1", 0))
        tcp6.bind(("::1", 0))
        udp.bind(("127.0.0.1", 0))
        for s in (tcp4, tcp6):
            s.listen()
        for s in (tcp4, tcp6, udp):
            s.setblocking(False)
        result = await run_json(
            k,
            f"""
            def tcp(addr, family):
                def go():
                    with socket.socket(family) as s:
                        s.settimeout(2)
                        s.connect(addr)
                return attempt(go)
            def udp_send():
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b'hello host', ('127.0.0.1', {udp.getsockname()[1]}))
            result = {{
                'tcp4': tcp(('127.0.0.1', {tcp4.getsockname()[1]}), socket.AF_INET),
                'tcp6': tcp(('::1', {tcp6.getsockname()[1]}), socket.AF_INET6),
                'udp_sent': attempt(udp_send),
            }}
            """,
        )
        for s in (tcp4, tcp6):
            with pytest.raises(BlockingIOError):
                s.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(64)  # the datagram went to the sandbox's own loopback
    result.pop("udp_sent")
    assert _only_denials(result) == [], result


# --------------------------------------------------------------------------- killing from inside


async def test_kill_of_every_process_inside_stays_inside(engines: EngineBox) -> None:
    """kill(-1, SIGKILL) reaches every process the caller may signal: only the sandbox's."""
    engine = await engines.get()
    bystander = await engine.session()
    victim = await asyncio.create_subprocess_exec(
        "sleep", "60", user=65534, group=65534, extra_groups=[]
    )
    try:
        attacker = await engine.session()
        r = await run(
            attacker,
            "import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import os; os.kill(-1, 9)'])\n"
            "time.sleep(30)",
        )
        assert r.status in ("killed", "dead") and not r.kernel_alive, r
        assert victim.returncode is None, "a host process of the same uid was killed"
        assert (await bystander.run("1 + 1")).text == "2"
        await attacker.close()
    finally:
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        await bystander.close()
