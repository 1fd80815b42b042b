"""The errors a cluster engine adds, under the tree of :mod:`sandkernel.errors` (same classes).

- :class:`SessionLost` (410): the node holding the session's kernel left the cluster;
- :class:`FileLost` (404, a ``FileNotFoundInStore``): the node holding the file left;
- :class:`HostUnreachable` (503): a node's host did not answer; the call may or
  may not have run.
"""

from __future__ import annotations

from sandkernel.errors import FileLost, HostUnreachable, SessionLost

__all__ = ["FileLost", "HostUnreachable", "SessionLost"]
