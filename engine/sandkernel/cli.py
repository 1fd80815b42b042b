"""The ``sandkernel`` command: run code in the sandbox, check the machine, show policies."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sandkernel._attacks import add_attack_option
from sandkernel._solve_cli import add_solve_parser, run_solve
from sandkernel.daemon.cli import (
    add_daemon_parsers,
    run_daemon_command,
    run_once_via_daemon,
    run_via_daemon,
)
from sandkernel.errors import SandkernelError
from sandkernel.evaluate.cli import add_eval_parser, run_eval
from sandkernel.policy import load_policy, shipped_policy_names
from sandkernel.results import ExecutionResult

if TYPE_CHECKING:
    from sandkernel.batch import RunResult

#: Exit status of `sandkernel run --once` for a run that did not exit by itself,
#: as coreutils' `timeout` and a shell report them.
_ONCE_EXIT = {"timeout": 124, "oom": 137, "killed": 137}


def _read_code(args: argparse.Namespace) -> str:
    if args.file is not None:
        return Path(args.file).read_text(encoding="utf-8")
    if args.code is not None and args.code != "-":
        return str(args.code)
    if args.code == "-" or not sys.stdin.isatty():
        return sys.stdin.read()
    raise SystemExit("sandkernel run: give code as an argument, --file FILE, or on stdin")


def _print_human(result: ExecutionResult, save_dir: Path | None) -> None:
    if result.stdout:
        sys.stdout.write(result.stdout if result.stdout.endswith("\n") else result.stdout + "\n")
    if result.stderr:
        sys.stderr.write(result.stderr if result.stderr.endswith("\n") else result.stderr + "\n")
    if result.value is not None and result.text is not None:
        print(f"Out[{result.execution_count}]: {result.text}")
    for n, display in enumerate(result.displays, 1):
        if "image/png" in display.data and save_dir is not None:
            path = save_dir / f"display-{result.execution_count or 0}-{n}.png"
            path.write_bytes(base64.b64decode(display.data["image/png"]))
            print(f"[display {n}: image/png saved to {path}]")
        else:
            kinds = ", ".join(sorted(display.data))
            print(f"[display {n}: {kinds}]")
    for f in result.files:
        where = f.path or "(displayed)"
        print(f"[file] {where}  {f.mime_type}, {f.size_bytes} bytes  id={f.id}")
    if result.files_truncated:
        print(f"[files left out: {result.files_note}]", file=sys.stderr)
    if result.error is not None:
        print(result.error.traceback, file=sys.stderr)
    if result.status != "ok" or result.message:
        detail = result.message or (
            f"{result.error.name}: {result.error.value}" if result.error else ""
        )
        print(f"[{result.status}] {detail}".rstrip(), file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    from sandkernel.engine import Engine

    code = _read_code(args)
    workspace = Path(args.workspace) if args.workspace else None
    engine = Engine(
        policy=load_policy(args.policy),
        pool_size=0,
        prewarm_imports=(),
        store_dir=args.store,
        handle_sigterm=False,
    )
    async with engine:
        session = await engine.session(workspace=workspace)
        for path in args.input or ():
            await session.upload(path)
        result = await session.run(code, timeout_s=args.timeout)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        _print_human(result, workspace)
    return 0 if result.status == "ok" else 1


def _once_inputs(args: argparse.Namespace) -> tuple[str, bytes, dict[str, bytes]]:
    """``run --once``: the program, its stdin (ours, unless a terminal) and its files."""
    if args.file is None and (args.code is None or args.code == "-"):
        raise SystemExit(
            "sandkernel run --once: give the program as an argument or --file FILE "
            "(standard input is the program's)"
        )
    code = _read_code(args)
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    files = {Path(path).name: Path(path).read_bytes() for path in args.input or ()}
    return code, stdin, files


def print_run_result(result: RunResult, *, json_output: bool) -> int:
    """Print a one-shot run as ``python file.py`` would have; its exit status."""
    if json_output:
        print(result.model_dump_json(indent=2))
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.stdout_truncated or result.stderr_truncated:
            print("[output truncated]", file=sys.stderr)
        if result.status in _ONCE_EXIT:
            print(f"[{result.status}] {result.message or ''}".rstrip(), file=sys.stderr)
    if result.status in _ONCE_EXIT:
        return _ONCE_EXIT[result.status]
    return result.return_code if result.return_code is not None and result.return_code >= 0 else 1


async def _run_once(args: argparse.Namespace) -> int:
    from sandkernel.engine import Engine

    code, stdin, files = _once_inputs(args)
    engine = Engine(
        policy=load_policy(args.policy),
        pool_size=0,
        batch_workers=1,
        prewarm_imports=(),
        store_dir=args.store,
        handle_sigterm=False,
    )
    async with engine:
        result = await engine.run_once(
            code, stdin=stdin, files=files, argv=args.arg or (), timeout_s=args.timeout
        )
    return print_run_result(result, json_output=args.json)


def _files(args: argparse.Namespace) -> int:
    from sandkernel.engine import default_store_dir
    from sandkernel.files import FileStore

    store = FileStore(Path(args.store) if args.store else default_store_dir())
    try:
        if args.files_command == "list":
            for f in store.list(session_id=args.session):
                where = f"session {f.session_id}" if f.session_id else f"agent {f.agent_id}"
                print(
                    f"{f.id}  {f.size_bytes:>10}  {f.mime_type:40} {f.name}  ({f.origin}, {where})"
                )
        elif args.files_command == "info":
            print(store.get(args.id).model_dump_json(indent=2))
        elif args.files_command == "get":
            stored = store.get(args.id)
            target = Path(args.output) if args.output else Path(stored.name)
            if target.is_dir():
                target = target / stored.name
            with store.open(stored.id) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            print(f"{stored.id} -> {target} ({stored.size_bytes} bytes, {stored.mime_type})")
    finally:
        store.close()
    return 0


def _cmd_policy(args: argparse.Namespace) -> int:
    from sandkernel.sandbox import (
        KernelLayout,
        Runtime,
        default_runtime_root,
        render_config_text,
        render_nsjail_config,
    )

    if args.policy_command == "list":
        for name in shipped_policy_names():
            print(f"{name:12} {load_policy(name).description}")
        return 0
    policy = load_policy(args.name)
    runtime = Runtime.detect(args.python)
    layout = KernelLayout("<kernel-id>", default_runtime_root() / "<kernel-id>")
    argv = [runtime.python, "/opt/sandkernel/launch.py", "-f", "/run/sandkernel/kernel.json"]
    print(f"# policy {policy.name}: {policy.description}")
    for key, value in policy.model_dump(exclude={"name", "description", "seccomp_deny"}).items():
        print(f"#   {key} = {json.dumps(value)}")
    print("# nsjail config rendered for this machine:")
    print(render_config_text(render_nsjail_config(policy, layout, runtime, argv)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sandkernel`` command."""
    parser = argparse.ArgumentParser(
        prog="sandkernel", description="Run model-written Python in sandboxed Jupyter kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run code in a fresh sandboxed kernel")
    run.add_argument("code", nargs="?", help="Python code; '-' or omitted reads stdin")
    run.add_argument("-f", "--file", help="read the code from this file")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--policy", default=None, help="policy name or TOML path (default: default)")
    run.add_argument("--timeout", type=float, default=None, help="wall timeout in seconds")
    run.add_argument("--workspace", help="host folder used as /mnt/data (kept afterwards)")
    run.add_argument("-i", "--input", action="append", help="upload this file to /mnt/data first")
    run.add_argument("--store", help="file store folder (default: /var/lib/sandkernel/files)")
    run.add_argument("--socket", help="run in the daemon listening on this Unix socket")
    run.add_argument(
        "--once",
        action="store_true",
        help="run as a program (`python main.py`) on the batch path: stdin is the program's, "
        "the exit status is its own; nothing is kept",
    )
    run.add_argument(
        "--arg", action="append", metavar="ARG", help="with --once: append ARG to sys.argv"
    )

    files = sub.add_parser("files", help="list stored files and download them by id")
    files.add_argument("--store", help="file store folder (default: /var/lib/sandkernel/files)")
    files_sub = files.add_subparsers(dest="files_command", required=True)
    files_list = files_sub.add_parser("list", help="stored files")
    files_list.add_argument("--session", help="only this session's")
    files_info = files_sub.add_parser("info", help="a file's metadata as JSON")
    files_info.add_argument("id")
    files_get = files_sub.add_parser("get", help="download a file by id")
    files_get.add_argument("id")
    files_get.add_argument("-o", "--output", help="file or folder to write (default: its name)")

    doctor = sub.add_parser("doctor", help="check that this machine can sandbox kernels")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--python", help="runtime Python to check (default: this one)")
    add_attack_option(doctor)
    doctor.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run the checks on every node of this Ray cluster (default: auto)",
    )

    demo = sub.add_parser("demo", help="a short tour: analysis, chart, state, escapes tried")
    demo.add_argument("--out", default="demo-output", help="folder for the charts")

    add_solve_parser(sub)
    add_daemon_parsers(sub)
    add_eval_parser(sub)

    policy = sub.add_parser("policy", help="list policies or show one's nsjail config")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_sub.add_parser("list", help="the shipped policies")
    show = policy_sub.add_parser("show", help="print the nsjail config a policy renders to")
    show.add_argument("name", help="policy name or TOML path")
    show.add_argument("--python", help="runtime Python (default: this one)")

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            if args.arg and not args.once:
                parser.error("--arg needs --once")
            if args.once:
                if args.workspace:
                    parser.error("--workspace is for sessions; --once runs in a fresh folder")
                if args.socket:
                    if args.policy or args.store:
                        parser.error("--policy and --store are the daemon's with --socket")
                    return run_once_via_daemon(args.socket, *_once_inputs(args), args=args)
                return asyncio.run(_run_once(args))
            if args.socket:
                if args.policy or args.workspace or args.store:
                    parser.error("--policy, --workspace and --store are the daemon's with --socket")
                return run_via_daemon(
                    args.socket, _read_code(args), timeout_s=args.timeout,
                    json_output=args.json, inputs=args.input or (),
                )  # fmt: skip
            return asyncio.run(_run(args))
        if args.command == "eval":
            return run_eval(args)
        if args.command in ("serve", "mcp"):
            return run_daemon_command(args)
        if args.command == "solve":
            return run_solve(args)
        if args.command == "files":
            return _files(args)
        if args.command == "doctor":
            from sandkernel.doctor import run_doctor

            return run_doctor(
                as_json=args.json, python=args.python, attack=args.attack, ray=args.ray
            )
        if args.command == "policy":
            return _cmd_policy(args)
        if args.command == "demo":
            from sandkernel._demo import run_demo

            return run_demo(Path(args.out))
    except SandkernelError as exc:
        print(f"sandkernel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; silence the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
