"""The contract suite's backends' fixtures, and its tally of scenarios passed per backend."""

from __future__ import annotations

from tests.conftest import engine_factory  # noqa: F401 - fixtures the backends use
from tests.contract._tally import (  # noqa: F401 - hooks
    pytest_runtest_logreport,
    pytest_terminal_summary,
)
from tests.daemon.conftest import daemon_factory, short_dir  # noqa: F401
