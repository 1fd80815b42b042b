"""Tracebacks cleaned for a model: the user's frames, not the kernel's machinery.

:func:`user_traceback` drops IPython/ipykernel frames, folds library frames
into a count and shows frames repeated by deep recursion once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

_IPY_FRAME = re.compile(r"^(?:Cell In\[\d+\], line \d+|File \S.*)")
#: A frame of a plain Python traceback, or of the indented layout IPython uses
#: when code the cell called raised a SyntaxError (``  File PATH:LINE in f``).
_PLAIN_FRAME = re.compile(
    r'^  (?:File "(?P<path>[^"]+)", line \d+'
    r'|File (?P<ipath>[^\s"]\S*?):\d+(?: in .*)?$'
    r"|(?P<cell>Cell In\[\d+\], line \d+))"
)
_IPY_FILE = re.compile(r"^File (?P<path>.+?)(?::\d+)?(?:, in .*)?$")
_HEADER = re.compile(r"^(\w[\w.]*) {2,}Traceback \(most recent call last\)$")
_DASHES = re.compile(r"^-{20,}$")
#: Where a traceback (chained or not) begins: what follows an exception's message.
_TRACEBACK_START = re.compile(
    r"^(?:-{20,}$|(?:Exception Group )?Traceback \(most recent call last\):$"
    r"|\w[\w.]* {2,}Traceback \(most recent"
    r"|The above exception was the direct cause|During handling of the above exception)"
)
#: An exception group's layout (Python 3.11+): nested boxes, each indented by its depth,
#: with a margin (``| ``) before each line, the top group's header marked ``+ `` instead, and
#: rules (``+-+---- 1 ----``, ``+------``) between the group's exceptions.
_GROUP_TITLE = "Exception Group Traceback (most recent call last):"
_GROUP_HEADER = re.compile(rf"^(?P<indent> *)\+ (?P<text>{re.escape(_GROUP_TITLE)})$")
_GROUP_LINE = re.compile(r"^(?P<indent> *)\|(?: (?P<text>.*))?$")
_GROUP_RULE = re.compile(r"^ *\+-[+-]*(?: (?:\d+|\.\.\.) -+)?$")
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
#: The longest cycle of frames folded: looking for longer ones would take time growing with
#: the square of a deep traceback's length, for cycles rarely seen.
_MAX_CYCLE_FRAMES = 50
_NO_SOURCE = "Could not get source, probably due dynamically evaluated source code."

FrameKind = Literal["user", "library", "internal"]


@dataclass
class _Frame:
    kind: FrameKind
    lines: list[str]


@dataclass
class _Repeat:
    """Where frames were folded away: the ``period`` frames before it came ``times`` more times."""

    period: int
    times: int


def user_traceback(traceback: str) -> str:
    """A traceback with only the user's frames: cells, exec'd code and files of the workspace.

    IPython/ipykernel frames are dropped. Library frames (pandas, the standard
    library...) are folded into a count; when the exception was raised inside
    a library, its innermost frame is kept in two lines. Frames repeated many
    times in a row (deep recursion: a function calling itself, or a cycle of
    functions calling each other) are shown once with the count.
    Works on IPython's context tracebacks and on plain Python ones, including
    an exception group's, whose boxes are kept and each cleaned the same way.
    """
    lines = traceback.split("\n")
    grouped = any(_GROUP_HEADER.match(line) for line in lines)
    out = _clean_group(lines) if grouped else _clean(lines)
    while out and not out[0].strip():
        out.pop(0)
    return "\n".join(line.rstrip() for line in out).rstrip("\n")


def _clean(lines: list[str]) -> list[str]:
    items = _parse_traceback(lines)
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
    return out


def _clean_group(lines: list[str]) -> list[str]:
    """An exception group's traceback: the text of each box cleaned alone, then boxed again.

    The margins hide the frames from the parser, and a box holds a whole
    traceback (or chain) of one exception of the group; the rules are kept.
    """
    out: list[str] = []
    box: list[str] = []
    indent: str | None = None  # the box's indent; None outside any box
    plus_header = False  # the box is the top group's, whose header is marked "+ "
    for line in lines:
        header = _GROUP_HEADER.match(line)
        boxed = header or _GROUP_LINE.match(line)
        rule = _GROUP_RULE.match(line)
        line_indent = boxed.group("indent") if boxed else None
        if rule or line_indent != indent:
            out += _rebox(_clean(box), indent, plus_header=plus_header)
            box, indent, plus_header = [], line_indent, False
        if rule:
            out.append(line)
        elif boxed:
            plus_header = plus_header or header is not None
            box.append(boxed.group("text") or "")
        else:
            box.append(line)
    return out + _rebox(_clean(box), indent, plus_header=plus_header)


def _rebox(lines: list[str], indent: str | None, *, plus_header: bool) -> list[str]:
    if indent is None:
        return lines
    return [
        f"{indent}{'+' if plus_header and line.startswith(_GROUP_TITLE) else '|'} {line}"
        for line in lines
    ]


def _parse_traceback(lines: list[str]) -> list[str | _Frame]:
    """Lines and frames; blank lines between two frames are absorbed.

    Once a traceback's frames are followed by its exception's line, what
    comes next is the exception's message (which may hold a line such as
    ``File a.csv: ...``), up to the next traceback or chaining line.
    """
    items: list[str | _Frame] = []
    framed = in_message = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _TRACEBACK_START.match(line):
            framed = in_message = False
        elif framed and line[:1].strip() and not in_message:
            # At the margin: not "  [Previous line repeated N more times]", nor
            # IPython's note of hidden frames, nor another frame.
            in_message = not (
                _PLAIN_FRAME.match(line) or _IPY_FRAME.match(line) or _HIDDEN_NOTE.match(line)
            )
        if in_message:
            items.append(line)
            i += 1
            continue
        plain = _PLAIN_FRAME.match(line)
        if plain or _IPY_FRAME.match(line):
            framed = True
            frame = [line]
            i += 1
            if plain:
                while i < len(lines) and lines[i].startswith("    "):
                    frame.append(lines[i])
                    i += 1
                # The indented layout puts a blank line between frames: absorbed too.
                if i + 1 < len(lines) and not lines[i].strip() and _PLAIN_FRAME.match(lines[i + 1]):
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
    if header.startswith("Cell In[") or (plain and plain.group("cell")):
        return "user"
    if plain:
        path = plain.group("path") or plain.group("ipath")
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
    items = _fold_repeats([f for f in run if f.kind != "internal"])
    for n, frame in enumerate(items):
        if isinstance(frame, _Repeat):
            if library:
                notes.append(_omitted(len(library)))
                library = []
            # Under the frames it counts: the last one's lines, or the note of its library frames.
            if notes:
                blocks.append([*notes, _repeat_note(frame)])
                notes = []
            else:
                blocks[-1].append(_repeat_note(frame))
            continue
        if frame.kind == "library":
            library.append(frame)
            if n < len(items) - 1:
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
    out: list[str] = []
    for block in blocks:
        if out and ipython_style:
            out.append("")
        out += block
    return out


def _fold_repeats(frames: list[_Frame]) -> list[_Frame | _Repeat]:
    """``frames`` with each run of a repeated cycle of them (recursion) kept once, then counted.

    The cycle is one frame when a function calls itself, several when functions
    call each other (f, g, f, g...). It holds a frame of the user's: library
    frames alone are folded into a count anyway. An innermost library frame is
    never folded: it is kept to show where the exception was raised.
    """
    ids: dict[tuple[str, ...], int] = {}
    keys = [ids.setdefault((frame.kind, *frame.lines), len(ids)) for frame in frames]
    user = [frame.kind == "user" for frame in frames]
    end = len(frames) - 1 if frames and frames[-1].kind == "library" else len(frames)
    out: list[_Frame | _Repeat] = []
    i = 0
    while i < len(frames):
        period, times = _widest_cycle(keys, user, i, end)
        if times:
            out += [*frames[i : i + period], _Repeat(period, times)]
            i += period * (times + 1)
        else:
            out.append(frames[i])
            i += 1
    return out


def _widest_cycle(keys: list[int], user: list[bool], start: int, end: int) -> tuple[int, int]:
    """The cycle of frames from ``start`` (before ``end``) whose repeats cover the most frames.

    Returns its period and how many times it repeats after its first
    occurrence, (0, 0) if none does; of two that cover as many frames, the shorter.
    """
    best_period = best_times = 0
    last = min((start + end) // 2, start + _MAX_CYCLE_FRAMES)  # a cycle and a repeat fit
    next_start = start
    while True:
        try:  # the next frame like the first: where a repeat of a cycle would begin
            next_start = keys.index(keys[start], next_start + 1, last + 1)
        except ValueError:
            return best_period, best_times
        period = next_start - start
        if not any(user[start:next_start]):
            continue
        cycle = keys[start:next_start]
        times = 0
        while (
            next_start + (times + 1) * period <= end
            and keys[next_start + times * period : next_start + (times + 1) * period] == cycle
        ):
            times += 1
        if times * period > best_times * best_period:
            best_period, best_times = period, times


def _repeat_note(repeat: _Repeat) -> str:
    frames = "frame" if repeat.period == 1 else f"{repeat.period} frames"
    times = f"{repeat.times} more time{'s' if repeat.times != 1 else ''}"
    return f"[... the {frames} above repeated {times}]"


def _omitted(count: int) -> str:
    return f"({count} library frame{'s' if count != 1 else ''} omitted)"


def _brief(frame: _Frame) -> list[str]:
    header = frame.lines[0]
    prefix = next(p for p in ('  File "', "  File ", "File ") if header.startswith(p))
    rest = header[len(prefix) :]
    shorter = _SITE_PACKAGES.sub("", rest)
    header = prefix + (shorter if shorter != rest else _STDLIB.sub("", rest))
    # A library function's parameters (pandas' read_csv has dozens) say nothing useful here.
    header = re.sub(r"(, in [^(]*)\(.+\)$", r"\1(...)", header)[:_MAX_HEADER_CHARS]
    arrows = [line for line in frame.lines[1:] if _ARROW.match(line)]
    body = arrows[:1] or frame.lines[1:2]
    return [header, *(line[:_MAX_HEADER_CHARS] for line in body)]
