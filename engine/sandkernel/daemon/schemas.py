"""The JSON bodies of the daemon's HTTP API that are not engine models.

Responses reuse the engine's own models (:class:`~sandkernel.results.ExecutionResult`,
:class:`~sandkernel.files.StoredFile`, :class:`~sandkernel.session.SessionInfo`,
:class:`~sandkernel.engine.EngineStats`), so a client gets exactly what the
embedded engine returns. Request bodies are strict: unknown fields and values
of the wrong type are refused rather than coerced, and durations are bounded
(:data:`MAX_TTL_S`, :data:`MAX_TIMEOUT_S`), so an absurd value is a 422 at the
edge rather than an overflow deep inside.

Each route's error answers are documented from the classes it may raise
(:func:`error_responses`), with their statuses from :mod:`sandkernel.errors`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sandkernel import limits
from sandkernel.daemon.admission import RETRY_AFTER_S
from sandkernel.daemon.sse import ERROR, OUTPUT_EVENTS, RESULT
from sandkernel.errors import INTERNAL_ERROR, InvalidRequest, SandkernelError, Unauthorized
from sandkernel.files import StoredFile
from sandkernel.session import SessionInfo

#: A session or agent id, as the engine accepts it.
ID_PATTERN: Final = f"^{limits.ID_PATTERN}$"
# The longest TTL or retention (30 days) and wall timeout (one day) a request may ask for.
MAX_TTL_S: Final = limits.MAX_TTL_S
MAX_TIMEOUT_S: Final = limits.MAX_TIMEOUT_S


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateSession(_Request):
    """``POST /v1/sessions``: get or create a session."""

    id: str | None = Field(
        default=None,
        json_schema_extra={"pattern": ID_PATTERN},
        description="the conversation's id; omitted: a new random id",
    )
    agent_id: str | None = Field(
        default=None,
        json_schema_extra={"pattern": ID_PATTERN},
        description="its agent's files appear read-only in /mnt/data",
    )
    ttl_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TTL_S,
        description="expire this long after the last activity (seconds, at most 30 days)",
    )
    policy: str | None = Field(
        default=None, description="must name the daemon's policy if given (one policy per daemon)"
    )
    if_expired: Literal["raise", "new"] = Field(
        default="raise",
        description="for the id of an ended or lost session: answer 410 (raise) or start anew",
    )

    @field_validator("id", "agent_id")
    @classmethod
    def _check_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = "session" if info.field_name == "id" else "agent"
        problem = None if value is None else limits.id_problem(value, kind)
        if problem is not None:
            raise ValueError(problem)
        return value


class Execute(_Request):
    """``POST /v1/sessions/{id}/execute``: run one cell."""

    code: str = Field(description="the cell's Python source")
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="wall timeout in seconds, at most a day (default: the policy's)",
    )
    file_ids: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="stored files copied into /mnt/data before the cell",
    )
    restart: bool | None = Field(
        default=None, description="if the kernel died: continue on a fresh one instead of 409"
    )


class Extend(_Request):
    """``POST /v1/sessions/{id}/extend``: keep a session alive."""

    ttl_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TTL_S,
        description="a new TTL in seconds, at most 30 days (default: keep it)",
    )


class FileIds(_Request):
    """A list of stored file ids."""

    file_ids: list[str] = Field(min_length=1, max_length=1000)


class Extended(BaseModel):
    id: str
    expires_at: datetime


class Deleted(BaseModel):
    id: str
    deleted: bool = True


class SessionList(BaseModel):
    data: list[SessionInfo]


class FileList(BaseModel):
    data: list[StoredFile]


class PathList(BaseModel):
    data: list[str] = Field(description="paths in the sandbox, under /mnt/data")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    policy: str
    pid: int
    started_at: datetime
    uptime_s: float


class ErrorDetail(BaseModel):
    type: str = Field(description="the exception class, e.g. SessionNotFound")
    message: str = Field(description="what happened and what to do about it")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="for invalid requests: each field that failed and why"
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- what the routes document ---------------------------------------------------------------

#: Every route may answer these: a TCP request without the token, and a bug.
_EVERY_ROUTE: Final = {
    401: f"`{Unauthorized.__name__}`: a TCP request without the daemon's bearer token",
    500: f"`{INTERNAL_ERROR}`: a bug; the daemon's log has its traceback",
}
_RETRY_AFTER: Final = {
    "Retry-After": {
        "description": f"seconds to wait before retrying (now {RETRY_AFTER_S})",
        "schema": {"type": "integer"},
    }
}


def error_responses(*raises: type[SandkernelError]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that may raise ``raises``: one entry per status.

    Each entry has the :class:`ErrorBody` model and names the classes answered
    with that status; 429 and 503 document ``Retry-After``. Every route also
    documents 401 and 500; :class:`~sandkernel.errors.InvalidRequest` is
    answered 400 (malformed JSON, a value the engine refuses) and 422 (fields
    that fail the route's schema).
    """
    names: dict[int, list[str]] = {}
    for cls in raises:
        names.setdefault(cls.http_status, []).append(f"`{cls.__name__}`")
        if cls is InvalidRequest:
            names.setdefault(422, []).append(f"`{cls.__name__}` (fields that fail the schema)")
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*names, *_EVERY_ROUTE}):
        described = ", ".join(names.get(status, []))
        if status in _EVERY_ROUTE:
            described = "; ".join(filter(None, [described, _EVERY_ROUTE[status]]))
        entry: dict[str, Any] = {"model": ErrorBody, "description": described}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER
        responses[status] = entry
    return responses


#: One event of a streamed execution (OpenAPI 3.2's ``itemSchema`` of ``text/event-stream``).
STREAM_EVENT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "type": "string",
            "enum": sorted({"stdout", "stderr", *OUTPUT_EVENTS.values(), RESULT, ERROR}),
            "description": "an output (`stdout`, `stderr`, `display`, `execute_result`, "
            "`traceback`, `clear_output`), then `result` (an ExecutionResult) or `error` "
            "(an ErrorBody with the `status` it would have had)",
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "one line of JSON: `{msg_type, content}` for an output",
        },
    },
}
