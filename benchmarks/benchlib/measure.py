"""Low-level measurements: page-cache control, raw reads, memory, latency statistics."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def dataset_files(path: Path) -> list[Path]:
    """Every regular file under ``path``, in a stable order."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def drop_pages(path: Path) -> int:
    """Evict the page cache of every file under ``path`` (``POSIX_FADV_DONTNEED`` per file), so
    that the next read comes from the device. Returns the number of files advised.

    Only clean pages are dropped; the cached datasets were fsynced by core's atomic write.
    """
    n = 0
    for f in dataset_files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


_libc = None


def resident_fraction(path: Path) -> float:
    """Fraction of the bytes under ``path`` that sit in the page cache (``mincore``), to prove
    that a "cold" measurement really started cold. ``nan`` where mincore is unavailable."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.POINTER(ctypes.c_ubyte)]
        page = mmap.PAGESIZE
        resident = total = 0
        for f in dataset_files(path):
            size = f.stat().st_size
            if size == 0:
                continue
            pages = (size + page - 1) // page
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as m:
                view = np.frombuffer(m, dtype=np.uint8)
                vec = (ctypes.c_ubyte * pages)()
                rc = _libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
                del view
                if rc != 0:
                    return float("nan")
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
                total += pages
        return resident / total if total else 0.0
    except (OSError, AttributeError, ValueError):
        return float("nan")


def total_file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in dataset_files(path))


def raw_read(path: Path, out: np.ndarray) -> int:
    """Read every file under ``path`` back to back into the preallocated byte buffer ``out``
    (unbuffered ``readinto``: one copy from the page cache, the least any loader can do).
    Returns the bytes read."""
    pos = 0
    mv = memoryview(out)
    for f in dataset_files(path):
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(mv[pos:])
                if not n:
                    break
                pos += n
    return pos


def _smaps_rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        return _smaps_rollup(pid)["Rss"]


def pss_bytes(pids: Iterable[int]) -> int:
    """Summed proportional set size of ``pids``: shared pages count once in total, so this is
    what a group of forked DataLoader workers really costs."""
    total = 0
    for pid in pids:
        try:
            import psutil

            total += int(psutil.Process(pid).memory_full_info().pss)
        except ImportError:
            total += _smaps_rollup(pid)["Pss"]
    return total


def child_pids(pid: int | None = None) -> list[int]:
    """Living descendants of ``pid`` (DataLoader workers)."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        kids: list[int] = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    kids.append(int(entry.name))
                    kids.extend(child_pids(int(entry.name)))
        return kids


def percentile_ms(samples_s: list[float], q: float) -> float:
    """The ``q``-th percentile of ``samples_s`` (seconds), in milliseconds."""
    if not samples_s:
        return float("nan")
    return float(np.percentile(np.asarray(samples_s), q) * 1000.0)


class Clock:
    """Stamps the time from a start, and between consecutive batches after it: the batch latency
    a training loop sees. ``first`` is the first interval ever measured (time to first batch)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.first: float | None = None
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        dt = now - self._t
        if self.first is None:
            self.first = dt
        self.latencies.append(dt)
        self._t = now
