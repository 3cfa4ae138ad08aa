"""Lazy rows in jasper-zarr's own layout (jasper_zarr.rowread): coalesced ranged reads of only
the inner chunks holding the rows, on local files and on the S3 server.

The rows must equal the written array's rows bit for bit, for every preset and dtype, any row
set (repeats, any order, across shards); the planner must read each needed chunk once and no
chunk that is not needed beyond the allowed gaps; damage is a FormatError naming the shard
object and the array; with the on-disk cache, entries are per inner chunk whatever the
coalescing of a batch was, and a damaged entry fails its checksum.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr_testutil import write_small

import jasper
from jasper.errors import FormatError
from jasper.testing.conformance import assert_bit_equal
from jasper_zarr.cache import ENV_DIR
from jasper_zarr.layout import shard_key
from jasper_zarr.rowread import needed_chunks, plan_reads
from jasper_zarr.shardread import CRC_BYTES, EMPTY, ShardLayout

PRESETS = ["none", "zstd", "blosc-lz4"]
LAZY = ["question_embs", "source_embs", "steering_centroid"]


def _rows_path(reader, name: str) -> None:
    assert reader._shard_layout(name) is not None, f"{name} would not take the row reader"


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(preset=st.sampled_from(PRESETS), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       chunk_rows=st.integers(1, 9), shard_bytes=st.integers(16, 3000),
       data=st.data())
def test_lazy_rows_equal_the_written_rows(tmp_path_factory, preset, dtype, chunk_rows,
                                          shard_bytes, data) -> None:
    path, arrays = write_small(tmp_path_factory.mktemp("r") / "ds", preset, n_pairs=60, dim=5,
                          dtype=dtype, chunk_rows=chunk_rows, shard_bytes=shard_bytes)
    with jasper.open_store(path) as reader:
        for name in LAZY:
            _rows_path(reader, name)
            n = arrays[name].shape[0]
            rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3 * n),
                             label=name)
            idx = torch.tensor(rows, dtype=torch.int64)
            assert_bit_equal(reader.read_rows(name, idx), arrays[name][idx], name)


def test_lazy_rows_on_the_s3_server_equal_local(tmp_path: Path, s3_url: str) -> None:
    path, arrays = write_small(tmp_path / "ds", "zstd")
    jasper.convert(path, s3_url, to="zarr", progress=False)
    gen = torch.Generator().manual_seed(3)
    with jasper.open_store(s3_url) as reader:
        for name in LAZY:
            _rows_path(reader, name)
            n = arrays[name].shape[0]
            idx = torch.randint(0, n, (2 * n,), generator=gen)
            assert_bit_equal(reader.read_rows(name, idx), arrays[name][idx], name)


def _layout(chunks_per_shard: int = 4, chunk_rows: int = 2, row_bytes: int = 8) -> ShardLayout:
    return ShardLayout(shape=(chunks_per_shard * chunk_rows * 3, row_bytes // 4),
                       dtype=np.dtype("float32"), shard_rows=chunks_per_shard * chunk_rows,
                       chunk_rows=chunk_rows, compressor="none", fill_value=np.float32(0))


def _index(layout: ShardLayout, empty: tuple[int, ...] = ()) -> np.ndarray:
    n = layout.chunk_bytes + CRC_BYTES
    index = np.array([[j * n, n] for j in range(layout.chunks_per_shard)], dtype=np.uint64)
    for j in empty:
        index[j] = EMPTY
    return index


def test_plan_reads_each_needed_chunk_once_and_merges_only_within_the_gap() -> None:
    layout = _layout()
    stride = layout.chunk_bytes + CRC_BYTES
    rows = np.array([0, 1, 2, 9, 15, 23], dtype=np.int64)  # chunks 0, 1, 4, 7, 11
    chunks, positions = needed_chunks(layout, rows)
    assert chunks.tolist() == [0, 1, 4, 7, 11]
    # every row lands on itself in the stacked chunk buffer
    assert (positions // layout.chunk_rows).tolist() == [0, 0, 1, 2, 3, 4]
    assert (positions % layout.chunk_rows).tolist() == (rows % layout.chunk_rows).tolist()
    slots = np.arange(chunks.size)
    # chunk 11 = shard 2, chunk 3: never stored
    indexes = {0: _index(layout), 1: _index(layout), 2: _index(layout, empty=(3,))}
    reads, empty = plan_reads(layout, chunks, slots, indexes.__getitem__, gap_bytes=0,
                              max_bytes=1 << 20)
    assert empty == [(2, 3, 4)]
    # shard 0: chunks 0 and 1 are back to back (one read); shard 1: chunk 0; shard 1: chunk 3
    assert [(r.shard, r.start, r.stop) for r in reads] == [
        (0, 0, 2 * stride), (1, 0, stride), (1, 3 * stride, 4 * stride)]
    assert sorted(c[3] for r in reads for c in r.chunks) == [0, 1, 2, 3]
    # a gap of two chunks is merged once the gap allowance covers it, not before
    rows = np.array([0, 6], dtype=np.int64)  # chunks 0 and 3 of shard 0
    chunks, _ = needed_chunks(layout, rows)
    slots = np.arange(chunks.size)
    split, _ = plan_reads(layout, chunks, slots, lambda s: _index(layout), 2 * stride - 1, 1 << 20)
    merged, _ = plan_reads(layout, chunks, slots, lambda s: _index(layout), 2 * stride, 1 << 20)
    assert len(split) == 2 and len(merged) == 1
    assert (merged[0].start, merged[0].stop) == (0, 4 * stride)
    # and never past the largest read
    capped, _ = plan_reads(layout, chunks, slots, lambda s: _index(layout), 2 * stride,
                           4 * stride - 1)
    assert len(capped) == 2


@pytest.mark.parametrize("preset", PRESETS)
def test_flipped_byte_in_a_coalesced_read_names_the_shard_and_array(tmp_path: Path,
                                                                   preset) -> None:
    path, arrays = write_small(tmp_path / "ds", preset)
    shard = path / shard_key("steering_centroid", 1, 2)
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01  # inside the shard's first inner chunk
    shard.write_bytes(bytes(data))
    with jasper.open_store(path) as reader:
        layout = reader._shard_layout("steering_centroid")
        a, b = layout.shard_span(1)
        # rows in every chunk of shard 1: the reads coalesce, the damaged chunk among them
        rows = torch.arange(a, b)
        with pytest.raises(FormatError, match=r"steering_centroid/c/1/0 \(array "
                                              r"'steering_centroid'\).*crc32c"):
            reader.read_rows("steering_centroid", rows)
        # rows of other shards still read
        other = torch.arange(0, a)
        assert_bit_equal(reader.read_rows("steering_centroid", other),
                         arrays["steering_centroid"][other], "undamaged shard")


def test_truncated_shard_is_a_format_error_on_lazy_rows(tmp_path: Path) -> None:
    path, _ = write_small(tmp_path / "ds")
    shard = path / shard_key("source_embs", 0, 2)
    shard.write_bytes(shard.read_bytes()[:-30])
    with jasper.open_store(path) as reader, pytest.raises(
            FormatError, match=r"source_embs/c/0/0 \(array 'source_embs'\)"):
        reader.read_rows("source_embs", torch.tensor([0, 3]))


def test_cache_entries_are_per_chunk_and_checked(tmp_path: Path, s3_url: str,
                                                 monkeypatch) -> None:
    path, arrays = write_small(tmp_path / "ds", "none")
    jasper.convert(path, s3_url, to="zarr", progress=False)
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv(ENV_DIR, str(cache_dir))
    name = "steering_centroid"
    expected = arrays[name]

    def entries() -> list[Path]:
        return sorted(p for p in cache_dir.rglob("*") if p.is_file())

    with jasper.open_store(s3_url) as reader:
        layout = reader._shard_layout(name)
        cr = layout.chunk_rows
        first = torch.arange(0, 4 * cr)  # chunks 0-3: one coalesced read
        assert_bit_equal(reader.read_rows(name, first), expected[first], "first")
        assert len(entries()) == 4
        # chunks 2-5: 2 and 3 come from the cache, 4 and 5 are fetched (one read) and kept
        second = torch.arange(2 * cr, 6 * cr)
        assert_bit_equal(reader.read_rows(name, second), expected[second], "second")
        assert len(entries()) == 6
        sizes = {p.stat().st_size for p in entries()}
        assert sizes == {layout.chunk_bytes + CRC_BYTES}, "an entry is one stored chunk"
        # a damaged entry fails its checksum instead of serving wrong rows
        for p in entries():
            data = bytearray(p.read_bytes())
            data[0] ^= 0xFF
            p.write_bytes(bytes(data))
        with pytest.raises(FormatError, match="crc32c"):
            reader.read_rows(name, first)
    assert os.environ[ENV_DIR] == str(cache_dir)
