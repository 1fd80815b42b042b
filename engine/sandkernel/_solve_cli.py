"""``sandkernel solve``: a chat model solves a task by running Python in a sandboxed session.

::

    sandkernel solve "Plot the sales by month" --file sales.csv \\
        --base-url http://127.0.0.1:8080/v1 --model qwen2.5-coder

Each attempt is printed as it happens (the code, its status, a short output),
then the model's answer; the files the code produced are saved to ``--out``,
also when the loop fails part way (the model stops answering).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sandkernel._cli_types import number
from sandkernel.errors import BadInput
from sandkernel.limits import MAX_TIMEOUT_S

if TYPE_CHECKING:
    from collections.abc import Callable

    from sandkernel.api import EngineAPI
    from sandkernel.loop import ChatModel, LoopEvent, LoopResult, OpenAIChatModel
    from sandkernel.results import ProducedFile

SYSTEM_PROMPT = (
    "You solve the user's task by writing Python and running it with the python tool. "
    "Work step by step: run code, read its output, fix it if it fails. Save every file "
    "you make for the user (charts, tables, reports) in /mnt/data. When the task is done, "
    "answer briefly in plain text with the result and the names of the files you saved."
)
_CODE_LINES_SHOWN = 30
_OUTPUT_LINES_SHOWN = 12
_OUTPUT_CHARS_SHOWN = 1500


def add_solve_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``solve`` command to a ``sandkernel`` sub-parser set; returns its parser."""
    solve = subparsers.add_parser(
        "solve",
        help="let a chat model solve a task by running Python in a sandbox",
        description="A chat model (any OpenAI-compatible endpoint) writes Python, the sandbox "
        "runs it, the model reads the result and fixes its code until it can answer.",
    )
    solve.add_argument("task", help="what to do, in words")
    solve.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL"),
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 "
        "(default: $OPENAI_BASE_URL, else OpenAI's)",
    )
    solve.add_argument("--model", required=True, help="model name the endpoint knows")
    solve.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY)")
    solve.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="F",
        help="a file to put in /mnt/data for the model (repeatable)",
    )
    solve.add_argument(
        "--max-attempts", type=number(int), default=5, help="code executions allowed (default 5)"
    )
    solve.add_argument(
        "--out", default="solve-output", help="folder for the files produced (solve-output)"
    )
    solve.add_argument("--policy", default=None, help="policy name or TOML path (default: default)")
    solve.add_argument(
        "--timeout",
        type=number(float, maximum=MAX_TIMEOUT_S),
        default=None,
        help="wall timeout per cell, s",
    )
    solve.add_argument(
        "--tool-choice",
        choices=["auto", "required"],
        default="auto",
        help="'required' makes the model run code before it answers",
    )
    return solve


def run_solve(args: argparse.Namespace) -> int:
    """Run ``sandkernel solve``: 0 if the model answered, 1 if it did not.

    Options that cannot be used raise BadInput before anything starts; engine
    and model errors are raised too (``SandkernelError``), for the caller to report.
    """
    missing = [f for f in args.file if not Path(f).is_file()]
    if missing:
        raise BadInput(f"--file: no such file: {', '.join(missing)}")
    names = [Path(f).name for f in args.file]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        # One /mnt/data: the second would replace the first, and the model be told of both.
        raise BadInput(
            f"two files named {', '.join(twice)}: each --file needs a "
            "name of its own in /mnt/data (rename or copy one)"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        # Found now, not after the model's work, when its files are to be saved.
        raise BadInput(f"--out {out} is not a folder")
    if not (args.base_url or args.api_key or os.environ.get("OPENAI_API_KEY")):
        # Said before a sandbox starts, not as the model client's traceback after.
        raise BadInput(
            "no model to ask: set OPENAI_API_KEY (or --api-key) for "
            "OpenAI, or --base-url for an OpenAI-compatible server"
        )
    import asyncio

    return asyncio.run(_solve(args))


async def _solve(args: argparse.Namespace) -> int:
    from sandkernel.engine import Engine

    # The model's client first: a base URL that is no URL is said before a sandbox starts.
    async with _chat_model(args) as model, Engine(pool_size=1, policy=args.policy) as engine:
        return await solve_with_engine(args, engine, model=model)


def _chat_model(
    args: argparse.Namespace, client_kwargs: dict[str, Any] | None = None
) -> OpenAIChatModel:
    from sandkernel.loop import OpenAIChatModel

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    return OpenAIChatModel(
        model=args.model, base_url=args.base_url, api_key=api_key, **(client_kwargs or {})
    )


async def solve_with_engine(
    args: argparse.Namespace,
    engine: EngineAPI,
    *,
    out: TextIO | None = None,
    client_kwargs: dict[str, Any] | None = None,
    model: ChatModel | None = None,
) -> int:
    """The ``solve`` command on a running engine (the CLI starts one with ``pool_size=1``).

    The files the code produced are saved to ``--out`` also when the loop
    fails part way; the error is raised after that.

    Args:
        args: parsed by the parser :func:`add_solve_parser` adds.
        engine: a started engine.
        out: where progress and the answer are printed (default: stdout).
        client_kwargs: passed to ``AsyncOpenAI`` (``timeout``, ``max_retries``...).
        model: the chat model to ask (default: an :class:`~sandkernel.loop.OpenAIChatModel`
            made of ``args`` and ``client_kwargs``, closed at the end).
    """
    stream = out if out is not None else sys.stdout
    produced: list[ProducedFile] = []
    progress = _Progress(stream, args.max_attempts)

    def on_event(event: LoopEvent) -> None:
        progress(event)
        if event.result is not None:
            produced.extend(event.result.files)

    async with contextlib.AsyncExitStack() as owned:
        if model is None:
            model = await owned.enter_async_context(_chat_model(args, client_kwargs))
        try:
            result = await _run_in_a_session(args, engine, model, stream, on_event)
        except Exception:
            # The model (or the session) failed after the code made files: the
            # user keeps them. The error itself is the caller's to report.
            await _save_after_failure(engine, produced, args.out, stream)
            raise
    if result.answered:
        print(f"\n=== answer ===\n{result.final_answer or '(empty answer)'}", file=stream)
    else:
        print(f"\n=== stopped ({result.outcome}) ===\n{result.message}", file=stream)
        if result.final_answer:
            print(f"The model's last words: {result.final_answer}", file=stream)
    saved = await _save_files(engine, result.files, Path(args.out))
    if saved:
        print(f"\nfiles saved in {args.out}/: {', '.join(p.name for p in saved)}", file=stream)
    stream.flush()
    return 0 if result.answered else 1


async def _run_in_a_session(
    args: argparse.Namespace,
    engine: EngineAPI,
    model: ChatModel,
    stream: TextIO,
    on_event: Callable[[LoopEvent], None],
) -> LoopResult:
    """Upload ``--file``s to a new session and run the loop there; the session ends with it."""
    from sandkernel.loop import run_loop

    session = await engine.session()
    try:
        uploaded = await _upload(engine, session.id, args.file, stream)
        task = args.task
        if uploaded:
            task += "\n\nFiles in /mnt/data: " + ", ".join(uploaded)
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": task},
        ]
        return await run_loop(
            model,
            messages,
            session,
            max_attempts=args.max_attempts,
            tool_choice=args.tool_choice,
            timeout_s=args.timeout,
            on_event=on_event,
        )
    finally:
        await session.close()


async def _save_after_failure(
    engine: EngineAPI, files: list[ProducedFile], out_dir: str, stream: TextIO
) -> None:
    """Save ``files`` in ``out_dir`` and say so; if that fails too, list their ids."""
    from sandkernel.errors import SandkernelError

    if not files:
        return
    try:
        saved = await _save_files(engine, files, Path(out_dir))
    except (SandkernelError, OSError) as exc:
        print(f"\nthe files could not be saved in {out_dir}/ ({exc}); get them with "
              "`sandkernel files get ID`:", file=stream)  # fmt: skip
        for file in _latest_versions(files):
            print(f"  {file.id}  {file.name}", file=stream)
    else:
        names = ", ".join(p.name for p in saved)
        print(f"\nfiles saved in {out_dir}/ before the failure: {names}", file=stream)
    stream.flush()


async def _upload(engine: EngineAPI, session_id: str, files: list[str], out: TextIO) -> list[str]:
    """Put ``files`` in the session's /mnt/data; returns their names there."""
    names = []
    for file in files:
        path = Path(file)
        stored = await engine.upload(path, path.name, session_id=session_id)
        names.append(stored.name)
    if names:
        print(f"uploaded to /mnt/data: {', '.join(names)}", file=out)
    return names


async def _save_files(engine: EngineAPI, files: list[ProducedFile], out_dir: Path) -> list[Path]:
    """Save the files the code produced (its displayed images included) in ``out_dir``."""
    import asyncio

    wanted = [(f.name, await engine.download(f.id)) for f in _latest_versions(files)]
    return await asyncio.to_thread(_write_files, out_dir, wanted)


def _write_files(out_dir: Path, files: list[tuple[str, bytes]]) -> list[Path]:
    if not files:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    taken: set[str] = set()
    for name, data in files:
        target = out_dir / _unique(_safe_name(name), taken)
        target.write_bytes(data)
        saved.append(target)
    return saved


def _latest_versions(files: list[ProducedFile]) -> list[ProducedFile]:
    """One file per sandbox path (the last version written); displayed images all kept."""
    latest: dict[str, ProducedFile] = {}
    for file in files:
        key = file.path if file.source == "workspace" and file.path else file.id
        latest.pop(key, None)  # re-insert: keep the order in which final versions appeared
        latest[key] = file
    return list(latest.values())


def _safe_name(name: str) -> str:
    # Names come from the sandbox: never let one leave the output folder. A
    # backslash is a character of the name there (and of its escapes), not a
    # separator: only the last "/" part is kept.
    base = name.rsplit("/", 1)[-1]
    return base if base not in ("", ".", "..") else "file"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    stem, dot, suffix = name.partition(".")
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    taken.add(candidate)
    return candidate


class _Progress:
    """Prints each step of the loop as it happens."""

    def __init__(self, out: TextIO, max_attempts: int) -> None:
        self.out = out
        self.max_attempts = max_attempts

    def __call__(self, event: LoopEvent) -> None:
        if event.kind == "model_reply" and event.reply is not None:
            if event.reply.tool_calls and event.reply.content:
                self._print(f"\nmodel: {event.reply.content.strip()}")
        elif event.kind == "code" and event.code is not None:
            self._print(f"\n=== attempt {event.attempt}/{self.max_attempts} ===")
            lines = event.code.rstrip("\n").split("\n")
            shown = [f"  | {line}" for line in lines[:_CODE_LINES_SHOWN]]
            if len(lines) > _CODE_LINES_SHOWN:
                shown.append(f"  | ... ({len(lines) - _CODE_LINES_SHOWN} more lines)")
            self._print("\n".join(shown))
        elif event.kind == "result" and event.tool_message is not None:
            self._print(_indent(_short(event.tool_message)))
        elif event.kind == "rejected_call" and event.tool_message is not None:
            self._print(f"\n=== attempt {event.attempt}: not run ===")
            self._print(_indent(_short(event.tool_message)))

    def _print(self, text: str) -> None:
        # What a model wrote can hold lone surrogates: shown escaped, never fatal.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        print(text, file=self.out, flush=True)


def _short(text: str) -> str:
    lines = text[:_OUTPUT_CHARS_SHOWN].split("\n")
    shown = lines[:_OUTPUT_LINES_SHOWN]
    if len(lines) > _OUTPUT_LINES_SHOWN or len(text) > _OUTPUT_CHARS_SHOWN:
        shown.append("...")
    return "\n".join(shown)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else "" for line in text.split("\n"))
