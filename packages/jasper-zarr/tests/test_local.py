"""jasper-zarr on local disk: layout, strict chunks, write options, the block shuffle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jasper
from jasper.backend import ArraySource
from jasper.errors import FormatError, WriteOptionError
from jasper.testing.conformance import assert_bit_equal
from jasper.testing.data import make_arrays
from jasper_zarr.layout import grid_for, shard_key
from jasper_zarr.shuffle import block_shuffled_order


def _write(tmp_path: Path, name: str = "ds", **opts):
    arrays, manifest = make_arrays(n_pairs=300, embedding_dim=24)
    path = jasper.write_store(tmp_path / name, arrays, manifest, backend="zarr", **opts)
    return path, arrays


def test_all_zero_chunks_are_written_so_a_missing_one_is_an_error(tmp_path: Path) -> None:
    """zarr skips chunks equal to the fill value by default; jasper-zarr writes them, so the
    strict chunk check never fails on a legitimately all-zero array (regression)."""
    arrays, manifest = make_arrays(n_pairs=300, embedding_dim=24)
    arrays["steering_residual"] = torch.zeros_like(arrays["steering_residual"])
    path = jasper.write_store(tmp_path / "z", arrays, manifest, backend="zarr", chunk_rows=32)
    shards = sorted((path / "steering_residual" / "c").rglob("*"))
    assert [p for p in shards if p.is_file()], "all-zero shards must exist"
    with jasper.open_store(path) as reader:
        assert_bit_equal(reader.read("steering_residual"), arrays["steering_residual"], "zeros")
    jasper.validate(path, deep=True)


def test_missing_shard_is_a_typed_error_not_zeros(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, shard_bytes=4096, chunk_rows=8)
    victim = path / shard_key("source_embs", 1, 2)
    assert victim.is_file()
    victim.unlink()
    with jasper.open_store(path) as reader:
        with pytest.raises(FormatError, match=r"source_embs/c/1/0.*missing"):
            reader.read("source_embs")
        with pytest.raises(FormatError, match="missing"):
            reader.read_rows("source_embs", torch.tensor([0]))
        reader.read("question_embs")  # the other arrays stay readable
    with pytest.raises(FormatError, match="source_embs/c/1/0"):
        jasper.validate(path, deep=True)
    problems = jasper.get_backend("zarr").deep_check(path)
    assert problems == ["source_embs: chunk object 'source_embs/c/1/0' is missing"]


def test_corrupt_chunk_fails_its_crc32c(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, compression="none")
    shard = path / shard_key("question_embs", 0, 2)
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01  # one bit of the first inner chunk's data
    shard.write_bytes(bytes(data))
    with jasper.open_store(path) as reader, pytest.raises(FormatError, match="question_embs"):
        reader.read("question_embs")
    with pytest.raises(FormatError):
        jasper.validate(path, deep=True)


def test_group_and_arrays_record_format_and_logical_dtype(tmp_path: Path) -> None:
    arrays, manifest = make_arrays(n_pairs=64, embedding_dim=8, dtype="bfloat16")
    path = jasper.write_store(tmp_path / "bf", arrays, manifest, backend="zarr",
                              compression="zstd")
    group = json.loads((path / "zarr.json").read_text())
    assert group["attributes"]["jasper_format"] == "jasper-zarr"
    meta = json.loads((path / "question_embs" / "zarr.json").read_text())
    assert meta["attributes"]["jasper_dtype"] == "bfloat16" and meta["data_type"] == "uint16"
    codecs = json.dumps(meta["codecs"])
    assert "sharding_indexed" in codecs and "crc32c" in codecs and "zstd" in codecs
    with jasper.open_store(path) as reader:
        assert_bit_equal(reader.read("question_embs"), arrays["question_embs"], "bfloat16")


class _Ragged(ArraySource):
    """A source yielding blocks of uneven sizes, none aligned to the shards."""

    def __init__(self, t: torch.Tensor, sizes: list[int]) -> None:
        self.t, self.sizes = t, sizes
        self.shape, self.dtype = tuple(t.shape), t.dtype

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        row, i = 0, 0
        while row < self.shape[0]:
            n = self.sizes[i % len(self.sizes)]
            yield self.t[row : row + n]
            row += n
            i += 1


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 97), min_size=1, max_size=5),
       shard=st.sampled_from([2048, 8192, 1 << 20]), chunk_rows=st.integers(1, 40))
def test_unaligned_source_blocks_round_trip(tmp_path_factory, sizes, shard, chunk_rows) -> None:
    arrays, manifest = make_arrays(n_pairs=120, embedding_dim=8)
    sources = dict(arrays)
    sources["question_embs"] = _Ragged(arrays["question_embs"], sizes)
    path = jasper.write_store(tmp_path_factory.mktemp("r") / "ds", sources, manifest,
                              backend="zarr", shard_bytes=shard, chunk_rows=chunk_rows)
    with jasper.open_store(path) as reader:
        assert_bit_equal(reader.read("question_embs"), arrays["question_embs"], "ragged")
        rows = torch.tensor([0, 7, 7, 3, arrays["question_embs"].shape[0] - 1])
        assert_bit_equal(reader.read_rows("question_embs", rows),
                         arrays["question_embs"][rows], "rows")


@pytest.mark.parametrize(("opts", "match"), [
    ({"compression": "lz4"}, "compression"),
    ({"compression": "none", "compression_level": 3}, "compression_level"),
    ({"compression": "zstd", "compression_level": 40}, "1..22"),
    ({"shard_bytes": 0}, "shard_bytes"),
    ({"chunk_rows": -1}, "chunk_rows"),
    ({"chunks": 5}, "does not accept"),
])
def test_bad_write_options(tmp_path: Path, opts, match) -> None:
    arrays, manifest = make_arrays()
    with pytest.raises(WriteOptionError, match=match):
        jasper.write_store(tmp_path / "x", arrays, manifest, backend="zarr", **opts)
    assert not (tmp_path / "x").exists()


def test_grid_shards_are_whole_inner_chunks() -> None:
    g = grid_for((1_000_000, 384), 4)
    assert g.shard_rows % g.chunk_rows == 0
    assert 32 << 20 <= g.shard_rows * 384 * 4 <= 64 << 20
    assert 64 << 10 <= g.chunk_rows * 384 * 4 <= 128 << 10
    tiny = grid_for((0,), 8)
    assert tiny.chunk_rows == tiny.shard_rows == 1


@given(n=st.integers(0, 500), block=st.integers(1, 64), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 100))
def test_block_shuffle_is_a_deterministic_blockwise_permutation(n, block, seed, epoch) -> None:
    order = block_shuffled_order(n, block, seed, epoch)
    assert torch.equal(torch.sort(order).values, torch.arange(n))
    assert torch.equal(order, block_shuffled_order(n, block, seed, epoch))
    # consecutive runs of the order stay inside one block: block ids change once per block
    blocks = order // block
    changes = int((blocks[1:] != blocks[:-1]).sum()) if n else 0
    assert changes == max(0, -(-n // block) - 1)


def test_block_shuffle_differs_between_epochs() -> None:
    a, b = block_shuffled_order(1000, 10, 0, 0), block_shuffled_order(1000, 10, 0, 1)
    assert not torch.equal(a, b)


@pytest.fixture(scope="module")
def small_group(tmp_path_factory) -> Iterator[tuple[Any, dict[str, torch.Tensor]]]:
    """A reader on one small group with many shards and inner chunks (written once)."""
    arrays, manifest = make_arrays(n_pairs=300, embedding_dim=24)
    path = jasper.write_store(tmp_path_factory.mktemp("rows") / "ds", arrays, manifest,
                              backend="zarr", shard_bytes=4096, chunk_rows=8)
    with jasper.open_store(path) as reader:
        yield reader, arrays


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_row_reads_follow_cores_plan_any_indices(small_group, data) -> None:
    """Rows in any order with repeats, as one coalesced span (a slice read) or as scattered
    rows (one zarr selection), equal the reference rows bit for bit."""
    reader, arrays = small_group
    n = arrays["source_embs"].shape[0]
    start = data.draw(st.integers(0, n - 1))
    dense = st.lists(st.integers(start, min(n - 1, start + 40)), min_size=1, max_size=30)
    scattered = st.lists(st.integers(0, n - 1), min_size=1, max_size=60)
    rows = torch.tensor(data.draw(st.one_of(dense, scattered)))
    assert_bit_equal(reader.read_rows("source_embs", rows), arrays["source_embs"][rows],
                     f"rows {rows.tolist()}")
    with pytest.raises(IndexError, match="out of range"):
        reader.read_rows("source_embs", torch.tensor([0, n]))
