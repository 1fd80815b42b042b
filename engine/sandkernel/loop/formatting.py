"""The text a model reads for one cell's result.

:func:`format_result` puts the status first, then the output within a
character budget (head and tail kept), only the user's traceback frames
(:func:`~sandkernel.loop.tracebacks.user_traceback`), the files produced, and a
one-line hint for the common failures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sandkernel.loop.tool import DEFAULT_AVAILABLE_MODULES
from sandkernel.loop.tracebacks import user_traceback
from sandkernel.results import (
    KERNEL_LOST,
    DisplayOutput,
    ExecutionResult,
    ProducedFile,
    strip_ansi,
)

_DF_FOOTER = re.compile(r"\n\[(\d+) rows x (\d+) columns\]\s*$")
_DF_HTML = re.compile(r"<table\b[^>]*\bclass=\"[^\"]*\bdataframe\b")
_DF_HTML_SHAPE = re.compile(r"<p>(\d+) rows × (\d+) columns</p>")
_ENGINE_CUT = re.compile(r"\n\[\.\.\. (\d+) (?:bytes|characters) cut \.\.\.\]\n")
#: Where a traceback printed to stderr begins, and what chains it to the one before.
_PRINTED_TRACEBACK = re.compile(
    r"^(?:  \+ Exception Group )?Traceback \(most recent call last\):$", re.MULTILINE
)
_CHAINED = (
    "\n\nDuring handling of the above exception, another exception occurred:\n\n",
    "\n\nThe above exception was the direct cause of the following exception:\n\n",
)
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
    a note of how much was cut); a DataFrame's repr is headed by its shape.
    Tracebacks keep the user's frames only:
    IPython/ipykernel internals are dropped, library frames are folded into a
    count; one IPython printed to stderr (an exception group's) is shown as the
    traceback. Produced files and a one-line hint for common failures close it.

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
    titles = sum(len(p.title) + 10 for p in parts)  # "--- " + title + " ---" + 2 newlines
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
        shown = result.stdout or result.stderr or result.displays or result.value or result.files
        if not (shown or result.displays_truncated or result.files_truncated):
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
    # Colour codes (a library's coloured log, a progress bar) are noise to a model.
    if result.stdout:
        stdout = strip_ansi(result.stdout).removesuffix("\n")
        parts.append(_Part("stdout", stdout, _full_stream_file(result, "stdout")))
    stderr = strip_ansi(result.stderr).removesuffix("\n")
    error = result.error
    traceback = error.traceback if error is not None else ""
    if error is not None and error.name and not traceback:
        stderr, traceback = _printed_traceback(stderr, error.name)
    if stderr:
        parts.append(_Part("stderr", stderr, _full_stream_file(result, "stderr")))
    if result.displays or result.displays_truncated:
        lines = [_render_bundle(d, display_files, "displayed") for d in result.displays]
        if result.displays_truncated:
            lines.append("[more displays were left out: their total size was over the cap]")
        parts.append(_Part("displays", "\n".join(lines)))
    if result.value is not None:
        label = f"Out[{result.execution_count}]" if result.execution_count else "value"
        parts.append(_Part(label, _render_bundle(result.value, display_files, "returned")))
    if traceback:
        title = "traceback (where it was stopped)" if result.status == "timeout" else "traceback"
        parts.append(_Part(title, user_traceback(traceback)))
    return parts


def _printed_traceback(stderr: str, name: str) -> tuple[str, str]:
    """``stderr`` split before the traceback of exception ``name`` that ends it, if one does.

    IPython prints an exception group's traceback (or that of an exception
    raised while one was handled) to stderr, and sends no error message: it is
    cleaned and shown as the traceback, not left raw in the output.
    """
    starts = [match.start() for match in _PRINTED_TRACEBACK.finditer(stderr)]
    if not starts or name not in stderr[starts[-1] :]:
        return stderr, ""
    start = starts.pop()
    while starts and stderr[:start].endswith(_CHAINED):
        start = starts.pop()
    return stderr[:start].removesuffix("\n"), stderr[start:]


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
    # Its repr is kept whole, like any part: pandas already bounds it (display.max_rows
    # and max_columns elide the middle), and the budget cuts it in the middle, with a
    # note, only when it is over its share; the answer is often in its last rows.
    body = plain[: footer.start()] if footer else plain
    return f"{title}:\n" + body.rstrip("\n")


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
        if error.name == "NameError" and result.state_lost:
            return [
                "Hint: the kernel was restarted, so variables and imports defined in earlier "
                "cells are gone; run their definitions again (in this cell or a new one)."
            ]
        if error.name == "NameError" and after_restart:
            # Not this cell's restart: the name may as well be a typo.
            return [
                "Hint: the kernel was restarted earlier in this conversation; a name defined "
                "only before that restart is gone: define it again if so, else check its "
                "spelling."
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
    including what the engine itself had already cut from the stream (its
    own note is cut whole, never in part), and the lines not shown whole.
    """
    if len(text) <= limit:
        return text
    located = f"; the full output is in {where}" if where else ""
    already_cut = sum(int(m.group(1)) for m in _ENGINE_CUT.finditer(text))
    widest = _cut_note(len(text) + already_cut, text.count("\n") + 1, located, at_least=True)
    keep = max(0, limit - len(widest))
    head = text[: keep // 2]
    tail = text[len(text) - (keep - len(head)) :] if keep - len(head) else ""
    newline = head.rfind("\n")
    if newline >= len(head) // 2:
        head = head[: newline + 1]
    newline = tail.find("\n")
    if 0 <= newline < len(tail) // 2:
        tail = tail[newline + 1 :]
    start, end = len(head), len(text) - len(tail)
    for engine_cut in _ENGINE_CUT.finditer(text):  # a note of the engine the cut reaches
        if engine_cut.start() < end and engine_cut.end() > start:
            start, end = min(start, engine_cut.start()), max(end, engine_cut.end())
    head, middle, tail = text[:start], text[start:end], text[end:]
    engine_cuts = list(_ENGINE_CUT.finditer(middle))
    cut_chars = len(middle) + sum(int(m.group(1)) - len(m.group(0)) for m in engine_cuts)
    # The engine's note is no line of the stream: what it cut is counted as a character,
    # the least there was, joining the lines around it.
    cut = _ENGINE_CUT.sub("~", middle)
    lines = cut.count("\n") + (0 if cut.endswith("\n") else 1)  # a line cut in part counts
    note = _cut_note(cut_chars, lines, located, at_least=bool(engine_cuts))
    if head.endswith("\n") or not head:
        note = note.removeprefix("\n")
    return (head + note + tail)[: max(limit, 0)]


def _cut_note(chars: int, lines: int, located: str, *, at_least: bool) -> str:
    counted = f"{lines:,} line{'s' if lines != 1 else ''}"
    if at_least:
        counted = f"at least {counted}"
    return f"\n[... {chars:,} characters ({counted}) cut{located} ...]\n"
