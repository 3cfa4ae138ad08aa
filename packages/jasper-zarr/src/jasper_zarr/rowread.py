"""Lazy rows of an array in jasper-zarr's own layout: only the inner chunks holding requested
rows, fetched as coalesced ranged reads all in flight together, checked, decoded, and the rows
taken out in one gather.

zarr's own selection (``get_orthogonal_selection``) re-reads each touched shard's index on every
call and issues one request per inner chunk through its codec pipeline, a few at a time; over an
object store that capped lazy rows at a few hundred samples/s. Here, per batch of sorted unique
rows (core's :meth:`~jasper.backend.StoreReader.read_rows` sorts and de-duplicates them):

1. :func:`needed_chunks`: the inner chunks the rows fall in, and where each row lands in a
   buffer of those chunks (one ``np.unique``);
2. shard indexes: read once per reader and kept (:class:`ShardIndexes`; all missing ones of a
   batch in one round of suffix reads);
3. :func:`plan_reads`: per shard, the needed chunks in file order, neighbours closer than
   ``gap_bytes`` merged into one ranged read of at most ``max_bytes`` (a gap costs less to read
   than another request: 64 KiB on local files, 1 MiB over an object store, as object_store's
   own ``get_ranges`` coalesces);
4. the reads go out together through the array's zarr store (``store.get`` with a byte range:
   pinned local files, S3 through obstore, any zarr store), at most :data:`IN_FLIGHT` at once;
5. each chunk's crc32c is checked and it is decoded into its slot (:func:`decode_chunk`, in
   threads for compressed presets), and the rows are one ``np.take`` from the slots.

With the on-disk chunk cache on (``JASPER_ZARR_CACHE_DIR``, :mod:`jasper_zarr.cache`) each
inner chunk is a cache entry of its stored bytes (checksum included), looked up before planning
and put after the fetch, so coalescing never changes what a later epoch finds in the cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from jasper.errors import FormatError
from jasper_zarr.cache import ChunkCache
from jasper_zarr.layout import shard_key
from jasper_zarr.shardread import (
    CRC_BYTES,
    EMPTY,
    ShardLayout,
    crc32c,
    decode_chunk,
    parse_index,
    preadv_exact,
)

#: Gap (bytes) up to which two needed chunks of one shard are fetched in one read.
LOCAL_GAP_BYTES = 64 << 10
REMOTE_GAP_BYTES = 1 << 20
#: The largest single ranged read (several of them keep many connections busy).
MAX_READ_BYTES = 16 << 20
#: Ranged reads in flight at once over an object store.
IN_FLIGHT = 64
#: Compressed chunks decoded in threads when a batch has at least this many.
THREADED_DECODE_MIN = 8


@dataclass(frozen=True)
class ChunkRead:
    """One ranged read, bytes ``start:stop`` of shard ``shard``; ``chunks`` are
    ``(chunk in shard, offset, nbytes, slot)`` of the chunks it holds."""

    shard: int
    start: int
    stop: int
    chunks: tuple[tuple[int, int, int, int], ...]


def needed_chunks(layout: ShardLayout, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(chunks, positions)``: the sorted global inner-chunk numbers holding ``rows`` and,
    per row, its row number in a buffer of those chunks stacked in that order."""
    cr = layout.chunk_rows
    chunk_of = rows // cr
    chunks, slot = np.unique(chunk_of, return_inverse=True)
    return chunks, slot.reshape(-1) * cr + (rows - chunk_of * cr)


def plan_reads(layout: ShardLayout, chunks: np.ndarray, slots: np.ndarray,
               index_of: Callable[[int], np.ndarray], gap_bytes: int, max_bytes: int
               ) -> tuple[list[ChunkRead], list[tuple[int, int, int]]]:
    """Ranged reads of the global inner ``chunks`` (sorted; ``slots``: each one's slot in the
    chunk buffer), and the never-stored ones as ``(shard, chunk in shard, slot)`` (they read
    as the fill value, as in zarr)."""
    cps = layout.chunks_per_shard
    reads: list[ChunkRead] = []
    empty: list[tuple[int, int, int]] = []
    shards = chunks // cps
    bounds = np.flatnonzero(np.diff(shards)) + 1
    for group in np.split(np.arange(chunks.size), bounds):
        if group.size == 0:
            continue
        shard = int(shards[group[0]])
        index = index_of(shard)
        local = chunks[group] - shard * cps
        offsets, sizes = index[local, 0], index[local, 1]
        stored = offsets != EMPTY
        for j, s in zip(local[~stored].tolist(), slots[group][~stored].tolist(), strict=True):
            empty.append((shard, j, s))
        order = np.argsort(offsets[stored], kind="stable")
        js = local[stored][order].tolist()
        offs = offsets[stored][order].tolist()
        lens = sizes[stored][order].tolist()
        ss = slots[group][stored][order].tolist()
        run: list[tuple[int, int, int, int]] = []
        for j, off, n, s in zip(js, offs, lens, ss, strict=True):
            if run:
                start, end = run[0][1], run[-1][1] + run[-1][2]
                if off - end > gap_bytes or off + n - start > max_bytes or off < end:
                    reads.append(ChunkRead(shard, start, end, tuple(run)))
                    run = []
            run.append((j, off, n, s))
        if run:
            reads.append(ChunkRead(shard, run[0][1], run[-1][1] + run[-1][2], tuple(run)))
    return reads, empty


class ShardIndexes:
    """The checked shard indexes of one array, read once and kept (a reader's, per process).

    ``fetch(keys)`` returns each key's last :attr:`ShardLayout.index_bytes` (and the object's
    size where known), all requested together."""

    def __init__(self, layout: ShardLayout, name: str, where: Callable[[str], str]) -> None:
        self.layout = layout
        self.name = name
        self._where = where
        self._index: dict[int, np.ndarray] = {}

    def ensure(self, shards: Sequence[int],
               fetch: Callable[[list[str]], list[tuple[np.ndarray, int | None]]]) -> None:
        todo = sorted({s for s in shards if s not in self._index})
        if not todo:
            return
        keys = [self.key(s) for s in todo]
        for shard, key, (tail, size) in zip(todo, keys, fetch(keys), strict=True):
            self._index[shard] = parse_index(self.layout, tail, size, self._where(key),
                                             self.name)

    def key(self, shard: int) -> str:
        return shard_key(self.name, shard, len(self.layout.shape))

    def __getitem__(self, shard: int) -> np.ndarray:
        return self._index[shard]


class RangeFetcher:
    """Ranged reads of a zarr store's objects, all in flight together (at most
    :data:`IN_FLIGHT`), through zarr's event loop: one code path for every store."""

    def __init__(self, store: Any, where: Callable[[str], str], array: str) -> None:
        self.store = store
        self._where = where
        self._array = array

    def _run(self, requests: list[tuple[str, Any]]) -> list[np.ndarray]:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        prototype = default_buffer_prototype()
        store = self.store

        async def all_of() -> list[Any]:
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def one(key: str, request: Any) -> Any:
                async with gate:
                    return await store.get(key, prototype, request)

            return list(await asyncio.gather(*(one(k, r) for k, r in requests)))

        got = sync(all_of())
        out = []
        for (key, _), buf in zip(requests, got, strict=True):
            if buf is None:  # deleted after the listing: an error, never the fill value
                raise FormatError(self._where(key), f"chunk object {key!r} of array "
                                  f"{self._array!r} vanished after the listing",
                                  array=self._array)
            out.append(np.asarray(buf.as_numpy_array()).reshape(-1).view(np.uint8))
        return out

    def ranges(self, requests: list[tuple[str, int, int]]) -> list[np.ndarray]:
        from zarr.abc.store import RangeByteRequest

        return self._run([(k, RangeByteRequest(a, b)) for k, a, b in requests])

    def suffixes(self, keys: list[str], nbytes: int) -> list[tuple[np.ndarray, int | None]]:
        from zarr.abc.store import SuffixByteRequest

        return [(tail, None) for tail in self._run([(k, SuffixByteRequest(nbytes))
                                                    for k in keys])]


def read_rows(layout: ShardLayout, name: str, rows: np.ndarray, out: np.ndarray, *,
              indexes: ShardIndexes, fetcher: RangeFetcher,
              suffixes: Callable[[list[str]], list[tuple[np.ndarray, int | None]]],
              gap_bytes: int, where: Callable[[str], str], pool: Executor | None = None,
              local_fd: Callable[[str], int] | None = None,
              cache: ChunkCache | None = None, scope: str = "") -> np.ndarray:
    """Rows ``rows`` (sorted, unique, in range, int64) of array ``name`` into ``out`` (a
    C-contiguous array of the stored dtype, ``len(rows)`` rows), as the module docstring says.

    ``local_fd`` (pinned local files) turns each read into one ``preadv`` scattering the
    chunks straight into their slots, in the threads of ``pool``; otherwise the reads go out
    through ``fetcher`` together and are decoded (in ``pool`` when compressed)."""
    chunks, positions = needed_chunks(layout, rows)
    rb, cps, cb = layout.row_bytes, layout.chunks_per_shard, layout.chunk_bytes
    buf = np.empty(chunks.size * cb, dtype=np.uint8)

    def slot_view(slot: int) -> np.ndarray:
        return buf[slot * cb : (slot + 1) * cb]

    def decode(shard: int, j: int, slot: int, stored: np.ndarray) -> None:
        decode_chunk(layout, shard, j, stored, slot_view(slot), where(indexes.key(shard)), name)

    wanted = np.arange(chunks.size)
    if cache is not None:
        missing = []
        for slot, g in enumerate(chunks.tolist()):
            shard, j = divmod(g, cps)
            hit = cache.get(_chunk_ident(scope, indexes.key(shard), j))
            if hit is None:
                missing.append(slot)
            else:
                decode(shard, j, slot, np.frombuffer(hit, dtype=np.uint8))
        wanted = np.asarray(missing, dtype=np.int64)
    if wanted.size:
        want_chunks = chunks[wanted]
        indexes.ensure(sorted(set((want_chunks // cps).tolist())), suffixes)
        reads, empty = plan_reads(layout, want_chunks, wanted, indexes.__getitem__, gap_bytes,
                                  MAX_READ_BYTES)
        for _shard, _j, slot in empty:
            slot_view(slot).view(layout.dtype)[...] = layout.fill_value
        if local_fd is not None and layout.compressor == "none":
            def load(r: ChunkRead) -> None:
                key = indexes.key(r.shard)
                _scatter_local(layout, r, local_fd(key), buf, where(key), name)
            _each(load, reads, pool)
        else:
            datas = fetcher.ranges([(indexes.key(r.shard), r.start, r.stop) for r in reads])

            def unpack(item: tuple[ChunkRead, np.ndarray]) -> None:
                r, data = item
                key = indexes.key(r.shard)
                if data.size != r.stop - r.start:
                    raise FormatError(where(key), f"shard object ends at byte "
                                      f"{r.start + data.size}, inside its data (truncated, or "
                                      "an index pointing past its end)", array=name)
                for j, off, n, slot in r.chunks:
                    stored = data[off - r.start : off - r.start + n]
                    decode(r.shard, j, slot, stored)
                    if cache is not None:
                        cache.put(_chunk_ident(scope, key, j), stored.tobytes())

            _each(unpack, list(zip(reads, datas, strict=True)), pool)
    np.take(buf.reshape(-1, rb), positions, axis=0,
            out=out.reshape(-1).view(np.uint8).reshape(-1, rb))
    return out


def _each(fn: Callable[[Any], None], items: Sequence[Any], pool: Executor | None) -> None:
    """``fn`` over ``items``, in ``pool``'s threads when there are several (the reads,
    checksums and decoders release the GIL)."""
    if pool is None or len(items) < 2:
        for item in items:
            fn(item)
    else:
        list(pool.map(fn, items))


def _scatter_local(layout: ShardLayout, r: ChunkRead, fd: int, buf: np.ndarray, where: str,
                   array: str) -> None:
    """One ``preadv`` of an uncompressed read: each chunk straight into its slot of ``buf``,
    the gaps and checksums into side buffers; then every chunk's crc32c checked."""
    cb = layout.chunk_bytes
    crcs = np.empty((len(r.chunks), CRC_BYTES), dtype=np.uint8)
    views: list[memoryview] = []
    at = r.start
    for i, (_j, off, n, slot) in enumerate(r.chunks):
        if n != cb + CRC_BYTES:
            raise FormatError(where, f"an uncompressed inner chunk is not {cb} bytes plus its "
                              "crc32c (corrupt index)", array=array)
        if off > at:
            views.append(memoryview(np.empty(off - at, dtype=np.uint8)))
        views.append(memoryview(buf[slot * cb : (slot + 1) * cb]))
        views.append(memoryview(crcs[i]))
        at = off + n
    if preadv_exact(fd, views, r.start) != r.stop - r.start:
        raise FormatError(where, "shard object ends inside its data (truncated, or an index "
                          "pointing past its end)", array=array)
    for i, (j, _off, _n, slot) in enumerate(r.chunks):
        if crc32c(buf[slot * cb : (slot + 1) * cb]) != int.from_bytes(bytes(crcs[i]), "little"):
            row = r.shard * layout.shard_rows + j * layout.chunk_rows
            raise FormatError(where, f"inner chunk {j} (rows from {row}) fails its crc32c "
                              "(corrupt shard object)", array=array)


def _chunk_ident(scope: str, key: str, chunk: int) -> str:
    return f"{scope}\0{key}\0chunk{chunk}"


__all__ = ["ChunkRead", "RangeFetcher", "ShardIndexes", "needed_chunks", "plan_reads",
           "read_rows"]
