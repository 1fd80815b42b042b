"""Re-exports that import their module on first use (PEP 562), for a package's ``__init__``.

A package that gathers the names of its modules (``from sandkernel.batch
import RunRequest``) would otherwise import every module when any one name is
wanted: pydantic, asyncio and nsjail's config classes for a constant.
"""

from __future__ import annotations

import importlib

# Annotations only: ``import sandkernel`` uses this module and should not pay
# for importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` for ``package``'s re-exported names.

    Args:
        package: the package's ``__name__``.
        where: each re-exported name -> the module under ``package`` that defines it.
        namespace: the package's ``globals()``; a name looked up once is stored
            there, so later lookups no longer come through ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
