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
- A preload first reads every shard's index (a suffix read; its crc32c and every entry's
  bounds checked), then splits the shards into ranged reads of adjacent chunks
  (:func:`plan_pieces`, several per shard so that even one shard is read by several threads).
- **Uncompressed, pinned local file** (:func:`read_piece_local`): one ``preadv`` per piece
  scatters each chunk's bytes straight into its rows of the output (the checksums and the
  padding of a partial chunk into small side buffers), then every chunk's crc32c is checked on
  the output rows. No other copy.
- **Everything else** (compressed presets, object stores): the piece's byte range is read with
  one ranged request of the array's zarr store (so every store gets this path: pinned files, S3
  through obstore, zarr's own stores) and each inner chunk is checked and decoded by numcodecs
  straight into its rows (:func:`decode_piece`); zstd and blosc release the GIL, so pieces
  decode in parallel threads.

Any other layout (a zarr array written by other software, another codec chain, another index
location) gives ``None`` from :meth:`ShardLayout.of` and the caller reads it through zarr.
A bad index or chunk checksum, a chunk pointing outside its shard or failing to decode
is a :class:`~jasper.errors.FormatError` naming the shard object and the array.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
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
    """crc32c of ``data`` (any contiguous buffer), continued from ``value``. The ``crc32c``
    package (numcodecs' own choice for its crc32c codec) releases the GIL and runs at about
    11 GB/s here, twice zarr's ``google_crc32c``, which holds the GIL."""
    return int(_crc32c.crc32c(data, value))


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
        return self.dtype.itemsize * math.prod(self.shape[1:])

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


@functools.cache
def _decoder(compressor: str) -> Callable[[Any, Any], Any] | None:
    """The numcodecs decode function of ``compressor`` (codec objects hold only their
    settings, so one serves every thread)."""
    if compressor == "zstd":
        from numcodecs.zstd import Zstd

        return Zstd().decode
    if compressor == "blosc":
        from numcodecs.blosc import Blosc

        return Blosc().decode
    return None


def parse_index(layout: ShardLayout, tail: np.ndarray, shard_size: int | None, where: str,
                array: str) -> np.ndarray:
    """The ``(chunks, 2)`` uint64 index from the last :attr:`ShardLayout.index_bytes` of a
    shard, its crc32c and entries checked (against the shard's size when it is known)."""
    if tail.size != layout.index_bytes:
        raise FormatError(where, f"shard object is shorter than its {layout.index_bytes}-byte "
                          "index (truncated?)", array=array)
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
    limit = np.uint64(2**62 if shard_size is None else max(0, shard_size - layout.index_bytes))
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


@dataclass(frozen=True)
class Piece:
    """Adjacent stored inner chunks of one shard: one ranged read, ``start:stop`` of the
    shard object; ``chunks`` are ``(chunk, offset, nbytes)``."""

    shard: int
    start: int
    stop: int
    chunks: tuple[tuple[int, int, int], ...]

    def row_bytes(self, layout: ShardLayout) -> int:
        """Output bytes this piece fills."""
        return sum(_chunk_rows(layout, self.shard, j) for j, _, _ in self.chunks) \
            * layout.row_bytes


def plan_pieces(layout: ShardLayout, shard: int, index: np.ndarray, piece_bytes: int
                ) -> tuple[list[Piece], list[int]]:
    """Split shard ``shard`` into ranged reads of about ``piece_bytes`` (runs of chunks that
    lie back to back in the object) so that one shard is read by several threads; also the
    inner chunks inside the array that were never stored (they read as the fill value)."""
    stored: list[tuple[int, int, int]] = []
    empty: list[int] = []
    for j in range(layout.chunks_per_shard):
        if _chunk_rows(layout, shard, j) == 0:
            continue  # past the array's end (zarr stores none there)
        if index[j, 0] == EMPTY:
            empty.append(j)
        else:
            stored.append((j, int(index[j, 0]), int(index[j, 1])))
    stored.sort(key=lambda c: c[1])
    pieces: list[Piece] = []
    run: list[tuple[int, int, int]] = []
    for chunk in stored:
        _, off, nbytes = chunk
        if run and (off != run[-1][1] + run[-1][2] or off + nbytes - run[0][1] > piece_bytes
                    or 3 * len(run) + 3 > IOV_MAX):
            pieces.append(Piece(shard, run[0][1], run[-1][1] + run[-1][2], tuple(run)))
            run = []
        run.append(chunk)
    if run:
        pieces.append(Piece(shard, run[0][1], run[-1][1] + run[-1][2], tuple(run)))
    return pieces, empty


def fill_chunks(layout: ShardLayout, shard: int, chunks: list[int], out: np.ndarray) -> None:
    """Write the fill value into the rows of never-stored inner ``chunks`` (``out``: the
    shard's rows, flat uint8)."""
    rb = layout.row_bytes
    for j in chunks:
        a = j * layout.chunk_rows * rb
        rows = out[a : a + _chunk_rows(layout, shard, j) * rb]
        rows.view(layout.dtype)[...] = layout.fill_value


def _bad_chunk(layout: ShardLayout, shard: int, chunk: int, where: str, array: str,
               problem: str) -> FormatError:
    row = layout.shard_span(shard)[0] + chunk * layout.chunk_rows
    return FormatError(where, f"inner chunk {chunk} (rows from {row}) {problem}", array=array)


def decode_piece(layout: ShardLayout, piece: Piece, data: np.ndarray, out: np.ndarray,
                 where: str, array: str) -> None:
    """Check and decode the bytes ``data`` of ``piece`` (uint8, ``piece.start:piece.stop`` of
    the shard object) into ``out``: the shard's rows of the output, as a flat uint8 view."""
    if data.size != piece.stop - piece.start:
        raise FormatError(where, f"shard object ends at byte {piece.start + data.size}, inside "
                          f"its data (truncated, or an index pointing past its end)",
                          array=array)
    rb = layout.row_bytes
    scratch: list[np.ndarray] = []
    for j, off, nbytes in piece.chunks:
        rows = _chunk_rows(layout, piece.shard, j)
        dest = out[j * layout.chunk_rows * rb : (j * layout.chunk_rows + rows) * rb]
        lo = off - piece.start
        decode_chunk(layout, piece.shard, j, data[lo : lo + nbytes], dest, where, array,
                     scratch)


def decode_chunk(layout: ShardLayout, shard: int, chunk: int, stored: np.ndarray,
                 dest: np.ndarray, where: str, array: str,
                 scratch: list[np.ndarray] | None = None) -> None:
    """Check the crc32c of one stored inner chunk (``stored``: its bytes with the trailing
    checksum, uint8) and decode it into ``dest`` (flat uint8: the chunk's rows inside the
    array, or a whole padded chunk). ``scratch`` keeps a reusable buffer for partial chunks."""
    payload = stored[: stored.size - CRC_BYTES]
    if stored.size < CRC_BYTES or crc32c(payload) != _stored_crc(stored[-CRC_BYTES:]):
        raise _bad_chunk(layout, shard, chunk, where, array,
                         "fails its crc32c (corrupt shard object)")
    decode = _decoder(layout.compressor)
    if decode is None:
        if payload.size < dest.size:
            raise _bad_chunk(layout, shard, chunk, where, array,
                             "is shorter than its rows (corrupt index)")
        dest[...] = payload[: dest.size]
        return
    full = dest.size == layout.chunk_bytes
    if full:
        target = dest
    else:
        if scratch is None:
            scratch = []
        if not scratch:
            scratch.append(np.empty(layout.chunk_bytes, dtype=np.uint8))
        target = scratch[0]
    try:
        # the output is exactly one chunk: numcodecs refuses a chunk that decodes larger
        decode(payload, target)
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        raise _bad_chunk(layout, shard, chunk, where, array,
                         f"does not decode as {layout.compressor}: {exc}") from None
    if not full:
        dest[...] = target[: dest.size]


def preadv_exact(fd: int, views: list[memoryview], offset: int) -> int:
    """``preadv`` all of ``views`` from ``offset``; fewer bytes only at the end of the file."""
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


def read_index_local(layout: ShardLayout, fd: int, where: str, array: str) -> np.ndarray:
    """The checked index of the shard object open as ``fd``."""
    size = os.fstat(fd).st_size
    tail = np.empty(min(size, layout.index_bytes), dtype=np.uint8)
    got = preadv_exact(fd, [tail.data], size - tail.size)
    return parse_index(layout, tail[:got], size, where, array)


def read_piece_local(layout: ShardLayout, piece: Piece, fd: int, out: np.ndarray, where: str,
                     array: str) -> None:
    """Read an uncompressed ``piece`` from the pinned file ``fd`` with one ``preadv`` that
    scatters each chunk's bytes straight into its rows of ``out`` (the shard's rows, flat
    uint8), the checksums and a partial chunk's padding into side buffers; then check every
    chunk's crc32c on the rows read.

    This runs once per 128 KiB chunk in every preload thread, holding the GIL for all but the
    ``preadv`` and the checksums, so the per-chunk Python is kept to slicing one memoryview
    (numpy slices and per-chunk helpers cost about as much as copying the chunk, and the
    threads then queue on the GIL)."""
    rb, cr = layout.row_bytes, layout.chunk_rows
    a, b = layout.shard_span(piece.shard)
    shard_rows = b - a
    n = len(piece.chunks)
    crcs = np.empty(n, dtype="<u4")
    crc_slots = memoryview(crcs).cast("B")
    rows_mv = memoryview(out).cast("B")
    views: list[memoryview] = []
    dests: list[memoryview] = []
    pads: dict[int, bytearray] = {}
    for i, (j, _off, _n) in enumerate(piece.chunks):
        lo = j * cr
        rows = min(cr, shard_rows - lo)
        dest = rows_mv[lo * rb : (lo + rows) * rb]
        views.append(dest)
        dests.append(dest)
        if rows < cr:
            pad = pads[i] = bytearray((cr - rows) * rb)
            views.append(memoryview(pad))
        views.append(crc_slots[4 * i : 4 * i + 4])
    if preadv_exact(fd, views, piece.start) != piece.stop - piece.start:
        raise FormatError(where, "shard object ends inside its data (truncated while being "
                          "read?)", array=array)
    got = np.fromiter(map(_crc32c.crc32c, dests), dtype=np.uint32, count=n)
    for i, pad in pads.items():
        got[i] = crc32c(pad, int(got[i]))
    bad = np.flatnonzero(got != crcs)
    if bad.size:
        raise _bad_chunk(layout, piece.shard, piece.chunks[int(bad[0])][0], where, array,
                         "fails its crc32c (corrupt shard object)")


__all__ = ["Piece", "ShardLayout", "crc32c", "decode_chunk", "decode_piece", "fill_chunks", "parse_index",
           "plan_pieces", "preadv_exact", "read_index_local", "read_piece_local"]
