"""What the loop tests share: sample results, snapshots, a scripted chat server, stubs.

The model is the official ``openai`` client talking to a scripted
OpenAI-compatible server on loopback (it replays replies in the exact
chat-completions JSON shape and records every request), so what the loop sends
is checked as a server sees it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sandkernel import Engine, ExecutionResult
from sandkernel.loop import ModelReply, OpenAIChatModel, ToolChoice
from sandkernel.results import ProducedFile, Usage
from tests._model import Reply, ScriptedModel, in_order

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
EngineFactory = Callable[..., Awaitable[Engine]]


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
# `sales.groupby("month").sum()` in the README's task: the answer is in its last row.
_MONTHLY_UNITS = [5, 7, 6, 8, 9, 4, 6, 7, 5, 8, 6, 99]
MONTHLY_FRAME = "       units  revenue\nmonth                \n" + "\n".join(
    f"{month:<5}{units:>7}{units * 10:>9}" for month, units in enumerate(_MONTHLY_UNITS, 1)
)
MONTHLY_FRAME_HTML = (
    '<table border="1" class="dataframe">\n  <tbody>\n'
    + "".join(
        f"    <tr><th>{month}</th><td>{units}</td><td>{units * 10}</td></tr>\n"
        for month, units in enumerate(_MONTHLY_UNITS, 1)
    )
    + "  </tbody>\n</table>"
)
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5E"


def completion(content: str | None = None, calls: Sequence[tuple[str, str]] = ()) -> Reply:
    """A scripted turn; ``calls`` are ``(id, arguments JSON text)`` of python calls."""
    return Reply(content, [(call_id, "python", args) for call_id, args in calls])


def code(source: str) -> str:
    return json.dumps({"code": source})


@contextlib.asynccontextmanager
async def scripted_model(
    script: Sequence[Reply],
) -> AsyncIterator[tuple[ScriptedModel, OpenAIChatModel]]:
    async with ScriptedModel(in_order(*script)) as server:
        model = OpenAIChatModel(
            model="scripted", base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=30
        )
        try:
            yield server, model
        finally:
            await model.aclose()


def tool_messages(transcript: Sequence[Mapping[str, Any]]) -> list[str]:
    return [m["content"] for m in transcript if m["role"] == "tool"]


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
