"""A batch pool's sandboxes spawned before its policy model is loaded, and checked after.

A short run of ``sandkernel eval`` spends most of its start in imports
(asyncio, pydantic and the policy model, nsjail's config classes) before it
can render its sandboxes' nsjail config and spawn them, and the sandboxes
then boot for about as long again. :func:`prestart` spawns them first, from
a *recipe* that an earlier start with the same policy left: the limits its
sandboxes were prepared with, the fork server's settings, and the nsjail
config as rendered then for a stand-in kernel. They boot while the command
imports the rest.

Nothing is taken on trust from a recipe. The :class:`~sandkernel.batch.BatchPool`
that is handed the prestarted servers renders each one's config from the
policy itself and compares it, with the limits and the server's command,
to what the server was started with; it adopts the server only if all are
equal, and otherwise stops it, starts a worker from the policy in its place
and writes the recipe anew. No request reaches a server before that check:
all that runs in a sandbox not checked yet is the server's own start.

Recipes live in the runtime folder (``/run/sandkernel/recipes``, which a
reboot empties), one JSON file per policy and preload, root's alone: a file
not owned by the engine's user or writable by anyone else is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandkernel._tasks import wait_out
from sandkernel.batch.worker import ServerSettings, SpawnedServer, spawn_server
from sandkernel.sandbox.host import SandboxHost
from sandkernel.sandbox.jail import Jail
from sandkernel.sandbox.layout import KernelLayout, fill_stand_in, stands_in
from sandkernel.sandbox.limits import JAIL_LIMIT_FIELDS

if TYPE_CHECKING:
    from sandkernel.policy import Policy
    from sandkernel.sandbox.limits import JailLimits

#: Bumped when a recipe's fields change: older files are then not read.
RECIPE_FORMAT = 1
#: The folder of recipes, in the runtime folder.
RECIPES_DIR = "recipes"
#: The OOM-kill descriptor's number in a recipe's config, replaced by the
#: server's own (as the stand-in kernel's id and folder are by its own).
_FD_STAND_IN = 1_023_456_789
_FD_STAND_INS = re.compile(rf"\b{_FD_STAND_IN}\b")
#: A recipe is about 6 KB; a larger file is not one.
_RECIPE_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    """A policy's :class:`~sandkernel.sandbox.limits.JailLimits`, as plain values."""

    memory_mb: int
    cpus: float
    pids_max: int
    workspace_mb: int
    workspace_inodes: int
    nofile: int
    file_size_mb: int

    @classmethod
    def of(cls, limits: JailLimits) -> Limits:
        return cls(**{name: getattr(limits, name) for name in JAIL_LIMIT_FIELDS})


class _Unfit(Exception):
    """The recipe does not fit this server (its kernel's folder, its descriptors)."""


@dataclass(frozen=True)
class Recipe:
    """What a policy's fork servers were started with, for a start before the policy is loaded."""

    limits: Limits
    settings: ServerSettings
    #: the servers were passed a descriptor to read OOM kills from
    oom_kills_fd: bool
    #: the nsjail config, for the stand-in kernel and descriptor
    template: str

    def config(self, layout: KernelLayout, pass_fds: Sequence[int]) -> str:
        """The config for a server in ``layout`` passed ``pass_fds``; :class:`_Unfit` if none."""
        if not stands_in(layout) or bool(pass_fds) != self.oom_kills_fd:
            raise _Unfit
        text = fill_stand_in(self.template, layout)
        return _FD_STAND_INS.sub(str(pass_fds[0]), text) if pass_fds else text

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["format"] = RECIPE_FORMAT
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        """Raises ValueError, TypeError or KeyError if ``text`` is not a recipe of this format."""
        data = json.loads(text)
        if data.pop("format") != RECIPE_FORMAT:
            raise ValueError("another format")
        settings: dict[str, Any] = data.pop("settings")
        settings["preload"] = tuple(settings["preload"])
        template = data.pop("template")
        if not isinstance(template, str):
            raise TypeError("template")
        return cls(
            limits=Limits(**data.pop("limits")),
            settings=ServerSettings(**settings),
            oom_kills_fd=bool(data.pop("oom_kills_fd")),
            template=template,
            **data,
        )


def recipe_file(root: Path, policy: str | None, preload: Sequence[str]) -> Path:
    """Where the recipe of ``policy`` (a name or a TOML path) and ``preload`` is kept."""
    name = policy or "default"
    if name.endswith(".toml") or os.path.isfile(name):
        name = os.path.abspath(name)
    key = json.dumps([name, list(preload)])
    return root / RECIPES_DIR / f"{sha256(key.encode()).hexdigest()[:32]}.json"


def read_recipe(path: Path) -> Recipe | None:
    """The recipe in ``path``; None if there is none, or none to trust (kind, owner, mode, format).

    Only a regular file (not a link, not a FIFO that would block the read,
    at most :data:`_RECIPE_MAX_BYTES`) that the engine's user owns and no one
    else may write.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or info.st_mode & 0o022
            or info.st_size > _RECIPE_MAX_BYTES
        ):
            return None
        try:
            return Recipe.from_json(file.read(_RECIPE_MAX_BYTES).decode("utf-8"))
        except (ValueError, TypeError, KeyError, AttributeError):  # UnicodeDecodeError too
            return None


def write_recipe(path: Path, recipe: Recipe) -> None:
    """Write ``recipe`` to ``path`` whole (a new file renamed onto it), readable by root alone."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")  # 0600
    try:
        with open(fd, "w", encoding="utf-8") as file:
            file.write(recipe.to_json())
        os.replace(temporary, path)
    except BaseException:
        # A full disk, say: nothing is left of it, and the recipe there (if
        # any) is as it was.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def make_recipe(
    host: SandboxHost, policy: Policy, settings: ServerSettings, *, oom_kills_fd: bool
) -> Recipe:
    """The recipe of servers started with ``settings`` in jails of ``policy`` on ``host``."""
    fds = (_FD_STAND_IN,) if oom_kills_fd else ()
    template = host.configs.template(
        policy, host.runtime, settings.argv(fds[0] if fds else None), pass_fds=fds
    )
    return Recipe(Limits.of(policy), settings, oom_kills_fd, template)


class Prestarted:
    """Fork servers spawned from a recipe, on a host of their own, for a pool to check and adopt.

    Made by :func:`prestart`. Owns its host and servers until a
    :class:`~sandkernel.batch.BatchPool` takes them (``prestarted=``);
    :meth:`aclose` removes what no pool took.
    """

    def __init__(
        self, host: SandboxHost, path: Path, recipe: Recipe | None, servers: list[SpawnedServer]
    ) -> None:
        self.host = host
        self.path = path
        self.recipe = recipe
        self.servers = servers
        #: the recipe read is not what this start would write (a server did not
        #: fit, or it is for another runtime): it is written again
        self.stale = False

    async def take(self, policy: Policy, settings: ServerSettings) -> SpawnedServer | None:
        """A server that fits ``policy`` and ``settings``, checked now; None when none is left.

        One that does not fit is stopped and removed (and the recipe is
        written again by :meth:`remember`).
        """
        while self.servers:
            server = self.servers.pop(0)
            if self.fits(server, policy, settings):
                server.jail.policy = policy
                return server
            self.stale = True
            await _remove(server)
        return None

    def fits(self, server: SpawnedServer, policy: Policy, settings: ServerSettings) -> bool:
        """Whether ``server`` is what ``policy`` and ``settings`` would have started."""
        layout = server.jail.layout
        if layout is None or Limits.of(server.jail.limits) != Limits.of(policy):
            return False
        argv = settings.argv(server.pass_fds[0] if server.pass_fds else None)
        expected = self.host.configs.text(
            policy, layout, self.host.runtime, argv, pass_fds=server.pass_fds
        )
        return server.argv == argv and server.config_text == expected

    def remember(self, policy: Policy, settings: ServerSettings, *, oom_kills_fd: bool) -> None:
        """Write the recipe of this start, unless the one read was found to fit it."""
        if self.recipe is not None and not self.stale:
            return
        recipe = make_recipe(self.host, policy, settings, oom_kills_fd=oom_kills_fd)
        if recipe != self.recipe:
            with contextlib.suppress(OSError):  # the next start is then as this one was
                write_recipe(self.path, recipe)
            self.recipe = recipe

    async def discard(self) -> None:
        """Stop and remove every server no pool took (the host stays)."""
        while self.servers:
            await _remove(self.servers.pop())

    async def aclose(self) -> None:
        """:meth:`discard`, and release the host."""
        try:
            await self.discard()
        finally:
            self.host.close()


async def prestart(
    policy: str | None, *, workers: int, preload: tuple[str, ...]
) -> Prestarted | None:
    """Spawn ``workers`` fork servers from the recipe of ``policy``, if it has one.

    Returns None if the host cannot be had here (the pool's own start then
    says why); a :class:`Prestarted` without servers if there is no recipe,
    or it is not for this runtime and ``preload``, or a spawn failed (the pool
    then starts its workers from the policy, and writes the recipe).
    """
    try:
        host = SandboxHost()
    except Exception:
        return None
    path = recipe_file(host.root, policy, preload)
    recipe = read_recipe(path)
    prestarted = Prestarted(host, path, recipe, [])
    if recipe is None:
        return prestarted
    if recipe.settings.python != host.runtime.python or recipe.settings.preload != preload:
        prestarted.stale = True
        return prestarted
    try:
        for _ in range(workers):
            prestarted.servers.append(await _spawn(host, recipe))
    except Exception:
        # A prestart is only ever a head start: what failed is left to the
        # pool's start from the policy, which reports its own errors.
        await prestarted.discard()
        prestarted.stale = True
    except BaseException:
        # Cancelled, or ^C: what was spawned goes, to the end even if
        # cancelled again meanwhile.
        await wait_out(asyncio.ensure_future(prestarted.aclose()))
        raise
    return prestarted


async def _spawn(host: SandboxHost, recipe: Recipe) -> SpawnedServer:
    jail = Jail(host, None, limits=recipe.limits)
    layout = await jail.prepare()  # undone if it fails or is cancelled
    try:
        return spawn_server(
            jail, recipe.settings, lambda _argv, pass_fds: recipe.config(layout, pass_fds)
        )
    except BaseException:
        await jail.destroy()
        raise


async def _remove(server: SpawnedServer) -> None:
    """Stop a server no worker took and remove its jail."""
    server.close()  # EOF on its stdin: the server exits
    try:
        await server.jail.stop(terminate=False)
    finally:
        await server.jail.destroy()
