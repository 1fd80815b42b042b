"""Where a sandbox's things are: paths inside the jail, and one kernel's folder on the host."""

from __future__ import annotations

import re
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


#: The kernel whose config is rendered once per policy, runtime and command
#: (``ConfigRenderer.template``), its id and folder then replaced by each
#: kernel's own (:func:`fill_stand_in`).
STAND_IN = KernelLayout("sandkernel-stand-in-id", Path("/sandkernel-stand-in-root"))
_STAND_INS = re.compile(f"{re.escape(str(STAND_IN.root))}|{re.escape(STAND_IN.kernel_id)}")
#: An id or path made only of these is written into the config's text format as it is.
_VERBATIM = re.compile(r"[\w./+,=@:-]*", re.ASCII)


def stands_in(layout: KernelLayout) -> bool:
    """Whether ``layout``'s id and folder are written into a config as they are.

    Only then can a config rendered for :data:`STAND_IN` be made its own
    (:func:`fill_stand_in`); otherwise its config is to be rendered in full.
    """
    return bool(_VERBATIM.fullmatch(str(layout.root)) and _VERBATIM.fullmatch(layout.kernel_id))


def fill_stand_in(template: str, layout: KernelLayout) -> str:
    """``template`` (a config rendered for :data:`STAND_IN`) made ``layout``'s own.

    Raises ValueError if ``layout`` does not :func:`stand in <stands_in>`.
    """
    if not stands_in(layout):
        raise ValueError(f"kernel {layout.kernel_id!r} in {layout.root} cannot stand in")
    root, kernel_id = str(layout.root), layout.kernel_id
    own = {str(STAND_IN.root): root, STAND_IN.kernel_id: kernel_id}
    return _STAND_INS.sub(lambda match: own[match.group()], template)
