"""``sandkernel mcp`` driven by the official MCP client over stdio."""

from __future__ import annotations

import base64
import json
import signal
import sys
from pathlib import Path
from typing import cast

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ImageContent, TextContent

from sandkernel.api import EngineAPI
from sandkernel.daemon.mcp_server import SandboxTools
from sandkernel.engine import Engine
from sandkernel.errors import SessionLost
from tests.conftest import runtime_root
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


def text_of(result: CallToolResult) -> str:
    assert not result.is_error, result.content
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def _drive(
    params: StdioServerParameters,
    errlog: Path,
    csv_path: Path,
    other_file: str | None = None,
    other_session: str | None = None,
) -> None:
    """Drive every tool; ``csv_path``'s folder is the server's upload folder.

    ``other_file``: the id of a file of a session the model never used;
    ``other_session``: the id of another client's session, where ``secret`` is set.
    """
    csv_text = csv_path.read_text()  # noqa: ASYNC240 - a small test file
    outside = csv_path.parent.parent / "outside.txt"
    outside.write_text("not for the model\n")  # noqa: ASYNC240 - a small test file
    (csv_path.parent / "link.txt").symlink_to(outside)
    with errlog.open("w") as err:
        async with stdio_client(params, errlog=err) as (read, write):
            async with ClientSession(read, write) as mcp:
                await mcp.initialize()
                tools = {t.name for t in (await mcp.list_tools()).tools}
                assert tools == {"run_python", "upload_file", "list_files", "read_file"}

                first = await mcp.call_tool("run_python", {"code": "x = 6 * 7\nprint(x)"})
                assert "42" in text_of(first)
                second = await mcp.call_tool("run_python", {"code": "x + 1"})
                assert "43" in text_of(second)  # the default session keeps state

                up = json.loads(
                    text_of(await mcp.call_tool("upload_file", {"path": str(csv_path)}))
                )
                assert up["sandbox_path"] == "/mnt/data/points.csv"
                # Host files outside the upload folder stay out of reach, links included.
                for path in (str(outside), str(csv_path.parent / "link.txt"), "/etc/passwd"):
                    refused = await mcp.call_tool("upload_file", {"path": path, "name": "x.txt"})
                    assert refused.is_error and "not under an upload folder" in str(refused.content)
                encoded = base64.b64encode(b"hello from base64\n").decode()
                await mcp.call_tool(
                    "upload_file", {"content_base64": encoded, "name": "greeting.txt"}
                )
                plot = await mcp.call_tool(
                    "run_python",
                    {
                        "code": "import pandas as pd, matplotlib.pyplot as plt\n"
                        "df = pd.read_csv('/mnt/data/points.csv')\n"
                        "df.plot(x='x', y='y'); plt.savefig('/mnt/data/points.png'); plt.show()\n"
                        "print(open('/mnt/data/greeting.txt').read())"
                    },
                )
                assert "hello from base64" in text_of(plot)
                assert any(isinstance(c, ImageContent) for c in plot.content)
                # An image as the cell's value is shown too.
                value = await mcp.call_tool(
                    "run_python",
                    {"code": "from IPython.display import Image\nImage('/mnt/data/points.png')"},
                )
                shown = [c for c in value.content if isinstance(c, ImageContent)]
                assert [c.mime_type for c in shown] == ["image/png"], value.content

                listed = json.loads(text_of(await mcp.call_tool("list_files", {})))
                by_name = {f["name"]: f for f in listed}
                assert {"points.csv", "greeting.txt", "points.png"} <= set(by_name)
                as_text = json.loads(
                    text_of(
                        await mcp.call_tool("read_file", {"file_id": by_name["points.csv"]["id"]})
                    )
                )
                assert as_text["encoding"] == "text" and as_text["content"] == csv_text
                as_b64 = json.loads(
                    text_of(
                        await mcp.call_tool("read_file", {"file_id": by_name["points.png"]["id"]})
                    )
                )
                assert as_b64["encoding"] == "base64"
                assert base64.b64decode(as_b64["content"]).startswith(b"\x89PNG")

                failed = await mcp.call_tool(
                    "read_file", {"file_id": "file-000000000000000000000000"}
                )
                assert failed.is_error and "file-000000000000000000000000" in str(failed.content)
                if other_file is not None:  # another client's file: as if it did not exist
                    foreign = await mcp.call_tool("read_file", {"file_id": other_file})
                    assert foreign.is_error and "FileNotFoundInStore" in str(foreign.content)

                # Sessions the model names are its own: state kept per name, apart
                # from the default session's, and no other client's session is reached.
                named = {"session_id": "scratch"}
                await mcp.call_tool("run_python", {"code": "y = 5", **named})
                assert "5" in text_of(await mcp.call_tool("run_python", {"code": "y", **named}))
                assert json.loads(text_of(await mcp.call_tool("list_files", named))) == []
                apart = await mcp.call_tool("run_python", {"code": "print('y' in globals())"})
                assert "False" in text_of(apart)
                unknown = await mcp.call_tool("list_files", {"session_id": "never-used"})
                assert unknown.is_error and "no session named 'never-used'" in str(unknown.content)
                bad = await mcp.call_tool("run_python", {"code": "1", "session_id": "../x"})
                assert bad.is_error and "invalid session name" in str(bad.content)
                if other_session is not None:
                    probe = {"code": "print('secret' in globals())", "session_id": other_session}
                    assert "False" in text_of(await mcp.call_tool("run_python", probe))
                # A kernel that died: the next call runs on a fresh one, as the result says.
                dead = await mcp.call_tool("run_python", {"code": "import os\nos._exit(3)"})
                assert "The next call starts a fresh kernel" in text_of(dead)
                again = await mcp.call_tool("run_python", {"code": "print('alive')"})
                assert "alive" in text_of(again)


async def test_mcp_server_with_an_embedded_engine(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    csv_path = tmp_path / "uploads" / "points.csv"
    csv_path.write_text("x,y\n1,2\n2,4\n3,9\n")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandkernel.daemon", "mcp", "--store", str(tmp_path / "store"),
              "--runtime-dir", str(runtime_root()), "--pool-size", "0", "--prewarm", "",
              "--acquire-timeout", "100", "--upload-dir", str(tmp_path / "uploads")],
    )  # fmt: skip
    await _drive(params, tmp_path / "mcp.log", csv_path)
    leftovers = [p for p in runtime_root().iterdir() if p.name != "owners"]
    log = (tmp_path / "mcp.log").read_text()
    assert not [p for p in leftovers if not _owned_by_live_process(p)], log


async def test_mcp_server_on_a_running_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    running = await daemon_factory()
    other = await running.engine.session("someone-else")
    private = await other.upload(b"private\n", "private.txt")
    (tmp_path / "uploads").mkdir()
    csv_path = tmp_path / "uploads" / "points.csv"
    csv_path.write_text("x,y\n1,1\n2,3\n")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandkernel.daemon", "mcp", "--socket", str(running.socket),
              "--upload-dir", str(tmp_path / "uploads")],
    )  # fmt: skip
    await other.run("secret = 'not for the model'")
    await _drive(
        params, tmp_path / "mcp.log", csv_path, other_file=private.id, other_session=other.id
    )
    ran = {s.id: s.state for s in await running.engine.sessions() if s.id != "someone-else"}
    # It ran in the daemon: its own session and the two it named ...
    default = min(ran, key=len)
    assert default.startswith("mcp-") and len(ran) == 3, ran
    assert set(ran) == {default, f"{default}.scratch", f"{default}.someone-else"}
    # ... and ended each as it exited; the other client's session is untouched.
    assert set(ran.values()) == {"closed"}, ran
    assert (await other.run("secret")).text == "'not for the model'"
    await other.close()


async def test_mcp_on_a_daemon_ends_its_sessions_when_terminated(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    running = await daemon_factory()
    argv = [sys.executable, "-m", "sandkernel.daemon", "mcp", "--socket", str(running.socket)]
    with (tmp_path / "mcp.log").open("w") as log:
        async with await anyio.open_process(argv, stderr=log) as server:
            assert server.stdin is not None and server.stdout is not None
            replies = BufferedByteReceiveStream(server.stdout)

            async def ask(message: dict[str, object]) -> bytes:
                await server.stdin.send((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
                if "id" not in message:
                    return b""  # a notification: no answer
                with anyio.fail_after(60):
                    return await replies.receive_until(b"\n", 1 << 20)

            client = {"name": "t", "version": "1"}
            hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": client}
            await ask({"id": 1, "method": "initialize", "params": hello})
            await ask({"method": "notifications/initialized"})
            call = {"name": "run_python", "arguments": {"code": "print(6 * 7)"}}
            assert b"42" in await ask({"id": 2, "method": "tools/call", "params": call})
            (began,) = [s.id for s in await running.engine.sessions() if s.id.startswith("mcp-")]
            server.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):
                assert await server.wait() == -signal.SIGTERM
    states = {s.id: s.state for s in await running.engine.sessions()}
    assert states[began] == "closed"  # not left to its TTL in the daemon


async def test_the_sessions_it_began_are_closed_together() -> None:
    """Each close waits for a kernel to stop: they are not waited for one by one."""
    closing: list[str] = []
    all_closing = anyio.Event()

    class Backend:
        async def close_session(self, session_id: str) -> None:
            closing.append(session_id)
            if len(closing) == 3:
                all_closing.set()
            with anyio.fail_after(5):
                await all_closing.wait()
            if session_id == "b":
                raise SessionLost("its kernel died")  # the others are closed all the same

    tools = SandboxTools(cast(EngineAPI, Backend()))
    tools.began = {"a", "b", "c"}
    await tools.close_sessions()
    assert sorted(closing) == ["a", "b", "c"]


def test_mcp_on_a_daemon_refuses_engine_options() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "sandkernel.daemon", "mcp", "--socket", "/nonexistent",
         "--policy", "strict"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "--policy would be ignored with --socket" in done.stderr


def _owned_by_live_process(path: Path) -> bool:
    import psutil

    pid = path.name.split("-", 1)[0]
    return pid.isdigit() and psutil.pid_exists(int(pid))


async def test_the_applications_session_is_the_models_before_it_runs_anything(
    tmp_path: Path,
) -> None:
    """Its files are listed and read at once; wrapped base64 is base64 too."""
    async with Engine(
        pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(),
        store_dir=tmp_path / "store", handle_sigterm=False,
    ) as engine:  # fmt: skip
        app = await engine.session("app-1")
        sales = await app.upload(b"month,amount\nJan,10\n", "sales.csv")
        tools = SandboxTools(engine, default_session_id="app-1")
        listed = json.loads(await tools.list_files())
        assert [f["id"] for f in listed] == [sales.id]
        assert "Jan,10" in await tools.read_file(sales.id)
        wrapped = base64.encodebytes(b"x,y\n" * 40).decode()  # lines of 76 characters
        assert "\n" in wrapped.strip()
        answer = await tools.upload_file(content_base64=wrapped, name="wrapped.csv")
        assert "/mnt/data/wrapped.csv" in answer
        assert (await app.run("print(open('wrapped.csv').read().count('x,y'))")).stdout == "40\n"
        await app.close()


async def test_a_folder_swapped_for_a_link_after_the_check_does_not_lead_out_of_uploads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    (uploads / "sub").mkdir(parents=True)
    outside.mkdir()
    (uploads / "sub" / "data.txt").write_text("meant to be read\n")
    (outside / "data.txt").write_text("outside the upload folder\n")
    resolve = Path.resolve

    def swapped_after_the_check(self: Path, strict: bool = False) -> Path:
        # What another local process can do between the server's check and its open.
        resolved = resolve(self, strict)
        if resolved == uploads / "sub" / "data.txt":
            (uploads / "sub").rename(uploads / "was-sub")
            (uploads / "sub").symlink_to(outside)
        return resolved

    async with Engine(
        pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(),
        store_dir=tmp_path / "store", handle_sigterm=False,
    ) as engine:  # fmt: skip
        tools = SandboxTools(engine, default_session_id="app-1", upload_dirs=[uploads])
        monkeypatch.setattr(Path, "resolve", swapped_after_the_check)
        with pytest.raises(ToolError, match="not under an upload folder"):
            await tools.upload_file(path=str(uploads / "sub" / "data.txt"))
        monkeypatch.undo()
        session = await engine.session("app-1")
        assert (await session.files()) == []
        await session.close()
