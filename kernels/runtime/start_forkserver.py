"""Starts the batch path's fork server (``forkserver.py``) from its bytecode.

Python compiles a script it is given every time it runs it; a module loaded
through the import system comes from ``__pycache__`` when the bytecode there
is current. The engine writes that bytecode on the host (the sandbox sees this
folder read-only); without it, or for another Python version, the module is
compiled here as a script would be. Starting this way saves each sandbox
about 7 ms of compilation and leaves the server about 2 MiB smaller, which
every fork copies and every child's exit unmaps.

The server's folder stays ``sys.path[0]``, as when ``forkserver.py`` is the
script. Standard library only, like the server.
"""

import importlib.util
import os


def _load_server():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forkserver.py")
    spec = importlib.util.spec_from_file_location("_sandkernel_forkserver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    _load_server().main()
