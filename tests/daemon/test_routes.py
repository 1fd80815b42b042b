"""The daemon's application is composed of its route modules, each typed against the contract."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

from fastapi import FastAPI
from fastapi.routing import APIRoute

from sandkernel.api import EngineAPI, ServedEngine
from sandkernel.daemon.app import create_app
from sandkernel.daemon.records import SessionRecords
from sandkernel.daemon.routes.agents import add_agent_routes
from sandkernel.daemon.routes.files import add_file_routes
from sandkernel.daemon.routes.fusion import FUSION_PATHS, add_fusion_routes
from sandkernel.daemon.routes.lookup import SessionLookup
from sandkernel.daemon.routes.reporting import add_reporting_routes
from sandkernel.daemon.routes.runs import RUN_PATHS, add_run_routes
from sandkernel.daemon.routes.sessions import add_session_routes
from sandkernel.engine import Engine

ROUTE_MODULES: list[Callable[..., None]] = [
    add_session_routes,
    add_file_routes,
    add_agent_routes,
    add_run_routes,
    add_fusion_routes,
    add_reporting_routes,
]


def _operations(app: FastAPI) -> list[tuple[str, str]]:
    return [
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]


def test_each_route_module_takes_the_engine_as_the_contract() -> None:
    for add_routes in ROUTE_MODULES:
        engine_type = get_type_hints(add_routes)["engine"]
        assert engine_type in (EngineAPI, ServedEngine), add_routes.__qualname__


def test_the_application_serves_the_route_modules_routes_in_their_order(tmp_path: Path) -> None:
    engine = Engine(store_dir=tmp_path / "store")
    records = SessionRecords(tmp_path / "records.sqlite3")
    lookup = SessionLookup(engine, records)
    arguments: dict[Callable[..., None], tuple[tuple[Any, ...], dict[str, Any]]] = {
        add_session_routes: ((engine, lookup), {}),
        add_file_routes: ((engine, lookup), {}),
        add_agent_routes: ((engine,), {}),
        add_run_routes: ((engine,), {"default_batch_concurrency": 2 * (os.cpu_count() or 1)}),
        add_fusion_routes: ((engine,), {}),
        add_reporting_routes: ((engine,), {"started": 0.0}),
    }
    expected: list[tuple[str, str]] = []
    for add_routes in ROUTE_MODULES:
        alone = FastAPI()
        args, kwargs = arguments[add_routes]
        add_routes(alone, *args, **kwargs)
        operations = _operations(alone)
        assert operations, add_routes.__qualname__
        expected += operations
    served = _operations(create_app(engine, records))
    assert served == expected
    assert len(set(served)) == len(served)


def test_every_one_shot_run_path_is_a_served_post_route(tmp_path: Path) -> None:
    app = create_app(
        Engine(store_dir=tmp_path / "store"), SessionRecords(tmp_path / "records.sqlite3")
    )
    posts = {path for method, path in _operations(app) if method == "POST"}
    assert RUN_PATHS <= posts
    assert FUSION_PATHS - {"/v1/ping"} <= RUN_PATHS
