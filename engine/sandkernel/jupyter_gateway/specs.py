"""Kernel specs: one per shipped policy, ``sandkernel-<policy>``, its limits in the metadata.

A daemon runs one policy (``sandkernel serve --policy``): its spec is the
default and the one kernels start from; the others are listed, marked
``"served": false``, so a client sees what another daemon would offer.
"""

from __future__ import annotations

import json
from typing import Any, Final

from sandkernel._resources import data_dir
from sandkernel.errors import BadInput
from sandkernel.kernel import KERNEL_NAME
from sandkernel.policy import Policy, load_policy, shipped_policy_names

PREFIX: Final = "sandkernel-"
#: Names clients send when they mean "Python" (Open WebUI, scripts written for Kernel Gateway).
PYTHON_ALIASES: Final = frozenset({"", "python", "python3"})
_LIMITS: Final = (
    "memory_mb", "cpus", "pids_max", "wall_timeout_s", "interrupt_grace_s", "workspace_mb",
    "tmp_mb", "nofile", "file_size_mb", "network",
)  # fmt: skip


def spec_name(policy: Policy) -> str:
    return PREFIX + policy.name


class KernelSpecs:
    """The specs a gateway lists, and which one a requested name starts.

    Args:
        served: the policy of the daemon's engine.
    """

    def __init__(self, served: Policy) -> None:
        self.served = served
        self.default = spec_name(served)
        shipped = (load_policy(name) for name in shipped_policy_names())
        policies = {spec_name(policy): policy for policy in shipped}
        policies[self.default] = served
        self._policies = dict(sorted(policies.items()))
        base = json.loads((data_dir("kernels") / KERNEL_NAME / "kernel.json").read_text())
        self._argv: list[str] = list(base["argv"])
        self._language: str = base["language"]

    def names(self) -> list[str]:
        return list(self._policies)

    def model(self, name: str) -> dict[str, Any]:
        """One spec as ``/api/kernelspecs/{name}`` answers it.

        Raises:
            KeyError: no such spec.
        """
        policy = self._policies[name]
        served = name == self.default
        return {
            "name": name,
            "spec": {
                "argv": self._argv,
                "display_name": f"Python 3 (sandkernel, {policy.name})",
                "language": self._language,
                "interrupt_mode": "message",
                "env": {},
                "metadata": {
                    "sandkernel": {
                        "policy": policy.name,
                        "description": policy.description,
                        "served": served,
                        "limits": {field: getattr(policy, field) for field in _LIMITS},
                    },
                    "debugger": False,
                },
            },
            "resources": {},
        }

    def all(self) -> dict[str, Any]:
        """``/api/kernelspecs``."""
        return {"default": self.default, "kernelspecs": {n: self.model(n) for n in self._policies}}

    def resolve(self, name: str | None) -> str:
        """The spec a ``POST /api/kernels`` name starts.

        Raises:
            BadInput: an unknown spec, or one this daemon does not serve (says which it does).
        """
        if name is None or name in PYTHON_ALIASES or name == self.default:
            return self.default
        if name in self._policies:
            policy = name.removeprefix(PREFIX)
            raise BadInput(
                f"this daemon serves {self.default} (policy {self.served.name!r}); "
                f"for {name}, start a daemon with `sandkernel serve --policy {policy}`"
            )
        raise BadInput(
            f"no kernel spec {name[:80]!r}: this daemon serves {self.default} "
            f"(known: {', '.join(self._policies)})"
        )
