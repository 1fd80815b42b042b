"""A real sandboxed kernel: results, limits, timeouts, deaths."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from sandkernel import kernel as kernel_module
from sandkernel._resources import data_dir
from sandkernel.errors import KernelDead
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import Policy
from sandkernel.sandbox import Runtime, SandboxHost
from tests.conftest import HeldShutdowns, KernelFactory, cell_under_way

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


async def test_print_gives_ok_and_stdout(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    r = await k.execute("print(1+1)")
    assert r.status == "ok" and r.stdout == "2\n" and r.error is None
    assert r.usage.wall_ms > 0 and r.usage.peak_memory_bytes and r.usage.cpu_ms is not None


async def test_state_persists_across_cells_and_value_is_returned(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    assert (await k.execute("x = 21")).status == "ok"
    r = await k.execute("x * 2")
    assert r.text == "42" and r.execution_count == 2


async def test_exception_is_a_value_with_plain_traceback(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    r = await k.execute("def f():\n    return 1/0\nf()")
    assert r.status == "error" and r.error is not None
    assert r.error.name == "ZeroDivisionError" and r.error.value == "division by zero"
    assert "\x1b[" not in r.error.traceback and "return 1/0" in r.error.traceback
    assert r.kernel_alive and not r.state_lost


async def test_an_exception_group_is_an_error_with_its_name_and_value(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    # IPython shows it on stderr, with no error message: the reply still names it.
    r = await k.execute("raise ExceptionGroup('two failed', [ValueError('a'), KeyError('b')])")
    assert r.status == "error" and r.error is not None
    assert (r.error.name, r.error.value) == ("ExceptionGroup", "two failed (2 sub-exceptions)")


async def test_stderr_and_matplotlib_figure_as_png_display(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    r = await k.execute(
        "import sys, matplotlib.pyplot as plt\n"
        "print('warn', file=sys.stderr)\n"
        "plt.plot([1, 2, 3], [1, 4, 9]); plt.show()"
    )
    assert r.status == "ok", r
    assert r.stderr == "warn\n"
    assert any("image/png" in d.data for d in r.displays)


async def test_output_over_the_cap_keeps_head_and_tail(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory(Policy(output_max_bytes=4096))
    r = await k.execute("print('HEAD'); print('x' * 100_000); print('TAIL')")
    assert r.status == "ok" and r.stdout_truncated
    assert r.stdout.startswith("HEAD") and r.stdout.rstrip().endswith("TAIL")
    assert len(r.stdout) < 4096 + 100


async def test_timeout_interrupts_and_kernel_survives(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    await k.execute("y = 7")
    started = time.monotonic()
    r = await k.execute("while True: pass", timeout_s=1)
    assert time.monotonic() - started < 1 + 2
    assert r.status == "timeout" and r.kernel_alive and not r.state_lost
    assert "1 s limit" in (r.message or "")
    assert (await k.execute("y")).text == "7"


async def test_an_interrupt_only_flagged_still_stops_a_cell_asleep_in_a_system_call(
    kernel_factory: KernelFactory,
) -> None:
    # The main thread blocks SIGINT, so the cell's other thread takes it: as
    # when the signal lands between the main thread's last check and its
    # sleep, Python's handler is only flagged and the sleep goes on.
    k = await kernel_factory()
    cell = await cell_under_way(
        k,
        "import signal, threading, time\n"
        "threading.Thread(target=time.sleep, args=(20,), daemon=True).start()\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
        "print('sleeping', flush=True)\n"
        "time.sleep(30)\n"
        "finished = True",
    )
    started = time.monotonic()
    await k.interrupt()
    r = await asyncio.wait_for(cell, 10)
    assert time.monotonic() - started < 2
    assert r.status == "error" and r.error is not None and r.error.name == "KeyboardInterrupt"
    r = await k.execute("print('finished' in dir()); import signal, time; time.sleep(0.2)")
    assert (r.status, r.stdout) == ("ok", "False\n")  # woken once: nothing raised again


async def test_a_cell_that_goes_on_after_its_interrupt_sees_at_most_one_call_cut_short(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    cell = await cell_under_way(
        k,
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None)\n"
        "try:\n"  # the interrupt may come as soon as the print is out
        "    print('sleeping', flush=True)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    pass\n"
        "cut, began = 0, time.monotonic()\n"
        "while time.monotonic() - began < 1.5:\n"
        "    started = time.monotonic()\n"
        "    libc.usleep(100_000)  # C: a signal ends it early, and it is not retried\n"
        "    cut += time.monotonic() - started < 0.09\n"
        "print(cut)",
    )
    await k.interrupt()
    r = await asyncio.wait_for(cell, 10)
    assert r.status == "ok" and int(r.stdout.split()[-1]) <= 1, r


async def test_a_cell_timed_out_before_a_busy_kernel_took_it_up_is_interrupted_not_killed(
    kernel_factory: KernelFactory,
) -> None:
    """The kernel is busy before it takes the next cell up (SIGINT is ignored there) past
    the cell's timeout: the interrupt is sent once the cell begins, and the kernel lives on."""
    k = await kernel_factory(Policy(interrupt_grace_s=5))
    block = (
        "import time\n"
        "kernel = get_ipython().kernel\n"
        "dispatch = kernel.dispatch_shell\n"
        "blocked = []\n"
        "async def busy_first(*args, **kwargs):\n"
        "    kernel.dispatch_shell = dispatch\n"
        "    blocked.append(time.monotonic())\n"
        "    time.sleep(2)\n"
        "    return await dispatch(*args, **kwargs)\n"
        "kernel.dispatch_shell = busy_first"
    )
    assert (await k.execute(block)).status == "ok"
    r = await k.execute("began = time.monotonic()\nwhile True: time.sleep(0.01)", timeout_s=1)
    assert r.status == "timeout" and r.kernel_alive and not r.state_lost, r
    # The loop was blocked before the cell began: what this test is about.
    check = "print(len(blocked), 'began' in globals() and began > blocked[0])"
    seen = (await k.execute(check)).stdout
    if r.error is not None:
        assert r.error.name == "KeyboardInterrupt" and seen == "1 True\n", (r, seen)
    else:
        # The interrupt came between the cell's execute_input and its first line,
        # in ipykernel's own code, which takes it and ends the request there (a
        # loaded machine widens that moment): stopped before it ran, all the same.
        assert seen == "1 False\n", (r, seen)


async def test_uninterruptible_cell_is_killed_and_a_new_kernel_works(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory(Policy(interrupt_grace_s=0.5))
    started = time.monotonic()
    r = await k.execute(
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
        timeout_s=1,
    )
    assert time.monotonic() - started < 1 + 0.5 + 5  # the cell itself would never end
    assert r.status == "timeout" and not r.kernel_alive and r.state_lost
    with pytest.raises(KernelDead):
        await k.execute("1")
    fresh = await kernel_factory()
    assert (await fresh.execute("1+1")).text == "2"


async def test_4gib_allocation_gives_oom_naming_the_limit(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    r = await k.execute("b = bytearray(4 * 1024**3)")
    assert r.status == "oom", r
    assert "1024 MiB" in (r.message or "") and "memory_mb" in (r.message or "")
    assert not r.kernel_alive and r.state_lost


async def test_os_exit_gives_dead_with_the_code(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    r = await k.execute("import os; os._exit(1)")
    assert r.status == "dead" and "code 1" in (r.message or "")
    assert not k.alive


async def test_segfault_gives_dead_with_the_signal(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    r = await k.execute("import ctypes; ctypes.string_at(0)")
    assert r.status == "dead" and "SIGSEGV" in (r.message or "")


async def test_fork_bomb_is_contained_and_reported(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory(Policy(pids_max=64))
    r = await k.execute(
        "import os, time\n"
        "n = 0\n"
        "for _ in range(10_000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(n)",
        timeout_s=20,
    )
    assert r.status == "ok", r
    assert int(r.stdout) < 64
    assert "process limit (64" in (r.message or "")
    assert len(k.cgroup.pids()) <= 64
    assert (await k.execute("1+1")).text == "2"


async def test_self_check_reports_isolation(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    report = await k.self_check()
    assert report["cap_eff"] == "0000000000000000"
    assert report["no_new_privs"] == "1" and report["seccomp"] == "2"
    assert report["uid"] == 65534 and report["cwd"] == "/mnt/data"


async def test_the_users_modules_are_not_shadowed_by_the_runtimes(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    # Names of the runtime's own files, and of the set-up cell's module.
    for name in ("launch", "zygote", "frames", "_sandkernel_setup"):
        (k.workspace / f"{name}.py").write_text(f"MINE = {name!r}\ndef report(): return '{{}}'\n")
    r = await k.execute(
        "import launch, zygote, frames\nprint(launch.MINE, zygote.MINE, frames.MINE)"
    )
    assert r.stdout == "launch zygote frames\n", r
    # The self-check keeps the module the kernel imported before any user file.
    report = await k.self_check()
    assert report["uid"] == 65534 and report["cap_eff"] == "0000000000000000"


async def test_shutdown_is_idempotent_and_removes_everything(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    root = k.workspace.parent
    await k.shutdown()
    await k.shutdown()
    assert not root.exists()
    assert not k.cgroup.pids()


async def test_a_caller_cancelled_during_shutdown_returns_only_once_nothing_is_left(
    kernel_factory: KernelFactory, held_shutdowns: HeldShutdowns
) -> None:
    """A pool's start undone after a failed check is cancelled by close(): the jail still goes."""
    k = await kernel_factory()
    root = k.workspace.parent
    caller = asyncio.ensure_future(k.shutdown())
    await asyncio.wait_for(held_shutdowns.entered.wait(), 10)
    caller.cancel()
    done, _ = await asyncio.wait([caller], timeout=0.2)
    assert not done, "the cancelled caller went on while the kernel was still being shut down"
    held_shutdowns.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 10)
    assert not root.exists()
    assert not k.cgroup.pids()


@pytest.fixture
def venv_under_tmp(tmp_path: Path) -> tuple[Path, str]:
    """A pip-less venv under /tmp that reaches this environment's packages by a .pth."""
    import subprocess
    import sys
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = sysconfig.get_paths()["purelib"]
    (next(venv.glob("lib/python*/site-packages")) / "engine.pth").write_text(site + "\n")
    return venv, site


async def test_runtime_under_tmp_is_not_hidden_by_the_sandbox_tmp(
    host: SandboxHost, venv_under_tmp: tuple[Path, str]
) -> None:
    """A Python environment that lives under /tmp still works inside the sandbox."""
    venv, site = venv_under_tmp
    runtime = Runtime.detect(venv / "bin" / "python")
    assert any(m.startswith("/tmp/") for m in runtime.mounts)
    with SandboxHost(host.root, runtime=runtime, sweep=False) as under_tmp:
        kernel = SandboxedKernel(under_tmp, Policy(readonly_mounts=[site]))
        try:
            await kernel.start()
            r = await kernel.execute("import sys; print(sys.prefix)")
            assert r.stdout.strip() == str(venv)
        finally:
            await kernel.shutdown()


async def test_a_failing_output_callback_is_raised_and_the_kernel_runs_on(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()

    def fail(message: dict[str, object]) -> None:
        raise LookupError("the consumer failed")

    with pytest.raises(LookupError, match="the consumer failed"):
        await k.execute("print('x')", on_output=fail)
    r = await k.execute("1+1")
    assert r.status == "ok" and r.text == "2"


def _interrupts_taken_after(seconds: float) -> str:
    """A cell after which the kernel's control thread takes each interrupt ``seconds`` late."""
    return (
        "import time\n"
        "kernel = get_ipython().kernel\n"
        "handle = kernel.control_handlers['interrupt_request']\n"
        "async def slowly(*args):\n"
        f"    time.sleep({seconds})\n"
        "    return await handle(*args)\n"
        "kernel.control_handlers['interrupt_request'] = slowly"
    )


async def test_an_interrupt_the_kernel_takes_slowly_does_not_reach_the_next_cell(
    kernel_factory: KernelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel signals itself from its control thread, and replies after: the
    interrupt of a cell that ended meanwhile is over before the next cell is sent."""
    # Its reply waited for as long as it takes: the test is of the order, not of the bound.
    monkeypatch.setattr(kernel_module, "_INTERRUPT_ACK_S", 30.0)
    k = await kernel_factory()
    assert (await k.execute(_interrupts_taken_after(0.3))).status == "ok"

    def fail(message: dict[str, object]) -> None:
        raise LookupError("the consumer failed")

    with pytest.raises(LookupError, match="the consumer failed"):
        await k.execute("print('x')", on_output=fail)
    r = await k.execute("time.sleep(1); 1+1")
    assert (r.status, r.text) == ("ok", "2")


_FLOODS_ITS_CONTROL_SOCKET = """
import json, time, uuid
kernel = get_ipython().kernel
handle = kernel.control_handlers['interrupt_request']
async def flood(stream, ident, parent):
    end = time.monotonic() + 30
    while time.monotonic() < end:
        header = {'msg_id': uuid.uuid4().hex, 'msg_type': 'status', 'username': 'u',
                  'session': 's', 'date': '2020-01-01T00:00:00Z', 'version': '5.3'}
        frames = [json.dumps(header).encode(), b'{}', b'{}', b'{}']
        stream.socket.send_multipart(
            [*ident, b'<IDS|MSG>', kernel.session.sign(frames), *frames])
    return await handle(stream, ident, parent)
kernel.control_handlers['interrupt_request'] = flood
"""


async def test_a_kernel_flooding_its_control_socket_holds_an_interrupt_up_no_longer(
    kernel_factory: KernelFactory,
) -> None:
    """Its code is the user's: signed messages as fast as it can send them, never the
    reply. The interrupt's wait still ends, and so does a timed-out cell's."""
    k = await kernel_factory()
    assert (await k.execute(_FLOODS_ITS_CONTROL_SOCKET)).status == "ok"
    started = time.monotonic()
    await k.interrupt()
    assert time.monotonic() - started < 10
    started = time.monotonic()
    r = await k.execute("while True: pass", timeout_s=1)
    assert r.status == "timeout"
    assert time.monotonic() - started < 1 + k.policy.interrupt_grace_s + 10


async def test_an_interrupt_waiting_for_its_reply_ends_quietly_when_the_kernel_is_shut_down(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    assert (await k.execute(_interrupts_taken_after(0.9))).status == "ok"
    interrupting = asyncio.ensure_future(k.interrupt())
    await asyncio.sleep(0)  # it sends the request and waits for the reply
    assert not interrupting.done()
    await k.shutdown()
    await asyncio.wait_for(interrupting, 5)  # returned, not cancelled


async def test_a_callback_failing_under_a_running_cell_interrupts_it_before_raising(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()

    def fail(message: dict[str, object]) -> None:
        if message.get("msg_type") == "stream":
            raise LookupError("the consumer failed")

    started = time.monotonic()
    with pytest.raises(LookupError, match="the consumer failed"):
        await k.execute(
            "print('x', flush=True)\nimport time\ntime.sleep(30)\nfinished = True",
            on_output=fail,
            timeout_s=60,
        )
    assert time.monotonic() - started < 10
    r = await k.execute("print('finished' in dir())", timeout_s=10)
    assert (r.status, r.stdout) == ("ok", "False\n")


async def test_shutdown_under_a_running_cell_gives_killed_at_once(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    cell = await cell_under_way(k, "print('sleeping', flush=True); import time; time.sleep(30)")
    started = time.monotonic()
    await k.shutdown()
    r = await asyncio.wait_for(cell, 5)
    assert r.status == "killed" and "shut down while the cell ran" in (r.message or "")
    assert time.monotonic() - started < 5


async def test_the_set_up_cell_leaves_the_kernel_as_new(kernel_factory: KernelFactory) -> None:
    k = await kernel_factory()
    # A module that raises on import is as harmless as a missing one.
    (k.workspace / "raises_on_import.py").write_text("import wave\nraise ValueError('no')\n")
    await k.prepare(self_check=True, imports=("raises_on_import", "colorsys", "nope_not_here"))
    shown = await k.execute("print(repr(_), len(In), dict(Out))", store_history=False)
    assert shown.stdout == "'' 1 {}\n"  # nothing of the set-up in the history or in _
    r = await k.execute("1+1")
    assert r.status == "ok" and r.text == "2" and r.execution_count == 1
    names = await k.execute(
        "print(sorted(n for n in globals() if not n.startswith('_')), "
        "*(m in __import__('sys').modules for m in ('IPython.core.logger', 'wave', 'colorsys')))"
    )
    # The imports after the failing one ran, and the names they bound are gone.
    assert names.stdout == "['In', 'Out', 'exit', 'get_ipython', 'open', 'quit'] True True True\n"


async def test_a_socket_swapped_for_a_link_to_a_host_socket_is_not_followed(
    kernel_factory: KernelFactory, tmp_path: Path
) -> None:
    """The engine connects as root in the host's mounts: never through the sandbox's names."""
    import socket

    import zmq
    import zmq.asyncio

    host_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_socket.bind(str(tmp_path / "host.sock"))
    host_socket.listen()
    host_socket.setblocking(False)
    kernel = await kernel_factory()
    swap = await kernel.execute(
        "import json, os\n"
        "info = json.load(open('/run/sandkernel/kernel.json'))\n"
        "for name in ('shell_port', 'iopub_port', 'stdin_port', 'control_port'):\n"
        "    path = f\"{info['ip']}-{info[name]}\"\n"
        "    os.rename(path, path + '.moved')\n"
        f"    os.symlink({str(tmp_path / 'host.sock')!r}, path)\n"
        "print(sorted(os.listdir('/run/sandkernel')))"
    )
    assert swap.status == "ok" and ".moved" in swap.stdout, swap
    # A new connection, as a gateway's relay makes one after user code ran.
    info = kernel.connection_info()
    context = zmq.asyncio.Context()
    dealer = context.socket(zmq.DEALER)
    try:
        dealer.connect(f"ipc://{info['ip']}-{info['shell_port']}")
        from jupyter_client.session import Session

        session = Session(key=info["key"].encode())
        session.send(dealer, "kernel_info_request", {})
        async with asyncio.timeout(20):
            frames = await dealer.recv_multipart()
        reply = session.deserialize(session.feed_identities(frames)[1])
        assert reply["msg_type"] == "kernel_info_reply"  # the kernel's own socket answered
    finally:
        dealer.close(linger=0)
        context.term()
    with pytest.raises(BlockingIOError):
        host_socket.accept()  # and nothing reached the host's socket
    host_socket.close()
    assert (await kernel.execute("1 + 1")).text == "2"  # the engine's own client too


async def test_a_cell_its_caller_gave_up_on_settles_before_the_next_one_runs(
    kernel_factory: KernelFactory,
) -> None:
    k = await kernel_factory()
    # An anyio cancel scope cancels every await in it, again and again.
    with anyio.move_on_after(1):
        await k.execute("import time\ntime.sleep(30)")
    r = await k.execute("1 + 1")
    # Sent once the interrupted cell had ended: run, not aborted by the kernel.
    assert r.status == "ok" and r.text == "2" and r.execution_count == 2, r


async def test_a_flood_of_output_the_engine_cannot_keep_up_with_does_not_hold_its_event_loop(
    kernel_factory: KernelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = await kernel_factory()
    taken = 0
    flooded = asyncio.Event()
    take = SandboxedKernel._take_iopub

    def slowly(self: SandboxedKernel, frames: Any, session: Any) -> None:
        nonlocal taken
        taken += 1
        # The flood's last line: its lines are a message each, or fewer when the
        # kernel's IOPub thread, slowed by a busy machine, sends several at once.
        if b"899\\n" in frames[-1].bytes:
            flooded.set()
        # Slower than the kernel sends, so that a backlog builds up: a spin, as a
        # sleep's wake-up on a busy machine can take milliseconds, 900 times.
        until = time.perf_counter() + 0.0005
        while time.perf_counter() < until:
            pass
        take(self, frames, session)

    monkeypatch.setattr(SandboxedKernel, "_take_iopub", slowly)
    seen = [taken]

    async def tick() -> None:  # what every other task of the engine gets to do
        while True:
            seen.append(taken)
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    try:
        # A thread the cell leaves behind keeps printing, a message per line at
        # most: fewer than zmq keeps queued on either side alone (1,000), so none
        # is dropped even when the engine's zmq thread is slow to move them.
        r = await k.execute(
            "import threading\n"
            "def flood():\n"
            "    for i in range(900):\n"
            "        print(i, flush=True)\n"
            "threading.Thread(target=flood).start()"
        )
        assert r.status == "ok"
        async with asyncio.timeout(30):
            await flooded.wait()
    finally:
        ticker.cancel()
    steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert max(steps) <= kernel_module._IOPUB_BATCH, "the IOPub reader held the event loop"
    assert (await k.execute("6 * 7")).text == "42"


async def test_a_cell_whose_idle_status_was_dropped_ends_at_its_reply(
    kernel_factory: KernelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zmq drops what queues past its limit, the idle status with the rest."""
    k = await kernel_factory()
    add = kernel_module._CellOutput.add

    def losing_idle(self: Any, msg: dict[str, Any], size: int) -> None:
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            return  # as if zmq had dropped it
        add(self, msg, size)

    monkeypatch.setattr(kernel_module._CellOutput, "add", losing_idle)
    r = await k.execute("print('out')\n6 * 7", timeout_s=30)
    assert (r.status, r.text, r.stdout, r.kernel_alive) == ("ok", "42", "out\n", True), r
    assert r.message is not None and "zmq dropped" in r.message
    r = await k.execute("1 / 0", timeout_s=30)
    assert r.status == "error" and r.error is not None and r.error.name == "ZeroDivisionError"
    monkeypatch.undo()
    assert (await k.execute("1 + 1")).text == "2"


async def test_shutdown_under_a_silent_cell_whose_reply_is_being_asked_for_gives_killed(
    kernel_factory: KernelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell channel is asked for a silent cell's reply; shutdown closes it meanwhile."""
    k = await kernel_factory()
    monkeypatch.setattr(kernel_module, "_IDLE_LOST_S", 0.3)
    asked = asyncio.Event()
    ask = SandboxedKernel._shell_reply

    async def asking(self: SandboxedKernel, msg_id: str, within_s: float) -> dict[str, Any]:
        asked.set()
        return await ask(self, msg_id, within_s)

    monkeypatch.setattr(SandboxedKernel, "_shell_reply", asking)
    cell = asyncio.ensure_future(k.execute("import time; time.sleep(30)"))
    await asyncio.wait_for(asked.wait(), 10)
    await k.shutdown()
    r = await asyncio.wait_for(cell, 5)
    assert r.status == "killed" and "shut down while the cell ran" in (r.message or ""), r


@pytest.mark.parametrize("when", ["before", "while"])
async def test_shutdown_as_a_finished_cells_reply_is_read_gives_killed(
    kernel_factory: KernelFactory, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The cell's end has come, its reply not yet: shutdown closes the channel it is read on."""
    k = await kernel_factory()
    reading, shut = asyncio.Event(), asyncio.Event()
    read = SandboxedKernel._shell_reply

    async def read_as_it_shuts_down(
        self: SandboxedKernel, msg_id: str, within_s: float
    ) -> dict[str, Any]:
        reading.set()
        if when == "before":
            await shut.wait()
            return await read(self, msg_id, within_s)
        # A reply that never comes: the read waits on the channel as it is closed.
        return await read(self, "not-a-cell", 30)

    monkeypatch.setattr(SandboxedKernel, "_shell_reply", read_as_it_shuts_down)
    cell = asyncio.ensure_future(k.execute("1 + 1"))
    await asyncio.wait_for(reading.wait(), 10)
    await k.shutdown()
    shut.set()
    r = await asyncio.wait_for(cell, 5)
    assert (r.status, r.message) == kernel_module._SHUT_DOWN and not r.kernel_alive, r


async def test_a_cell_that_sees_its_kernel_end_before_its_shutdown_wakes_it_gives_killed(
    kernel_factory: KernelFactory, held_shutdowns: HeldShutdowns
) -> None:
    """Shutting down marks the kernel ended, then wakes the cell: it may see the end first."""
    k = await kernel_factory()
    cell = await cell_under_way(k, "print('sleeping', flush=True); import time; time.sleep(30)")
    shutdown = asyncio.ensure_future(k.shutdown())
    try:
        r = await asyncio.wait_for(cell, 10)
    finally:
        held_shutdowns.gate.set()
        await shutdown
    assert (r.status, r.message) == kernel_module._SHUT_DOWN, r


def _stream_frame(text: str, name: str = "stdout") -> bytes:
    """A stream message's content frame as ipykernel and jupyter_client pack it."""
    return json.dumps({"name": name, "text": text}, ensure_ascii=False).encode()


def test_a_stream_message_too_large_to_parse_keeps_its_head_and_tail() -> None:
    # Escapes and multi-byte characters everywhere, so that each end is cut
    # inside one wherever the cut falls.
    alphabet = 'é\n"\\\t€'
    for shift in range(len(alphabet)):
        text = "<" + (alphabet[shift:] + alphabet * 40_000) + ">"
        out = kernel_module._CellOutput(output_max_bytes=4096)
        out.cut("stream", memoryview(_stream_frame(text, "stderr")))
        kept, truncated = out.stderr.value()
        assert truncated and out.stdout.value() == ("", False)
        head, note, tail = kept.partition(" bytes cut ...]\n")
        assert head.startswith("<" + alphabet[shift:]) and tail.endswith(alphabet + ">"), kept
        assert set(head.split("\n[... ")[0] + tail) <= set(alphabet + "<>"), kept
        assert 2000 < len(kept.encode()) <= 4096 + 64, len(kept.encode())


def test_a_display_value_or_error_too_large_to_parse_is_counted_as_cut() -> None:
    out = kernel_module._CellOutput(output_max_bytes=4096)
    for kind in ("display_data", "execute_result"):
        out.cut(kind, b'{"data": {"text/plain": "' + b"x" * 1000 + b'"}}')
    out.cut("error", b'{"ename": "ValueError", "evalue": "' + b"z" * 1000 + b'"}')
    assert out.displays_truncated and out.displays == [] and out.value is None
    assert out.error is not None and "too large to read" in out.error.value


def test_a_value_beyond_what_a_cell_keeps_of_its_displays_is_left_out() -> None:
    out = kernel_module._CellOutput(output_max_bytes=4096)
    shown = {"msg_type": "display_data", "content": {"data": {"text/plain": "a"}}}
    value = {"msg_type": "execute_result", "content": {"data": {"text/plain": "b"}}}
    out.add(shown, kernel_module._DISPLAY_MAX_BYTES - 10)
    out.add({**value, "content": {**value["content"], "execution_count": 3}}, 11)
    assert len(out.displays) == 1 and out.value is None and out.displays_truncated
    assert out.execution_count == 3
    fresh = kernel_module._CellOutput(output_max_bytes=4096)
    fresh.add(value, 11)
    assert fresh.value is not None and not fresh.displays_truncated


def _set_up_module() -> ModuleType:
    """The set-up cell's runtime module, loaded as the kernel loads it (its own name)."""
    path = data_dir("kernels") / "runtime" / "_sandkernel_setup.py"
    spec = importlib.util.spec_from_file_location("_sandkernel_setup", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_prewarm_import_failing_oddly_is_reported_and_the_set_up_cell_goes_on(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    class Finder:
        def find_spec(self, name: str, *args: object) -> None:
            if name == "odd_prewarm_module":
                raise Unprintable
            return None

    monkeypatch.setattr("sys.meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setitem(sys.modules, "_sandkernel_setup", _set_up_module())
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    namespace: dict[str, Any] = {}
    modules = ("odd_prewarm_module", "no_such_prewarm_module", "colorsys")
    line = kernel_module._set_up_cell(False, modules)
    exec(compile(line, "<set-up>", "exec"), namespace)  # noqa: S102 - the cell's own line
    # Each module was tried, the one that imports is imported, and the user's
    # namespace has none of their names (nor any other name of the line's).
    assert "colorsys" in sys.modules
    assert set(namespace) == {"__builtins__"}
    failed = kernel_module._prewarm_failures(capsys.readouterr().err)
    assert failed == {
        "odd_prewarm_module": "?",
        "no_such_prewarm_module": "ModuleNotFoundError: No module named 'no_such_prewarm_module'",
    }


def test_the_prewarm_report_is_read_with_the_prefix_the_runtime_writes() -> None:
    assert _set_up_module().PREWARM_FAILED == kernel_module._PREWARM_FAILED
