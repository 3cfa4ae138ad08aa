"""Host allocator tuning for batch assembly (glibc only).

Every batch is a few fresh tensors of several MB (``negative_embs`` alone is 12.6 MB at batch
1024, D=384, n_neg=8). glibc serves allocations above its mmap threshold (128 KiB, adapting up to
32 MiB) with a fresh ``mmap`` and returns freed heap tops to the kernel past its trim threshold,
so each batch pays page faults on megabytes of zeroed pages. Raising both thresholds lets freed
batch memory be reused by the next batch. Measured on 2 cores, D=384, n_neg=8, ``__getitems__``
of a preloaded dataset: 318k -> 684k samples/s at batch 1024, 195k -> 636k at batch 4096.

The setting is process-wide (it is what ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``
would set from the environment): up to 1 GiB allocations come from the heap and up to 2 GiB of
freed heap stays mapped for reuse. jasper applies it when a dataset is created on the CPU; set
``JASPER_TUNE_MALLOC=0`` to leave the allocator alone. Other C libraries: no-op.

What the heap keeps is bounded by epochs: jasper's loaders hand it back to the kernel
(:func:`release_free_memory`, glibc's ``malloc_trim``) when a pass over the data ends, so memory
between epochs (evaluation, checkpointing) is the data's, not the high-water mark of the batches
in flight. Measured with the benchmark's memory probe (pt preload, B=4096, 2 worker threads,
prefetch 4, 2 cores): summed PSS after an epoch 1,354 MB without the release, 822 MB with it,
against 813 MB with no workers; the peak during the epoch (the batches in flight) is unchanged.
A persistent DataLoader worker process keeps its own heap between passes (no hook reaches it
when a pass ends).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading

LOGGER = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_lock = threading.Lock()
_applied: bool | None = None


def tune_host_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; ``True`` when they are set.

    Returns ``False`` (and changes nothing) when ``JASPER_TUNE_MALLOC=0``, on a C library other
    than glibc, or when ``mallopt`` refuses.
    """
    global _applied
    if os.environ.get("JASPER_TUNE_MALLOC", "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def release_free_memory() -> bool:
    """Return the free memory of every malloc arena to the kernel (glibc's ``malloc_trim(0)``);
    ``True`` when it ran. Call it between passes: the next batches fault their pages in again.
    Other C libraries: no-op, ``False``."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _apply() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    try:
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
    LOGGER.debug("glibc malloc thresholds raised for batch reuse: %s", ok)
    return ok
