"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI's clients read ``message`` and raise by status (400 ``BadRequestError``,
401 ``AuthenticationError``, 404 ``NotFoundError``...), so each error here
carries the status OpenAI answers the same mistake with and, for a bad body,
the field at fault in ``param`` (``tools[0].type``, ``tool_outputs``...).
Engine errors met on the way are mapped at this boundary
(:func:`from_engine_error`), keeping their message, which says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from pydantic import ValidationError

from sandkernel.errors import FileRejected, SandkernelError

#: Every other 4xx is an ``invalid_request_error`` (a 405 too), a 5xx a ``server_error``.
_TYPE_BY_STATUS: Final = {429: "rate_limit_error"}


class APIError(Exception):
    """An answer in OpenAI's error shape, raised anywhere a request is handled.

    Attributes:
        status: the HTTP status.
        message: what went wrong and what to do.
        type: OpenAI's ``type`` (``invalid_request_error``, ``server_error``...).
        param: the request field at fault, if one is.
        code: a machine-readable code, if any (``invalid_api_key``...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        """The JSON answer."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def encoded(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: str | None = None, *, code: str | None = None) -> APIError:
    """A 400 naming the field at fault."""
    return APIError(400, message, param=param, code=code)


def not_found(kind: str, object_id: str, param: str | None = None) -> APIError:
    """A 404 for an id nothing here has (``kind`` as OpenAI names it: ``assistant``...)."""
    return APIError(404, f"No {kind} found with id '{object_id}'.", param=param)


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect API key provided: send the daemon's token as `api-key: <token>` or "
        "`Authorization: Bearer <token>` (the token `sandkernel serve` was started with: "
        "--token, --token-file or SANDKERNEL_TOKEN).",
        code="invalid_api_key",
    )


def from_validation_error(exc: ValidationError, *, prefix: str = "") -> APIError:
    """A 400 for the first invalid field of a request body, named as OpenAI names fields."""
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc), "type": ""}
    param = param_name(first.get("loc", ()), prefix=prefix)
    reason = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {reason}" if param else reason
    more = len(errors) - 1
    if more > 0:
        message += f" ({more} more invalid field{'s' if more > 1 else ''})"
    return bad_request(message, param or None)


def param_name(loc: Sequence[int | str], *, prefix: str = "") -> str:
    """``("tools", 0, "function", "name")`` as ``tools[0].function.name``.

    Tags pydantic adds for the member of a tagged union (``function`` after
    ``tools[0]``) and for a ``str | list`` field are left out.
    """
    name = prefix
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(previous, int) and part in _UNION_TAGS:
            pass
        elif part in ("str", "list[...]", "function-after[...]") or "[" in str(part):
            pass
        else:
            name += f".{part}" if name else str(part)
        previous = part
    return name


# The tags of the tagged unions in wire.py, which pydantic puts in an error's location.
_UNION_TAGS: Final = frozenset(
    {"code_interpreter", "function", "file_search", "text", "image_file", "image_url"}
)


def from_engine_error(exc: SandkernelError, *, param: str | None = None) -> APIError:
    """An engine error as OpenAI would answer it (a refused upload is a 400 on ``file``)."""
    from sandkernel.daemon.errors import status_for

    status = status_for(exc)
    if isinstance(exc, FileRejected) and status == 422:
        status = 400
    return APIError(status, str(exc), param=param, code=type(exc).__name__)
