"""What the daemon reports about itself.

::

    GET    /v1/stats                          pool and session figures
    GET    /v1/health                         liveness, version and policy
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from fastapi import FastAPI
from fastapi.responses import Response

from sandkernel import __version__
from sandkernel.api import ServedEngine
from sandkernel.daemon.responses import json_response
from sandkernel.daemon.schemas import Health, error_responses
from sandkernel.engine import EngineStats
from sandkernel.errors import EngineClosed


def add_reporting_routes(app: FastAPI, engine: ServedEngine, *, started: float) -> None:
    """Add the stats and health routes; ``started`` is when the daemon started (Unix time)."""

    @app.get(
        "/v1/stats",
        response_model=EngineStats,
        responses=error_responses(EngineClosed),
        tags=["daemon"],
    )
    async def stats() -> Response:
        """Pool and session figures."""
        return json_response(await engine.stats())

    @app.get("/v1/health", response_model=Health, responses=error_responses(), tags=["daemon"])
    async def health() -> Response:
        """The daemon is up: its version, policy and uptime."""
        return json_response(
            Health(
                version=__version__,
                policy=engine.policy.name,
                pid=os.getpid(),
                started_at=datetime.fromtimestamp(started, tz=UTC),
                uptime_s=round(time.time() - started, 3),
            )
        )
