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

from sandkernel.errors import SandkernelError
from sandkernel.policy import load_policy, shipped_policy_names
from sandkernel.results import ExecutionResult


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
    if result.error is not None:
        print(result.error.traceback, file=sys.stderr)
    if result.status != "ok" or result.message:
        detail = result.message or (
            f"{result.error.name}: {result.error.value}" if result.error else ""
        )
        print(f"[{result.status}] {detail}".rstrip(), file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    from sandkernel.kernel import SandboxedKernel
    from sandkernel.sandbox import SandboxHost

    code = _read_code(args)
    policy = load_policy(args.policy)
    workspace = Path(args.workspace) if args.workspace else None
    with SandboxHost() as host:
        kernel = SandboxedKernel(host, policy, workspace=workspace)
        try:
            await kernel.start()
            result = await kernel.execute(code, timeout_s=args.timeout)
        finally:
            await kernel.shutdown()
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        _print_human(result, workspace)
    return 0 if result.status == "ok" else 1


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

    doctor = sub.add_parser("doctor", help="check that this machine can sandbox kernels")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--python", help="runtime Python to check (default: this one)")

    demo = sub.add_parser("demo", help="a short tour: analysis, chart, state, escapes tried")
    demo.add_argument("--out", default="demo-output", help="folder for the charts")

    policy = sub.add_parser("policy", help="list policies or show one's nsjail config")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    policy_sub.add_parser("list", help="the shipped policies")
    show = policy_sub.add_parser("show", help="print the nsjail config a policy renders to")
    show.add_argument("name", help="policy name or TOML path")
    show.add_argument("--python", help="runtime Python (default: this one)")

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "doctor":
            from sandkernel.doctor import run_doctor

            return run_doctor(as_json=args.json, python=args.python)
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
