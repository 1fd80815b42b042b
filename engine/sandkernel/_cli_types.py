"""Argument types the command line checks (numbers finite and in range, module names),
and how it reads the files its options name.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from sandkernel.errors import BadInput
from sandkernel.limits import module_name_problem


def number[T: (int, float)](
    kind: type[T], *, minimum: float = 0, above: bool = True, maximum: float | None = None
) -> Callable[[str], T]:
    """An argparse ``type``: a finite ``kind`` above (or at least) ``minimum``, up to ``maximum``.

    ``inf``, ``nan`` and values out of range are an argument error naming the
    range, not a traceback later.
    """

    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind.__name__!r}: {text!r}") from None
        low_ok = value > minimum if above else value >= minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            low = f"{'above' if above else 'at least'} {minimum:.15g}"
            high = f" and at most {maximum:.15g}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be {low}{high} (got {text})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def module_list(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated module names (``''`` for none), each importable."""
    modules = tuple(m.strip() for m in text.split(",") if m.strip())
    for module in modules:
        problem = module_name_problem(module)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
    return modules


def read_input(path: str | Path, option: str) -> bytes:
    """A file the command line names; BadInput (exit 2) if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read {option} {path}: {exc.strerror or exc}") from None


def read_text(path: str | Path, option: str) -> str:
    """:func:`read_input` as UTF-8 text."""
    try:
        return read_input(path, option).decode()
    except UnicodeDecodeError as exc:
        raise BadInput(f"cannot read {option} {path}: it is not UTF-8 text ({exc})") from None
