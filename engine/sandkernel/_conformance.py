"""mypy's proof that every backend implements the contract of :mod:`sandkernel.api`.

Nothing here runs: the assignments are checked by ``mypy --strict`` in
``make test``, so a backend that drifts from the contract fails the build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandkernel.api import (
        EngineAPI,
        ExposesKernels,
        KernelLink,
        ManagedBackend,
        ServedEngine,
        SessionAPI,
    )
    from sandkernel.daemon.client import AsyncClient, RemoteSession
    from sandkernel.engine import Engine, SessionKernelLink
    from sandkernel.ray.cluster import ClusterEngine, ClusterSession
    from sandkernel.session import Session
    from sandkernel.sync import BlockingEngine

    def _embedded(engine: Engine, session: Session) -> tuple[EngineAPI, SessionAPI]:
        return engine, session

    def _daemon(client: AsyncClient, session: RemoteSession) -> tuple[EngineAPI, SessionAPI]:
        return client, session

    def _cluster(engine: ClusterEngine, session: ClusterSession) -> tuple[EngineAPI, SessionAPI]:
        return engine, session

    def _managed(
        engine: Engine, client: AsyncClient, cluster: ClusterEngine
    ) -> list[ManagedBackend]:
        return [engine, client, cluster]

    def _blocking(cluster: ClusterEngine) -> BlockingEngine[ClusterEngine]:
        return BlockingEngine(lambda: cluster)

    def _served(engine: Engine, cluster: ClusterEngine) -> list[ServedEngine]:
        return [engine, cluster]

    def _exposes_kernels(
        engine: Engine, link: SessionKernelLink
    ) -> tuple[ExposesKernels, KernelLink]:
        return engine, link
