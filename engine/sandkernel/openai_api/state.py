"""Assistants, threads, messages, runs and run steps, kept in SQLite across restarts.

One file beside the engine's file store (its own, not the daemon's session
records). Each object is stored as its wire JSON in one ``objects`` table,
with the columns lists and checks need (kind, thread, run, status) and an
insertion sequence that orders lists and anchors their cursors. What a
run or thread needs that OpenAI does not show (the chat turns a run added,
which agent a thread's session was made for) is a second JSON column of the
same row. Every change of a request or a run step is one transaction.

Which engine file a thread or an assistant uses for an OpenAI file id is in
``file_links``: an assistant's files are its own copies in the store (agent
scope), so removing one from the assistant removes it from new sessions
without touching the file the caller uploaded.

When the daemon opens the file it fails what was running when the previous
daemon stopped (:meth:`ApiState.open`): that run's kernel and model call
are gone. Runs waiting for tool outputs keep waiting.

The methods block (SQLite); the service calls them in worker threads.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, Field

from sandkernel.openai_api.wire import (
    RUNNING_STATUSES,
    Assistant,
    Container,
    IncompleteDetails,
    LastError,
    Message,
    ResponseObject,
    Run,
    RunStep,
    Thread,
    end_items,
)

Stored = Assistant | Thread | Message | Run | RunStep | Container | ResponseObject
T = TypeVar("T", bound=BaseModel)

_KINDS: Final[dict[type[BaseModel], str]] = {
    Assistant: "assistant",
    Thread: "thread",
    Message: "message",
    Run: "run",
    RunStep: "step",
    Container: "container",
    ResponseObject: "response",
}
_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS objects (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    thread_id TEXT,
    run_id TEXT,
    status TEXT,
    data TEXT NOT NULL,
    private TEXT
);
CREATE INDEX IF NOT EXISTS objects_by_thread ON objects (kind, thread_id, seq);
CREATE INDEX IF NOT EXISTS objects_by_run ON objects (kind, run_id, seq);
CREATE TABLE IF NOT EXISTS file_links (
    owner_id TEXT NOT NULL,
    file_id TEXT NOT NULL,
    local_id TEXT NOT NULL,
    path TEXT,
    PRIMARY KEY (owner_id, file_id)
);
CREATE INDEX IF NOT EXISTS file_links_by_file ON file_links (file_id);
CREATE INDEX IF NOT EXISTS file_links_by_local ON file_links (local_id);
"""

RESPONSE_INTERRUPTED: Final = (
    "the sandkernel daemon stopped while this response was in progress; create a new "
    "response to continue (its container and files are kept)"
)
INTERRUPTED: Final = (
    "the sandkernel daemon stopped while this run was in progress, so its model call and "
    "code execution were lost; create a new run to continue (the thread, its messages and "
    "its files are kept)"
)


class RunState(BaseModel):
    """What a run needs to go on that OpenAI's Run object does not show."""

    transcript: list[dict[str, Any]] = Field(
        default_factory=list,
        description="chat messages this run added: assistant turns and tool results",
    )
    message_turns: list[tuple[str, int]] = Field(
        default_factory=list,
        description="(message id, index of the transcript turn that said its words) "
        "of each message this run made",
    )
    code_calls: int = 0
    model_calls: int = 0
    pending_images: list[str] = Field(
        default_factory=list, description="displayed images not yet shown in a message"
    )
    pending_files: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(file id, sandbox path) of files written, not yet shown in a message",
    )


class ResponseState(BaseModel):
    """What a response keeps that OpenAI's object does not show."""

    transcript: list[dict[str, Any]] = Field(
        default_factory=list, description="the chat turns so far, this response's included"
    )
    input_items: list[dict[str, Any]] = Field(default_factory=list)
    container_id: str | None = None


class ThreadState(BaseModel):
    """How the thread's session was made, to know when it is not that one anymore."""

    session_agent_id: str | None = None
    ran_code: bool = False


@dataclass(frozen=True)
class FileLink:
    """The engine file a thread or assistant uses for an OpenAI file id."""

    owner_id: str
    file_id: str
    local_id: str
    path: str | None


class NotStored(Exception):
    """The object a write depends on is not stored (deleted meanwhile)."""

    def __init__(self, object_id: str) -> None:
        super().__init__(object_id)
        self.object_id = object_id


class ThreadBusy(Exception):
    """The thread has a run that is not finished (raised by :meth:`ApiState.create_run`)."""

    def __init__(self, run: Run) -> None:
        super().__init__(run.id)
        self.run = run


class UnknownCursor(Exception):
    """A list's ``after`` or ``before`` names no object of that list."""

    def __init__(self, cursor: str, param: Literal["after", "before"]) -> None:
        super().__init__(cursor)
        self.cursor = cursor
        #: which of the two it is
        self.param = param


def kind_of(cls: type[BaseModel]) -> str:
    return _KINDS[cls]


class ApiState:
    """The Assistants API's durable state; open with :meth:`open`, then use from any thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle

    def open(self, now: float | None = None) -> list[str]:
        """Open (or create) the file; fail the runs the previous daemon left running.

        Returns:
            The ids of the runs failed (or, if they were being cancelled, cancelled),
            then of the responses failed.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise RuntimeError(
                    f"{self.path} was written by another sandkernel version (schema {version}, "
                    f"this one reads {_SCHEMA_VERSION}); move it away to start afresh"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return self._fail_interrupted(int(time.time() if now is None else now))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the assistants state is closed")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the assistants state is closed")
            yield self._conn

    # ----------------------------------------------------------------- objects

    def save(
        self,
        *objects: Stored,
        private: Mapping[str, BaseModel] | None = None,
        keep_metadata: bool = False,
        only_stored: Collection[str] = (),
    ) -> None:
        """Insert or replace objects (and private states, by object id) in one transaction.

        Args:
            keep_metadata: objects already stored keep their stored metadata: for a
                writer that does not change metadata and whose copies may predate an
                :meth:`update_metadata` (a run's driver), which would be undone.
            only_stored: ids of ``objects`` written only over their stored selves: one
                deleted since the writer made it (a message a run is writing) is not
                brought back.
        """
        with self._transaction() as conn:
            for obj in objects:
                if obj.id in only_stored and not _is_stored(conn, kind_of(type(obj)), obj.id):
                    continue
                if keep_metadata:
                    obj = _with_stored_metadata(conn, obj)
                _upsert(conn, obj, (private or {}).get(obj.id))
            for object_id, state in (private or {}).items():
                if not any(obj.id == object_id for obj in objects):
                    conn.execute(
                        "UPDATE objects SET private = ? WHERE id = ?",
                        (state.model_dump_json(), object_id),
                    )

    def replace(self, obj: Stored, *, private: BaseModel | None = None) -> bool:
        """Write ``obj`` over its stored self; False (and nothing written) if it is gone.

        For a writer that read the object, awaited something, and must not
        bring it back if it was deleted meanwhile. ``private``: its private
        state too (else the stored one is kept).
        """
        with self._transaction() as conn:
            if not _is_stored(conn, kind_of(type(obj)), obj.id):
                return False
            _upsert(conn, obj, private)
        return True

    def update_metadata(self, cls: type[T], object_id: str, metadata: dict[str, str]) -> T | None:
        """Replace an object's metadata, and nothing else of it (``None``: no such object).

        Read and written in one transaction, so what another writer saved
        meanwhile (a run's status, a message's content) stays as it is.
        """
        with self._transaction() as conn:
            found = _fetch(conn, cls, object_id)
            if found is None:
                return None
            updated = found.model_copy(update={"metadata": metadata})
            conn.execute(
                "UPDATE objects SET data = ? WHERE id = ?", (updated.model_dump_json(), object_id)
            )
        return updated

    def get(self, cls: type[T], object_id: str) -> T | None:
        with self._reading() as conn:
            return _fetch(conn, cls, object_id)

    def private(self, cls: type[BaseModel], object_id: str, state: type[PrivateT]) -> PrivateT:
        """The private state of an object (a fresh one if it has none yet)."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT private FROM objects WHERE id = ? AND kind = ?", (object_id, kind_of(cls))
            ).fetchone()
        if row is None or row[0] is None:
            return state()
        return state.model_validate_json(row[0])

    def all(
        self, cls: type[T], *, thread_id: str | None = None, run_id: str | None = None
    ) -> list[T]:
        """Every object of a kind (of one thread, or one run), oldest first."""
        where, params = _filters(cls, thread_id, run_id)
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT data FROM objects WHERE {where} ORDER BY seq",  # noqa: S608 - fixed SQL
                params,
            ).fetchall()
        return [cls.model_validate_json(row[0]) for row in rows]

    def page(
        self,
        cls: type[T],
        *,
        thread_id: str | None = None,
        run_id: str | None = None,
        name: str | None = None,
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        before: str | None = None,
        limit: int = 20,
    ) -> tuple[list[T], bool]:
        """One page of a list, in OpenAI's cursor semantics; also whether more follow.

        ``name`` keeps only the objects of that ``name`` (containers').

        Raises:
            UnknownCursor: ``after`` or ``before`` is not in this list.
        """
        where, params = _filters(cls, thread_id, run_id)
        if name is not None:
            where += " AND json_extract(data, '$.name') = ?"
            params += (name,)
        bounds: tuple[int, ...] = ()
        bounded = ""
        with self._reading() as conn:
            cursors: tuple[tuple[str | None, bool, Literal["after", "before"]], ...] = (
                (after, order == "asc", "after"),
                (before, order == "desc", "before"),
            )
            for cursor, later, param in cursors:
                if cursor is None:
                    continue
                row = conn.execute(
                    f"SELECT seq FROM objects WHERE id = ? AND {where}",  # noqa: S608 - fixed SQL
                    (cursor, *params),
                ).fetchone()
                if row is None:
                    raise UnknownCursor(cursor, param)
                bounded += " AND seq > ?" if later else " AND seq < ?"
                bounds += (int(row[0]),)
            # Only ``before`` given: the page is the one just before it, so it is read from
            # ``before`` backwards (``has_more``: more precede it) and turned back. With
            # ``after`` too, ``after`` starts the page and ``before`` only ends the list.
            backwards = before is not None and after is None
            ascending = (order == "asc") != backwards
            rows = conn.execute(
                f"SELECT data FROM objects WHERE {where}{bounded}"  # noqa: S608 - fixed SQL
                f" ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?",
                (*params, *bounds, limit + 1),
            ).fetchall()
        kept = rows[:limit]
        if backwards:
            kept.reverse()
        items = [cls.model_validate_json(row[0]) for row in kept]
        return items, len(rows) > limit

    def delete(self, cls: type[BaseModel], object_id: str) -> bool:
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM objects WHERE id = ? AND kind = ?", (object_id, kind_of(cls))
            )
            conn.execute("DELETE FROM file_links WHERE owner_id = ?", (object_id,))
        return cursor.rowcount > 0

    def delete_thread(self, thread_id: str) -> bool:
        """Delete a thread with its messages, runs, steps and file links."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM objects WHERE id = ? AND kind = 'thread'", (thread_id,)
            )
            conn.execute("DELETE FROM objects WHERE thread_id = ?", (thread_id,))
            conn.execute("DELETE FROM file_links WHERE owner_id = ?", (thread_id,))
        return cursor.rowcount > 0

    def timeline(self, thread_id: str) -> list[tuple[Message | Run, RunState | None]]:
        """A thread's messages and runs in the order they were made (runs with their state)."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT kind, data, private FROM objects WHERE thread_id = ?"
                " AND kind IN ('message', 'run') ORDER BY seq",
                (thread_id,),
            ).fetchall()
        found: list[tuple[Message | Run, RunState | None]] = []
        for kind, data, private in rows:
            if kind == "message":
                found.append((Message.model_validate_json(data), None))
            else:
                state = RunState() if private is None else RunState.model_validate_json(private)
                found.append((Run.model_validate_json(data), state))
        return found

    # ----------------------------------------------------------------- runs

    def active_run(self, thread_id: str) -> Run | None:
        """The thread's run that is not finished, if any (an overdue wait expires first)."""
        with self._transaction() as conn:
            _expire_overdue(conn, thread_id, _now())
            return _active_run(conn, thread_id)

    def expire_overdue(self, thread_id: str, now: int | None = None) -> list[Run]:
        """Expire the thread's runs whose wait for tool outputs is over; those runs, expired."""
        with self._transaction() as conn:
            return _expire_overdue(conn, thread_id, _now() if now is None else now)

    def accept_tool_outputs(
        self, step: RunStep, queued: Run, state: RunState, now: int | None = None
    ) -> tuple[bool, Run | None, list[Run]]:
        """Store a run's tool outputs and queue it, if it still waits for them.

        The check and the write are one transaction: a run whose wait ran out
        (expired here, or by another request since the caller read it) stays
        expired, and one that another request answered stays as it is.

        Returns:
            Whether the outputs were taken; the run as stored after the call
            (``queued`` if they were, else as it was; None if it is gone); and
            the thread's runs this call expired.
        """
        with self._transaction() as conn:
            expired = _expire_overdue(conn, queued.thread_id, _now() if now is None else now)
            current = _fetch(conn, Run, queued.id)
            if current is None or current.status != "requires_action":
                return False, current, expired
            # The stored metadata: an update_metadata since the caller read the run stays.
            queued = queued.model_copy(update={"metadata": current.metadata})
            _upsert(conn, _with_stored_metadata(conn, step), None)
            _upsert(conn, queued, state)
        return True, queued, expired

    def create_run(self, run: Run, state: RunState, messages: list[Message]) -> None:
        """Store a new run (and the messages it adds first), if its thread has no active run.

        Raises:
            ThreadBusy: the thread has a run that is not finished.
            NotStored: the thread is gone (deleted since the caller looked).
        """
        with self._transaction() as conn:
            _require_thread(conn, run.thread_id)
            _expire_overdue(conn, run.thread_id, _now())
            active = _active_run(conn, run.thread_id)
            if active is not None:
                raise ThreadBusy(active)
            for message in messages:
                _upsert(conn, message, None)
            _upsert(conn, run, state)

    def add_messages(self, thread_id: str, messages: list[Message]) -> None:
        """Add messages to a thread that has no active run.

        Raises:
            ThreadBusy: the thread has a run that is not finished.
            NotStored: the thread is gone (deleted since the caller looked).
        """
        with self._transaction() as conn:
            _require_thread(conn, thread_id)
            _expire_overdue(conn, thread_id, _now())
            active = _active_run(conn, thread_id)
            if active is not None:
                raise ThreadBusy(active)
            for message in messages:
                _upsert(conn, message, None)

    def _fail_interrupted(self, now: int) -> list[str]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT data FROM objects WHERE kind = 'run' AND status IN (?, ?, ?)",
                tuple(sorted(RUNNING_STATUSES)),
            ).fetchall()
            failed = []
            for (data,) in rows:
                run = Run.model_validate_json(data)
                error = LastError(code="server_error", message=INTERRUPTED)
                if run.status == "cancelling":
                    run = run.model_copy(update={"status": "cancelled", "cancelled_at": now})
                else:
                    run = run.model_copy(
                        update={"status": "failed", "failed_at": now, "last_error": error}
                    )
                run = run.model_copy(update={"expires_at": None, "required_action": None})
                conn.execute(
                    "UPDATE objects SET data = ?, status = ? WHERE id = ?",
                    (run.model_dump_json(), run.status, run.id),
                )
                for kind, model in (("step", RunStep), ("message", Message)):
                    for (item,) in conn.execute(
                        "SELECT data FROM objects WHERE kind = ? AND run_id = ? AND status = ?",
                        (kind, run.id, "in_progress"),
                    ).fetchall():
                        obj = model.model_validate_json(item)
                        if isinstance(obj, RunStep):
                            obj = obj.model_copy(
                                update={"status": "failed", "failed_at": now, "last_error": error}
                            )
                        else:
                            obj = obj.model_copy(
                                update={
                                    "status": "incomplete",
                                    "incomplete_at": now,
                                    "incomplete_details": IncompleteDetails(reason="run_failed"),
                                }
                            )
                        conn.execute(
                            "UPDATE objects SET data = ?, status = ? WHERE id = ?",
                            (obj.model_dump_json(), obj.status, obj.id),
                        )
                failed.append(run.id)
            # A response the previous daemon was answering: failed as it was left.
            for (data,) in conn.execute(
                "SELECT data FROM objects WHERE kind = ? AND status = 'in_progress'",
                (kind_of(ResponseObject),),
            ).fetchall():
                response = ResponseObject.model_validate_json(data)
                end_items(response.output)
                response = response.model_copy(
                    update={
                        "status": "failed",
                        "error": {"code": "server_error", "message": RESPONSE_INTERRUPTED},
                    }
                )
                _upsert(conn, response, None)
                failed.append(response.id)
        return failed

    # ----------------------------------------------------------------- file links

    def links(self, owner_id: str) -> list[FileLink]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT owner_id, file_id, local_id, path FROM file_links WHERE owner_id = ?"
                " ORDER BY rowid",
                (owner_id,),
            ).fetchall()
        return [FileLink(*row) for row in rows]

    def links_to(self, file_id: str) -> list[FileLink]:
        """Every link of an OpenAI file id, whoever uses it."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT owner_id, file_id, local_id, path FROM file_links WHERE file_id = ?",
                (file_id,),
            ).fetchall()
        return [FileLink(*row) for row in rows]

    def own_files(self, files: Iterable[tuple[str, str | None]]) -> set[str]:
        """Which engine files, given as (id, session id), are this API's own.

        A copy made here (of an upload, for an assistant or a thread) or a
        container's file: neither is a file a caller uploaded, and OpenAI's
        ``/files`` has neither (a container's files are the Containers API's).
        """
        files = list(files)
        ids = json.dumps(sorted({f for f, _ in files}))
        sessions = json.dumps(sorted({s for _, s in files if s is not None}))
        # Looked up by id (the ids given as one JSON array; CROSS JOIN keeps
        # SQLite from scanning every container by kind instead): a file's
        # lookup costs the same however many files and containers are stored.
        with self._reading() as conn:
            copies = {
                row[0]
                for row in conn.execute(
                    "SELECT link.local_id FROM json_each(?) AS wanted"
                    " CROSS JOIN file_links AS link ON link.local_id = wanted.value"
                    " WHERE link.local_id != link.file_id",
                    (ids,),
                )
            }
            containers = {
                row[0]
                for row in conn.execute(
                    "SELECT object.id FROM json_each(?) AS wanted"
                    " CROSS JOIN objects AS object ON object.id = wanted.value"
                    " WHERE object.kind = ?",
                    (sessions, kind_of(Container)),
                )
            }
        return {f for f, session in files if f in copies or session in containers}

    def link(self, link: FileLink) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO file_links (owner_id, file_id, local_id, path) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (owner_id, file_id) DO UPDATE SET local_id = excluded.local_id,"
                " path = excluded.path",
                (link.owner_id, link.file_id, link.local_id, link.path),
            )

    def unlink(self, owner_id: str, file_ids: list[str]) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM file_links WHERE owner_id = ? AND file_id = ?",
                [(owner_id, file_id) for file_id in file_ids],
            )


PrivateT = TypeVar("PrivateT", RunState, ThreadState, ResponseState)


def _filters(
    cls: type[BaseModel], thread_id: str | None, run_id: str | None
) -> tuple[str, tuple[str, ...]]:
    where = "kind = ?"
    params: tuple[str, ...] = (kind_of(cls),)
    if thread_id is not None:
        where += " AND thread_id = ?"
        params += (thread_id,)
    if run_id is not None:
        where += " AND run_id = ?"
        params += (run_id,)
    return where, params


def _upsert(conn: sqlite3.Connection, obj: Stored, private: BaseModel | None) -> None:
    thread_id = (
        None if isinstance(obj, Assistant | Thread | Container | ResponseObject) else obj.thread_id
    )
    run_id = obj.run_id if isinstance(obj, Message | RunStep) else None
    status = (
        obj.status
        if isinstance(obj, Message | Run | RunStep | Container | ResponseObject)
        else None
    )
    conn.execute(
        "INSERT INTO objects (id, kind, thread_id, run_id, status, data, private)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET data = excluded.data, status = excluded.status,"
        " run_id = excluded.run_id, private = coalesce(excluded.private, private)",
        (
            obj.id,
            kind_of(type(obj)),
            thread_id,
            run_id,
            status,
            obj.model_dump_json(),
            None if private is None else private.model_dump_json(),
        ),
    )


def _active_run(conn: sqlite3.Connection, thread_id: str) -> Run | None:
    row = conn.execute(
        "SELECT data FROM objects WHERE kind = 'run' AND thread_id = ? AND status IN"
        " ('queued', 'in_progress', 'requires_action', 'cancelling') ORDER BY seq DESC LIMIT 1",
        (thread_id,),
    ).fetchone()
    return None if row is None else Run.model_validate_json(row[0])


def _fetch[M: BaseModel](conn: sqlite3.Connection, cls: type[M], object_id: str) -> M | None:
    row = conn.execute(
        "SELECT data FROM objects WHERE id = ? AND kind = ?", (object_id, kind_of(cls))
    ).fetchone()
    return None if row is None else cls.model_validate_json(row[0])


def _is_stored(conn: sqlite3.Connection, kind: str, object_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM objects WHERE id = ? AND kind = ?", (object_id, kind))
    return row.fetchone() is not None


def _require_thread(conn: sqlite3.Connection, thread_id: str) -> None:
    if not _is_stored(conn, kind_of(Thread), thread_id):
        raise NotStored(thread_id)


def _expire_overdue(conn: sqlite3.Connection, thread_id: str, now: int) -> list[Run]:
    """Expire the thread's runs waiting for tool outputs past ``expires_at``, as OpenAI's do.

    Done wherever a thread's runs are looked at, so the thread is free once the
    wait is over, not only when that run is retrieved.
    """
    rows = conn.execute(
        "SELECT data FROM objects WHERE kind = 'run' AND thread_id = ?"
        " AND status = 'requires_action'",
        (thread_id,),
    ).fetchall()
    expired: list[Run] = []
    for (data,) in rows:
        run = Run.model_validate_json(data)
        if (run.expires_at or 0) >= now:
            continue
        for (item,) in conn.execute(
            "SELECT data FROM objects WHERE kind = 'step' AND run_id = ? AND status = ?",
            (run.id, "in_progress"),
        ).fetchall():
            step = RunStep.model_validate_json(item).model_copy(
                update={"status": "expired", "expired_at": now}
            )
            conn.execute(
                "UPDATE objects SET data = ?, status = ? WHERE id = ?",
                (step.model_dump_json(), step.status, step.id),
            )
        run = run.model_copy(
            update={"status": "expired", "required_action": None, "expires_at": None}
        )
        conn.execute(
            "UPDATE objects SET data = ?, status = ? WHERE id = ?",
            (run.model_dump_json(), run.status, run.id),
        )
        expired.append(run)
    return expired


def _with_stored_metadata(conn: sqlite3.Connection, obj: Stored) -> Stored:
    if "metadata" not in type(obj).model_fields:
        return obj
    row = conn.execute("SELECT data FROM objects WHERE id = ?", (obj.id,)).fetchone()
    if row is None:
        return obj
    return obj.model_copy(update={"metadata": json.loads(row[0]).get("metadata") or {}})


def _now() -> int:
    return int(time.time())
