"""Fixtures: a daemon serving the Jupyter Kernel Gateway API over TCP, with a token.

- ``gateway``: ``(url, token)`` of a daemon shared by the tests of one module
  (default policy, two warm kernels, nothing prewarmed).
- ``gateway_process``: the same daemon with its process, socket and store.
- ``gateway_factory``: start daemons with other settings (a policy TOML, a pool
  size, more ``serve`` arguments); each is stopped after the test.

Tests that use them need nsjail: mark them ``sandbox``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.jupyter_gateway._support import Gateway, GatewayProcess, running_gateway

GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture(scope="module")
def gateway_process() -> Iterator[GatewayProcess]:
    """A gateway daemon for the module's tests; stopped, and checked clean, after them."""
    with running_gateway() as process:
        yield process


@pytest.fixture(scope="module")
def gateway(gateway_process: GatewayProcess) -> Gateway:
    """``(url, token)`` of the module's gateway daemon."""
    return gateway_process.gateway


@pytest.fixture
def gateway_factory() -> Iterator[GatewayFactory]:
    """Start gateway daemons with :func:`running_gateway`'s arguments; stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(**options: Any) -> GatewayProcess:
            return stack.enter_context(running_gateway(**options))

        yield start
