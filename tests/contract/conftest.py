"""The contract suite's backends' fixtures (its tally is ``_tally.py``, a root plugin)."""

from __future__ import annotations

from tests.conftest import engine_factory  # noqa: F401 - fixtures the backends use
from tests.daemon.conftest import daemon_factory  # noqa: F401
