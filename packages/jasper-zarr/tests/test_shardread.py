"""The whole-shard preload (jasper_zarr.shardread) against zarr's own read of the same group.

Every array jasper-zarr writes must take the fast path and give the tensor zarr's codec
pipeline gives, bit for bit, for every preset and dtype, across shard boundaries and partial
last shards; damage gives a FormatError naming the shard object and the array; arrays of
other zarr writers (other codec chains) are read through zarr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import obstore
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr_testutil import write_small

import jasper
from jasper.errors import FormatError
from jasper.location import Location, committed_generation, generation_prefix
from jasper.testing.conformance import assert_bit_equal
from jasper_zarr.layout import shard_key
from jasper_zarr.reader import ZarrReader, _storage_view
from jasper_zarr.shardread import CRC_BYTES, EMPTY, ShardLayout, crc32c
from jasper_zarr.stores import S3Objects, s3_client

PRESETS = ["none", "zstd", "blosc-lz4"]


def _via_zarr(reader: ZarrReader, name: str) -> torch.Tensor:
    """Array ``name`` read through zarr's codec pipeline (the reader's fallback path)."""
    info = reader.info(name)
    out = torch.full(info.shape, 7, dtype=info.dtype)
    _, logical, grid = reader._metadata(name)
    reader._preload_via_zarr(name, reader._array(name), grid, _storage_view(out, logical),
                             lambda n: None)
    return out


def _fast(reader: ZarrReader, name: str) -> torch.Tensor:
    """Array ``name`` through the reader's preload, asserting that it takes the fast path."""
    assert reader._shard_layout(name) is not None, f"{name} fell back to zarr's path"
    info = reader.info(name)
    # garbage in the output first: every byte must be written by the read
    out = torch.empty(info.shape, dtype=info.dtype)
    _storage_view(out, reader._metadata(name)[1]).reshape(-1).view(np.uint8)[:] = 0xA5
    return reader.read_into(name, out)


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_preload_equals_zarr_across_shards_and_partial_last_shard(tmp_path: Path,
                                                                       preset) -> None:
    path, arrays = write_small(tmp_path / "ds", preset)
    with jasper.open_store(path) as reader:
        layout = reader._shard_layout("question_embs")
        assert layout is not None and layout.n_shards >= 3
        n = arrays["question_embs"].shape[0]
        assert n % layout.shard_rows and (n % layout.shard_rows) % layout.chunk_rows, \
            "the case needs a partial last shard ending in a partial inner chunk"
        assert {str(arrays[k].dtype) for k in arrays} >= {"torch.float32", "torch.int64"}
        for name, expected in arrays.items():
            fast = _fast(reader, name)
            assert_bit_equal(fast, expected, name)
            assert_bit_equal(fast, _via_zarr(reader, name), f"{name} vs zarr")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(preset=st.sampled_from(PRESETS), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       n_pairs=st.integers(5, 90), dim=st.integers(1, 20), chunk_rows=st.integers(1, 9),
       shard_bytes=st.integers(16, 3000))
def test_fast_preload_equals_zarr_any_shape(tmp_path_factory, preset, dtype, n_pairs, dim,
                                            chunk_rows, shard_bytes) -> None:
    path, arrays = write_small(tmp_path_factory.mktemp("h") / "ds", preset, n_pairs=n_pairs,
                          dim=dim, dtype=dtype, chunk_rows=chunk_rows,
                          shard_bytes=shard_bytes)
    with jasper.open_store(path) as reader:
        for name, expected in arrays.items():
            fast = _fast(reader, name)
            assert_bit_equal(fast, expected, name)
            assert_bit_equal(fast, _via_zarr(reader, name), f"{name} vs zarr")


def _layout(path: Path, name: str) -> ShardLayout:
    with jasper.open_store(path) as reader:
        layout = reader._shard_layout(name)
    assert layout is not None
    return layout


@pytest.mark.parametrize("preset", PRESETS)
def test_corrupt_shard_index_is_a_format_error_naming_file_and_array(tmp_path: Path,
                                                                     preset) -> None:
    path, _ = write_small(tmp_path / "ds", preset)
    layout = _layout(path, "question_embs")
    shard = path / shard_key("question_embs", 1, 2)
    data = bytearray(shard.read_bytes())
    data[-layout.index_bytes + 3] ^= 0x10  # the first chunk's offset
    shard.write_bytes(bytes(data))
    with jasper.open_store(path) as reader, pytest.raises(
            FormatError, match=r"question_embs/c/1/0 \(array 'question_embs'\).*index"):
        reader.read("question_embs")


@pytest.mark.parametrize("preset", PRESETS)
def test_flipped_chunk_byte_is_a_format_error_not_garbage(tmp_path: Path, preset) -> None:
    path, _ = write_small(tmp_path / "ds", preset)
    shard = path / shard_key("question_embs", 2, 2)
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01  # inside the first inner chunk
    shard.write_bytes(bytes(data))
    with jasper.open_store(path) as reader, pytest.raises(
            FormatError, match=r"question_embs/c/2/0 \(array 'question_embs'\).*inner chunk 0 "
                               r"\(rows from \d+\) fails its crc32c"):
        reader.read("question_embs")


@pytest.mark.parametrize("where", ["middle", "padding"])
def test_damaged_later_chunk_is_named_by_its_number(tmp_path: Path, where: str) -> None:
    """A flipped byte in a chunk other than the first, or in the padding the writer stores
    after the array's last row, fails that chunk's crc32c and the error names that chunk."""
    path, arrays = write_small(tmp_path / "ds", "none")
    n = int(arrays["question_embs"].shape[0])
    with jasper.open_store(path) as reader:
        layout = reader._shard_layout("question_embs")
    assert layout is not None
    shard_no = layout.n_shards - 1 if where == "padding" else 0
    first, last = layout.shard_span(shard_no)
    rows = last - first
    stored = -(-rows // layout.chunk_rows)
    assert where != "padding" or rows % layout.chunk_rows, "the last chunk must be partial"
    chunk = stored - 1 if where == "padding" else stored // 2
    assert chunk > 0
    shard = path / shard_key("question_embs", shard_no, 2)
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-layout.index_bytes : -CRC_BYTES]), dtype="<u8")
    offset, nbytes = int(index[2 * chunk]), int(index[2 * chunk + 1])
    data[offset + nbytes - CRC_BYTES - 1] ^= 0x01  # the chunk's last byte before its crc32c
    shard.write_bytes(bytes(data))
    row = first + chunk * layout.chunk_rows
    assert where != "padding" or row + layout.chunk_rows > n
    with jasper.open_store(path) as reader, pytest.raises(
            FormatError, match=rf"inner chunk {chunk} \(rows from {row}\) fails its crc32c"):
        reader.read("question_embs")


@pytest.mark.parametrize("cut", [1, 200])
def test_truncated_shard_is_a_format_error(tmp_path: Path, cut: int) -> None:
    path, _ = write_small(tmp_path / "ds")
    shard = path / shard_key("source_embs", 0, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[:cut])
    with jasper.open_store(path) as reader, pytest.raises(
            FormatError, match=r"source_embs/c/0/0 \(array 'source_embs'\)"):
        reader.read("source_embs")


def _rewrite_index(shard: Path, layout: ShardLayout, edit) -> None:
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-layout.index_bytes : -CRC_BYTES]), dtype="<u8").copy()
    edit(index.reshape(-1, 2))
    body = index.tobytes()
    data[-layout.index_bytes :] = body + crc32c(body).to_bytes(4, "little")
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("preset", PRESETS)
def test_never_written_inner_chunk_reads_the_fill_value_as_zarr_does(tmp_path: Path,
                                                                     preset) -> None:
    path, arrays = write_small(tmp_path / "ds", preset)
    layout = _layout(path, "question_embs")

    def unset(index: np.ndarray) -> None:
        index[1] = EMPTY

    _rewrite_index(path / shard_key("question_embs", 1, 2), layout, unset)
    with jasper.open_store(path) as reader:
        fast = _fast(reader, "question_embs")
        assert_bit_equal(fast, _via_zarr(reader, "question_embs"), "vs zarr")
    a = layout.shard_rows + layout.chunk_rows
    expected = arrays["question_embs"].clone()
    expected[a : a + layout.chunk_rows] = 0
    assert_bit_equal(fast, expected, "fill value")


def test_index_pointing_past_the_shard_is_a_format_error(tmp_path: Path) -> None:
    path, _ = write_small(tmp_path / "ds", "zstd")
    layout = _layout(path, "question_embs")

    def stretch(index: np.ndarray) -> None:
        index[0, 1] = 1 << 40

    _rewrite_index(path / shard_key("question_embs", 0, 2), layout, stretch)
    with jasper.open_store(path) as reader, pytest.raises(
            FormatError, match=r"question_embs/c/0/0.*points outside"):
        reader.read("question_embs")


def _third_party(kind: str):
    from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec

    if kind == "gzip":
        return {"compressors": [GzipCodec(level=1)]}
    if kind == "unsharded":
        return {"shards": None}
    if kind == "index-at-start":
        return {"shards": None, "serializer": ShardingCodec(
            chunk_shape=(7, 24), codecs=[BytesCodec(), Crc32cCodec()],
            index_location="start"), "chunks": (42, 24)}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gzip", "unsharded", "index-at-start"])
def test_other_codec_chains_fall_back_to_zarr(tmp_path: Path, kind: str) -> None:
    import zarr

    path, arrays = write_small(tmp_path / "ds")
    expected = arrays["question_embs"]
    group = zarr.open_group(path, mode="r+")
    attrs = dict(group["question_embs"].attrs)
    del group["question_embs"]
    opts = {"shards": (42, 24), "chunks": (7, 24), **_third_party(kind)}
    if opts["shards"] is None:
        del opts["shards"]
    arr = group.create_array("question_embs", shape=tuple(expected.shape), dtype="float32",
                             fill_value=0, attributes=attrs, **opts)
    arr[:] = expected.numpy()
    with jasper.open_store(path) as reader:
        assert reader._shard_layout("question_embs") is None
        assert_bit_equal(reader.read("question_embs"), expected, kind)


@pytest.mark.parametrize("preset", PRESETS)
def test_fast_path_on_the_server_and_vanished_shard(s3_url, preset) -> None:
    _, arrays = write_small(s3_url, preset)
    loc = Location.parse(s3_url)
    prefix = generation_prefix(committed_generation(S3Objects(loc), loc))
    with jasper.open_store(s3_url) as reader:
        for name in ("question_embs", "pair_index", "hard_negatives"):
            fast = _fast(reader, name)
            assert_bit_equal(fast, arrays[name], name)
            assert_bit_equal(fast, _via_zarr(reader, name), f"{name} vs zarr")
        reader._check_chunks("source_embs")  # listed: present
        obstore.delete(s3_client(loc), prefix + shard_key("source_embs", 1, 2))
        with pytest.raises(FormatError, match=r"source_embs/c/1/0.*vanished after the listing"):
            reader.read("source_embs")
