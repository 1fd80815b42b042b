"""Chat models: the OpenAI-compatible adapter."""

from __future__ import annotations

import re
import sys

import pytest

from sandkernel.loop import ModelCallFailed, OpenAIChatModel, run_loop
from tests.loop._support import StubSession, scripted_model


def test_openai_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r"pip install 'sandkernel\[openai\]'"):
        OpenAIChatModel(model="m")


def test_a_model_without_a_key_or_server_is_model_call_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ModelCallFailed, match="cannot be called"):
        OpenAIChatModel(model="m")


@pytest.mark.anyio
async def test_model_errors_are_mapped_to_model_call_failed() -> None:
    async with scripted_model([]) as (server, model):
        with pytest.raises(ModelCallFailed, match=re.escape(server.base_url)):
            await run_loop(model, "Hello?", StubSession())
    assert len(server.requests) == 1  # no retries behind our back
