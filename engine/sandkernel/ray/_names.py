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
when the last lease ends.

Each opening holds the name under a token of its own, numbered by its engine.
Every lease renewal lists the tokens the engine still holds or asks for, and
the registry frees the names of the others: a release lost on the way is
made good within one poll. A token released, or left out of a renewal, is
never granted afterwards, so a hold that reaches the registry after its
release (calls to an async actor may run in any order) is refused.

What it costs: opening an explicit name the engine does not know yet takes
one round trip to the head node (generated names, and names the engine
knows, take none). The first such opening in a namespace starts the
registry, an actor process on the head node, and an engine's first one takes
its lease. An engine that dies while holding a name blocks that name for the
other engines until its lease ends (``lease_ttl_s``).

The registry only guards a rare race, so it is no hard dependency: if it
cannot be started or reached within a few seconds, the engine logs why, once,
and opens names without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from sandkernel.errors import SandboxUnavailable

log = logging.getLogger(__name__)

REGISTRY_ACTOR_NAME = "sandkernel-session-names"
#: Ray's resource of the head node: a sliver of it pins the registry there.
_HEAD_NODE = "node:__internal_head__"
_MAX_CONCURRENCY = 4096  # calls in flight at once (most wait for a contested name)
#: How long an opening waits for the registry before going on without it.
_REACH_TIMEOUT_S = 5.0
#: How long a start of the registry may take in the background (a busy head is slow).
_START_TIMEOUT_S = 30.0
#: After the registry could not be started, openings skip it this long before trying again.
_RETRY_AFTER_S = 30.0
_HOLD_ATTEMPTS = 3  # registries tried in turn (one lost with its node, one exiting)
_UNAVAILABLE_PAUSE_S = 0.5  # before asking an actor that was out of reach again


@dataclass
class _Holder:
    client_id: str
    token: int
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Client:
    """An engine with a lease, and which of its tokens may still be granted."""

    lease_until: float  # monotonic
    #: the highest token any renewal knew of: tokens up to it not in ``listed`` are done
    known_up_to: int = 0
    listed: set[int] = field(default_factory=set)
    #: released since the last renewal (that renewal may not have known of them)
    released: set[int] = field(default_factory=set)

    def done_with(self, token: int) -> bool:
        """True once the engine released ``token`` or left it out of a renewal."""
        return token in self.released or (token <= self.known_up_to and token not in self.listed)

    def renewed(self, issued: int, holding: Iterable[int]) -> None:
        """Record a renewal: ``issued`` tokens so far, of which ``holding`` are in use.

        Renewals may arrive out of order: one judges only the tokens it knew
        of, and a token any renewal left out stays done.
        """
        holding = set(holding)
        self.listed = {t for t in self.listed if t in holding or t > issued} | {
            t for t in holding if t > self.known_up_to
        }
        self.known_up_to = max(self.known_up_to, issued)
        # Kept only while no renewal says so: bounded by the releases of one poll.
        self.released = {t for t in self.released if t in self.listed or t > self.known_up_to}


class NameRegistry:
    """The registry actor: the session names being opened, and which engine opens each."""

    def __init__(self) -> None:
        self._clients: dict[str, _Client] = {}
        self._held: dict[str, _Holder] = {}
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None

    async def join(
        self, client_id: str, lease_ttl_s: float, issued: int = 0, holding: Iterable[int] = ()
    ) -> bool:
        """Take or renew an engine's lease; False once the registry is closing.

        ``issued`` is how many tokens the engine has made, and ``holding`` those
        of its openings still going on: the names of its other tokens are freed.
        """
        if self._closing:
            return False
        until = time.monotonic() + lease_ttl_s
        client = self._clients.setdefault(client_id, _Client(until))
        client.lease_until = until
        client.renewed(issued, holding)
        for name, holder in list(self._held.items()):
            if holder.client_id == client_id and client.done_with(holder.token):
                self._free(name)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_leases(lease_ttl_s))
        return True

    async def hold(self, name: str, client_id: str, token: int) -> bool:
        """Hold ``name`` for ``token`` once no other token holds it.

        True at once if ``token`` holds it already (a retry whose first reply
        was lost). False if the registry is closing or the engine's lease has
        ended (it joins again), or if the engine is done with ``token`` (its
        caller left).
        """
        while True:
            client = self._clients.get(client_id)
            if self._closing or client is None or client.done_with(token):
                return False
            holder = self._held.get(name)
            if holder is None:
                break
            if holder.client_id == client_id and holder.token == token:
                return True
            await holder.released.wait()
        self._held[name] = _Holder(client_id, token)
        return True

    async def release(self, name: str, client_id: str, token: int) -> None:
        """Free ``name`` if ``token`` holds it; from now on ``token`` is never granted."""
        client = self._clients.get(client_id)
        if client is not None:
            client.released.add(token)
        holder = self._held.get(name)
        if holder is not None and holder.client_id == client_id and holder.token == token:
            self._free(name)

    async def leave(self, client_id: str) -> None:
        """An engine leaves: its names are freed; the last one to leave ends the registry."""
        self._clients.pop(client_id, None)
        self._free_names_of(client_id)
        if not self._clients:
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
            for client_id, client in list(self._clients.items()):
                if client.lease_until < now:
                    del self._clients[client_id]
                    self._free_names_of(client_id)
            if not self._clients:
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
        self._actor: Any = None  # joined, until found dead or closing
        self._issued = 0  # tokens made so far: each opening's is the next number
        self._holding: set[int] = set()  # tokens of the openings going on
        self._joining: asyncio.Task[Any] | None = None
        self._openings_wait_until = 0.0  # monotonic: openings wait for that start no longer
        self._retry_at = 0.0  # monotonic: no new start before
        self._warned: set[str] = set()

    @contextlib.asynccontextmanager
    async def holding(self, name: str) -> AsyncIterator[None]:
        """Hold ``name`` for the block: no other engine of the namespace opens it meanwhile.

        If the registry cannot be reached, the block runs without the hold
        (and the log says why, once).

        Raises:
            SandboxUnavailable: this process's Ray connection was shut down.
        """
        self._issued += 1
        token = self._issued
        self._holding.add(token)
        actor = None
        try:
            actor = await self._hold(name, token)
            yield
        finally:
            self._holding.discard(token)  # the next renewal frees it, should the release be lost
            if actor is not None:
                self._release(actor, name, token)

    async def renew(self, timeout_s: float) -> None:
        """Renew this engine's lease if it has joined (each pass of the reconciler)."""
        actor = self._actor
        if actor is None or not ray.is_initialized():
            return
        try:
            joined = await asyncio.wait_for(self._join_call(actor), timeout_s)
        except TimeoutError:
            return  # a busy head: the lease outlasts several passes, the next one tries again
        except ray.exceptions.ActorDiedError:
            joined = False
        except ray.exceptions.RayActorError:
            return  # alive, out of reach for now
        if not joined:
            self._forget(actor)  # joined again by the next hold

    async def leave(self) -> None:
        """Release this engine's lease (and with it the registry, if it was the last)."""
        joining, self._joining = self._joining, None
        if joining is not None:
            joining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await joining
        actor, self._actor = self._actor, None
        if actor is not None and ray.is_initialized():
            # The last to leave ends the registry, which may die before it answers.
            with contextlib.suppress(ray.exceptions.RayActorError, TimeoutError):
                await asyncio.wait_for(
                    asyncio.wrap_future(actor.leave.remote(self._client_id).future()), 10
                )

    async def _hold(self, name: str, token: int) -> Any:
        """Ask the registry for ``name``: the actor that holds it for ``token``, or None."""
        out_of_reach: Any = None  # an actor that may have granted the hold, unanswered
        for _ in range(_HOLD_ATTEMPTS):
            actor = await self._registry()
            if actor is None:
                self._given_up(out_of_reach, name, token)
                return None
            ref = actor.hold.remote(name, self._client_id, token)
            try:
                held = await asyncio.wrap_future(ref.future())
            except asyncio.CancelledError:
                if ray.is_initialized():
                    ray.cancel(ref)
                    self._release(actor, name, token)  # should the hold be granted all the same
                raise
            except ray.exceptions.ActorDiedError:
                self._forget(actor)  # its holds went with it
                continue
            except ray.exceptions.RayActorError:
                # It may have run the hold: asked again, it answers True at once if so.
                out_of_reach = actor
                await asyncio.sleep(_UNAVAILABLE_PAUSE_S)
                continue
            except Exception:
                self._release(actor, name, token)
                raise
            if held:
                return actor
            self._forget(actor)  # closing, or this engine's lease ended: join again
        self._given_up(out_of_reach, name, token)
        self._warn_once(
            "unanswered",
            f"the session name registry of Ray namespace {self._namespace!r} did not grant "
            f"a name in {_HOLD_ATTEMPTS} tries: names are opened without it for now (two "
            "engines opening one new name at the same moment could open it twice). Is the "
            "head node overloaded?",
        )
        return None

    def _given_up(self, out_of_reach: Any, name: str, token: int) -> None:
        if out_of_reach is not None:
            self._release(out_of_reach, name, token)  # in case it granted the hold unanswered

    def _release(self, actor: Any, name: str, token: int) -> None:
        if ray.is_initialized():  # else the registry frees it when the lease ends
            # Not awaited: the next holder waits for it, not this one.
            actor.release.remote(name, self._client_id, token)

    def _forget(self, actor: Any) -> None:
        if self._actor is actor:
            self._actor = None

    async def _registry(self) -> Any:
        """The registry with this engine's lease taken, or None if it is out of reach now."""
        if not ray.is_initialized():
            # Never let Ray's auto-connect open a new connection behind the caller's back.
            raise SandboxUnavailable("this process's Ray connection was shut down")
        if self._actor is not None:
            return self._actor
        joining = self._joining
        if joining is None:
            if time.monotonic() < self._retry_at:
                return None
            joining = self._joining = asyncio.create_task(
                self._join(), name="sandkernel-ray-name-registry-join"
            )
            self._openings_wait_until = time.monotonic() + _REACH_TIMEOUT_S
        # Shielded: the start goes on in the background, for the openings to come.
        wait_s = max(0.0, self._openings_wait_until - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(joining), wait_s)
        except TimeoutError:
            self._warn_once(
                "slow",
                f"the session name registry of Ray namespace {self._namespace!r} did not "
                f"answer within {_REACH_TIMEOUT_S:.0f} s: names are opened without it until it "
                "does (two engines opening one new name at the same moment could open it "
                "twice). Is the head node overloaded, or out of room for one more actor?",
            )
            return None

    async def _join(self) -> Any:
        """Start the registry if need be and take this engine's lease: the actor, or None."""
        try:
            actor = await self._start_and_join()
        finally:
            self._joining = None
        if actor is None:
            self._retry_at = time.monotonic() + _RETRY_AFTER_S
        else:
            self._actor = actor
        return actor

    async def _start_and_join(self) -> Any:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                actor = self._start_registry()
            except Exception as exc:  # refused by Ray: no reason to fail an opening
                self._creation_failed(exc)
                return None
            try:
                joined = await asyncio.wait_for(
                    self._join_call(actor), max(0.0, deadline - time.monotonic())
                )
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:
                    self._creation_failed(exc)
                    return None
                joined = False  # it exited meanwhile (its name is free again), or was out of reach
            except TimeoutError:
                self._warn_once(
                    "start",
                    f"the session name registry of Ray namespace {self._namespace!r} did not "
                    f"start within {_START_TIMEOUT_S:.0f} s: does the head node have room for "
                    "one more actor process? Names are opened without it meanwhile.",
                )
                return None
            except ray.exceptions.RayError as exc:
                self._creation_failed(exc)  # unschedulable, runtime env not set up…
                return None
            if joined:
                return actor
            if time.monotonic() > deadline:
                self._warn_once(
                    "closing",
                    f"the session name registry of Ray namespace {self._namespace!r} kept "
                    f"closing for {_START_TIMEOUT_S:.0f} s: names are opened without it meanwhile",
                )
                return None
            await asyncio.sleep(0.2)  # until the closing registry has exited

    def _start_registry(self) -> Any:
        """A handle on the namespace's registry, which Ray starts if none runs."""
        if self._remote_registry is None:
            self._remote_registry = ray.remote(NameRegistry)
        return self._remote_registry.options(
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

    def _join_call(self, actor: Any) -> asyncio.Future[bool]:
        ref = actor.join.remote(
            self._client_id, self._lease_ttl_s, self._issued, sorted(self._holding)
        )
        return asyncio.wrap_future(ref.future())

    def _creation_failed(self, exc: BaseException) -> None:
        self._warn_once(
            "creation",
            f"the session name registry of Ray namespace {self._namespace!r} could not be "
            f"created on the head node: {exc}\nIs sandkernel installed (importable by the "
            "head node's Python) and is there room for one more actor? Names are opened "
            "without it meanwhile.",
        )

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message)
