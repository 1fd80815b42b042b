"""The model loop: what the model reads, and a real OpenAI client against a real sandbox.

The model is the official ``openai`` client talking to a scripted
OpenAI-compatible server on loopback (it replays replies in the exact
chat-completions JSON shape and records every request), so what the loop sends
is checked as a server sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sandkernel import Engine, ExecutionResult
from sandkernel._solve_cli import add_solve_parser, solve_with_engine
from sandkernel.loop import (
    PYTHON_TOOL,
    LoopEvent,
    ModelCallFailed,
    ModelReply,
    OpenAIChatModel,
    ToolCall,
    ToolChoice,
    format_result,
    run_loop,
    user_traceback,
)
from sandkernel.results import DisplayOutput, ErrorInfo, ProducedFile, Usage

SNAPSHOTS = Path(__file__).parent / "snapshots"
EngineFactory = Callable[..., Awaitable[Engine]]


# --------------------------------------------------------------------------- helpers


def make_result(**fields: Any) -> ExecutionResult:
    fields.setdefault("usage", Usage(wall_ms=12.5))
    return ExecutionResult(**fields)


def produced(name: str, mime: str, size: int, *, source: str = "workspace") -> ProducedFile:
    return ProducedFile(
        id="file-" + hashlib.sha256(name.encode()).hexdigest()[:24],
        name=name,
        path=f"/mnt/data/{name}" if source == "workspace" else "",
        mime_type=mime,
        size_bytes=size,
        sha256="0" * 64,
        execution_count=3,
        source=source,  # type: ignore[arg-type]
    )


def check_snapshot(name: str, text: str) -> None:
    snapshot = SNAPSHOTS / f"loop_{name}.txt"
    if os.environ.get("SANDKERNEL_UPDATE_SNAPSHOTS") == "1":
        snapshot.parent.mkdir(exist_ok=True)
        snapshot.write_text(text)
    assert text == snapshot.read_text(), f"format_result for {name} changed; review and update"


# IPython 8's context traceback of `%timeit summarise(sales)` where summarise() hits a
# missing pandas column: IPython machinery frames, Cython frames, a chained exception.
TIMEIT_KEYERROR = """\
---------------------------------------------------------------------------
KeyError                                  Traceback (most recent call last)
File /opt/venv/lib/python3.12/site-packages/pandas/core/indexes/base.py:3805, in Index.get_loc(self, key)
   3804 try:
-> 3805     return self._engine.get_loc(casted_key)
   3806 except KeyError as err:

File index.pyx:167, in pandas._libs.index.IndexEngine.get_loc()

File index.pyx:196, in pandas._libs.index.IndexEngine.get_loc()

File pandas/_libs/hashtable_class_helper.pxi:7081, in pandas._libs.hashtable.PyObjectHashTable.get_item()

File pandas/_libs/hashtable_class_helper.pxi:7089, in pandas._libs.hashtable.PyObjectHashTable.get_item()

KeyError: 'revenue'

The above exception was the direct cause of the following exception:

KeyError                                  Traceback (most recent call last)
Cell In[7], line 1
----> 1 get_ipython().run_line_magic('timeit', '-n1 -r1 summarise(sales)')

File /opt/venv/lib/python3.12/site-packages/IPython/core/interactiveshell.py:2480, in InteractiveShell.run_line_magic(self, magic_name, line, _stack_depth)
   2478     kwargs['local_ns'] = self.get_local_scope(stack_depth)
   2479 with self.builtin_trap:
-> 2480     result = fn(*args, **kwargs)
   2482 # The code below prevents the output from being displayed
   2483 # when using magics with decorator @output_can_be_silenced

File /opt/venv/lib/python3.12/site-packages/IPython/core/magics/execution.py:1189, in ExecutionMagics.timeit(self, line, cell, local_ns)
   1187 for index in range(0, 10):
   1188     number = 10 ** index
-> 1189     time_number = timer.timeit(number)
   1190     if time_number >= 0.2:
   1191         break

File /opt/venv/lib/python3.12/site-packages/IPython/core/magics/execution.py:173, in Timer.timeit(self, number)
    171 gc.disable()
    172 try:
--> 173     timing = self.inner(it, self.timer)
    174 finally:
    175     if gcold:

File <magic-timeit>:1, in inner(_it, _timer)

Cell In[6], line 4, in summarise(frame)
      2 def summarise(frame):
      3     monthly = frame.groupby("month").sum()
----> 4     return monthly["revenue"] / monthly["units"]

File /opt/venv/lib/python3.12/site-packages/pandas/core/frame.py:4102, in DataFrame.__getitem__(self, key)
   4100 if self.columns.nlevels > 1:
   4101     return self._getitem_multilevel(key)
-> 4102 indexer = self.columns.get_loc(key)
   4103 if is_integer(indexer):
   4104     indexer = [indexer]

File /opt/venv/lib/python3.12/site-packages/pandas/core/indexes/base.py:3812, in Index.get_loc(self, key)
   3807     if isinstance(casted_key, slice) or (
   3808         isinstance(casted_key, abc.Iterable)
   3809         and any(isinstance(x, slice) for x in casted_key)
   3810     ):
   3811         raise InvalidIndexError(key)
-> 3812     raise KeyError(key) from err
   3813 except TypeError:

KeyError: 'revenue'"""  # noqa: E501 - verbatim IPython output

# What ipykernel raises for input() when the client allows no stdin.
INPUT_IN_KERNEL = """\
---------------------------------------------------------------------------
StdinNotImplementedError                  Traceback (most recent call last)
Cell In[2], line 1
----> 1 name = input("Your name? ")

File /opt/venv/lib/python3.12/site-packages/ipykernel/kernelbase.py:1281, in Kernel.raw_input(self, prompt)
   1279 if not self._allow_stdin:
   1280     msg = "raw_input was called, but this frontend does not support input requests."
-> 1281     raise StdinNotImplementedError(msg)
   1282 return self._input_request(
   1283     str(prompt),

StdinNotImplementedError: raw_input was called, but this frontend does not support input requests."""  # noqa: E501 - verbatim ipykernel output

DATAFRAME_100x3 = (
    "      a    b    c\n0     0    1    2\n1     3    4    5\n2     6    7    8\n"
    "3     9   10   11\n4    12   13   14\n..  ...  ...  ...\n95  285  286  287\n"
    "96  288  289  290\n97  291  292  293\n98  294  295  296\n99  297  298  299\n\n"
    "[100 rows x 3 columns]"
)
DATAFRAME_HTML = '<div>\n<table border="1" class="dataframe">\n  <thead>\n</table>\n</div>'
SMALL_FRAME = "   x  y\n0  1  a\n1  2  b"
SMALL_FRAME_HTML = (
    '<table border="1" class="dataframe">\n  <thead>\n    <tr><th></th><th>x</th><th>y</th></tr>\n'
    "  </thead>\n  <tbody>\n    <tr><th>0</th><td>1</td><td>a</td></tr>\n"
    "    <tr><th>1</th><td>2</td><td>b</td></tr>\n  </tbody>\n</table>"
)
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5E"


# --------------------------------------------------------------------------- snapshots


def test_snapshot_ok_with_stdout_and_value() -> None:
    result = make_result(
        status="ok",
        stdout="rows: 3\nmean: 2.0\n",
        value=DisplayOutput(data={"text/plain": "{'rows': 3, 'mean': 2.0}"}),
        execution_count=3,
    )
    check_snapshot("ok", format_result(result))


def test_snapshot_error_keeps_only_the_users_frames() -> None:
    result = make_result(
        status="error",
        error=ErrorInfo(name="KeyError", value="'revenue'", traceback=TIMEIT_KEYERROR),
        execution_count=7,
    )
    text = format_result(result)
    check_snapshot("error", text)
    assert "IPython" not in text and "magic-timeit" not in text and "interactiveshell" not in text
    assert "Cell In[6], line 4, in summarise(frame)" in text
    assert '----> 4     return monthly["revenue"] / monthly["units"]' in text
    assert "(1 library frame omitted)" in text and "(4 library frames omitted)" in text
    assert "-> 3812     raise KeyError(key) from err" in text  # where the library raised


def test_snapshot_timeout() -> None:
    traceback = (
        "-" * 75 + "\n"
        "KeyboardInterrupt                         Traceback (most recent call last)\n"
        "Cell In[4], line 3\n      1 total = 0\n      2 for i in range(10**10):\n"
        "----> 3     total += i\n\nKeyboardInterrupt: "
    )
    result = make_result(
        status="timeout",
        stdout="started\n",
        error=ErrorInfo(name="KeyboardInterrupt", value="", traceback=traceback),
        message="the cell ran longer than its 60 s limit and was interrupted; "
        "the kernel and its variables survive",
        execution_count=4,
    )
    text = format_result(result)
    check_snapshot("timeout", text)
    assert "60 s time limit" in text and "split the work" in text


def test_snapshot_oom() -> None:
    result = make_result(
        status="oom",
        message="the sandbox ran out of memory (limit 1024 MiB, policy field memory_mb); "
        "the kernel was killed and its variables are lost",
        kernel_alive=False,
        state_lost=True,
    )
    text = format_result(result)
    check_snapshot("oom", text)
    assert "1024 MiB memory limit" in text and "variables and imports are lost" in text


def test_snapshot_produced_files_and_images() -> None:
    chart = produced("display-5-1.png", "image/png", 20_480, source="display")
    result = make_result(
        status="ok",
        stdout="saved\n",
        displays=[
            DisplayOutput(data={"image/png": PNG_B64, "text/plain": "<Figure size 640x480>"}),
            DisplayOutput(data={"image/svg+xml": "<svg/>"}),
            DisplayOutput(data={"application/vnd.plotly.v1+json": {}}),
        ],
        files=[
            produced("summary.csv", "text/csv", 812),
            produced(
                "report.xlsx",
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                5_500_000,
            ),
            chart,
        ],
        execution_count=5,
    )
    text = format_result(result)
    check_snapshot("files", text)
    assert "[image/png displayed, saved as display-5-1.png]" in text
    assert "[image displayed]" in text  # the svg: no file was stored for it


def test_snapshot_dataframe_value_is_summarised() -> None:
    result = make_result(
        status="ok",
        displays=[DisplayOutput(data={"text/plain": SMALL_FRAME, "text/html": SMALL_FRAME_HTML})],
        value=DisplayOutput(data={"text/plain": DATAFRAME_100x3, "text/html": DATAFRAME_HTML}),
        execution_count=8,
    )
    text = format_result(result)
    check_snapshot("dataframe", text)
    assert "DataFrame, 100 rows x 3 columns" in text and "DataFrame, 2 rows x 2 columns" in text
    assert "98  294" not in text  # summarised, not dumped


# --------------------------------------------------------------------------- format_result


def test_missing_module_hint_names_what_is_available() -> None:
    tb = "Cell In[1], line 1\n----> 1 import sklearn\n\nModuleNotFoundError: No module named 'x'"
    result = make_result(
        status="error",
        error=ErrorInfo(
            name="ModuleNotFoundError", value="No module named 'sklearn'", traceback=tb
        ),
    )
    text = format_result(result, available_modules=["numpy", "scipy"])
    hint = text.splitlines()[-1]
    assert hint.startswith("Hint: 'sklearn' is not installed") and "no internet" in hint
    assert "numpy, scipy" in hint
    default = format_result(result).splitlines()[-1]
    assert "numpy, pandas, matplotlib, openpyxl" in default


def test_name_error_hint_only_after_a_restart() -> None:
    error = ErrorInfo(name="NameError", value="name 'df' is not defined", traceback="")
    fresh = make_result(status="error", error=error)
    assert "Hint" not in format_result(fresh)
    lost = make_result(status="error", error=error, state_lost=True)
    assert "variables and imports defined in earlier cells are gone" in format_result(lost)
    later = format_result(fresh, after_restart=True)
    assert later.splitlines()[-1].startswith("Hint: the kernel was restarted")


def test_dead_kernel_says_state_is_lost() -> None:
    result = make_result(
        status="dead",
        message="the kernel exited (signal 9)",
        kernel_alive=False,
        state_lost=True,
    )
    text = format_result(result)
    assert text.startswith("Status: dead: the kernel exited (signal 9)")
    assert "Hint: the kernel died, so variables and imports are lost" in text


def test_ipykernel_frames_are_dropped_from_an_input_error() -> None:
    text = user_traceback(INPUT_IN_KERNEL)
    assert "ipykernel" not in text and "kernelbase" not in text
    assert text.splitlines()[:3] == [
        "StdinNotImplementedError  Traceback (most recent call last)",
        "Cell In[2], line 1",
        '----> 1 name = input("Your name? ")',
    ]
    result = make_result(
        status="error",
        error=ErrorInfo(name="StdinNotImplementedError", value="...", traceback=INPUT_IN_KERNEL),
    )
    assert "input() cannot work here" in format_result(result)


def test_plain_python_tracebacks_are_filtered_too() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/mnt/data/job.py", line 9, in <module>\n    main()\n'
        '  File "/usr/lib/python3/dist-packages/IPython/core/interactiveshell.py", line 1, in x\n'
        "    exec(code)\n"
        '  File "/mnt/data/job.py", line 5, in main\n    json.loads(raw)\n'
        '  File "/usr/lib/python3.12/json/__init__.py", line 346, in loads\n'
        "    return _default_decoder.decode(s)\n"
        '  File "/usr/lib/python3.12/json/decoder.py", line 355, in raw_decode\n'
        '    raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    )
    assert user_traceback(tb) == (
        "Traceback (most recent call last):\n"
        '  File "/mnt/data/job.py", line 9, in <module>\n    main()\n'
        '  File "/mnt/data/job.py", line 5, in main\n    json.loads(raw)\n'
        "(1 library frame omitted)\n"
        '  File "json/decoder.py", line 355, in raw_decode\n'
        '    raise JSONDecodeError("Expecting value", s, err.value) from None\n'
        "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    )


def test_deep_recursion_is_shown_once_with_a_count() -> None:
    frame = "Cell In[5], line 1, in r(n)\n----> 1 def r(n): return r(n+1)\n\n"
    tb = (
        "RecursionError                            Traceback (most recent call last)\n"
        "Cell In[5], line 2\n----> 2 r(0)\n\n" + frame * 978 + "RecursionError: maximum recursion"
    )
    text = user_traceback(tb)
    assert text.count("def r(n)") == 1
    assert "[... the frame above repeated 977 more times]" in text


def test_long_output_keeps_head_and_tail_and_counts_the_cut() -> None:
    stdout = "".join(f"line {i:05d}\n" for i in range(5000))
    text = format_result(make_result(status="ok", stdout=stdout), budget_chars=2000)
    assert len(text) <= 2000
    assert "line 00000" in text and "line 04999" in text
    note = re.search(r"\[\.\.\. ([\d,]+) characters \(([\d,]+) lines\) cut \.\.\.\]", text)
    assert note is not None, text
    cut_chars = int(note.group(1).replace(",", ""))
    kept = [ln for ln in text.split("\n") if ln.startswith("line ")]
    # every line is either shown or counted as cut
    assert cut_chars + sum(len(ln) + 1 for ln in kept) == len(stdout)
    assert int(note.group(2).replace(",", "")) + len(kept) == 5000


def test_engine_cut_is_added_to_the_count_and_the_full_output_file_is_named() -> None:
    head, tail = "FIRST\n" + "a" * 5000 + "\n", "b" * 5000 + "\nLAST\n"
    stdout = head + "\n[... 9000000 bytes cut ...]\n" + tail
    result = make_result(
        status="ok",
        stdout=stdout,
        stdout_truncated=True,
        files=[produced("stdout.txt", "text/plain", 9_010_012)],
    )
    text = format_result(result, budget_chars=1000)
    assert "FIRST" in text and "LAST" in text and len(text) <= 1000
    note = re.search(
        r"\[\.\.\. ([\d,]+) characters \(at least [\d,]+ lines\) cut; (.*) \.\.\.\]", text
    )
    assert note is not None, text
    assert int(note.group(1).replace(",", "")) > 9_000_000
    assert note.group(2) == "the full output is in /mnt/data/stdout.txt"


def test_budget_holds_whatever_the_cell_printed() -> None:
    huge = "y" * 300_000
    tb = "Cell In[1], line 1\n----> 1 boom()\n\n" + "\n".join(["x" * 90] * 3000)
    result = make_result(
        status="error",
        stdout=huge,
        stderr=huge,
        value=DisplayOutput(data={"text/plain": huge}),
        error=ErrorInfo(name="ValueError", value="v" * 5000, traceback=tb),
        files=[produced(f"f{i}.csv", "text/csv", i) for i in range(40)],
        execution_count=1,
    )
    for budget in (300, 600, 2000, 8000, 20000):
        text = format_result(result, budget_chars=budget)
        assert len(text) <= budget, budget
        assert text.startswith("Status: error: ValueError: vvv")
    assert "- ... and 20 more" in format_result(result, budget_chars=20000)


# --------------------------------------------------------------------------- the tool


def test_python_tool_is_an_openai_function_tool() -> None:
    function = PYTHON_TOOL["function"]
    assert PYTHON_TOOL["type"] == "function" and function["name"] == "python"
    assert function["parameters"]["required"] == ["code"]
    assert function["parameters"]["properties"]["code"]["type"] == "string"
    for words in ("stateful", "/mnt/data", "no internet", "status line", "traceback"):
        assert words in function["description"], words
    json.dumps(PYTHON_TOOL)  # plain JSON, usable by any framework


def test_openai_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r"pip install 'sandkernel\[openai\]'"):
        OpenAIChatModel(model="m")


# --------------------------------------------------------------------------- scripted server


class ScriptedChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 that plays a script.

    Each request gets the next scripted reply; requests past the script get a
    500. Every request body is recorded. One request per connection, each
    bounded in time, and the listener is closed on exit.
    """

    def __init__(self, script: Sequence[dict[str, Any]]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> ScriptedChatServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        async with asyncio.timeout(5):
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                status, payload = await self._answer(reader)
                body = json.dumps(payload).encode()
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, Any]]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, value in (line.split(":", 1) for line in header_lines if ":" in line)
        )
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if (method, path) != ("POST", "/v1/chat/completions"):
            return "404 Not Found", {"error": {"message": f"no route {method} {path}"}}
        self.requests.append(json.loads(body))
        if len(self.requests) > len(self.script):
            error = {"message": "the script has no more replies", "type": "server_error"}
            return "500 Internal Server Error", {"error": error}
        return "200 OK", self.script[len(self.requests) - 1]


def completion(content: str | None = None, calls: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """A chat.completion body; ``calls`` are ``(id, arguments JSON text)`` of python calls."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": "python", "arguments": args}}
            for call_id, args in calls
        ]
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "scripted",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def code(source: str) -> str:
    return json.dumps({"code": source})


@contextlib.asynccontextmanager
async def scripted_model(
    script: Sequence[dict[str, Any]],
) -> AsyncIterator[tuple[ScriptedChatServer, OpenAIChatModel]]:
    async with ScriptedChatServer(script) as server:
        model = OpenAIChatModel(
            model="scripted", base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=30
        )
        try:
            yield server, model
        finally:
            await model.aclose()


def tool_messages(transcript: Sequence[Mapping[str, Any]]) -> list[str]:
    return [m["content"] for m in transcript if m["role"] == "tool"]


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
    script = [
        completion(None, [("bad_json", "{'code': print(1)"), ("no_code", '{"source": "1"}')]),
        completion(None, [("good", code("print('fixed')"))]),
        completion("fixed"),
    ]
    async with scripted_model(script) as (server, model):
        result = await run_loop(model, "Print.", session)
    assert result.outcome == "answered" and result.attempts == 3 and len(result.executions) == 1
    bad_json, no_code, good = tool_messages(result.transcript)
    assert bad_json.startswith("Error: the arguments are not valid JSON")
    assert no_code.startswith('Error: the "code" argument (a string) is missing (got: source)')
    expected = 'JSON arguments like {"code": "print(1 + 1)"}'
    assert expected in bad_json and expected in no_code
    assert good == "Status: ok\n--- stdout ---\nfixed"
    ids = [m["tool_call_id"] for m in server.requests[1]["messages"] if m["role"] == "tool"]
    assert ids == ["bad_json", "no_code"]


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


# --------------------------------------------------------------------------- the CLI pieces


@pytest.mark.sandbox
@pytest.mark.anyio
async def test_solve_prints_each_attempt_and_saves_the_chart(
    engine_factory: EngineFactory, tmp_path: Path
) -> None:
    engine = await engine_factory()
    data = tmp_path / "data.csv"
    data.write_text("month,sales\n1,10\n2,12\n")
    chart = (
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "sales = pd.read_csv('/mnt/data/data.csv')\n"
        "sales.describe().to_csv('/mnt/data/summary.csv')\n"
        "plt.plot(sales.month, sales.sales)\nplt.show()"
    )
    script = [
        completion(None, [("c1", code("plt.plot([10, 12])"))]),
        completion("plt was not imported.", [("c2", code(chart))]),
        completion("Sales grew from 10 to 12; the chart is saved."),
    ]
    parser = argparse.ArgumentParser()
    add_solve_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    async with ScriptedChatServer(script) as server:
        args = parser.parse_args(
            ["solve", "Chart the sales", "--base-url", server.base_url, "--model", "scripted"]
            + ["--api-key", "sk-test", "--file", str(data), "--max-attempts", "3"]
            + ["--out", str(tmp_path / "out"), "--timeout", "60"]
        )
        code_ = await solve_with_engine(args, engine, out=out, client_kwargs={"max_retries": 0})
    printed = out.getvalue()
    assert code_ == 0, printed
    assert "=== attempt 1/3 ===\n  | plt.plot([10, 12])\n  Status: error: NameError" in printed
    assert "model: plt was not imported." in printed and "=== attempt 2/3 ===" in printed
    assert "=== answer ===\nSales grew from 10 to 12; the chart is saved." in printed
    assert printed.startswith("uploaded to /mnt/data: data.csv\n")
    assert server.requests[0]["messages"][0]["role"] == "system"
    assert server.requests[0]["messages"][1]["content"].endswith("Files in /mnt/data: data.csv")
    assert "files saved in" in printed
    saved = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert saved["summary.csv"].startswith(b",month,sales\ncount,2.0,2.0")
    pngs = [name for name, data in saved.items() if data.startswith(b"\x89PNG")]
    assert pngs == ["image-2-1.png"], sorted(saved)


def test_solve_parser_takes_the_documented_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    parser = argparse.ArgumentParser()
    add_solve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["solve", "task", "--model", "m", "--file", "a", "--file", "b"])
    assert args.base_url == "http://127.0.0.1:9/v1" and args.file == ["a", "b"]
    assert (args.max_attempts, args.out, args.policy, args.timeout) == (
        5,
        "solve-output",
        None,
        None,
    )
    assert args.api_key is None and args.tool_choice == "auto"


# --------------------------------------------------------------------------- loop logic


class StubSession:
    """Runs nothing: every cell is 'ok' and prints its code (for loop logic without kernels)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def run(
        self, code: str, *, timeout_s: float | None = None, restart: bool | None = None
    ) -> ExecutionResult:
        self.ran.append(code)
        return make_result(status="ok", stdout=code + "\n")


class ListModel:
    """A ChatModel replaying replies and recording the tool_choice of each call."""

    def __init__(self, replies: list[ModelReply]) -> None:
        self.replies = replies
        self.choices: list[ToolChoice] = []

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: ToolChoice,
    ) -> ModelReply:
        self.choices.append(tool_choice)
        return self.replies.pop(0)


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
async def test_model_errors_are_mapped_to_model_call_failed() -> None:
    async with scripted_model([]) as (server, model):
        with pytest.raises(ModelCallFailed, match=re.escape(server.base_url)):
            await run_loop(model, "Hello?", StubSession())
    assert len(server.requests) == 1  # no retries behind our back


@pytest.mark.anyio
async def test_required_but_answered_without_code_is_reported() -> None:
    model = ListModel([ModelReply(content="I know it: 42.")])
    result = await run_loop(model, "6 times 7?", StubSession(), tool_choice="required")
    assert result.outcome == "answered" and result.attempts == 0
    assert result.message == (
        "the model answered without running code although tool_choice='required'"
    )
