"""The blocking facade, and SIGTERM in a process that embeds the engine."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import pytest

from sandkernel.api import EngineAPI, SessionAPI
from sandkernel.config import EngineConfig
from sandkernel.errors import EngineClosed
from sandkernel.sandbox import CgroupLayout, iter_sandkernel_cgroups
from sandkernel.sync import BlockingEngine, BlockingSession, Engine
from tests.conftest import engine_process, runtime_root


def _contract_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(protocol, inspect.isfunction)
        if not name.startswith("_")
    }


def _same_parameters(blocking: inspect.Signature, contract: inspect.Signature) -> bool:
    def shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    return shape(blocking) == shape(contract)


@pytest.mark.parametrize(
    ("facade", "protocol", "renamed"),
    [(BlockingEngine, EngineAPI, {"aclose": "close"}), (BlockingSession, SessionAPI, {})],
)
def test_the_blocking_facade_has_every_method_of_the_contract_with_its_parameters(
    facade: type, protocol: type, renamed: dict[str, str]
) -> None:
    contract = _contract_methods(protocol)
    assert len(contract) >= 9  # the protocols were read, not an empty list
    for name, signature in contract.items():
        blocking = getattr(facade, renamed.get(name, name), None)
        assert blocking is not None, f"{facade.__name__} has no {name}"
        assert _same_parameters(inspect.signature(blocking), signature), name
    properties = [n for n, m in inspect.getmembers(protocol) if isinstance(m, property)]
    assert properties == ([] if protocol is EngineAPI else ["agent_id", "id"])
    for name in properties:
        assert isinstance(getattr(facade, name, None), property), f"{facade.__name__}.{name}"


def test_the_blocking_engine_takes_what_the_embedded_engines_session_takes() -> None:
    from sandkernel import engine as embedded

    assert "workspace" in inspect.signature(embedded.Engine.session).parameters
    assert _same_parameters(
        inspect.signature(Engine.session), inspect.signature(embedded.Engine.session)
    )


@pytest.mark.sandbox
def test_a_blocking_session_can_have_a_host_folder_as_its_workspace(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    with Engine(
        pool_size=0, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path / "store"
    ) as engine:
        session = engine.session(workspace=workspace)
        assert session.run("open('/mnt/data/out.txt', 'w').write('kept')").status == "ok"
        session.close()
    assert (workspace / "out.txt").read_text() == "kept"


def test_every_blocking_backend_is_the_one_facade() -> None:
    from sandkernel.daemon import Client

    assert issubclass(Engine, BlockingEngine) and issubclass(Client, BlockingEngine)


@pytest.mark.sandbox
def test_sync_engine_runs_cells_with_state(tmp_path: Path) -> None:
    with Engine(
        pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path
    ) as engine:
        session = engine.session("sync-1")
        session.run("total = 40")
        result = session.run("total + 2")
        assert result.text == "42"
        assert engine.get_session("sync-1").id == "sync-1"
        assert [s.id for s in engine.sessions()] == ["sync-1"]
        assert engine.stats().sessions_active == 1
        session.close()
        assert engine.stats().sessions_closed == 1


@pytest.mark.sandbox
def test_sync_engine_takes_a_config_as_the_engine_does(tmp_path: Path) -> None:
    config = EngineConfig(
        pool_size=0, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path
    )
    with Engine(config, max_sessions=3) as engine:
        assert engine.backend.config.pool_size == 0
        assert engine.backend.config.max_sessions == 3  # keywords over the config, as there


@pytest.mark.sandbox
def test_sigterm_in_an_embedding_process_ends_every_kernel(tmp_path: Path, short_dir: Path) -> None:
    root = short_dir / "rt"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import pathlib, time
        from sandkernel.sync import Engine
        engine = Engine(pool_size=2, prewarm_imports=(), runtime_dir={str(root)!r},
                        store_dir={str(tmp_path / "store")!r})
        s = engine.session("x")
        s.run("1")
        pathlib.Path({str(ready)!r}).write_text(engine.backend._host.owner)
        time.sleep(60)
    """)
    with engine_process(script, ready) as (proc, owner):
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    assert [p.name for p in root.iterdir() if p.name != "owners"] == []
    assert not [p for p in iter_sandkernel_cgroups(CgroupLayout.detect()) if owner in p.name]


@pytest.mark.sandbox
def test_after_close_calls_raise_engine_closed_and_a_sessions_close_does_nothing(
    tmp_path: Path,
) -> None:
    """As the async API: not anyio's RuntimeError of a portal no longer running."""
    engine = Engine(pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path)
    session = engine.session()
    stream = session.stream("print(1)\n2")
    next(stream)
    engine.close()
    with pytest.raises(EngineClosed):
        session.run("1")
    with pytest.raises(EngineClosed):
        engine.session()
    with pytest.raises(EngineClosed):
        engine.stats()
    with pytest.raises(EngineClosed):
        next(stream)
    session.close()  # ended with its engine: nothing to do
    engine.close()  # idempotent


@pytest.mark.sandbox
@pytest.mark.parametrize("then", ["kept", "dropped"])
def test_an_engine_its_program_never_closes_is_closed_as_the_interpreter_ends(
    tmp_path: Path, short_dir: Path, then: str
) -> None:
    root = short_dir / "rt"
    script = textwrap.dedent(f"""
        from sandkernel.sync import Engine
        # Without a SIGTERM handler, which would refer to it.
        engine = Engine(pool_size=1, prewarm_imports=(), runtime_dir={str(root)!r},
                        store_dir={str(tmp_path / "store")!r}, handle_sigterm=False)
        print(engine.backend._host.owner)
        session = engine.session("x")
        print(session.run("6 * 7").text)
        if {then!r} == "dropped":  # nothing refers to it any more
            del engine, session
        # no close(): the interpreter ends here
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    owner, answer = done.stdout.split()
    assert answer == "42"
    assert [p.name for p in root.iterdir() if p.name != "owners"] == []
    assert not [p for p in iter_sandkernel_cgroups(CgroupLayout.detect()) if owner in p.name]


@pytest.mark.sandbox
def test_a_close_while_another_thread_closes_returns_once_the_engine_is_closed(
    tmp_path: Path,
) -> None:
    engine = Engine(pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path)
    engine.session().run("1")
    backend = engine.backend
    closing = threading.Event()
    stop_backend = engine._backend_cm.__exit__

    def stop_backend_seen(*exc: object) -> object:
        closing.set()
        return stop_backend(*exc)

    engine._backend_cm.__exit__ = stop_backend_seen  # type: ignore[method-assign]
    first = threading.Thread(target=engine.close)
    first.start()
    try:
        assert closing.wait(30)
        engine.close()
        assert backend._state == "closed"  # not only begun by the other thread
    finally:
        first.join(timeout=30)


@pytest.mark.sandbox
def test_an_engine_closed_from_another_thread_leaves_sigterm_to_the_next_one(
    tmp_path: Path,
) -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    first = Engine(pool_size=0, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path)
    closing = threading.Thread(target=first.close)
    closing.start()
    closing.join(timeout=30)
    second = Engine(pool_size=0, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path)
    try:
        assert signal.getsignal(signal.SIGTERM) == second._on_sigterm
    finally:
        second.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class _Interrupted(BaseException):
    """Raised by a signal handler in the waiting thread: not Ctrl-C, any exception."""


class _Interruption(NamedTuple):
    send: Callable[[], None]  # interrupts the test's thread, once, from any thread
    raises: type[BaseException]  # what the test's thread then raises


@pytest.fixture(params=[signal.SIGINT, signal.SIGUSR1], ids=["ctrl-c", "any-exception"])
def interruption(request: pytest.FixtureRequest) -> Iterator[_Interruption]:
    signum: int = request.param
    main = threading.main_thread()
    assert threading.current_thread() is main  # where a signal's handler runs
    sent = threading.Event()

    def send() -> None:
        if not sent.is_set():
            sent.set()
            assert main.ident is not None
            signal.pthread_kill(main.ident, signum)

    if signum == signal.SIGINT:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        yield _Interruption(send, KeyboardInterrupt)
        return

    def raise_interrupted(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    previous = signal.signal(signum, raise_interrupted)
    try:
        yield _Interruption(send, _Interrupted)
    finally:
        signal.signal(signum, previous)


# Interrupted once it has started; sets ``x`` only if it runs to its end.
_LONG_CELL = "import time\nprint('started', flush=True)\ntime.sleep(30)\nx = 1"


def _says_started(event: object) -> bool:
    return (
        isinstance(event, dict)
        and event.get("msg_type") == "stream"
        and "started" in event["content"]["text"]
    )


@pytest.mark.sandbox
def test_a_blocking_run_interrupted_in_its_thread_interrupts_the_cell_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: _Interruption
) -> None:
    """As the async API's cancelled task: the cell is interrupted before the call raises."""
    with Engine(
        pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path
    ) as engine:
        session = engine.session("interrupted")
        session.run("kept = 1")
        behind = engine.call(engine.backend.get_session, session.id)  # what the facade drives

        def on_output(message: dict[str, Any]) -> None:
            if _says_started(message):  # in the loop's thread, while run() waits for the cell
                interruption.send()

        monkeypatch.setattr(behind, "run", partial(behind.run, on_output=on_output))
        began = time.monotonic()
        with pytest.raises(interruption.raises):
            session.run(_LONG_CELL, timeout_s=60)
        assert time.monotonic() - began < 20  # not the cell's 30 s

        began = time.monotonic()
        after = session.run("print('x' in dir(), kept)")
        assert time.monotonic() - began < 5  # at once: no cell left running before it
        assert after.stdout == "False 1\n"  # interrupted, not run to its end; the kernel kept


@pytest.mark.sandbox
def test_a_blocking_stream_interrupted_in_its_thread_interrupts_the_cell_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: _Interruption
) -> None:
    """The interruption, not the RuntimeError of closing an async generator that runs."""
    with Engine(
        pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path
    ) as engine:
        session = engine.session("streamed")
        behind = engine.call(engine.backend.get_session, session.id)
        stream = behind.stream

        async def interrupted_while_waiting(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async for event in stream(*args, **kwargs):
                yield event
                if _says_started(event):  # resumed when the next is asked for: the caller waits
                    interruption.send()

        monkeypatch.setattr(behind, "stream", interrupted_while_waiting)
        seen: list[object] = []
        began = time.monotonic()
        with pytest.raises(interruption.raises):
            for event in session.stream(_LONG_CELL, timeout_s=60):
                seen.append(event)
        assert time.monotonic() - began < 20  # not the cell's 30 s
        assert _says_started(seen[-1])

        began = time.monotonic()
        after = session.run("print('x' in dir())")
        assert time.monotonic() - began < 5
        assert after.stdout == "False\n"
