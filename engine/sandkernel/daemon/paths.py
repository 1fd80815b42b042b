"""Where the daemon listens and keeps its records by default (no server imports here)."""

from __future__ import annotations

import os
from pathlib import Path


def default_socket_path() -> Path:
    """``$SANDKERNEL_SOCKET``, else ``/run/sandkernel/daemon.sock`` as root,
    else ``$XDG_RUNTIME_DIR/sandkernel/daemon.sock``."""
    explicit = os.environ.get("SANDKERNEL_SOCKET")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/sandkernel/daemon.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/sandkernel-{os.geteuid()}"  # noqa: S108 - private 0700 folder, checked at bind
    return Path(runtime) / "sandkernel" / "daemon.sock"


def default_records_path(store_dir: Path) -> Path:
    """The daemon's session records, next to the file store they belong to."""
    return store_dir.parent / f"{store_dir.name}-daemon-sessions.sqlite3"
