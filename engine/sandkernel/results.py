"""What a cell returns: :class:`ExecutionResult` and its parts.

User code failing is a value, not an exception: ``status`` is one of a closed
set and says what happened; the other fields say what was seen.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["ok", "error", "timeout", "oom", "killed", "dead"]

#: Statuses after which the kernel is gone (its variables are lost).
KERNEL_LOST: frozenset[str] = frozenset({"oom", "killed", "dead"})

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without its terminal colour and cursor codes (ANSI CSI sequences)."""
    return _ANSI.sub("", text)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Model):
    """An exception raised by the cell."""

    name: str
    value: str
    traceback: str = Field(description="plain text, ANSI colour codes removed")


class Usage(_Model):
    """Resources one execution used."""

    wall_ms: float
    cpu_ms: float | None = Field(default=None, description="CPU time of the whole sandbox")
    peak_memory_bytes: int | None = Field(
        default=None, description="peak memory of the sandbox (v1: this cell; v2: lifetime)"
    )


class DisplayOutput(_Model):
    """A rich output as a MIME bundle (``display_data`` or the cell's value)."""

    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)


class ProducedFile(_Model):
    """A file the cell created or changed under ``/mnt/data``, or an image it displayed."""

    id: str = Field(description="file id in the engine's store (download with it)")
    name: str = Field(
        description="the file's name, escaped to be printable, unique and reversible as "
        "StoredFile.name describes; sandkernel.raw_file_name(name) gives the bytes on disk"
    )
    path: str = Field(
        description="path in the sandbox, escaped as name is; displayed images have none on disk"
    )
    mime_type: str
    size_bytes: int
    sha256: str
    execution_count: int | None = None
    source: Literal["workspace", "display"] = "workspace"


class ExecutionResult(_Model):
    """The outcome of running one cell in a sandboxed kernel."""

    status: Status
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    displays: list[DisplayOutput] = Field(default_factory=list)
    displays_truncated: bool = Field(
        default=False,
        description="displays, or the cell's value, were left out: past 32 MiB for the cell",
    )
    value: DisplayOutput | None = Field(default=None, description="the cell's Out[] value")
    error: ErrorInfo | None = None
    usage: Usage
    execution_count: int | None = None
    message: str | None = Field(
        default=None, description="what the engine has to say: why a timeout, oom or death"
    )
    kernel_alive: bool = Field(default=True, description="the kernel still runs after the cell")
    state_lost: bool = Field(
        default=False, description="variables from earlier cells are gone (kernel replaced/died)"
    )
    files: list[ProducedFile] = Field(
        default_factory=list, description="files the cell produced, registered in the store"
    )
    files_truncated: bool = Field(
        default=False,
        description="some files the cell wrote were left out (the caps, a failing store, "
        "or not regular files); files_note says which",
    )
    files_note: str | None = Field(default=None, description="why files were left out")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str | None:
        """The cell value's ``text/plain``, if any."""
        if self.value is None:
            return None
        plain = self.value.data.get("text/plain")
        return plain if isinstance(plain, str) else None
