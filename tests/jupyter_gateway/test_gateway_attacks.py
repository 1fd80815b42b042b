"""The attack catalogue, run as cells over the gateway's WebSocket: the same verdicts hold.

The cells reach the kernel through the relay's own sockets, not the engine's
client; the sandbox is the same, and so must be what it lets through.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from sandkernel._attacks import ATTACKS, PRELUDE
from tests.jupyter_gateway._support import GatewayClient, GatewayProcess, running_gateway

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio]


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[GatewayProcess, dict[str, Any]]]:
    """A gateway with a secret in its environment, and a service listening on the host."""
    canary = f"sandkernel-canary-{secrets.token_hex(8)}"
    # The daemon inherits it: no process of a sandbox may see it.
    os.environ["SANDKERNEL_ATTACK_CANARY"] = canary
    try:
        with socket.socket() as listener, running_gateway(pool_size=2) as process:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            values = {
                "port": listener.getsockname()[1],
                "canary": canary,
                # The daemon's token file: a secret on the host, next to its store.
                "host_path": str(process.store.parent / "token"),
            }
            yield process, values
    finally:
        os.environ.pop("SANDKERNEL_ATTACK_CANARY", None)


def _code(source: str, values: dict[str, Any]) -> str:
    code = textwrap.dedent(source)
    for key, value in values.items():
        code = code.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}", str(value))
    return code


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_the_attack_is_held_over_the_websocket(
    target: tuple[GatewayProcess, dict[str, Any]], attack: Any
) -> None:
    process, values = target
    async with GatewayClient(process.gateway) as client:
        sock = await client.connect(await client.start_kernel())
        code = _code(attack.code, values)
        if attack.name == "memory bomb":
            cell = await sock.execute(code, timeout_s=90)
            evalue = cell.reply["content"].get("evalue", "")
            status = "oom" if "out of memory" in evalue else cell.status
            held, detail = attack.verdict(status)
        else:
            cell = await sock.execute(PRELUDE + code + "\nprint(json.dumps(result))", timeout_s=90)
            assert cell.status == "ok", cell.reply["content"]
            held, detail = attack.verdict(json.loads(cell.stdout.strip().splitlines()[-1]))
        assert held, f"{attack.name}: {detail}"
