"""Bounds every entry point holds to: times, the form of ids and of module names.

The CLI loads it: only ``re``, ``keyword`` and the error tree.

A TTL or timeout of ``inf``, ``nan`` or 10**15 seconds is not a wish for a long
time but a mistake, and the datetime arithmetic behind expiry times cannot
represent it: it is refused where it comes in, with the bound in the message.
"""

from __future__ import annotations

import keyword
import re
from typing import Final

from sandkernel.errors import BadInput

#: The longest TTL, idle timeout, lifetime or file retention that can be asked for: 30 days.
MAX_TTL_S: Final = 30 * 24 * 3600.0
#: The longest wall timeout a cell or run can be given: one day.
MAX_TIMEOUT_S: Final = 24 * 3600.0

#: A session's or agent's id: 1-128 characters of letters, digits and ._:@-,
#: starting with a letter or digit (the daemon's routes take the same, ``^...$``).
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
_ID: Final = re.compile(ID_PATTERN)


def id_problem(value: str, kind: str) -> str | None:
    """Why ``value`` is no valid ``kind`` (session, agent) id, for its sender; None if it is."""
    if _ID.fullmatch(value) is not None:
        return None
    return (
        f"invalid {kind} id {value[:40]!r}: 1-128 characters of letters, digits and ._:@- "
        "starting with a letter or digit"
    )


def check_id(value: str, kind: str) -> None:
    """Refuse ``value`` as a ``kind`` id with :class:`BadInput` saying why (:func:`id_problem`)."""
    problem = id_problem(value, kind)
    if problem is not None:
        raise BadInput(problem)


def module_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be imported as written (``import name``); None if it can."""
    parts = name.split(".")
    if all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
        return None
    return f"{name!r} is not a module name (like 'numpy' or 'os.path')"


def check_code_text(code: str) -> None:
    """Raise :class:`BadInput` if ``code`` cannot be sent as text: a lone surrogate.

    JSON can carry one (``"\\ud83d"``), but neither a Jupyter message nor a
    request body encoded as UTF-8 can.
    """
    if not isinstance(code, str):  # a wrong type is the caller's TypeError, on every backend
        raise TypeError(f"the code must be text (str), not {type(code).__name__}")
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(
            f"the code is not valid text: a lone surrogate ({code[exc.start]!r}) at "
            f"position {exc.start}"
        ) from None
