"""What a kernel runs in its set-up cell before it is handed out (``sandkernel.kernel``).

The isolation self-check (:func:`report`, checked by
``sandkernel.sandbox.verify``), the prewarm imports (:func:`prewarm`) and the
warm-up (:func:`warm_up`), in one call (:func:`set_up`). The standard library
and the kernel's own IPython only, no sandkernel import: it runs in the kernel,
in the sandbox. Imported once before the kernel starts (by ``launch.py``, or by
the zygote, whose kernels share its compiled and warmed code), so the set-up
cell is one call, not 30 lines for IPython to transform and compile in every
new kernel. The module's name is private: a user's own ``selfcheck.py`` or
``setup.py`` stays theirs.
"""

import importlib
import json
import os
import sys

#: Starts the line :func:`prewarm` writes on stderr for a module it could not
#: import (``sandkernel.kernel`` reads it back).
PREWARM_FAILED = "sandkernel-prewarm-failed:"


def _writable(path):
    probe = os.path.join(path, ".sk-probe")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
        return True
    except OSError:
        return False


def report():
    """One line of JSON: who this process runs as, its mounts, environment and writable places."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f.read().splitlines():
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            options = fields[5].split(",")
            kind = fields[fields.index("-") + 1]
            mounts.append([point, "ro" if "ro" in options else "rw", kind])
    return json.dumps(
        {
            "uid": os.getuid(),
            "gid": os.getgid(),
            "cap_eff": status["CapEff"].strip(),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "seccomp": status["Seccomp"].strip(),
            "cwd": os.getcwd(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
            "usr_writable": _writable("/usr"),
            "workspace_writable": _writable("."),
            "root_writable": _writable("/"),
            "tmp_writable": _writable("/tmp"),
            "env_keys": sorted(os.environ),
            "env": dict(os.environ),
            "mounts": mounts,
        }
    )


def prewarm(modules):
    """Import each of ``modules``, binding no name; report on stderr those that fail.

    A module that is missing or fails to import is not fatal: the user's own
    import will say so. The report is guarded too: an exception whose
    ``str()`` raises does not stop the others.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            try:
                why = f"{type(exc).__name__}: {exc}"
            except Exception:  # noqa: BLE001
                why = "?"
            sys.stderr.write(f"{PREWARM_FAILED} {module}: {why}\n")


def warm_up(shell):
    """What a kernel's first cell that shows a value does once: do it now.

    Its session logger is made (importing ``IPython.core.logger``) and its
    display formatters run for the first time: about 2 ms that a session's
    first result would otherwise wait for. The zygote does it before it
    forks, for every kernel it forks.
    """
    if shell is not None:
        shell.logger  # noqa: B018 - a lazy property, made by reading it
        shell.display_formatter.format(0)


def set_up(check, modules):
    """The set-up cell: the self-check's report if ``check``, the prewarm imports, the warm-up."""
    if check:
        print(report(), flush=True)
    prewarm(modules)
    from IPython import get_ipython

    warm_up(get_ipython())
