"""Transparent huge pages for a preload's output tensor, as numpy asks for its own arrays.

A preload writes every byte of a freshly allocated tensor, so most of its time on Linux can be
first-touch page faults: one per 4 KiB page (about 0.7 GB/s measured on the development
machine, where reading the files from the page cache runs at 1-2 GB/s). numpy advises
``MADV_HUGEPAGE`` on its large allocations (one fault per 2 MiB); torch does not, so a raw
read into a numpy buffer would win on the faults alone. :func:`advise_huge_pages` gives the
output tensor the same advice before it is written (about 2x faster faults here). Where the
kernel has transparent huge pages off, or the memory is not anonymous, the advice is refused
and nothing changes.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

#: Linux's MADV_HUGEPAGE (asm-generic/mman-common.h).
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
#: Below this, a tensor is not worth a system call (numpy's threshold is the same 4 MiB).
MIN_BYTES = 4 << 20

_madvise: Any = None


def _libc_madvise() -> Any:
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Advise huge pages for the whole 2 MiB pages inside ``address:address+nbytes``; True
    when the kernel took the advice (never raises)."""
    if not sys.platform.startswith("linux") or nbytes < MIN_BYTES:
        return False
    lo = -(-address // HUGE_PAGE) * HUGE_PAGE
    hi = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return False
    try:
        return int(_libc_madvise()(lo, hi - lo, MADV_HUGEPAGE)) == 0
    except (OSError, AttributeError):
        return False


__all__ = ["advise_huge_pages"]
