"""Tracebacks cleaned for a model: the user's frames, not the kernel's machinery.

:func:`user_traceback` drops IPython/ipykernel frames, folds library frames
into a count and shows a frame repeated by deep recursion once.
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
    r"^(?:-{20,}$|Traceback \(most recent call last\):$|\w[\w.]* {2,}Traceback \(most recent"
    r"|The above exception was the direct cause|During handling of the above exception)"
)
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
    prefix = next(p for p in ('  File "', "  File ", "File ") if header.startswith(p))
    rest = header[len(prefix) :]
    shorter = _SITE_PACKAGES.sub("", rest)
    header = prefix + (shorter if shorter != rest else _STDLIB.sub("", rest))
    # A library function's parameters (pandas' read_csv has dozens) say nothing useful here.
    header = re.sub(r"(, in [^(]*)\(.+\)$", r"\1(...)", header)[:_MAX_HEADER_CHARS]
    arrows = [line for line in frame.lines[1:] if _ARROW.match(line)]
    body = arrows[:1] or frame.lines[1:2]
    return [header, *(line[:_MAX_HEADER_CHARS] for line in body)]
