"""run_loop against a scripted OpenAI-compatible server, with a real sandbox and with stubs."""

from __future__ import annotations

import re

import pytest

from sandkernel.errors import BadInput
from sandkernel.loop import PYTHON_TOOL, LoopEvent, ModelReply, ToolCall, run_loop
from tests.loop._support import (
    EngineFactory,
    ListModel,
    StubSession,
    code,
    completion,
    scripted_model,
    tool_messages,
)

# --------------------------------------------------------------------------- loop, real sandbox

BUGGY = "def mean(xs):\n    return sum(xs) / len(xs)\n\nmean([])"
FIXED = (
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n\nprint(mean([]), mean([1, 2, 3]))"
)


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_model_reads_its_error_fixes_the_code_and_answers(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    script = [
        completion("Let me compute it.", [("call_1", code(BUGGY))]),
        completion(None, [("call_2", code(FIXED))]),
        completion("The mean of an empty list is 0.0; of [1, 2, 3] it is 2.0."),
    ]
    events: list[LoopEvent] = []
    async with scripted_model(script) as (server, model):
        result = await run_loop(
            model, "Mean of [] and [1, 2, 3]?", session, max_attempts=3, on_event=events.append
        )
    assert result.outcome == "answered" and result.attempts == 2 and result.model_calls == 3
    assert result.final_answer == "The mean of an empty list is 0.0; of [1, 2, 3] it is 2.0."
    assert [r.status for r in result.executions] == ["error", "ok"]
    error_text, ok_text = tool_messages(result.transcript)
    assert error_text.startswith("Status: error: ZeroDivisionError: division by zero")
    assert "----> 4 mean([])" in error_text and "----> 2     return sum(xs) / len(xs)" in error_text
    assert ok_text == "Status: ok\n--- stdout ---\n0.0 2.0"
    # What the server got: the tool, then the error as the tool result of call_1.
    assert len(server.requests) == 3
    first, second = server.requests[0], server.requests[1]
    assert first["model"] == "scripted" and first["tools"] == [PYTHON_TOOL]
    assert first["tool_choice"] == "auto"
    assert first["messages"] == [{"role": "user", "content": "Mean of [] and [1, 2, 3]?"}]
    sent = second["messages"][-1]
    assert sent == {"role": "tool", "tool_call_id": "call_1", "content": error_text}
    assert second["messages"][-2]["tool_calls"][0]["function"]["arguments"] == code(BUGGY)
    assert server.requests[2]["messages"] == result.transcript[:-1]
    kinds = [e.kind for e in events]
    assert kinds == [
        "model_reply",
        "code",
        "result",
        "model_reply",
        "code",
        "result",
        "model_reply",
    ]


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_tool_choice_required_is_sent_then_relaxed_to_auto(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    script = [completion(None, [("c1", code("print(6 * 7)"))]), completion("42")]
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "6 times 7?", session, tool_choice="required")
    assert [r["tool_choice"] for r in server.requests] == ["required", "auto"]
    assert result.outcome == "answered" and result.final_answer == "42"
    assert result.executions[0].stdout == "42\n" and result.message is None


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_tool_choice_none_is_sent_and_a_tool_call_anyway_is_not_run(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    sneaky = code("open('/mnt/data/ran.txt', 'w').write('it ran')")
    script = [completion("I will run it anyway.", [("c1", sneaky)])]
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "Just talk.", session, tool_choice="none")
    assert server.requests[0]["tool_choice"] == "none"
    assert result.outcome == "tool_forbidden" and result.executions == [] and result.attempts == 0
    assert result.final_answer == "I will run it anyway."
    assert result.transcript[-1]["role"] == "tool" and "Not run" in result.transcript[-1]["content"]
    assert session.cells_run == 0
    check = await session.run("import os; os.path.exists('/mnt/data/ran.txt')")
    assert check.text == "False"


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_max_attempts_stops_a_model_that_never_fixes_its_code(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    script = [completion(None, [(f"c{i}", code("1 / 0"))]) for i in range(3)]
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "Divide.", session, max_attempts=2)
    assert result.outcome == "max_attempts" and result.final_answer is None
    assert result.message is not None and "stopped after 2 code executions" in result.message
    assert result.attempts == 2 and [r.status for r in result.executions] == ["error", "error"]
    assert len(server.requests) == 3  # asked once more after the last execution, no more
    # ... for its answer: no tool call may come of it
    assert [r["tool_choice"] for r in server.requests] == ["auto", "auto", "none"]
    messages = tool_messages(result.transcript)
    assert "last code execution allowed (2)" in messages[1]
    assert messages[2].startswith("Not run: the limit of 2 code executions")


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_ten_megabytes_of_stdout_reach_the_model_within_the_budget(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    flood = (
        "print('FIRST-MARKER')\n"
        "import sys\n"
        "for _ in range(100):\n"
        "    sys.stdout.write(('x' * 99 + '\\n') * 1000)\n"
        "print('LAST-MARKER')"
    )
    script = [completion(None, [("c1", code(flood))]), completion("done")]
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "Flood.", session, budget_chars=4000)
    assert result.executions[0].stdout_truncated  # the engine kept 1 MiB of the 10 MB
    seen = server.requests[1]["messages"][-1]["content"]
    assert len(seen) <= 4000
    assert seen.startswith("Status: ok\n--- stdout ---\nFIRST-MARKER\nxxx")
    assert seen.endswith("xxx\nLAST-MARKER")
    note = re.search(r"\[\.\.\. ([\d,]+) characters \(at least [\d,]+ lines\) cut \.\.\.\]", seen)
    assert note is not None and int(note.group(1).replace(",", "")) > 9_900_000


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_malformed_tool_arguments_get_the_expected_format(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    half = '{"code": "print(\'\\ud83d\')"}'  # valid JSON: half of an emoji
    script = [
        completion(
            None,
            [("bad_json", "{'code': print(1)"), ("no_code", '{"source": "1"}'), ("half", half)],
        ),  # fmt: skip
        completion(None, [("good", code("print('fixed')"))]),
        completion("fixed"),
    ]
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "Print.", session)
    assert result.outcome == "answered" and result.attempts == 4 and len(result.executions) == 1
    bad_json, no_code, half_char, good = tool_messages(result.transcript)
    assert bad_json.startswith("Error: the arguments are not valid JSON")
    assert no_code.startswith('Error: the "code" argument (a string) is missing (got: source)')
    assert half_char.startswith('Error: the "code" argument holds half of a character')
    expected = 'JSON arguments like {"code": "print(1 + 1)"}'
    assert expected in bad_json and expected in no_code and expected in half_char
    assert good == "Status: ok\n--- stdout ---\nfixed"
    ids = [m["tool_call_id"] for m in server.requests[1]["messages"] if m["role"] == "tool"]
    assert ids == ["bad_json", "no_code", "half"]
    with pytest.raises(BadInput, match="lone surrogate"):
        await session.run("print('\ud83d')")  # and the session's own door says why


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_a_dead_kernel_is_replaced_and_the_model_told_its_variables_are_gone(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    session = await engine.session()
    script = [
        completion(None, [("c1", code("x = 41\nopen('/mnt/data/keep.txt', 'w').write('kept')"))]),
        completion(None, [("c2", code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"))]),
        completion(None, [("c3", code("print(open('/mnt/data/keep.txt').read())\nx + 1"))]),
        completion("x is gone"),
    ]
    async with scripted_model(script) as (_server, model):
        result = await run_loop(model, "Go.", session)
    statuses = [r.status for r in result.executions]
    assert statuses[0] == "ok" and statuses[1] in ("killed", "dead") and statuses[2] == "error"
    assert result.executions[2].state_lost
    died, after = tool_messages(result.transcript)[1:]
    assert "Hint: the kernel died" in died
    assert "NameError: name 'x' is not defined" in after
    assert "Hint: the kernel was restarted" in after
    assert result.executions[2].stdout == "kept\n"  # files outlive the kernel


# --------------------------------------------------------------------------- loop logic


@pytest.mark.anyio
async def test_calls_past_the_limit_in_one_reply_are_not_run() -> None:
    calls = [ToolCall(id=f"c{i}", name="python", arguments=code(f"print({i})")) for i in range(3)]
    model = ListModel([ModelReply(tool_calls=calls), ModelReply(content="0 and 1")])
    session = StubSession()
    seen: list[str] = []

    async def on_event(event: LoopEvent) -> None:
        seen.append(event.kind)

    result = await run_loop(model, "Print.", session, max_attempts=2, on_event=on_event)
    assert session.ran == ["print(0)", "print(1)"]
    assert result.outcome == "answered" and result.attempts == 2
    assert tool_messages(result.transcript)[2].startswith("Not run: the limit of 2")
    assert seen == [
        "model_reply",
        "code",
        "result",
        "code",
        "result",
        "rejected_call",
        "model_reply",
    ]


@pytest.mark.anyio
async def test_unknown_tools_are_explained_and_counted() -> None:
    call = ToolCall(id="w", name="web_search", arguments="{}")
    model = ListModel([ModelReply(tool_calls=[call]), ModelReply(content="ok")])
    result = await run_loop(model, "Search.", StubSession(), tool_choice="required")
    assert model.choices == ["required", "auto"] and result.attempts == 1
    assert (
        "no tool named 'web_search'; the only tool is python" in tool_messages(result.transcript)[0]
    )


@pytest.mark.anyio
async def test_required_but_answered_without_code_is_reported() -> None:
    model = ListModel([ModelReply(content="I know it: 42.")])
    result = await run_loop(model, "6 times 7?", StubSession(), tool_choice="required")
    assert result.outcome == "answered" and result.attempts == 0
    assert result.message == (
        "the model answered without running code although tool_choice='required'"
    )


@pytest.mark.anyio
async def test_the_last_attempts_note_is_within_the_budget() -> None:
    long_code = "print('x' * 10_000)  # " + "y" * 10_000  # the stub prints its code back
    model = ListModel(
        [ModelReply(tool_calls=[ToolCall(id="c", name="python", arguments=code(long_code))]),
         ModelReply(content="done")]
    )  # fmt: skip
    result = await run_loop(model, "t", StubSession(), max_attempts=1, budget_chars=1000)
    (message,) = tool_messages(result.transcript)
    assert len(message) <= 1000 and message.endswith("answer now with what you have.]")
