"""The baseline of ``benchmarks.fusion``: SandboxFusion's python runner, under sandkernel's sandbox.

``python -m benchmarks._fresh_sandbox_server --port N`` serves ``POST /run_code``
the way SandboxFusion's python runner does, a fresh ``python main.py``
process per request, but inside the same sandbox as sandkernel's: for each
request a new runtime folder, workspace tmpfs and cgroup (the engine's own
``SandboxHost.prepare``), an nsjail rendered from the same policy, then
everything destroyed. Request and response are sandkernel.fusion's models, so
the two servers differ only in how the program is run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import uvicorn
from fastapi import FastAPI

from sandkernel.fusion import (
    CommandRunResult,
    CommandRunStatus,
    RunCodeRequest,
    RunCodeResponse,
    RunStatus,
)
from sandkernel.policy import load_policy
from sandkernel.sandbox import (
    SandboxHost,
    default_runtime_root,
    render_config_text,
    render_nsjail_config,
)

_OUTPUT_MAX = 1 << 20


def create_app(host: SandboxHost) -> FastAPI:
    policy = load_policy("default")
    app = FastAPI()

    @app.post("/run_code")
    async def run_code(body: RunCodeRequest) -> RunCodeResponse:
        kernel_id = host.new_kernel_id()
        layout = await asyncio.to_thread(host.prepare, kernel_id, policy)
        try:
            (layout.workspace / "main.py").write_text(body.code, encoding="utf-8")
            argv = [host.runtime.python, "-s", "main.py"]
            config = render_nsjail_config(policy, layout, host.runtime, argv)
            layout.config_file.write_text(render_config_text(config))
            started = time.perf_counter()
            process = await asyncio.create_subprocess_exec(
                *host.launch_argv(layout),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=layout.root,
                start_new_session=True,
            )
            status = CommandRunStatus.Finished
            try:
                async with asyncio.timeout(body.run_timeout):
                    out, err = await process.communicate((body.stdin or "").encode())
            except TimeoutError:
                process.kill()
                out, err = await process.communicate()
                status = CommandRunStatus.TimeLimitExceeded
            elapsed = time.perf_counter() - started
        finally:
            await asyncio.to_thread(host.destroy, kernel_id)
        code = process.returncode
        result = CommandRunResult(
            status=status,
            execution_time=elapsed,
            return_code=code,
            stdout=out[:_OUTPUT_MAX].decode(errors="replace"),
            stderr=err[:_OUTPUT_MAX].decode(errors="replace"),
        )
        ok = status is CommandRunStatus.Finished and code == 0
        return RunCodeResponse(
            status=RunStatus.Success if ok else RunStatus.Failed,
            message="",
            run_result=result,
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    root = default_runtime_root().with_name(f"sandkernel-bench-fresh-{os.getpid()}")
    with SandboxHost(root) as host:
        uvicorn.run(
            create_app(host),
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            backlog=2048,
        )


if __name__ == "__main__":
    main()
