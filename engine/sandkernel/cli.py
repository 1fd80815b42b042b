"""The ``sandkernel`` command: run code in the sandbox, check the machine, show policies.

Building the parser imports only the standard library and each command's
parser setup; a command imports the engine, pydantic, jupyter_client or
asyncio when it runs, so ``sandkernel --help`` (and a command that needs
none of them) starts about as fast as Python itself. ``tests/test_startup.py``
keeps it that way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sandkernel._cli_types import number, read_input, read_text
from sandkernel.errors import BadInput, FileRejected, SandkernelError
from sandkernel.limits import MAX_TIMEOUT_S

#: The ``sandkernel`` parser's set of commands.
type _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _no_stdin() -> bool:
    """Whether our standard input gives no code: a terminal, or none at all."""
    return sys.stdin is None or sys.stdin.isatty()


def _read_code(args: argparse.Namespace) -> str:
    """The code to run: CODE, ``--file`` or our stdin (:func:`_check_run_options` saw one)."""
    if args.file is not None:
        return read_text(args.file, "--file")
    if args.code is not None and args.code != "-":
        return str(args.code)
    return sys.stdin.read()


async def _run(args: argparse.Namespace, code: str) -> int:
    from sandkernel._cli_output import print_execution_result
    from sandkernel.config import EngineConfig
    from sandkernel.engine import Engine
    from sandkernel.policy import load_policy

    workspace = Path(args.workspace) if args.workspace else None
    # One kernel, started once: a zygote would be one more interpreter start, not one fewer.
    config = EngineConfig(
        policy=load_policy(args.policy),
        pool_size=0,
        prewarm_imports=(),
        store_dir=args.store or None,  # '' is the default, as for `files` and `serve`
        zygote=False,
    )
    engine = Engine(config, handle_sigterm=False)
    async with engine:
        session = await engine.session(workspace=workspace)
        for path in args.input or ():
            await session.upload(path)
        result = await session.run(code, timeout_s=args.timeout)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print_execution_result(result, workspace)
    return 0 if result.status == "ok" else 1


def _once_inputs(args: argparse.Namespace) -> tuple[str, bytes, dict[str, bytes]]:
    """``run --once``: the program, its stdin (ours, unless a terminal) and its files.

    With ``-`` the program is read from our stdin and its own is empty, as for ``python -``.
    """
    code = _read_code(args)
    reads_ours = args.code == "-" or _no_stdin()
    stdin = b"" if reads_ours else sys.stdin.buffer.read()
    files = {Path(path).name: read_input(path, "--input") for path in args.input or ()}
    return code, stdin, files


async def _run_once(
    args: argparse.Namespace, code: str, stdin: bytes, files: dict[str, bytes]
) -> int:
    from sandkernel._cli_output import print_run_result
    from sandkernel.config import EngineConfig
    from sandkernel.engine import Engine
    from sandkernel.policy import load_policy

    config = EngineConfig(
        policy=load_policy(args.policy),
        pool_size=0,
        batch_workers=1,
        prewarm_imports=(),
    )
    engine = Engine(config, handle_sigterm=False)
    async with engine:
        result = await engine.run_once(
            code, stdin=stdin, files=files, argv=args.arg or (), timeout_s=args.timeout
        )
    return print_run_result(result, json_output=args.json)


def _plain_name(name: str) -> bool:
    """Whether a stored file's name is one an upload could have: one printable component."""
    from sandkernel.files import safe_name

    try:
        return safe_name(name) == name
    except FileRejected:
        return False


def _files(args: argparse.Namespace) -> int:
    from sandkernel.engine import default_store_dir
    from sandkernel.files import FileStore

    root = Path(args.store) if args.store else default_store_dir()
    if not (root / "files.sqlite3").is_file():
        # Reading a store that is not there (a folder that holds none): said so,
        # and none made by looking.
        raise BadInput(f"no file store at {root}: give --store, or run something that stores files")
    store = FileStore(root)
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
            # A name the file came with (code in a sandbox chose it) never
            # replaces a file already there, as `curl -OJ` does; -o FILE does.
            named_by_file = args.output is None or target.is_dir()
            if target.is_dir():
                target = target / stored.name
            if named_by_file and not _plain_name(stored.name):
                raise BadInput(f"{stored.name!r} is not a plain file name: give -o FILE")
            with store.open(stored.id) as src:  # first: a file that cannot be read makes none
                try:
                    dst = open(target, "xb" if named_by_file else "wb")  # noqa: SIM115
                except FileExistsError:
                    raise BadInput(
                        f"{target} already exists: give -o {target} to replace it"
                    ) from None
                except OSError as exc:
                    raise BadInput(f"cannot write {target}: {exc.strerror or exc}") from None
                written = os.fstat(dst.fileno())
                try:
                    with dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                except BaseException:
                    # Its stored copy found damaged at its end, a full disk...:
                    # no partial file is left as if it were the file. Only the
                    # regular file written, never what a link or a device
                    # named by -o is.
                    from sandkernel.files._common import remove_if_same_file

                    remove_if_same_file(target, written)
                    raise
            print(f"{stored.id} -> {target} ({stored.size_bytes} bytes, {stored.mime_type})")
    finally:
        store.close()
    return 0


def _cmd_policy(args: argparse.Namespace) -> int:
    import json

    from sandkernel.policy import load_policy, shipped_policy_names
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


#: The exit statuses of ``sandkernel run``, as its ``--help`` gives them.
_RUN_EXIT_STATUS = (
    "exit status: 0 when the code ran without an error, 1 when it did not (an exception, "
    "a timeout, out of memory), 2 when it could not run (options or input that cannot be "
    "used, a sandbox that cannot start). With --once, the program's own exit "
    "status; 124 when it timed out (as coreutils' timeout), 137 when it was killed for "
    "using too much memory, 128+N when killed by signal N. Stopped by SIGTERM or SIGHUP, "
    "it removes its sandbox first and exits 128+N."
)


def _add_run_parser(sub: _SubParsers) -> None:
    run = sub.add_parser(
        "run", help="run code in a fresh sandboxed kernel", epilog=_RUN_EXIT_STATUS
    )
    run.add_argument(
        "code",
        nargs="?",
        help="Python code; '-' reads stdin, and so does omitting it (not with --once, "
        "where stdin is the program's)",
    )
    run.add_argument("-f", "--file", help="read the code from this file (not with CODE)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--policy", default=None, help="policy name or TOML path (default: default)")
    run.add_argument(
        "--timeout",
        type=number(float, maximum=MAX_TIMEOUT_S),
        default=None,
        help="wall timeout in seconds",
    )
    run.add_argument(
        "--workspace",
        help="host folder used as /mnt/data, kept afterwards: a new or empty one, or one a "
        "sandbox used before (it becomes the sandbox's; its size is not capped)",
    )
    run.add_argument("-i", "--input", action="append", help="upload this file to /mnt/data first")
    run.add_argument(
        "--store", help="file store folder (default: /var/lib/sandkernel/files; not with --once)"
    )
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


def _add_files_parser(sub: _SubParsers) -> None:
    store_help = "file store folder (default: /var/lib/sandkernel/files)"
    files = sub.add_parser("files", help="list stored files and download them by id")
    files.add_argument("--store", help=store_help)
    # --store after the sub-command too (`files list --store X`). Suppressed
    # default: a sub-command's own default would replace a --store given before it.
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    files_sub = files.add_subparsers(dest="files_command", required=True)
    files_list = files_sub.add_parser("list", parents=[store], help="stored files")
    files_list.add_argument("--session", help="only this session's")
    files_info = files_sub.add_parser("info", parents=[store], help="a file's metadata as JSON")
    files_info.add_argument("id")
    files_get = files_sub.add_parser("get", parents=[store], help="download a file by id")
    files_get.add_argument("id")
    files_get.add_argument("-o", "--output", help="file or folder to write (default: its name)")


def _add_doctor_parser(sub: _SubParsers) -> None:
    doctor = sub.add_parser("doctor", help="check that this machine can sandbox kernels")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--python", help="runtime Python to check (default: this one)")
    doctor.add_argument("--policy", help="policy name or TOML path to check (default: default)")
    doctor.add_argument(
        "--model-url", help="also check that this OpenAI-compatible chat endpoint answers"
    )
    doctor.add_argument("--model-key-file", type=Path, help="the endpoint's API key, in a file")
    # The catalogue itself (sandkernel._attacks) is imported only when it runs.
    doctor.add_argument(
        "--attack",
        action="store_true",
        help="also run a quick subset of the attack catalogue and say which held",
    )
    doctor.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run the checks on every node of this Ray cluster (default: auto)",
    )


def _add_demo_parser(sub: _SubParsers) -> None:
    demo = sub.add_parser("demo", help="a short tour: analysis, chart, state, escapes tried")
    demo.add_argument("--out", default="demo-output", help="folder for the charts")


def _add_solve_parser(sub: _SubParsers) -> None:
    from sandkernel._solve_cli import add_solve_parser

    add_solve_parser(sub)


def _add_daemon_parsers(sub: _SubParsers) -> None:
    from sandkernel.daemon.cli import add_daemon_parsers

    add_daemon_parsers(sub)


def _add_eval_parser(sub: _SubParsers) -> None:
    from sandkernel.evaluate.cli import add_eval_parser

    add_eval_parser(sub)


def _add_policy_parser(sub: _SubParsers) -> None:
    policy = sub.add_parser("policy", help="list policies or show one's nsjail config")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_sub.add_parser("list", help="the shipped policies")
    show = policy_sub.add_parser("show", help="print the nsjail config a policy renders to")
    show.add_argument("name", help="policy name or TOML path")
    show.add_argument("--python", help="runtime Python (default: this one)")


#: Each command's parser set-up and the commands it adds, in the order of ``--help``.
_COMMANDS: tuple[tuple[tuple[str, ...], Callable[[_SubParsers], None]], ...] = (
    (("run",), _add_run_parser),
    (("files",), _add_files_parser),
    (("doctor",), _add_doctor_parser),
    (("demo",), _add_demo_parser),
    (("solve",), _add_solve_parser),
    (("serve", "mcp"), _add_daemon_parsers),
    (("eval",), _add_eval_parser),
    (("policy",), _add_policy_parser),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``sandkernel`` command's parser (cheap: no engine import).

    Args:
        command: the command about to run (the first argument). If it names
            one, only its parser is built: a command then pays for its own
            options' set-up and imports, not every other command's. Anything
            else (``--help``, a typo) gets every command, so that usage and
            errors list them all.
    """
    parser = argparse.ArgumentParser(
        prog="sandkernel", description="Run model-written Python in sandboxed Jupyter kernels."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = [add for names, add in _COMMANDS if command in names]
    for add in chosen or [add for _, add in _COMMANDS]:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sandkernel`` command."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(arguments[0] if arguments else None)
    args = parser.parse_args(arguments)
    try:
        return _dispatch(parser, args)
    except SandkernelError as exc:
        print(f"sandkernel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; silence the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if argv is None:
            _skip_final_collection()


def _skip_final_collection() -> None:
    """Spare the exiting ``sandkernel`` process the collection of what its command left.

    At exit Python collects and frees every cyclic structure still alive: for
    a command that loaded pydantic's validators and asyncio (``eval``, ``run``)
    that takes longer than starting Python (about 30 ms). The command is done
    and its engine closed, so nothing left needs finalising: moving the
    objects out of the collector's reach lets the process end at once. Only
    for the program itself (``argv`` from the command line), never for a
    caller that runs :func:`main` in its own process.
    """
    import gc

    gc.freeze()


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the parsed command, importing only what that command needs."""
    if args.command == "run":
        return _cmd_run(parser, args)
    if args.command == "eval":
        from sandkernel.evaluate.cli import run_eval

        return run_eval(args)
    if args.command in ("serve", "mcp"):
        from sandkernel.daemon.cli import run_daemon_command

        return run_daemon_command(args)
    if args.command == "solve":
        from sandkernel._solve_cli import run_solve

        return run_solve(args)
    if args.command == "files":
        return _files(args)
    if args.command == "doctor":
        return _cmd_doctor(args)
    if args.command == "policy":
        return _cmd_policy(args)
    if args.command == "demo":
        from sandkernel._demo import run_demo

        return run_demo(Path(args.out))
    parser.error(f"unknown command {args.command}")
    return 2


def _cmd_doctor(args: argparse.Namespace) -> int:
    if args.ray is None:
        from sandkernel.doctor import run_doctor

        key = (
            read_text(args.model_key_file, "--model-key-file").strip()
            if args.model_key_file
            else None
        )
        if args.attack and args.policy:
            # The attack catalogue tries the default policy's sandbox, whichever is checked.
            print(
                "sandkernel doctor: --attack: tries the default policy, not with --policy",
                file=sys.stderr,
            )
            return 2
        return run_doctor(
            as_json=args.json,
            python=args.python,
            attack=args.attack,
            model_url=args.model_url,
            model_key=key,
            policy=args.policy,
        )
    local_only = [
        option
        for option, given in (
            ("--attack", args.attack),
            ("--policy", args.policy),
            ("--model-url", args.model_url),
            ("--model-key-file", args.model_key_file),
        )
        if given
    ]
    if local_only:
        print(
            f"sandkernel doctor: {', '.join(local_only)}: for this machine only, not with --ray",
            file=sys.stderr,
        )
        return 2
    # The cluster's doctor runs the local one on each node (ray.cli imports doctor).
    from sandkernel.ray.cli import doctor_ray

    return doctor_ray(args.ray, as_json=args.json, python=args.python)


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one command: its errors print that command's usage, not ``sandkernel``'s."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = commands.choices[command]
    return found


def _refuse_with(
    run: argparse.ArgumentParser, args: argparse.Namespace, mode: str, why: str, *options: str
) -> None:
    """Refuse (exit 2, ``run``'s usage) the ``options`` given with ``mode``, saying why."""
    given = [o for o in options if getattr(args, o.removeprefix("--"))]
    if given:
        run.error(f"argument {', '.join(given)}: not allowed with {mode} ({why})")


def _names_a_script(code: str) -> bool:
    """Whether CODE is the path of an existing file (a script's name, or with a folder)."""
    if not (code.endswith(".py") or os.sep in code) or "\n" in code:
        return False
    try:
        return os.path.isfile(code)
    except (OSError, ValueError):  # a NUL byte, a name too long
        return False


def _check_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the options of ``run`` that cannot go together, before anything starts."""
    run = _command_parser(parser, "run")
    if args.file is not None and args.code is not None:
        run.error("argument -f/--file: not allowed with CODE (give the code one way)")
    if args.code is not None and _names_a_script(args.code):
        # `sandkernel run script.py`, as one runs `python script.py`: as code it
        # would only fail with a NameError from inside the sandbox.
        import shlex

        run.error(
            f"CODE is Python source, and {args.code!r} is a file: run it with "
            f"--file {shlex.quote(args.code)}"
        )
    if args.arg and not args.once:
        run.error("argument --arg: needs --once (it appends to the program's sys.argv)")
    if args.once and args.file is None and args.code is None:
        run.error(
            "--once: give the program as an argument, '-' (read from stdin) or --file FILE "
            "(standard input is the program's)"
        )
    if args.file is None and args.code is None and _no_stdin():
        run.error("give code as an argument, --file FILE, or on stdin")
    if args.once:
        why = "a program runs in a fresh folder and keeps no files"
        _refuse_with(run, args, "--once", why, "--workspace", "--store")
    if args.socket:
        why = "the daemon's are used"
        _refuse_with(run, args, "--socket", why, "--policy", "--workspace", "--store")


def _cmd_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import asyncio

    from sandkernel._signals import Stopped, stoppable
    from sandkernel.daemon.cli import run_once_via_daemon, run_via_daemon

    _check_run_options(parser, args)
    # Read before anything starts: a signal meanwhile ends the command at once,
    # with nothing to clean up, rather than wait for the end of our stdin.
    if args.once:
        inputs = _once_inputs(args)
        if args.socket:
            return run_once_via_daemon(args.socket, *inputs, args=args)
        running = _run_once(args, *inputs)
    else:
        code = _read_code(args)
        if args.socket:
            return run_via_daemon(
                args.socket, code, timeout_s=args.timeout,
                json_output=args.json, inputs=args.input or (),
            )  # fmt: skip
        if args.workspace:
            # Resolved: a link the user gave is theirs to follow (never one inside it).
            args.workspace = str(Path(args.workspace).resolve())
        running = _run(args, code)
    try:
        return asyncio.run(stoppable(running))
    except Stopped as stopped:
        return stopped.report("run", "its sandbox is removed")


if __name__ == "__main__":
    raise SystemExit(main())
