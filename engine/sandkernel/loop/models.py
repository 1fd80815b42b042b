"""Chat models: what the loop needs of one, and an adapter for OpenAI-compatible endpoints.

:class:`ChatModel` is the one method :func:`~sandkernel.loop.run_loop` calls;
:class:`OpenAIChatModel` implements it over the ``openai`` package, for any
chat-completions endpoint (OpenAI, llama.cpp, vLLM, Ollama...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, cast

from pydantic import BaseModel, ConfigDict, Field

from sandkernel.errors import ModelCallFailed

if TYPE_CHECKING:
    from openai import AsyncOpenAI

#: As in OpenAI's API: may, must or must not call a tool.
ToolChoice = Literal["auto", "required", "none"]


class ToolCall(BaseModel):
    """A tool call as the model sent it; ``arguments`` is the raw JSON text."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    arguments: str


class ModelReply(BaseModel):
    """One assistant turn: text, tool calls, or both."""

    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str | None = None


class ChatModel(Protocol):
    """What :func:`run_loop` needs from a chat model."""

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: ToolChoice,
    ) -> ModelReply:
        """One assistant turn for ``messages`` (chat-completions message dicts)."""
        ...


class OpenAIChatModel:
    """A :class:`ChatModel` over the official ``openai`` package's ``AsyncOpenAI``.

    Works with any OpenAI-compatible chat-completions endpoint (OpenAI,
    llama.cpp's server, vLLM, Ollama...). Close it with :meth:`aclose` or use
    it as ``async with``.

    Args:
        model: the model name the endpoint knows.
        base_url: the endpoint, e.g. ``http://127.0.0.1:8080/v1`` (default:
            ``OPENAI_BASE_URL`` or OpenAI's).
        api_key: default ``OPENAI_API_KEY``; a local endpoint given by
            ``base_url`` gets a placeholder when neither is set.
        create_kwargs: passed to every ``chat.completions.create`` call
            (``temperature``, ``max_tokens``...).
        **client_kwargs: passed to ``AsyncOpenAI`` (``timeout``, ``max_retries``...).

    Raises:
        ImportError: the ``openai`` package is missing (``pip install 'sandkernel[openai]'``).
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        create_kwargs: Mapping[str, Any] | None = None,
        **client_kwargs: Any,
    ) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError(
                "OpenAIChatModel needs the openai package: pip install 'sandkernel[openai]'"
            ) from exc
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY")
        if api_key is None and base_url is not None:
            api_key = "not-needed"  # local servers ignore it; the client insists on one
        self.model = model
        self.create_kwargs = dict(create_kwargs or {})
        try:
            self.client: AsyncOpenAI = openai.AsyncOpenAI(
                base_url=base_url, api_key=api_key, **client_kwargs
            )
        except openai.OpenAIError as exc:  # no key: a model that cannot be called
            raise ModelCallFailed(f"the chat model cannot be called: {exc}") from exc

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self.client.close()

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]],
        tool_choice: ToolChoice,
    ) -> ModelReply:
        """Call ``chat.completions.create`` and reduce its first choice to a :class:`ModelReply`.

        Raises:
            ModelCallFailed: the endpoint failed or answered without a choice.
        """
        import openai

        extra: dict[str, Any] = {}
        if tools:
            extra = {"tools": list(tools), "tool_choice": tool_choice}
        try:
            response = await self.client.chat.completions.create(
                model=self.model,
                messages=cast(Any, [dict(m) for m in messages]),
                stream=False,
                **extra,
                **self.create_kwargs,
            )
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a body not JSON
            where = str(self.client.base_url)
            raise ModelCallFailed(
                f"the chat model {self.model!r} at {where} failed: {exc} "
                "(check the base URL, model name and API key)"
            ) from exc
        try:
            return _reply_of(response)
        except (AttributeError, TypeError, ValueError) as exc:  # ValidationError too
            # A server that answered 200 with something else than a chat completion.
            raise ModelCallFailed(
                f"the chat model {self.model!r} replied with no usable choice: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _reply_of(response: Any) -> ModelReply:
    """The first choice of a chat completion as a :class:`ModelReply`."""
    if not response.choices:
        # Some servers answer 200 with an error body: its message says what went wrong.
        error = getattr(response, "error", None)
        message = error.get("message") if isinstance(error, dict) else error
        raise ValueError(
            f"the reply has no choices: {message}" if message else "the reply has no choices"
        )
    choice = response.choices[0]
    if choice.message is None:
        raise ValueError("the reply's choice has no message")
    calls = []
    for n, call in enumerate(choice.message.tool_calls or []):
        function = getattr(call, "function", None)
        if function is None:  # a custom (non-function) tool call: not ours
            continue
        arguments = function.arguments
        if not isinstance(arguments, str):  # some servers send an object, not JSON text
            arguments = json.dumps(arguments)
        # Some servers leave the id out: the tool message must still answer the call.
        calls.append(ToolCall(id=call.id or f"call_{n}", name=function.name, arguments=arguments))
    return ModelReply(
        content=choice.message.content,
        tool_calls=calls,
        finish_reason=choice.finish_reason,
    )
