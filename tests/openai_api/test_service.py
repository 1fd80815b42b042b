"""The Assistants service's own bookkeeping, on its state alone (no engine, no model)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, cast

import pytest

from sandkernel.api import EngineAPI
from sandkernel.openai_api import service as service_module
from sandkernel.openai_api.errors import APIError
from sandkernel.openai_api.events import RunEvents
from sandkernel.openai_api.keepalive import Renew
from sandkernel.openai_api.runs import Waiting
from sandkernel.openai_api.service import AssistantsService
from sandkernel.openai_api.wire import (
    Container,
    ContainerExpiry,
    FunctionCallDetails,
    FunctionToolCall,
    Run,
    RunStep,
    SubmitToolOutputs,
    Thread,
)
from tests.openai_api._objects import make_step

pytestmark = pytest.mark.anyio


def _run(status: str, **fields: Any) -> Run:
    return Run.model_validate(
        {
            "id": "run-1",
            "created_at": 1,
            "thread_id": "thread-t",
            "assistant_id": "asst-a",
            "status": status,
            "model": "m",
            "instructions": "",
            **fields,
        }
    )


def _service(tmp_path: Path) -> AssistantsService:
    # Nothing here reaches an engine or a model.
    return AssistantsService(cast(EngineAPI, None), tmp_path / "state.sqlite3", model=None)


async def test_a_run_task_that_ends_late_leaves_its_next_tasks_bookkeeping(tmp_path: Path) -> None:
    service = _service(tmp_path)
    first_running, release_first, second_running, release_second = (
        asyncio.Event() for _ in range(4)
    )
    drives = 0

    async def drive(run_id: str) -> None:
        nonlocal drives
        drives += 1
        if drives == 1:
            first_running.set()
            await release_first.wait()  # a task that committed, and is slow to end
        else:
            second_running.set()
            await release_second.wait()

    service.driver.drive = drive  # type: ignore[method-assign]
    run = _run("queued")
    async with service:
        service._start(run, stream=False)
        first_ended = service._finished[run.id]
        async with asyncio.timeout(10):
            await first_running.wait()
        # The run's next task (its tool outputs came), started before the first ended.
        service._start(run, stream=False)
        second_ends = service._finished[run.id]
        async with asyncio.timeout(10):
            await second_running.wait()
            release_first.set()
            await first_ended.wait()
        # The second task is still the run's: a cancel reaches it and can be waited for.
        assert service._finished.get(run.id) is second_ends
        assert run.id in service._scopes
        release_second.set()


async def test_a_waiting_runs_session_is_held_until_its_outputs_come_and_not_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(tmp_path)
    holding, hold_ended = asyncio.Event(), asyncio.Event()
    holds = 0

    async def hold(renew: Renew) -> None:
        nonlocal holds
        holds += 1
        holding.set()
        try:
            await asyncio.Event().wait()  # renewing, until cancelled
        finally:
            hold_ended.set()

    monkeypatch.setattr(service_module, "hold", hold)
    slow_wait_saved, slow_task_returns = asyncio.Event(), asyncio.Event()
    drives = 0

    async def drive(run_id: str) -> Waiting | None:
        nonlocal drives
        drives += 1
        this = drives
        if this == 2:
            # Saved as waiting; its outputs come before this task has returned.
            slow_wait_saved.set()
            await slow_task_returns.wait()
        return Waiting(_never_renewed, time.time() + 600) if this <= 2 else None

    service.driver.drive = drive  # type: ignore[method-assign]
    run = _run("queued")
    async with service:
        service._start(run, stream=False)
        async with asyncio.timeout(10):
            await holding.wait()  # left waiting: its session is held
        # Its outputs came: the hold ends, and the run's next task drives it.
        service._release(run.id)
        async with asyncio.timeout(10):
            await hold_ended.wait()
        service._start(run, stream=False)
        slow_task_ended = service._finished[run.id]
        async with asyncio.timeout(10):
            await slow_wait_saved.wait()
        service._start(run, stream=False)  # the outputs of that wait, before its task ended
        slow_task_returns.set()
        async with asyncio.timeout(10):
            await slow_task_ended.wait()
        await asyncio.sleep(0)  # a hold it had started would have begun by now
        # The task that returned late holds nothing: the run went on without it.
        assert (holds, run.id in service._holds) == (1, False)


async def _never_renewed() -> float:
    raise AssertionError("the hold is replaced in this test")


async def test_a_hold_ends_when_the_runs_wait_for_outputs_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(tmp_path)
    renewals = 0
    hold_ended = asyncio.Event()
    real_hold = service_module.hold

    async def renew() -> float:
        nonlocal renewals
        renewals += 1
        return time.time() + 60  # next renewal 20 s away: only the deadline ends it sooner

    async def watched_hold(renew: Renew) -> None:
        try:
            await real_hold(renew)
        finally:
            hold_ended.set()

    async def drive(run_id: str) -> Waiting:
        return Waiting(renew, time.time() + 0.3)  # its wait is over in 0.3 s

    monkeypatch.setattr(service_module, "hold", watched_hold)
    service.driver.drive = drive  # type: ignore[method-assign]
    run = _run("queued")
    async with service:
        service._start(run, stream=False)
        async with asyncio.timeout(10):
            await hold_ended.wait()
        assert (renewals, run.id in service._holds) == (1, False)


class _ClosingEngine:
    """An engine whose sessions close at once (all a thread's deletion asks of it)."""

    async def close_session(self, session_id: str) -> None:
        return None


async def test_deleting_a_thread_ends_the_hold_on_its_waiting_runs_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = AssistantsService(
        cast(EngineAPI, _ClosingEngine()), tmp_path / "state.sqlite3", model=None
    )
    holding, hold_ended = asyncio.Event(), asyncio.Event()

    async def hold(renew: Renew) -> None:
        holding.set()
        try:
            await asyncio.Event().wait()  # renewing, until cancelled
        finally:
            hold_ended.set()

    waiting = _run("requires_action", expires_at=int(time.time()) + 600)

    async def drive(run_id: str) -> Waiting:
        service.state.save(waiting)
        return Waiting(_never_renewed, time.time() + 600)

    monkeypatch.setattr(service_module, "hold", hold)
    service.driver.drive = drive  # type: ignore[method-assign]
    async with service:
        service.state.save(Thread(id="thread-t", created_at=1))
        service._start(_run("queued"), stream=False)
        async with asyncio.timeout(10):
            await holding.wait()
        await service.delete_thread("thread-t")
        async with asyncio.timeout(10):
            await hold_ended.wait()
        assert waiting.id not in service._holds


async def test_tool_outputs_for_a_run_that_expired_after_it_was_read_get_a_400(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    call = {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    waiting = _run(
        "requires_action",
        expires_at=int(time.time()) + 600,
        required_action={"submit_tool_outputs": {"tool_calls": [call]}},
    )
    step = make_step(
        "step-1",
        "run-1",
        [FunctionToolCall(id="call-1", function=FunctionCallDetails(name="f", arguments=""))],
    )
    async with service:
        service.state.save(Thread(id="thread-t", created_at=1), waiting, step)
        read_steps = service.state.all

        def expiring(cls: type[Any], **where: Any) -> Any:
            if cls is RunStep:  # another request expires the run just now
                service.state.expire_overdue("thread-t", now=int(time.time()) + 10_000)
            return read_steps(cls, **where)

        service.state.all = expiring  # type: ignore[method-assign]
        body = SubmitToolOutputs(tool_outputs=[{"tool_call_id": "call-1", "output": "1"}])
        with pytest.raises(APIError) as refused:
            await service.submit_tool_outputs("thread-t", "run-1", body)
        assert refused.value.status == 400
        assert "'expired'" in str(refused.value)
        stored = service.state.get(Run, "run-1")
        assert stored is not None and stored.status == "expired"


async def test_a_container_deleted_while_it_was_looked_up_stays_deleted(tmp_path: Path) -> None:
    service = _service(tmp_path)
    container = Container(
        id="cntr_1",
        created_at=1,
        name="c",
        status="running",
        expires_after=ContainerExpiry(anchor="last_active_at", minutes=20),
        last_active_at=1,
    )

    async def gone_meanwhile(container_id: str) -> None:
        # Its session ended, and a DELETE of the container lands before the GET writes.
        service.state.delete(Container, container_id)

    async with service:
        service.state.save(container)
        service.containers._live = gone_meanwhile  # type: ignore[method-assign,assignment]
        with pytest.raises(APIError) as missing:
            await service.containers.get("cntr_1")
        assert missing.value.status == 404
        assert service.state.get(Container, "cntr_1") is None


def test_a_stream_never_read_is_let_go_when_its_run_ends() -> None:
    hub = RunEvents()
    never_read = hub.subscribe("run-1")
    hub.emit("run-1", "thread.run.in_progress", {"id": "run-1"})
    assert hub.watched("run-1")
    hub.emit("run-1", "thread.run.completed", {"id": "run-1"})
    assert not hub.watched("run-1")
    # What it was given stays for it, should its body start after all.
    assert never_read._queue.qsize() == 2


async def test_a_run_started_once_the_service_winds_down_is_failed_as_it_starts(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    driven: list[str] = []
    settled: list[tuple[str, bool]] = []

    going_driven = asyncio.Event()

    async def drive(run_id: str) -> None:
        await asyncio.sleep(0)  # as the driver's first step, loading the run, awaits
        driven.append(run_id)
        going_driven.set()
        await asyncio.Event().wait()  # runs until cancelled

    async def settle_cancelled(run_id: str, *, by_caller: bool) -> None:
        settled.append((run_id, by_caller))

    service.driver.drive = drive  # type: ignore[method-assign]
    service.driver.settle_cancelled = settle_cancelled  # type: ignore[method-assign]
    async with service:
        going = _run("in_progress")
        service._start(going, stream=False)
        async with asyncio.timeout(10):
            await going_driven.wait()
            # The run going is ended, and the wind-down returns once it is settled.
            await service.wind_down()
        assert settled == [(going.id, False)]
        late = _run("queued", id="run-2")
        service._start(late, stream=False)
        async with asyncio.timeout(10):
            await service._finished[late.id].wait()
        assert settled == [(going.id, False), (late.id, False)]
        assert driven == [going.id]  # cancelled at its first step: failed as it started


async def test_a_cancel_while_a_wound_down_run_is_settled_does_not_settle_it_again(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    settling, go_on = asyncio.Event(), asyncio.Event()
    settles: list[bool] = []
    going = _run("in_progress")

    async def drive(run_id: str) -> None:
        await asyncio.Event().wait()  # runs until cancelled

    async def settle_cancelled(run_id: str, *, by_caller: bool) -> None:
        settles.append(by_caller)
        settling.set()
        with contextlib.suppress(TimeoutError):  # its reads and writes, while the caller cancels
            await asyncio.wait_for(go_on.wait(), 5)

    async def stored(thread_id: str, run_id: str) -> Run:
        return going  # as stored: the settle has not written yet

    service.driver.drive = drive  # type: ignore[method-assign]
    service.driver.settle_cancelled = settle_cancelled  # type: ignore[method-assign]
    service.run = stored  # type: ignore[method-assign]
    async with service:
        service._start(going, stream=False)
        await asyncio.sleep(0)  # its task starts
        async with asyncio.timeout(10):
            winding = asyncio.ensure_future(service.wind_down())
            await settling.wait()
            answer = await service.cancel_run(going.thread_id, going.id)
            go_on.set()
            await winding
    # The task's settle is the only one; the caller was told the run is being cancelled.
    assert settles == [False]
    assert answer.status == "cancelling"
