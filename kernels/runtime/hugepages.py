"""Back a forking process's private memory with huge pages, so each fork copies less.

Standard library only and no sandkernel import: the zygote (on the host) and
the batch path's fork server (in its sandbox) load this file from their own
folder, in whatever runtime they run.

``fork()`` copies the parent's page tables, one entry per 4 KiB page that is
mapped, and a child's exit frees its copy the same way: for a zygote that has
imported the data libraries (about 80 MiB of heap) that is most of what a fork
and an exit cost. A range backed by a 2 MiB huge page is one entry instead of
512. Linux's ``MADV_COLLAPSE`` (6.1 and later) moves a range that is already
populated into huge pages, synchronously, whatever the system's THP setting
says for new memory; a child that then writes to such a page splits its own
mapping of it and copies 4 KiB, as before, so the children's private memory
does not grow. Nothing else changes: where the call is not there (an older
kernel, THP compiled out, a seccomp filter that refuses it), the process runs
on small pages as it did.
"""

import ctypes
import os

_MADV_COLLAPSE = 25
_HUGE = 2 << 20
#: A range is collapsed only if at least this share of its small pages is in use:
#: a sparse one (a reservation, a mostly empty arena) would grow the process's
#: resident memory by the holes it fills.
_MIN_FILLED = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")


def collapse():
    """Collapse the process's populated private memory into huge pages; return MiB moved.

    Walks ``/proc/self/maps`` for private writable mappings (the heap and
    anonymous ones, not files), and asks for each 2 MiB-aligned range in one
    whose small pages are at least half resident (``mincore``). Returns 0
    where the kernel does not support it.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore = libc.madvise, libc.mincore
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    pages = _HUGE // _PAGE
    resident = ctypes.create_string_buffer(pages)
    moved = 0
    for start, end in _private_ranges():
        first = (start + _HUGE - 1) & ~(_HUGE - 1)
        for at in range(first, end - _HUGE + 1, _HUGE):
            if mincore(at, _HUGE, resident) != 0:
                continue
            filled = pages - resident.raw.count(0)
            # A refusal (EINVAL: no such advice, or a range it cannot take) is
            # not an error: that range stays on small pages.
            if filled >= _MIN_FILLED * pages and madvise(at, _HUGE, _MADV_COLLAPSE) == 0:
                moved += _HUGE
    return moved >> 20


def _private_ranges():
    """(start, end) of each private, writable, anonymous mapping."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            name = fields[5].strip() if len(fields) > 5 else ""
            if fields[1].startswith("rw") and fields[1].endswith("p") and name in ("", "[heap]"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges
