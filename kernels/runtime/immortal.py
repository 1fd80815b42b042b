"""Immortal objects (PEP 683) for a process that forks children that share its heap.

Standard library only and no sandkernel import: the zygote (on the host) and
the batch path's fork server (in its sandbox) load this file from their own
folder, in whatever runtime they run.
"""

import ctypes
import gc
import sys

#: CPython's refcount of an immortal object (PEP 683) on the versions whose
#: layout this file knows: 64-bit, the GIL's build, 3.12 and 3.13, where
#: ``Py_INCREF`` does not write a refcount whose low 32 bits are all ones and
#: ``Py_DECREF`` skips one whose low 32 bits read as a negative int32.
_IMMORTAL_REFCNT = 0xFFFFFFFF
_IMMORTAL_VERSIONS = ((3, 12), (3, 13))


def immortalize():
    """Make every object the collector can reach immortal; return how many, or 0 if unsupported.

    Called once a process that forks has made what its children share: the
    children's private memory is mostly its pages copied on write, and the
    write is most often a reference count (reading a module's function or a
    class's method writes the object's refcount). Immortal objects' counts
    are never written, so those pages stay shared and uncopied. The cost is
    that these objects are never freed, in the parent or in a child; they
    are shared pages that a child does not pay for. Code that compares
    refcounts (``sys.getrefcount``, in-place tricks that need a count of 1)
    only sees a large count and takes its general path.
    """
    if (
        sys.implementation.name != "cpython"
        or sys.version_info[:2] not in _IMMORTAL_VERSIONS
        or sys.maxsize <= 1 << 32
        or "t" in getattr(sys, "abiflags", "")  # the free-threaded build
    ):
        return 0
    # This interpreter must behave as the versions above: an object made
    # immortal keeps its count through references taken and dropped.
    probe = [object()]
    ctypes.c_ssize_t.from_address(id(probe)).value = _IMMORTAL_REFCNT
    held = [probe] * 8
    del held
    if sys.getrefcount(probe) != _IMMORTAL_REFCNT:
        return 0
    # Reference counts read and written in place, as 64-bit words: word i of
    # this array is at address 8 + 8 * i (every object is 8-byte aligned).
    # Far cheaper per object than a ctypes object made for each.
    words = ctypes.cast(8, ctypes.POINTER(ctypes.c_ssize_t))
    level = gc.get_objects()
    own = (id(level) - 8) >> 3  # the list made here is freed
    count = 0
    while level:
        # An object already immortal is skipped and not walked again: its count
        # is the mark of having been seen.
        following = []
        for obj in level:
            address = id(obj)
            word = (address - 8) >> 3
            if address & 7 == 0 and word != own and words[word] & 0x80000000 == 0:
                words[word] = _IMMORTAL_REFCNT
                following.append(obj)
        count += len(following)
        level = gc.get_referents(*following)
    return count
