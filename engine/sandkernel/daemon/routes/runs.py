"""One-shot runs over HTTP: sandkernel's own and SandboxFusion's.

::

    POST /v1/run          one RunRequest -> its RunResult (Engine.run_once)
    POST /v1/runs         many runs -> NDJSON results in completion order (Engine.run_many)
    POST /run_code        SandboxFusion's RunCodeRequest -> RunCodeResponse
    POST /run_jupyter     SandboxFusion's RunJupyterRequest -> RunJupyterResponse
    GET  /v1/ping         "pong", as SandboxFusion answers it

The first two are here; SandboxFusion's are in
:mod:`sandkernel.daemon.routes.fusion`, next to its models.

``/v1/runs`` takes either a JSON object ``{"runs": [...], "concurrency": N}``
or, with ``Content-Type: application/x-ndjson``, one run per line. Each
result line is a :class:`~sandkernel.batch.RunResult` carrying the caller's
``id``; a line that is not a valid run gets ``{"id": ..., "line": N,
"error": {...}}`` and the others still run.

The body is read whole (within the upload size limit) before the first
result is sent: HTTP/1.1 clients such as httpx send all of a request before
they read its response, so a server that answered while still reading
would fill both directions' buffers and stall. Its lines are parsed only as
runs are started, so at most ``concurrency`` runs are held as objects.

Every request to these routes but the ping is admitted before its body is
read, or answered at once with 503, ``Retry-After`` and a ``RunQueueFull``
error when the daemon already holds ``--max-queued-runs`` one-shot runs (see
:mod:`sandkernel.daemon.admission`). A ``/v1/runs`` batch counts as many runs
as it has lines in flight.

SandboxFusion's clients (verl among them) send no credentials: with the
daemon's ``--fusion-without-token`` flag, its ``FUSION_PATHS`` are served to
loopback TCP clients without a token. Everything else still needs one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Final

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandkernel.api import ServedEngine
from sandkernel.batch import RunRequest, RunResult
from sandkernel.daemon import sse
from sandkernel.daemon.admission import TICKET_SCOPE_KEY, RunTicket
from sandkernel.daemon.asgi import unless_gone
from sandkernel.daemon.responses import json_or_gone
from sandkernel.daemon.routes.raises import ONE_SHOT_RUN
from sandkernel.daemon.schemas import error_responses

#: Routes whose bodies carry files (base64), SandboxFusion's too: they get the upload
#: size limit, and are admitted before their bodies are read.
RUN_PATHS: Final = frozenset({"/run_code", "/run_jupyter", "/v1/run", "/v1/runs"})
NDJSON: Final = "application/x-ndjson"


class RunBatch(BaseModel):
    """The JSON form of a ``/v1/runs`` body."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored
    runs: list[RunRequest] = Field(description="the runs; tag each with `id`")
    concurrency: int | None = Field(
        default=None, ge=1, le=4096, description="runs in flight (default: the batch workers)"
    )


_RUN_REQUEST_REF: Final = "#/components/schemas/RunRequest"
_RUN_BATCH_REF: Final = "#/components/schemas/RunBatch"
#: What a file name or content of a run must be, beyond RunRequest's own schema.
_FILENAME_SCHEMA: Final = {"pattern": "^[^/\\u0000]+$", "not": {"enum": [".", ".."]}}
#: Bytes travel as base64 (standard or URL-safe alphabet).
_BYTES_SCHEMA: Final = {"type": "string", "format": "byte"}


def document_run_bodies(components: dict[str, Any]) -> None:
    """Add the bodies of ``/v1/run`` and ``/v1/runs`` to the OpenAPI ``components.schemas``.

    The routes read their bodies themselves (strictly, see :func:`_strict`);
    this documents them, with what RunRequest's validators check: a plain
    file name, and bytes as base64.
    """
    template = "#/components/schemas/{model}"
    run = RunRequest.model_json_schema(ref_template=template)
    run["properties"]["filename"].update(_FILENAME_SCHEMA)
    run["properties"]["stdin"].update(_BYTES_SCHEMA)
    run["properties"]["files"]["additionalProperties"] = dict(_BYTES_SCHEMA)
    batch = RunBatch.model_json_schema(ref_template=template)
    batch.pop("$defs", None)
    components["RunRequest"] = run
    components["RunBatch"] = batch


def _strict[M: BaseModel](model: type[M], body: bytes) -> M:
    """``body`` as ``model``, strictly: ``false`` is not a number, ``"5"`` not an integer.

    Raises the 400 (malformed JSON) or 422 answer of the other routes' bodies.
    """
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def add_run_routes(app: FastAPI, engine: ServedEngine, *, default_batch_concurrency: int) -> None:
    """Add the one-shot routes to the daemon's application.

    Their requests must come through :class:`~sandkernel.daemon.middleware.RunAdmissionGate`,
    which admits them; ``default_batch_concurrency`` is the lines a ``/v1/runs``
    batch that names no concurrency may have in flight.
    """
    errors = error_responses(*ONE_SHOT_RUN)

    @app.post(
        "/v1/run",
        response_model=RunResult,
        responses=errors,
        tags=["runs"],
        openapi_extra={
            "requestBody": {
                "content": {"application/json": {"schema": {"$ref": _RUN_REQUEST_REF}}},
                "required": True,
            }
        },
    )
    async def run(request: Request) -> Response:
        """Run one program on the batch path (a fresh sandboxed fork); nothing is kept."""
        body = _strict(RunRequest, await request.body())

        async def one() -> RunResult:
            return [r async for r in engine.run_many([body], concurrency=1)][0]

        return json_or_gone(await unless_gone(request, one))  # its run goes with its client

    @app.post(
        "/v1/runs",
        responses={
            **errors,
            200: {"description": "one RunResult per line", "content": {NDJSON: {}}},
        },
        tags=["runs"],
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"schema": {"$ref": _RUN_BATCH_REF}},
                    NDJSON: {"schema": {"type": "string", "description": "a RunRequest a line"}},
                },
                "required": True,
            }
        },
    )
    async def runs(
        request: Request,
        concurrency: Annotated[
            int | None, Query(ge=1, le=4096, description="runs in flight (NDJSON bodies)")
        ] = None,
    ) -> Response:
        """Run many programs; results stream back as NDJSON in the order they finish."""
        ticket: RunTicket = request.scope[TICKET_SCOPE_KEY]
        body = await request.body()
        if request.headers.get("content-type", "").split(";")[0].strip() == NDJSON:
            lines = body.count(b"\n") + 1  # at least as many as the runs in it
            wanted = min(concurrency or default_batch_concurrency, lines)
            return StreamingResponse(_ndjson_batch(engine, body, ticket, wanted), media_type=NDJSON)
        batch = _strict(RunBatch, body)
        wanted = min(batch.concurrency or concurrency or default_batch_concurrency, len(batch.runs))
        return StreamingResponse(
            _results(_admitted_batch(engine, iter(batch.runs), ticket, wanted)),
            media_type=NDJSON,
        )


def _ndjson_line(result: RunResult) -> bytes:
    """One result, one line (see sse.json_line)."""
    return sse.json_line(result.model_dump_json()).encode() + b"\n"


async def _results(results: AsyncIterator[RunResult]) -> AsyncIterator[bytes]:
    async for result in results:
        yield _ndjson_line(result)


async def _admitted_batch(
    engine: ServedEngine, requests: Iterator[RunRequest], ticket: RunTicket, wanted: int
) -> AsyncIterator[RunResult]:
    """``engine.run_many`` over ``requests``, with no more lines in flight than ``ticket`` holds.

    Each line in flight holds one of the daemon's run slots, so a batch counts
    against ``--max-queued-runs`` as the runs it has started. The slots are
    taken when the batch starts: the one it was admitted with, plus as many
    free ones as it wants (``wanted``: its concurrency, at most its line
    count); that is its concurrency in ``run_many``, and as its last lines
    finish it gives back the slots its tail no longer needs. It takes none
    later. Waiting for a slot inside ``run_many``'s source would also hold up
    the results of the lines whose end frees slots (a deadlock once the batch
    held them all), and counting each line as it starts, by running the lines
    one by one, would lose what the engine does with a batch (a cluster engine
    sends lines to its hosts in chunks). The cost: a batch that starts while
    the daemon is busy keeps the concurrency it found then, at least one line.
    """
    in_flight = ticket.hold_runs(wanted)
    pulled = 0
    exhausted = False

    def counted() -> Iterator[RunRequest]:
        nonlocal pulled, exhausted
        for request in requests:
            pulled += 1
            yield request
        exhausted = True

    finished = 0
    async for result in engine.run_many(counted(), concurrency=in_flight):
        finished += 1
        if exhausted:
            ticket.hold_runs(pulled - finished)
        yield result


async def _ndjson_batch(
    engine: ServedEngine, body: bytes, ticket: RunTicket, wanted: int
) -> AsyncIterator[bytes]:
    """Run the body's lines; bad lines are answered, not fatal."""
    refused: list[bytes] = []

    def requests() -> Iterator[RunRequest]:
        for number, line in enumerate(_lines(body), 1):
            if not line.strip():
                continue
            try:
                yield RunRequest.model_validate_json(line, strict=True)
            except ValidationError as exc:
                refused.append(_refusal(line, number, _summary(exc)))

    async for result in _admitted_batch(engine, requests(), ticket, wanted):
        while refused:
            yield refused.pop(0)
        yield _ndjson_line(result)
    for line in refused:
        yield line


def _summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in errors[:5]
    )


def _refusal(line: bytes, number: int, summary: str) -> bytes:
    tag: Any = None
    try:
        raw = json.loads(line)
        if isinstance(raw, dict) and isinstance(raw.get("id"), str | int):
            tag = raw["id"]
    except ValueError:
        pass
    body = {
        "id": tag,
        "line": number,
        "error": {"type": "InvalidRequest", "message": f"line {number} is not a run: {summary}"},
    }
    return json.dumps(body).encode() + b"\n"


def _lines(body: bytes) -> Iterator[bytes]:
    """The body's lines, one at a time (no copy of the whole body as a list)."""
    start = 0
    while start < len(body):
        end = body.find(b"\n", start)
        if end < 0:
            end = len(body)
        yield body[start:end]
        start = end + 1
