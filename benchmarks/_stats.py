"""Summary statistics and a description of the machine, shared by the benchmarks."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile, interpolated linearly between the closest ranks.

    The same definition as numpy's default (``method="linear"``). With few
    samples a high percentile is close to the maximum.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def p99(samples: Sequence[float]) -> float:
    return percentile(samples, 99)


def summary(samples: Sequence[float], *, digits: int = 2) -> dict[str, float]:
    """Median, p99, mean, spread and count of ``samples``, rounded to ``digits``."""
    return {
        "n": len(samples),
        "median": round(median(samples), digits),
        "p99": round(p99(samples), digits),
        "mean": round(statistics.fmean(samples), digits),
        "stdev": round(statistics.stdev(samples), digits) if len(samples) > 1 else 0.0,
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
    }


def ns_to_ms(samples_ns: Sequence[int]) -> list[float]:
    return [ns / 1e6 for ns in samples_ns]


def ratio(numerator: float, denominator: float, *, digits: int = 2) -> float | None:
    """``numerator / denominator`` rounded, or None when the denominator is zero."""
    if denominator == 0:
        return None
    return round(numerator / denominator, digits)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as the kernel reports it (first processor)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, kernel, Python, load and time of the run."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": load,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
