"""sandkernel: a local sandbox execution engine for code written by language models."""

from __future__ import annotations

from sandkernel.errors import (
    KernelDead,
    KernelStartFailed,
    PolicyError,
    SandboxUnavailable,
    SandkernelError,
    SelfCheckFailed,
)
from sandkernel.kernel import SandboxedKernel
from sandkernel.policy import Policy, load_policy
from sandkernel.results import DisplayOutput, ErrorInfo, ExecutionResult, Usage
from sandkernel.sandbox import SandboxHost

__all__ = [
    "DisplayOutput",
    "ErrorInfo",
    "ExecutionResult",
    "KernelDead",
    "KernelStartFailed",
    "Policy",
    "PolicyError",
    "SandboxHost",
    "SandboxUnavailable",
    "SandboxedKernel",
    "SandkernelError",
    "SelfCheckFailed",
    "Usage",
    "load_policy",
]
__version__ = "0.1.0"
