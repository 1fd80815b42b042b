"""The exception tree: one module, one root, a status on each class, one registry both ways."""

from __future__ import annotations

import ast
import importlib
import io
import pickle
import re
from pathlib import Path

import pytest

import sandkernel
from sandkernel import errors
from sandkernel.errors import (
    ERROR_CLASSES,
    BadInput,
    DaemonError,
    FileLost,
    FileNotFoundInStore,
    FileRejected,
    FileTooLarge,
    HostUnreachable,
    InvalidRequest,
    RequestTooLarge,
    SandkernelError,
    SessionError,
    SessionLost,
    Unauthorized,
    error_class_of,
    error_from_wire,
    error_type_of,
    http_status_of,
)

PACKAGE = Path(sandkernel.__file__).parent


def _subclasses(cls: type[SandkernelError]) -> set[type[SandkernelError]]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_every_error_class_is_defined_in_the_tree_module_and_registered() -> None:
    importlib.import_module("sandkernel.daemon.errors")
    importlib.import_module("sandkernel.fusion")
    importlib.import_module("sandkernel.evaluate.problems")
    ours = {
        cls
        for cls in _subclasses(SandkernelError) | {SandkernelError}
        if cls.__module__.startswith("sandkernel")
    }
    assert {cls.__module__ for cls in ours} == {"sandkernel.errors"}
    assert ours == set(ERROR_CLASSES.values())
    assert all(name == cls.__name__ for name, cls in ERROR_CLASSES.items())
    # Read, not imported (sandkernel.ray would load Ray into this process): no other
    # module defines a class deriving from one of the tree's.
    elsewhere = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                bases |= {b.attr for b in node.bases if isinstance(b, ast.Attribute)}
                if bases & set(ERROR_CLASSES):
                    elsewhere.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert not elsewhere


def test_the_docstring_draws_every_class_with_its_status() -> None:
    drawn = {
        m["name"]: int(m["status"])
        for m in re.finditer(
            r"[├└]── (?P<name>\w+)[^\n]*?\s(?P<status>\d{3})\s", errors.__doc__ or ""
        )
    }
    drawn[SandkernelError.__name__] = 500
    assert drawn == {name: cls.http_status for name, cls in ERROR_CLASSES.items()}


def test_each_class_has_an_http_status_and_the_round_trip_gives_the_class_back() -> None:
    for name, cls in ERROR_CLASSES.items():
        assert 400 <= cls.http_status <= 599, name
        exc = cls(f"a {name}")
        status, type_name = http_status_of(exc), error_type_of(exc)
        assert (status, type_name) == (cls.http_status, name)
        back = error_from_wire(status, type_name, str(exc))
        assert type(back) is cls and str(back) == f"a {name}"
        if isinstance(back, DaemonError):
            assert (back.status_code, back.error_type) == (status, name)


def test_statuses_of_the_cases_clients_tell_apart() -> None:
    expected = {
        "SessionNotFound": 404, "FileNotFoundInStore": 404, "FileLost": 404,
        "SessionExpired": 410, "SessionClosed": 410, "SessionLost": 410, "KernelDead": 409,
        "SessionLimitReached": 429, "PoolExhausted": 503, "HostUnreachable": 503,
        "RunQueueFull": 503, "FileRejected": 422, "FileTooLarge": 413, "RequestTooLarge": 413,
        "InvalidRequest": 400, "PolicyError": 400, "Unauthorized": 401,
    }  # fmt: skip
    assert {name: ERROR_CLASSES[name].http_status for name in expected} == expected


def test_one_session_lost_for_a_daemon_restart_and_a_lost_node() -> None:
    # The cluster's names are checked in the Ray test run (importing sandkernel.ray loads Ray).
    from sandkernel import daemon
    from sandkernel.daemon import errors as daemon_errors
    from sandkernel.daemon.records import SessionRecords

    assert daemon_errors.SessionLost is daemon.SessionLost is SessionLost
    assert issubclass(SessionLost, SessionError) and SessionLost.http_status == 410
    assert SessionRecords.lost.__annotations__["return"] == "SessionLost | None"
    assert issubclass(FileLost, FileNotFoundInStore) and FileLost.http_status == 404


def test_old_import_paths_are_the_same_class_objects() -> None:
    from sandkernel import daemon, fusion
    from sandkernel.daemon import errors as daemon_errors
    from sandkernel.evaluate import EvalInputError

    for name in ("DaemonError", "DaemonUnavailable", "InvalidRequest", "RequestTooLarge",
                 "RunQueueFull", "SessionLost", "Unauthorized"):  # fmt: skip
        assert getattr(daemon, name) is getattr(daemon_errors, name) is ERROR_CLASSES[name]
    assert fusion.BadRequest is errors.FusionInputError
    assert EvalInputError is errors.EvalInputError


def test_bad_input_is_a_value_error_and_invalid_request_is_both() -> None:
    assert issubclass(BadInput, ValueError)
    assert issubclass(InvalidRequest, DaemonError) and issubclass(InvalidRequest, BadInput)
    for cls in (errors.FusionInputError, errors.EvalInputError):
        assert issubclass(cls, BadInput) and cls.http_status == 400


def test_other_libraries_errors_are_mapped_at_the_boundary() -> None:
    assert error_class_of(ValueError("invalid session id")) is InvalidRequest
    assert (http_status_of(ValueError("x")), error_type_of(ValueError("x"))) == (
        400,
        "InvalidRequest",
    )
    assert error_class_of(RuntimeError("bug")) is None
    assert (http_status_of(KeyError("x")), error_type_of(KeyError("x"))) == (500, "InternalError")

    class Private(FileRejected):
        """A subclass defined outside the tree crosses as its nearest registered class."""

    assert error_class_of(Private("x")) is FileRejected and http_status_of(Private("x")) == 422


def test_an_upload_over_a_size_cap_raises_file_too_large_answered_413(tmp_path: Path) -> None:
    from sandkernel.files import FileStore, check_upload

    with pytest.raises(FileTooLarge) as checked:
        check_upload("a.txt", b"x" * 2048, max_bytes=1024)
    store = FileStore(tmp_path / "store", max_bytes=1024)
    try:
        with pytest.raises(FileTooLarge) as streamed:
            store.add_upload(io.BytesIO(b"x" * 2048), "a.txt")
    finally:
        store.close()
    for raised in (checked.value, streamed.value):
        assert (http_status_of(raised), error_type_of(raised)) == (413, "FileTooLarge")
        assert "max_bytes" in str(raised)
    assert http_status_of(FileRejected("upload rejected: .exe is not a supported type")) == 422
    assert issubclass(FileTooLarge, FileRejected)


def test_an_unknown_type_is_a_daemon_error_with_its_status() -> None:
    unknown = error_from_wire(418, "Teapot", "short and stout")
    assert type(unknown) is DaemonError
    assert (unknown.status_code, unknown.error_type, str(unknown)) == (
        418,
        "Teapot",
        "short and stout",
    )
    # A type this client does not know, with a status that says what it is (a proxy's 413...).
    assert type(error_from_wire(400, "NotAnError", "m")) is InvalidRequest
    assert type(error_from_wire(422, "NotAnError", "m")) is InvalidRequest
    assert type(error_from_wire(401, "NotAnError", "m")) is Unauthorized
    assert type(error_from_wire(413, "HTTP413", "m")) is RequestTooLarge
    assert type(error_from_wire(500, "InternalError", "boom")) is DaemonError


def test_errors_survive_pickling_as_the_same_class() -> None:
    # Ray sends a host's errors back pickled: the class must come back itself.
    for cls in (SessionLost, FileLost, HostUnreachable, errors.HostClosing, InvalidRequest):
        back = pickle.loads(pickle.dumps(cls("why")))  # noqa: S301 - our own bytes
        assert type(back) is cls and str(back) == "why"
