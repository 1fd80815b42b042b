"""What a jail's folder and cgroup are made to: the policy's limits, read by the host."""

from __future__ import annotations

from typing import Protocol


class JailLimits(Protocol):
    """The limits :meth:`SandboxHost.prepare` makes a jail with.

    A :class:`~sandkernel.policy.Policy` is one. Preparing a jail needs only
    these, not the policy model: a batch pool's sandboxes can be prepared
    from limits read back from a file, before the model is loaded (see
    :mod:`sandkernel.batch.prestart`), and checked against it after.
    """

    @property
    def memory_mb(self) -> int: ...
    @property
    def cpus(self) -> float: ...
    @property
    def pids_max(self) -> int: ...
    @property
    def workspace_mb(self) -> int: ...
    @property
    def workspace_inodes(self) -> int: ...
    @property
    def nofile(self) -> int: ...
    @property
    def file_size_mb(self) -> int: ...


#: The fields of :class:`JailLimits`, in its order.
JAIL_LIMIT_FIELDS = (
    "memory_mb", "cpus", "pids_max", "workspace_mb", "workspace_inodes", "nofile", "file_size_mb",
)  # fmt: skip
