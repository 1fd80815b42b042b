"""The Jupyter Kernel Gateway API: JupyterLab, Open WebUI and other Jupyter clients, sandboxed.

Jupyter Server's REST API for kernels, kernel specs and sessions, and its
kernel WebSocket, served by the daemon under ``/api``; a kernel is a
sandkernel session from the warm pool, with its limits, lifetime and files.
One module per concept:

==========  ===============================================================
``specs``   kernel specs, one per shipped policy, limits in the metadata
``codec``   Jupyter messages on a WebSocket (JSON, and the v1 binary protocol)
``relay``   one kernel: WebSockets relayed to its sockets; limits, death
``kernels`` the gateway's kernels and Jupyter sessions
``app``     the routes under ``/api``, and the gate in front of the daemon
==========  ===============================================================

:func:`jupyter_gate` is what the daemon uses. It serves any engine the
daemon does; the kernels themselves need one that exposes them
(:class:`~sandkernel.api.ExposesKernels`, the embedded ``Engine``): behind
``serve --ray`` the kernel routes answer 501.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from sandkernel.api import ServedEngine

__all__ = ["jupyter_gate"]


@asynccontextmanager
async def jupyter_gate(
    app: ASGIApp, engine: ServedEngine, *, token: str | None, max_json_bytes: int
) -> AsyncIterator[ASGIApp]:
    """``app`` with the gateway's ``/api`` routes in front of it, while the block runs.

    Leaving the block ends every kernel the gateway started.

    Args:
        app: the daemon's application (every other path goes there).
        engine: the daemon's engine.
        token: the daemon's token, which TCP requests must carry.
        max_json_bytes: largest request body.
    """
    from sandkernel.api import ExposesKernels
    from sandkernel.jupyter_gateway.app import JupyterGate, create_gateway_app
    from sandkernel.jupyter_gateway.kernels import GatewayKernels
    from sandkernel.jupyter_gateway.specs import KernelSpecs

    specs = KernelSpecs(engine.policy)
    kernels = GatewayKernels(engine, engine, specs) if isinstance(engine, ExposesKernels) else None
    try:
        yield JupyterGate(
            app,
            create_gateway_app(specs, kernels),
            token=token,
            max_json_bytes=max_json_bytes,
        )
    finally:
        if kernels is not None:
            await kernels.aclose()
