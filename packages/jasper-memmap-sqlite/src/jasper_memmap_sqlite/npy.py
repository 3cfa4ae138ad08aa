"""Page-aligned ``.npy`` files: streaming writes, memory maps and direct reads.

The reading side (header checks, sizes, ``preadv``) is core's :mod:`jasper.npy`, re-exported here.

The files are ordinary NumPy ``.npy`` files (format 1.0), readable by ``numpy.load``. jasper pads
the header so that the data starts on a page boundary (4096 bytes by default): a row then spans
the fewest pages possible and a memory map of the data needs no offset arithmetic.

Every array is hashed in fixed *blocks* of rows while it is written. The block checksums (and one
checksum of the whole array, the same xxh3 digest core records in ``config.json``) go to the SQLite
catalogue, so a deep check can name the rows of a damaged block instead of just "the array".
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from jasper.dtypes import STORAGE_NUMPY, from_storage, to_storage
from jasper.errors import ShapeError
from jasper.lazy import lazy_torch
from jasper.manifest import Checksummer
from jasper.npy import NpyHeader, check_size, pread_into, read_header  # noqa: F401

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

MAGIC = b"\x93NUMPY"
#: Where array data starts (bytes): one page, so rows never straddle a page needlessly.
DEFAULT_ALIGN = 4096
#: Bytes hashed per catalogue block: small enough that a label update rehashes ~0.3 ms of data,
#: large enough that a 100 GB array needs only ~25k catalogue rows.
BLOCK_BYTES = 4 << 20


def header_bytes(dtype: np.dtype, shape: tuple[int, ...], align: int = DEFAULT_ALIGN) -> bytes:
    """A format-1.0 ``.npy`` header padded with spaces so the data starts at a multiple of
    ``align`` (NumPy reads any header length; it pads to 64 itself)."""
    if align < 64 or align % 64:
        raise ValueError(f"align must be a positive multiple of 64, got {align}")
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})
    body = text.encode("latin1")
    total = 10 + len(body) + 1
    padded = -(-total // align) * align
    if padded - 10 > 0xFFFF:
        raise ValueError(f"header of {len(body)} bytes does not fit a format 1.0 .npy header")
    body = body + b" " * (padded - total) + b"\n"
    return MAGIC + bytes([1, 0]) + (padded - 10).to_bytes(2, "little") + body


@dataclass
class Written:
    """What :func:`write_npy` wrote: the header facts and the checksums."""

    file: str
    storage_dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str | None
    rows_per_block: int
    blocks: list[str] = field(default_factory=list)


def rows_per_block(row_bytes: int) -> int:
    return max(1, BLOCK_BYTES // max(1, row_bytes))


class BlockHasher:
    """Hash an array in fixed blocks of rows, whatever chunk sizes arrive."""

    def __init__(self, row_bytes: int, *, whole: bool = True) -> None:
        self.row_bytes = row_bytes
        self.rows_per_block = rows_per_block(row_bytes)
        self.whole: Checksummer | None = Checksummer() if whole else None
        self.blocks: list[str] = []
        self._cur = Checksummer()
        self._cur_rows = 0

    def update(self, arr: np.ndarray) -> None:
        if self.whole is not None:
            self.whole.update(arr)
        rows = arr.shape[0] if arr.ndim else 1
        if rows == 0:
            return
        flat = arr.reshape(rows, -1)
        start = 0
        while start < rows:
            take = min(rows - start, self.rows_per_block - self._cur_rows)
            self._cur.update(flat[start : start + take])
            self._cur_rows += take
            start += take
            if self._cur_rows == self.rows_per_block:
                self.blocks.append(self._cur.hexdigest())
                self._cur, self._cur_rows = Checksummer(), 0

    def finish(self) -> tuple[str | None, list[str]]:
        if self._cur_rows:
            self.blocks.append(self._cur.hexdigest())
            self._cur, self._cur_rows = Checksummer(), 0
        return (self.whole.hexdigest() if self.whole is not None else None), self.blocks


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def write_npy(
    path: Path,
    shape: tuple[int, ...],
    storage_dtype: np.dtype,
    chunks: Iterator[np.ndarray],
    *,
    align: int = DEFAULT_ALIGN,
    array: str | None = None,
    on_bytes: object = None,
    whole_checksum: bool = True,
) -> Written:
    """Stream ``chunks`` (storage-dtype arrays, rows in order) into a page-aligned ``.npy``.

    Never holds more than one chunk; checks that the rows add up to ``shape[0]``.
    ``whole_checksum=False`` skips the whole-array digest (when core records it already); the
    per-block checksums are always computed.
    """
    head = header_bytes(storage_dtype, shape, align)
    row_bytes = storage_dtype.itemsize
    for s in shape[1:]:
        row_bytes *= s
    hasher = BlockHasher(row_bytes, whole=whole_checksum)
    rows = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(head))
        for chunk in chunks:
            arr = np.ascontiguousarray(chunk)
            if arr.dtype != storage_dtype or tuple(arr.shape[1:]) != tuple(shape[1:]):
                raise ShapeError(
                    f"{path.name}: a chunk is {arr.dtype} {arr.shape}, expected rows of "
                    f"{tuple(shape[1:])} {storage_dtype}", array=array, row=rows,
                    rule="chunk matches the array's row shape and dtype", path=path)
            hasher.update(arr)
            _write_all(fd, memoryview(arr.reshape(-1).view(np.uint8)))
            rows += arr.shape[0] if arr.ndim else 1
            if callable(on_bytes):
                on_bytes(arr.nbytes)
    finally:
        os.close(fd)
    expected = shape[0] if shape else 1
    if rows != expected:
        raise ShapeError(f"{path.name}: received {rows} rows, the shape says {expected}",
                         array=array, row=rows, rule="rows written equal the shape", path=path)
    whole, blocks = hasher.finish()
    return Written(path.name, storage_dtype, tuple(shape), len(head), row_bytes * expected,
                   whole, hasher.rows_per_block, blocks)


def tensor_chunks(source_chunks: Iterator[torch.Tensor]) -> Iterator[np.ndarray]:
    """Storage-dtype numpy views of tensor chunks (bfloat16 as its uint16 bit pattern)."""
    for t in source_chunks:
        yield to_storage(t)


def open_memmap(path: Path, header: NpyHeader, *, mode: str = "r",
                advice: int | None = None, fileobj: IO[bytes] | None = None) -> np.ndarray:
    """Map the data of ``path`` (or of the open ``fileobj``; ``mode`` ``"r"``, ``"r+"`` or
    ``"c"``), optionally with an ``madvise`` hint. A zero-row array is an empty in-memory array
    (nothing to map)."""
    if header.nbytes == 0:
        return np.empty(header.shape, dtype=header.dtype)
    mm = np.memmap(fileobj if fileobj is not None else path, dtype=header.dtype, mode=mode, offset=header.offset, shape=header.shape)
    if advice is not None:
        madvise(mm, advice)
    return mm


def madvise(mm: np.ndarray, advice: int) -> None:
    """Apply ``advice`` (e.g. ``mmap.MADV_RANDOM``) to the mapping behind a ``np.memmap``."""
    raw = getattr(mm, "_mmap", None)
    if isinstance(raw, mmap.mmap) and hasattr(raw, "madvise"):
        raw.madvise(advice)


def map_tensor(mm: np.ndarray, logical: str) -> torch.Tensor:
    """A tensor over a mapping, with the logical dtype (no copy)."""
    return from_storage(mm, logical)


def read_rows_direct(path: Path, header: NpyHeader, start: int, stop: int,
                     logical: str, *, array: str | None = None,
                     fd: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` read straight from the file (or ``fd``) into a fresh tensor."""
    rows = max(0, stop - start)
    out = np.empty((rows, *header.shape[1:]), dtype=STORAGE_NUMPY[logical])
    if rows:
        pread_into(path, header.offset + start * header.row_bytes,
                   memoryview(out.reshape(-1).view(np.uint8)), array=array, fd=fd)
    return from_storage(out, logical)
