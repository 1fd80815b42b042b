"""`/run_code` as reward pipelines call it: anti-exit headers and SandboxFusion's fetch_files.

Bodies are SandboxFusion's documented shapes, posted over loopback TCP with no
token, as verl and SandboxFusion's own SDK send them.
"""

from __future__ import annotations

import base64

import pytest

from tests.daemon.conftest import DaemonFactory
from tests.daemon.test_runs import fusion_daemon, loopback, run_code

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]

ANTI_EXIT_HEADER = "exit = None\nimport os, sys\nos._exit = None\nsys.exit = None\n"


async def test_anti_exit_header_then_print_succeeds_with_exactly_its_output(
    daemon_factory: DaemonFactory,
) -> None:
    http = loopback(await fusion_daemon(daemon_factory))
    r = await run_code(http, {"code": ANTI_EXIT_HEADER + "print('hello')", "language": "python"})
    assert r["status"] == "Success"
    rr = r["run_result"]
    assert (rr["status"], rr["return_code"], rr["stdout"], rr["stderr"]) == (
        "Finished", 0, "hello\n", "",
    )  # fmt: skip
    r = await run_code(http, {"code": ANTI_EXIT_HEADER + "assert 1 == 2", "language": "python"})
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 1
    assert r["run_result"]["stderr"].rstrip().endswith("AssertionError")


async def test_fetch_files_returns_what_exists_and_the_run_still_runs(
    daemon_factory: DaemonFactory,
) -> None:
    http = loopback(await fusion_daemon(daemon_factory))
    code = "open('a.txt', 'w').write('A')\nopen('/tmp/b', 'wb').write(b'\\xffB')\nprint('done')"
    r = await run_code(
        http,
        {
            "code": code,
            "language": "python",
            "fetch_files": ["a.txt", "/tmp/b", "/etc/passwd", "missing.txt"],
        },
    )
    assert r["status"] == "Success" and r["run_result"]["stdout"] == "done\n"
    # SandboxFusion leaves a file it cannot fetch out of `files`
    assert {k: base64.b64decode(v) for k, v in r["files"].items()} == {
        "a.txt": b"A",
        "/tmp/b": b"\xffB",
    }


async def test_pytest_with_an_anti_exit_header_in_the_test_file_passes(
    daemon_factory: DaemonFactory,
) -> None:
    http = loopback(await fusion_daemon(daemon_factory))
    tests = ANTI_EXIT_HEADER + "def test_ok():\n    assert 1 + 1 == 2\n"
    r = await run_code(http, {"code": tests, "language": "pytest"})
    assert r["status"] == "Success", r["run_result"]
    failing = ANTI_EXIT_HEADER + "def test_no():\n    assert 1 + 1 == 3\n"
    r = await run_code(http, {"code": failing, "language": "pytest"})
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 1
