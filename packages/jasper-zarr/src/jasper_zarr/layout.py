"""The jasper-zarr layout: one zarr v3 group per dataset, one sharded array per jasper array.

- The group's ``zarr.json`` carries :data:`ATTR_FORMAT` and :data:`ATTR_LAYOUT_VERSION`; each
  array is a direct child named by its data-model name (``question_embs``, ``pair_keyword_ids``
  ...; ragged keyword ids are CSR, as in the data model) with :data:`ATTR_NAME` and
  :data:`ATTR_DTYPE` attributes. bfloat16 is stored as its ``uint16`` bit pattern; the
  attribute records the logical dtype.
- Every array is sharded: a shard (one object) holds whole rows, about :data:`SHARD_BYTES`, so
  an object store serves it in one GET at full bandwidth; inside it, inner chunks of about
  :data:`INNER_CHUNK_BYTES` of whole rows are what a lazy row read fetches (a ranged GET each).
- Every inner chunk ends in a crc32c checksum (zarr's ``crc32c`` codec, after any compressor),
  and the shard index carries its own crc32c. Chunks equal to the fill value are written
  anyway (``write_empty_chunks``): every chunk key the shape implies must exist, so a missing
  object is an error, never silently zeros (:func:`expected_chunk_keys`).
- The manifest (``config.json``) beside the group is core's, written last.

This module imports nothing heavy (no zarr, no numpy): codec choices are plain descriptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The group metadata file (the marker of a jasper-zarr dataset directory).
GROUP_FILE = "zarr.json"
ATTR_FORMAT = "jasper_format"
ATTR_LAYOUT_VERSION = "jasper_layout_version"
FORMAT_NAME = "jasper-zarr"
#: Version of this layout; a reader refuses a newer one instead of misreading it.
LAYOUT_VERSION = 1
ATTR_NAME = "jasper_name"
ATTR_DTYPE = "jasper_dtype"

#: Target bytes of one shard (one object): big enough that per-request latency of an object
#: store vanishes, small enough that a preload has many shards in flight.
SHARD_BYTES = 64 << 20
#: Target bytes of one inner chunk: the unit of a lazy row read (one ranged GET, one decode).
INNER_CHUNK_BYTES = 128 << 10

#: Write presets (compressor per inner chunk; crc32c always follows it).
PRESETS: dict[str, dict[str, object]] = {
    "none": {"compression": "none"},
    "zstd": {"compression": "zstd"},
    "blosc-lz4": {"compression": "blosc-lz4"},
}
COMPRESSIONS: tuple[str, ...] = ("none", "zstd", "blosc-lz4")
DEFAULT_COMPRESSION = "none"
#: zstd level when none is given: level 1-3 decode equally fast; 3 is zstd's own default.
DEFAULT_ZSTD_LEVEL = 3
#: blosc clevel when none is given (blosc's own default).
DEFAULT_BLOSC_LEVEL = 5


@dataclass(frozen=True)
class Grid:
    """Rows per shard and per inner chunk of one array (both whole rows, full width)."""

    shard_rows: int
    chunk_rows: int


def row_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    n = itemsize
    for s in shape[1:]:
        n *= s
    return max(1, n)


def grid_for(shape: tuple[int, ...], itemsize: int, *, shard_bytes: int = SHARD_BYTES,
             chunk_bytes: int = INNER_CHUNK_BYTES, chunk_rows: int | None = None) -> Grid:
    """Shard and inner-chunk rows for an array: inner chunks of about ``chunk_bytes`` (or
    ``chunk_rows``), shards a whole number of inner chunks of about ``shard_bytes``, neither
    larger than the array needs (zarr needs at least one row per chunk, even for 0 rows)."""
    n = shape[0] if shape else 1
    rb = row_bytes(shape, itemsize)
    chunk = chunk_rows or max(1, chunk_bytes // rb)
    chunk = max(1, min(chunk, max(1, n)))
    per_shard = max(1, shard_bytes // (chunk * rb))
    per_shard = min(per_shard, max(1, math.ceil(n / chunk)))
    return Grid(shard_rows=chunk * per_shard, chunk_rows=chunk)


def n_shards(shape: tuple[int, ...], grid: Grid) -> int:
    n = shape[0] if shape else 1
    return math.ceil(n / grid.shard_rows) if n else 0


def shard_key(name: str, shard: int, ndim: int) -> str:
    """The object key (relative to the group) of shard ``shard`` of array ``name``: zarr v3's
    default chunk key encoding, ``c/<i>/<j>...`` with one shard across the full width."""
    return "/".join([name, "c", str(shard), *(["0"] * (ndim - 1))])


def expected_chunk_keys(name: str, shape: tuple[int, ...], grid: Grid) -> list[str]:
    """Every shard key the array's shape implies (all are written, none may be missing)."""
    return [shard_key(name, i, max(1, len(shape))) for i in range(n_shards(shape, grid))]
