"""Run the benchmarks: ``python -m benchmarks [--quick] [--only NAME]``.

Each benchmark's result is written to ``benchmarks/out/<name>.json`` and
printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks._chart import render_chart
from benchmarks._stats import machine_info

#: Benchmark name -> module with ``run(*, quick: bool) -> dict``. Run in this order.
BENCHMARKS: dict[str, str] = {
    # Fresh processes only: first, while nothing else has warmed or loaded the machine.
    "startup": "benchmarks.startup",
    "kernel": "benchmarks.kernel",
    "engine": "benchmarks.engine",
    # Cold starts against kernels forked from the zygote (8 minutes here; 2 with --quick).
    "zygote": "benchmarks.zygote",
    "daemon": "benchmarks.daemon",
    "eval": "benchmarks.eval",
    "fusion": "benchmarks.fusion",
    # The daemon's Jupyter Kernel Gateway API against the stock Kernel Gateway.
    "gateway": "benchmarks.gateway",
    # The same daemon far beyond its queue bound (1,024 clients).
    "overload": "benchmarks.overload",
    # It takes 10 minutes (1 with --quick).
    "soak": "benchmarks.soak",
    # After the others: importing Ray leaves threads and fork handlers in this process.
    "ray": "benchmarks.ray",
}

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def render_markdown(name: str, result: dict[str, Any]) -> str:
    """A result as Markdown: title, machine, table, notes."""
    lines = [f"## {name}: {result.get('title', '')}".rstrip(": "), ""]
    machine = result.get("machine") or {}
    if machine:
        load = machine.get("load_average")
        lines.append(
            f"{machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}), "
            f"Linux {machine.get('kernel')}, Python {machine.get('python')}, "
            f"load average {load}, {machine.get('date')}"
            + (" — quick run" if result.get("quick") else "")
        )
        lines.append("")
    table = result.get("table")
    if table:
        columns = [str(c) for c in table["columns"]]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
        for row in table["rows"]:
            lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def compile_package() -> None:
    """Bring sandkernel's bytecode up to date, as installing the package does.

    The processes the benchmarks start import sandkernel from this tree (an
    editable install). With ``PYTHONDONTWRITEBYTECODE`` set, as some shells
    and CI images have it, they would compile every changed module again in
    each timed start; an installed wheel has its bytecode written once.
    """
    import sandkernel

    compileall.compile_dir(Path(sandkernel.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run sandkernel's benchmarks."
    )
    parser.add_argument(
        "--quick", action="store_true", help="few repetitions: a smoke run, not a measurement"
    )
    parser.add_argument(
        "--only", choices=sorted(BENCHMARKS), metavar="NAME", help="run one benchmark"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)

    names = [args.only] if args.only else list(BENCHMARKS)
    args.out.mkdir(parents=True, exist_ok=True)
    compile_package()
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"running {name}{' (quick)' if args.quick else ''}...", file=sys.stderr, flush=True)
        result: dict[str, Any] = module.run(quick=args.quick)
        result.setdefault("machine", machine_info())
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(render_markdown(name, result))
        chart = render_chart(name, result, args.out / f"{name}.png")
        print(f"(full results: {path}{f'; chart: {chart}' if chart else ''})\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
