"""A batch pool's sandboxes spawned from a recipe before the policy is loaded, and checked.

A recipe is trusted for nothing: the pool adopts a prestarted server only
if the config it runs under is what the policy renders, and its limits and
command are the policy's; any other is removed and the recipe rewritten.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandkernel.batch import BatchPool, RunRequest
from sandkernel.batch import prestart as prestart_module
from sandkernel.batch.prestart import (
    _FD_STAND_IN,
    Limits,
    Prestarted,
    Recipe,
    _Unfit,
    make_recipe,
    prestart,
    read_recipe,
    recipe_file,
    write_recipe,
)
from sandkernel.batch.worker import DEFAULT_PRELOAD as _DEFAULT
from sandkernel.batch.worker import ServerSettings
from sandkernel.errors import PolicyError
from sandkernel.policy import load_policy
from sandkernel.sandbox.layout import STAND_IN, KernelLayout

sandbox = pytest.mark.sandbox
PRELOAD = ("math",)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime folder of the test's own, for every host it makes; checked empty after."""
    root = Path(tempfile.mkdtemp(prefix="skp-", dir="/run"))
    monkeypatch.setenv("SANDKERNEL_RUNTIME_DIR", str(root))
    yield root
    shutil.rmtree(root / "recipes", ignore_errors=True)
    left = list(root.iterdir())
    shutil.rmtree(root, ignore_errors=True)
    assert left == []


def _recipe(template: str = "x", *, oom_kills_fd: bool = True) -> Recipe:
    settings = ServerSettings(
        python="/usr/bin/python3", preload=PRELOAD, file_size_mb=64, nofile=1024,
        output_max_bytes=1 << 20, fetch_max_bytes=1 << 20,
    )  # fmt: skip
    return Recipe(Limits.of(load_policy()), settings, oom_kills_fd, template)


class _FullDisk(Recipe):
    """A recipe whose writing fails half-way, as on a full disk."""

    def to_json(self) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _traces(prestarted: Prestarted) -> list[str]:
    """What the host of ``prestarted`` has on the machine: kernel folders and cgroups."""
    host = prestarted.host
    found = [str(p) for p in host.root.glob(f"{host.owner}-*")]
    for parent in host.cgroups.parent_dirs():
        found += [str(p) for p in parent.glob(f"{host.owner}-*")]
    return found


async def _check_sum(pool: BatchPool) -> None:
    result = await pool.run(RunRequest(code="import math; print(math.fsum([0.5, 0.25]))"))
    assert (result.status, result.stdout) == ("ok", "0.75\n")


# ---------------------------------------------------------------------------
# recipes, without a sandbox


def test_a_recipe_becomes_a_kernels_config_with_its_folder_id_and_descriptor() -> None:
    template = (
        f"dst: {STAND_IN.root}/conn\nname: {STAND_IN.kernel_id}\npass_fd: {_FD_STAND_IN}\n"
        f'arg: "{{\\"oom_kills_fd\\": {_FD_STAND_IN}}}"\n'
    )
    layout = KernelLayout("123-abcd0123-0123abcd", Path("/run/sandkernel/123-abcd0123-0123abcd"))
    assert _recipe(template).config(layout, (9,)) == (
        f"dst: {layout.root}/conn\nname: {layout.kernel_id}\npass_fd: 9\n"
        'arg: "{\\"oom_kills_fd\\": 9}"\n'
    )
    with pytest.raises(_Unfit):  # the recipe's server was passed a descriptor
        _recipe(template).config(layout, ())
    with pytest.raises(_Unfit):  # a folder the text format would escape
        _recipe(template).config(KernelLayout("1-a-b", Path('/run/"odd"')), (9,))


def test_only_a_recipe_written_by_the_engine_user_alone_is_read(tmp_path: Path) -> None:
    recipe = _recipe("config")
    path = tmp_path / "recipes" / "r.json"
    write_recipe(path, recipe)
    assert read_recipe(path) == recipe
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    with pytest.raises(OSError, match="No space left"):
        write_recipe(path, _FullDisk(recipe.limits, recipe.settings, True, "other"))
    assert list(path.parent.iterdir()) == [path] and read_recipe(path) == recipe

    link = tmp_path / "recipes" / "link.json"
    link.symlink_to(path)
    assert read_recipe(link) is None
    path.chmod(0o620)
    assert read_recipe(path) is None  # writable by its group
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    assert read_recipe(path) is None  # someone else's
    os.chown(path, 0, 0)
    assert read_recipe(path) == recipe
    data = json.loads(path.read_text())
    for broken in ("{", json.dumps(data | {"format": 0}), json.dumps(data | {"template": 3}),
                   json.dumps({k: v for k, v in data.items() if k != "limits"})):  # fmt: skip
        path.write_text(broken)
        assert read_recipe(path) is None
    assert read_recipe(tmp_path / "none.json") is None
    path.unlink()
    os.mkfifo(path, 0o600)
    assert read_recipe(path) is None  # not read: nothing would ever be written to it
    path.unlink()
    path.write_text(recipe.to_json() + " " * (1 << 20))
    assert read_recipe(path) is None  # not a recipe's size


def test_each_policy_and_preload_has_a_recipe_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path("/run/sandkernel")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.toml").write_text("")
    files = {
        recipe_file(root, None, PRELOAD),
        recipe_file(root, "strict", PRELOAD),
        recipe_file(root, None, ()),
        recipe_file(root, "mine.toml", PRELOAD),
    }
    assert len(files) == 4
    assert recipe_file(root, None, PRELOAD) == recipe_file(root, "default", PRELOAD)
    # A policy file is known by where it is, wherever it is named from.
    assert recipe_file(root, "mine.toml", PRELOAD) == recipe_file(
        root, str(tmp_path / "mine.toml"), PRELOAD
    )


# ---------------------------------------------------------------------------
# real sandboxes


@sandbox
@pytest.mark.anyio
async def test_the_first_start_writes_the_recipe_and_the_next_adopts_the_servers_it_spawns(
    runtime_dir: Path,
) -> None:
    first = await prestart(None, workers=2, preload=PRELOAD)
    assert first is not None and first.servers == [] and first.recipe is None
    async with BatchPool(workers=2, preload=PRELOAD, prestarted=first) as pool:
        await _check_sum(pool)
    recipe = read_recipe(recipe_file(runtime_dir, None, PRELOAD))
    assert recipe is not None and recipe.limits == Limits.of(load_policy())
    assert _traces(first) == []

    second = await prestart(None, workers=2, preload=PRELOAD)
    assert second is not None and second.recipe == recipe
    spawned = sorted(server.jail.kernel_id for server in second.servers)
    assert len(spawned) == 2
    async with BatchPool(workers=2, preload=PRELOAD, prestarted=second) as pool:
        assert pool.worker_ids() == spawned and not second.stale
        await _check_sum(pool)
    assert _traces(second) == []


@sandbox
@pytest.mark.anyio
@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r: dataclasses.replace(
            r, template=r.template.replace('outside_id: "65534"', 'outside_id: "0"', 1)
        ), id="jail-user-mapped-to-root"),
        pytest.param(lambda r: dataclasses.replace(
            r, template=r.template.replace(
                'dst: "/usr"\n  is_bind: true\n', 'dst: "/usr"\n  is_bind: true\n  rw: true\n'
            )
        ), id="host-usr-writable"),
        pytest.param(lambda r: dataclasses.replace(
            r, limits=dataclasses.replace(r.limits, memory_mb=r.limits.memory_mb * 2)
        ), id="cgroup-memory-doubled"),
        pytest.param(lambda r: dataclasses.replace(
            r, settings=dataclasses.replace(r.settings, output_max_bytes=1 << 30)
        ), id="server-settings"),
    ],
)  # fmt: skip
async def test_a_server_spawned_from_a_recipe_the_policy_does_not_render_gets_nothing(
    runtime_dir: Path, tamper: object
) -> None:
    # A recipe the engine's own user wrote, unlike what the policy renders
    # now: the policy changed, sandkernel changed, or someone with root's
    # rights edited it. Its server is spawned, and neither adopted nor sent
    # anything: a worker started from the policy takes its place.
    first = await prestart(None, workers=1, preload=PRELOAD)
    assert first is not None
    async with BatchPool(workers=1, preload=PRELOAD, prestarted=first):
        pass
    path = recipe_file(runtime_dir, None, PRELOAD)
    good = read_recipe(path)
    assert good is not None
    bad = tamper(good)  # type: ignore[operator]
    assert bad != good
    write_recipe(path, bad)

    prestarted = await prestart(None, workers=1, preload=PRELOAD)
    assert prestarted is not None and prestarted.recipe == bad
    [refused] = prestarted.servers
    async with BatchPool(workers=1, preload=PRELOAD, prestarted=prestarted) as pool:
        assert prestarted.stale
        assert pool.worker_ids() != [refused.jail.kernel_id]
        assert not refused.jail.running and not refused.jail.layout.root.exists()  # type: ignore[union-attr]
        await _check_sum(pool)
    assert read_recipe(path) == good  # written again, from the policy
    assert _traces(prestarted) == []


@sandbox
@pytest.mark.anyio
async def test_prestarted_servers_no_pool_takes_are_removed(runtime_dir: Path) -> None:
    first = await prestart(None, workers=1, preload=PRELOAD)
    assert first is not None
    async with BatchPool(workers=1, preload=PRELOAD, prestarted=first):
        pass
    # More servers than the pool has workers; then none taken at all.
    more = await prestart(None, workers=2, preload=PRELOAD)
    assert more is not None and len(more.servers) == 2
    async with BatchPool(workers=1, preload=PRELOAD, prestarted=more) as pool:
        assert len(pool.worker_ids()) == 1 and more.servers == []
        # What is left of the two is its worker's folder and cgroup.
        assert {Path(trace).name for trace in _traces(more)} == set(pool.worker_ids())
    unused = await prestart(None, workers=1, preload=PRELOAD)
    assert unused is not None and len(unused.servers) == 1
    await unused.aclose()
    assert _traces(more) == _traces(unused) == []


@sandbox
@pytest.mark.anyio
async def test_a_recipe_made_from_the_policy_is_what_the_pool_would_start(
    runtime_dir: Path,
) -> None:
    first = await prestart(None, workers=1, preload=PRELOAD)
    assert first is not None
    policy = load_policy()
    async with BatchPool(workers=1, preload=PRELOAD, prestarted=first) as pool:
        [worker] = pool._live
        settings = worker.config.settings()
        assert read_recipe(first.path) == make_recipe(
            pool.host, policy, settings, oom_kills_fd=worker.oom_kills_fd
        )


# ---------------------------------------------------------------------------
# sandkernel eval


def _eval(runtime_dir: Path, tmp_path: Path, *options: str) -> tuple[int, list[str]]:
    """``sandkernel eval`` on two HumanEval samples; its exit code and the verdicts."""
    from sandkernel.evaluate import load_problems
    from sandkernel.evaluate.cli import add_eval_parser, run_eval

    problems = load_problems("humaneval")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task_id": t, "completion": completion}) + "\n"
            for t, completion in (("HumanEval/0", problems["HumanEval/0"].reference),
                                  ("HumanEval/1", "    return []\n"))
        )
    )  # fmt: skip
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    parser = argparse.ArgumentParser(prog="sandkernel")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--samples", str(samples), "--out", str(out),
                              "--workers", "2", "--k", "1", "--ignore-incomplete",
                              "--no-progress", *options])  # fmt: skip
    code = run_eval(args)
    verdicts = [json.loads(line)["result"] for line in out.read_text().splitlines()]
    return code, verdicts


def _left_by_this_process(runtime_dir: Path) -> list[str]:
    """Sandboxes of this process's engines: folders in ``runtime_dir``, and cgroups."""
    from sandkernel.sandbox.cgroups import CgroupLayout

    mine = f"{os.getpid()}-*"
    found = [str(p) for p in runtime_dir.glob(mine)]
    for parent in CgroupLayout.detect().parent_dirs():
        found += [str(p) for p in parent.glob(mine)]
    return found


@sandbox
def test_eval_runs_its_second_start_on_the_servers_it_spawned_first(
    runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    take = Prestarted.take

    async def spied(self: Prestarted, *args: Any) -> Any:
        server = await take(self, *args)
        taken.append(server is not None)
        return server

    monkeypatch.setattr(Prestarted, "take", spied)
    for run in range(2):
        code, verdicts = _eval(runtime_dir, tmp_path)
        assert code == 0
        assert verdicts == ["passed", "failed: "], verdicts
        assert taken == [[False, False], [True, True]][run]
        taken.clear()
    assert _left_by_this_process(runtime_dir) == []


@sandbox
def test_eval_with_a_policy_broken_since_its_recipe_removes_the_servers_it_spawned(
    runtime_dir: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "mine.toml"
    policy.write_text("memory_mb = 512\n")
    code, _ = _eval(runtime_dir, tmp_path, "--policy", str(policy))
    assert code == 0 and read_recipe(recipe_file(runtime_dir, str(policy), _DEFAULT)) is not None
    policy.write_text('memory_mb = "a lot"\n')
    with pytest.raises(PolicyError, match="memory_mb"):
        _eval(runtime_dir, tmp_path, "--policy", str(policy))
    assert _left_by_this_process(runtime_dir) == []


@sandbox
@pytest.mark.anyio
async def test_a_prestart_cancelled_midway_leaves_nothing(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await prestart(None, workers=1, preload=PRELOAD)
    assert first is not None
    async with BatchPool(workers=1, preload=PRELOAD, prestarted=first):
        pass
    spawn = prestart_module._spawn
    second, never = asyncio.Event(), asyncio.Event()
    calls = 0

    async def second_never_ends(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            second.set()
            await never.wait()
        return await spawn(*args)

    monkeypatch.setattr(prestart_module, "_spawn", second_never_ends)
    starting = asyncio.ensure_future(prestart(None, workers=2, preload=PRELOAD))
    async with asyncio.timeout(30):
        await second.wait()
    assert _left_by_this_process(runtime_dir)  # the first server, spawned
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert _left_by_this_process(runtime_dir) == []
