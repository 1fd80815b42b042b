"""Stored objects of the Assistants API, made for tests."""

from __future__ import annotations

from sandkernel.openai_api.wire import Run, RunStep, StepToolCall, ToolCallsDetails


def make_run(run_id: str, thread_id: str, status: str) -> Run:
    return Run.model_validate(
        {
            "id": run_id,
            "created_at": 1,
            "thread_id": thread_id,
            "assistant_id": "asst-a",
            "status": status,
            "model": "m",
            "instructions": "",
            "expires_at": 601,
        }
    )


def make_step(step_id: str, run_id: str, calls: list[StepToolCall] | None = None) -> RunStep:
    """A tool-calls step of ``run_id`` in thread ``thread-t``, in progress."""
    return RunStep(
        id=step_id,
        created_at=1,
        run_id=run_id,
        assistant_id="asst-a",
        thread_id="thread-t",
        type="tool_calls",
        step_details=ToolCallsDetails(tool_calls=calls or []),
    )
