"""The python tool, as a model is offered it."""

from __future__ import annotations

import json
from typing import get_args

from sandkernel.loop import PYTHON_TOOL
from sandkernel.results import Status


def test_python_tool_is_an_openai_function_tool() -> None:
    function = PYTHON_TOOL["function"]
    assert PYTHON_TOOL["type"] == "function" and function["name"] == "python"
    assert function["parameters"]["required"] == ["code"]
    assert function["parameters"]["properties"]["code"]["type"] == "string"
    for words in ("stateful", "/mnt/data", "no internet", "status line", "traceback"):
        assert words in function["description"], words
    json.dumps(PYTHON_TOOL)  # plain JSON, usable by any framework


def test_the_description_names_every_status_a_result_can_have() -> None:
    listed = PYTHON_TOOL["function"]["description"].split("status line (", 1)[1].split(")", 1)[0]
    assert listed.split(", ") == list(get_args(Status))
