"""A benchmark's headline figures as a PNG bar chart (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_chart(name: str, result: dict[str, Any], path: Path) -> Path | None:
    """Draw ``result["chart"]`` (title, unit, bars as [label, value]) to ``path``.

    Returns the path, or None when the result has no chart or matplotlib is
    missing (it comes with the sandbox's data libraries, `kernels/requirements.txt`).
    """
    chart = result.get("chart")
    if not chart:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [str(label) for label, _ in chart["bars"]]
    values = [float(value) for _, value in chart["bars"]]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.6), dpi=100)
    colors = ["#2b6cb0" if i == 0 else "#a0aec0" for i in range(len(labels))]
    bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    if chart.get("log"):
        ax.set_xscale("log")
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values[::-1]], padding=3, fontsize=9)
    ax.set_xlabel(chart["unit"])
    ax.set_title(chart["title"], fontsize=11)
    ax.margins(x=0.15)
    machine = result.get("machine") or {}
    fig.text(
        0.01, 0.01,
        f"sandkernel benchmarks/{name}: {machine.get('cpu_count')} CPUs, "
        f"load {machine.get('load_average')}, {machine.get('date', '')[:10]}",
        fontsize=7, color="#718096",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
