"""Writing ``dataset.h5``: option checking, chunk shapes and the streaming write.

Chunk shapes (measured on a 2-core development machine, README "Choosing a compression"):

- uncompressed arrays are stored *contiguous*, not chunked. A whole-array read is then one
  ``pread`` into the caller's buffer (the same speed as reading the raw bytes), and row reads can
  go straight to the bytes at the dataset's file offset. ``chunk_rows`` forces chunking.
- compressed arrays must be chunked (HDF5 filters work per chunk). A chunk holds whole rows,
  about :data:`CHUNK_BYTES` of them: big enough that per-chunk overhead vanishes in a preload,
  small enough that a random row read decompresses little, and never a whole column of a huge
  array (that would make every row read decompress the column).

Arrays are streamed: the writer asks the :class:`~jasper.backend.ArraySource` for blocks of about
:data:`WRITE_BLOCK_BYTES` (a whole number of chunks, so each chunk is compressed once) and writes
each block with ``write_direct``; a whole array is never held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jasper.atomic import FreeSpaceGuard, require_free_space
from jasper.backend import ArraySource
from jasper.dtypes import FLOAT_DTYPES, STORAGE_NUMPY, dtype_name, to_storage
from jasper.errors import ShapeError, WriteOptionError
from jasper.interrupts import InterruptGate, deferred_interrupts
from jasper_hdf5.layout import (
    ATTR_DTYPE,
    ATTR_FORMAT,
    ATTR_LAYOUT_VERSION,
    ATTR_NAME,
    FILE_NAME,
    FORMAT_NAME,
    LAYOUT_VERSION,
    PATHS,
)


def fixed_text(text: str) -> np.bytes_:
    """``text`` as the value of a jasper attribute: a fixed-length ASCII string (numpy ``S``),
    stored inside the object header. h5py stores a ``str`` or ``bytes`` as a variable-length
    string whose bytes live in the file's global heap, and HDF5 follows that heap pointer when
    the attribute is read: a damaged pointer crashed the reading process (found by fuzzing),
    where a damaged fixed-length string only reads as other bytes, which the reader's rules
    refuse."""
    return np.bytes_(text.encode("ascii"))

#: Accepted values of the ``compression`` write option.
COMPRESSIONS: tuple[str, ...] = ("none", "lzf", "gzip")
#: The compression used when none is given (see the README for the measurements behind it).
DEFAULT_COMPRESSION = "none"
#: gzip level when ``compression_level`` is not given (h5py's own default).
DEFAULT_GZIP_LEVEL = 4
#: Target bytes of one chunk of a compressed array.
CHUNK_BYTES = 256 << 10
#: Target bytes handed to HDF5 per write call.
WRITE_BLOCK_BYTES = 32 << 20
#: Chunk cache of the file while writing: room for the partly written chunks at block edges, so
#: a source yielding unaligned blocks still gets each chunk compressed once.
WRITE_CACHE_BYTES = 16 << 20


@dataclass(frozen=True)
class WriteOptions:
    """Checked write options. Build with :meth:`checked`."""

    compression: str = DEFAULT_COMPRESSION
    compression_level: int | None = None
    shuffle: bool | None = None
    chunk_rows: int | None = None

    @classmethod
    def checked(
        cls,
        compression: str | None = DEFAULT_COMPRESSION,
        compression_level: int | None = None,
        shuffle: bool | None = None,
        chunk_rows: int | None = None,
    ) -> WriteOptions:
        """Validate option values; a bad one raises :class:`WriteOptionError` saying what fits."""
        comp = "none" if compression is None else compression
        if not isinstance(comp, str) or comp.lower() not in COMPRESSIONS:
            raise WriteOptionError(f"hdf5: compression={compression!r} is not supported; "
                                   f"choose one of {', '.join(COMPRESSIONS)}")
        comp = comp.lower()
        if compression_level is not None:
            if comp != "gzip":
                raise WriteOptionError(f"hdf5: compression_level applies to gzip only, not to "
                                       f"compression={comp!r}")
            if (
                isinstance(compression_level, bool)
                or not isinstance(compression_level, (int, np.integer))
                or not 0 <= int(compression_level) <= 9
            ):
                raise WriteOptionError(f"hdf5: compression_level={compression_level!r} must be "
                                       "an integer 0..9")
            compression_level = int(compression_level)
        if shuffle is not None and not isinstance(shuffle, (bool, np.bool_)):
            raise WriteOptionError(f"hdf5: shuffle={shuffle!r} must be True, False or None (auto)")
        if shuffle and comp == "none":
            raise WriteOptionError("hdf5: shuffle=True only helps a compressor; pass "
                                   "compression='lzf' or 'gzip'")
        if chunk_rows is not None and (
            isinstance(chunk_rows, bool)
            or not isinstance(chunk_rows, (int, np.integer))
            or int(chunk_rows) < 1
        ):
            raise WriteOptionError(f"hdf5: chunk_rows={chunk_rows!r} must be a positive integer")
        return cls(comp, compression_level, None if shuffle is None else bool(shuffle),
                   None if chunk_rows is None else int(chunk_rows))

    def use_shuffle(self, logical_dtype: str) -> bool:
        """The shuffle filter for an array of ``logical_dtype`` (``shuffle=None``: automatic).

        Automatic: on for gzip (smaller *and* faster to decode on embeddings, whose exponent
        bytes repeat), on for integers under lzf (int64 ids are mostly zero high bytes), off for
        floats under lzf (a few percent smaller for several times slower decoding).
        """
        if self.compression == "none":
            return False
        if self.shuffle is not None:
            return self.shuffle
        return self.compression == "gzip" or logical_dtype not in FLOAT_DTYPES


def chunk_rows_for(shape: tuple[int, ...], itemsize: int, target_bytes: int = CHUNK_BYTES) -> int:
    """Rows of whole-row chunks of about ``target_bytes`` (at least 1, at most the rows)."""
    row = itemsize * math.prod(shape[1:])
    return max(1, min(shape[0], target_bytes // max(1, row)))


def dataset_options(
    opts: WriteOptions, shape: tuple[int, ...], logical_dtype: str
) -> dict[str, Any]:
    """The ``create_dataset`` keywords (layout and filters) for one array."""
    if not shape or 0 in shape:
        return {}  # empty or scalar: contiguous (HDF5 cannot chunk a zero-length dimension)
    if opts.compression == "none" and opts.chunk_rows is None:
        return {}
    itemsize = STORAGE_NUMPY[logical_dtype].itemsize
    rows = opts.chunk_rows or chunk_rows_for(shape, itemsize)
    kw: dict[str, Any] = {"chunks": (min(rows, shape[0]), *shape[1:])}
    if opts.compression == "lzf":
        kw["compression"] = "lzf"
    elif opts.compression == "gzip":
        kw["compression"] = "gzip"
        kw["compression_opts"] = (
            DEFAULT_GZIP_LEVEL if opts.compression_level is None else opts.compression_level
        )
    if opts.use_shuffle(logical_dtype):
        kw["shuffle"] = True
    return kw


def write_file(directory: Path, arrays: Mapping[str, ArraySource], opts: WriteOptions) -> Path:
    """Write every array of ``arrays`` into ``directory/dataset.h5``; returns the file path."""
    import h5py

    unknown = [n for n in arrays if n not in PATHS]
    if unknown:
        raise ShapeError(
            f"hdf5: unknown array(s) {', '.join(unknown)}; the data model has "
            f"{', '.join(PATHS)}", array=unknown[0], rule="known array",
        )
    path = Path(directory) / FILE_NAME
    # h5py's close after running out of space can crash (SIGSEGV), so no write may fill the disk
    # (64 KiB + 4 KiB per array bound HDF5's metadata): an uncompressed write is refused before
    # it starts; a compressed one, whose size shows only as it goes, before each block
    meta = (64 << 10) + (4 << 10) * len(arrays)
    if opts.compression == "none":
        need = sum(int(a.nbytes) for a in arrays.values()) + meta
        require_free_space(path, need, f"{len(arrays)} arrays")
    guard = None if opts.compression == "none" else FreeSpaceGuard(path, meta, WRITE_CACHE_BYTES)
    # libver "earliest" (h5py's default) keeps the files readable by old h5py/HDF5 installs,
    # like the original system's.
    # Ctrl-C is held while h5py runs (it would be swallowed inside h5py's callbacks and the
    # write would complete) and raised between blocks, so every interrupt stops the write.
    with (deferred_interrupts() as gate,
          h5py.File(path, "w", rdcc_nbytes=WRITE_CACHE_BYTES, rdcc_w0=1.0) as f):
        f.attrs[ATTR_FORMAT] = fixed_text(FORMAT_NAME)
        f.attrs[ATTR_LAYOUT_VERSION] = LAYOUT_VERSION
        for name, source in arrays.items():
            _write_array(f, path, name, source, opts, gate, guard)
            gate.check()
    return path


def _write_array(f: Any, path: Path, name: str, source: ArraySource, opts: WriteOptions,
                 gate: InterruptGate, guard: FreeSpaceGuard | None) -> None:
    logical = dtype_name(source.dtype)
    shape = tuple(int(s) for s in source.shape)
    stored = STORAGE_NUMPY[logical]
    kw = dataset_options(opts, shape, logical)
    dset = f.create_dataset(PATHS[name], shape=shape, dtype=stored, **kw)
    dset.attrs[ATTR_NAME] = fixed_text(name)
    dset.attrs[ATTR_DTYPE] = fixed_text(logical)
    block = max(1, WRITE_BLOCK_BYTES // max(1, source.row_bytes()))
    chunk = kw.get("chunks")
    if chunk is not None:
        block = max(chunk[0], block - block % chunk[0])
    n_rows = shape[0] if shape else 1
    row = 0
    for part in source.iter_chunks(block):
        arr = to_storage(part)
        if not shape:
            dset[()] = arr
            row = 1
            continue
        n = arr.shape[0] if arr.ndim else 0
        if n == 0:
            continue
        if tuple(arr.shape[1:]) != shape[1:] or row + n > n_rows:
            raise ShapeError(
                f"{path}: array {name!r} got a block of shape {tuple(arr.shape)} at row {row}; "
                f"the array is {shape}", array=name, row=row, rule="block fits the array",
            )
        gate.check()
        if guard is not None:  # the block's raw bytes bound what it adds (the cache: slack)
            guard.require(arr.nbytes, f"rows {row}..{row + n} of {name} (compressed)")
        dset.write_direct(arr, dest_sel=np.s_[row : row + n])
        row += n
