"""The daemon process: one engine, one uvicorn server, one task group.

::

    async with Engine(...) as engine:            # pool refill + reaper tasks
        async with anyio.create_task_group() as tg:
            await tg.start(Daemon(engine, config).serve)   # Unix socket (+ TCP)

:func:`run_daemon` is that, plus signals: SIGTERM or SIGINT stops accepting
connections, lets running requests finish (up to ``graceful_timeout_s``, then
cancels them, which interrupts their cells), then closes the engine, which ends
every kernel. Before that deadline (by the time a cell takes to stop when
interrupted, and a second), the OpenAI runs and responses still going end as
failed, saying the daemon stopped, so that their streams end with their final
events rather than being cut. The Unix socket is created
with mode 0600 (under a restrictive umask, then chmod, so it is never reachable
by others even for an instant) in a folder only its owner can write.

What a flood of clients can make the daemon hold is bounded: one-shot runs
and their bodies by the run admission (``max_queued_runs``,
``max_queued_bytes``; see :mod:`sandkernel.daemon.admission`), request bodies
elsewhere by the size limits, connections by ``max_connections`` (past it,
uvicorn answers every request with 503 and closes the connection), and
connections not yet accepted by the listen backlog, in the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import os
import resource
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import unquote_plus

import anyio
import anyio.abc
import uvicorn

from sandkernel.api import ServedEngine
from sandkernel.daemon.admission import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUED_BYTES
from sandkernel.daemon.app import DEFAULT_MAX_JSON_BYTES, DEFAULT_MAX_UPLOAD_BYTES, create_app
from sandkernel.daemon.errors import DaemonError
from sandkernel.daemon.records import SessionRecords
from sandkernel.daemon.routes.fusion import FUSION_PATHS

log = logging.getLogger(__name__)

#: Connections the kernel queues for the daemon to accept. uvicorn listens again
#: on the sockets it is given, with its own backlog, so both are set.
LISTEN_BACKLOG: Final = 2048
#: File descriptors the daemon needs besides its connections (engine, kernels,
#: batch workers, store): the usual soft limit, which it ran within before.
_RESERVED_FDS: Final = 1024
#: The loggers uvicorn writes request URLs to: each request's (with ``--access-log``)
#: and each WebSocket handshake's.
_URL_LOGGERS: Final = ("uvicorn.access", "uvicorn.error")


@dataclass(frozen=True)
class DaemonConfig:
    """How the daemon listens and what it accepts.

    Args:
        socket_path: the Unix socket (mode 0600).
        records_path: the SQLite file of session ids, kept across restarts.
        tcp: also listen on this ``(host, port)``; requires ``token`` unless
            ``fusion_without_token``. Port 0 picks one.
        token: the bearer token TCP requests must carry.
        fusion_without_token: serve SandboxFusion's routes (``/run_code``,
            ``/run_jupyter``, ``/v1/ping``) to loopback TCP clients without a
            token, as its clients expect; ``tcp`` must then be a loopback address.
        max_json_bytes: largest JSON request body.
        max_upload_bytes: largest upload request body.
        graceful_timeout_s: on shutdown, how long running requests may finish.
        access_log: log every request.
        max_queued_runs: one-shot runs admitted and not finished; beyond, 503
            with ``Retry-After`` at once (default: from the batch workers, see
            :func:`~sandkernel.daemon.admission.default_max_queued_runs`).
        max_queued_bytes: bytes of request bodies those runs may hold.
        max_connections: open connections; past it every request is answered
            503 and its connection closed (uvicorn's ``limit_concurrency``).
        model_url: the OpenAI-compatible chat endpoint that runs of the
            Assistants API under ``/openai`` call (``None``: those runs are
            refused, saying so).
        model_key_file: a file holding that endpoint's API key.
        openai_state_path: the SQLite file of the Assistants API's assistants,
            threads and runs (default: beside ``records_path``).
    """

    socket_path: Path
    records_path: Path
    tcp: tuple[str, int] | None = None
    token: str | None = field(default=None, repr=False)
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    graceful_timeout_s: float = 10.0
    access_log: bool = False
    fusion_without_token: bool = False
    max_queued_runs: int | None = None
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    model_url: str | None = None
    model_key_file: Path | None = None
    openai_state_path: Path | None = None

    @property
    def openai_state(self) -> Path:
        """Where the Assistants API keeps its state."""
        if self.openai_state_path is not None:
            return self.openai_state_path
        return self.records_path.with_name(self.records_path.stem + "-openai.sqlite3")

    def model_key(self) -> str | None:
        """The chat endpoint's API key, read from ``model_key_file``.

        Raises:
            DaemonError: the file cannot be read.
        """
        if self.model_key_file is None:
            return None
        try:
            return self.model_key_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise DaemonError(f"--model-key-file {self.model_key_file}: {exc}") from None

    def __post_init__(self) -> None:
        for name in ("max_queued_runs", "max_queued_bytes", "max_connections"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-").replace("-bytes", "-mb")
                raise DaemonError(f"{name} must be at least 1 (got {value}): check {flag}")
        if self.fusion_without_token:
            if self.tcp is None or not is_loopback(self.tcp[0]):
                raise DaemonError(
                    "--fusion-without-token serves unauthenticated requests to loopback "
                    "clients only: use it with --tcp on a loopback address (127.0.0.1, ::1)"
                )
        elif self.tcp is not None and not self.token:
            raise DaemonError(
                "listening on TCP needs a bearer token: pass --token, --token-file or set "
                "SANDKERNEL_TOKEN (clients then send `Authorization: Bearer <token>`)"
            )


#: What a stopping daemon leaves, past the time a cell takes to stop when it is
#: interrupted (the policy's ``interrupt_grace_s``, then it is killed), for the
#: OpenAI runs and responses it ends to save and send their final events before
#: uvicorn's grace time is up.
WIND_DOWN_MARGIN_S = 1.0


def wind_down_lead_s(interrupt_grace_s: float) -> float:
    """How long before the end of the grace time a stopping daemon ends what is in flight.

    A run or response running code ends once its cell has stopped: the
    interrupt's grace and a margin. (The daemon takes at most half its grace
    time for this: the rest is the requests' to finish.)
    """
    return interrupt_grace_s + WIND_DOWN_MARGIN_S


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        wind_down: Callable[[], Awaitable[None]] | None = None,
        *,
        lead_s: float = WIND_DOWN_MARGIN_S,
    ) -> None:
        super().__init__(config)
        self._wind_down = wind_down
        self._lead_s = lead_s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The daemon handles SIGTERM/SIGINT itself for its whole life (the engine
        # starts before uvicorn and closes after it), so uvicorn must not replace
        # those handlers nor re-raise the signal when it is done.
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown, with what is in flight ended before its deadline.

        Requests get the grace time to finish, as uvicorn gives them; a stream
        of an OpenAI run or response that would outlast it is ended by its
        frontend shortly before (its run failed, saying the daemon stopped),
        with its final events, instead of being cut.
        """
        winding = asyncio.ensure_future(self._wind_down_before_deadline())
        try:
            await super().shutdown(sockets)
        finally:
            winding.cancel()
            # Waited for without taking its cancellation for this task's own.
            await asyncio.wait({winding})

    async def _wind_down_before_deadline(self) -> None:
        grace = self.config.timeout_graceful_shutdown
        if self._wind_down is None or grace is None:  # None: uvicorn waits for them all
            return
        await asyncio.sleep(max(0.0, grace - min(self._lead_s, grace / 2)))
        try:
            await self._wind_down()
        except Exception:
            log.exception("ending the runs in flight failed; their streams are cut")


class Daemon:
    """Serves one engine (embedded or a Ray cluster) over HTTP (Unix socket, optional TCP)."""

    def __init__(self, engine: ServedEngine, config: DaemonConfig) -> None:
        self.engine = engine
        self.config = config
        self.records = SessionRecords(config.records_path)
        self.tcp_address: tuple[str, int] | None = None
        self.ready = asyncio.Event()
        self._server: _Server | None = None
        self._stop_requested = False

    def shutdown(self) -> None:
        """Stop gracefully (a second call stops without waiting for running requests)."""
        if self._stop_requested and self._server is not None:
            self._server.force_exit = True
        self._stop_requested = True
        if self._server is not None:
            self._server.should_exit = True

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until :meth:`shutdown`; reports started once the sockets accept connections."""
        config = self.config
        await anyio.to_thread.run_sync(self.records.open)
        sockets: list[socket.socket] = []
        bound_inode: int | None = None
        stack = contextlib.AsyncExitStack()
        redaction = _QueryTokenRedaction()
        for name in _URL_LOGGERS:
            logging.getLogger(name).addFilter(redaction)
        try:
            sockets.append(await anyio.to_thread.run_sync(bind_unix_socket, config.socket_path))
            bound_inode = config.socket_path.lstat().st_ino
            if config.tcp is not None:
                tcp = bind_tcp_socket(*config.tcp)
                sockets.append(tcp)
                host, port = tcp.getsockname()[:2]
                self.tcp_address = (str(host), int(port))
            app = create_app(
                self.engine,
                self.records,
                token=config.token,
                max_json_bytes=config.max_json_bytes,
                max_upload_bytes=config.max_upload_bytes,
                fusion_without_token=config.fusion_without_token,
                max_queued_runs=config.max_queued_runs,
                max_queued_bytes=config.max_queued_bytes,
            )
            # Imported here: the Assistants API's and the Jupyter gateway's modules load
            # only when a daemon serves.
            from sandkernel.openai_api import openai_gate

            gate = await stack.enter_async_context(
                openai_gate(
                    app,
                    self.engine,
                    state_path=config.openai_state,
                    model_url=config.model_url,
                    model_key=config.model_key(),
                    token=config.token,
                    max_json_bytes=config.max_json_bytes,
                    max_upload_bytes=config.max_upload_bytes,
                )
            )
            from sandkernel.jupyter_gateway import jupyter_gate

            served = await stack.enter_async_context(
                jupyter_gate(
                    gate,
                    self.engine,
                    token=config.token,
                    max_json_bytes=config.max_json_bytes,
                )
            )
            server = _Server(
                uvicorn.Config(
                    served,
                    http="auto",  # httptools when installed (faster), else h11
                    # The Jupyter gateway's kernel channels (/api/kernels/{id}/channels).
                    ws="websockets-sansio",
                    lifespan="off",
                    log_config=None,
                    access_log=config.access_log,
                    proxy_headers=False,
                    server_header=False,
                    timeout_graceful_shutdown=math.ceil(config.graceful_timeout_s),
                    # uvicorn counts the connection asking among the open ones.
                    limit_concurrency=config.max_connections + 1,
                    backlog=LISTEN_BACKLOG,
                ),
                wind_down=gate.wind_down,
                lead_s=wind_down_lead_s(self.engine.policy.interrupt_grace_s),
            )
            self._server = server
            server.should_exit = self._stop_requested
            where = f"unix:{config.socket_path}"
            if self.tcp_address is not None:
                host, port = self.tcp_address
                where += f" and http://{host}:{port} ({_tcp_access(config)})"
            log.info("sandkernel daemon listening on %s, policy %s", where, self.engine.policy.name)
            task_status.started()
            self.ready.set()
            await server.serve(sockets=sockets)
        finally:
            for name in _URL_LOGGERS:
                logging.getLogger(name).removeFilter(redaction)
            for sock in sockets:
                sock.close()
            _unlink_socket(config.socket_path, bound_inode)
            try:
                # Not in the shielded scope below: what the stack holds opened its own
                # cancel scopes, which close in the order they opened.
                await stack.aclose()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.records.finish)


def _tcp_access(config: DaemonConfig) -> str:
    """What TCP clients may do, as the startup log says it."""
    if not config.fusion_without_token:
        return "token required"
    opened = ", ".join(sorted(FUSION_PATHS))
    if config.token:
        return f"token required, except {opened} from loopback clients"
    # No token to check: the daemon's other routes refuse every TCP request.
    return f"without a token: only {opened}, to loopback clients (no token is set for the rest)"


class _QueryTokenRedaction(logging.Filter):
    """Hides the value of every ``token`` query parameter in the URLs uvicorn logs.

    The Jupyter gateway takes ``?token=`` out of the requests it serves before
    they are logged; nothing else reads it, but a client may send it to any
    path (Open WebUI's habit), and uvicorn logs the URL of each request with
    ``--access-log`` and of each WebSocket handshake always.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _redact_query_token(arg) if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


def _redact_query_token(url: str) -> str:
    """``url`` (a path and query string) with each ``token`` parameter's value hidden."""
    path, _, query = url.partition("?")
    pairs = query.split("&")
    for i, pair in enumerate(pairs):
        name, _, _ = pair.partition("=")
        if unquote_plus(name) == "token":
            pairs[i] = f"{name}=[redacted]"
    return f"{path}?{'&'.join(pairs)}"


def bind_unix_socket(path: Path, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, in a folder only its owner can write.

    Raises:
        DaemonError: another daemon listens there, or the path or folder is unsafe.
    """
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = parent.stat()
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise DaemonError(
            f"{parent} must belong to uid {os.geteuid()} and be writable by it alone "
            f"(it is mode {stat.filemode(info.st_mode)}, uid {info.st_uid}): "
            "choose another --socket or fix the folder"
        )
    with contextlib.suppress(FileNotFoundError):
        existing = path.lstat()
        if not stat.S_ISSOCK(existing.st_mode):
            raise DaemonError(f"{path} exists and is not a socket; remove it or choose --socket")
        if _socket_answers(path):
            raise DaemonError(f"a daemon already listens at {path}; stop it or choose --socket")
        path.unlink()  # left by a daemon that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask first, so the socket file never exists with a wider mode; chmod
        # after, so the mode does not depend on the umask the process had.
        previous = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _unlink_socket(path: Path, inode: int | None) -> None:
    # Only the file this daemon bound: never one a newer daemon put there since.
    if inode is None:
        return
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is a loopback address."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_tcp_socket(host: str, port: int, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening TCP socket; warns when the address is not loopback (plain HTTP).

    Raises:
        DaemonError: the address is taken or cannot be listened on.
    """
    if not is_loopback(host):
        log.warning(
            "listening on %s:%d, which is not a loopback address: requests and the token "
            "travel unencrypted; put a TLS proxy in front",
            host,
            port,
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise DaemonError(
                f"cannot listen on {address}: the address is already in use; choose another "
                "port with --tcp, or stop what holds it (`ss -ltnp` shows what)"
            ) from None
        raise DaemonError(
            f"cannot listen on {address}: {exc.strerror or exc}; check --tcp"
        ) from None
    # Accepted connections inherit it. Without it, a response written in two
    # parts (headers, then body) waits for the client's delayed ACK: ~40 ms
    # on every request of a kept-alive connection after its first.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` so ``connections`` fit; returns the limit.

    Only ever raised, and only up to the hard limit: past that, a warning
    names the fix. (Without it, a daemon under the usual soft limit of 1024
    fails to accept the 1000th connection, whatever ``max_connections`` says.)
    """
    needed = connections + _RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if ceiling > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        if soft < needed:
            log.warning(
                "the open files limit is %d (hard limit %d): about %d connections fit, not "
                "the %d of --max-connections; raise it (ulimit -n, or LimitNOFILE= in a "
                "systemd unit) or lower --max-connections",
                soft,
                hard,
                max(0, soft - _RESERVED_FDS),
                connections,
            )
    return soft


async def run_daemon(engine: ServedEngine, config: DaemonConfig) -> None:
    """Start ``engine``, serve it until SIGTERM or SIGINT, then close everything.

    The engine must not be started yet and should be created with
    ``handle_sigterm=False``: the daemon owns the signals. The process's open
    files limit is raised to fit ``config.max_connections``.
    """
    raise_open_files_limit(config.max_connections)
    daemon = Daemon(engine, config)
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, daemon.shutdown)
    try:
        async with engine, anyio.create_task_group() as tasks:
            await tasks.start(daemon.serve)
        log.info("sandkernel daemon stopped; every kernel ended")
    except BaseExceptionGroup as group:
        # One failing task (a socket that cannot be bound...): raise its own error,
        # which says what to fix, rather than the group around it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
