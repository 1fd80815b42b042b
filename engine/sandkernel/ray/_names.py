"""One opening of a session name at a time, across every engine of a namespace.

A name an engine does not know is looked up on every host, then opened on the
emptiest if no host has it (see ``_routing``). Two engines doing so at once
would each find nothing and open it on a node of their own: two live sessions
of one name. So an engine holds the name in the namespace's registry while it
looks the name up and opens it; another engine wanting the name meanwhile
waits, then finds the first one's session and gets it, as a second caller of
``Engine.session`` gets the session a first caller is making.

The registry is one detached actor per namespace, on the head node (it goes
only with the cluster). It holds only the names being opened, and lives as
the hosts do: each engine's poll renews its lease, and the registry exits
when the last lease ends. A name held by an engine that stopped renewing is
freed with its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray

from sandkernel.errors import SandboxUnavailable

REGISTRY_ACTOR_NAME = "sandkernel-session-names"
#: Ray's resource of the head node: a sliver of it pins the registry there.
_HEAD_NODE = "node:__internal_head__"
_MAX_CONCURRENCY = 4096  # calls in flight at once (most wait for a contested name)
_JOIN_TIMEOUT_S = 30.0
_HOLD_ATTEMPTS = 3  # registries tried in turn (one lost with its node, one exiting)


@dataclass
class _Holder:
    client_id: str
    token: str
    released: asyncio.Event = field(default_factory=asyncio.Event)


class NameRegistry:
    """The registry actor: the session names being opened, and which engine opens each."""

    def __init__(self) -> None:
        self._leases: dict[str, float] = {}  # client id -> lease end (monotonic)
        self._held: dict[str, _Holder] = {}
        self._waiting: set[str] = set()  # tokens of holds not granted yet
        #: tokens released while waiting (their caller left): never granted
        self._abandoned: set[str] = set()
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None

    async def join(self, client_id: str, lease_ttl_s: float) -> bool:
        """Take or renew an engine's lease; False once the registry is closing."""
        if self._closing:
            return False
        self._leases[client_id] = time.monotonic() + lease_ttl_s
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_leases(lease_ttl_s))
        return True

    async def hold(self, name: str, client_id: str, token: str) -> bool:
        """Hold ``name`` for ``token`` once no other holds it.

        False if the registry is closing or the engine's lease has ended (it
        joins again), or if ``token`` was released meanwhile (its caller left).
        """
        self._waiting.add(token)
        try:
            while (holder := self._held.get(name)) is not None:
                await holder.released.wait()
            if token in self._abandoned or self._closing or client_id not in self._leases:
                return False
            self._held[name] = _Holder(client_id, token)
            return True
        finally:
            self._waiting.discard(token)
            self._abandoned.discard(token)

    async def release(self, name: str, token: str) -> None:
        """Free ``name`` if ``token`` holds it; if ``token`` still waits, it is refused."""
        holder = self._held.get(name)
        if holder is not None and holder.token == token:
            self._free(name)
        elif token in self._waiting:
            self._abandoned.add(token)

    async def leave(self, client_id: str) -> None:
        """An engine leaves: its names are freed; the last one to leave ends the registry."""
        self._leases.pop(client_id, None)
        self._free_names_of(client_id)
        if not self._leases:
            self._exit()

    def _free(self, name: str) -> None:
        self._held.pop(name).released.set()

    def _free_names_of(self, client_id: str) -> None:
        for name in [n for n, h in self._held.items() if h.client_id == client_id]:
            self._free(name)

    async def _watch_leases(self, lease_ttl_s: float) -> None:
        period = max(0.5, min(5.0, lease_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for client_id, until in list(self._leases.items()):
                if until < now:
                    del self._leases[client_id]
                    self._free_names_of(client_id)
            if not self._leases:
                self._exit()
                return

    def _exit(self) -> None:
        if self._closing:
            return
        self._closing = True
        for name in list(self._held):
            self._free(name)  # waiters are refused, and join the next registry
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class SessionNames:
    """An engine's side of the registry: holds a name while the engine opens it."""

    def __init__(self, namespace: str, client_id: str, lease_ttl_s: float) -> None:
        self._namespace = namespace
        self._client_id = client_id
        self._lease_ttl_s = lease_ttl_s
        self._remote_registry: Any = None
        self._actor: Any = None  # joined, until found gone or closing

    @contextlib.asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[None]:
        """Hold ``name`` for the block: no other engine of the namespace opens it meanwhile.

        Raises:
            SandboxUnavailable: no registry could be reached.
        """
        token = secrets.token_hex(8)
        for _ in range(_HOLD_ATTEMPTS):
            actor = await self._joined()
            ref = actor.hold.remote(name, self._client_id, token)
            try:
                held = await asyncio.wrap_future(ref.future())
            except asyncio.CancelledError:
                if ray.is_initialized():
                    ray.cancel(ref)
                    actor.release.remote(name, token)  # should the hold be granted all the same
                raise
            except ray.exceptions.RayActorError:
                held = False  # lost, or exited: the holds went with it
            if held:
                break
            self._actor = None
        else:
            raise SandboxUnavailable(
                f"the session name registry of Ray namespace {self._namespace!r} did not "
                f"answer {_HOLD_ATTEMPTS} times in turn: is the head node overloaded?"
            )
        try:
            yield
        finally:
            if ray.is_initialized():  # else the registry frees it when the lease ends
                actor.release.remote(name, token)  # the next holder waits for it, not this one

    async def renew(self, timeout_s: float) -> None:
        """Renew this engine's lease if it has joined (each pass of the reconciler)."""
        actor = self._actor
        if actor is None or not ray.is_initialized():
            return
        try:
            joined = await asyncio.wait_for(
                asyncio.wrap_future(actor.join.remote(self._client_id, self._lease_ttl_s).future()),
                timeout_s,
            )
        except (ray.exceptions.RayActorError, TimeoutError):
            joined = False
        if not joined and self._actor is actor:
            self._actor = None  # joined again by the next hold

    async def leave(self) -> None:
        """Release this engine's lease (and with it the registry, if it was the last)."""
        actor, self._actor = self._actor, None
        if actor is not None and ray.is_initialized():
            # The last to leave ends the registry, which may die before it answers.
            with contextlib.suppress(ray.exceptions.RayActorError, TimeoutError):
                await asyncio.wait_for(
                    asyncio.wrap_future(actor.leave.remote(self._client_id).future()), 10
                )

    async def _joined(self) -> Any:
        """The registry, started if need be, with this engine's lease taken."""
        if not ray.is_initialized():
            # Never let Ray's auto-connect open a new connection behind the caller's back.
            raise SandboxUnavailable("this process's Ray connection was shut down")
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        while True:
            if self._actor is not None:
                return self._actor
            if self._remote_registry is None:
                self._remote_registry = ray.remote(NameRegistry)
            actor = self._remote_registry.options(
                name=REGISTRY_ACTOR_NAME,
                namespace=self._namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                resources={_HEAD_NODE: 0.001},
                max_restarts=0,
                max_task_retries=0,
                max_concurrency=_MAX_CONCURRENCY,
            ).remote()
            try:
                ref = actor.join.remote(self._client_id, self._lease_ttl_s)
                joined = await asyncio.wait_for(asyncio.wrap_future(ref.future()), _JOIN_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                joined = False  # it exited meanwhile: its name is free again
            except TimeoutError:
                raise SandboxUnavailable(
                    f"the session name registry of Ray namespace {self._namespace!r} did "
                    f"not start within {_JOIN_TIMEOUT_S:.0f} s: does the head node have "
                    "room for one more actor process?"
                ) from None
            if joined:
                self._actor = actor
                return actor
            if time.monotonic() > deadline:
                raise SandboxUnavailable(
                    f"the session name registry of Ray namespace {self._namespace!r} kept "
                    "closing: every engine of the namespace left meanwhile"
                )
            await asyncio.sleep(0.2)  # until the closing registry has exited
