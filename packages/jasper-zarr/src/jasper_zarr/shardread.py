"""Whole-shard preload: the shards jasper-zarr's writer produces, read without zarr's codec
pipeline, straight into the rows of the caller's tensor.

zarr decodes a sharded array chunk by chunk through its async codec pipeline (one task, one
buffer and several copies per 128 KiB inner chunk); that capped a preload at a few percent
of a raw read of the same files. Every array the writer makes has one fixed shape, which this
module recognises (:meth:`ShardLayout.of`) and reads directly:

- a shard is one object of whole rows across the full width: ``shard_rows`` rows in inner
  chunks of ``chunk_rows`` rows, each encoded ``bytes`` (little endian) -> optional ``zstd`` or
  ``blosc`` -> ``crc32c`` (4 bytes, little endian, after the data); the shard index is at the
  end: one ``(offset, nbytes)`` pair of little-endian uint64 per inner chunk, then its own
  crc32c (zarr v3 ``sharding_indexed`` with ``index_location="end"``). An inner chunk the
  writer never stored has ``offset = nbytes = 2**64 - 1`` and reads as the fill value, as in
  zarr. The last inner chunk of the array is stored padded to the full chunk shape; inner
  chunks wholly past the array's end are not stored.
- **Uncompressed, pinned local file** (:func:`read_local_shard`): the index is read and its
  crc32c checked, then one ``preadv`` per run of adjacent chunks scatters each chunk's bytes
  straight into its rows of the output (the checksums and the padding of a partial chunk into
  small side buffers), then every chunk's crc32c is checked on the output rows. No other copy.
- **Everything else** (compressed presets, object stores): the whole shard is fetched with one
  request of the array's zarr store (so every store gets this path: pinned files, S3 through
  obstore, zarr's own stores) and each inner chunk is checked and decoded by numcodecs
  straight into its rows (:func:`decode_shard`); zstd and blosc release the GIL, so shards
  decode in parallel threads.

Any other layout (a zarr array written by other software, another codec chain, another index
location) gives ``None`` from :meth:`ShardLayout.of` and the caller reads it through zarr.
A bad index or chunk checksum, a chunk pointing outside its shard or decoding to the wrong size
is a :class:`~jasper.errors.FormatError` naming the shard object and the array.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from jasper.errors import FormatError

#: ``offset``/``nbytes`` of an inner chunk that was never written (zarr v3 sharding spec).
EMPTY = np.uint64(2**64 - 1)
#: Bytes of the crc32c a ``crc32c`` codec appends (and the shard index ends with).
CRC_BYTES = 4
#: Buffers one ``preadv`` call takes at most (POSIX IOV_MAX; Linux has 1024).
IOV_MAX = int(os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024
COMPRESSORS = ("zstd", "blosc")


def crc32c(data: Any, value: int = 0) -> int:
    """crc32c of ``data`` (any contiguous buffer), continued from ``value`` (zarr's own
    checksum library: no other dependency)."""
    return int(google_crc32c.extend(value, data))


def _stored_crc(data: np.ndarray) -> int:
    return int.from_bytes(bytes(data), "little")


@dataclass(frozen=True)
class ShardLayout:
    """The geometry and codecs of one array as jasper-zarr's writer lays it out."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    shard_rows: int
    chunk_rows: int
    #: ``"none"``, ``"zstd"`` or ``"blosc"``
    compressor: str
    fill_value: Any

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_bytes(self) -> int:
        """Decoded bytes of one (padded) inner chunk."""
        return self.chunk_rows * self.row_bytes

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + CRC_BYTES

    @property
    def n_shards(self) -> int:
        n = self.shape[0]
        return -(-n // self.shard_rows) if n else 0

    def shard_span(self, shard: int) -> tuple[int, int]:
        """Rows ``a:b`` of shard ``shard``."""
        a = shard * self.shard_rows
        return a, min(self.shape[0], a + self.shard_rows)

    @classmethod
    def of(cls, metadata: Mapping[str, Any], dtype: np.dtype[Any], fill_value: Any
           ) -> ShardLayout | None:
        """The layout of an array from its zarr v3 metadata document (``zarr.json`` as a
        dict), or ``None`` when it is not exactly what jasper-zarr's writer produces."""
        try:
            return cls._of(metadata, np.dtype(dtype), fill_value)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            return None

    @classmethod
    def _of(cls, meta: Mapping[str, Any], dtype: np.dtype[Any], fill_value: Any
            ) -> ShardLayout | None:
        if meta.get("zarr_format") != 3 or meta.get("node_type", "array") != "array":
            return None
        if meta.get("storage_transformers"):
            return None
        if dtype.kind not in "biuf" or dtype.hasobject or (
                dtype.itemsize > 1 and dtype.byteorder not in ("=", "<", "|")) \
                or sys.byteorder != "little":
            return None
        shape = tuple(int(s) for s in meta["shape"])
        grid = meta["chunk_grid"]
        keys = meta.get("chunk_key_encoding", {"name": "default"})
        if not shape or grid.get("name") != "regular" or keys.get("name") != "default" \
                or keys.get("configuration", {}).get("separator", "/") != "/":
            return None
        shard_shape = tuple(int(s) for s in grid["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        chunk_shape = tuple(int(s) for s in conf["chunk_shape"])
        width = tuple(max(1, s) for s in shape[1:])
        if len(shard_shape) != len(shape) or shard_shape[1:] != width \
                or len(chunk_shape) != len(shape) or chunk_shape[1:] != width:
            return None
        shard_rows, chunk_rows = shard_shape[0], chunk_shape[0]
        if chunk_rows < 1 or shard_rows % chunk_rows or 0 in shape[1:]:
            return None
        if conf.get("index_location", "end") != "end" \
                or [_name(c) for c in conf["index_codecs"]] != ["bytes", "crc32c"] \
                or not _little(conf["index_codecs"][0]):
            return None
        inner = [_name(c) for c in conf["codecs"]]
        if inner[:1] != ["bytes"] or inner[-1:] != ["crc32c"] or not _little(conf["codecs"][0]):
            return None
        middle = inner[1:-1]
        if len(middle) > 1 or (middle and middle[0] not in COMPRESSORS):
            return None
        if middle == ["zstd"] and conf["codecs"][1].get("configuration", {}).get("checksum"):
            return None  # zstd frame checksums: zarr's path checks them, numcodecs' decode not
        return cls(shape=shape, dtype=dtype, shard_rows=shard_rows, chunk_rows=chunk_rows,
                   compressor=middle[0] if middle else "none",
                   fill_value=np.asarray(fill_value if fill_value is not None else 0,
                                         dtype=dtype))


def _name(codec: Any) -> str:
    return str(codec.get("name")) if isinstance(codec, Mapping) else ""


def _little(codec: Mapping[str, Any]) -> bool:
    endian = (codec.get("configuration") or {}).get("endian", "little")
    return endian in ("little", None)


def _decoder(compressor: str) -> Callable[[Any, Any], Any] | None:
    if compressor == "zstd":
        from numcodecs.zstd import Zstd

        return Zstd().decode
    if compressor == "blosc":
        from numcodecs.blosc import Blosc

        return Blosc().decode
    return None


def parse_index(layout: ShardLayout, tail: np.ndarray, shard_size: int, where: str,
                array: str) -> np.ndarray:
    """The ``(chunks, 2)`` uint64 index from the last :attr:`ShardLayout.index_bytes` of a
    shard of ``shard_size`` bytes, its crc32c and every entry's bounds checked."""
    if tail.size != layout.index_bytes or shard_size < layout.index_bytes:
        raise FormatError(where, f"shard object is {shard_size} bytes, shorter than its "
                          f"{layout.index_bytes}-byte index (truncated?)", array=array)
    body = tail[:-CRC_BYTES]
    if crc32c(body) != _stored_crc(tail[-CRC_BYTES:]):
        raise FormatError(where, "shard index fails its crc32c (corrupt or truncated shard "
                          "object)", array=array)
    index = body.view("<u8").reshape(layout.chunks_per_shard, 2)
    stored = index[:, 0] != EMPTY
    if np.any((index[:, 1] == EMPTY) != ~stored):
        raise FormatError(where, "shard index has an entry with only one of offset/nbytes "
                          "marked empty", array=array)
    offsets, sizes = index[stored, 0], index[stored, 1]
    limit = shard_size - layout.index_bytes
    if np.any(sizes < CRC_BYTES) or np.any(offsets > limit) or np.any(sizes > limit - offsets):
        raise FormatError(where, "shard index points outside the shard's data (corrupt "
                          "index)", array=array)
    if layout.compressor == "none" and np.any(sizes != layout.chunk_bytes + CRC_BYTES):
        raise FormatError(where, f"an uncompressed inner chunk is not {layout.chunk_bytes} "
                          "bytes plus its crc32c (corrupt index)", array=array)
    return index


def _chunk_rows(layout: ShardLayout, shard: int, chunk: int) -> int:
    """Rows of inner chunk ``chunk`` of shard ``shard`` inside the array (0: past its end)."""
    a, b = layout.shard_span(shard)
    start = a + chunk * layout.chunk_rows
    return max(0, min(layout.chunk_rows, b - start))


def _fill(layout: ShardLayout, rows: np.ndarray) -> None:
    rows.view(layout.dtype)[...] = layout.fill_value


def decode_shard(layout: ShardLayout, shard: int, data: np.ndarray, out: np.ndarray,
                 where: str, array: str) -> None:
    """Check and decode the whole shard object ``data`` (uint8) into ``out``: the shard's rows
    of the output, as a flat uint8 view."""
    index = parse_index(layout, data[-layout.index_bytes:] if data.size >= layout.index_bytes
                        else data, int(data.size), where, array)
    decode = _decoder(layout.compressor)
    rb, scratch = layout.row_bytes, None
    for j in range(layout.chunks_per_shard):
        rows = _chunk_rows(layout, shard, j)
        if rows == 0:
            continue
        dest = out[j * layout.chunk_rows * rb : (j * layout.chunk_rows + rows) * rb]
        off, nbytes = int(index[j, 0]), int(index[j, 1])
        if index[j, 0] == EMPTY:
            _fill(layout, dest)
            continue
        payload = data[off : off + nbytes - CRC_BYTES]
        if crc32c(payload) != _stored_crc(data[off + nbytes - CRC_BYTES : off + nbytes]):
            raise FormatError(where, f"inner chunk {j} (rows from "
                              f"{layout.shard_span(shard)[0] + j * layout.chunk_rows}) fails "
                              "its crc32c (corrupt shard object)", array=array)
        if decode is None:
            dest[...] = payload[: dest.size]
            continue
        full = rows == layout.chunk_rows
        if not full and scratch is None:
            scratch = np.empty(layout.chunk_bytes, dtype=np.uint8)
        target = dest if full else scratch
        try:
            # the output is exactly one chunk: numcodecs refuses a chunk that decodes larger
            decode(payload, target)
        except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
            raise FormatError(where, f"inner chunk {j} does not decode as "
                              f"{layout.compressor}: {exc}", array=array) from None
        if not full:
            assert scratch is not None
            dest[...] = scratch[: dest.size]


def _preadv_exact(fd: int, views: list[memoryview], offset: int) -> int:
    """``preadv`` all of ``views`` from ``offset`` (a short read, at EOF, returns fewer)."""
    total = 0
    while views:
        n = os.preadv(fd, views[:IOV_MAX], offset + total)
        if n == 0:
            break
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def read_local_shard(layout: ShardLayout, shard: int, fd: int, out: np.ndarray, where: str,
                     array: str) -> None:
    """Read uncompressed shard ``shard`` from the pinned file ``fd`` straight into ``out``
    (the shard's rows, flat uint8), then check every chunk's crc32c on the rows read."""
    size = os.fstat(fd).st_size
    tail = np.empty(min(size, layout.index_bytes), dtype=np.uint8)
    got = _preadv_exact(fd, [memoryview(tail)], size - tail.size)
    index = parse_index(layout, tail[:got], size, where, array)
    rb = layout.row_bytes
    crcs = np.empty((layout.chunks_per_shard, CRC_BYTES), dtype=np.uint8)
    pads: dict[int, np.ndarray] = {}
    stored: list[tuple[int, int]] = []  # (offset, chunk) of stored chunks inside the array
    for j in range(layout.chunks_per_shard):
        rows = _chunk_rows(layout, shard, j)
        if rows == 0:
            continue
        if index[j, 0] == EMPTY:
            _fill(layout, out[j * layout.chunk_rows * rb : (j * layout.chunk_rows + rows) * rb])
            continue
        if rows < layout.chunk_rows:
            pads[j] = np.empty((layout.chunk_rows - rows) * rb, dtype=np.uint8)
        stored.append((int(index[j, 0]), j))
    stored.sort()
    run: list[memoryview] = []
    run_start = run_end = -1

    def flush() -> None:
        want = sum(len(v) for v in run)
        if _preadv_exact(fd, list(run), run_start) != want:
            raise FormatError(where, "shard object ends inside its data (truncated while "
                              "being read?)", array=array)

    dests: dict[int, np.ndarray] = {}
    for off, j in stored:
        rows = _chunk_rows(layout, shard, j)
        dest = out[j * layout.chunk_rows * rb : (j * layout.chunk_rows + rows) * rb]
        dests[j] = dest
        views = [memoryview(dest)]
        if j in pads:
            views.append(memoryview(pads[j]))
        views.append(memoryview(crcs[j]))
        if off != run_end or len(run) + len(views) > IOV_MAX:
            if run:
                flush()
            run, run_start = [], off
        run.extend(views)
        run_end = off + layout.chunk_bytes + CRC_BYTES
    if run:
        flush()
    for _off, j in stored:
        value = crc32c(dests[j])
        if j in pads:
            value = crc32c(pads[j], value)
        if value != _stored_crc(crcs[j]):
            raise FormatError(where, f"inner chunk {j} (rows from "
                              f"{layout.shard_span(shard)[0] + j * layout.chunk_rows}) fails "
                              "its crc32c (corrupt shard object)", array=array)


__all__ = ["ShardLayout", "crc32c", "decode_shard", "parse_index", "read_local_shard"]
