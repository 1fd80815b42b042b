"""Kernels forked from a zygote: each in its own sandbox, sharing nothing they should not."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandkernel._resources import data_dir
from sandkernel.config import DEFAULT_PREWARM
from sandkernel.errors import KernelStartFailed
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import Policy, load_policy, shipped_policy_names
from sandkernel.sandbox import SandboxHost
from sandkernel.sandbox import zygote as zygote_module
from sandkernel.sandbox.confinement import (
    compare_confinement,
    confinement,
    descriptors_naming,
    nspid,
)
from sandkernel.sandbox.layout import RUNTIME_IN_JAIL
from sandkernel.sandbox.layout import WORKSPACE_IN_JAIL as WORKSPACE
from sandkernel.sandbox.zygote import (
    PERL,
    STUB_ARGS,
    Zygote,
    ZygoteFailed,
    ZygoteSupervisor,
    fork_refused,
    stub_command,
)
from tests.conftest import KernelFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture(params=["perl", "python"])
async def zygote(host: SandboxHost, request: pytest.FixtureRequest) -> AsyncIterator[Zygote]:
    """A zygote with numpy imported, as the default prewarm has, with each sandbox init."""
    z = Zygote(host, load_policy(None), ("numpy",))
    z.stub = stub_command(host.runtime.python)
    if request.param == "python":
        z.stub = [host.runtime.python, *STUB_ARGS]
    elif z.stub[0] != PERL:
        pytest.skip(f"no {PERL}: every sandbox's init is the Python stub")
    await z.start()
    try:
        yield z
    finally:
        await z.close()


async def _forked(kernel_factory: KernelFactory, zygote: Zygote) -> SandboxedKernel:
    kernel: SandboxedKernel = await kernel_factory(zygote=zygote)
    assert kernel.forked_pid is not None
    return kernel


async def _json(kernel: SandboxedKernel, code: str) -> object:
    r = await kernel.execute(code)
    assert r.status == "ok", r
    return json.loads(r.stdout.strip().splitlines()[-1])


async def test_a_forked_kernel_runs_cells_and_passes_the_self_check(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    kernel = await _forked(kernel_factory, zygote)
    report = await kernel.self_check()
    assert report["uid"] == 65534 and report["seccomp"] == "2"
    r = await kernel.execute("import numpy\nx = numpy.arange(4)\nint(x.sum())")
    assert r.status == "ok" and r.text == "6"
    assert zygote.info["threads"] == 1 and "numpy" in zygote.info["imported"]
    # Started as root with HOME=/tmp: no user site folder (anyone's .pth) was read.
    assert zygote.info["user_site"] is False
    # The zygote holds nothing but stdio and its channel to the engine: no thread
    # (checked by itself before each fork), no other socket, no file.
    assert zygote.pid is not None
    assert len(os.listdir(f"/proc/{zygote.pid}/task")) == 1
    extra = _fd_targets(zygote.pid, above=2)
    assert len(extra) == 1 and extra.pop().startswith("socket:"), extra
    # It gave its child the sandbox's PID namespace, and its next children its own again.
    ns = f"/proc/{zygote.pid}/ns"
    assert os.readlink(f"{ns}/pid_for_children") == os.readlink(f"{ns}/pid")
    assert os.readlink(f"{ns}/pid") == os.readlink("/proc/self/ns/pid")


async def test_the_outside_check_tells_a_process_confined_otherwise(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    kernel = await _forked(kernel_factory, zygote)
    assert kernel.forked_pid is not None
    sandboxed = confinement(kernel.forked_pid)
    # The engine itself (root, the host's namespaces) differs in every respect.
    problems = compare_confinement(confinement(os.getpid()), sandboxed)
    for what in ("mnt namespace", "pid namespace", "CapEff", "Uid", "NoNewPrivs", "cgroups"):
        assert any(what in p for p in problems), (what, problems)
    reniced = dataclasses.replace(sandboxed, nice=sandboxed.nice + 5)
    assert compare_confinement(reniced, sandboxed) == [
        f"its nice value is {sandboxed.nice + 5}, the sandbox's is {sandboxed.nice}"
    ]


async def test_two_forked_kernels_see_neither_processes_files_nor_memory(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    a = await _forked(kernel_factory, zygote)
    b = await _forked(kernel_factory, zygote)
    setup = (
        "import os, json\n"
        "secret = 'SECRET-' + os.urandom(8).hex()\n"
        "for d in ('/tmp', '/mnt/data', '/dev/shm'):\n"
        "    open(f'{d}/mine', 'w').write(secret)\n"
        "print(json.dumps(secret))"
    )
    secret_a = await _json(a, setup)
    seen = await _json(
        b,
        "import os, json\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "cmds = [open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace') for p in pids]\n"
        "files = {d: os.path.exists(f'{d}/mine') for d in ('/tmp', '/mnt/data', '/dev/shm')}\n"
        "shared = [l for l in open('/proc/self/maps') if l.split()[1][1:] == 'w-s']\n"
        "print(json.dumps({'pids': sorted(map(int, pids)), 'files': files, 'shared': shared,"
        " 'cmds': cmds}))",
    )
    assert isinstance(seen, dict) and isinstance(secret_a, str)
    assert not any(seen["files"].values()), seen["files"]
    # Its own init (the stub) and itself, nothing of the other kernel or the host.
    assert seen["pids"] == [1, 3], seen
    assert not any(secret_a in c for c in seen["cmds"])
    assert seen["shared"] == [], "a writable shared mapping survived the fork"
    assert a.forked_pid is not None
    peek = await b.execute(
        f"open('/proc/{a.forked_pid}/mem', 'rb')", timeout_s=10
    )  # the other kernel's host pid means nothing here
    assert peek.status == "error" and peek.error is not None
    assert peek.error.name in ("FileNotFoundError", "PermissionError")


async def test_the_zygotes_objects_are_immortal_and_a_kernels_own_are_freed(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    if sys.version_info[:2] not in ((3, 12), (3, 13)):
        pytest.skip("immortal objects are made on CPython 3.12 and 3.13 only")
    assert zygote.info["immortal"] > 50_000, zygote.info["immortal"]
    kernel = await _forked(kernel_factory, zygote)
    seen = await _json(
        kernel,
        "import gc, json, sys, weakref, numpy\n"
        "class Mine: pass\n"
        "mine = Mine(); gone = []; ref = weakref.ref(mine, gone.append)\n"
        "before = sys.getrefcount(numpy.arange)\n"
        "held = [numpy.arange] * 1000\n"
        "after = sys.getrefcount(numpy.arange)\n"
        "del mine, held; gc.collect()\n"
        "print(json.dumps({'shared': [before, after], 'freed': ref() is None and len(gone) == 1,"
        " 'sum': int(numpy.arange(10).sum())}))",
    )
    # A reference to the zygote's function does not write its count (its page
    # stays shared); the kernel's own objects live and die as usual.
    assert seen == {"shared": [0xFFFFFFFF, 0xFFFFFFFF], "freed": True, "sum": 45}, seen


def _huge_pages_unsupported() -> str | None:
    """Why ``MADV_COLLAPSE`` cannot work here, or None."""
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "no transparent huge pages in this kernel"
    if "[never]" in enabled:
        return "transparent huge pages are off ([never])"
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (6, 1):
        return f"MADV_COLLAPSE needs Linux 6.1, this is {os.uname().release}"
    return None


_COLLAPSE_PROBE = """
import ctypes, json, mmap, sys
sys.path.insert(0, sys.argv[1])
import hugepages
full = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 8 << 20, mmap.PAGESIZE):
    full[i] = 1
at = ctypes.addressof(ctypes.c_char.from_buffer(full))
def stat():
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        start, _, end = line.partition(" ")[0].partition("-")
        if end and int(start, 16) <= at < int(end, 16):
            fields = dict(l.split(":", 1) for l in lines[i + 1 : i + 25] if ":" in l)
            return {k: int(fields[k].split()[0]) for k in ("Rss", "AnonHugePages")}
moved = hugepages.collapse()
print(json.dumps({"moved": moved, "full": stat(), "content": full[0] + full[(8 << 20) - 4096]}))
"""


_EXTENSIONS_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import launch
from IPython.core.extensions import ExtensionManager
from IPython.core.interactiveshell import InteractiveShell
app = launch.prepare_kernel_app()
assert InteractiveShell.initialized(), "the zygote made no shell"
shell = InteractiveShell.instance()
before_fork = sorted(shell.extension_manager.loaded)
looked_for = []
def load_extension(self, name):
    looked_for.append(name)
ExtensionManager.load_extension = load_extension
app.shell = shell  # as IPKernelApp.init_shell sets it in the forked kernel
app.init_extensions()
print(json.dumps({"before_fork": before_fork, "looked_for": looked_for}))
"""


def test_a_kernels_extensions_are_loaded_before_the_fork_and_not_looked_for_again(
    tmp_path: Path,
) -> None:
    """IPython's default extension is searched for on the whole path before it is found."""
    runtime = data_dir("kernels") / "runtime"
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    out = subprocess.run(
        [sys.executable, "-c", _EXTENSIONS_PROBE, str(runtime)],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )  # fmt: skip
    seen = json.loads(out.stdout)
    assert seen["before_fork"] == ["IPython.extensions.storemagic"], seen
    assert seen["looked_for"] == [], seen


def test_collapse_moves_a_filled_range_to_huge_pages() -> None:
    why = _huge_pages_unsupported()
    if why:
        pytest.skip(why)
    runtime = data_dir("kernels") / "runtime"
    out = subprocess.run(
        [sys.executable, "-c", _COLLAPSE_PROBE, str(runtime)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    seen = json.loads(out.stdout)
    # An 8 MiB mapping holds three aligned 2 MiB ranges at least; its contents stay.
    assert seen["full"]["AnonHugePages"] >= 6 * 1024, seen
    assert seen["moved"] >= 6, seen
    assert seen["content"] == 2, seen


def test_a_range_is_collapsed_only_when_at_least_half_resident() -> None:
    sys.path.insert(0, str(data_dir("kernels") / "runtime"))
    try:
        import hugepages  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
        sys.modules.pop("hugepages", None)
    # Collapsing a sparse range would make its holes resident.
    assert not hugepages.worth_collapsing(b"\x01" * 16 + b"\x00" * 496)
    assert not hugepages.worth_collapsing(b"\x01" * 255 + b"\x00" * 257)
    assert hugepages.worth_collapsing(b"\x01" * 256 + b"\x00" * 256)
    # Only bit 0 of mincore's bytes says "resident".
    assert not hugepages.worth_collapsing(b"\xfe" * 512)


def _anon_huge_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no AnonHugePages in /proc/{pid}/smaps_rollup")


async def test_the_zygotes_memory_is_on_huge_pages_and_a_kernel_copies_only_what_it_writes(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    why = _huge_pages_unsupported()
    if why:
        pytest.skip(why)
    assert zygote.info["huge_pages_mib"] >= 4, zygote.info
    assert zygote.pid is not None
    assert _anon_huge_kib(zygote.pid) >= 2048
    kernel = await _forked(kernel_factory, zygote)
    # A kernel that writes splits its own mapping of a huge page and copies
    # 4 KiB of it, as before: its private memory does not grow by 2 MiB a write.
    seen = await _json(
        kernel,
        "import json, numpy\n"
        "numpy.random.seed(1); x = [str(i) for i in range(20000)]\n"
        "f = dict(l.split(':', 1) for l in open('/proc/self/smaps_rollup') if ':' in l)\n"
        "print(json.dumps({k: int(f[k].split()[0]) for k in ('Private_Dirty', 'Rss')}))",
    )
    assert isinstance(seen, dict)
    assert seen["Private_Dirty"] < 16 * 1024, seen


async def test_a_forked_kernels_shell_is_its_own_with_in_and_out(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    kernel = await _forked(kernel_factory, zygote)
    first = await kernel.execute("6 * 7")
    assert first.status == "ok" and first.text == "42", first
    seen = await kernel.execute(
        "shell = get_ipython()\n"
        "(Out[1], In[1], _, shell.kernel is shell.parent, shell.kernel.shell is shell,"
        " shell.displayhook.session is shell.kernel.session, shell.history_manager.enabled,"
        " str(_dh[0]), shell.starting_dir)"
    )
    # The shell made before the fork belongs to this kernel: its session (and
    # so its key), its numbering from 1, In/Out kept without a history
    # database, and its start in the kernel's workspace (not the zygote's /).
    expected = f"(42, '6 * 7', 42, True, True, True, False, '{WORKSPACE}', '{WORKSPACE}')"
    assert seen.status == "ok" and seen.text == expected, seen


async def test_forked_kernels_draw_different_random_numbers(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    code = "import json, random, numpy\nprint(json.dumps([random.random(), numpy.random.random()]))"
    draws = [await _json(await _forked(kernel_factory, zygote), code) for _ in range(3)]
    assert len({d[0] for d in draws}) == 3, draws  # type: ignore[index]
    assert len({d[1] for d in draws}) == 3, draws  # type: ignore[index]


def _private_memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``pid``'s private writable memory, where its Python objects are, holds ``needle``."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if fields[1] != "rw-p" or (len(fields) > 5 and fields[5] != "[heap]"):
                continue
            start, end = (int(a, 16) for a in fields[0].split("-"))
            mem.seek(start)
            if needle in mem.read(end - start):
                return True
    return False


async def test_each_forked_kernel_draws_its_own_multiprocessing_authkey(
    kernel_factory: KernelFactory, host: SandboxHost
) -> None:
    """multiprocessing draws it as it is imported: in the zygote, if a prewarm module imports it.

    With the key of a sibling, a kernel could call into that sibling's
    manager (under a policy with network access, over the host's loopback).
    """
    z = Zygote(host, load_policy(None), ("multiprocessing",))
    await z.start()
    try:
        assert "multiprocessing" in z.info["imported"] and z.pid is not None
        show = (
            "import json, multiprocessing\n"
            "print(json.dumps(bytes(multiprocessing.current_process().authkey).hex()))"
        )
        kernels = [await _forked(kernel_factory, z) for _ in range(2)]
        keys = [bytes.fromhex(str(await _json(kernel, show))) for kernel in kernels]
        pids = [kernels[0].forked_pid, z.pid]
        found = await asyncio.to_thread(lambda: [_private_memory_holds(p, keys[0]) for p in pids])
    finally:
        await z.close()
    assert len(keys[0]) == 32
    # Each kernel's own; found where it is held (the kernel's memory), not in the zygote's.
    assert (keys[0] == keys[1], found) == (False, [True, False]), keys


async def test_a_kernel_cannot_signal_ptrace_or_read_the_zygote(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    kernel = await _forked(kernel_factory, zygote)
    zpid = zygote.pid
    assert zpid is not None and kernel.forked_pid is not None
    tried = await _json(
        kernel,
        f"zpid = {zpid}\n"
        "import ctypes, json, os, signal\n"
        "def attempt(f):\n"
        "    try:\n"
        "        f(); return 'allowed'\n"
        "    except OSError as e:\n"
        "        return type(e).__name__\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "def ptrace():\n"
        "    if libc.ptrace(16, zpid, 0, 0) != 0:\n"
        "        raise OSError(ctypes.get_errno(), 'ptrace')\n"
        "print(json.dumps({'kill': attempt(lambda: os.kill(zpid, signal.SIGKILL)),\n"
        "  'proc': attempt(lambda: os.listdir(f'/proc/{zpid}/fd')),\n"
        "  'ptrace': attempt(ptrace), 'ppid': os.getppid()}))",
    )
    assert tried == {
        "kill": "ProcessLookupError",
        "proc": "FileNotFoundError",
        "ptrace": "PermissionError",
        "ppid": 1,
    }, tried
    assert zygote.alive
    # No descriptor of the zygote's reached the kernel (its channel, its stderr).
    theirs = _fd_targets(zpid) - {"/dev/null"}
    assert theirs and not theirs & _fd_targets(kernel.forked_pid)


async def test_a_forked_kernel_holding_a_descriptor_of_the_zygote_is_refused(
    kernel_factory: KernelFactory, host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked from outside, not left to the zygote's closing of its descriptors."""
    sent: list[int] = []
    request = Zygote._request

    async def leak(self: Zygote, message: dict[str, object], fds: list[int]) -> dict[str, object]:
        # The kernel's output made the zygote's own stderr (its fd 2): as if
        # the zygote had left one of its descriptors open in the kernel.
        assert self._stderr is not None
        sent.append(self._stderr.fileno())
        return await request(self, message, [*fds[:2], self._stderr.fileno()])

    monkeypatch.setattr(Zygote, "_request", leak)
    z = Zygote(host, load_policy(None))
    await z.start()
    try:
        # ipykernel keeps its stdout and stderr on descriptors of its own choosing.
        held = r"its fd \d+ is /\S+ \(deleted\), which the zygote holds open"
        with pytest.raises(KernelStartFailed, match=held):
            await kernel_factory(zygote=z)
        assert sent and z.alive  # the zygote forked it; the engine refused it
        assert any(t.endswith("(deleted)") for t in z.fds), z.fds  # its stderr, a temporary file
    finally:
        await z.close()


def test_the_descriptors_naming_what_another_process_holds_are_told() -> None:
    zygote = {"socket:[812]", "/dev/null", "/tmp/#14 (deleted)", "anon_inode:[pidfd]"}
    kernel = {
        0: "pipe:[20]", 1: "/run/k/kernel.out", 2: "/run/k/kernel.out", 3: "socket:[813]",
        4: "anon_inode:[eventfd]", 5: "socket:[812]", 6: "/tmp/#14 (deleted)",
        7: "anon_inode:[pidfd]",
    }  # fmt: skip
    assert descriptors_naming(kernel, zygote) == [
        (5, "socket:[812]"), (6, "/tmp/#14 (deleted)"), (7, "anon_inode:[pidfd]")
    ]  # fmt: skip
    assert descriptors_naming({0: "pipe:[20]", 4: "anon_inode:[eventfd]"}, zygote) == []


def _fd_targets(pid: int, *, above: int = -1) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) <= above:
            continue
        try:
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


async def test_a_forked_kernel_dies_as_a_cold_one_does(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    kernel = await _forked(kernel_factory, zygote)
    r = await kernel.execute("import os\nos._exit(3)")
    assert r.status == "dead" and "code 3" in (r.message or ""), r
    kernel = await _forked(kernel_factory, zygote)
    r = await kernel.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert r.status == "killed", r


async def test_the_sandboxs_init_passes_sigterm_to_the_kernel_and_ends_with_its_status(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    kernel = await _forked(kernel_factory, zygote)
    r = await kernel.execute(
        "import os, signal\nsignal.signal(signal.SIGTERM, lambda *_: os._exit(7))"
    )
    assert r.status == "ok", r
    init = [p for p in kernel.cgroup.pids() if nspid(p)[-1] == 1]
    assert len(init) == 1 and init[0] != kernel.forked_pid and zygote.stub is not None
    cmdline = Path(f"/proc/{init[0]}/cmdline").read_bytes()  # noqa: ASYNC240 - procfs
    program = cmdline.split(b"\0")[0]
    assert program == zygote.stub[0].encode()
    os.kill(init[0], signal.SIGTERM)
    async with asyncio.timeout(10):
        await kernel.wait_ended()
    assert kernel._jail.exit_code == 7


async def test_signals_from_inside_end_the_sandboxs_init_only_through_its_kernel(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    """Init ignores what it has no handler for; its one timeout is gone once it has its kernel."""
    kernel = await _forked(kernel_factory, zygote)
    r = await kernel.execute(
        "import os, signal, time\n"
        "for s in (signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD,"
        " signal.SIGKILL):\n"
        "    os.kill(1, s)\n"
        "time.sleep(0.2)"
    )
    assert r.status == "ok", r
    r = await kernel.execute("6 * 7")
    assert r.status == "ok" and r.text == "42", r
    assert kernel.alive


async def test_the_sandbox_cannot_write_on_its_inits_stdin(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    """The pipe the engine tells the stub its kernel's pid on is root's, not the sandbox's."""
    kernel = await _forked(kernel_factory, zygote)
    r = await kernel.execute(
        "import os\n"
        "try:\n"
        "    fd = os.open('/proc/1/fd/0', os.O_WRONLY | os.O_NONBLOCK)\n"
        "    os.write(fd, b'2\\n'); print('written')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)"
    )
    assert (r.status, r.stdout) == ("ok", "PermissionError\n"), r


def test_a_stub_told_no_kernel_ends_with_125(host: SandboxHost) -> None:
    """Its engine gone (EOF) or a line that is no pid: the stub ends; it said it was ready."""
    stubs = [[host.runtime.python, *STUB_ARGS]]
    if stub_command(host.runtime.python)[0] == PERL:
        stubs.append(stub_command(host.runtime.python))
    runtime = str(data_dir("kernels") / "runtime")
    for stub in stubs:
        for given in (b"", b"12x\n", b"-1\n"):
            argv = [a.replace(RUNTIME_IN_JAIL, runtime) for a in stub]
            done = subprocess.run(argv, input=given, capture_output=True, timeout=30, env={})
            assert (done.returncode, done.stdout) == (125, b"ready\n"), (stub[0], given, done)
            assert b"no kernel came" in done.stderr


async def test_a_perl_that_cannot_be_the_init_gives_way_to_pythons_stub(
    kernel_factory: KernelFactory, host: SandboxHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    if stub_command(host.runtime.python)[0] != PERL:
        pytest.skip(f"no {PERL}: every sandbox's init is the Python stub")
    monkeypatch.setattr(zygote_module, "PERL_STUB", "exit 3")
    z = Zygote(host, load_policy(None))
    await z.start()
    try:
        with pytest.raises(KernelStartFailed, match="stub did not start"):
            await kernel_factory(zygote=z)
        assert z.stub is not None and z.stub[0] == host.runtime.python
        kernel = await _forked(kernel_factory, z)
        r = await kernel.execute("6 * 7")
        assert r.status == "ok" and r.text == "42", r
    finally:
        await z.close()


async def test_a_policys_perl_options_do_not_reach_the_perl_init(
    kernel_factory: KernelFactory, host: SandboxHost
) -> None:
    if stub_command(host.runtime.python)[0] != PERL:
        pytest.skip(f"no {PERL}: every sandbox's init is the Python stub")
    policy = load_policy(None).model_copy(
        update={"env": {"PERL5OPT": "-Mstrict", "PERL5LIB": "/mnt/data"}}
    )
    z = Zygote(host, policy)
    await z.start()
    try:
        kernel: SandboxedKernel = await kernel_factory(policy, zygote=z)
        assert kernel.forked_pid is not None and z.stub is None  # Perl's started
        r = await kernel.execute("import os\nos.environ['PERL5OPT']")
        assert r.status == "ok" and r.text == "'-Mstrict'", r
    finally:
        await z.close()


async def test_the_policys_environment_is_the_kernels_and_never_the_zygotes(
    kernel_factory: KernelFactory, host: SandboxHost, tmp_path: Path
) -> None:
    # Paths the policy names are the sandbox's: read by the root zygote on the
    # host, an IPython config there would run as root. Such a policy is not
    # forked at all (IPYTHONDIR is read as the zygote warms up).
    config = tmp_path / "ipython" / "profile_default"
    config.mkdir(parents=True)
    marker = tmp_path / "ran-as-root"
    (config / "ipython_kernel_config.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    ipython = load_policy(None).model_copy(update={"env": {"IPYTHONDIR": str(config.parent)}})
    with pytest.raises(ZygoteFailed, match="IPYTHONDIR"):
        await Zygote(host, ipython).start()
    # What a fork honours is set in each kernel, never in the zygote.
    policy = load_policy(None).model_copy(
        update={"env": {"TMPDIR": str(tmp_path / "tmp"), "SHELL": "/bin/bash"}}
    )
    z = Zygote(host, policy)
    await z.start()
    try:
        assert z.pid is not None
        environ = await asyncio.to_thread(Path(f"/proc/{z.pid}/environ").read_bytes)
        zygote_env = environ.decode().split("\0")
        assert "TMPDIR=/tmp" in zygote_env and "SHELL=/bin/sh" in zygote_env  # the sandbox's
        kernel: SandboxedKernel = await kernel_factory(policy, zygote=z)
        assert kernel.forked_pid is not None
        r = await kernel.execute("import os\nprint(os.environ['TMPDIR'], os.environ['SHELL'])")
        assert r.stdout == f"{tmp_path / 'tmp'} /bin/bash\n", r
        await kernel.self_check()  # the whole environment, as rendered for a cold kernel
    finally:
        await z.close()
    assert not marker.exists()


async def test_a_forked_kernels_environment_is_a_cold_ones(
    kernel_factory: KernelFactory, zygote: Zygote
) -> None:
    show = "import json, os\nprint(json.dumps(dict(os.environ)))"
    cold = await _json(await kernel_factory(), show)
    forked = await _json(await _forked(kernel_factory, zygote), show)
    assert isinstance(cold, dict) and isinstance(forked, dict)
    cold.pop("PYDEVD_USE_FRAME_EVAL", None)  # debugpy's, which a forked kernel never imports
    assert forked == cold
    assert forked["PAGER"] == "cat" and forked["TERM"] == "xterm-color"  # the shell's


#: Read as the interpreter starts or as the zygote's modules are imported (a
#: forked kernel would keep the zygote's value, the sandbox's default), or
#: unknown (TEAM: what a prewarm module might read as it is imported).
_READ_AT_START = {
    "PYTHONPATH": "/mnt/data/lib", "LD_PRELOAD": "/mnt/data/x.so", "OMP_NUM_THREADS": "4",
    "LANG": "C", "LC_ALL": "C", "LC_NUMERIC": "de_DE.UTF-8", "TZ": "Asia/Tokyo",
    "MPLBACKEND": "agg", "MATPLOTLIBRC": "/mnt/data", "MPLCONFIGDIR": "/mnt/data/.mpl",
    "IPYTHONDIR": "/mnt/data/.ipython", "JUPYTER_RUNTIME_DIR": "/mnt/data/.jupyter",
    "XDG_CACHE_HOME": "/mnt/data/.cache", "HOME": "/mnt/data", "PATH": "/mnt/data/bin:/usr/bin",
    "USER": "analyst", "TEAM": "analysts",
}  # fmt: skip


async def test_a_policy_setting_what_a_process_reads_as_it_starts_is_not_forked(
    host: SandboxHost,
) -> None:
    for key, value in _READ_AT_START.items():
        policy = load_policy(None).model_copy(update={"env": {key: value, "TMPDIR": "/mnt/data"}})
        refused = fork_refused(policy)
        assert refused is not None and f"sets {key}," in refused, (key, refused)
        assert "TMPDIR" not in refused.split("cannot honour")[0], refused
    policy = load_policy(None).model_copy(update={"env": dict(_READ_AT_START)})
    with pytest.raises(ZygoteFailed, match="PYTHONPATH"):
        await Zygote(host, policy).start()
    supervisor = ZygoteSupervisor(host, policy)
    assert await supervisor.get() is None and "start cold" in supervisor.status()
    assert "LC_ALL" in supervisor.status() and "TZ" in supervisor.status()
    await supervisor.close()


def test_the_shipped_policies_and_what_a_fork_honours_are_forked() -> None:
    for name in shipped_policy_names():
        assert fork_refused(load_policy(name)) is None, name
    honoured = {"TMPDIR": "/mnt/data", "SHELL": "/bin/bash", "PERL5LIB": "/mnt/data/perl"}
    assert fork_refused(load_policy(None).model_copy(update={"env": honoured})) is None


#: What a kernel's environment decides as the interpreter starts, as its
#: modules are imported and as its shell is made.
_ENVIRONMENT_DEPENDENT_STATE = """
import json, locale, os, sys, sysconfig, tempfile, time
import matplotlib
ip = get_ipython()
print(json.dumps({
    "fs_encoding": sys.getfilesystemencoding(), "utf8_mode": sys.flags.utf8_mode,
    "preferred_encoding": locale.getpreferredencoding(False),
    "ctype": locale.setlocale(locale.LC_CTYPE), "tzname": time.tzname,
    "tempdir": tempfile.gettempdir(), "mpl_backend": matplotlib.get_backend(),
    "mpl_config": matplotlib.get_configdir(), "ipython_dir": ip.ipython_dir,
    "profile": ip.profile_dir.location, "home": os.path.expanduser("~"),
    "user_base": sysconfig.get_config_var("userbase"),
    "session_user": ip.kernel.session.username, "path": sys.path,
    "environ": dict(os.environ),
}))
"""


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("default", {}),
        ("strict", {}),
        ("networked", {}),
        ("default", {"TMPDIR": "/mnt/data", "SHELL": "/bin/bash", "PERL5LIB": "/mnt/data"}),
    ],
    ids=["default", "strict", "networked", "default-honoured-env"],
)
async def test_a_forked_kernel_sees_what_its_environment_decides_as_a_cold_one_does(
    kernel_factory: KernelFactory, host: SandboxHost, name: str, env: dict[str, str]
) -> None:
    """For the variables the sandbox and the policy set: locale, time zone, folders..."""
    policy = load_policy(name).model_copy(update={"env": env})
    cold = await _json(await kernel_factory(policy), _ENVIRONMENT_DEPENDENT_STATE)
    z = Zygote(host, policy, DEFAULT_PREWARM)  # matplotlib imported before the fork
    await z.start()
    try:
        kernel: SandboxedKernel = await kernel_factory(policy, zygote=z)
        assert kernel.forked_pid is not None
        forked = await _json(kernel, _ENVIRONMENT_DEPENDENT_STATE)
    finally:
        await z.close()
    assert isinstance(cold, dict) and isinstance(forked, dict)
    cold["environ"].pop("PYDEVD_USE_FRAME_EVAL", None)  # debugpy's, never in a forked kernel
    assert forked == cold
    assert cold["environ"].items() >= env.items()


async def test_a_forked_kernel_has_the_sandboxs_nice_value_not_the_engines(
    kernel_factory: KernelFactory, host: SandboxHost
) -> None:
    policy = load_policy(None)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, 7)  # an engine run as `nice -n 7 sandkernel serve`
    try:
        z = Zygote(host, policy)
        await z.start()
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)
    try:
        assert z.pid is not None and os.getpriority(os.PRIO_PROCESS, z.pid) == 7
        kernel: SandboxedKernel = await kernel_factory(policy, zygote=z)
        assert kernel.forked_pid is not None  # and it passed the outside check, nice included
        r = await kernel.execute("import os\nos.getpriority(os.PRIO_PROCESS, 0)")
        assert r.text == "0", r  # the policy's (nsjail's nice_level), as a cold kernel's
    finally:
        await z.close()


async def test_a_dead_zygote_fails_the_fork_and_leaves_no_sandbox(
    host: SandboxHost, zygote: Zygote
) -> None:
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGKILL)
    kernel = SandboxedKernel(host, load_policy(None), zygote=zygote)
    with pytest.raises(KernelStartFailed, match="zygote"):
        await kernel.start()
    assert not kernel.alive and not zygote.alive


async def test_a_policy_with_network_forks_into_the_host_network(
    kernel_factory: KernelFactory, host: SandboxHost
) -> None:
    policy = Policy(network=True)
    z = Zygote(host, policy)
    await z.start()
    try:
        kernel = await kernel_factory(policy, zygote=z)
        assert kernel.forked_pid is not None
        await kernel.self_check()
    finally:
        await z.close()


_HOST_CONFIG_PROBE = """
import asyncio, sys
from sandkernel import Engine

async def main():
    async with Engine(pool_size=0, prewarm_imports=(), runtime_dir=sys.argv[1],
                      store_dir=sys.argv[2], handle_sigterm=False) as engine:
        session = await engine.session()
        assert session.kernel is not None and session.kernel.forked_pid is not None
        r = await session.run("import platform\\nprint(platform.node(), 'HOST_ONLY' in globals())")
        print(r.stdout.strip() or r)

asyncio.run(main())
"""


def test_a_forked_kernel_sees_neither_the_hosts_name_nor_its_ipython_config(
    tmp_path: Path, short_dir: Path
) -> None:
    # A copy of this machine's /etc with an IPython configuration no sandbox
    # mounts, put over /etc in a mount namespace of the test's own.
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    (etc / "ipython").mkdir(exist_ok=True)
    (etc / "ipython" / "ipython_kernel_config.py").write_text(
        "c = get_config()\nc.InteractiveShellApp.exec_lines = ['HOST_ONLY = 1']\n"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(_HOST_CONFIG_PROBE)
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'mount --bind "{etc}" /etc && exec "{sys.executable}" "{probe}" "{short_dir}/rt" '
         f'"{tmp_path}/store"'],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "sandbox False", done.stdout


def test_a_zygote_whose_engine_is_gone_ends_at_once_whatever_the_engines_pid() -> None:
    """It compares its parent with the engine's pid, not with 1 (an engine may be PID 1)."""
    import socket

    from sandkernel._resources import data_dir

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        script = str(data_dir("kernels") / "runtime" / "zygote.py")
        args = [sys.executable, "-s", script, "--fd", str(theirs.fileno())]
        gone = subprocess.run(
            [*args, "--parent", str(os.getpid() + 1)],  # not its parent: the engine is gone
            pass_fds=(theirs.fileno(),), timeout=30, check=False, capture_output=True,
        )  # fmt: skip
        assert gone.returncode == 1 and gone.stderr == b""


def _pidfd_of_an_ended_process() -> int:
    """A pidfd of a process that has exited and been reaped: a sandbox's init gone."""
    process = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(process.pid)
    process.wait()
    return pidfd


def _fds_of(pid: int) -> dict[int, str]:
    """``pid``'s descriptors and what they name (not the one listing them, closed since)."""
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
    return fds


async def test_a_fork_request_whose_sandbox_is_gone_leaves_the_zygote_no_descriptor(
    host: SandboxHost,
) -> None:
    """Its init exited before the request was served: setns fails once the report pipe is made.

    What a start cancelled while its request is with the zygote leaves (its
    stub ends at once); the zygote serves on, so each such request counts.
    """
    z = Zygote(host, load_policy(None))
    await z.start()
    try:
        assert z.pid is not None
        before = await asyncio.to_thread(_fds_of, z.pid)
        for n in range(3):
            pidfd = await asyncio.to_thread(_pidfd_of_an_ended_process)
            empty, closed = os.pipe()
            os.close(closed)
            output = os.open(os.devnull, os.O_WRONLY)
            try:
                reply = await z._request({"id": f"gone-{n}"}, [pidfd, empty, output])
            finally:
                for fd in (pidfd, empty, output):
                    os.close(fd)
            assert reply == {"ok": False, "error": "ProcessLookupError: [Errno 3] No such process",
                             "id": f"gone-{n}"}, reply  # fmt: skip
        # The reply is sent once the request's descriptors are closed: no race.
        after = await asyncio.to_thread(_fds_of, z.pid)
        assert z.alive
    finally:
        await z.close()
    assert after == before


def _runtime_zygote() -> Any:
    """``kernels/runtime/zygote.py`` as a module of its own, not left in ``sys.modules``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_sandkernel_runtime_zygote", data_dir("kernels") / "runtime" / "zygote.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("failing", ["setns", "fork"])
def test_a_fork_that_fails_leaves_the_zygote_no_descriptor(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Whichever fails, entering the sandbox's PID namespace or forking into it."""
    import errno

    runtime = _runtime_zygote()
    target = os.pidfd_open(os.getpid())  # read for its pid; nothing enters its namespaces
    entered: list[int] = []

    def setns(fd: int, nstype: int = 0) -> None:
        # Recorded, not made: this test's process stays in its own namespaces.
        if failing == "setns" and fd == target:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        entered.append(fd)

    def fork() -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")  # its namespace's init gone

    monkeypatch.setattr(runtime.os, "setns", setns)
    monkeypatch.setattr(runtime.os, "fork", fork)
    others = [*os.pipe(), os.open(os.devnull, os.O_WRONLY)]
    fds = [target, *others]
    try:
        before = _fds_of(os.getpid())
        with pytest.raises(OSError, match="No such process" if failing == "setns" else "memory"):
            runtime._fork_kernel({}, fds)
        after = _fds_of(os.getpid())
    finally:
        for fd in fds:
            os.close(fd)
    assert after == before
    # Its own PID namespace restored for its next children, the sandbox's entered first.
    assert entered[-1] != target and (failing == "setns" or entered[0] == target), entered


async def test_a_fork_request_given_up_on_does_not_take_the_next_ones_reply() -> None:
    """Its reply still comes; the next request skips it instead of closing the zygote."""
    import socket

    zygote = Zygote(None, Policy())  # type: ignore[arg-type] - no start: a peer plays it
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    zygote._sock = ours
    zygote.process = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 - stands for it
    try:
        first = asyncio.create_task(zygote._request({"id": "a"}, []))
        assert json.loads(await asyncio.to_thread(peer.recv, 4096))["id"] == "a"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.create_task(zygote._request({"id": "b"}, []))
        assert json.loads(await asyncio.to_thread(peer.recv, 4096))["id"] == "b"
        peer.send(json.dumps({"id": "a", "ok": True, "pid": 7}).encode())
        peer.send(json.dumps({"id": "b", "ok": True, "pid": 8}).encode())
        async with asyncio.timeout(10):
            assert (await second)["pid"] == 8
        assert zygote.alive and not zygote._abandoned
    finally:
        zygote.process.kill()
        zygote.process.wait()
        ours.close()
        peer.close()


async def test_a_zygote_that_does_not_answer_is_ended_and_the_starts_queued_go_cold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each start waits the reply's deadline at most, all at once, not one after the other."""
    import socket
    import time

    assert zygote_module._FORK_REPLY_S <= 5  # a start that goes cold, not one held up
    monkeypatch.setattr(zygote_module, "_FORK_REPLY_S", 0.5)
    zygote = Zygote(None, Policy())  # type: ignore[arg-type] - no start: a silent peer plays it
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    zygote._sock = ours
    zygote.process = subprocess.Popen(["sleep", "60"])  # noqa: ASYNC220 - stands for it
    try:
        started = time.monotonic()
        first = asyncio.create_task(zygote._request({"id": "a"}, []))
        queued = [asyncio.create_task(zygote._request({"id": i}, [])) for i in "bcd"]
        with pytest.raises(ZygoteFailed, match=r"did not answer within 0\.5 s"):
            await first
        for task in queued:  # given up on together with the first, or found it ended
            with pytest.raises(ZygoteFailed, match=r"not running|did not answer within 0\.5 s"):
                await task
        assert time.monotonic() - started < 1.5
        assert not zygote.alive and zygote.process.returncode == -signal.SIGKILL
    finally:
        zygote.process.kill()
        zygote.process.wait()
        ours.close()
        peer.close()
