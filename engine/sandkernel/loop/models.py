"""Chat models: what the loop needs of one, and an adapter for OpenAI-compatible endpoints.

:class:`ChatModel` is the one method :func:`~sandkernel.loop.run_loop` calls;
:class:`OpenAIChatModel` implements it over the ``openai`` package, for any
chat-completions endpoint (OpenAI, llama.cpp, vLLM, Ollama...).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandkernel.errors import ModelCallFailed

if TYPE_CHECKING:
    from openai import AsyncOpenAI

#: As in OpenAI's API: may, must or must not call a tool.
ToolChoice = Literal["auto", "required", "none"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x20\x7f]")


def _valid_text(text: str) -> str:
    """``text`` with each lone surrogate written as its escape (``\\ud83d``): valid Unicode.

    A model's JSON can hold half of a character (a ``"\\ud83d"`` escape alone):
    such text cannot be encoded, so the next request, which sends it back,
    would fail. Inside JSON text (tool arguments) the escape means the same
    character as before, so a ``code`` argument that holds one is still told
    apart and explained; in prose it shows what the model sent.
    """
    if _SURROGATE.search(text) is None:
        return text
    # Pairs that arrived as two code units become their character; lone halves, escapes.
    whole = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return whole.encode("utf-8", "backslashreplace").decode("utf-8")


class ToolCall(BaseModel):
    """A tool call as the model sent it; ``arguments`` is the raw JSON text.

    Its text is valid Unicode: a lone surrogate is written as its ``\\udXXXX`` escape.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    arguments: str

    @field_validator("id", "name", "arguments")
    @classmethod
    def _as_valid_text(cls, value: str) -> str:
        return _valid_text(value)


class ModelReply(BaseModel):
    """One assistant turn: text, tool calls, or both.

    Its text is valid Unicode (a lone surrogate is written as its ``\\udXXXX``
    escape), so it can always be sent back to the model.
    """

    model_config = ConfigDict(extra="forbid")

    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: str | None = None

    @field_validator("content", "finish_reason")
    @classmethod
    def _as_valid_text(cls, value: str | None) -> str | None:
        return None if value is None else _valid_text(value)


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
        url = base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL")
        problem = _base_url_problem(url) if url else None
        if problem is not None:
            # Said here, naming the URL, not as the HTTP library's error on the first call.
            raise ModelCallFailed(
                f"the chat model's base URL {url!r} is not a valid URL: {problem} "
                "(expected one like http://127.0.0.1:8080/v1)"
            )
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
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a body not JSON...
            raise call_failed(self.model, self.client.base_url, exc) from exc
        return chat_reply(self.model, response)


def call_failed(
    model: str,
    base_url: object,
    exc: Exception,
    *,
    url: str = "the base URL",
    key: str = "the API key",
) -> ModelCallFailed:
    """The :class:`ModelCallFailed` for what a ``chat.completions.create`` call raised.

    The advice fits the failure: only a server not reached, a refused key or
    an unknown URL or model point at the settings, which ``url`` and ``key``
    name (a caller that takes them as options of its own names those).
    """
    import openai

    failed = f"the chat model {model!r} at {base_url}"
    if isinstance(exc, UnicodeEncodeError):
        # Text of the conversation (the caller's messages) that no request can carry.
        return ModelCallFailed(
            f"the messages for the chat model {model!r} could not be sent: they hold "
            f"text that is not valid Unicode ({exc}); replace lone surrogates"
        )
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return ModelCallFailed(
            f"{failed} could not be reached: {exc} (check {url} and that the server is running)"
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ModelCallFailed(f"{failed} refused the call: {exc} (check {key})")
    if isinstance(exc, openai.NotFoundError):
        return ModelCallFailed(f"{failed} failed: {exc} (check {url} and the model name)")
    if isinstance(exc, json.JSONDecodeError):
        return ModelCallFailed(
            f"{failed} failed: {exc} (its reply is not JSON: check that {url} is "
            "the API root of an OpenAI-compatible server, usually ending in /v1)"
        )
    return ModelCallFailed(f"{failed} failed: {exc}")


def chat_reply(model: str, response: Any) -> ModelReply:
    """The first choice of a chat completion as a :class:`ModelReply`.

    Raises:
        ModelCallFailed: the server answered with something else than a chat
            completion (no choices, an error body, not the shape of one).
    """
    try:
        return _reply_of(response)
    except (AttributeError, TypeError, ValueError) as exc:  # ValidationError too
        raise ModelCallFailed(
            f"the chat model {model!r} replied with no usable choice: {type(exc).__name__}: {exc}"
        ) from exc


def _base_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OpenAI-compatible endpoint's base URL, or None if it can."""
    odd = _CONTROL.search(url)
    if odd is not None:
        return f"it holds {odd.group()!r} at position {odd.start()}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsed on access: a port that is no number raises
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "it does not start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    return None


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
    return ModelReply(
        content=choice.message.content,
        tool_calls=_tool_calls_of(choice.message),
        finish_reason=choice.finish_reason,
    )


def _tool_calls_of(message: Any) -> list[ToolCall]:
    """The function tool calls of a chat completion's message (the ``openai`` client's type)."""
    calls = []
    sent = message.tool_calls or []
    taken = {call.id for call in sent if call.id}
    for n, call in enumerate(sent):
        function = getattr(call, "function", None)
        if function is None:  # a custom (non-function) tool call: not ours
            continue
        arguments = function.arguments
        if not isinstance(arguments, str):  # some servers send an object, not JSON text
            arguments = json.dumps(arguments)
        # Some servers leave the id out: the tool message must still answer the call,
        # and answer it alone, so the id made for it is none of the reply's others.
        call_id = call.id or unused_call_id(f"call_{n}", taken)
        calls.append(ToolCall(id=call_id, name=function.name, arguments=arguments))
    return calls


def unused_call_id(wanted: str, taken: set[str]) -> str:
    """``wanted``, or ``wanted_2``, ``wanted_3``...: the first not in ``taken``, now taken.

    The id made for a tool call a server sent without one: none of the reply's others.
    """
    candidate, n = wanted, 1
    while candidate in taken:
        n += 1
        candidate = f"{wanted}_{n}"
    taken.add(candidate)
    return candidate
