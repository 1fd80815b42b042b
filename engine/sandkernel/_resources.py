"""Locating the data shipped with sandkernel (policies, kernel spec, sandbox runtime).

In a wheel the folders ``policies/`` and ``kernels/`` are installed inside the
package as ``sandkernel/_data/...``; in a source checkout (editable install)
they sit at the repository root, two levels above this file.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path


@cache
def data_dir(name: str) -> Path:
    """Return the directory of shipped data ``name`` (``policies`` or ``kernels``)."""
    packaged = resources.files("sandkernel") / "_data" / name
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"sandkernel data folder {name!r} not found (broken install?)")
