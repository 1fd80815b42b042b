"""The JSON bodies of the daemon's HTTP API that are not engine models.

Responses reuse the engine's own models (:class:`~sandkernel.results.ExecutionResult`,
:class:`~sandkernel.files.StoredFile`, :class:`~sandkernel.session.SessionInfo`,
:class:`~sandkernel.engine.EngineStats`), so a client gets exactly what the
embedded engine returns. Request bodies are strict: unknown fields and values
of the wrong type are refused rather than coerced.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandkernel.files import StoredFile
from sandkernel.session import SessionInfo


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateSession(_Request):
    """``POST /v1/sessions``: get or create a session."""

    id: str | None = Field(
        default=None, description="the conversation's id; omitted: a new random id"
    )
    agent_id: str | None = Field(
        default=None, description="its agent's files appear read-only in /mnt/data"
    )
    ttl_s: float | None = Field(
        default=None, gt=0, description="expire this long after the last activity"
    )
    policy: str | None = Field(
        default=None, description="must name the daemon's policy if given (one policy per daemon)"
    )
    if_expired: Literal["raise", "new"] = Field(
        default="raise",
        description="for the id of an ended or lost session: answer 410 (raise) or start anew",
    )


class Execute(_Request):
    """``POST /v1/sessions/{id}/execute``: run one cell."""

    code: str = Field(description="the cell's Python source")
    timeout_s: float | None = Field(
        default=None, gt=0, description="wall timeout (default: the policy's)"
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

    ttl_s: float | None = Field(default=None, gt=0, description="a new TTL (default: keep it)")


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
