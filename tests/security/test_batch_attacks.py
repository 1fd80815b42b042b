"""The attack catalogue on the batch path: each attack a program, forked from a warm server.

``Engine.run_once`` (what ``sandkernel eval`` and SandboxFusion's
``/run_code`` run on) forks each program from a fork server that lives in a
sandbox of its own; the attacks that a kernel's sandbox holds must hold
there too. The engine's process holds a canary in its environment, and the
host a listening service and a file of the engine's own.
"""

from __future__ import annotations

import json
import secrets
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sandkernel._attacks import ATTACKS, PRELUDE
from sandkernel.engine import Engine
from tests.security.conftest import EngineBox

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture(scope="module")
def values() -> Iterator[dict[str, Any]]:
    """A canary in this process's environment, and a service listening on the host."""
    canary = f"sandkernel-canary-{secrets.token_hex(8)}"
    with pytest.MonkeyPatch.context() as patch, socket.socket() as listener:
        # Set before the engine starts: its fork servers must not see it.
        patch.setenv("SANDKERNEL_ATTACK_CANARY", canary)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield {"port": listener.getsockname()[1], "canary": canary}


@pytest.fixture(scope="module")
async def batch_engine(
    engines: EngineBox, values: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    store = tmp_path_factory.mktemp("batch-attacks-store")
    engine = await engines.get("batch-attacks", pool_size=0, batch_workers=2, store_dir=store)
    # A folder of the engine's on the host: its file store.
    values["host_path"] = str(store)
    yield engine


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_the_attack_is_held_on_the_batch_path(
    batch_engine: Engine, values: dict[str, Any], attack: Any
) -> None:
    code = textwrap.dedent(attack.code)
    for key, value in values.items():
        code = code.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}", str(value))
    if attack.name == "memory bomb":
        result = await batch_engine.run_once(code, timeout_s=60)
        held, detail = attack.verdict(result.status)
    else:
        result = await batch_engine.run_once(
            PRELUDE + code + "\nprint(json.dumps(result))", timeout_s=60
        )
        assert result.status == "ok", f"{result.status}: {result.message}\n{result.stderr}"
        held, detail = attack.verdict(json.loads(result.stdout.strip().splitlines()[-1]))
    assert held, f"{attack.name}: {detail}"
