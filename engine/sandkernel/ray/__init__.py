"""sandkernel on a Ray cluster: the :class:`~sandkernel.engine.Engine` API, one host per node.

::

    from sandkernel.ray import ClusterEngine

    async with ClusterEngine("auto", pool_size=2) as engine:
        session = await engine.session("thread-42")
        result = await session.run("print(1 + 1)")

Needs the ``ray`` extra (``pip install 'sandkernel[ray]'``) on the driver and
on every node, and on every node what a local engine needs (see
``sandkernel doctor --ray ADDRESS``).
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401 - fail here, with the fix, rather than deep inside
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "sandkernel.ray needs Ray: pip install 'sandkernel[ray]' (or 'ray>=2.9')"
    ) from exc

from sandkernel.ray._protocol import ClusterStats, HostInfo, HostStats
from sandkernel.ray.cluster import ClusterEngine, ClusterSession
from sandkernel.ray.errors import FileLost, HostUnreachable, SessionLost

__all__ = [
    "ClusterEngine",
    "ClusterSession",
    "ClusterStats",
    "FileLost",
    "HostInfo",
    "HostStats",
    "HostUnreachable",
    "SessionLost",
]
