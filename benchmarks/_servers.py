"""Servers the benchmarks start as processes of their own: spawn, stop, CPU used, progress."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def progress(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


async def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output in ``log``."""

    def start() -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    return await asyncio.to_thread(start)


async def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, up to 60 s for a clean exit, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(process.wait, 60)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait)


def cpu_since(process: psutil.Process, before: Any) -> float:
    """User + system seconds ``process`` used since its ``cpu_times()`` were ``before``."""
    now = process.cpu_times()
    return round((now.user - before.user) + (now.system - before.system), 2)
