"""Helpers shared by jasper-zarr's tests."""

from __future__ import annotations

import jasper
from jasper.testing.data import make_arrays


def write_small(where, preset: str = "none", *, n_pairs: int = 301, dim: int = 24,
                dtype: str = "float32", chunk_rows: int = 7, shard_bytes: int = 4096):
    """A small dataset written with jasper-zarr in many small shards and inner chunks (so that
    reads cross shard and chunk boundaries); returns its path and the written arrays."""
    arrays, manifest = make_arrays(n_pairs=n_pairs, embedding_dim=dim, dtype=dtype)
    opts = jasper.get_backend("zarr").write_presets[preset]
    path = jasper.write_store(where, arrays, manifest, backend="zarr", chunk_rows=chunk_rows,
                              shard_bytes=shard_bytes, overwrite=True, **opts)
    return path, arrays
