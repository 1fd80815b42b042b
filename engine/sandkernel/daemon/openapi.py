"""The daemon's OpenAPI schema: what FastAPI generates, plus what it cannot say by itself."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from sandkernel.daemon.routes.runs import document_run_bodies


def refine_openapi(app: FastAPI, *, policy: str) -> None:
    """What the generated OpenAPI schema cannot say by itself, added once it is built.

    - ``policy`` of ``POST /v1/sessions`` can only name this daemon's policy;
    - a multipart form field is absent or a string: never ``null``; an upload names
      a session or an agent, not both;
    - the bodies of the one-shot routes, which read them themselves.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["CreateSession"]["properties"]["policy"]["anyOf"] = [
            {"type": "string", "enum": [policy]},
            {"type": "null"},
        ]
        for name, body in components.items():
            if name.startswith("Body_"):  # FastAPI's name for a form's fields
                for field in body.get("properties", {}).values():
                    alternatives = field.pop("anyOf", None)
                    if alternatives is not None:
                        field.update(next(a for a in alternatives if a.get("type") != "null"))
        # `give session_id or agent_id, not both`
        components["Body_upload_v1_files_post"]["not"] = {"required": ["session_id", "agent_id"]}
        document_run_bodies(components)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
