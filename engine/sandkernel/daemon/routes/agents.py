"""Agent routes: files an agent's sessions see, read-only, in ``/mnt/data``.

::

    POST   /v1/agents/{id}/files              give stored files to an agent
    GET    /v1/agents/{id}/files              an agent's files
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path
from fastapi.responses import Response

from sandkernel.api import EngineAPI
from sandkernel.daemon.responses import json_response
from sandkernel.daemon.routes.raises import BODY, ENGINE, FILES
from sandkernel.daemon.schemas import ID_PATTERN, FileIds, FileList, error_responses
from sandkernel.errors import FileError, InvalidRequest

#: An agent id in a path, checked as the engine checks it.
_AgentId = Annotated[str, Path(pattern=ID_PATTERN, description="the agent's id")]


def add_agent_routes(app: FastAPI, engine: EngineAPI) -> None:
    """Add the agent routes."""

    @app.post(
        "/v1/agents/{agent_id}/files",
        response_model=FileList,
        responses=error_responses(*BODY, *FILES, *ENGINE),
        tags=["agents"],
    )
    async def attach_to_agent(agent_id: _AgentId, body: FileIds) -> Response:
        """Give stored files to an agent: they appear read-only in its sessions, live ones too."""
        return json_response(FileList(data=await engine.attach_to_agent(agent_id, body.file_ids)))

    @app.get(
        "/v1/agents/{agent_id}/files",
        response_model=FileList,
        responses=error_responses(InvalidRequest, FileError, *ENGINE),
        tags=["agents"],
    )
    async def agent_files(agent_id: _AgentId) -> Response:
        """The files every session of this agent sees."""
        return json_response(FileList(data=await engine.list_files(agent_id=agent_id)))
