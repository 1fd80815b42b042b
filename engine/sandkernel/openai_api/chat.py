"""The chat model behind the runs: any OpenAI-compatible chat-completions endpoint.

The model loop's :class:`~sandkernel.loop.OpenAIChatModel` serves one model
name with ``auto``/``required``/``none``; a run names its model (Azure's
"deployment") per request, may force one function, has a token budget and
reports token usage, so runs call the endpoint through :class:`ChatEndpoint`,
which gives the same :class:`~sandkernel.loop.ModelReply` and raises the same
:class:`~sandkernel.errors.ModelCallFailed`, saying what failed as the loop
says it (unreachable, key refused, unknown model...). With ``on_text`` the
reply is streamed and its text handed over as it comes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from sandkernel.errors import ModelCallFailed
from sandkernel.loop import ModelReply, ToolCall
from sandkernel.loop.models import call_failed, chat_reply, unused_call_id

if TYPE_CHECKING:
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

TextCallback = Callable[[str], Awaitable[None]]

#: The daemon's options for what the loop's advice names: the endpoint, its key.
_URL_OPTION = "the daemon's --model-url"
_KEY_OPTION = "the key in the daemon's --model-key-file"


@dataclass(frozen=True)
class ChatRequest:
    """One assistant turn to ask for."""

    model: str
    messages: Sequence[dict[str, Any]]
    tools: Sequence[dict[str, Any]] = ()
    tool_choice: str | dict[str, Any] = "auto"
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    #: the chat endpoint's ``response_format`` (``None`` or ``"auto"``: not sent)
    response_format: str | dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatTurn:
    """The model's reply and what it cost."""

    reply: ModelReply
    prompt_tokens: int = 0
    completion_tokens: int = 0


class AssistantModel(Protocol):
    """What a run needs from a chat model."""

    async def turn(self, request: ChatRequest, *, on_text: TextCallback | None = None) -> ChatTurn:
        """One assistant turn; ``on_text`` gets its text as it is generated, if given.

        Raises:
            ModelCallFailed: the endpoint failed or replied with nothing usable.
        """
        ...

    async def aclose(self) -> None: ...


@dataclass
class _Accumulated:
    content: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatEndpoint:
    """An :class:`AssistantModel` over the ``openai`` package's ``AsyncOpenAI``.

    Args:
        base_url: the endpoint, e.g. ``http://127.0.0.1:8080/v1``.
        api_key: its key (a placeholder is sent when it needs none).
        timeout_s: per request.
        max_retries: of a failed request, by the client.

    Raises:
        ImportError: the ``openai`` package is missing.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError(
                "the OpenAI-compatible API's runs need the openai package: "
                "pip install 'sandkernel[openai]'"
            ) from exc
        self.base_url = base_url
        self._streams = True
        self.client: AsyncOpenAI = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",
            timeout=timeout_s,
            max_retries=max_retries,
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def turn(self, request: ChatRequest, *, on_text: TextCallback | None = None) -> ChatTurn:
        import openai

        options: dict[str, Any] = {}
        if request.tools:
            options["tools"] = list(request.tools)
            options["tool_choice"] = request.tool_choice
            if not request.parallel_tool_calls:
                options["parallel_tool_calls"] = False
        for name in ("max_completion_tokens", "temperature", "top_p"):
            value = getattr(request, name)
            if value is not None:
                options[name] = value
        if request.response_format not in (None, "auto"):
            options["response_format"] = request.response_format
        try:
            if on_text is not None and self._streams:
                try:
                    return await self._stream(request, options, on_text)
                except openai.BadRequestError:
                    # Some servers refuse stream_options or streamed tool calls: ask
                    # once more without streaming, and stop streaming if that works.
                    turn = await self._complete(request, options)
                    log.warning("%s refused a streamed request; not streaming", self.base_url)
                    self._streams = False
                    if turn.reply.content:
                        await on_text(turn.reply.content)
                    return turn
            turn = await self._complete(request, options)
            if on_text is not None and turn.reply.content:
                await on_text(turn.reply.content)
            return turn
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a reply not JSON...
            raise call_failed(
                request.model, self.base_url, exc, url=_URL_OPTION, key=_KEY_OPTION
            ) from exc

    async def _complete(self, request: ChatRequest, options: dict[str, Any]) -> ChatTurn:
        response = await self.client.chat.completions.create(
            model=request.model,
            messages=cast(Any, list(request.messages)),
            stream=False,
            **options,
        )
        usage = response.usage
        return ChatTurn(
            reply=chat_reply(request.model, response),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    async def _stream(
        self, request: ChatRequest, options: dict[str, Any], on_text: TextCallback
    ) -> ChatTurn:
        stream = await self.client.chat.completions.create(
            model=request.model,
            messages=cast(Any, list(request.messages)),
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
        got = _Accumulated()
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    got.prompt_tokens = chunk.usage.prompt_tokens
                    got.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices[:1]:
                    delta = choice.delta
                    if delta.content:
                        got.content.append(delta.content)
                        await on_text(delta.content)
                    for part in delta.tool_calls or []:
                        call = got.calls.setdefault(part.index, {"id": "", "name": "", "args": []})
                        if part.id:
                            call["id"] = part.id
                        if part.function is not None:
                            if part.function.name:
                                call["name"] += part.function.name
                            if part.function.arguments:
                                call["args"].append(part.function.arguments)
                    if choice.finish_reason is not None:
                        got.finish_reason = choice.finish_reason
        taken = {c["id"] for c in got.calls.values() if c["id"]}
        calls = [
            ToolCall(
                id=c["id"] or unused_call_id(f"call_{i}", taken),
                name=c["name"],
                arguments="".join(c["args"]),
            )
            for i, c in sorted(got.calls.items())
        ]
        return ChatTurn(
            reply=ModelReply(
                content="".join(got.content) if got.content else None,
                tool_calls=calls,
                finish_reason=got.finish_reason,
            ),
            prompt_tokens=got.prompt_tokens,
            completion_tokens=got.completion_tokens,
        )


def run_error_code(
    failure: ModelCallFailed,
) -> Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]:
    """OpenAI's code for a run or response the chat model failed, from what it raised.

    ``rate_limit_exceeded`` when the endpoint limits the rate (429),
    ``invalid_prompt`` when it refused the conversation (400: too long for the
    model...), else ``server_error``.
    """
    import openai

    cause = failure.__cause__
    if isinstance(cause, openai.RateLimitError):
        return "rate_limit_exceeded"
    if isinstance(cause, openai.BadRequestError):
        return "invalid_prompt"
    return "server_error"
