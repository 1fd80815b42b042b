"""SandboxFusion's routes, served over its models (:mod:`sandkernel.daemon.fusion`).

::

    POST /run_code        RunCodeRequest -> RunCodeResponse (the batch path)
    POST /run_jupyter     RunJupyterRequest -> RunJupyterResponse (a warm kernel, used once)
    GET  /v1/ping         "pong", as SandboxFusion answers it

The two runs are one-shot runs: admitted before their bodies are read, with
the upload size limit (see :mod:`sandkernel.daemon.routes.runs`). Its
clients (verl among them) send no credentials: with ``--fusion-without-token``,
:data:`FUSION_PATHS` are served to loopback TCP clients without a token.
"""

from __future__ import annotations

import socket
from typing import Final

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from sandkernel.api import EngineAPI
from sandkernel.daemon.asgi import unless_gone
from sandkernel.daemon.fusion import (
    RunCodeRequest,
    RunCodeResponse,
    RunJupyterRequest,
    RunJupyterResponse,
    run_code,
    run_jupyter,
)
from sandkernel.daemon.responses import json_or_gone
from sandkernel.daemon.routes.raises import ONE_SHOT_RUN, POOLED_KERNEL
from sandkernel.daemon.schemas import error_responses

#: SandboxFusion's routes, the ones ``--fusion-without-token`` opens to loopback clients.
FUSION_PATHS: Final = frozenset({"/run_code", "/run_jupyter", "/v1/ping"})


def add_fusion_routes(app: FastAPI, engine: EngineAPI) -> None:
    """Add SandboxFusion's routes; each answer names this host as ``executor_pod_name``."""
    pod_name = socket.gethostname()

    @app.post(
        "/run_code",
        response_model=RunCodeResponse,
        responses=error_responses(*ONE_SHOT_RUN),
        tags=["SandboxFusion"],
    )
    async def fusion_run_code(body: RunCodeRequest, request: Request) -> Response:
        """SandboxFusion's `/run_code`: `python` and `pytest`, each run in a fresh sandbox."""
        return json_or_gone(
            await unless_gone(request, lambda: run_code(engine, body, pod_name=pod_name))
        )

    @app.post(
        "/run_jupyter",
        response_model=RunJupyterResponse,
        responses=error_responses(*ONE_SHOT_RUN, *POOLED_KERNEL),
        tags=["SandboxFusion"],
    )
    async def fusion_run_jupyter(body: RunJupyterRequest, request: Request) -> Response:
        """SandboxFusion's `/run_jupyter`: the cells in a warm kernel, used once, then destroyed."""
        # A client that goes takes its cells with it: interrupted, the kernel freed.
        return json_or_gone(
            await unless_gone(request, lambda: run_jupyter(engine, body, pod_name=pod_name))
        )

    @app.get(
        "/v1/ping",
        response_class=PlainTextResponse,
        responses=error_responses(),
        tags=["SandboxFusion"],
    )
    async def ping() -> str:
        """SandboxFusion's liveness probe."""
        return "pong"
