"""SandboxFusion-compatible /run_jupyter semantics, through a real engine."""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable

import pytest

from sandkernel import Engine
from sandkernel.daemon import fusion
from sandkernel.daemon.fusion import RunJupyterRequest, RunStatus, run_jupyter

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]
EngineFactory = Callable[..., Awaitable[Engine]]


async def test_documented_example_cells(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    request = RunJupyterRequest.model_validate(
        {
            "cells": [
                "a = 123",
                "a",
                "print(a)",
                'import sys; sys.stderr.write("stderr message")',
                'raise RuntimeError("error message")',
            ]
        }
    )
    response = await run_jupyter(engine, request)
    assert response.status is RunStatus.Success and response.message == ""
    assert response.driver is not None and response.driver.status == "Finished"
    c = response.cells
    assert len(c) == 5
    assert (c[0].stdout, c[0].display, c[0].error) == ("", [], [])
    assert c[1].display == [{"text/plain": "123"}]
    assert c[2].stdout == "123\n"
    assert c[3].stderr == "stderr message" and c[3].display == [{"text/plain": "14"}]
    (error,) = c[4].error
    assert error["ename"] == "RuntimeError" and error["evalue"] == "error message"
    assert any("error message" in line for line in error["traceback"])
    stats = await engine.stats()
    assert stats.pool.in_use == 0 and stats.sessions_closed == 1  # used once, destroyed


async def test_files_in_and_fetch_files_out_are_byte_identical(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    payload = bytes(range(256)) * 10
    request = RunJupyterRequest(
        cells=[
            "data = open('in/blob.bin', 'rb').read()",
            "open('out.bin', 'wb').write(data[::-1])",
        ],
        files={"in/blob.bin": base64.b64encode(payload).decode()},
        fetch_files=["out.bin", "missing.txt"],
    )
    response = await run_jupyter(engine, request)
    assert response.status is RunStatus.Success, response
    assert base64.b64decode(response.files["out.bin"]) == payload[::-1]
    assert "missing.txt" not in response.files


async def test_fetch_files_returns_no_more_than_a_total_however_often_a_file_is_named(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fusion, "JUPYTER_FETCH_MAX_BYTES", 5 << 19)  # 2.5 MiB
    engine = await engine_factory()
    request = RunJupyterRequest(
        cells=["for n in 'ab': open(f'{n}.bin', 'wb').write(n.encode() * (1 << 20))"],
        fetch_files=["a.bin", "./a.bin", "././a.bin", "b.bin"],
    )
    response = await run_jupyter(engine, request)
    assert response.status is RunStatus.Success, response
    # Each name asked for counts: two fit in the total, the next ones do not.
    assert sorted(response.files) == ["./a.bin", "a.bin"]
    assert base64.b64decode(response.files["./a.bin"]) == b"a" * (1 << 20)


async def test_total_timeout_gives_failed_with_time_limit(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    started = time.monotonic()
    response = await run_jupyter(
        engine, RunJupyterRequest(cells=["x = 1", "while True: pass", "y = 2"], total_timeout=2)
    )
    assert time.monotonic() - started < 2 + 5  # the cell itself would never end
    assert response.status is RunStatus.Failed
    assert response.driver is not None and response.driver.status == "TimeLimitExceeded"
    assert len(response.cells) == 2


async def test_memory_limit_is_applied(engine_factory: EngineFactory) -> None:
    engine = await engine_factory()
    response = await run_jupyter(
        engine,
        RunJupyterRequest(cells=["b = bytearray(300 * 1024 * 1024)"], memory_limit_MB=128),
    )
    assert response.status is RunStatus.Failed
    assert "out of memory" in response.message


async def test_bad_files_are_a_sandbox_error_naming_the_problem(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    for files, why in (
        ({"/etc/x": ""}, "must be relative"),
        ({"a.txt": "@@@"}, "base64"),
        ({".": ""}, "names no file"),
        ({"a\ud800.txt": ""}, "not valid UTF-8"),  # JSON's "\ud800" parses to this
        # Names no file system takes together, or alone: as /run_code answers them.
        ({"a": "eA==", "a/b": "eA=="}, "could not be written"),
        ({"a/b": "eA==", "a": "eA=="}, "could not be written"),
        ({"x" * 300: "eA=="}, "could not be written"),
    ):
        response = await run_jupyter(engine, RunJupyterRequest(cells=["1"], files=files))
        assert response.status is RunStatus.SandboxError and why in response.message


async def run(engine: Engine, body: dict[str, object]) -> dict[str, object]:
    from sandkernel.daemon.fusion import RunCodeRequest, run_code

    response = await run_code(engine, RunCodeRequest.model_validate(body))
    return response.model_dump(mode="json")


async def test_run_code_as_documented(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    r = await run(engine, {"code": "print('Hello, world!')", "language": "python"})
    assert r["status"] == "Success" and r["message"] == ""
    rr = r["run_result"]
    assert isinstance(rr, dict)
    assert (rr["status"], rr["return_code"], rr["stdout"], rr["stderr"]) == (
        "Finished",
        0,
        "Hello, world!\n",
        "",
    )
    assert rr["execution_time"] is not None and r["files"] == {} and r["compile_result"] is None
    r = await run(engine, {"code": "print(input()[::-1])", "stdin": "abc", "language": "python"})
    assert r["run_result"]["stdout"] == "cba\n"  # type: ignore[index]
    r = await run(engine, {"code": "import sys; sys.exit(1)", "language": "python"})
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 1  # type: ignore[index]
    r = await run(engine, {"code": "raise ValueError('boom')", "language": "python"})
    assert r["status"] == "Failed"
    assert "ValueError: boom" in r["run_result"]["stderr"]  # type: ignore[index]


async def test_run_code_time_and_memory_limits(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    started = time.monotonic()
    r = await run(engine, {"code": "while True: pass", "language": "python", "run_timeout": 1})
    assert time.monotonic() - started < 1 + 5  # its worker started on demand, under load
    assert r["status"] == "Failed" and r["run_result"]["status"] == "TimeLimitExceeded"  # type: ignore[index]
    assert r["run_result"]["return_code"] is None  # type: ignore[index]  # as SandboxFusion's
    r = await run(
        engine,
        {"code": "x = bytearray(300 * 1024 * 1024)", "language": "python", "memory_limit_MB": 100},
    )
    assert r["status"] == "Failed" and r["run_result"]["return_code"] != 0  # type: ignore[index]


async def test_run_code_files_pytest_and_unsupported_language(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    blob = bytes(range(256))
    r = await run(
        engine,
        {
            "code": "open('out.bin', 'wb').write(open('in.bin', 'rb').read()[::-1])",
            "language": "python",
            # in lines of 76 columns, as base64.encodebytes writes it
            "files": {"in.bin": base64.encodebytes(blob).decode()},
            "fetch_files": ["out.bin"],
        },
    )
    assert r["status"] == "Success"
    assert base64.b64decode(r["files"]["out.bin"]) == blob[::-1]  # type: ignore[index]
    r = await run(
        engine,
        {"code": "def test_ok():\n    assert 1 + 1 == 2\n\ndef test_bad():\n    assert 1 == 2\n",
         "language": "pytest"},
    )  # fmt: skip
    assert r["status"] == "Failed"
    assert "1 failed, 1 passed" in r["run_result"]["stdout"]  # type: ignore[index]
    r = await run(engine, {"code": "int main() {}", "language": "cpp"})
    assert r["status"] == "SandboxError" and "supported: python, pytest" in str(r["message"])


async def test_run_code_takes_files_named_as_its_own_program_and_test_file(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    helper = {"main.py": b64("def f():\n    return 1\n")}
    r = await run(engine, {"code": "import main\nprint(main.f())", "language": "python",
                           "files": helper})  # fmt: skip
    assert (r["status"], r["run_result"]["stdout"]) == ("Success", "1\n"), r  # type: ignore[index]
    test = "from main import f\ndef test_f():\n    assert f() == 1\n"
    r = await run(engine, {"code": test, "language": "pytest", "files": helper})
    assert r["status"] == "Success", r
    # A request's own test_main.py is left as it was, not replaced by the code.
    test = "def test_mine():\n    assert open('test_main.py').read() == 'mine'\n"
    r = await run(engine, {"code": test, "language": "pytest",
                           "files": {"test_main.py": b64("mine")}})  # fmt: skip
    assert r["status"] == "Success", r


async def test_run_code_writes_files_as_sandboxfusion_does(engine_factory: EngineFactory) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    x = base64.b64encode(b"x").decode()
    files = {"kept.txt": x, "null.txt": None, "dir/IGNORE_THIS_FILE.txt": x}
    listing = "import os\nprint(sorted(os.listdir('.')))"
    r = await run(engine, {"code": listing, "language": "python", "files": files})
    assert r["run_result"]["stdout"] == "['kept.txt', 'main.py']\n", r  # type: ignore[index]


async def test_run_code_whose_files_cannot_be_written_is_a_sandbox_error_saying_why(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory(pool_size=0, batch_workers=1)
    x = base64.b64encode(b"x").decode()
    # "a" cannot be both a file and the folder of "a/b"
    r = await run(engine, {"code": "print(1)", "language": "python", "files": {"a": x, "a/b": x}})
    assert (r["status"], r["run_result"], r["files"]) == ("SandboxError", None, {})
    assert str(r["message"]).startswith("the run's files could not be written: File exists")


async def test_run_jupyter_fetches_workspace_paths_and_skips_the_rest(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    request = RunJupyterRequest(
        cells=["open('a.txt', 'w').write('A'); open('/tmp/b', 'w').write('B')"],
        fetch_files=["a.txt", "/mnt/data/a.txt", "/etc/passwd", "../etc/passwd", "missing.txt"],
    )
    response = await run_jupyter(engine, request)
    assert response.status is RunStatus.Success
    assert {k: base64.b64decode(v) for k, v in response.files.items()} == {
        "a.txt": b"A",
        "/mnt/data/a.txt": b"A",
    }


async def test_run_jupyter_with_an_anti_exit_header_runs_its_cells(
    engine_factory: EngineFactory,
) -> None:
    engine = await engine_factory()
    header = "exit = None\nimport os, sys\nos._exit = None\nsys.exit = None\n"
    response = await run_jupyter(engine, RunJupyterRequest(cells=[header, "print('hello')"]))
    assert response.status is RunStatus.Success
    assert [c.stdout for c in response.cells] == ["", "hello\n"]
    # the kernel was destroyed afterwards as usual, and the next request is served
    again = await run_jupyter(engine, RunJupyterRequest(cells=["print(os)"]))
    assert again.cells[0].error[0]["ename"] == "NameError"  # a fresh kernel


def test_the_old_module_name_reexports_the_same_objects() -> None:
    import sandkernel.daemon.fusion as moved
    import sandkernel.fusion as old

    assert set(moved.__all__) <= set(old.__all__)
    for name in old.__all__:
        assert getattr(old, name) is getattr(moved, name), name
