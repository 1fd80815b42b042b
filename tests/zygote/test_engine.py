"""The pool refills from the zygote, and falls back to cold starts when it is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sandkernel.config import FORKED_CONCURRENT_STARTS, EngineConfig
from sandkernel.engine import Engine
from sandkernel.errors import SelfCheckFailed
from sandkernel.policy import load_policy
from sandkernel.session import Session

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

EngineFactory = Callable[..., Awaitable[Any]]


@pytest.fixture(params=[True, False], ids=["forked", "cold"])
async def forked_or_cold(request: pytest.FixtureRequest, engine_factory: EngineFactory) -> Session:
    """A session of an engine whose kernels are forked from the zygote, or started cold."""
    zygote: bool = request.param
    engine: Engine = await engine_factory(zygote=zygote)
    session = await engine.session()
    assert session.kernel is not None and (session.kernel.forked_pid is not None) == zygote
    return session


def test_the_zygote_is_a_setting_users_can_turn_off() -> None:
    assert EngineConfig(zygote=False).zygote is False
    assert EngineConfig(zygote=True).zygote is True


def test_forked_starts_run_more_at_once_unless_the_user_set_how_many() -> None:
    assert EngineConfig(zygote=False).max_concurrent_starts == 2
    assert EngineConfig(zygote=True).max_concurrent_starts == FORKED_CONCURRENT_STARTS > 2
    assert EngineConfig(zygote="true").max_concurrent_starts == FORKED_CONCURRENT_STARTS
    assert EngineConfig(zygote=True, max_concurrent_starts=1).max_concurrent_starts == 1
    assert (
        EngineConfig.build(None, {"zygote": True}).max_concurrent_starts == FORKED_CONCURRENT_STARTS
    )


async def _until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not hold in time")
        await asyncio.sleep(0.05)  # the pool's refills have no event to wait on from here


async def test_pool_kernels_are_forked_and_self_checked(engine_factory: EngineFactory) -> None:
    engine: Engine = await engine_factory(zygote=True, pool_size=2)
    session = await engine.session()
    assert session.kernel is not None and session.kernel.forked_pid is not None
    r = await session.run("import os\n(os.getuid(), os.getpid())")
    assert r.status == "ok" and r.text == "(65534, 3)"
    zygotes = engine.zygotes
    assert zygotes is not None and zygotes.status().startswith("zygote fork")
    assert (await engine.stats()).pool.kernel_start == zygotes.status()


async def test_a_kernel_sends_its_reply_without_ipykernels_sleep_and_ends_with_its_output(
    forked_or_cold: Session,
) -> None:
    session = forked_or_cold
    r = await session.run("print('x' * 100_000, end=''); get_ipython().kernel._execute_sleep")
    assert r.status == "ok" and r.text == "0.0" and r.stdout == "x" * 100_000


async def test_the_iopub_thread_scheduling_on_itself_never_waits_on_itself(
    forked_or_cold: Session,
) -> None:
    """Each flush it runs schedules its send; past the pipe's 1,000 wake-ups ipykernel's hung."""
    session = forked_or_cold
    r = await session.run(
        "import threading\n"
        "pub = get_ipython().kernel.iopub_thread\n"
        "order, done = [], threading.Event()\n"
        "def burst():\n"
        "    for i in range(5000):\n"
        "        pub.schedule(lambda i=i: order.append(i))\n"
        "    pub.schedule(done.set)\n"
        "pub.schedule(burst)\n"
        "done.wait(10), order == list(range(5000))",
        timeout_s=20,
    )
    assert r.status == "ok" and r.text == "(True, True)", (r.status, r.text, r.message)
    assert (await session.run("print('still here')")).stdout == "still here\n"


#: Counts, in the kernel, the flushes its streams hand to the IOPub thread and wait on.
_COUNT_HANDED_FLUSHES = """
import sys
from ipykernel.iostream import OutStream as _Stock
_handed = []
_stock_flush = _Stock.flush
def _counting(self):
    _handed.append(self.name)
    _stock_flush(self)
_Stock.flush = _counting
"""


async def test_a_cell_that_writes_nothing_waits_on_no_flush_and_output_still_arrives(
    forked_or_cold: Session,
) -> None:
    session = forked_or_cold
    assert (await session.run(_COUNT_HANDED_FLUSHES)).status == "ok"
    assert (await session.run("1+1")).text == "2"
    r = await session.run("n = len(_handed); _handed.clear(); n")
    assert r.text == "0", "a cell without output handed flushes to the IOPub thread"
    # Output is still flushed, complete and in order, before the cell ends.
    r = await session.run(
        "import sys, threading\nprint('a')\nprint('e', file=sys.stderr)\n"
        "t = threading.Thread(target=print, args=('from a thread',)); t.start(); t.join()\n"
        "display('shown')\nprint('b')\n7"
    )
    assert r.stdout == "a\nfrom a thread\nb\n" and r.stderr == "e\n" and r.text == "7", r
    assert [d.data["text/plain"] for d in r.displays] == ["'shown'"]
    r = await session.run("sorted(set(_handed))")
    assert r.text == "['stderr', 'stdout']"


async def test_the_main_thread_reads_the_shell_requests_and_no_subshell_is_offered(
    forked_or_cold: Session,
) -> None:
    session = forked_or_cold
    r = await session.run(
        "import threading\nk = get_ipython().kernel\n"
        "sorted(t.name for t in threading.enumerate()), k.kernel_info['supported_features']"
    )
    names, features = eval(r.text)  # noqa: S307 - the repr of two lists of strings
    assert "MainThread" in names and "Shell channel" not in names, names
    assert "kernel subshells" not in features
    # A cell with top-level await runs on the main thread's loop, as any other.
    r = await session.run("import asyncio\nawait asyncio.sleep(0.01)\nprint('slept')\n6 * 7")
    assert r.status == "ok" and r.stdout == "slept\n" and r.text == "42", r
    r = await session.run("import time\nwhile True: time.sleep(0.01)", timeout_s=0.5)
    assert r.status == "timeout" and r.kernel_alive, r


async def test_without_debugpy_the_kernel_connects_no_debugger_socket_to_its_shell(
    forked_or_cold: Session,
) -> None:
    """A forked kernel never has debugpy; a cold one has it where the runtime does."""
    session = forked_or_cold
    r = await session.run(
        "from ipykernel.debugger import _is_debugpy_available\n"
        "k = get_ipython().kernel\n"
        "_is_debugpy_available, k.debug_shell_socket is None, k.control_thread.is_alive()"
    )
    debugger, no_socket, control_thread = eval(r.text)  # noqa: S307 - a tuple of booleans
    assert no_socket is not debugger, (debugger, no_socket)
    assert control_thread


async def test_the_kernel_makes_no_log_record_its_handler_drops_and_still_logs_warnings(
    forked_or_cold: Session,
) -> None:
    session = forked_or_cold
    await session.run(
        "import logging\nlog = get_ipython().kernel.log\nmade = []\n"
        "class Seen(logging.Filter):\n"
        "    def filter(self, record):\n"
        "        made.append(record.levelname)\n"
        "        return False\n"
        "seen = Seen()\nlog.addFilter(seen)"
    )
    assert (await session.run("1 + 1")).text == "2"  # ipykernel logs each request at debug
    r = await session.run(
        "log.debug('d')\nlog.warning('w')\nlog.removeFilter(seen)\n"
        "made, [h.level for h in log.handlers]"
    )
    made, handler_levels = eval(r.text)  # noqa: S307 - the repr of two lists
    assert made == ["WARNING"], f"records made that the handler drops: {made}"
    assert handler_levels == [logging.WARNING]


async def test_a_cell_awaiting_past_its_timeout_is_interrupted_and_the_kernel_survives(
    forked_or_cold: Session,
) -> None:
    session = forked_or_cold
    await session.run("kept = 'yes'")
    # Far longer than the interrupt's grace: a kernel that waits the sleep out is killed.
    r = await session.run("import asyncio\nawait asyncio.sleep(600)", timeout_s=0.5)
    assert r.status == "timeout" and r.kernel_alive and not r.state_lost, r
    assert r.error is not None and r.error.name == "CancelledError"
    assert (await session.run("kept")).text == "'yes'"


async def test_a_forked_kernel_shows_figures_as_png_as_a_cold_one(
    engine_factory: EngineFactory,
) -> None:
    # matplotlib is imported in the zygote, before any kernel's shell exists
    engine: Engine = await engine_factory(zygote=True, prewarm_imports=("matplotlib.pyplot",))
    session = await engine.session()
    assert session.kernel is not None and session.kernel.forked_pid is not None
    at_the_end = await session.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])")
    shown = await session.run("plt.figure()\nplt.plot([3, 2])\nplt.show()")
    for result in (at_the_end, shown):
        assert result.status == "ok"
        assert any("image/png" in d.data for d in result.displays), result.displays


async def test_killing_the_zygote_mid_refill_loses_no_session_and_the_pool_recovers(
    engine_factory: EngineFactory,
) -> None:
    engine: Engine = await engine_factory(zygote=True, pool_size=2, refill_delay_s=0)
    zygotes = engine.zygotes
    assert zygotes is not None
    held = [await engine.session() for _ in range(2)]  # both refills start now
    first = zygotes.zygote
    assert first is not None and first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    # New sessions meanwhile: every one gets a working kernel (cold, or forked again).
    more = [await engine.session() for _ in range(3)]
    for session in held + more:
        r = await session.run("6 * 7")
        assert r.status == "ok" and r.text == "42", r
    await _until(lambda: zygotes.zygote is not None and zygotes.zygote is not first)
    fresh = await engine.session()
    await _until(lambda: zygotes.forks > 0 and zygotes.status().startswith("zygote fork"))
    assert (await fresh.run("1 + 1")).text == "2"
    assert zygotes.restarts >= 2
    # And it forks again: the next kernels come from the new zygote.
    forked_before = zygotes.forks
    later = [await engine.session() for _ in range(3)]
    await _until(lambda: zygotes.forks > forked_before)
    for session in later:
        assert (await session.run("2 + 2")).text == "4"
    stats = await engine.stats()
    assert stats.pool.kernels_failed == 0, stats.pool.last_start_error


async def test_with_the_setting_off_kernels_start_cold(engine_factory: EngineFactory) -> None:
    engine: Engine = await engine_factory(zygote=False)
    session = await engine.session()
    assert engine.zygotes is None
    assert session.kernel is not None and session.kernel.forked_pid is None
    assert (await engine.stats()).pool.kernel_start == "cold start (zygote=False)"


async def test_a_forked_kernel_that_fails_its_outside_check_is_destroyed_and_replaced_cold(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the zygote's child did is checked, not trusted: a mismatch is never served."""
    import sandkernel.kernel

    def mismatch(jail: Any, forked: Any) -> int:
        raise SelfCheckFailed("forked kernel failed its outside check: CapEff is '1'")

    monkeypatch.setattr(sandkernel.kernel, "verify_forked", mismatch)
    engine: Engine = await engine_factory(zygote=True, pool_size=1)
    session = await engine.session()
    assert session.kernel is not None and session.kernel.forked_pid is None  # cold
    assert (await session.run("1 + 1")).text == "2"
    zygotes = engine.zygotes
    assert zygotes is not None and zygotes.fallbacks >= 1
    assert "outside check" in (zygotes.last_error or "")


async def test_a_forked_kernels_import_path_is_a_cold_ones(engine_factory: EngineFactory) -> None:
    paths = []
    for zygote in (True, False):
        engine: Engine = await engine_factory(zygote=zygote)
        session = await engine.session()
        assert session.kernel is not None and (session.kernel.forked_pid is not None) == zygote
        r = await session.run("import sys\nprint(sys.path)")
        assert r.status == "ok", r
        paths.append(r.stdout)
    forked, cold = paths
    assert forked == cold


async def test_an_engine_whose_policy_env_a_fork_cannot_honour_starts_its_kernels_cold(
    engine_factory: EngineFactory,
) -> None:
    env = {"LC_ALL": "C", "TZ": "Asia/Tokyo", "IPYTHONDIR": "/mnt/data/.ipy"}
    engine: Engine = await engine_factory(
        zygote=True, policy=load_policy(None).model_copy(update={"env": env})
    )
    session = await engine.session()
    assert session.kernel is not None and session.kernel.forked_pid is None
    r = await session.run(
        "import locale, time\nprint(locale.setlocale(locale.LC_CTYPE), time.tzname[0],"
        " get_ipython().profile_dir.location)"
    )
    assert r.stdout == "C JST /mnt/data/.ipy/profile_default\n", r
    zygotes = engine.zygotes
    assert zygotes is not None and zygotes.forks == 0
    assert "cold start" in zygotes.status() and "IPYTHONDIR, LC_ALL, TZ" in zygotes.status()
    # Told to operators where they look: the engine's (and the daemon's) stats.
    assert (await engine.stats()).pool.kernel_start == zygotes.status()


async def test_a_stalled_zygote_holds_new_sessions_up_a_few_seconds_and_is_replaced(
    engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine: Engine = await engine_factory(zygote=True, pool_size=1, refill_delay_s=0)
    zygotes, pool = engine.zygotes, engine._pool
    assert zygotes is not None and pool is not None
    running = await engine.session()
    assert running.kernel is not None and running.kernel.forked_pid is not None
    await _until(lambda: pool.stats().warm == 1)  # the refill is forked, and the zygote idle
    stalled = zygotes.zygote
    assert stalled is not None and stalled.pid is not None
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        await engine.session()  # the warm kernel; its refill finds the zygote stalled
        started = time.monotonic()
        later = await engine.session()
        waited = time.monotonic() - started
        assert later.kernel is not None and later.kernel.forked_pid is None  # cold
        # The reply's deadline and a cold start (a second or two, more under load).
        assert waited < 30, f"a new session waited {waited:.1f} s for a stalled zygote"
        assert "the zygote did not answer within 5 s" in caplog.text
        r = await running.run("6 * 7")
        assert r.status == "ok" and r.text == "42", r
        # Ended (a stopped process dies of SIGKILL) and replaced by the next
        # starts (the supervisor's): kernels are forked again.
        assert stalled.process is not None and stalled.process.poll() is not None
        forked_before = zygotes.forks
        fresh = await engine.session()
        await _until(lambda: zygotes.forks > forked_before)
        assert zygotes.zygote not in (None, stalled) and zygotes.restarts >= 2
        assert (await fresh.run("1 + 1")).text == "2"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stalled.pid, signal.SIGCONT)
