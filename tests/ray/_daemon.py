"""A daemon serving a ClusterEngine in this process, as ``sandkernel serve --ray`` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from sandkernel.api import ServedEngine
from sandkernel.config import EngineConfig
from sandkernel.daemon.client import AsyncClient
from sandkernel.daemon.server import Daemon, DaemonConfig
from sandkernel.ray import ClusterEngine
from sandkernel.ray.cli import make_cluster_engine


def cluster_engine_as_served(**cluster_kwargs: Any) -> ClusterEngine:
    """The engine ``sandkernel serve --ray`` gives its daemon (not started)."""
    # The command builds one EngineConfig, and passes it alone.
    settings = {k: v for k, v in cluster_kwargs.items() if k in EngineConfig.model_fields}
    options = {k: v for k, v in cluster_kwargs.items() if k not in settings}
    return make_cluster_engine(None, EngineConfig(**settings), **options)


@contextlib.asynccontextmanager
async def serving(engine: ServedEngine) -> AsyncIterator[Path]:
    """Serve a started ``engine`` on a Unix socket until the block ends; yields the socket."""
    folder = Path(tempfile.mkdtemp(prefix="skr-", dir="/tmp"))  # short: a socket path
    daemon = Daemon(
        engine,
        DaemonConfig(socket_path=folder / "d.sock", records_path=folder / "sessions.sqlite3"),
    )
    task = asyncio.create_task(daemon.serve())
    try:
        async with asyncio.timeout(30):
            await daemon.ready.wait()
        yield daemon.config.socket_path
    finally:
        daemon.shutdown()
        async with asyncio.timeout(30):
            await task
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def client_of(socket: Path) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(socket) as client:
        yield client


@contextlib.asynccontextmanager
async def raw_client_of(socket: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client on the daemon's socket, for requests read as they are answered.

    httpx's own 5 s is too short for a session's creation on a fresh cluster,
    which waits for a node's first kernel: seconds on a loaded machine.
    """
    async with httpx.AsyncClient(
        base_url="http://sandkernel",
        transport=httpx.AsyncHTTPTransport(uds=str(socket)),
        timeout=60.0,
    ) as client:
        yield client
