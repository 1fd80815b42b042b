"""Errors of the cluster engine, under the tree of :mod:`sandkernel.errors`::

SandkernelError
├── SessionError
│   └── SessionLost        the node holding the session's kernel left the cluster
├── FileError
│   └── FileNotFoundInStore
│       └── FileLost       the node holding the file left the cluster
└── HostUnreachable        a node's host did not answer; the call may or may not have run
"""

from __future__ import annotations

from sandkernel.errors import FileNotFoundInStore, SandkernelError, SessionError


class SessionLost(SessionError):
    """The node (or its host actor) that held the session's kernel is gone.

    The message names the node. The session's variables and workspace are
    lost; its files stay downloadable only if they were copied elsewhere.
    """


class FileLost(FileNotFoundInStore):
    """The node that stored the file is gone (the message names it)."""


class HostUnreachable(SandkernelError):
    """A host did not answer and is not (yet) known to be gone: retry later."""
