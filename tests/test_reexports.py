"""Packages that gather their modules' names: each name is the defining module's, loaded on use."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import ModuleType

import pytest

PACKAGES = ("sandkernel.sandbox", "sandkernel.batch")


def modules_after(code: str) -> set[str]:
    """The sandkernel modules a fresh interpreter has loaded once it ran ``code``."""
    probe = f"{code}\nimport sys\nprint(*sorted(sys.modules), sep='\\n')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {m for m in proc.stdout.split() if m.startswith("sandkernel")}


@pytest.mark.parametrize("name", PACKAGES)
def test_every_reexported_name_is_its_defining_modules_object(name: str) -> None:
    package: ModuleType = importlib.import_module(name)
    where: dict[str, str] = package._WHERE
    assert package.__all__ == sorted(package.__all__)
    assert set(package.__all__) == set(where)
    assert set(package.__all__) <= set(dir(package))
    for exported in package.__all__:
        defining = importlib.import_module(f"{name}.{where[exported]}")
        assert getattr(package, exported) is getattr(defining, exported), exported
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = package.Nope


@pytest.mark.parametrize("name", PACKAGES)
def test_importing_the_package_loads_none_of_its_modules(name: str) -> None:
    loaded = modules_after(f"import {name}")
    assert {m for m in loaded if m.startswith(f"{name}.")} == set()


def test_a_sandbox_constant_loads_only_where_it_is_defined() -> None:
    loaded = modules_after("from sandkernel.sandbox import SANDBOX_UID, WORKSPACE_IN_JAIL")
    assert {m for m in loaded if m.startswith("sandkernel.sandbox.")} == {
        "sandkernel.sandbox.layout"
    }


def test_building_a_run_request_loads_neither_the_pool_nor_the_sandbox() -> None:
    loaded = modules_after("from sandkernel.batch import RunRequest, RunResult")
    assert {m for m in loaded if m.startswith(("sandkernel.batch.", "sandkernel.sandbox"))} == {
        "sandkernel.batch.models"
    }
