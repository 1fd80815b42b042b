"""``sandkernel mcp`` driven by the official MCP client over stdio."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult, ImageContent, TextContent

from tests.conftest import runtime_root
from tests.daemon.conftest import DaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


def text_of(result: CallToolResult) -> str:
    assert not result.is_error, result.content
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def _drive(params: StdioServerParameters, errlog: Path, csv_path: Path) -> None:
    csv_text = csv_path.read_text()  # noqa: ASYNC240 - a small test file
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


async def test_mcp_server_with_an_embedded_engine(tmp_path: Path) -> None:
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("x,y\n1,2\n2,4\n3,9\n")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandkernel.daemon", "mcp", "--store", str(tmp_path / "store"),
              "--runtime-dir", str(runtime_root()), "--pool-size", "0", "--prewarm", "",
              "--acquire-timeout", "100"],
    )  # fmt: skip
    await _drive(params, tmp_path / "mcp.log", csv_path)
    leftovers = [p for p in runtime_root().iterdir() if p.name != "owners"]
    log = (tmp_path / "mcp.log").read_text()
    assert not [p for p in leftovers if not _owned_by_live_process(p)], log


async def test_mcp_server_on_a_running_daemon(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    running = await daemon_factory()
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("x,y\n1,1\n2,3\n")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandkernel.daemon", "mcp", "--socket", str(running.socket)],
    )
    await _drive(params, tmp_path / "mcp.log", csv_path)
    sessions = [s.id for s in (await running.engine.sessions())]
    assert len(sessions) == 1 and sessions[0].startswith("mcp-")  # it ran in the daemon


def _owned_by_live_process(path: Path) -> bool:
    import psutil

    pid = path.name.split("-", 1)[0]
    return pid.isdigit() and psutil.pid_exists(int(pid))
