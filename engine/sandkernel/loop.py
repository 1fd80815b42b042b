"""The model loop: a chat model writes code, the sandbox runs it, the model reads the result.

When the code fails the model sees the error, changes the code and runs it
again, until it answers or runs out of attempts::

    async with Engine(pool_size=1) as engine, OpenAIChatModel(model="gpt-4o-mini") as model:
        session = await engine.session()
        outcome = await run_loop(model, "What is the 30th Fibonacci number?", session)
        print(outcome.outcome, outcome.final_answer)

Three pieces, each usable alone:

* :data:`PYTHON_TOOL`, the ``python`` tool in the OpenAI chat-completions
  tools format, for any agent framework;
* :func:`format_result`, the text a model reads for one :class:`ExecutionResult`:
  status first, output within a character budget (head and tail kept), only
  the user's traceback frames, and a one-line hint for the common failures;
* :func:`run_loop` with a :class:`ChatModel` such as :class:`OpenAIChatModel`
  (any OpenAI-compatible endpoint: OpenAI, llama.cpp, vLLM, Ollama...).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, cast

from pydantic import BaseModel, ConfigDict, Field

from sandkernel.errors import ModelCallFailed
from sandkernel.results import KERNEL_LOST, DisplayOutput, ExecutionResult, ProducedFile

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = [
    "DEFAULT_AVAILABLE_MODULES",
    "PYTHON_TOOL",
    "ChatModel",
    "CodeRunner",
    "LoopEvent",
    "LoopResult",
    "ModelCallFailed",
    "ModelReply",
    "OpenAIChatModel",
    "ToolCall",
    "ToolChoice",
    "format_result",
    "python_tool",
    "run_loop",
    "user_traceback",
]

ToolChoice = Literal["auto", "required", "none"]
Outcome = Literal["answered", "max_attempts", "tool_forbidden"]

#: What the sandbox offers besides the standard library (see kernels/requirements.txt).
DEFAULT_AVAILABLE_MODULES: tuple[str, ...] = ("numpy", "pandas", "matplotlib", "openpyxl")

TOOL_NAME = "python"


# --------------------------------------------------------------------------- the tool


def python_tool(*, available_modules: Sequence[str] = DEFAULT_AVAILABLE_MODULES) -> dict[str, Any]:
    """The ``python`` tool in the OpenAI chat-completions ``tools`` format.

    Args:
        available_modules: libraries the description names as installed.

    Returns:
        A new dict, safe to change.
    """
    libraries = ", ".join(available_modules)
    description = (
        "Run Python code in a stateful Jupyter (IPython) kernel and see the result. "
        "Variables, imports and functions persist between calls of this conversation. "
        "Read input files from /mnt/data and save every file you create there "
        "(charts, CSV, Excel...): files saved in /mnt/data are returned to the user. "
        "There is no internet access, so pip install does not work; installed besides the "
        f"standard library: {libraries}. Each call has a time limit and a memory limit. "
        "The result starts with a status line (ok, error, timeout, oom, dead), then "
        "stdout and stderr (long output is cut in the middle), the value of the last "
        "expression, images displayed (plt.show()), the traceback of your code if it "
        "failed, and the files created. If the code fails, read the error, fix the code "
        "and call this tool again."
    )
    return {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {
                        "type": "string",
                        "description": "Python source run as one notebook cell; the value "
                        "of its last expression is shown.",
                    }
                },
                "required": ["code"],
                "additionalProperties": False,
            },
        },
    }


#: The ``python`` tool, as :func:`python_tool` builds it with the default libraries.
PYTHON_TOOL: dict[str, Any] = python_tool()


# --------------------------------------------------------------------------- formatting

_DF_FOOTER = re.compile(r"\n\[(\d+) rows x (\d+) columns\]\s*$")
_DF_HTML = re.compile(r"<table\b[^>]*\bclass=\"[^\"]*\bdataframe\b")
_DF_HTML_SHAPE = re.compile(r"<p>(\d+) rows × (\d+) columns</p>")
_DF_MAX_LINES = 10
_DF_MAX_LINE_CHARS = 160
_ENGINE_CUT = re.compile(r"\n\[\.\.\. (\d+) (?:bytes|characters) cut \.\.\.\]\n")
_CELL_FILE = re.compile(r"\(\d+\.py, line (\d+)\)")
_MISSING_MODULE = re.compile(r"No module named '([^']+)'")
_TIME_LIMIT = re.compile(r"its (\d+(?:\.\d+)?) s limit")
_MEMORY_LIMIT = re.compile(r"limit (\d+(?:\.\d+)?) ?([KMGT]i?B)")
#: A produced file holding a whole stream (for example ``stdout.txt`` or ``cell-3-stdout.log``).
_FULL_STREAM_FILE = re.compile(r"(?:^|[-_.])(stdout|stderr)\.(?:txt|log)$")
_MAX_FILES_LISTED = 20
_MIN_PART_CHARS = 200


def format_result(
    result: ExecutionResult,
    *,
    budget_chars: int = 8000,
    available_modules: Sequence[str] = DEFAULT_AVAILABLE_MODULES,
    after_restart: bool = False,
) -> str:
    """The text a model reads for one cell's result.

    The status comes first, on one line. Then stdout, stderr, displays, the
    cell's value and the traceback share what the budget leaves, each kept
    whole if it fits and otherwise cut in the middle (head and tail kept, with
    a note of how much was cut). Tracebacks keep the user's frames only:
    IPython/ipykernel internals are dropped, library frames are folded into a
    count. Produced files and a one-line hint for common failures close it.

    The text depends only on the arguments, so it can be snapshot-tested.

    Args:
        result: what the cell did.
        budget_chars: the most characters returned (at least a few hundred are
            needed for anything useful).
        available_modules: named in the hint when an import fails.
        after_restart: the kernel of this session was restarted since the code
            the model relies on ran, so earlier variables may be gone.
    """
    head = [_status_line(result)]
    # state_lost on a cell whose kernel survived: it was replaced before the cell ran.
    # (When the kernel died in this cell, the status and the hint say so.)
    if result.state_lost and result.kernel_alive and result.status not in KERNEL_LOST:
        head.append(
            "Note: the kernel was restarted before this cell ran; variables and imports "
            "from earlier cells are gone."
        )
    elif result.message and result.status in ("ok", "error"):
        head.append(f"Note: {_one_line(result.message, 400)}")

    parts = _variable_parts(result)
    tail = _files_section(result) + _hints(result, available_modules, after_restart)

    fixed = "\n".join(head + tail)
    titles = sum(len(p.title) + 9 for p in parts)  # "--- " + title + " ---" + 2 newlines
    room = max(0, budget_chars - len(fixed) - titles)
    shares = _allot([len(p.text) for p in parts], room)
    rendered = list(head)
    for part, share in zip(parts, shares, strict=True):
        rendered.append(f"--- {part.title} ---")
        rendered.append(_cut_middle(part.text, max(share, _MIN_PART_CHARS), where=part.full_file))
    rendered += tail
    text = "\n".join(rendered)
    if len(text) > budget_chars:  # only when the fixed parts alone exceed a tiny budget
        text = _cut_middle(text, budget_chars)
    return text


@dataclass
class _Part:
    title: str
    text: str
    full_file: str | None = None


def _status_line(result: ExecutionResult) -> str:
    if result.status == "ok":
        if not (result.stdout or result.stderr or result.displays or result.value or result.files):
            return "Status: ok (no output)"
        return "Status: ok"
    if result.status == "error":
        if result.error is None:
            return "Status: error"
        return f"Status: error: {_one_line(_error_line(result), 400)}"
    return f"Status: {result.status}: {_one_line(result.message or 'no details', 400)}"


def _error_line(result: ExecutionResult) -> str:
    assert result.error is not None
    # SyntaxErrors name the kernel's temporary file of the cell: only the line matters.
    value = _CELL_FILE.sub(r"(line \1)", result.error.value)
    return f"{result.error.name}: {value}".rstrip(": ")


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _variable_parts(result: ExecutionResult) -> list[_Part]:
    parts: list[_Part] = []
    display_files = [f for f in result.files if f.source == "display"]
    if result.stdout:
        stdout = result.stdout.removesuffix("\n")
        parts.append(_Part("stdout", stdout, _full_stream_file(result, "stdout")))
    if result.stderr:
        stderr = result.stderr.removesuffix("\n")
        parts.append(_Part("stderr", stderr, _full_stream_file(result, "stderr")))
    if result.displays or result.displays_truncated:
        lines = [_render_bundle(d, display_files, "displayed") for d in result.displays]
        if result.displays_truncated:
            lines.append("[more displays were left out: their total size was over the cap]")
        parts.append(_Part("displays", "\n".join(lines)))
    if result.value is not None:
        label = f"Out[{result.execution_count}]" if result.execution_count else "value"
        parts.append(_Part(label, _render_bundle(result.value, display_files, "returned")))
    if result.error is not None and result.error.traceback:
        title = "traceback (where it was stopped)" if result.status == "timeout" else "traceback"
        parts.append(_Part(title, user_traceback(result.error.traceback)))
    return parts


def _full_stream_file(result: ExecutionResult, stream: str) -> str | None:
    for file in result.files:
        match = _FULL_STREAM_FILE.search(file.name)
        if match and match.group(1) == stream:
            return file.path or file.name
    return None


def _render_bundle(bundle: DisplayOutput, display_files: list[ProducedFile], verb: str) -> str:
    data = bundle.data
    images = sorted(k for k in data if k.startswith("image/"))
    if images:
        # The engine stores displayed images in the order they were shown, one file each.
        if display_files and display_files[0].mime_type in data:
            saved = display_files.pop(0)
            return f"[{saved.mime_type} {verb}, saved as {saved.name}]"
        return f"[image {verb}]"
    summary = _dataframe_summary(data)
    if summary is not None:
        return summary
    plain = data.get("text/plain")
    if isinstance(plain, str):
        return plain
    return f"[{', '.join(sorted(data)) or 'empty output'} {verb}]"


def _dataframe_summary(data: Mapping[str, Any]) -> str | None:
    plain = data.get("text/plain")
    html = data.get("text/html")
    plain = plain if isinstance(plain, str) else None
    html = html if isinstance(html, str) else None
    footer = _DF_FOOTER.search(plain) if plain else None
    if not footer and not (html and _DF_HTML.search(html)):
        return None
    shape = _dataframe_shape(footer, html)
    title = f"DataFrame, {shape[0]} rows x {shape[1]} columns" if shape else "DataFrame"
    if plain is None:
        return f"{title} (no text form)"
    body = plain[: footer.start()] if footer else plain
    lines = body.rstrip("\n").split("\n")
    shown = [
        line if len(line) <= _DF_MAX_LINE_CHARS else line[: _DF_MAX_LINE_CHARS - 3] + "..."
        for line in lines[:_DF_MAX_LINES]
    ]
    if len(lines) <= _DF_MAX_LINES and shown == lines:
        return f"{title}:\n" + "\n".join(shown)
    more = len(lines) - len(shown)
    note = f"[... {more} more lines of its repr not shown" if more else "[... lines cut"
    return f"{title}; the first lines of its repr:\n" + "\n".join(shown) + f"\n{note} ...]"


def _dataframe_shape(footer: re.Match[str] | None, html: str | None) -> tuple[int, int] | None:
    if footer:
        return int(footer.group(1)), int(footer.group(2))
    if html is None:
        return None
    shown = _DF_HTML_SHAPE.search(html)
    if shown:
        return int(shown.group(1)), int(shown.group(2))
    # Shown whole (no dimensions line): count the body's rows and the first row's cells.
    body = html.partition("<tbody>")[2].partition("</tbody>")[0]
    rows = body.count("<tr")
    first = body.partition("</tr>")[0]
    return (rows, first.count("<td")) if rows else None


def _files_section(result: ExecutionResult) -> list[str]:
    if not result.files and not result.files_truncated:
        return []
    lines = ["--- files ---"]
    for file in result.files[:_MAX_FILES_LISTED]:
        where = file.path if file.path else "a displayed image"
        lines.append(f"- {file.name} ({file.mime_type}, {_size(file.size_bytes)}): {where}")
    if len(result.files) > _MAX_FILES_LISTED:
        lines.append(f"- ... and {len(result.files) - _MAX_FILES_LISTED} more")
    if result.files_truncated:
        lines.append(f"- some files were left out: {result.files_note or 'over the caps'}")
    return lines


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.1f} GiB"


def _hints(
    result: ExecutionResult, available_modules: Sequence[str], after_restart: bool
) -> list[str]:
    error = result.error
    if result.status == "error" and error is not None:
        if error.name == "ModuleNotFoundError":
            match = _MISSING_MODULE.search(error.value)
            module = match.group(1) if match else "that module"
            if module.split(".")[0] not in available_modules:
                return [
                    f"Hint: {module!r} is not installed and there is no internet access, so "
                    "pip install cannot work. Available: "
                    f"{', '.join(available_modules)} and the standard library."
                ]
        if error.name == "StdinNotImplementedError":
            return [
                "Hint: input() cannot work here: nobody can type an answer. Put the values "
                "in the code instead."
            ]
        if error.name == "NameError" and (result.state_lost or after_restart):
            return [
                "Hint: the kernel was restarted, so variables and imports defined in earlier "
                "cells are gone; run their definitions again (in this cell or a new one)."
            ]
        return []
    if result.status == "timeout":
        match = _TIME_LIMIT.search(result.message or "")
        limit = f"its {match.group(1)} s time limit" if match else "its time limit"
        kept = (
            "the kernel and its variables survive"
            if result.kernel_alive
            else "the kernel was killed, so its variables are lost"
        )
        return [
            f"Hint: the cell was stopped at {limit} ({kept}). Make the code faster "
            "(vectorise, work on a sample) or split the work into smaller cells."
        ]
    if result.status == "oom":
        match = _MEMORY_LIMIT.search(result.message or "")
        limit = f"the {match.group(1)} {match.group(2)} memory limit" if match else "its memory"
        lost = (
            ""
            if result.kernel_alive
            else " The kernel died: variables and imports are lost (files in /mnt/data are kept)."
        )
        return [
            f"Hint: the code ran out of {limit}. Use less memory: load only the columns "
            "you need, use smaller dtypes, process the data in chunks, delete large "
            f"objects.{lost}"
        ]
    if result.status in KERNEL_LOST:
        return [
            "Hint: the kernel died, so variables and imports are lost (files in /mnt/data "
            "are kept). The next call starts a fresh kernel: run the definitions you need again."
        ]
    return []


def _allot(sizes: Sequence[int], total: int) -> list[int]:
    """Share ``total`` among parts: small parts whole, the rest split evenly (water-filling)."""
    shares = [0] * len(sizes)
    pending = sorted(range(len(sizes)), key=lambda i: sizes[i])
    remaining = total
    while pending:
        share = remaining // len(pending)
        smallest = pending[0]
        if sizes[smallest] > share:
            for i in pending:
                shares[i] = share
            break
        shares[smallest] = sizes[smallest]
        remaining -= sizes[smallest]
        pending.pop(0)
    return shares


def _cut_middle(text: str, limit: int, *, where: str | None = None) -> str:
    """``text`` within ``limit`` characters: head and tail kept, the middle replaced by a note.

    Cuts fall on line ends where one is near. The note counts what was cut,
    including what the engine itself had already cut from the stream.
    """
    if len(text) <= limit:
        return text
    located = f"; the full output is in {where}" if where else ""
    already_cut = sum(int(m.group(1)) for m in _ENGINE_CUT.finditer(text))
    widest = _cut_note(len(text) + already_cut, text.count("\n"), located, at_least=True)
    keep = max(0, limit - len(widest))
    head = text[: keep // 2]
    tail = text[len(text) - (keep - len(head)) :] if keep - len(head) else ""
    newline = head.rfind("\n")
    if newline >= len(head) // 2:
        head = head[: newline + 1]
    newline = tail.find("\n")
    if 0 <= newline < len(tail) // 2:
        tail = tail[newline + 1 :]
    middle = text[len(head) : len(text) - len(tail)]
    cut_chars = len(middle)
    earlier = _ENGINE_CUT.search(middle)
    if earlier:
        cut_chars += int(earlier.group(1)) - len(earlier.group(0))
    note = _cut_note(cut_chars, middle.count("\n"), located, at_least=earlier is not None)
    if not head.endswith("\n") and head:
        note = "\n" + note.lstrip("\n")
    return (head + note.lstrip("\n") + tail)[: max(limit, 0)]


def _cut_note(chars: int, lines: int, located: str, *, at_least: bool) -> str:
    counted = f"at least {lines:,} lines" if at_least else f"{lines:,} lines"
    return f"\n[... {chars:,} characters ({counted}) cut{located} ...]\n"


# --------------------------------------------------------------------------- tracebacks

_IPY_FRAME = re.compile(r"^(?:Cell In\[\d+\], line \d+|File \S.*)")
_PLAIN_FRAME = re.compile(r'^  File "(?P<path>[^"]+)", line \d+')
_IPY_FILE = re.compile(r"^File (?P<path>.+?)(?::\d+)?(?:, in .*)?$")
_HEADER = re.compile(r"^(\w[\w.]*) {2,}Traceback \(most recent call last\)$")
_DASHES = re.compile(r"^-{20,}$")
_HIDDEN_NOTE = re.compile(r"^\[\.\.\. skipping hidden \d+ frames?\]$")
_ARROW = re.compile(r"^\s*-*>\s*\d+")
#: Packages whose frames are the interpreter's machinery, never the user's concern.
_INTERNAL_PACKAGES = re.compile(
    r"[/\\](?:IPython|ipykernel|ipykernel_launcher|traitlets|jupyter_client|jupyter_core"
    r"|zmq|tornado|comm|debugpy|matplotlib_inline|sandkernel)[/\\]"
)
_USER_PATHS = ("/mnt/data/", "/tmp/")  # noqa: S108 - paths inside the sandbox
_SITE_PACKAGES = re.compile(r"^.*[/\\](?:site|dist)-packages[/\\]")
_STDLIB = re.compile(r"^.*[/\\]lib[/\\]python\d+\.\d+[/\\]")
_MAX_HEADER_CHARS = 160
_NO_SOURCE = "Could not get source, probably due dynamically evaluated source code."

FrameKind = Literal["user", "library", "internal"]


@dataclass
class _Frame:
    kind: FrameKind
    lines: list[str]


def user_traceback(traceback: str) -> str:
    """A traceback with only the user's frames: cells, exec'd code and files of the workspace.

    IPython/ipykernel frames are dropped. Library frames (pandas, the standard
    library...) are folded into a count; when the exception was raised inside
    a library, its innermost frame is kept in two lines. A frame repeated many
    times in a row (deep recursion) is shown once with the count.
    Works on IPython's context tracebacks and on plain Python ones.
    """
    items = _parse_traceback(traceback.split("\n"))
    out: list[str] = []
    i = 0
    while i < len(items):
        item = items[i]
        if isinstance(item, str):
            if not (_DASHES.match(item) or _HIDDEN_NOTE.match(item)):
                header = _HEADER.match(item)
                out.append(
                    f"{header.group(1)}  Traceback (most recent call last)" if header else item
                )
            i += 1
            continue
        run: list[_Frame] = []
        while i < len(items) and isinstance(items[i], _Frame):
            run.append(cast(_Frame, items[i]))
            i += 1
        out += _render_frames(run, ipython_style=not run[0].lines[0].startswith("  File "))
    while out and not out[0].strip():
        out.pop(0)
    return "\n".join(line.rstrip() for line in out).rstrip("\n")


def _parse_traceback(lines: list[str]) -> list[str | _Frame]:
    """Lines and frames; blank lines between two frames are absorbed."""
    items: list[str | _Frame] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        plain = _PLAIN_FRAME.match(line)
        if plain or _IPY_FRAME.match(line):
            frame = [line]
            i += 1
            if plain:
                while i < len(lines) and lines[i].startswith("    "):
                    frame.append(lines[i])
                    i += 1
            else:
                while i < len(lines) and lines[i].strip():
                    frame.append(lines[i])
                    i += 1
                # A blank line followed by another frame belongs to this run of frames.
                if i + 1 < len(lines) and not lines[i].strip() and _IPY_FRAME.match(lines[i + 1]):
                    i += 1
            # IPython's placeholder for code it has no source of (exec, Cython) tells nothing.
            frame = [ln for ln in frame if _NO_SOURCE not in ln]
            items.append(_Frame(_frame_kind(line, plain), frame))
            continue
        items.append(line)
        i += 1
    return items


def _frame_kind(header: str, plain: re.Match[str] | None) -> FrameKind:
    if header.startswith("Cell In["):
        return "user"
    if plain:
        path = plain.group("path")
    else:
        match = _IPY_FILE.match(header)
        path = match.group("path") if match else header[5:]
    if path.startswith("<"):
        # <string> is code the user exec'd; <magic-timeit>, <decorator-gen-N> are IPython's.
        if path.startswith(("<magic-", "<decorator-gen")):
            return "internal"
        if path.startswith("<frozen"):
            return "library"
        return "user"
    if _INTERNAL_PACKAGES.search("/" + path):
        return "internal"
    if path.startswith(_USER_PATHS):
        return "user"
    return "library"


def _render_frames(run: list[_Frame], *, ipython_style: bool) -> list[str]:
    blocks: list[list[str]] = []
    notes: list[str] = []  # put on top of the next block shown
    library: list[_Frame] = []
    previous: list[str] | None = None
    repeats = 0
    visible = [f for f in run if f.kind != "internal"]
    for n, frame in enumerate(visible):
        if frame.kind == "user" and frame.lines == previous:
            repeats += 1
            continue
        if repeats:
            blocks[-1].append(f"[... the frame above repeated {repeats} more times]")
            repeats = 0
        previous = frame.lines if frame.kind == "user" else None
        if frame.kind == "library":
            library.append(frame)
            if n < len(visible) - 1:
                continue
            # The exception was raised inside a library: keep its innermost frame, briefly.
            if len(library) > 1:
                notes.append(_omitted(len(library) - 1))
            blocks.append([*notes, *_brief(library[-1])])
            notes, library = [], []
            continue
        if library:
            notes.append(_omitted(len(library)))
            library = []
        blocks.append([*notes, *frame.lines])
        notes = []
    if repeats:
        blocks[-1].append(f"[... the frame above repeated {repeats} more times]")
    out: list[str] = []
    for block in blocks:
        if out and ipython_style:
            out.append("")
        out += block
    return out


def _omitted(count: int) -> str:
    return f"({count} library frame{'s' if count != 1 else ''} omitted)"


def _brief(frame: _Frame) -> list[str]:
    header = frame.lines[0]
    prefix = '  File "' if header.startswith('  File "') else "File "
    rest = header[len(prefix) :]
    shorter = _SITE_PACKAGES.sub("", rest)
    header = prefix + (shorter if shorter != rest else _STDLIB.sub("", rest))
    # A library function's parameters (pandas' read_csv has dozens) say nothing useful here.
    header = re.sub(r"(, in [^(]*)\(.+\)$", r"\1(...)", header)[:_MAX_HEADER_CHARS]
    arrows = [line for line in frame.lines[1:] if _ARROW.match(line)]
    body = arrows[:1] or frame.lines[1:2]
    return [header, *(line[:_MAX_HEADER_CHARS] for line in body)]


# --------------------------------------------------------------------------- models


class ToolCall(BaseModel):
    """A tool call as the model sent it; ``arguments`` is the raw JSON text."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    arguments: str


class ModelReply(BaseModel):
    """One assistant turn: text, tool calls, or both."""

    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str | None = None


class ChatModel(Protocol):
    """What :func:`run_loop` needs from a chat model."""

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: ToolChoice,
    ) -> ModelReply:
        """One assistant turn for ``messages`` (chat-completions message dicts)."""
        ...


class OpenAIChatModel:
    """A :class:`ChatModel` over the official ``openai`` package's ``AsyncOpenAI``.

    Works with any OpenAI-compatible chat-completions endpoint (OpenAI,
    llama.cpp's server, vLLM, Ollama...). Close it with :meth:`aclose` or use
    it as ``async with``.

    Args:
        model: the model name the endpoint knows.
        base_url: the endpoint, e.g. ``http://127.0.0.1:8080/v1`` (default:
            ``OPENAI_BASE_URL`` or OpenAI's).
        api_key: default ``OPENAI_API_KEY``; a local endpoint given by
            ``base_url`` gets a placeholder when neither is set.
        create_kwargs: passed to every ``chat.completions.create`` call
            (``temperature``, ``max_tokens``...).
        **client_kwargs: passed to ``AsyncOpenAI`` (``timeout``, ``max_retries``...).

    Raises:
        ImportError: the ``openai`` package is missing (``pip install 'sandkernel[openai]'``).
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        create_kwargs: Mapping[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError(
                "OpenAIChatModel needs the openai package: pip install 'sandkernel[openai]'"
            ) from exc
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY")
        if api_key is None and base_url is not None:
            api_key = "not-needed"  # local servers ignore it; the client insists on one
        self.model = model
        self.create_kwargs = dict(create_kwargs or {})
        self.client: AsyncOpenAI = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, **client_kwargs
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self.client.close()

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: ToolChoice,
    ) -> ModelReply:
        """Call ``chat.completions.create`` and reduce its first choice to a :class:`ModelReply`.

        Raises:
            ModelCallFailed: the endpoint failed or answered without a choice.
        """
        import openai

        extra: dict[str, Any] = {}
        if tools:
            extra = {"tools": list(tools), "tool_choice": tool_choice}
        try:
            response = await self.client.chat.completions.create(
                model=self.model,
                messages=cast(Any, [dict(m) for m in messages]),
                stream=False,
                **extra,
                **self.create_kwargs,
            )
        except openai.OpenAIError as exc:
            where = str(self.client.base_url)
            raise ModelCallFailed(
                f"the chat model {self.model!r} at {where} failed: {exc} "
                "(check the base URL, model name and API key)"
            ) from exc
        if not response.choices:
            raise ModelCallFailed(f"the chat model {self.model!r} replied with no choices")
        choice = response.choices[0]
        calls = []
        for call in choice.message.tool_calls or []:
            function = getattr(call, "function", None)
            if function is None:  # a custom (non-function) tool call: not ours
                continue
            arguments = function.arguments
            if not isinstance(arguments, str):  # some servers send an object, not JSON text
                arguments = json.dumps(arguments)
            calls.append(ToolCall(id=call.id, name=function.name, arguments=arguments))
        return ModelReply(
            content=choice.message.content,
            tool_calls=calls,
            finish_reason=choice.finish_reason,
        )


# --------------------------------------------------------------------------- the loop


class CodeRunner(Protocol):
    """Where :func:`run_loop` runs code; a :class:`~sandkernel.session.Session` is one."""

    async def run(
        self, code: str, *, timeout_s: float | None = None, restart: bool | None = None
    ) -> ExecutionResult: ...


class LoopEvent(BaseModel):
    """A step of :func:`run_loop`, as ``on_event`` receives it.

    ``kind`` is ``model_reply`` (``reply`` set), ``code`` (``code`` is about to
    run), ``result`` (``result`` and the ``tool_message`` the model will read)
    or ``rejected_call`` (a tool call that was not run; ``tool_message`` says why).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_reply", "code", "result", "rejected_call"]
    attempt: int = Field(description="code executions counted so far, this one included")
    reply: ModelReply | None = None
    call_id: str | None = None
    code: str | None = None
    result: ExecutionResult | None = None
    tool_message: str | None = None


class LoopResult(BaseModel):
    """How :func:`run_loop` ended and everything that happened on the way."""

    model_config = ConfigDict(extra="forbid")

    outcome: Outcome = Field(
        description="answered: the model replied without a tool call; max_attempts: it still "
        "wanted to run code after the last allowed execution; tool_forbidden: it called the "
        "tool although tool_choice='none' (nothing was run)"
    )
    final_answer: str | None = Field(description="the model's last text, if any")
    message: str | None = Field(default=None, description="why the loop stopped, in words")
    transcript: list[dict[str, Any]] = Field(description="every message, the input included")
    executions: list[ExecutionResult] = Field(default_factory=list)
    files: list[ProducedFile] = Field(default_factory=list, description="from every execution")
    attempts: int = Field(description="tool calls counted against max_attempts")
    model_calls: int = 0

    @property
    def answered(self) -> bool:
        return self.outcome == "answered"


EventCallback = Callable[[LoopEvent], Awaitable[None] | None]


async def run_loop(
    model: ChatModel,
    messages: str | Sequence[Mapping[str, Any]],
    session: CodeRunner,
    *,
    max_attempts: int = 5,
    tool_choice: ToolChoice = "auto",
    budget_chars: int = 8000,
    timeout_s: float | None = None,
    available_modules: Sequence[str] = DEFAULT_AVAILABLE_MODULES,
    on_event: EventCallback | None = None,
) -> LoopResult:
    """Let ``model`` write and run code in ``session`` until it answers.

    Each reply's tool calls run in order in the session; each gets a ``tool``
    message with :func:`format_result`'s text, so a model whose code failed
    reads the error and tries again. The loop ends when the model replies
    without a tool call (``answered``). Every tool call counts as an attempt,
    malformed ones included (they get a message explaining the expected
    arguments). After the last allowed attempt the model is asked once more so
    it can answer; if it asks to run code again, the loop ends with
    ``max_attempts``, so the model is called at most ``max_attempts + 1`` times.

    A kernel that dies (out of memory, killed) is replaced on the next run and
    the model is told its variables are gone.

    Args:
        model: the chat model (:class:`OpenAIChatModel` or any :class:`ChatModel`).
        messages: the conversation so far (chat-completions dicts), or a task as text.
        session: where code runs, usually an engine :class:`~sandkernel.session.Session`.
        max_attempts: tool calls allowed (at least 1).
        tool_choice: as in OpenAI's API. ``"required"`` forces a tool call on the
            first model call only, then becomes ``"auto"`` so the model can
            answer. ``"none"`` forbids tool calls; if the model sends some
            anyway they are not run and the outcome is ``tool_forbidden``.
        budget_chars: the most characters of each tool message.
        timeout_s: wall timeout of each execution (default: the policy's).
        available_modules: named to the model when an import fails.
        on_event: called with a :class:`LoopEvent` at each step (may be async).

    Raises:
        ModelCallFailed: the model could not be called.
        SessionExpired, SessionClosed: the session ended under the loop.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if tool_choice not in ("auto", "required", "none"):
        raise ValueError(f"tool_choice must be 'auto', 'required' or 'none', not {tool_choice!r}")
    if isinstance(messages, str):
        transcript: list[dict[str, Any]] = [{"role": "user", "content": messages}]
    else:
        transcript = [dict(m) for m in messages]
    tools = [python_tool(available_modules=available_modules)]
    executions: list[ExecutionResult] = []
    attempts = 0
    model_calls = 0
    restarted = False
    choice: ToolChoice = tool_choice

    async def emit(event: LoopEvent) -> None:
        if on_event is not None:
            maybe = on_event(event)
            if inspect.isawaitable(maybe):
                await maybe

    def finish(outcome: Outcome, answer: str | None, message: str | None) -> LoopResult:
        return LoopResult(
            outcome=outcome,
            final_answer=answer,
            message=message,
            transcript=transcript,
            executions=executions,
            files=[f for r in executions for f in r.files],
            attempts=attempts,
            model_calls=model_calls,
        )

    async def reject(call: ToolCall, why: str) -> None:
        transcript.append(_tool_message(call.id, why))
        await emit(
            LoopEvent(kind="rejected_call", attempt=attempts, call_id=call.id, tool_message=why)
        )

    while True:
        reply = await model.complete(transcript, tools, choice)
        model_calls += 1
        transcript.append(_assistant_message(reply))
        await emit(LoopEvent(kind="model_reply", attempt=attempts, reply=reply))
        if not reply.tool_calls:
            note = None
            if tool_choice == "required" and attempts == 0:
                note = "the model answered without running code although tool_choice='required'"
            return finish("answered", reply.content, note)
        if tool_choice == "none":
            for call in reply.tool_calls:
                await reject(call, "Not run: code execution is disabled for this reply.")
            return finish(
                "tool_forbidden",
                reply.content,
                "the model called the python tool although tool_choice='none'; nothing was run",
            )
        if attempts >= max_attempts:
            for call in reply.tool_calls:
                await reject(
                    call, f"Not run: the limit of {max_attempts} code executions was reached."
                )
            return finish(
                "max_attempts",
                reply.content,
                f"stopped after {max_attempts} code executions: the model still wanted to run "
                "code instead of answering",
            )
        for call in reply.tool_calls:
            if attempts >= max_attempts:
                await reject(
                    call, f"Not run: the limit of {max_attempts} code executions was reached."
                )
                continue
            attempts += 1
            last = (
                f"\n[That was the last code execution allowed ({max_attempts}); answer now "
                "with what you have.]"
                if attempts == max_attempts
                else ""
            )
            code, problem = _code_of(call)
            if code is None:
                await reject(call, problem + last)
                continue
            await emit(LoopEvent(kind="code", attempt=attempts, call_id=call.id, code=code))
            # A dead kernel is replaced: the model is better served by a fresh kernel
            # (and being told its variables are gone) than by an engine error.
            result = await session.run(code, timeout_s=timeout_s, restart=True)
            executions.append(result)
            text = format_result(
                result,
                budget_chars=budget_chars,
                available_modules=available_modules,
                after_restart=restarted,
            )
            restarted = restarted or result.state_lost or result.status in KERNEL_LOST
            transcript.append(_tool_message(call.id, text + last))
            await emit(
                LoopEvent(
                    kind="result",
                    attempt=attempts,
                    call_id=call.id,
                    code=code,
                    result=result,
                    tool_message=text + last,
                )
            )
        if choice == "required":
            choice = "auto"


def _code_of(call: ToolCall) -> tuple[str | None, str]:
    """The ``code`` argument of a tool call, or why there is none."""
    expected = 'Call the python tool with JSON arguments like {"code": "print(1 + 1)"}.'
    if call.name != TOOL_NAME:
        return (
            None,
            f"Error: there is no tool named {call.name!r}; the only tool is python. {expected}",
        )
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return None, f"Error: the arguments are not valid JSON ({exc.msg} at {exc.pos}). {expected}"
    if not isinstance(arguments, dict):
        return None, f"Error: the arguments must be a JSON object. {expected}"
    code = arguments.get("code")
    if not isinstance(code, str):
        got = ", ".join(sorted(arguments)) or "none"
        return None, f'Error: the "code" argument (a string) is missing (got: {got}). {expected}'
    if not code.strip():
        return None, f'Error: the "code" argument is empty. {expected}'
    return code, ""


def _assistant_message(reply: ModelReply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in reply.tool_calls
        ]
    return message


def _tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}
