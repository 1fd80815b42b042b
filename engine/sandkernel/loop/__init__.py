"""The model loop: a chat model writes code, the sandbox runs it, the model reads the result.

When the code fails the model sees the error, changes the code and runs it
again, until it answers or runs out of attempts::

    async with Engine(pool_size=1) as engine, OpenAIChatModel(model="gpt-4o-mini") as model:
        session = await engine.session()
        outcome = await run_loop(model, "What is the 30th Fibonacci number?", session)
        print(outcome.outcome, outcome.final_answer)

Its pieces, each usable alone, one module each:

==============  =========================================================
``tool``        :data:`PYTHON_TOOL`, the ``python`` tool in the OpenAI
                chat-completions tools format, for any agent framework
``formatting``  :func:`format_result`, the text a model reads for one
                :class:`~sandkernel.results.ExecutionResult`: status first,
                output within a character budget (head and tail kept), and
                a one-line hint for the common failures
``tracebacks``  :func:`user_traceback`: only the user's frames
``models``      :class:`ChatModel`, and :class:`OpenAIChatModel` for any
                OpenAI-compatible endpoint (OpenAI, llama.cpp, vLLM, Ollama...)
``run``         :func:`run_loop`, the loop itself
==============  =========================================================
"""

from __future__ import annotations

from sandkernel.errors import ModelCallFailed
from sandkernel.loop.formatting import format_result
from sandkernel.loop.models import ChatModel, ModelReply, OpenAIChatModel, ToolCall, ToolChoice
from sandkernel.loop.run import CodeRunner, LoopEvent, LoopResult, run_loop
from sandkernel.loop.tool import DEFAULT_AVAILABLE_MODULES, PYTHON_TOOL, python_tool
from sandkernel.loop.tracebacks import user_traceback

__all__ = [
    "DEFAULT_AVAILABLE_MODULES",
    "PYTHON_TOOL",
    "ChatModel",
    "CodeRunner",
    "LoopEvent",
    "LoopResult",
    "ModelCallFailed",
    "ModelReply",
    "OpenAIChatModel",
    "ToolCall",
    "ToolChoice",
    "format_result",
    "python_tool",
    "run_loop",
    "user_traceback",
]
