"""The daemon's HTTP API: a FastAPI application over one running :class:`~sandkernel.Engine`.

Resources follow the OpenAI Containers / code-interpreter API where it fits
(a session is a container)::

    POST   /v1/sessions                       get or create a session
    GET    /v1/sessions                       every session the engine knows
    GET    /v1/sessions/{id}                  one session (also an ended one)
    DELETE /v1/sessions/{id}                  close it
    POST   /v1/sessions/{id}/execute          run a cell (?stream=true: Server-Sent Events)
    POST   /v1/sessions/{id}/files            upload into its /mnt/data (multipart)
    GET    /v1/sessions/{id}/files            its files (uploaded and produced)
    POST   /v1/sessions/{id}/attach           copy stored files into /mnt/data
    POST   /v1/sessions/{id}/extend           keep it alive
    POST   /v1/sessions/{id}/interrupt        interrupt the running cell
    POST   /v1/files                          upload (multipart: file, session_id | agent_id)
    GET    /v1/files                          list (?session_id=, ?agent_id=)
    GET    /v1/files/{id}                     metadata
    GET    /v1/files/{id}/content             the bytes, streamed
    DELETE /v1/files/{id}                     delete
    POST   /v1/agents/{id}/files              give stored files to an agent
    GET    /v1/agents/{id}/files              an agent's files
    POST   /v1/run                            one program, statelessly (Engine.run_once)
    POST   /v1/runs                           many programs, results as NDJSON (Engine.run_many)
    POST   /run_code, /run_jupyter            SandboxFusion's API (see daemon/routes/fusion.py)
    GET    /v1/stats                          pool and session figures
    GET    /v1/health                         liveness, version and policy
    GET    /openapi.json                      this API's schema

Every error is ``{"error": {"type": "<exception class>", "message": "..."}}``
with the status its class carries (:mod:`sandkernel.errors`, one registry for
the daemon and its client); 429 and 503 carry ``Retry-After``. Each route
declares the classes it may raise, and its OpenAPI ``responses`` are built
from them (:func:`~sandkernel.daemon.schemas.error_responses`). One-shot runs
are admitted before their bodies are read
(:class:`~sandkernel.daemon.middleware.RunAdmissionGate`), or refused at once
with 503. Nothing here blocks the event loop: the engine does its file and database work in worker
threads, and so do the downloads and the session records here.

:func:`create_app` composes the application from its parts::

    middleware       token, body size, run admission       daemon/middleware.py
    error handlers   every exception in the error shape    daemon/error_handlers.py
    OpenAPI          what the generated schema cannot say  daemon/openapi.py
    routes           one module per concern                daemon/routes/
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

from sandkernel import __version__
from sandkernel.api import ServedEngine
from sandkernel.daemon.admission import (
    DEFAULT_MAX_QUEUED_BYTES,
    RunAdmission,
    default_max_queued_runs,
)
from sandkernel.daemon.error_handlers import add_error_handlers
from sandkernel.daemon.middleware import (
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    add_middleware,
)
from sandkernel.daemon.openapi import refine_openapi
from sandkernel.daemon.records import SessionRecords
from sandkernel.daemon.routes.agents import add_agent_routes
from sandkernel.daemon.routes.files import add_file_routes
from sandkernel.daemon.routes.fusion import FUSION_PATHS, add_fusion_routes
from sandkernel.daemon.routes.lookup import SessionLookup
from sandkernel.daemon.routes.reporting import add_reporting_routes
from sandkernel.daemon.routes.runs import add_run_routes
from sandkernel.daemon.routes.sessions import add_session_routes

__all__ = ["DEFAULT_MAX_JSON_BYTES", "DEFAULT_MAX_UPLOAD_BYTES", "create_app"]


def create_app(
    engine: ServedEngine,
    records: SessionRecords,
    *,
    token: str | None = None,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    fusion_without_token: bool = False,
    max_queued_runs: int | None = None,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
) -> FastAPI:
    """The daemon's application, serving ``engine``.

    Args:
        engine: a started engine; the application never starts or closes it.
        records: the session records, opened (they tell lost sessions from unknown ones).
        token: the bearer token required on TCP connections.
        max_json_bytes: largest JSON request body.
        max_upload_bytes: largest upload request body (multipart overhead included);
            also the limit of the one-shot runs' bodies, which carry files.
        fusion_without_token: serve SandboxFusion's routes to loopback TCP
            clients without a token (everything else still needs one).
        max_queued_runs: one-shot runs admitted and not finished; past it,
            503 with ``Retry-After`` (default: :func:`default_max_queued_runs`
            of the engine's batch workers).
        max_queued_bytes: bytes of request bodies those runs may hold.
    """
    started = time.time()
    # A cluster engine has no local batch workers: its default is then per local CPU.
    batch_workers: int | None = getattr(engine, "batch_workers", None)
    admission = RunAdmission(
        max_runs=default_max_queued_runs(batch_workers)
        if max_queued_runs is None
        else max_queued_runs,
        max_body_bytes=max_queued_bytes,
    )
    app = FastAPI(
        title="sandkernel daemon",
        version=__version__,
        description=(
            "Sandboxed, stateful Python sessions (warm Jupyter kernels in nsjail). "
            'Errors are `{"error": {"type", "message"}}`; streamed execution is '
            "Server-Sent Events (see `sandkernel.daemon.sse`)."
        ),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    add_middleware(
        app,
        token=token,
        open_paths=FUSION_PATHS if fusion_without_token else frozenset(),
        max_json_bytes=max_json_bytes,
        max_upload_bytes=max_upload_bytes,
        admission=admission,
    )
    add_error_handlers(app)
    refine_openapi(app, policy=engine.policy.name)
    # In this order: it is the order of the paths in /openapi.json.
    lookup = SessionLookup(engine, records)
    add_session_routes(app, engine, lookup)
    add_file_routes(app, engine, lookup)
    add_agent_routes(app, engine)
    # A batch that names no concurrency keeps each worker busy with one run and
    # the next one queued, as the batch pool's own default does.
    add_run_routes(
        app, engine, default_batch_concurrency=2 * (batch_workers or os.cpu_count() or 1)
    )
    add_fusion_routes(app, engine)
    add_reporting_routes(app, engine, started=started)
    return app
