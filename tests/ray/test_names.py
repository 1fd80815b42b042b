"""The session name registry without a cluster: its actor class as a plain asyncio object.

The engine's side (:class:`SessionNames`) talks to it through a stand-in for
Ray's actor handle that runs each call in this loop and can lose a reply,
lose a call, never answer, or be dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from sandkernel.ray import _names  # noqa: E402 - after the skip
from sandkernel.ray._names import NameRegistry, SessionNames  # noqa: E402 - after the skip

pytestmark = [pytest.mark.ray, pytest.mark.anyio]

TTL_S = 60.0
DEADLINE_S = 5.0  # for what should happen at once: a hang fails, it does not stall the run


@pytest.fixture
async def registry() -> AsyncIterator[NameRegistry]:
    registry = NameRegistry()
    yield registry
    if registry._watcher is not None:
        registry._watcher.cancel()


async def granted(call: Any) -> bool:
    """The answer of a registry call that should come at once."""
    async with asyncio.timeout(DEADLINE_S):
        result: bool = await call
        return result


def holder_of(registry: NameRegistry, name: str) -> tuple[str, int] | None:
    holder = registry._held.get(name)
    return None if holder is None else (holder.client_id, holder.token)


async def test_a_hold_asked_again_by_its_holder_is_granted_at_once(
    registry: NameRegistry,
) -> None:
    await registry.join("a", TTL_S, issued=1, holding=[1])
    assert await granted(registry.hold("n", "a", 1))
    # The first reply was lost and the engine asks again: no waiting on itself.
    assert await granted(registry.hold("n", "a", 1))
    assert holder_of(registry, "n") == ("a", 1)


async def test_a_hold_that_arrives_after_its_release_is_refused(registry: NameRegistry) -> None:
    await registry.join("a", TTL_S, issued=1, holding=[1])
    await registry.join("b", TTL_S, issued=1, holding=[1])
    # The caller left: its release ran before its hold did.
    await registry.release("n", "a", 1)
    assert not await granted(registry.hold("n", "a", 1))
    assert holder_of(registry, "n") is None
    assert await granted(registry.hold("n", "b", 1))


async def test_a_waiter_whose_caller_left_is_refused_and_the_next_one_gets_the_name(
    registry: NameRegistry,
) -> None:
    for client in ("a", "b", "c"):
        await registry.join(client, TTL_S, issued=1, holding=[1])
    assert await granted(registry.hold("n", "a", 1))
    left = asyncio.create_task(registry.hold("n", "b", 1))
    staying = asyncio.create_task(registry.hold("n", "c", 1))
    await registry.release("n", "b", 1)
    await registry.release("n", "a", 1)
    async with asyncio.timeout(DEADLINE_S):
        assert await left is False
        assert await staying is True
    assert holder_of(registry, "n") == ("c", 1)


async def test_a_renewal_frees_the_names_of_the_tokens_it_does_not_list(
    registry: NameRegistry,
) -> None:
    await registry.join("a", TTL_S, issued=1, holding=[1])
    await registry.join("b", TTL_S, issued=1, holding=[1])
    assert await granted(registry.hold("n", "a", 1))
    waiting = asyncio.create_task(registry.hold("n", "b", 1))
    # Engine a is done with token 1, but its release never arrived.
    await registry.join("a", TTL_S, issued=1, holding=[])
    assert await granted(waiting)
    assert holder_of(registry, "n") == ("b", 1)
    assert not await granted(registry.hold("m", "a", 1))  # a late hold of that token


async def test_a_renewal_judges_only_the_tokens_made_before_it(registry: NameRegistry) -> None:
    await registry.join("a", TTL_S, issued=2, holding=[1, 2])
    assert await granted(registry.hold("n", "a", 2))
    assert await granted(registry.hold("m", "a", 3))  # made after that renewal
    # Renewals overtaken by the hold of token 3, and by each other.
    await registry.join("a", TTL_S, issued=2, holding=[2])
    await registry.join("a", TTL_S, issued=1, holding=[1])
    assert holder_of(registry, "n") == ("a", 2)
    assert holder_of(registry, "m") == ("a", 3)
    # Left out by one renewal that knew of it, token 1 stays done whatever came before.
    assert not await granted(registry.hold("k", "a", 1))
    await registry.join("a", TTL_S, issued=3, holding=[3])
    assert holder_of(registry, "n") is None
    assert holder_of(registry, "m") == ("a", 3)


async def test_released_tokens_are_remembered_only_until_a_renewal_covers_them(
    registry: NameRegistry,
) -> None:
    await registry.join("a", TTL_S, issued=0, holding=[])
    for token in range(1, 101):
        assert await granted(registry.hold(f"n{token}", "a", token))
        await registry.release(f"n{token}", "a", token)
    client = registry._clients["a"]
    assert len(client.released) == 100
    await registry.join("a", TTL_S, issued=100, holding=[])
    assert client.released == set() and client.listed == set()
    assert not await granted(registry.hold("n7", "a", 7))


# The engine's side, against a registry behind a stand-in for Ray's actor handle.


class FakeRef:
    """A call's reply, as Ray's ObjectRef gives it: ``future()``; cancelled by ``ray.cancel``."""

    def __init__(
        self, reply: concurrent.futures.Future[Any], task: asyncio.Task[Any] | None
    ) -> None:
        self.reply = reply
        self.task = task

    def future(self) -> concurrent.futures.Future[Any]:
        return self.reply

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class FakeMethod:
    def __init__(self, actor: FakeActor, method: str) -> None:
        self.actor = actor
        self.method = method

    def remote(self, *args: Any) -> FakeRef:
        return self.actor.call(self.method, args)


class FakeActor:
    """A :class:`NameRegistry` run in this loop, reached as Ray's actor handles are."""

    def __init__(self, registry: NameRegistry) -> None:
        self.registry = registry
        self.calls: list[str] = []
        self.dead: BaseException | None = None  # every call raises it
        self.reply_lost: set[str] = set()  # the next call runs, its caller gets no answer
        self.call_lost: set[str] = set()  # the next call never arrives
        self.silent: set[str] = set()  # calls that never arrive nor answer (a swamped head)
        self.cancel_ignored = False  # ray.cancel is best effort: the call may run on
        self.tasks: list[tuple[str, asyncio.Task[Any]]] = []

    def __getattr__(self, method: str) -> FakeMethod:
        return FakeMethod(self, method)

    async def ran(self, method: str) -> None:
        """Until every call of ``method`` made so far has run in the registry."""
        await asyncio.gather(*(t for m, t in self.tasks if m == method))

    def call(self, method: str, args: tuple[Any, ...]) -> FakeRef:
        self.calls.append(method)
        reply: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.dead is not None:
            reply.set_exception(self.dead)
            return FakeRef(reply, None)
        if method in self.call_lost or method in self.silent:
            self.call_lost.discard(method)
            return FakeRef(reply, None)
        task = asyncio.get_running_loop().create_task(getattr(self.registry, method)(*args))
        self.tasks.append((method, task))
        lost = method in self.reply_lost
        self.reply_lost.discard(method)

        def answer(done: asyncio.Task[Any]) -> None:
            if reply.done():
                return
            if lost:
                reply.set_exception(ray.exceptions.ActorUnavailableError("connection reset", None))
            elif done.cancelled():
                reply.cancel()
            elif done.exception() is not None:
                reply.set_exception(done.exception())
            else:
                reply.set_result(done.result())

        task.add_done_callback(answer)
        return FakeRef(reply, None if self.cancel_ignored else task)


@pytest.fixture
def connected(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ray as if connected; ``ray.cancel`` cancels a stand-in call."""
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cancel", lambda ref, **_: ref.cancel())
    yield


@pytest.fixture
async def actor(registry: NameRegistry, connected: None) -> AsyncIterator[FakeActor]:
    actor = FakeActor(registry)
    yield actor
    for _, task in actor.tasks:
        task.cancel()
    await asyncio.gather(*(t for _, t in actor.tasks), return_exceptions=True)


def engine_side(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, client_id: str = "engine-a"
) -> SessionNames:
    names = SessionNames("ns", client_id, TTL_S)
    monkeypatch.setattr(names, "_start_registry", lambda: actor)
    return names


async def test_a_hold_whose_reply_was_lost_is_asked_again_and_granted(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, registry: NameRegistry
) -> None:
    monkeypatch.setattr(_names, "_UNAVAILABLE_PAUSE_S", 0.0)
    names = engine_side(monkeypatch, actor)
    actor.reply_lost.add("hold")
    async with asyncio.timeout(DEADLINE_S):
        async with names.holding("n"):
            assert holder_of(registry, "n") == ("engine-a", 1)
            assert actor.calls.count("hold") == 2
        await actor.ran("release")
    assert holder_of(registry, "n") is None


async def test_a_lost_release_is_made_good_by_the_next_renewal(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, registry: NameRegistry
) -> None:
    names = engine_side(monkeypatch, actor)
    actor.call_lost.add("release")
    async with asyncio.timeout(DEADLINE_S):
        async with names.holding("n"):
            # A renewal while the name is held keeps it held.
            await names.renew(DEADLINE_S)
            assert holder_of(registry, "n") == ("engine-a", 1)
    assert holder_of(registry, "n") == ("engine-a", 1)  # the release never arrived
    await names.renew(DEADLINE_S)
    assert holder_of(registry, "n") is None
    other = engine_side(monkeypatch, actor, client_id="engine-b")
    async with asyncio.timeout(DEADLINE_S), other.holding("n"):
        assert holder_of(registry, "n") == ("engine-b", 1)


async def test_an_opening_cancelled_while_it_waits_never_gets_the_name(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, registry: NameRegistry
) -> None:
    first = engine_side(monkeypatch, actor, client_id="engine-a")
    second = engine_side(monkeypatch, actor, client_id="engine-b")
    actor.cancel_ignored = True  # the hold stays queued in the registry
    second_sent = asyncio.Event()
    hold = registry.hold

    async def noting_hold(name: str, client_id: str, token: int) -> bool:
        if client_id == "engine-b":
            second_sent.set()
        return await hold(name, client_id, token)

    monkeypatch.setattr(registry, "hold", noting_hold)

    async def open_second() -> None:
        async with second.holding("n"):
            pytest.fail("the second engine got a name the first one held")

    async with asyncio.timeout(DEADLINE_S):
        async with first.holding("n"):
            waiting = asyncio.create_task(open_second())
            await second_sent.wait()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert actor.calls.count("release") == 1  # sent as the opening was cancelled
        # The second engine's hold, still queued, wakes when the first lets go: refused.
        await actor.ran("hold")
        assert holder_of(registry, "n") is None
        third = engine_side(monkeypatch, actor, client_id="engine-c")
        async with third.holding("n"):
            assert holder_of(registry, "n") == ("engine-c", 1)


async def test_a_renewal_that_times_out_keeps_the_registry_and_the_lease(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, registry: NameRegistry
) -> None:
    names = engine_side(monkeypatch, actor)
    async with asyncio.timeout(DEADLINE_S), names.holding("n"):
        lease = registry._clients["engine-a"].lease_until
        actor.silent.add("join")
        await names.renew(0.01)
        assert names._actor is actor
        actor.silent.clear()
        await names.renew(DEADLINE_S)  # the next pass renews it
        assert registry._clients["engine-a"].lease_until > lease
        assert holder_of(registry, "n") == ("engine-a", 1)


@pytest.mark.parametrize("answer", ["closing", "dead"], ids=["registry-closing", "registry-dead"])
async def test_a_renewal_drops_a_registry_that_is_closing_or_dead(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, registry: NameRegistry, answer: str
) -> None:
    names = engine_side(monkeypatch, actor)
    async with asyncio.timeout(DEADLINE_S), names.holding("n"):
        pass
    assert names._actor is actor
    if answer == "closing":
        registry._closing = True
    else:
        actor.dead = ray.exceptions.ActorDiedError()
    await names.renew(DEADLINE_S)
    assert names._actor is None


async def test_an_unreachable_registry_lets_names_open_without_it_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=_names.__name__)
    monkeypatch.setattr(_names, "_REACH_TIMEOUT_S", 0.2)
    names = engine_side(monkeypatch, actor)
    actor.silent.add("join")  # pending forever: no room for it, or a swamped head
    opened = []
    async with asyncio.timeout(DEADLINE_S):
        for name in ("n", "m", "k"):
            async with names.holding(name):
                opened.append(name)
    assert opened == ["n", "m", "k"]
    assert actor.calls.count("join") == 1  # one start, still going on in the background
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "did not answer within" in warnings[0], warnings
    async with asyncio.timeout(DEADLINE_S):
        await names.leave()
    assert names._joining is None


async def test_a_registry_that_cannot_be_created_is_logged_as_such_and_skipped_a_while(
    monkeypatch: pytest.MonkeyPatch, actor: FakeActor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=_names.__name__)
    names = engine_side(monkeypatch, actor)
    actor.dead = ray.exceptions.RayActorError(
        error_msg="ModuleNotFoundError: No module named 'sandkernel'", actor_init_failed=True
    )
    async with asyncio.timeout(DEADLINE_S):
        for name in ("n", "m"):
            async with names.holding(name):
                pass
    assert actor.calls == ["join"]  # the second opening did not try again
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "could not be created" in warning and "No module named 'sandkernel'" in warning
    assert "importable" in warning
