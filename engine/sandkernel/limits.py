"""Bounds on times every entry point refuses to go past (no imports: the CLI loads it).

A TTL or timeout of ``inf``, ``nan`` or 10**15 seconds is not a wish for a long
time but a mistake, and the datetime arithmetic behind expiry times cannot
represent it: it is refused where it comes in, with the bound in the message.
"""

from __future__ import annotations

from typing import Final

#: The longest TTL, idle timeout, lifetime or file retention that can be asked for: 30 days.
MAX_TTL_S: Final = 30 * 24 * 3600.0
#: The longest wall timeout a cell or run can be given: one day.
MAX_TIMEOUT_S: Final = 24 * 3600.0
