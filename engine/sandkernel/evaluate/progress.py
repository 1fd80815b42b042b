"""A one-line progress bar with throughput and ETA, for terminals and logs.

On a terminal the line is redrawn in place at most ten times a second; on
anything else (a log file, CI) a line is printed every ``log_every_s`` seconds
and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Counts finished items of ``total`` and shows the rate and the time left.

    Args:
        total: items expected (0 if unknown).
        label: shown before the bar.
        stream: where to draw (default: stderr).
        clock: monotonic time source (tests pass their own).
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        width: int = 28,
        log_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.log_every_s = log_every_s
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last_draw = float("-inf")
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())

    def line(self) -> str:
        """The progress line for the current count."""
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [self.label] if self.label else []
        if self.total:
            fraction = min(1.0, self.done / self.total)
            filled = round(fraction * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            parts.append(f"[{bar}] {self.done}/{self.total} {fraction:4.0%}")
        else:
            parts.append(f"{self.done}")
        parts.append(f"{rate:.1f}/s")
        if self.total and self.done < self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            parts.append(f"ETA {_clock(eta)}" if eta != float("inf") else "ETA --:--")
        else:
            parts.append(f"in {_clock(elapsed)}")
        return " ".join(parts)

    def update(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        every = 0.1 if self.interactive else self.log_every_s
        if now - self._last_draw >= every:
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if self.interactive:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._draw(self.clock())
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()
