"""The HTTP side: OpenAI's routes under ``/openai`` and ``/openai/v1``, and their gate.

``AzureOpenAI(azure_endpoint=URL, api_key=TOKEN, api_version=...)`` calls
``URL/openai/files?api-version=...`` with ``api-key: TOKEN``;
``OpenAI(base_url=URL + "/openai", api_key=TOKEN)`` calls the same paths with
``Authorization: Bearer TOKEN``. Both are served; ``api-version`` is accepted
and ignored. ::

    POST   /files                                upload (multipart: file, purpose=assistants)
    GET    /files, /files/{id}, /files/{id}/content;  DELETE /files/{id}
    POST   /assistants;  GET /assistants;  GET|POST|DELETE /assistants/{id}
    POST   /threads;  GET|POST|DELETE /threads/{id};  POST /threads/runs
    POST   /threads/{id}/messages;  GET /threads/{id}/messages
    GET|POST|DELETE /threads/{id}/messages/{id}
    POST   /threads/{id}/runs (stream: true for events);  GET /threads/{id}/runs
    GET|POST /threads/{id}/runs/{id};  POST .../cancel;  POST .../submit_tool_outputs
    GET    /threads/{id}/runs/{id}/steps, .../steps/{id}
    POST   /containers;  GET /containers;  GET|DELETE /containers/{id}
    POST   /containers/{id}/files (multipart file, or file_id);  GET /containers/{id}/files
    GET|DELETE /containers/{id}/files/{id};  GET /containers/{id}/files/{id}/content
    POST   /responses (stream: true for events);  GET|DELETE /responses/{id}
    GET    /responses/{id}/input_items

:class:`OpenAIGate` sits in front of the daemon's own application: it sends
``/openai`` requests here, checked as the daemon checks its TCP requests (the
Unix socket needs no token; TCP needs the daemon's token, as ``api-key`` or
as a bearer token) and held to the daemon's body size limits, and passes
every other request on untouched. Its refusals are in OpenAI's error shape.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, cast
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sandkernel.daemon.asgi import content_length, limit_body, over_unix_socket
from sandkernel.openai_api.errors import APIError, bad_request, from_validation_error, unauthorized
from sandkernel.openai_api.events import Subscription
from sandkernel.openai_api.responses import ResponseCreate
from sandkernel.openai_api.service import AssistantsService
from sandkernel.openai_api.wire import (
    AssistantCreate,
    AssistantUpdate,
    ContainerCreate,
    ContainerFileCreate,
    MessageCreate,
    MessageUpdate,
    RunCreate,
    RunUpdate,
    SubmitToolOutputs,
    ThreadAndRunCreate,
    ThreadCreate,
    ThreadUpdate,
)

log = logging.getLogger(__name__)

PREFIXES: Final = ("/openai", "/openai/v1")
#: How soon OpenAI's clients poll a run again (``create_and_poll``), in ms.
POLL_AFTER_MS: Final = 100
_FILES_PATH_TAIL: Final = "/files"
Handler = Callable[[Request], Awaitable[Response]]


def is_openai_path(path: str) -> bool:
    return path == "/openai" or path.startswith("/openai/")


# --------------------------------------------------------------------------- the gate


class OpenAIGate:
    """Routes ``/openai/...`` to ``openai_app`` (authenticated, size-limited), the rest to ``app``.

    Args:
        app: the daemon's own application.
        openai_app: :func:`create_openai_app`'s.
        token: the daemon's token, required over TCP (``None``: TCP is refused here).
        max_json_bytes: largest JSON body.
        max_upload_bytes: largest upload body (``POST .../files``).
        wind_down: fails the runs and responses still going, their streams
            still open (:meth:`AssistantsService.wind_down`); the daemon calls
            it through :meth:`wind_down` before its grace time ends.
    """

    def __init__(
        self,
        app: ASGIApp,
        openai_app: ASGIApp,
        *,
        token: str | None,
        max_json_bytes: int,
        max_upload_bytes: int,
        wind_down: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        self.openai_app = openai_app
        self._token = token.encode() if token else None
        self.max_json_bytes = max_json_bytes
        self.max_upload_bytes = max_upload_bytes
        self._wind_down = wind_down

    async def wind_down(self) -> None:
        """End what is in flight with its final events, before the daemon stops."""
        if self._wind_down is not None:
            await self._wind_down()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_openai_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        if not (over_unix_socket(scope) or self._authorized(scope)):
            await _send(send, unauthorized(), [(b"www-authenticate", b'Bearer realm="sandkernel"')])
            return
        upload = scope["method"] == "POST" and scope["path"].rstrip("/").endswith(_FILES_PATH_TAIL)
        limit = self.max_upload_bytes if upload else self.max_json_bytes
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await _send(send, _too_large(limit, upload), [(b"connection", b"close")])
            return
        limited = limit_body(receive, limit, lambda: _too_large(limit, upload))
        await self.openai_app(scope, limited, send)

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return False
        for name, value in scope.get("headers", ()):
            given: bytes | None = None
            if name == b"api-key":
                given = value.strip()
            elif name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = rest.strip()
            if given is not None and hmac.compare_digest(given, self._token):
                return True
        return False


def _too_large(limit: int, upload: bool) -> APIError:
    setting = "--max-upload-mb" if upload else "--max-json-kb"
    return APIError(
        413,
        f"The request body is larger than this server accepts ({limit} bytes; "
        f"`sandkernel serve {setting}` sets it).",
        code="request_too_large",
    )


async def _send(send: Send, error: APIError, headers: list[tuple[bytes, bytes]]) -> None:
    body = error.encoded()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the routes


def create_openai_app(service: AssistantsService) -> Starlette:
    """The routes, under each of :data:`PREFIXES`, on ``service``."""
    routes: list[Route] = []
    for prefix in PREFIXES:
        for path, methods, endpoint in _routes(service):
            routes.append(Route(prefix + path, endpoint, methods=methods))
    return Starlette(
        routes=routes,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )


def _routes(service: AssistantsService) -> list[tuple[str, list[str], Handler]]:
    s = service

    async def upload_file(request: Request) -> Response:
        async with request.form(max_files=1, max_fields=20) as form:
            file = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(file, UploadFile):
                raise bad_request("Missing required parameter: 'file' (a file part).", "file")
            if not isinstance(purpose, str):
                raise bad_request("Missing required parameter: 'purpose'.", "purpose")
            if not file.filename:
                raise bad_request("The file part has no file name (with its extension).", "file")
            retention = _expiry(
                form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
            )
            created = await s.upload_file(file.file, file.filename, purpose, retention_s=retention)
        return _json(created)

    async def list_files(request: Request) -> Response:
        q = request.query_params
        return _json(
            await s.list_files(
                purpose=q.get("purpose"),
                limit=_int(q.get("limit"), 10_000, "limit", default=10_000),
                order=_order(q.get("order")),
                after=q.get("after"),
            )
        )

    async def file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if request.method == "DELETE":
            return _json(await s.delete_file(file_id))
        return _json(await s.file(file_id))

    async def file_content(request: Request) -> Response:
        content, stored = await s.file_content(request.path_params["file_id"])
        return Response(
            content,
            media_type=stored.mime_type,
            headers={
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(stored.name)}",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def assistants(request: Request) -> Response:
        if request.method == "POST":
            return _json(await s.create_assistant(await _body(request, AssistantCreate)))
        return _json(await s.list_assistants(**_listing(request)))

    async def assistant(request: Request) -> Response:
        assistant_id = request.path_params["assistant_id"]
        if request.method == "POST":
            body = await _body(request, AssistantUpdate)
            return _json(await s.update_assistant(assistant_id, body))
        if request.method == "DELETE":
            return _json(await s.delete_assistant(assistant_id))
        return _json(await s.assistant(assistant_id))

    async def threads(request: Request) -> Response:
        return _json(await s.create_thread(await _body(request, ThreadCreate)))

    async def thread(request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        if request.method == "POST":
            return _json(await s.update_thread(thread_id, await _body(request, ThreadUpdate)))
        if request.method == "DELETE":
            return _json(await s.delete_thread(thread_id))
        return _json(await s.thread(thread_id))

    async def thread_and_run(request: Request) -> Response:
        body = await _body(request, ThreadAndRunCreate)
        _, run, events = await s.create_thread_and_run(body, stream=bool(body.stream))
        return _run_answer(run, events)

    async def messages(request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        if request.method == "POST":
            return _json(await s.create_message(thread_id, await _body(request, MessageCreate)))
        listing = _listing(request)
        return _json(
            await s.list_messages(thread_id, run_id=request.query_params.get("run_id"), **listing)
        )

    async def message(request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        message_id = request.path_params["message_id"]
        if request.method == "POST":
            body = await _body(request, MessageUpdate)
            return _json(await s.update_message(thread_id, message_id, body))
        if request.method == "DELETE":
            return _json(await s.delete_message(thread_id, message_id))
        return _json(await s.message(thread_id, message_id))

    async def runs(request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        if request.method == "POST":
            body = await _body(request, RunCreate)
            run, events = await s.create_run(thread_id, body, stream=bool(body.stream))
            return _run_answer(run, events)
        return _json(await s.list_runs(thread_id, **_listing(request)))

    async def run(request: Request) -> Response:
        thread_id = request.path_params["thread_id"]
        run_id = request.path_params["run_id"]
        if request.method == "POST":
            body = await _body(request, RunUpdate)
            return _json(await s.update_run(thread_id, run_id, body), poll=True)
        return _json(await s.run(thread_id, run_id), poll=True)

    async def cancel(request: Request) -> Response:
        params = request.path_params
        return _json(await s.cancel_run(params["thread_id"], params["run_id"]), poll=True)

    async def submit_tool_outputs(request: Request) -> Response:
        params = request.path_params
        body = await _body(request, SubmitToolOutputs)
        run, events = await s.submit_tool_outputs(
            params["thread_id"], params["run_id"], body, stream=bool(body.stream)
        )
        return _run_answer(run, events)

    async def steps(request: Request) -> Response:
        params = request.path_params
        return _json(await s.list_steps(params["thread_id"], params["run_id"], **_listing(request)))

    async def step(request: Request) -> Response:
        params = request.path_params
        return _json(await s.step(params["thread_id"], params["run_id"], params["step_id"]))

    c = service.containers

    async def containers(request: Request) -> Response:
        if request.method == "POST":
            return _json(await c.create(await _body(request, ContainerCreate)))
        q = request.query_params
        return _json(
            await c.list(
                limit=_int(q.get("limit"), 100, "limit"),
                order=_order(q.get("order")),
                after=q.get("after"),
                name=q.get("name"),
            )
        )

    async def container(request: Request) -> Response:
        container_id = request.path_params["container_id"]
        if request.method == "DELETE":
            return _json(await c.delete(container_id))
        return _json(await c.get(container_id))

    async def container_files(request: Request) -> Response:
        container_id = request.path_params["container_id"]
        if request.method == "GET":
            q = request.query_params
            return _json(
                await c.files(
                    container_id,
                    limit=_int(q.get("limit"), 100, "limit"),
                    order=_order(q.get("order")),
                    after=q.get("after"),
                )
            )
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=20) as form:
                file = form.get("file")
                file_id = form.get("file_id")
                if isinstance(file, UploadFile) and file.filename:
                    return _json(await c.add_upload(container_id, file.file, file.filename))
                if isinstance(file_id, str):
                    return _json(await c.add_file_id(container_id, file_id))
                raise bad_request("Give either 'file' (a named file part) or 'file_id'.", "file")
        body = await _body(request, ContainerFileCreate)
        return _json(await c.add_file_id(container_id, body.file_id))

    async def container_file(request: Request) -> Response:
        params = request.path_params
        if request.method == "DELETE":
            return _json(await c.delete_file(params["container_id"], params["file_id"]))
        found, _ = await c.file(params["container_id"], params["file_id"])
        return _json(found)

    async def container_file_content(request: Request) -> Response:
        params = request.path_params
        content, stored = await c.content(params["container_id"], params["file_id"])
        return Response(
            content,
            media_type=stored.mime_type,
            headers={
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(stored.name)}",
                "X-Content-Type-Options": "nosniff",
            },
        )

    r = service.responses

    async def responses(request: Request) -> Response:
        body = await _body(request, ResponseCreate)
        if not body.stream:
            return _json(await r.create(body))
        return StreamingResponse(
            await r.stream(body),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def response(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        if request.method == "DELETE":
            return _json(await r.delete(response_id))
        return _json(await r.get(response_id))

    async def input_items(request: Request) -> Response:
        return _json(await r.input_items(request.path_params["response_id"], **_listing(request)))

    get, post, delete = "GET", "POST", "DELETE"
    threads_runs = "/threads/{thread_id}/runs"
    return [
        ("/files", [post], upload_file),
        ("/files", [get], list_files),
        ("/files/{file_id}", [get, delete], file),
        ("/files/{file_id}/content", [get], file_content),
        ("/assistants", [get, post], assistants),
        ("/assistants/{assistant_id}", [get, post, delete], assistant),
        ("/threads", [post], threads),
        ("/threads/runs", [post], thread_and_run),
        ("/threads/{thread_id}", [get, post, delete], thread),
        ("/threads/{thread_id}/messages", [get, post], messages),
        ("/threads/{thread_id}/messages/{message_id}", [get, post, delete], message),
        (threads_runs, [get, post], runs),
        (threads_runs + "/{run_id}", [get, post], run),
        (threads_runs + "/{run_id}/cancel", [post], cancel),
        (threads_runs + "/{run_id}/submit_tool_outputs", [post], submit_tool_outputs),
        (threads_runs + "/{run_id}/steps", [get], steps),
        (threads_runs + "/{run_id}/steps/{step_id}", [get], step),
        ("/responses", [post], responses),
        ("/responses/{response_id}", [get, delete], response),
        ("/responses/{response_id}/input_items", [get], input_items),
        ("/containers", [get, post], containers),
        ("/containers/{container_id}", [get, delete], container),
        ("/containers/{container_id}/files", [get, post], container_files),
        ("/containers/{container_id}/files/{file_id}", [get, delete], container_file),
        ("/containers/{container_id}/files/{file_id}/content", [get], container_file_content),
    ]


def _json(model: BaseModel, *, poll: bool = False) -> Response:
    headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if poll else None
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _run_answer(run: BaseModel, events: Subscription | None) -> Response:
    if events is None:
        return _json(run, poll=True)
    return StreamingResponse(
        events.sse(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _body[M: BaseModel](request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data: Any = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(
            f"We could not parse the JSON body of your request ({exc}). The body must be "
            "a JSON object."
        ) from None
    except RecursionError:
        raise bad_request(_too_deep()) from None
    if not isinstance(data, dict):
        raise bad_request("The body of your request must be a JSON object.")
    _check_strings_and_depth(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


#: How deep a body may nest: far more than any OpenAI body needs, and well within
#: what is stored and sent on can be written back as JSON (pydantic stops at 255).
MAX_BODY_DEPTH: Final = 100


def _too_deep() -> str:
    return (
        f"The JSON body of your request nests too deep: more than {MAX_BODY_DEPTH} levels of "
        "objects and arrays. Send a flatter body."
    )


def _check_strings_and_depth(data: dict[str, Any]) -> None:
    """A 400 for a body nested too deep, or holding a string UTF-8 cannot encode.

    JSON's ``\\ud800`` escapes decode to lone surrogates, which no later step
    (the model call, the stored JSON) can encode: refused here, naming where,
    before anything acts on the body. Walked without recursion, so that depth
    is what is checked, not what breaks the check.
    """
    pending: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while pending:
        value, where = pending.pop()
        if isinstance(value, str):
            _check_utf8(value, where)
        elif isinstance(value, dict | list):
            if len(where) >= MAX_BODY_DEPTH:
                raise bad_request(_too_deep())
            # Pushed last first: the first bad string in the body is the one named.
            if isinstance(value, dict):
                for key in value:
                    _check_utf8(key, where)
                pending.extend((value[k], (*where, k)) for k in reversed(list(value)))
            else:
                pending.extend((value[i], (*where, i)) for i in reversed(range(len(value))))


def _check_utf8(text: str, where: tuple[int | str, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        named = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where)
        param = named.removeprefix(".") or None
        what = f"the string at {param!r}" if param else "a key of the body"
        raise bad_request(
            f"The body of your request is not valid UTF-8: {what} holds a lone surrogate "
            f"({bad.encode('unicode_escape').decode()}), which UTF-8 cannot encode. In JSON, "
            "a \\uD800-\\uDFFF escape must be one half of a pair.",
            param,
        ) from None


def _int(value: str | None, most: int, param: str, default: int = 20) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise bad_request(f"{param} must be an integer (got {value!r})", param) from None
    if not 1 <= number <= most:
        raise bad_request(f"{param} must be between 1 and {most} (got {number})", param)
    return number


def _order(value: str | None) -> Literal["asc", "desc"]:
    if value is None or value == "desc":
        return "desc"
    if value == "asc":
        return "asc"
    raise bad_request(f"order must be 'asc' or 'desc' (got {value!r})", "order")


def _listing(request: Request) -> dict[str, Any]:
    q = request.query_params
    return {
        "limit": _int(q.get("limit"), 100, "limit"),
        "order": _order(q.get("order")),
        "after": q.get("after"),
        "before": q.get("before"),
    }


def _expiry(anchor: object, seconds: object) -> float | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at" or not isinstance(seconds, str):
        raise bad_request(
            "expires_after needs anchor 'created_at' and seconds", "expires_after[anchor]"
        )
    try:
        value = int(seconds)
    except ValueError:
        raise bad_request(
            "expires_after[seconds] must be an integer", "expires_after[seconds]"
        ) from None
    if not 3600 <= value <= 2_592_000:
        raise bad_request(
            "expires_after[seconds] must be between 3600 and 2592000", "expires_after[seconds]"
        )
    return float(value)


async def _api_error(request: Request, exc: Exception) -> Response:
    error = cast(APIError, exc)
    return Response(error.encoded(), status_code=error.status, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = APIError(404, f"Invalid URL ({request.method} {request.url.path})")
    elif exc.status_code == 405:
        error = APIError(405, f"Method not allowed: {request.method} {request.url.path}")
    else:
        error = APIError(exc.status_code, str(exc.detail))
    return Response(error.encoded(), status_code=error.status, media_type="application/json")


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    error = APIError(500, f"The server had an error processing your request: {exc!r}")
    return Response(error.encoded(), status_code=500, media_type="application/json")
