"""Where a sandbox's things are: paths inside the jail, and one kernel's folder on the host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Paths inside the sandbox.
WORKSPACE_IN_JAIL = "/mnt/data"
CONNECTION_DIR_IN_JAIL = "/run/sandkernel"
RUNTIME_IN_JAIL = "/opt/sandkernel"

#: Unprivileged host uid/gid the sandboxed processes run as.
SANDBOX_UID = 65534
SANDBOX_GID = 65534


@dataclass(frozen=True)
class KernelLayout:
    """Host paths of one kernel's runtime folder."""

    kernel_id: str
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "nsjail.cfg"

    @property
    def log_file(self) -> Path:
        return self.root / "nsjail.log"

    @property
    def output_file(self) -> Path:
        """The kernel process's own stdout/stderr (not the cell's)."""
        return self.root / "kernel.out"

    @property
    def connection_dir(self) -> Path:
        """Bound at :data:`CONNECTION_DIR_IN_JAIL`: ipc sockets and connection file."""
        return self.root / "conn"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"
