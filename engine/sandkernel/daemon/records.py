"""Which sessions the daemon created, kept across restarts in a small SQLite file.

A session's kernel and variables live only as long as the daemon process. When
the daemon restarts (after a crash or a clean stop), a client may still hold
the id of a session it opened before; it should hear "lost: the daemon
restarted at ..." (410), not "no such session" (404). So each session id is
recorded with the daemon run (boot) that created it, and each boot with when
it started and, if it shut down cleanly, when it stopped.

The methods are blocking (SQLite); the daemon calls them in a worker thread,
except :meth:`SessionRecords.lost`, which reads what :meth:`SessionRecords.open`
loaded into memory.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sandkernel.daemon.errors import SessionLost

_KEEP: Final = 10_000  # sessions remembered; older ids answer 404 again
#: ids this run knows it recorded, kept in memory to skip a write; past this
#: many the set starts again (a session recorded twice is recorded the same)
_RECORDED_IN_MEMORY = 2 * _KEEP
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS boots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    stopped_at REAL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    boot INTEGER NOT NULL REFERENCES boots (id),
    created_at REAL NOT NULL,
    agent_id TEXT
);
"""


@dataclass(frozen=True)
class _PreviousBoot:
    started_at: float
    stopped_at: float | None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="seconds")


class SessionRecords:
    """The session ids of every daemon run on one store, and when each run began and ended."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._boot: int | None = None
        self.started_at = 0.0
        self._previous: dict[str, _PreviousBoot] = {}
        self._recorded: set[str] = set()
        self._inserts = 0

    def open(self, now: float | None = None) -> None:
        """Open (or create) the file, start a new boot and load the sessions of earlier ones."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            self.started_at = time.time() if now is None else now
            conn.execute("BEGIN IMMEDIATE")
            cursor = conn.execute(
                "INSERT INTO boots (started_at, pid) VALUES (?, ?)", (self.started_at, os.getpid())
            )
            self._boot = cursor.lastrowid
            rows = conn.execute(
                "SELECT s.id, b.started_at, b.stopped_at FROM sessions s "
                "JOIN boots b ON b.id = s.boot WHERE s.boot != ?",
                (self._boot,),
            ).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._previous = {row[0]: _PreviousBoot(row[1], row[2]) for row in rows}
        self._conn = conn

    def record(self, session_id: str, agent_id: str | None, now: float | None = None) -> None:
        """Remember that this run created ``session_id`` (idempotent)."""
        if session_id in self._recorded:
            return
        with self._lock:
            conn = self._require_open()
            conn.execute(
                "INSERT OR REPLACE INTO sessions (id, boot, created_at, agent_id) "
                "VALUES (?, ?, ?, ?)",
                (session_id, self._boot, time.time() if now is None else now, agent_id),
            )
            self._inserts += 1
            if self._inserts % 500 == 0:
                conn.execute(
                    "DELETE FROM sessions WHERE id NOT IN "
                    "(SELECT id FROM sessions ORDER BY created_at DESC LIMIT ?)",
                    (_KEEP,),
                )
        if len(self._recorded) >= _RECORDED_IN_MEMORY:
            self._recorded.clear()
        self._recorded.add(session_id)
        self._previous.pop(session_id, None)

    def __contains__(self, session_id: object) -> bool:
        """Whether this run already recorded ``session_id``."""
        return session_id in self._recorded

    def lost(self, session_id: str) -> SessionLost | None:
        """The error for a session an earlier run created, or None if it is not one."""
        before = self._previous.get(session_id)
        if before is None:
            return None
        how = (
            f"the daemon that ran it stopped at {_iso(before.stopped_at)}"
            if before.stopped_at is not None
            else "the daemon that ran it ended without shutting down (it crashed or was killed)"
        )
        return SessionLost(
            f"session {session_id!r} lost: the daemon restarted at {_iso(self.started_at)}; "
            f"{how}, and its kernel and variables are gone. Open a new session "
            '(the same id works with if_expired="new"); its files stay downloadable by id'
        )

    def finish(self, now: float | None = None) -> None:
        """Mark this run as stopped cleanly and close the file."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute(
                    "UPDATE boots SET stopped_at = ? WHERE id = ?",
                    (time.time() if now is None else now, self._boot),
                )
            finally:
                self._conn.close()
                self._conn = None

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the session records are not open")
        return self._conn
