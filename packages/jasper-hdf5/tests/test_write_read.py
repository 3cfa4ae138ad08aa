"""Round trips, the on-disk layout, write options, and row/slice reads."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hdf5_testutil import assert_same, synth_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jasper
from jasper.backend import ArraySource, TensorSource
from jasper.errors import WriteOptionError
from jasper.manifest import Manifest
from jasper.schema import ARRAYS
from jasper.store import write_store
from jasper.synth import SynthConfig
from jasper_hdf5.layout import ATTR_DTYPE, ATTR_NAME, FILE_NAME, PATHS, attr_text
from jasper_hdf5.writer import CHUNK_BYTES, WriteOptions


def test_plugin_lists_hdf5_without_importing_h5py() -> None:
    code = (
        "import sys, jasper\n"
        "names = list(jasper.list_backends())\n"
        "b = jasper.get_backend('hdf5')\n"
        "assert 'hdf5' in names, names\n"
        "assert b.open_priority == 10 and b.marker_files == ('dataset.h5',)\n"
        "assert 'h5py' not in sys.modules, 'listing or guessing imported h5py'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_metadata() -> None:
    b = jasper.get_backend("hdf5")
    caps = b.capabilities
    assert (caps.write, caps.mmap, caps.compression, caps.row_access, caps.worker_safe) == (
        True, False, True, True, True)
    assert set(b.write_presets) == {"none", "lzf", "gzip"}
    for options in b.write_presets.values():
        WriteOptions.checked(**options)  # every preset is a valid option set


@pytest.mark.parametrize("preset", ["none", "lzf", "gzip"])
def test_round_trip_bit_exact_every_preset(tmp_path: Path, small_arrays: tuple, preset: str) -> None:
    arrays, manifest = small_arrays
    options = jasper.get_backend("hdf5").write_presets[preset]
    out = write_store(tmp_path / preset, arrays, manifest, backend="hdf5", **options)
    with jasper.open_store(out) as reader:
        assert reader.backend_name == "hdf5"
        assert reader.array_names() == list(ARRAYS)
        for name, expected in arrays.items():
            assert_same(reader.read(name), expected, f"{preset} {name}")
    report = jasper.validate(out, deep=True)
    assert report.checksums_verified == len(ARRAYS)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_float_dtypes_keep_logical_dtype_and_bits(tmp_path: Path, dtype: str) -> None:
    arrays, manifest = synth_tensors(SynthConfig(n_pairs=80, embedding_dim=8, n_neg=3,
                                                 n_clusters=3, dtype=dtype, seed=1))
    # bit patterns a float conversion would lose: -0.0, NaN payloads are not allowed in the
    # data model, but the extremes of the type and subnormals are
    emb = arrays["source_embs"]
    info = torch.finfo(emb.dtype)
    emb[0, :4] = torch.tensor([-0.0, info.tiny, info.max, info.smallest_normal / 4], dtype=emb.dtype)
    out = write_store(tmp_path / dtype, arrays, manifest, backend="hdf5", compression="gzip")
    with h5py.File(out / FILE_NAME) as f:
        d = f[PATHS["source_embs"]]
        assert attr_text(d.attrs[ATTR_DTYPE]) == dtype
        assert attr_text(d.attrs[ATTR_NAME]) == "source_embs"
        if dtype == "bfloat16":
            assert d.dtype == np.uint16  # the bit pattern; numpy has no bfloat16
    with jasper.open_store(out) as reader:
        assert reader.info("source_embs").dtype == getattr(torch, dtype)
        for name, expected in arrays.items():
            assert_same(reader.read(name), expected, name)
        rows = torch.tensor([5, 0, 5, 79])
        assert_same(reader.read_rows("steering_residual", rows),
                    arrays["steering_residual"][rows], "rows")


def test_layout_matches_the_original_groups(small_dataset: Path) -> None:
    with h5py.File(small_dataset / FILE_NAME) as f:
        assert set(f) == {"embeddings", "pair_data", "negatives", "steering", "splits"}
        assert set(f["embeddings"]) == {"questions", "sources", "keywords", "centroids"}
        assert set(f["pair_data"]) == {"index", "cluster_id", "relevance", "keyword_offsets",
                                       "keyword_ids"}
        assert set(f["negatives"]) == {"hardnegatives", "tiers"}
        assert set(f["steering"]) == {"centroid", "keyword_weighted", "residual", "distances"}
        assert set(f["splits"]) == {"train", "val", "test"}
        assert f.attrs["jasper_layout_version"] == 1
        for name in ARRAYS:  # a steering dataset: the cluster kind's group is absent
            assert attr_text(f[PATHS[name]].attrs[ATTR_NAME]) == name


def test_jasper_attributes_are_fixed_length_strings(small_dataset: Path) -> None:
    """A variable-length string attribute's bytes sit in the global heap and HDF5 follows the
    heap pointer on read: a fuzzed file with a damaged pointer crashed the reader (SIGSEGV in
    attrs.get). jasper writes its attributes as fixed-length strings in the object header."""
    with h5py.File(small_dataset / FILE_NAME) as f:
        objects = [f, *(f[PATHS[name]] for name in ARRAYS)]
        for obj in objects:
            for key in obj.attrs:
                attr = h5py.h5a.open(obj.id, key.encode())
                kind = attr.get_type()
                if kind.get_class() == h5py.h5t.STRING:
                    assert not kind.is_variable_str(), f"{obj.name}:{key} is variable-length"


def test_chunks_are_whole_rows_of_bounded_size(tmp_path: Path) -> None:
    arrays, manifest = synth_tensors(SynthConfig(n_pairs=3000, embedding_dim=64, n_neg=4,
                                                 n_clusters=4, seed=2))
    out = write_store(tmp_path / "c", arrays, manifest, backend="hdf5", compression="lzf")
    with h5py.File(out / FILE_NAME) as f:
        for path in (PATHS[n] for n in ARRAYS):
            d = f[path]
            assert d.chunks is not None, path
            assert d.chunks[1:] == d.shape[1:], f"{path}: chunk {d.chunks} splits rows"
            nbytes = int(np.prod(d.chunks)) * d.dtype.itemsize
            row = nbytes // d.chunks[0]
            assert nbytes <= max(CHUNK_BYTES, row), f"{path}: chunk of {nbytes} bytes"
            if d.shape[0] * row > 2 * CHUNK_BYTES:
                assert d.chunks[0] < d.shape[0], f"{path}: one chunk holds the whole column"


def test_uncompressed_arrays_are_contiguous_unless_chunk_rows(tmp_path: Path,
                                                              small_arrays: tuple) -> None:
    arrays, manifest = small_arrays
    plain = write_store(tmp_path / "plain", arrays, manifest, backend="hdf5")  # default: none
    chunked = write_store(tmp_path / "chunked", arrays, manifest, backend="hdf5",
                          compression="none", chunk_rows=7)
    with h5py.File(plain / FILE_NAME) as f:
        assert all(f[p].chunks is None and f[p].compression is None for p in (PATHS[n] for n in ARRAYS))
    with h5py.File(chunked / FILE_NAME) as f:
        d = f[PATHS["steering_centroid"]]
        assert d.chunks == (7, 24) and d.compression is None
    with jasper.open_store(chunked) as reader:
        assert_same(reader.read("steering_centroid"), arrays["steering_centroid"], "chunked")


def test_shuffle_auto_and_explicit(tmp_path: Path, small_arrays: tuple) -> None:
    arrays, manifest = small_arrays
    auto = write_store(tmp_path / "auto", arrays, manifest, backend="hdf5", compression="lzf")
    forced = write_store(tmp_path / "forced", arrays, manifest, backend="hdf5",
                         compression="lzf", shuffle=True)
    gz = write_store(tmp_path / "gz", arrays, manifest, backend="hdf5", compression="gzip",
                     compression_level=1)
    with h5py.File(auto / FILE_NAME) as f:
        assert f[PATHS["hard_negatives"]].shuffle  # integers: shuffle helps lzf
        assert not f[PATHS["source_embs"]].shuffle  # floats under lzf: decode speed first
    with h5py.File(forced / FILE_NAME) as f:
        assert f[PATHS["source_embs"]].shuffle
    with h5py.File(gz / FILE_NAME) as f:
        d = f[PATHS["source_embs"]]
        assert d.shuffle and d.compression == "gzip" and d.compression_opts == 1


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"compression": "zstd"}, "none, lzf, gzip"),
        ({"compression": 3}, "compression=3"),
        ({"compression": "lzf", "compression_level": 3}, "gzip only"),
        ({"compression": "gzip", "compression_level": 10}, "0..9"),
        ({"compression": "gzip", "compression_level": True}, "0..9"),
        ({"shuffle": "yes"}, "shuffle"),
        ({"compression": "none", "shuffle": True}, "shuffle"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": 2.5}, "chunk_rows"),
    ],
)
def test_bad_option_values_raise_write_option_error(tmp_path: Path, small_arrays: tuple,
                                                    options: dict, needle: str) -> None:
    arrays, manifest = small_arrays
    with pytest.raises(WriteOptionError, match=needle):
        write_store(tmp_path / "bad", arrays, manifest, backend="hdf5", **options)
    assert not (tmp_path / "bad").exists()


def test_unknown_option_name_is_refused(tmp_path: Path, small_arrays: tuple) -> None:
    arrays, manifest = small_arrays
    with pytest.raises(WriteOptionError, match="compression_level"):  # the accepted list
        write_store(tmp_path / "bad", arrays, manifest, backend="hdf5", level=3)


class _Streamed(ArraySource):
    """A source that yields uneven chunks and refuses to be materialised whole."""

    def __init__(self, tensor: torch.Tensor, sizes: list[int]) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.sizes = sizes
        self.requested: list[int] = []

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        self.requested.append(rows_per_chunk)
        start = 0
        for i, n in enumerate(self.sizes):
            yield self.tensor[start : start + n].clone()
            start += n
            assert i < len(self.sizes)

    def materialize(self) -> torch.Tensor:
        raise AssertionError("the writer must stream, not materialise the array")


def test_writer_streams_uneven_chunks(tmp_path: Path, small_arrays: tuple) -> None:
    arrays, manifest = small_arrays
    steer = arrays["steering_residual"]
    src = _Streamed(steer, [1, 250, 3, 0, 346])
    sources: dict[str, torch.Tensor | ArraySource] = dict(arrays)
    sources["steering_residual"] = src
    out = write_store(tmp_path / "s", sources, manifest, backend="hdf5", compression="gzip",
                      chunk_rows=16)
    assert src.requested and src.requested[0] % 16 == 0  # blocks of whole chunks
    with jasper.open_store(out) as reader:
        assert_same(reader.read("steering_residual"), steer, "streamed")


def test_writer_rejects_overlong_source(tmp_path: Path, small_arrays: tuple) -> None:
    from jasper.errors import ShapeError

    arrays, manifest = small_arrays
    steer = arrays["steering_residual"]
    bad = _Streamed(steer, [steer.shape[0], 1])
    bad.tensor = torch.cat([steer, steer[:1]])
    sources: dict[str, torch.Tensor | ArraySource] = dict(arrays)
    sources["steering_residual"] = bad
    with pytest.raises(ShapeError, match="steering_residual"):
        write_store(tmp_path / "s", sources, manifest, backend="hdf5")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module", params=["none", "lzf", "gzip-small-chunks"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, dict[str, torch.Tensor]]:
    arrays, manifest = synth_tensors()
    options = {"none": {"compression": "none"}, "lzf": {"compression": "lzf"},
               "gzip-small-chunks": {"compression": "gzip", "chunk_rows": 5}}[request.param]
    path = write_store(tmp_path_factory.mktemp("rows") / request.param, arrays, manifest,
                       backend="hdf5", **options)
    return path, arrays


_ROW_ARRAYS = ["steering_centroid", "pair_index", "pair_relevance", "negative_tiers",
               "question_embs", "pair_keyword_ids"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_rows_matches_index_select(written: tuple[Path, dict[str, torch.Tensor]],
                                        data: st.DataObject) -> None:
    path, arrays = written
    name = data.draw(st.sampled_from(_ROW_ARRAYS))
    n = arrays[name].shape[0]
    shape = data.draw(st.sampled_from(["random", "sorted-run", "dense", "repeats"]))
    if shape == "random":
        rows = data.draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=64))
    elif shape == "sorted-run":
        start = data.draw(st.integers(0, n - 1))
        rows = list(range(start, min(n, start + data.draw(st.integers(1, 40)))))
    elif shape == "dense":
        start = data.draw(st.integers(0, max(0, n - 30)))
        rows = data.draw(st.lists(st.integers(start, min(n - 1, start + 29)), min_size=1,
                                  max_size=40))
    else:
        row = data.draw(st.integers(0, n - 1))
        rows = [row] * data.draw(st.integers(1, 5)) + [0, n - 1, row]
    idx = torch.tensor(rows, dtype=torch.int64)
    with jasper.open_store(path) as reader:
        assert_same(reader.read_rows(name, idx), arrays[name].index_select(0, idx),
                    f"{name}{rows}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_slice_matches_python_slicing(written: tuple[Path, dict[str, torch.Tensor]],
                                           data: st.DataObject) -> None:
    path, arrays = written
    name = data.draw(st.sampled_from(_ROW_ARRAYS))
    n = arrays[name].shape[0]
    start = data.draw(st.integers(-n - 3, n + 3))
    stop = data.draw(st.integers(-n - 3, n + 3))
    with jasper.open_store(path) as reader:
        assert_same(reader.read_slice(name, start, stop), arrays[name][start:stop],
                    f"{name}[{start}:{stop}]")


def test_read_rows_bad_indices(small_dataset: Path) -> None:
    with jasper.open_store(small_dataset) as reader:
        n = reader.info("pair_index").shape[0]
        with pytest.raises(IndexError, match="pair_index"):
            reader.read_rows("pair_index", torch.tensor([0, n]))
        with pytest.raises(IndexError, match="pair_index"):
            reader.read_rows("pair_index", torch.tensor([-1]))
        with pytest.raises(TypeError):
            reader.read_rows("pair_index", torch.tensor([0.5]))
        empty = reader.read_rows("pair_index", torch.empty(0, dtype=torch.int64))
        assert empty.shape == (0, 2) and empty.dtype == reader.info("pair_index").dtype


def test_read_into_fills_a_view_of_a_larger_buffer(small_dataset: Path,
                                                   small_arrays: tuple) -> None:
    arrays, _ = small_arrays
    expected = arrays["steering_keyword_weighted"]
    with jasper.open_store(small_dataset) as reader:
        big = torch.full((expected.shape[0] + 3, expected.shape[1]), 7.0)
        view = big[2 : 2 + expected.shape[0]]
        assert reader.read_into("steering_keyword_weighted", view) is view
        assert_same(view, expected, "view")
        assert torch.all(big[:2] == 7.0) and torch.all(big[-1] == 7.0)
        # a non-contiguous destination still gets the right values
        t = torch.empty(expected.shape[1], expected.shape[0]).t()
        reader.read_into("steering_keyword_weighted", t)
        assert_same(t.contiguous(), expected, "transposed")
        with pytest.raises(ValueError, match="steering_keyword_weighted"):
            reader.read_into("steering_keyword_weighted", torch.empty(3, 3))


def test_preload_reads_straight_into_the_buffer(small_dataset: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """read_into hands h5py the caller's own memory: read_direct gets a view of ``out``."""
    seen: list[int] = []
    original = h5py.Dataset.read_direct

    def spy(self: h5py.Dataset, dest: np.ndarray, *args: object, **kw: object) -> None:
        seen.append(dest.__array_interface__["data"][0])
        original(self, dest, *args, **kw)

    monkeypatch.setattr(h5py.Dataset, "read_direct", spy)
    with jasper.open_store(small_dataset) as reader:
        out = torch.empty(reader.info("source_embs").shape)
        reader.read_into("source_embs", out)
    assert seen == [out.data_ptr()]


def test_empty_arrays_round_trip(tmp_path: Path) -> None:
    arrays, manifest = synth_tensors(SynthConfig(n_pairs=40, embedding_dim=8, n_neg=2,
                                                 n_clusters=2, seed=5,
                                                 split_ratios=(1.0, 0.0, 0.0)))
    arrays["pair_keyword_ids"] = torch.empty(0, dtype=torch.int64)
    arrays["pair_keyword_offsets"] = torch.zeros(41, dtype=torch.int64)
    for compression in ("none", "gzip"):
        out = write_store(tmp_path / compression, arrays, manifest, backend="hdf5",
                          compression=compression)
        with jasper.open_store(out) as reader:
            for name in ("val_idx", "test_idx", "pair_keyword_ids"):
                assert reader.info(name).shape == (0,)
                assert_same(reader.read(name), arrays[name], name)
                assert reader.read_slice(name, 0, 5).shape == (0,)


def test_tensor_source_default_and_manifest_untouched_by_backend(tmp_path: Path,
                                                                 small_arrays: tuple) -> None:
    """The backend writes only dataset.h5; config.json is core's (written last)."""
    arrays, manifest = small_arrays
    out = write_store(tmp_path / "m", {n: TensorSource(t) for n, t in arrays.items()}, manifest,
                      backend="hdf5")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", FILE_NAME]
    m = Manifest.load(out)
    assert m.writer is not None and m.writer["backend"] == "hdf5"
