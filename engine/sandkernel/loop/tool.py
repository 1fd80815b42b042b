"""The ``python`` tool, as a chat model is offered it.

:data:`PYTHON_TOOL` is in the OpenAI chat-completions ``tools`` format, for
any agent framework; :func:`python_tool` builds it naming other libraries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: What the sandbox offers besides the standard library (see kernels/requirements.txt).
DEFAULT_AVAILABLE_MODULES: tuple[str, ...] = ("numpy", "pandas", "matplotlib", "openpyxl")

#: The name the model calls the tool by.
TOOL_NAME = "python"


def python_tool(*, available_modules: Sequence[str] = DEFAULT_AVAILABLE_MODULES) -> dict[str, Any]:
    """The ``python`` tool in the OpenAI chat-completions ``tools`` format.

    Args:
        available_modules: libraries the description names as installed.

    Returns:
        A new dict, safe to change.
    """
    libraries = ", ".join(available_modules)
    description = (
        "Run Python code in a stateful Jupyter (IPython) kernel and see the result. "
        "Variables, imports and functions persist between calls of this conversation. "
        "Read input files from /mnt/data and save every file you create there "
        "(charts, CSV, Excel...): files saved in /mnt/data are returned to the user. "
        "There is no internet access, so pip install does not work; installed besides the "
        f"standard library: {libraries}. Each call has a time limit and a memory limit. "
        "The result starts with a status line (ok, error, timeout, oom, killed, dead), then "
        "stdout and stderr (long output is cut in the middle), the value of the last "
        "expression, images displayed (plt.show()), the traceback of your code if it "
        "failed, and the files created. If the code fails, read the error, fix the code "
        "and call this tool again."
    )
    return {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {
                        "type": "string",
                        "description": "Python source run as one notebook cell; the value "
                        "of its last expression is shown.",
                    }
                },
                "required": ["code"],
                "additionalProperties": False,
            },
        },
    }


#: The ``python`` tool, as :func:`python_tool` builds it with the default libraries.
PYTHON_TOOL: dict[str, Any] = python_tool()
