"""OpenAI's Files and Assistants v2 objects, as this server sends and accepts them.

Responses are the objects of OpenAI's API reference, field for field
(``openai.types.beta.Assistant``, ``Thread``, ``Message``, ``Run``, ``RunStep``,
``openai.types.FileObject``), so OpenAI's own clients parse them. Requests
refuse unknown fields, so a misspelt parameter is a 400 naming it rather than
a setting silently ignored; what OpenAI accepts and this server does not do
(``file_search``) is refused where it is checked, with a message that says so.

Ids: a thread's id is also its sandkernel session's id, and an assistant's
its agent's id, and those allow ``[A-Za-z0-9._:@-]`` only; so every id here is
``<prefix>-<24 letters and digits>`` (``thread-…``, ``asst-…``, ``msg-…``), as
the engine's file ids are ``file-…``. OpenAI documents its ids as opaque.
"""

from __future__ import annotations

import secrets
import string
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """A fresh, unguessable id: ``prefix-`` and 24 letters and digits (142 random bits)."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class _Object(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16, description="up to 16 pairs; keys up to 64, values up to 512 chars"),
]

# --------------------------------------------------------------------------- tools


class CodeInterpreterTool(_Object):
    type: Literal["code_interpreter"] = "code_interpreter"


class FunctionDefinition(_Object):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Object):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FileSearchTool(_Object):
    """Accepted in a request only to be refused with a message saying why."""

    model_config = ConfigDict(extra="allow")
    type: Literal["file_search"] = "file_search"


ToolIn = Annotated[CodeInterpreterTool | FunctionTool | FileSearchTool, Field(discriminator="type")]
Tool = Annotated[CodeInterpreterTool | FunctionTool, Field(discriminator="type")]


class CodeInterpreterResources(_Object):
    file_ids: list[str] = Field(default_factory=list, max_length=20)


class ToolResources(_Object):
    """``tool_resources``; ``"code interpreter"`` (with a space, as Azure's page
    writes it) is taken as ``code_interpreter``."""

    code_interpreter: CodeInterpreterResources | None = None
    file_search: dict[str, Any] | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _spaced_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "code interpreter" in data:
            data = dict(data)
            spaced = data.pop("code interpreter")
            data.setdefault("code_interpreter", spaced)
        return data

    def file_ids(self) -> list[str]:
        return list(self.code_interpreter.file_ids) if self.code_interpreter else []


class ToolChoiceFunctionName(_Object):
    name: str


class ToolChoiceObject(_Object):
    type: Literal["function", "code_interpreter", "file_search"]
    function: ToolChoiceFunctionName | None = None


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceObject


class ResponseFormatText(_Object):
    type: Literal["text"]


class ResponseFormatJsonObject(_Object):
    type: Literal["json_object"]


class JsonSchemaFormat(_Object):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    # ``schema`` would shadow BaseModel.schema(): the field is named otherwise, shown as OpenAI's.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(_Object):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


_RESPONSE_FORMAT_SHAPES = (
    '\'auto\', {"type": "text"}, {"type": "json_object"} or '
    '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}'
)


def _one_response_format_error(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # One error for the field (its param is ``response_format``), not one per shape it is not.
    try:
        return handler(value)
    except ValidationError as exc:
        why = _shape_error(exc) if isinstance(value, dict) else ""
        raise ValueError(f"expected {_RESPONSE_FORMAT_SHAPES}{why}") from None


def _shape_error(exc: ValidationError) -> str:
    """What is wrong inside the shape the value named by its ``type``, if it named one."""
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if loc and loc[0].startswith("tagged-union["):
            where = ".".join(loc[2:])  # after the union and the tag it chose
            return f" ({where}: {error['msg']})" if where else f" ({error['msg']})"
    return ""


def _stored_response_format(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # Objects stored before response_format was checked may hold anything: shown as "auto".
    try:
        return handler(value)
    except ValidationError:
        return "auto"


_ResponseFormatShape = (
    Literal["auto"]
    | Annotated[
        ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
        Field(discriminator="type"),
    ]
)
#: ``response_format`` in a request: what OpenAI accepts (``None``: not given).
ResponseFormatIn = Annotated[_ResponseFormatShape | None, WrapValidator(_one_response_format_error)]
#: ``response_format`` of a stored assistant or run.
ResponseFormat = Annotated[_ResponseFormatShape | None, WrapValidator(_stored_response_format)]


class TruncationStrategy(_Object):
    type: Literal["auto", "last_messages"] = "auto"
    last_messages: int | None = Field(default=None, ge=1)


# --------------------------------------------------------------------------- files


class FileObject(_Object):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["assistants", "assistants_output"]
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class Deleted(_Object):
    id: str
    object: str
    deleted: bool = True


# --------------------------------------------------------------------------- assistants


class Assistant(_Object):
    id: str
    object: Literal["assistant"] = "assistant"
    created_at: int
    name: str | None = None
    description: str | None = None
    model: str
    instructions: str | None = None
    tools: list[Tool] = Field(default_factory=list)
    tool_resources: ToolResources = Field(default_factory=ToolResources)
    metadata: dict[str, str] = Field(default_factory=dict)
    temperature: float | None = None
    top_p: float | None = None
    response_format: ResponseFormat = "auto"


class AssistantCreate(_Request):
    model: str = Field(min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=512)
    instructions: str | None = Field(default=None, max_length=256_000)
    tools: list[ToolIn] = Field(default_factory=list, max_length=128)
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    response_format: ResponseFormatIn = None
    reasoning_effort: str | None = None


class AssistantUpdate(_Request):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=512)
    instructions: str | None = Field(default=None, max_length=256_000)
    tools: list[ToolIn] | None = Field(default=None, max_length=128)
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    response_format: ResponseFormatIn = None
    reasoning_effort: str | None = None


# --------------------------------------------------------------------------- messages


class TextIn(_Request):
    type: Literal["text"]
    text: str


class ImageFileRef(_Object):
    file_id: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageFileIn(_Request):
    type: Literal["image_file"]
    image_file: ImageFileRef


class ImageUrlRef(_Object):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageUrlIn(_Request):
    type: Literal["image_url"]
    image_url: ImageUrlRef


ContentPartIn = Annotated[TextIn | ImageFileIn | ImageUrlIn, Field(discriminator="type")]


class AttachmentTool(_Object):
    type: Literal["code_interpreter", "file_search"]


class Attachment(_Object):
    file_id: str
    tools: list[AttachmentTool] = Field(default_factory=list)


class MessageCreate(_Request):
    role: Literal["user", "assistant"]
    content: str | list[ContentPartIn]
    attachments: list[Attachment] | None = None
    metadata: Metadata | None = None
    file_ids: list[str] | None = Field(
        default=None, description="the v1 field, as Azure's page still shows it: code files"
    )


class FilePath(_Object):
    file_id: str


class FilePathAnnotation(_Object):
    type: Literal["file_path"] = "file_path"
    text: str
    start_index: int
    end_index: int
    file_path: FilePath


class Text(_Object):
    value: str
    annotations: list[FilePathAnnotation] = Field(default_factory=list)


class TextContent(_Object):
    type: Literal["text"] = "text"
    text: Text


class ImageFileContent(_Object):
    type: Literal["image_file"] = "image_file"
    image_file: ImageFileRef


class ImageUrlContent(_Object):
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrlRef


MessageContent = Annotated[
    TextContent | ImageFileContent | ImageUrlContent, Field(discriminator="type")
]


class IncompleteDetails(_Object):
    reason: str


class Message(_Object):
    id: str
    object: Literal["thread.message"] = "thread.message"
    created_at: int
    thread_id: str
    status: Literal["in_progress", "incomplete", "completed"] = "completed"
    incomplete_details: IncompleteDetails | None = None
    completed_at: int | None = None
    incomplete_at: int | None = None
    role: Literal["user", "assistant"]
    content: list[MessageContent] = Field(default_factory=list)
    assistant_id: str | None = None
    run_id: str | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)

    def text(self) -> str:
        return "\n".join(part.text.value for part in self.content if isinstance(part, TextContent))


class MessageUpdate(_Request):
    metadata: Metadata | None = None


# --------------------------------------------------------------------------- threads


class Thread(_Object):
    id: str
    object: Literal["thread"] = "thread"
    created_at: int
    metadata: dict[str, str] = Field(default_factory=dict)
    tool_resources: ToolResources = Field(default_factory=ToolResources)


class ThreadCreate(_Request):
    messages: list[MessageCreate] = Field(default_factory=list, max_length=32)
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None


class ThreadUpdate(_Request):
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None


# --------------------------------------------------------------------------- runs


class LastError(_Object):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


class Usage(_Object):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def plus(self, prompt: int, completion: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + prompt,
            completion_tokens=self.completion_tokens + completion,
            total_tokens=self.total_tokens + prompt + completion,
        )


class FunctionCall(_Object):
    name: str
    arguments: str


class RequiredToolCall(_Object):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SubmitToolOutputsAction(_Object):
    tool_calls: list[RequiredToolCall]


class RequiredAction(_Object):
    type: Literal["submit_tool_outputs"] = "submit_tool_outputs"
    submit_tool_outputs: SubmitToolOutputsAction


RunStatus = Literal[
    "queued",
    "in_progress",
    "requires_action",
    "cancelling",
    "cancelled",
    "failed",
    "completed",
    "incomplete",
    "expired",
]
#: A run in one of these holds its thread: no other run, no new message.
ACTIVE_RUN_STATUSES: frozenset[str] = frozenset(
    {"queued", "in_progress", "requires_action", "cancelling"}
)
#: A run in one of these is running (or about to) on this daemon.
RUNNING_STATUSES: frozenset[str] = frozenset({"queued", "in_progress", "cancelling"})


class Run(_Object):
    id: str
    object: Literal["thread.run"] = "thread.run"
    created_at: int
    thread_id: str
    assistant_id: str
    status: RunStatus = "queued"
    required_action: RequiredAction | None = None
    last_error: LastError | None = None
    expires_at: int | None = None
    started_at: int | None = None
    cancelled_at: int | None = None
    failed_at: int | None = None
    completed_at: int | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str
    tools: list[Tool] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: Usage | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    truncation_strategy: TruncationStrategy = Field(default_factory=TruncationStrategy)
    response_format: ResponseFormat = "auto"
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True


class _RunOptions(_Request):
    model: str | None = Field(default=None, min_length=1, max_length=256)
    instructions: str | None = Field(default=None, max_length=256_000)
    tools: list[ToolIn] | None = Field(default=None, max_length=128)
    metadata: Metadata | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool | None = None
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    truncation_strategy: TruncationStrategy | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatIn = None
    reasoning_effort: str | None = None


class RunCreate(_RunOptions):
    assistant_id: str
    additional_instructions: str | None = Field(default=None, max_length=256_000)
    additional_messages: list[MessageCreate] | None = Field(default=None, max_length=32)


class ThreadAndRunCreate(_RunOptions):
    assistant_id: str
    thread: ThreadCreate | None = None
    tool_resources: ToolResources | None = None


class RunUpdate(_Request):
    metadata: Metadata | None = None


class ToolOutput(_Request):
    tool_call_id: str
    output: str = ""


class SubmitToolOutputs(_Request):
    tool_outputs: list[ToolOutput]
    stream: bool | None = None


# --------------------------------------------------------------------------- run steps


class LogsOutput(_Object):
    type: Literal["logs"] = "logs"
    logs: str


class ImageRef(_Object):
    file_id: str


class ImageOutput(_Object):
    type: Literal["image"] = "image"
    image: ImageRef


CodeOutput = Annotated[LogsOutput | ImageOutput, Field(discriminator="type")]


class CodeInterpreterDetails(_Object):
    input: str
    outputs: list[CodeOutput] = Field(default_factory=list)


class CodeInterpreterCall(_Object):
    id: str
    type: Literal["code_interpreter"] = "code_interpreter"
    code_interpreter: CodeInterpreterDetails


class FunctionCallDetails(_Object):
    name: str
    arguments: str
    output: str | None = None


class FunctionToolCall(_Object):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallDetails


StepToolCall = Annotated[CodeInterpreterCall | FunctionToolCall, Field(discriminator="type")]


class MessageCreationRef(_Object):
    message_id: str


class MessageCreationDetails(_Object):
    type: Literal["message_creation"] = "message_creation"
    message_creation: MessageCreationRef


class ToolCallsDetails(_Object):
    type: Literal["tool_calls"] = "tool_calls"
    tool_calls: list[StepToolCall] = Field(default_factory=list)


StepDetails = Annotated[MessageCreationDetails | ToolCallsDetails, Field(discriminator="type")]


class RunStep(_Object):
    id: str
    object: Literal["thread.run.step"] = "thread.run.step"
    created_at: int
    run_id: str
    assistant_id: str
    thread_id: str
    type: Literal["message_creation", "tool_calls"]
    status: Literal["in_progress", "cancelled", "failed", "completed", "expired"] = "in_progress"
    cancelled_at: int | None = None
    completed_at: int | None = None
    expired_at: int | None = None
    failed_at: int | None = None
    last_error: LastError | None = None
    step_details: StepDetails
    usage: Usage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- containers


class ContainerExpiry(_Object):
    anchor: Literal["last_active_at"] = "last_active_at"
    minutes: int = Field(default=20, ge=1, le=20_160)


class ContainerCreate(_Request):
    name: str = Field(max_length=256)
    file_ids: list[str] | None = None
    expires_after: ContainerExpiry = Field(default_factory=ContainerExpiry)
    memory_limit: str | None = None


class Container(_Object):
    id: str
    object: Literal["container"] = "container"
    created_at: int
    name: str
    status: Literal["running", "expired"]
    expires_after: ContainerExpiry
    last_active_at: int
    memory_limit: str | None = None


class ContainerFileCreate(_Request):
    file_id: str


class ContainerFile(_Object):
    id: str
    object: Literal["container.file"] = "container.file"
    bytes: int
    container_id: str
    created_at: int
    path: str
    source: Literal["user", "assistant"]


# --------------------------------------------------------------------------- responses


class ResponseObject(_Object):
    """A response of the Responses API (output items as the ``openai`` package reads them)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "incomplete", "in_progress", "queued", "cancelled"]
    #: when it completed (only a completed response has it)
    completed_at: int | None = None
    model: str
    output: list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


def end_items(output: list[dict[str, Any]]) -> None:
    """End a response's items still going, in place: code calls as failed, others incomplete."""
    for item in output:
        if item.get("status") in ("in_progress", "interpreting"):
            code = item.get("type") == "code_interpreter_call"
            item["status"] = "failed" if code else "incomplete"


# --------------------------------------------------------------------------- lists


class Page(BaseModel):
    """A page of a list, in OpenAI's cursor shape."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
