"""Back a forking process's private memory with huge pages, so each fork copies less.

Standard library only and no sandkernel import: the zygote loads this file
from its own folder, in whatever runtime it runs. (The batch path's fork
server was measured with it and gained nothing: its heap is a few 1 MiB
arenas, too small to hold an aligned huge page.)

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
#: A range is collapsed only if at least this share of its small pages is in use:
#: a sparse one (a reservation, a mostly empty arena) would grow the process's
#: resident memory by the holes it fills.
_MIN_FILLED = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _huge_page_size():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


def collapse():
    """Collapse the process's populated private memory into huge pages; return MiB moved.

    Walks ``/proc/self/maps`` for private writable mappings (the heap and
    anonymous ones, not files), and asks for each huge-page-aligned range in one
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
    huge = _huge_page_size()
    resident = ctypes.create_string_buffer(huge // _PAGE)
    moved = 0
    for start, end in _private_ranges():
        first = (start + huge - 1) & ~(huge - 1)
        for at in range(first, end - huge + 1, huge):
            if mincore(at, huge, resident) != 0:
                continue
            # A refusal (EINVAL: no such advice, or a range it cannot take) is
            # not an error: that range stays on small pages.
            if worth_collapsing(resident.raw) and madvise(at, huge, _MADV_COLLAPSE) == 0:
                moved += huge
    return moved >> 20


def worth_collapsing(resident):
    """Whether a range whose ``mincore`` vector is ``resident`` is full enough to collapse."""
    filled = sum(b & 1 for b in resident)  # only bit 0 of each byte is defined
    return filled >= _MIN_FILLED * len(resident)


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
