"""``python -m sandkernel.daemon serve|mcp``: the daemon commands on their own."""

from __future__ import annotations

from sandkernel.daemon.cli import main

raise SystemExit(main())
