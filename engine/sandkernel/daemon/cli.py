"""The ``serve`` and ``mcp`` commands, and ``sandkernel run --socket``.

``sandkernel`` adds these with :func:`add_daemon_parsers` and hands the parsed
arguments to :func:`run_daemon_command`; ``python -m sandkernel.daemon`` runs
them on their own. The server and MCP libraries are imported only when a
command needs them, so the rest of the command line works without them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandkernel._cli_types import module_list, number, read_text
from sandkernel.daemon.admission import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_BYTES,
    MIN_DEFAULT_QUEUED_RUNS,
    QUEUED_RUNS_PER_WORKER,
)
from sandkernel.daemon.paths import default_records_path, default_socket_path
from sandkernel.errors import BadInput, SandkernelError
from sandkernel.limits import MAX_TIMEOUT_S, MAX_TTL_S

if TYPE_CHECKING:
    from sandkernel.api import ServedEngine
    from sandkernel.config import EngineConfig
    from sandkernel.daemon.server import DaemonConfig

#: The most a size option takes, in its own unit (MiB or KiB): 2**20 of them.
_MAX_SIZE = float(1 << 20)
#: What an upload's request body may hold beyond its file: the multipart
#: boundaries and part headers, and the form fields (a name of at most 255
#: bytes, the owner's id, the retention); far less than this.
_UPLOAD_FRAMING_BYTES = 64 << 10
_LOG_LEVELS = ("debug", "info", "warning", "error")

_MISSING_EXTRA = (
    "sandkernel {command} needs the {extra} extra: pip install 'sandkernel[{extra}]' ({exc})"
)


def _tcp_address(value: str) -> tuple[str, int]:
    """An argparse ``type``: ``[HOST:]PORT`` as (host, port), the host 127.0.0.1 by default."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT (got {value!r})") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be 0-65535 (got {value!r})")
    return host, number


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", default=None, help="policy name or TOML path (default: default)"
    )
    parser.add_argument(
        "--pool-size",
        type=number(int, above=False),
        default=2,
        help="kernels kept warm (default: 2)",
    )
    parser.add_argument(
        "--max-sessions", type=number(int), default=32, help="sessions alive at once (default: 32)"
    )
    parser.add_argument(
        "--session-ttl",
        type=number(float, maximum=MAX_TTL_S),
        default=3600.0,
        help="seconds a session lives after its last use (default: 3600)",
    )
    parser.add_argument(
        "--acquire-timeout",
        type=number(float, above=False, maximum=MAX_TIMEOUT_S),
        default=60.0,
        help="seconds a new session waits for a kernel (default: 60)",
    )
    parser.add_argument(
        "--prewarm",
        type=module_list,
        default=None,
        metavar="MODULES",
        help="comma-separated modules imported in warm kernels ('' for none; "
        "default: numpy,pandas,matplotlib.pyplot)",
    )
    parser.add_argument(
        "--batch-workers",
        type=number(int),
        default=None,
        help="sandboxed fork servers for one-shot runs (default: one per core)",
    )
    parser.add_argument("--store", help="file store folder (default: /var/lib/sandkernel/files)")
    parser.add_argument("--runtime-dir", help="kernel runtime folder (default: /run/sandkernel)")


def add_daemon_parsers(subparsers: Any) -> None:
    """Add ``serve`` and ``mcp`` to the ``sandkernel`` command's sub-parsers."""
    serve = subparsers.add_parser(
        "serve",
        help="run the daemon: the engine behind an HTTP API on a Unix socket",
        description="One engine, served over HTTP/JSON on a Unix socket (mode 0600) and "
        "optionally on TCP with a bearer token. Jupyter clients reach its kernels under /api "
        "(jupyter lab --gateway-url http://HOST:PORT --GatewayClient.auth_token TOKEN). "
        "SIGTERM stops it gracefully.",
    )
    serve.set_defaults(daemon_command="serve")
    serve.add_argument(
        "--socket", help=f"Unix socket to listen on (default: {default_socket_path()})"
    )
    serve.add_argument(
        "--tcp",
        type=_tcp_address,
        metavar="[HOST:]PORT",
        help="also listen on TCP (host default 127.0.0.1); requires a token, "
        "or --fusion-without-token",
    )
    serve.add_argument("--token", help="bearer token for TCP (default: $SANDKERNEL_TOKEN)")
    serve.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="serve a Ray cluster, one engine per node: auto, HOST:PORT or ray://HOST:PORT "
        "(needs sandkernel[ray]; --runtime-dir and --store may contain {node})",
    )
    serve.add_argument("--token-file", help="read the bearer token from this file")
    serve.add_argument(
        "--fusion-without-token",
        action="store_true",
        help="serve SandboxFusion's /run_code and /run_jupyter to loopback TCP clients "
        "without a token, as its clients expect (any local user can then run code "
        "in the sandbox); off by default",
    )
    serve.add_argument(
        "--max-upload-mb",
        type=number(float, maximum=_MAX_SIZE),
        default=None,
        # The default is named, not imported: building the parser loads no store.
        help="largest file an upload may store, in MiB; its request body may be a little "
        "larger, for the multipart framing (default: 512, the engine's max_upload_bytes)",
    )
    serve.add_argument(
        "--max-json-kb",
        type=number(float, maximum=_MAX_SIZE),
        default=1024.0,
        help="largest JSON body (default: 1024)",
    )
    serve.add_argument(
        "--max-queued-runs",
        type=number(int),
        default=None,
        metavar="N",
        help="one-shot runs (/v1/run, /v1/runs lines, /run_code, /run_jupyter) admitted and "
        "not finished; beyond, 503 with Retry-After at once (default: "
        f"{QUEUED_RUNS_PER_WORKER} per batch worker, at least {MIN_DEFAULT_QUEUED_RUNS})",
    )
    serve.add_argument(
        "--max-queued-mb",
        type=number(float, maximum=_MAX_SIZE),
        default=DEFAULT_MAX_QUEUED_BYTES / (1 << 20),
        help="request bodies those runs may hold in memory, in MiB (default: "
        f"{DEFAULT_MAX_QUEUED_BYTES >> 20})",
    )
    serve.add_argument(
        "--max-connections",
        type=number(int),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections; beyond, requests get 503 and the connection is closed "
        f"(default: {DEFAULT_MAX_CONNECTIONS})",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=number(float, above=False, maximum=MAX_TIMEOUT_S),
        default=10.0,
        help="seconds running requests get to finish on SIGTERM (default: 10)",
    )
    serve.add_argument(
        "--model-url",
        metavar="URL",
        default=None,
        help="the OpenAI-compatible chat endpoint (e.g. http://127.0.0.1:8080/v1) that runs "
        "of the Assistants API under /openai call; without it, those runs are refused",
    )
    serve.add_argument(
        "--model-key-file",
        metavar="PATH",
        default=None,
        help="a file holding the API key of --model-url",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info", type=str.lower, choices=_LOG_LEVELS,
                       help="debug, info, warning, error (default: info)")  # fmt: skip
    _add_engine_options(serve)

    mcp = subparsers.add_parser(
        "mcp",
        help="serve the sandbox as Model Context Protocol tools over stdio",
        description="MCP tools run_python, upload_file, list_files and read_file, on an "
        "embedded engine or on a running daemon (--socket).",
    )
    mcp.set_defaults(daemon_command="mcp")
    mcp.add_argument("--socket", help="use the daemon listening here instead of an embedded engine")
    mcp.add_argument(
        "--upload-dir",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a host folder whose files upload_file may read (repeatable; default: none, "
        "uploads then take base64 content only)",
    )
    mcp.add_argument("--log-level", default="warning", type=str.lower, choices=_LOG_LEVELS,
                     help="logging to stderr (default: warning)")  # fmt: skip
    _add_engine_options(mcp)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The :class:`~sandkernel.config.EngineConfig` that ``serve``'s or ``mcp``'s arguments give."""
    from sandkernel.config import DEFAULT_PREWARM, EngineConfig

    prewarm: Sequence[str] = DEFAULT_PREWARM if args.prewarm is None else args.prewarm
    settings: dict[str, Any] = {}
    file_cap = _upload_bytes(args)
    if file_cap is not None:
        # The store's cap, not only the HTTP body's: a file the body limit lets
        # through must not be refused once it has all been received.
        settings["max_upload_bytes"] = file_cap
    return EngineConfig(
        policy=args.policy,
        pool_size=args.pool_size,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
        acquire_timeout_s=args.acquire_timeout,
        prewarm_imports=tuple(prewarm),
        store_dir=args.store,
        runtime_dir=args.runtime_dir,
        batch_workers=args.batch_workers,
        **settings,
    )


def _upload_bytes(args: argparse.Namespace) -> int | None:
    """``--max-upload-mb`` in bytes; None when not given (``mcp`` has no such flag)."""
    mib: float | None = getattr(args, "max_upload_mb", None)
    return None if mib is None else int(mib * (1 << 20))


def _engine(args: argparse.Namespace, *, handle_sigterm: bool) -> ServedEngine:
    config = engine_config(args)
    if getattr(args, "ray", None) is not None:
        try:
            from sandkernel.ray.cli import make_cluster_engine
        except ImportError as exc:
            raise SystemExit(
                _MISSING_EXTRA.format(command="serve --ray", extra="ray", exc=exc)
            ) from None
        return make_cluster_engine(args.ray, config)
    from sandkernel.engine import Engine

    return Engine(config, handle_sigterm=handle_sigterm)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        return read_text(args.token_file, "--token-file").strip() or None
    return args.token or os.environ.get("SANDKERNEL_TOKEN") or None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The :class:`~sandkernel.daemon.server.DaemonConfig` that ``serve``'s arguments describe."""
    from sandkernel.daemon.server import DaemonConfig
    from sandkernel.engine import default_store_dir
    from sandkernel.files import DEFAULT_MAX_UPLOAD_BYTES

    file_cap = _upload_bytes(args) or DEFAULT_MAX_UPLOAD_BYTES
    store = Path(args.store) if args.store else default_store_dir()
    # With --ray the store may be a per-node template ({node}); the records are
    # the daemon's own and stay on its machine.
    records_store = default_store_dir() if "{node}" in str(store) else store
    return DaemonConfig(
        socket_path=Path(args.socket) if args.socket else default_socket_path(),
        records_path=default_records_path(records_store),
        tcp=args.tcp,
        token=_token(args),
        max_json_bytes=int(args.max_json_kb * 1024),
        max_upload_bytes=file_cap + _UPLOAD_FRAMING_BYTES,
        graceful_timeout_s=args.graceful_timeout,
        access_log=args.access_log,
        fusion_without_token=args.fusion_without_token,
        max_queued_runs=args.max_queued_runs,
        max_queued_bytes=int(args.max_queued_mb * 1024 * 1024),
        max_connections=args.max_connections,
        model_url=args.model_url,
        model_key_file=Path(args.model_key_file) if args.model_key_file else None,
        openai_state_path=records_store.parent / f"{records_store.name}-openai.sqlite3",
    )


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    try:
        from sandkernel.daemon.server import run_daemon
    except ImportError as exc:
        raise SystemExit(_MISSING_EXTRA.format(command="serve", extra="daemon", exc=exc)) from None
    from sandkernel.engine import default_store_dir

    config = daemon_config(args)
    _configure_logging(args.log_level)
    args.store = args.store or str(default_store_dir())
    asyncio.run(run_daemon(_engine(args, handle_sigterm=False), config))
    return 0


def _mcp(args: argparse.Namespace) -> int:
    import asyncio

    try:
        from sandkernel.daemon.mcp_server import run_mcp_server
    except ImportError as exc:
        raise SystemExit(_MISSING_EXTRA.format(command="mcp", extra="mcp", exc=exc)) from None
    _configure_logging(args.log_level)
    folders = [Path(d) for d in args.upload_dir]
    for folder in folders:
        if not folder.is_dir():
            raise BadInput(f"--upload-dir {folder}: not a folder")
    if args.socket:
        given = _engine_options_given(args)
        if given:
            raise BadInput(
                f"{', '.join(given)} would be ignored with --socket: "
                "the daemon's engine has its own settings"
            )
        asyncio.run(run_mcp_server(socket=Path(args.socket), engine=None, upload_dirs=folders))
    else:
        engine = _engine(args, handle_sigterm=True)
        asyncio.run(run_mcp_server(socket=None, engine=engine, upload_dirs=folders))
    return 0


def _engine_options_given(args: argparse.Namespace) -> list[str]:
    """The engine options set to something other than their defaults, as flags."""
    probe = argparse.ArgumentParser(add_help=False)
    _add_engine_options(probe)
    return [
        action.option_strings[0]
        for action in probe._actions
        if getattr(args, action.dest, action.default) != action.default
    ]


def run_daemon_command(args: argparse.Namespace) -> int:
    """Run ``serve`` or ``mcp`` from arguments parsed with :func:`add_daemon_parsers`."""
    if args.daemon_command == "serve":
        return _serve(args)
    if args.daemon_command == "mcp":
        return _mcp(args)
    raise ValueError(f"not a daemon command: {args.daemon_command!r}")


def run_via_daemon(
    socket: str | os.PathLike[str] | None,
    code: str,
    *,
    timeout_s: float | None,
    json_output: bool,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> int:
    """``sandkernel run --socket PATH``: one cell in a fresh session of a running daemon.

    Prints like ``sandkernel run`` does; returns 0 if the cell's status is ok, else 1.

    Raises:
        SandkernelError: the daemon refused (or cannot be reached: DaemonUnavailable).
    """
    from sandkernel._cli_output import print_execution_result
    from sandkernel.daemon.client import Client

    with Client(socket) as client:
        session = client.session()
        try:
            for path in inputs:
                session.upload(path)
            result = session.run(code, timeout_s=timeout_s)
        finally:
            with contextlib.suppress(SandkernelError):
                session.close()
    if json_output:
        print(result.model_dump_json(indent=2))
    else:
        print_execution_result(result, None)
    return 0 if result.status == "ok" else 1


def run_once_via_daemon(
    socket: str | os.PathLike[str] | None,
    code: str,
    stdin: bytes,
    files: dict[str, bytes],
    *,
    args: argparse.Namespace,
) -> int:
    """``sandkernel run --once --socket PATH``: one program on the daemon's batch path."""
    from sandkernel._cli_output import print_run_result
    from sandkernel.daemon.client import Client

    with Client(socket) as client:
        result = client.run_once(
            code, stdin=stdin, files=files, argv=args.arg or (), timeout_s=args.timeout
        )
    return print_run_result(result, json_output=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandkernel.daemon serve|mcp ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m sandkernel.daemon", description="The sandkernel daemon and MCP server."
    )
    add_daemon_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_daemon_command(args)
    except SandkernelError as exc:
        print(f"sandkernel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
