"""OpenAI's Files, Assistants (v2), Containers and Responses APIs, over any engine and model.

What Azure OpenAI's and OpenAI's hosted "code interpreter" does, locally: the
``openai`` package's clients (``AzureOpenAI`` with the daemon as endpoint, or
``OpenAI(base_url=".../openai")``) upload files, make assistants and threads,
and run them; the model writes Python, the thread's sandboxed session runs
it, the model reads the error and fixes its code, and the charts and files
it makes come back as file ids. One module per concept:

==============  ==========================================================
``wire``        the objects and request bodies, in OpenAI's shapes
``errors``      errors in OpenAI's shape and status codes
``state``       assistants, threads, messages, runs, steps in SQLite
``placement``   which files a thread's session sees; one session per thread
``chat``        the chat model runs call (any OpenAI-compatible endpoint)
``runs``        a run: model turns, code in the sandbox, tool outputs
``events``      a run's stream events (Server-Sent Events)
``containers``  the Containers API: a container is a session, its files the session's
``responses``   the Responses API's code_interpreter and function tools, over containers
``service``     each request's work, typed against the engine contract
``app``         the routes under ``/openai`` and ``/openai/v1``, and their gate
==============  ==========================================================

:func:`openai_gate` is what the daemon uses: it puts the routes in front of
the daemon's own application for as long as it serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from sandkernel.api import EngineAPI
    from sandkernel.openai_api.app import OpenAIGate

__all__ = ["openai_gate"]


@asynccontextmanager
async def openai_gate(
    app: ASGIApp,
    engine: EngineAPI,
    *,
    state_path: Path,
    model_url: str | None,
    model_key: str | None,
    token: str | None,
    max_json_bytes: int,
    max_upload_bytes: int,
) -> AsyncIterator[OpenAIGate]:
    """``app`` with the OpenAI-compatible routes in front of it, while the block runs.

    The gate's :meth:`~sandkernel.openai_api.app.OpenAIGate.wind_down` ends the
    runs and responses in flight with their final events (a daemon stopping).

    Args:
        app: the daemon's application (every other path goes there).
        engine: the engine whose sessions and file store the routes use.
        state_path: the SQLite file of assistants, threads and runs.
        model_url: the OpenAI-compatible chat endpoint runs call (``None``:
            runs are refused, saying how to give one).
        model_key: its API key.
        token: the daemon's token, which TCP requests must carry.
        max_json_bytes: largest JSON body.
        max_upload_bytes: largest upload body.
    """
    from sandkernel.openai_api.app import OpenAIGate, create_openai_app
    from sandkernel.openai_api.chat import ChatEndpoint
    from sandkernel.openai_api.service import AssistantsService

    model = ChatEndpoint(model_url, api_key=model_key) if model_url else None
    async with AssistantsService(engine, state_path, model=model) as service:
        yield OpenAIGate(
            app,
            create_openai_app(service),
            token=token,
            max_json_bytes=max_json_bytes,
            max_upload_bytes=max_upload_bytes,
            wind_down=service.wind_down,
        )
