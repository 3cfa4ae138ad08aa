"""Writing a jasper-zarr group: option checking, codecs, and the streaming shard-aligned write.

Arrays are streamed: rows from the :class:`~jasper.backend.ArraySource` are gathered into a
buffer of whole shards and each buffer is written with one zarr call (zarr encodes and uploads
the shards of a buffer concurrently). No shard is ever written twice, which on an object store
would be a read-modify-write of the object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jasper.backend import ArraySource
from jasper.dtypes import STORAGE_NUMPY, dtype_name, to_storage
from jasper.errors import ShapeError, WriteOptionError
from jasper_zarr.layout import (
    ATTR_DTYPE,
    ATTR_FORMAT,
    ATTR_LAYOUT_VERSION,
    ATTR_NAME,
    COMPRESSIONS,
    DEFAULT_BLOSC_LEVEL,
    DEFAULT_COMPRESSION,
    DEFAULT_ZSTD_LEVEL,
    FORMAT_NAME,
    INNER_CHUNK_BYTES,
    LAYOUT_VERSION,
    SHARD_BYTES,
    grid_for,
)
from jasper_zarr.stores import zarr_store

#: Bytes of whole shards buffered per write call (several shards upload concurrently).
WRITE_BUFFER_BYTES = 256 << 20


@dataclass(frozen=True)
class WriteOptions:
    """Checked write options; build with :meth:`checked`."""

    compression: str = DEFAULT_COMPRESSION
    compression_level: int | None = None
    shard_bytes: int = SHARD_BYTES
    chunk_rows: int | None = None

    @classmethod
    def checked(cls, compression: str | None, compression_level: int | None,
                shard_bytes: int | None, chunk_rows: int | None) -> WriteOptions:
        comp = "none" if compression is None else compression
        if not isinstance(comp, str) or comp.lower() not in COMPRESSIONS:
            raise WriteOptionError(f"zarr: compression={compression!r} is not supported; choose "
                                   f"one of {', '.join(COMPRESSIONS)}")
        comp = comp.lower()
        if compression_level is not None:
            if comp == "none":
                raise WriteOptionError("zarr: compression_level needs compression='zstd' or "
                                       "'blosc-lz4'")
            hi = 22 if comp == "zstd" else 9
            if isinstance(compression_level, bool) or not isinstance(compression_level, int) \
                    or not 1 <= compression_level <= hi:
                raise WriteOptionError(f"zarr: compression_level={compression_level!r} must be "
                                       f"an integer 1..{hi} for {comp}")
        for key, value in (("shard_bytes", shard_bytes), ("chunk_rows", chunk_rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise WriteOptionError(f"zarr: {key}={value!r} must be a positive integer")
        return cls(comp, compression_level, shard_bytes or SHARD_BYTES, chunk_rows)

    def compressors(self) -> list[Any]:
        """zarr bytes-to-bytes codecs of every inner chunk: the compressor, then crc32c."""
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        codecs: list[Any] = []
        if self.compression == "zstd":
            codecs.append(ZstdCodec(level=self.compression_level or DEFAULT_ZSTD_LEVEL))
        elif self.compression == "blosc-lz4":
            codecs.append(BloscCodec(cname="lz4", clevel=self.compression_level
                                     or DEFAULT_BLOSC_LEVEL, shuffle="shuffle"))
        codecs.append(Crc32cCodec())
        return codecs


def write_group(where: Any, arrays: Mapping[str, ArraySource], opts: WriteOptions) -> None:
    """Write every array into a new zarr group at ``where`` (a directory or a Location)."""
    import zarr

    store = zarr_store(where, read_only=False)
    try:
        group = zarr.open_group(store=store, mode="w", zarr_format=3, attributes={
            ATTR_FORMAT: FORMAT_NAME, ATTR_LAYOUT_VERSION: LAYOUT_VERSION})
        for name, source in arrays.items():
            _write_array(group, where, name, source, opts)
    finally:
        store.close()


def _write_array(group: Any, where: Any, name: str, source: ArraySource,
                 opts: WriteOptions) -> None:
    logical = dtype_name(source.dtype)
    shape = tuple(int(s) for s in source.shape)
    stored = STORAGE_NUMPY[logical]
    if not shape:
        raise ShapeError(f"zarr: {name} is a scalar; jasper arrays have rows", array=name,
                         rule="rank")
    grid = grid_for(shape, stored.itemsize, shard_bytes=opts.shard_bytes,
                    chunk_bytes=INNER_CHUNK_BYTES, chunk_rows=opts.chunk_rows)
    width = tuple(max(1, s) for s in shape[1:])
    arr = group.create_array(
        name, shape=shape, dtype=stored,
        shards=(grid.shard_rows, *width), chunks=(grid.chunk_rows, *width),
        compressors=opts.compressors(), filters=None, fill_value=0,
        attributes={ATTR_NAME: name, ATTR_DTYPE: logical},
        # every chunk is written, zeros included: a missing chunk is then always an error
        config={"write_empty_chunks": True},
    )
    n = shape[0]
    shards_per_write = max(1, WRITE_BUFFER_BYTES // max(1, grid.shard_rows * source.row_bytes()))
    block_rows = grid.shard_rows * shards_per_write
    cap = min(block_rows, max(n, 1))
    buf = np.empty((cap, *shape[1:]), dtype=stored)
    filled = 0  # rows in buf
    written = 0  # rows already in the array
    for part in source.iter_chunks(block_rows):
        data = to_storage(part)
        if tuple(data.shape[1:]) != shape[1:] or written + filled + data.shape[0] > n:
            raise ShapeError(f"{where}: array {name!r} got a block of shape {tuple(data.shape)} "
                             f"at row {written + filled}; the array is {shape}", array=name,
                             row=written + filled, rule="block fits the array")
        pos = 0
        while pos < data.shape[0]:
            take = min(data.shape[0] - pos, cap - filled)
            if filled == 0 and take == cap:
                arr[written : written + take] = data[pos : pos + take]  # aligned: no copy
                written += take
            else:
                buf[filled : filled + take] = data[pos : pos + take]
                filled += take
                if filled == cap:
                    arr[written : written + filled] = buf
                    written += filled
                    filled = 0
            pos += take
    if filled:
        arr[written : written + filled] = buf[:filled]
