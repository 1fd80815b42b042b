"""The Assistants API's SQLite state: lists, one active run per thread, recovery after a crash."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandkernel.openai_api.state import (
    INTERRUPTED,
    RESPONSE_INTERRUPTED,
    ApiState,
    FileLink,
    NotStored,
    RunState,
    ThreadBusy,
    ThreadState,
    UnknownCursor,
)
from sandkernel.openai_api.wire import (
    Assistant,
    Container,
    ContainerExpiry,
    Message,
    MessageCreationDetails,
    MessageCreationRef,
    ResponseObject,
    Run,
    RunStep,
    Text,
    TextContent,
    Thread,
)
from tests.openai_api._objects import make_run, make_step


def make_message(message_id: str, thread_id: str, *, run_id: str | None = None) -> Message:
    return Message(
        id=message_id,
        created_at=1,
        thread_id=thread_id,
        role="assistant" if run_id else "user",
        content=[TextContent(text=Text(value=message_id))],
        run_id=run_id,
        status="in_progress" if run_id else "completed",
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[ApiState]:
    opened = ApiState(tmp_path / "openai.sqlite3")
    opened.open()
    yield opened
    opened.close()


def test_lists_page_in_both_orders_from_either_cursor(state: ApiState) -> None:
    ids = [f"asst-{i}" for i in range(5)]
    for assistant_id in ids:
        state.save(Assistant(id=assistant_id, created_at=1, model="m"))
    newest, more = state.page(Assistant, limit=2)
    assert [a.id for a in newest] == ["asst-4", "asst-3"] and more
    rest, more = state.page(Assistant, after="asst-3", limit=10)
    assert [a.id for a in rest] == ["asst-2", "asst-1", "asst-0"] and not more
    middle, more = state.page(Assistant, order="asc", after="asst-0", before="asst-4", limit=2)
    assert [a.id for a in middle] == ["asst-1", "asst-2"] and more
    with pytest.raises(UnknownCursor):
        state.page(Assistant, after="asst-nope")
    state.save(Assistant(id="asst-2", created_at=1, model="changed"))  # keeps its place
    assert [a.id for a in state.all(Assistant)] == ids
    assert state.get(Assistant, "asst-2") == Assistant(id="asst-2", created_at=1, model="changed")


def test_before_gives_the_page_just_before_it_in_either_order(state: ApiState) -> None:
    for i in range(6):
        state.save(Assistant(id=f"asst-{i}", created_at=1, model="m"))

    def page(**cursor: str | int) -> tuple[list[str], bool]:
        items, more = state.page(Assistant, **cursor)  # type: ignore[arg-type]
        return [a.id for a in items], more

    # Newest first: asst-5 ... asst-0; before asst-1, two: the two listed just above it.
    assert page(before="asst-1", limit=2) == (["asst-3", "asst-2"], True)
    assert page(before="asst-3", limit=2) == (["asst-5", "asst-4"], False)
    assert page(before="asst-4", limit=5) == (["asst-5"], False)
    assert page(order="asc", before="asst-4", limit=2) == (["asst-2", "asst-3"], True)
    assert page(order="asc", before="asst-2", limit=2) == (["asst-0", "asst-1"], False)
    assert page(order="asc", before="asst-0", limit=2) == ([], False)


def test_a_thread_takes_one_active_run_and_no_message_meanwhile(state: ApiState) -> None:
    state.save(Thread(id="thread-t", created_at=1))
    first = make_run("run-1", "thread-t", "queued")
    state.create_run(first, RunState(), [make_message("msg-1", "thread-t")])
    with pytest.raises(ThreadBusy) as busy:
        state.create_run(make_run("run-2", "thread-t", "queued"), RunState(), [])
    assert busy.value.run.id == "run-1"
    with pytest.raises(ThreadBusy):
        state.add_messages("thread-t", [make_message("msg-2", "thread-t")])
    assert [m.id for m in state.all(Message, thread_id="thread-t")] == ["msg-1"]
    state.save(first.model_copy(update={"status": "completed"}))
    state.add_messages("thread-t", [make_message("msg-2", "thread-t")])
    timeline = state.timeline("thread-t")
    assert [obj.id for obj, _ in timeline] == ["msg-1", "run-1", "msg-2"]
    assert state.delete_thread("thread-t")
    assert state.all(Message, thread_id="thread-t") == [] and state.get(Run, "run-1") is None


def test_a_wait_for_tool_outputs_past_its_expiry_frees_the_thread(state: ApiState) -> None:
    state.save(Thread(id="thread-t", created_at=1))
    waiting = make_run("run-1", "thread-t", "requires_action")  # expires_at 601: long past
    step = make_step("step-1", "run-1")
    state.save(waiting, step)
    state.add_messages("thread-t", [make_message("msg-1", "thread-t")])
    expired = state.get(Run, "run-1")
    assert expired is not None and expired.status == "expired" and expired.expires_at is None
    stopped = state.get(RunStep, "step-1")
    assert stopped is not None and stopped.status == "expired" and stopped.expired_at is not None
    assert state.active_run("thread-t") is None


def _waiting(state: ApiState, run_id: str) -> tuple[RunStep, Run]:
    """A run waiting for tool outputs (expires_at 601), its step, and the run queued."""
    step = make_step(f"step-{run_id}", run_id)
    state.save(make_run(run_id, "thread-t", "requires_action"), step)
    return step, make_run(run_id, "thread-t", "queued").model_copy(update={"expires_at": None})


def test_tool_outputs_are_taken_only_while_the_run_waits_for_them(state: ApiState) -> None:
    state.save(Thread(id="thread-t", created_at=1))
    # In time: stored, in the same transaction as the check.
    step, queued = _waiting(state, "run-1")
    taken, stored, expired = state.accept_tool_outputs(step, queued, RunState(), now=601)
    assert taken and stored is not None and stored.status == "queued" and expired == []
    state.save(queued.model_copy(update={"status": "completed"}))
    # The wait ran out after the caller read the run: it stays expired.
    step, queued = _waiting(state, "run-2")
    taken, stored, expired = state.accept_tool_outputs(step, queued, RunState(), now=602)
    assert not taken and stored is not None and stored.status == "expired"
    assert [r.id for r in expired] == ["run-2"]
    kept = state.get(Run, "run-2")
    assert kept is not None and kept.status == "expired"
    # Gone with its thread meanwhile.
    state.delete_thread("thread-t")
    assert state.accept_tool_outputs(step, queued, RunState(), now=602) == (False, None, [])


def test_nothing_is_written_for_a_thread_or_object_deleted_meanwhile(state: ApiState) -> None:
    state.save(Thread(id="thread-t", created_at=1, metadata={"v": "1"}))
    assert state.replace(Thread(id="thread-t", created_at=1, metadata={"v": "2"}))
    kept = state.get(Thread, "thread-t")
    assert kept is not None and kept.metadata == {"v": "2"}
    assert state.delete_thread("thread-t")
    # A writer that read the thread before it was deleted does not bring it back...
    assert not state.replace(Thread(id="thread-t", created_at=1, metadata={"v": "3"}))
    assert state.get(Thread, "thread-t") is None
    # ...nor leaves a message or a run without it.
    with pytest.raises(NotStored):
        state.add_messages("thread-t", [make_message("msg-1", "thread-t")])
    with pytest.raises(NotStored):
        state.create_run(make_run("run-1", "thread-t", "queued"), RunState(), [])
    assert state.get(Message, "msg-1") is None and state.get(Run, "run-1") is None


def test_private_state_is_kept_beside_its_object(state: ApiState) -> None:
    state.save(Thread(id="thread-t", created_at=1))
    assert state.private(Thread, "thread-t", ThreadState) == ThreadState()
    state.save(private={"thread-t": ThreadState(session_agent_id="asst-a", ran_code=True)})
    run = make_run("run-1", "thread-t", "queued")
    state.create_run(run, RunState(code_calls=2), [])
    state.save(run.model_copy(update={"status": "in_progress"}))  # no private: kept
    assert state.private(Run, "run-1", RunState).code_calls == 2
    assert state.private(Thread, "thread-t", ThreadState).ran_code


def test_reopening_fails_the_runs_a_crashed_daemon_left_running(tmp_path: Path) -> None:
    path = tmp_path / "openai.sqlite3"
    state = ApiState(path)
    state.open()
    state.save(Thread(id="thread-t", created_at=1))
    running = make_run("run-busy", "thread-t", "in_progress")
    step = RunStep(
        id="step-1",
        created_at=1,
        run_id="run-busy",
        assistant_id="asst-a",
        thread_id="thread-t",
        type="message_creation",
        step_details=MessageCreationDetails(message_creation=MessageCreationRef(message_id="m")),
    )
    state.save(
        running,
        step,
        make_message("msg-half", "thread-t", run_id="run-busy"),
        # Its wait for tool outputs is not over yet.
        make_run("run-waiting", "thread-t", "requires_action").model_copy(
            update={"expires_at": int(time.time()) + 600}
        ),
        make_run("run-stopping", "thread-t", "cancelling"),
        make_run("run-done", "thread-t", "completed"),
    )
    state.close()  # as if the daemon died here: nothing settled the runs

    reopened = ApiState(path)
    assert sorted(reopened.open(now=1000)) == ["run-busy", "run-stopping"]
    try:
        busy = reopened.get(Run, "run-busy")
        assert busy is not None and busy.status == "failed" and busy.failed_at == 1000
        assert busy.last_error is not None and busy.last_error.code == "server_error"
        assert busy.last_error.message == INTERRUPTED and "daemon stopped" in INTERRUPTED
        assert busy.expires_at is None
        failed_step = reopened.get(RunStep, "step-1")
        assert failed_step is not None and failed_step.status == "failed"
        assert failed_step.last_error == busy.last_error
        half = reopened.get(Message, "msg-half")
        assert half is not None and half.status == "incomplete"
        assert half.incomplete_details is not None
        assert half.incomplete_details.reason == "run_failed"
        stopping = reopened.get(Run, "run-stopping")
        assert stopping is not None and stopping.status == "cancelled"
        waiting = reopened.get(Run, "run-waiting")
        assert waiting is not None and waiting.status == "requires_action"  # can still go on
        done = reopened.get(Run, "run-done")
        assert done is not None and done.status == "completed"
        assert reopened.active_run("thread-t") == waiting
    finally:
        reopened.close()


def test_reopening_fails_the_responses_a_crashed_daemon_left_answering(tmp_path: Path) -> None:
    path = tmp_path / "openai.sqlite3"
    state = ApiState(path)
    state.open()
    items = [
        {"id": "ci-1", "type": "code_interpreter_call", "status": "interpreting"},
        {"id": "msg-1", "type": "message", "status": "in_progress", "content": []},
    ]
    common: dict[str, object] = {
        "created_at": 1, "model": "m", "tools": [], "tool_choice": "auto",
        "parallel_tool_calls": True,
    }  # fmt: skip
    state.save(
        ResponseObject(id="resp-busy", status="in_progress", output=items, **common),
        ResponseObject(id="resp-done", status="completed", output=[], **common),
    )
    state.close()  # as if the daemon died here

    reopened = ApiState(path)
    assert reopened.open() == ["resp-busy"]
    try:
        busy = reopened.get(ResponseObject, "resp-busy")
        assert busy is not None and busy.status == "failed"
        assert busy.error == {"code": "server_error", "message": RESPONSE_INTERRUPTED}
        assert [i["status"] for i in busy.output] == ["failed", "incomplete"]
        done = reopened.get(ResponseObject, "resp-done")
        assert done is not None and done.status == "completed"
    finally:
        reopened.close()


def _container(container_id: str) -> Container:
    return Container(
        id=container_id,
        created_at=1,
        name=container_id,
        status="running",
        expires_after=ContainerExpiry(anchor="last_active_at", minutes=20),
        last_active_at=1,
    )


def test_own_files_are_the_copies_and_the_containers_files(state: ApiState) -> None:
    state.save(_container("cntr-1"))
    state.link(FileLink("thread-1", "file-up", "file-copy", "/mnt/data/a.csv"))
    state.link(FileLink("asst-1", "file-same", "file-same", None))
    own = state.own_files(
        [("file-copy", "sess-t"), ("file-up", None), ("file-same", None), ("file-c", "cntr-1")]
    )
    assert own == {"file-copy", "file-c"}


def test_a_files_lookup_reads_its_own_rows_not_every_row(state: ApiState) -> None:
    # A daemon that has served many threads and containers holds many rows;
    # one file's lookup (every /files/{id} call) must not read them all.
    for n in range(3000):
        state.save(_container(f"cntr-{n}"))
        state.link(FileLink(f"thread-{n}", f"file-up-{n}", f"file-copy-{n}", None))
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    with state._reading() as conn:
        conn.set_progress_handler(count, 100)
    try:
        assert state.own_files([("file-copy-7", None), ("file-x", "cntr-9")]) == {
            "file-copy-7",
            "file-x",
        }
    finally:
        with state._reading() as conn:
            conn.set_progress_handler(None, 100)
    # A scan of either table takes thousands of SQLite steps (tens of calls);
    # two indexed lookups take a few dozen.
    assert steps < 5, f"{steps * 100} SQLite steps for two files"
