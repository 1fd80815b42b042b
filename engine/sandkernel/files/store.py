"""The file store: files kept across restarts, addressed by unguessable ids.

Metadata in SQLite (WAL mode, every write in a transaction), content on disk
under ``blobs/`` named by its SHA-256, so identical content is stored once.
A file may carry an expiry; :meth:`FileStore.purge_expired` deletes what has
expired and the content no file refers to any more.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field

from sandkernel.errors import BadInput, FileError, FileNotFoundInStore, FileTooLarge
from sandkernel.files._common import CHUNK_BYTES, human_size, open_regular
from sandkernel.files.mime import MIME_TYPES, OCTET_STREAM, extension, mime_for_name
from sandkernel.files.names import listed_file_name, produced_name, safe_name
from sandkernel.files.sniff import sniff_path
from sandkernel.files.upload import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    DEFAULT_MAX_ARCHIVE_ENTRIES,
    DEFAULT_MAX_UPLOAD_BYTES,
    check_extension,
    check_upload,
)

log = logging.getLogger(__name__)

Origin = Literal["uploaded", "produced"]
Scope = Literal["session", "agent", "none"]
#: What can be uploaded: bytes, a path, or a binary stream.
UploadSource = bytes | str | os.PathLike[str] | BinaryIO
#: What the store was doing when its disk or database failed (see FileStore._failure).
_Action = Literal["open", "add", "use"]

_STALE_TEMP_S: Final = 3600.0
#: How long a write waits for another process's write lock on the database.
_BUSY_TIMEOUT_S: Final = 30.0
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY_ERRNOS: Final = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_MOVE_STORE: Final = "use another store folder (EngineConfig.store_dir, `sandkernel serve --store`)"
#: The largest file the store takes from the code (written or displayed),
#: whatever the upload cap: the engine's default upload cap. The engine's caps
#: on what a cell and a session produce (OutputCaps) are tighter; this is the
#: store's own last bound.
DEFAULT_MAX_PRODUCED_FILE_BYTES: Final = DEFAULT_MAX_UPLOAD_BYTES


#: Why an upload given as a text stream is refused.
TEXT_STREAM_REFUSED: Final = (
    "uploading a text stream: give its bytes (open the file in binary mode, 'rb', "
    "or encode the text)"
)


def upload_name(source: UploadSource, name: str | None) -> str:
    """The name an upload is stored under: ``name``, else its path's or its stream's own.

    The one rule for every backend: the local store, the daemon's client and
    the cluster's driver each read a source their way, under this name.

    Raises:
        BadInput: a text stream (its bytes are wanted).
        ValueError: no name was given and none can be derived (bytes, a stream
            without a ``name``).
    """
    if isinstance(source, io.TextIOBase):
        raise BadInput(TEXT_STREAM_REFUSED)
    if name is not None:
        return name
    if isinstance(source, bytes | bytearray | memoryview):
        raise ValueError("uploading bytes needs a name (with its extension)")
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(os.path.basename(os.fspath(source)))
    derived = os.path.basename(str(getattr(source, "name", "") or ""))
    if not derived:
        raise ValueError("uploading a stream needs a name (with its extension)")
    return derived


class Readable(Protocol):
    """What :meth:`FileStore.add_stream` reads from."""

    def read(self, size: int = ..., /) -> bytes: ...


# The field's description, which the daemon's OpenAPI schema shows to clients.
_NAME_DESCRIPTION: Final = (
    "The file name, without directories. An upload's is the last component of the "
    "name it was given (printable UTF-8 without a backslash, so it needs no escape). "
    "A produced file's name on disk is "
    r"escaped so that it is printable, unique and reversible: a backslash becomes `\\`, "
    r"a line feed `\n`, a tab `\t`, a carriage return `\r`, a byte that is not valid "
    r"UTF-8 `\xNN` (80 to ff), any other character that does not show (control, "
    "format character such as a bidi override, line or paragraph separator, private "
    r"use, unassigned) `\uXXXX`, or `\UXXXXXXXX` above U+FFFF; everything else is "
    "itself, and hexadecimal digits are lowercase. Undoing the escapes gives the exact "
    "bytes on disk (in Python: sandkernel.raw_file_name(name))."
)


class StoredFile(BaseModel):
    """A file kept by a :class:`FileStore`.

    Ownership is two optional ids rather than one field, so the engine can list
    both "files of session S" and "files of agent A": an upload starts with
    neither and is attached later (:meth:`FileStore.attach`); a produced file is
    stored with the session (and agent) it came from. A file belongs to at most
    one session and one agent; to give the same content to another owner, add
    it again (the content is stored once).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^file-[0-9a-f]{24}$", description="unguessable (96 random bits)")
    name: str = Field(description=_NAME_DESCRIPTION)
    mime_type: str = Field(pattern=r"^[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*$")
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: float = Field(description="unix time")
    origin: Origin
    session_id: str | None = None
    execution_count: int | None = Field(default=None, description="the cell that produced it")
    path: str | None = Field(
        default=None,
        description="where the file is in its session's sandbox, escaped as `name` is: "
        "where the code wrote a produced file; where an upload to a session was placed "
        "(its own name, or a suffixed one if that was taken). None for an upload not "
        "placed yet, or replaced there by a later upload of its name, and for an agent's "
        "files, which each session places where their name is free",
    )
    agent_id: str | None = None
    expires_at: float | None = Field(default=None, description="unix time; None keeps it")

    @property
    def scope(self) -> Scope:
        """Who may see the file: one session, every session of an agent, or no one yet."""
        if self.session_id is not None:
            return "session"
        if self.agent_id is not None:
            return "agent"
        return "none"


_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('uploaded', 'produced')),
    session_id TEXT,
    execution_count INTEGER,
    path TEXT,
    agent_id TEXT,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
CREATE INDEX IF NOT EXISTS files_by_session ON files (session_id);
CREATE INDEX IF NOT EXISTS files_by_agent ON files (agent_id);
CREATE INDEX IF NOT EXISTS files_by_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
"""
_INSERT: Final = """
INSERT INTO files (
    id, name, mime_type, size_bytes, sha256, created_at, origin,
    session_id, execution_count, path, agent_id, expires_at
) VALUES (
    :id, :name, :mime_type, :size_bytes, :sha256, :created_at, :origin,
    :session_id, :execution_count, :path, :agent_id, :expires_at
)
"""
_ID_PATTERN: Final = re.compile(r"file-[0-9a-f]{24}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


class _Checked(io.RawIOBase):
    """A stored file's content, read through the SHA-256 it was stored under.

    The read that brings the content to its stored size checks the hash
    before it returns: a copy changed on disk (same size, other bytes) fails
    there, and its last bytes never reach the reader, so a download sent
    with the file's length is cut short rather than delivered whole. A copy
    that grew or shrank fails too. Seeking elsewhere than where the reads
    are ends the check: only a read from the start to the end is checked.
    """

    def __init__(self, raw: io.FileIO, record: StoredFile, path: str) -> None:
        super().__init__()
        self._raw = raw
        self._record = record
        self._path = path
        self._hash: Any = hashlib.sha256()
        self._read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._raw.seek(offset, whence)
        if position != self._read:
            self._hash = None  # not read through from the start: not checked
        return position

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()

    def readall(self) -> bytes:
        # RawIOBase's reads 8 KiB a call, each through readinto in Python.
        chunks = []
        while chunk := self.read(CHUNK_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)
        if self._hash is None:
            return count
        size = self._record.size_bytes
        if count:
            self._hash.update(memoryview(buffer)[:count])
            self._read += count
            if self._read < size:
                return count
        if self._read == size and self._hash.hexdigest() == self._record.sha256:
            self._hash = None  # checked: what follows is the end
            return count
        if self._read == size:
            found = "other bytes"
        else:
            found = f"only {self._read} bytes" if self._read < size else "more bytes"
        raise FileNotFoundInStore(
            f"the stored copy of {self._record.id!r} at {self._path!r} is damaged: "
            f"{found} where the {size} bytes stored were expected (changed by something "
            "other than sandkernel); upload the file again to repair it"
        )


def _record(row: sqlite3.Row) -> StoredFile:
    # extra="forbid" turns a column the model does not know into a loud error.
    return StoredFile(**{key: row[key] for key in row.keys()})


def _make_private_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    # Makes a rename or a new entry in the directory survive a power loss.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    # Unbuffered, so a failed write is reported once, where it happened, and
    # never again by a buffer flushed on close.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_logged(path: str | os.PathLike[str], what: str) -> None:
    """Remove ``path``; if that fails, log why and leave it for a later purge."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s %s (left for a later purge): %s", what, path, exc)


class FileStore:
    """Files kept on disk across restarts, addressed by unguessable ids.

    Layout under ``root`` (directories 0700, files 0600)::

        files.sqlite3            metadata, WAL mode
        blobs/ab/abcdef...       content, named by its SHA-256; stored once
        tmp/                     content being received (same file system)

    Content is written to ``tmp/``, fsynced, then renamed into ``blobs/``,
    so a blob is either complete or absent. A row is inserted only after its
    blob is in place, and blobs are created and removed only while holding
    SQLite's write lock, so several processes may share one root.

    Thread safety: two SQLite connections serve every thread, one for writes
    and one for reads, each guarded by a lock held only for database work, so
    that a write waiting for another process's lock (up to its busy timeout)
    holds up no read; receiving, hashing and checking content happen outside
    them, so concurrent adds overlap their I/O. The methods are blocking;
    async code calls them in a worker thread.

    Uploads (``origin="uploaded"``) pass
    :func:`~sandkernel.files.upload.check_upload`; produced files are stored
    whatever their type, with their name made printable.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        allowed: Mapping[str, Sequence[str]] = MIME_TYPES,
        max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
        max_archive_entries: int = DEFAULT_MAX_ARCHIVE_ENTRIES,
        max_produced_file_bytes: int = DEFAULT_MAX_PRODUCED_FILE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (or create) the store at ``root``.

        Args:
            root: Directory of the store; created with mode 0700 if missing.
            allowed: Upload types, as for :func:`~sandkernel.files.upload.check_upload`.
            max_bytes: Largest upload accepted (``EngineConfig.max_upload_bytes``,
                ``sandkernel serve --max-upload-mb``).
            max_archive_bytes: See :func:`~sandkernel.files.upload.check_upload`.
            max_archive_entries: See :func:`~sandkernel.files.upload.check_upload`.
            max_produced_file_bytes: Largest produced file accepted: a bound of last
                resort, the engine's caps on what code produces are tighter.
            clock: Unix time; decides expiry and ``created_at``.

        Raises:
            FileError: the store cannot be opened or written, its database is
                damaged, or is from a newer version.
        """
        self.root = Path(root)
        self._allowed = allowed
        self._max_bytes = max_bytes
        self._max_archive_bytes = max_archive_bytes
        self._max_archive_entries = max_archive_entries
        self._max_produced_file_bytes = max_produced_file_bytes
        self._clock = clock
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._db = self.root / "files.sqlite3"
        try:  # a file where a folder goes, no permission, a full disk
            self.root.parent.mkdir(parents=True, exist_ok=True)
            for directory in (self.root, self._blobs, self._tmp):
                _make_private_dir(directory)
            # Created here with 0600 so SQLite, which gives its -wal and -shm files
            # the database's mode, never makes a readable copy of the metadata.
            fd = os.open(self._db, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                opened = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._failure(exc, "open") from None
        # Which file was opened: a write checks that it is still the one at that path.
        self._db_identity = (opened.st_dev, opened.st_ino)
        with self._mapped("open"):
            self._conn = sqlite3.connect(
                self._db, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
            )
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed id survives a power loss, as its blob does.
            self._conn.execute("PRAGMA synchronous=FULL")
            # Damage found now refuses the start, rather than failing calls later.
            # It reads the whole database: about 2 ms for 3,000 files, 50 ms for 100,000.
            problem = self._conn.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise self._damaged(problem)
            self._conn.execute("BEGIN IMMEDIATE")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise FileError(
                    f"the file store at {str(self.root)!r} was written by a newer sandkernel "
                    f"(schema {version}); upgrade sandkernel to open it"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
            # In WAL mode a reader waits for no writer, in this process or another.
            self._reader = sqlite3.connect(
                self._db, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
            )
            try:
                # A first read opens its WAL files now, as the writer's are:
                # files removed from under the store later are read as they were.
                self._reader.execute("SELECT 1 FROM files LIMIT 1").fetchall()
            except BaseException:
                self._reader.close()
                raise
        except sqlite3.Error as exc:
            self._conn.close()
            raise self._failure(exc, "open") from None
        except BaseException:
            self._conn.close()
            raise
        self._reader.row_factory = sqlite3.Row

    # ----------------------------------------------------------------- plumbing

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; later calls raise :class:`FileError`. Idempotent."""
        with self._lock, self._read_lock:
            if not self._closed:
                self._closed = True
                self._conn.close()
                self._reader.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _ensure_open(self) -> None:
        if self._closed:
            raise FileError(f"the file store at {str(self.root)!r} is closed")

    def _failure(self, exc: OSError | sqlite3.Error, action: _Action) -> FileError:
        """The error for the store's disk or database failing: the cause, and what fixes it.

        A full disk refuses an add as :class:`FileTooLarge` (a smaller file may
        still fit); anything else is a :class:`FileError`.
        """
        root = str(self.root)
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
            if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return FileError(
                    f"another process has held the database of the file store at "
                    f"{str(self._db)!r} for more than {_BUSY_TIMEOUT_S:g} s ({exc}): "
                    f"retry later, end it (`fuser -v {self._db}` shows it), or {_MOVE_STORE}"
                )
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                return self._damaged(str(exc))
            full = code == sqlite3.SQLITE_FULL
            read_only = code == sqlite3.SQLITE_READONLY
            detail = str(exc)
        else:
            full = exc.errno in _FULL_ERRNOS
            read_only = exc.errno in _READ_ONLY_ERRNOS
            detail = f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
        if full:
            message = (
                f"the disk of the file store at {root!r} is full ({detail}): "
                f"free space on it, or {_MOVE_STORE}"
            )
            return FileTooLarge(message) if action == "add" else FileError(message)
        if read_only:
            return FileError(
                f"the file store at {root!r} is read-only or not writable by this process "
                f"({detail}): make it writable, or {_MOVE_STORE}"
            )
        if action == "open":
            return FileError(f"cannot open a file store at {root!r}: {detail}")
        return FileError(f"the file store at {root!r} failed: {detail}")

    def _damaged(self, detail: str) -> FileError:
        db = str(self._db)
        return FileError(
            f"the database of the file store at {db!r} is damaged ({detail}): stop the "
            f"engine, then restore it from a backup, or recover what it holds (`sqlite3 {db} "
            ".recover | sqlite3 recovered.sqlite3`, then put that in its place), or move it "
            "aside with its -wal and -shm files (an empty one is made at the next start; "
            "the files it listed are lost)"
        )

    @contextmanager
    def _mapped(self, action: _Action = "use") -> Iterator[None]:
        """Raise the store's disk and database failures as :meth:`_failure` says."""
        try:
            yield
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, action) from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            self._ensure_open()
            with self._mapped():
                yield self._reader

    @contextmanager
    def _write(self, action: _Action = "use") -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes SQLite's write lock up front; blob renames and unlinks
        # done inside are thereby ordered with other processes' row changes.
        with self._lock:
            self._ensure_open()
            self._ensure_same_database()
            with self._mapped(action):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        # Failing too (a damaged database) must not hide the first error.
                        with suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise

    def _ensure_same_database(self) -> None:
        """Refuse to write to a database no longer at its path: what it took would be lost."""
        try:
            current = os.stat(self._db)
        except FileNotFoundError:
            current = None
        except OSError as exc:
            raise self._failure(exc, "use") from None
        if current is None or (current.st_dev, current.st_ino) != self._db_identity:
            raise FileError(
                f"the database of the file store at {str(self._db)!r} was deleted or replaced "
                "while the store was open, so nothing more is written to it: restart the "
                "engine to open the one there now (restore it from a backup first if it "
                "was deleted by mistake: a missing database is made anew, empty)"
            )

    def _blob_for(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def _row(self, conn: sqlite3.Connection, file_id: str) -> StoredFile | None:
        if not _ID_PATTERN.fullmatch(file_id):
            return None
        row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else _record(row)

    # ----------------------------------------------------------------- adding

    def add_bytes(
        self,
        data: bytes,
        name: str,
        *,
        origin: Origin = "uploaded",
        session_id: str | None = None,
        execution_count: int | None = None,
        path: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
        mime: str | None = None,
    ) -> StoredFile:
        """Store ``data`` under ``name``. See :meth:`add_stream` for the arguments."""
        return self.add_stream(
            io.BytesIO(data),
            name,
            origin=origin,
            session_id=session_id,
            execution_count=execution_count,
            path=path,
            agent_id=agent_id,
            retention_s=retention_s,
            mime=mime,
        )

    def add_upload(
        self,
        source: UploadSource,
        name: str | None = None,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
    ) -> StoredFile:
        """Store an upload given as bytes, a path or a binary stream.

        Args:
            source: The content, a path to it, or a stream of it.
            name: The file's name; defaults to the path's last component or the
                stream's ``name``, and is required for bytes.
            session_id: The owning session, if any.
            agent_id: The owning agent, if any.
            retention_s: Seconds to keep the file; ``None`` keeps it until deleted.

        Raises:
            FileRejected: the name, type, size or content is refused.
            BadInput: a text stream.
            ValueError: no name was given and none can be derived.
        """
        owner: dict[str, Any] = {
            "session_id": session_id, "agent_id": agent_id, "retention_s": retention_s,
        }  # fmt: skip
        name = upload_name(source, name)
        if isinstance(source, bytes | bytearray | memoryview):
            return self.add_bytes(bytes(source), name, **owner)
        if isinstance(source, str | os.PathLike):
            return self.add_file(source, name, **owner)
        return self.add_stream(source, name, **owner)

    def add_file(
        self,
        source: str | os.PathLike[str],
        name: str | None = None,
        /,
        *,
        origin: Origin = "uploaded",
        session_id: str | None = None,
        execution_count: int | None = None,
        path: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
        mime: str | None = None,
    ) -> StoredFile:
        """Store the regular file at ``source``, streaming it (never all in memory).

        A symlink at ``source`` is refused, not followed. To take a file out of
        a workspace the sandbox can write, prefer :func:`~sandkernel.workspace.open_workspace_file`
        with :meth:`add_stream`, which follows no symlink on the whole path.
        ``name`` defaults to the last component of ``source``. See
        :meth:`add_stream` for the other arguments.
        """
        if name is None:
            name = os.fsdecode(os.path.basename(os.fspath(source)))
        with open_regular(source) as f:
            return self.add_stream(
                f,
                name,
                origin=origin,
                session_id=session_id,
                execution_count=execution_count,
                path=path,
                agent_id=agent_id,
                retention_s=retention_s,
                mime=mime,
            )

    def add_stream(
        self,
        fileobj: Readable,
        name: str,
        *,
        origin: Origin = "uploaded",
        session_id: str | None = None,
        execution_count: int | None = None,
        path: str | None = None,
        agent_id: str | None = None,
        retention_s: float | None = None,
        mime: str | None = None,
    ) -> StoredFile:
        """Store what ``fileobj.read()`` returns until it is exhausted.

        Args:
            fileobj: Anything with ``read(size) -> bytes``; read in 1 MiB chunks.
            name: The file's name. An upload's is checked by
                :func:`~sandkernel.files.names.safe_name`; a produced file's is
                reduced to its last component and listed as
                :func:`~sandkernel.files.names.listed_file_name` gives it.
            origin: ``"uploaded"`` (checked by :func:`~sandkernel.files.upload.check_upload`) or
                ``"produced"`` (stored as is).
            session_id: The owning session, if any.
            execution_count: For a produced file, the cell that made it.
            path: For a produced file, where it was in the sandbox (listed as
                :func:`~sandkernel.files.names.listed_file_name` gives it).
            agent_id: The owning agent, if any.
            retention_s: Seconds to keep the file; ``None`` keeps it until deleted.
            mime: The type the client declared. For an upload it is kept only if
                :data:`~sandkernel.files.mime.MIME_TYPES` lists it for the extension (otherwise the
                canonical type is stored); for a produced file it is used as
                given, else guessed from the name, then the content.

        Returns:
            The stored file's metadata, with a new id.

        Raises:
            FileRejected: the name, type, size or content is refused.
        """
        if retention_s is not None and retention_s < 0:
            raise ValueError(f"retention_s must be >= 0, not {retention_s}")
        if origin == "uploaded":
            clean = safe_name(name)
            check_extension(clean, self._allowed)  # before receiving anything
        else:
            clean = produced_name(name)
        tmp, sha256, size = self._receive(fileobj, clean, origin)
        try:
            if origin == "uploaded":
                _, canonical = check_upload(
                    clean,
                    tmp,
                    allowed=self._allowed,
                    max_bytes=self._max_bytes,
                    max_archive_bytes=self._max_archive_bytes,
                    max_archive_entries=self._max_archive_entries,
                )
                accepted = self._allowed[extension(clean)]
                mime_type = mime if mime is not None and mime in accepted else canonical
            else:
                mime_type = mime or mime_for_name(clean) or sniff_path(tmp) or OCTET_STREAM
            now = self._clock()
            record = StoredFile(
                id=f"file-{secrets.token_hex(12)}",
                name=clean,
                mime_type=mime_type,
                size_bytes=size,
                sha256=sha256,
                created_at=now,
                origin=origin,
                session_id=session_id,
                execution_count=execution_count,
                path=None if path is None else listed_file_name(path),
                agent_id=agent_id,
                expires_at=None if retention_s is None else now + retention_s,
            )
            with self._write("add") as conn:
                self._place_blob(tmp, sha256)
                conn.execute(_INSERT, record.model_dump())
        finally:
            # Gone once placed; one that cannot be removed is swept by purge_expired.
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
        return record

    def _receive(self, fileobj: Readable, name: str, origin: Origin) -> tuple[Path, str, int]:
        """Copy a stream into ``tmp/``, hashing it and enforcing the size cap of its origin.

        Only the store's own writes are mapped to its errors: the source
        failing to be read is the caller's to report.
        """
        self._ensure_open()
        # The upload cap is what clients may send: never a bound on what code writes.
        cap = self._max_bytes if origin == "uploaded" else self._max_produced_file_bytes
        with self._mapped("add"):
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="incoming-")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                while chunk := fileobj.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > cap:
                        raise self._too_large(name, origin)
                    digest.update(chunk)
                    with self._mapped("add"):
                        _write_all(fd, chunk)
                with self._mapped("add"):
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return tmp, digest.hexdigest(), size

    def _too_large(self, name: str, origin: Origin) -> FileTooLarge:
        if origin == "uploaded":
            # Named as users set it: the engine's setting, the daemon's flag.
            return FileTooLarge(
                f"upload rejected: {name!r} is larger than the "
                f"{human_size(self._max_bytes)} size cap (the store's max_bytes, "
                "set by EngineConfig.max_upload_bytes or `sandkernel serve --max-upload-mb`)"
            )
        return FileTooLarge(
            f"file rejected: {name!r} is larger than the "
            f"{human_size(self._max_produced_file_bytes)} a produced file may be "
            "(the store's max_produced_file_bytes)"
        )

    def _place_blob(self, tmp: Path, sha256: str) -> None:
        # Called with the write lock held (see _write). A blob already there is
        # replaced too: the new copy is complete and known to match its name,
        # whereas the old one may have been damaged since, and checking it would
        # mean reading it all with the lock held. Readers that have it open
        # keep reading the old file.
        blob = self._blob_for(sha256)
        _make_private_dir(blob.parent)
        os.replace(tmp, blob)
        _fsync_dir(blob.parent)

    # ----------------------------------------------------------------- reading

    def get(self, file_id: str, *, expired: bool = False) -> StoredFile:
        """The metadata of a file.

        Args:
            expired: also a file past its retention that is not purged yet (to delete it).

        Raises:
            FileNotFoundInStore: no such id, or the file has expired.
        """
        with self._read() as conn:
            record = self._row(conn, file_id)
        if record is None:
            raise FileNotFoundInStore(
                f"no file with id {file_id!r}: it was never stored here or has been deleted"
            )
        if not expired and record.expires_at is not None and record.expires_at <= self._clock():
            raise FileNotFoundInStore(
                f"file {file_id!r} expired at {record.expires_at:.0f} (unix time)"
            )
        return record

    def blob_path(self, file_id: str) -> Path:
        """Where a file's content is on disk, to copy it into a workspace.

        The file is shared by every id with the same content: copy it, never
        modify or move it.

        Raises:
            FileNotFoundInStore: no such id, expired, or its content is missing
                or damaged (not of the size stored).
        """
        return self._checked_blob(self.get(file_id))

    def _checked_blob(self, record: StoredFile) -> Path:
        """:meth:`blob_path` of a file's record."""
        file_id = record.id
        blob = self._blob_for(record.sha256)
        try:
            size = os.stat(blob).st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise self._failure(exc, "use") from None
        if size is None:
            raise FileNotFoundInStore(
                f"the content of {file_id!r} is missing from {str(blob)!r}: the store was "
                "changed by something other than sandkernel; upload the file again to restore it"
            )
        if size != record.size_bytes:
            raise FileNotFoundInStore(
                f"the stored copy of {file_id!r} at {str(blob)!r} is damaged: {size} bytes "
                f"where {record.size_bytes} were stored (changed by something other than "
                "sandkernel); upload the file again to repair it"
            )
        return blob

    def open(self, file_id: str) -> BinaryIO:
        """A binary stream of a file's content; the caller closes it.

        Read from its start to its end, the content is checked against the
        SHA-256 it was stored under: if it changed on disk since, the read
        that would return its last bytes raises instead, so that a damaged
        copy is never read whole as if it were the file (a stream that is
        sought is not checked).

        Raises:
            FileNotFoundInStore: no such id, expired, or deleted, also while
                this looked it up (its row, then its content); or its content
                is damaged (see :meth:`blob_path`), when opened or when read.
        """
        record = self.get(file_id)
        blob = self._checked_blob(record)
        try:
            raw = builtins.open(blob, "rb", buffering=0)
        except FileNotFoundError:
            self.get(file_id)  # deleted meanwhile: says so
            raise FileNotFoundInStore(
                f"the content of {file_id!r} is missing from {str(blob)!r}: the store was "
                "changed by something other than sandkernel"
            ) from None
        except OSError as exc:
            raise self._failure(exc, "use") from None
        return io.BufferedReader(_Checked(raw, record, str(blob)), CHUNK_BYTES)

    def read_bytes(self, file_id: str) -> bytes:
        """A file's whole content."""
        with self.open(file_id) as f:
            return f.read()

    def list(
        self,
        *,
        session_id: str | None = None,
        agent_id: str | None = None,
        origin: Origin | None = None,
    ) -> builtins.list[StoredFile]:
        """Files that are not expired, oldest first, filtered by every given argument."""
        query = """
            SELECT * FROM files
            WHERE (expires_at IS NULL OR expires_at > :now)
              AND (:session_id IS NULL OR session_id = :session_id)
              AND (:agent_id IS NULL OR agent_id = :agent_id)
              AND (:origin IS NULL OR origin = :origin)
            ORDER BY created_at, id
        """
        params = {
            "now": self._clock(),
            "session_id": session_id,
            "agent_id": agent_id,
            "origin": origin,
        }
        with self._read() as conn:
            rows = conn.execute(query, params).fetchall()
        return [_record(row) for row in rows]

    # ----------------------------------------------------------------- changing

    def attach(
        self, file_id: str, *, session_id: str | None = None, agent_id: str | None = None
    ) -> StoredFile:
        """Give a file to a session and/or an agent; ``None`` leaves that owner as is.

        An owner once set stays: a file another session or agent got first
        (two attaching the same upload at once) is not taken from it.

        Raises:
            FileNotFoundInStore: no such id, the file has expired, or it has
                another owner of that kind.
        """
        self.get(file_id)
        with self._write() as conn:
            changed = conn.execute(
                "UPDATE files SET session_id = coalesce(?, session_id),"
                " agent_id = coalesce(?, agent_id) WHERE id = ?"
                " AND (? IS NULL OR session_id IS NULL OR session_id = ?)"
                " AND (? IS NULL OR agent_id IS NULL OR agent_id = ?)",
                (session_id, agent_id, file_id, session_id, session_id, agent_id, agent_id),
            ).rowcount
        if not changed:
            raise FileNotFoundInStore(f"no file {file_id!r} that can be given to that owner")
        return self.get(file_id)

    def set_expiry(self, file_id: str, expires_at: float | None) -> StoredFile:
        """Set when a file expires (unix time), or keep it (``None``).

        Raises:
            FileNotFoundInStore: no such id, or the file has already expired.
        """
        self.get(file_id)
        with self._write() as conn:
            conn.execute("UPDATE files SET expires_at = ? WHERE id = ?", (expires_at, file_id))
        return self.get(file_id)

    def set_path(self, file_id: str, path: str | None) -> StoredFile:
        """Record where a file is in its session's sandbox (listed as a produced file's).

        Args:
            path: the in-sandbox path; ``None``: the file is no longer there.

        Raises:
            FileNotFoundInStore: no such id, or the file has already expired.
        """
        self.get(file_id)
        listed = None if path is None else listed_file_name(path)
        with self._write() as conn:
            conn.execute("UPDATE files SET path = ? WHERE id = ?", (listed, file_id))
        return self.get(file_id)

    def delete(self, file_id: str) -> None:
        """Delete a file; its content goes when no other id shares it.

        Raises:
            FileNotFoundInStore: no such id (an expired file can still be deleted).
        """
        with self._write() as conn:
            record = self._row(conn, file_id)
            if record is None:
                raise FileNotFoundInStore(
                    f"no file with id {file_id!r}: it was never stored here or has been deleted"
                )
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        # The row is committed away first: a crash now leaves an orphan blob,
        # which purge_expired removes, never a row without its blob. So does a
        # failure now, which therefore does not make the delete one.
        try:
            self._drop_unreferenced({record.sha256})
        except FileError as exc:
            log.warning("deleted %s, leaving its content for a later purge: %s", file_id, exc)

    def _drop_unreferenced(self, hashes: Iterable[str]) -> None:
        with self._write() as conn:
            for sha256 in hashes:
                if conn.execute("SELECT 1 FROM files WHERE sha256 = ?", (sha256,)).fetchone():
                    continue
                _unlink_logged(self._blob_for(sha256), "unreferenced blob")

    def purge_expired(self, now: float) -> int:
        """Delete files expired at ``now`` and content no file refers to.

        Also removes blobs left behind by a crash between a delete and its
        blob removal, and partial uploads in ``tmp/`` older than an hour.
        An entry that cannot be removed is logged and left: it stops no other.

        Args:
            now: Unix time.

        Returns:
            How many files were deleted.
        """
        self._ensure_open()
        self._sweep_partials(now)  # first: it needs no database, so no database error stops it
        with self._write() as conn:
            expired = conn.execute(
                "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).fetchall()
            conn.execute(
                "DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            )
        with self._write() as conn:
            referenced = {row[0] for row in conn.execute("SELECT DISTINCT sha256 FROM files")}
            with os.scandir(self._blobs) as subdirs:
                fanout = [sub.path for sub in subdirs if sub.is_dir(follow_symlinks=False)]
            for sub in fanout:
                try:
                    with os.scandir(sub) as blobs:
                        orphans = [
                            blob.path
                            for blob in blobs
                            if _HEX64.fullmatch(blob.name) and blob.name not in referenced
                        ]
                except OSError as exc:
                    log.warning("cannot list %s to remove orphan blobs: %s", sub, exc)
                    continue
                for orphan in orphans:
                    _unlink_logged(orphan, "orphan blob")
        return len(expired)

    def _sweep_partials(self, now: float) -> None:
        """Remove what ``tmp/`` has held for over an hour: adds that never finished."""
        try:
            with os.scandir(self._tmp) as entries:
                partials = builtins.list(entries)
        except OSError as exc:
            log.warning("cannot list %s to remove partial uploads: %s", self._tmp, exc)
            return
        for partial in partials:
            try:
                stale = partial.stat(follow_symlinks=False).st_mtime < now - _STALE_TEMP_S
            except FileNotFoundError:
                continue  # an add finishing meanwhile renamed its file away
            except OSError as exc:
                log.warning("cannot check partial upload %s: %s", partial.path, exc)
                continue
            if stale:
                _unlink_logged(partial.path, "partial upload")
