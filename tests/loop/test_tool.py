"""The python tool, as a model is offered it."""

from __future__ import annotations

import json

from sandkernel.loop import PYTHON_TOOL


def test_python_tool_is_an_openai_function_tool() -> None:
    function = PYTHON_TOOL["function"]
    assert PYTHON_TOOL["type"] == "function" and function["name"] == "python"
    assert function["parameters"]["required"] == ["code"]
    assert function["parameters"]["properties"]["code"]["type"] == "string"
    for words in ("stateful", "/mnt/data", "no internet", "status line", "traceback"):
        assert words in function["description"], words
    json.dumps(PYTHON_TOOL)  # plain JSON, usable by any framework
