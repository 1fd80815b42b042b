"""The attack catalogue, run as a model's code_interpreter calls: the same verdicts hold.

Each attack is the code a scripted model asks to run, in an Assistants run
and in a Responses call, read back through the ``openai`` package as the
code call's logs. The code reaches its kernel through the daemon's run loop,
not the engine's API; the sandbox is the same, and so must be what it lets
through. The daemon holds secrets a kernel must not see: a canary in its
environment and the model's API key in a file on the host.
"""

from __future__ import annotations

import json
import secrets
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai.types.beta.threads.runs import CodeInterpreterToolCall, ToolCallsStepDetails
from openai.types.responses import ResponseCodeInterpreterToolCall

from sandkernel._attacks import ATTACKS, PRELUDE
from tests._model import Reply, code_call
from tests.openai_api.conftest import ASSISTANTS_DEPRECATED, DEPLOYMENT, OpenAIDaemonFactory

pytestmark = [pytest.mark.sandbox, pytest.mark.anyio, *ASSISTANTS_DEPRECATED]
MARKER = "attack: "


@pytest.fixture
def values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """What the attacks look for: a canary, a listening host service, a secret host file."""
    canary = f"sandkernel-canary-{secrets.token_hex(8)}"
    # The daemon runs in this process: no process of a sandbox may see its environment.
    monkeypatch.setenv("SANDKERNEL_ATTACK_CANARY", canary)
    key_file = tmp_path / "model-key"
    key_file.write_text(canary)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield {"port": listener.getsockname()[1], "canary": canary, "host_path": str(key_file)}


def _code(name: str, values: dict[str, Any]) -> str:
    (attack,) = [a for a in ATTACKS if a.name == name]
    code = textwrap.dedent(attack.code)
    for key, value in values.items():
        code = code.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}", str(value))
    if attack.name == "memory bomb":
        return code
    return PRELUDE + code + "\nprint(json.dumps(result))"


def _script(values: dict[str, Any]) -> Any:
    """A model that runs the attack its conversation names, then says it is done."""

    def reply(request: dict[str, Any]) -> Reply:
        if request["messages"][-1]["role"] == "tool":
            return Reply(content="done")
        asked = next(str(m["content"]) for m in request["messages"] if m["role"] == "user")
        name = asked[asked.index(MARKER) + len(MARKER) :].split("\n")[0].strip()
        return Reply(calls=[code_call(f"call-{secrets.token_hex(4)}", _code(name, values))])

    return reply


def _verdicts(logs: dict[str, str]) -> list[str]:
    """Each attack's verdict on what its code call logged; the ones that did not hold."""
    failed = []
    for attack in ATTACKS:
        text = logs[attack.name]
        if attack.name == "memory bomb":
            # The logs end with the run's status when it was not ok: "[oom: ...]".
            status = text.rsplit("[", 1)[-1].split(":", 1)[0] if "[" in text else "ok"
            held, detail = attack.verdict(status)
        else:
            lines = text.strip().splitlines()
            try:
                held, detail = attack.verdict(json.loads(lines[-1]))
            except (IndexError, ValueError) as exc:
                held, detail = False, f"could not run ({exc!r}): {text[-300:]!r}"
        if not held:
            failed.append(f"{attack.name}: {detail}")
    return failed


async def test_the_catalogue_holds_in_assistants_runs(
    openai_daemon: OpenAIDaemonFactory, values: dict[str, Any]
) -> None:
    daemon = await openai_daemon(_script(values), model_key_file=Path(values["host_path"]))
    client = daemon.openai()

    def attack_all() -> dict[str, str]:
        assistant = client.beta.assistants.create(
            model=DEPLOYMENT, tools=[{"type": "code_interpreter"}]
        )
        logs = {}
        for attack in ATTACKS:
            thread = client.beta.threads.create(
                messages=[{"role": "user", "content": MARKER + attack.name}]
            )
            run = client.beta.threads.runs.create_and_poll(
                thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=50
            )
            assert run.status == "completed", (attack.name, run.last_error)
            steps = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
            calls = [
                call
                for step in steps
                if isinstance(step.step_details, ToolCallsStepDetails)
                for call in step.step_details.tool_calls
                if isinstance(call, CodeInterpreterToolCall)
            ]
            assert len(calls) == 1, (attack.name, calls)
            outputs = calls[0].code_interpreter.outputs
            logs[attack.name] = "".join(getattr(o, "logs", "") for o in outputs)
            client.beta.threads.delete(thread.id)
        return logs

    logs = await anyio.to_thread.run_sync(attack_all)
    assert daemon.model is not None
    assert len(daemon.model.requests) == 2 * len(ATTACKS)  # each attack's code, then "done"
    assert _verdicts(logs) == []


async def test_the_catalogue_holds_in_responses_code_interpreter_calls(
    openai_daemon: OpenAIDaemonFactory, values: dict[str, Any]
) -> None:
    daemon = await openai_daemon(_script(values), model_key_file=Path(values["host_path"]))
    client = daemon.openai()

    def attack_all() -> dict[str, str]:
        logs = {}
        for attack in ATTACKS:
            response = client.responses.create(
                model=DEPLOYMENT,
                tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
                input=MARKER + attack.name,
                include=["code_interpreter_call.outputs"],
            )
            assert response.status == "completed", (attack.name, response.error)
            (call,) = [i for i in response.output if isinstance(i, ResponseCodeInterpreterToolCall)]
            logs[attack.name] = "".join(getattr(o, "logs", "") for o in call.outputs or [])
            client.containers.delete(call.container_id)
        return logs

    logs = await anyio.to_thread.run_sync(attack_all)
    assert _verdicts(logs) == []
