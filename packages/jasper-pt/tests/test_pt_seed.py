"""Datasets written by the original system open through jasper-pt.

The original wrote one ``.pt`` per array with ``torch.save``, keyword ids as a Python list of
lists in ``pair_keyword_ids.pt`` (no offsets file) and a ``config.json`` without jasper's keys;
``jasper.testing.write_seed_dataset`` writes exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jasper
from jasper.errors import FormatError
from jasper.manifest import Manifest
from jasper.schema import ARRAYS
from jasper.testing import csr_to_lists, make_arrays, write_seed_dataset
from jasper.testing.conformance import assert_bit_equal

KW = dict(n_pairs=40, embedding_dim=8, seed=21)


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    return write_seed_dataset(tmp_path / "seed", **KW)


def test_seed_dataset_opens_with_csr_keyword_ids(seed: Path) -> None:
    arrays, _ = make_arrays(**KW)
    assert not (seed / "pair_keyword_offsets.pt").exists()
    with jasper.open_store(seed) as reader:
        assert reader.backend_name == "pt"
        assert reader.manifest.is_seed_era
        assert set(reader.array_names()) == set(ARRAYS)
        for name in ARRAYS:
            info = reader.info(name)
            assert tuple(info.shape) == tuple(arrays[name].shape), name
            assert_bit_equal(reader.read(name), arrays[name], name)
        offsets = reader.read("pair_keyword_offsets")
        ids = reader.read("pair_keyword_ids")
        assert offsets.dtype == torch.int64 and ids.dtype == torch.int64
        assert csr_to_lists(offsets, ids) == torch.load(seed / "pair_keyword_ids.pt",
                                                       weights_only=True)
    report = jasper.validate(seed, deep=True)
    assert report.ok and report.n_pairs == KW["n_pairs"] and report.checksums_verified == 0


def test_seed_keyword_reads_are_copies_and_row_reads_work(seed: Path) -> None:
    arrays, _ = make_arrays(**KW)
    with jasper.open_store(seed) as reader:
        for name in ("pair_keyword_offsets", "pair_keyword_ids"):
            reader.read(name).zero_()
            assert_bit_equal(reader.read(name), arrays[name],
                             f"{name} after a caller modified an earlier read")
            rows = torch.tensor([3, 0, 3, 7], dtype=torch.int64)
            assert_bit_equal(reader.read_rows(name, rows), arrays[name][rows], name)
            assert_bit_equal(reader.read_slice(name, 2, 9), arrays[name][2:9], name)
            assert_bit_equal(torch.cat(list(reader.iter_chunks(name, 4))), arrays[name], name)


def test_seed_dataset_opens_mapped(seed: Path) -> None:
    arrays, _ = make_arrays(**KW)
    with jasper.open_store(seed, mmap=True) as reader:
        for name in ARRAYS:
            assert_bit_equal(reader.map(name), arrays[name], f"map({name!r})")


def test_legacy_serialisation_still_opens(seed: Path) -> None:
    """Files saved with torch's pre-1.6 (non-zip) format cannot be mapped; they are loaded whole."""
    arrays, _ = make_arrays(**KW)
    torch.save(arrays["question_embs"], seed / "question_embs.pt",
               _use_new_zipfile_serialization=False)
    lists = csr_to_lists(arrays["pair_keyword_offsets"], arrays["pair_keyword_ids"])
    torch.save(lists, seed / "pair_keyword_ids.pt", _use_new_zipfile_serialization=False)
    with jasper.open_store(seed, mmap=True) as reader:
        for name in ("question_embs", "pair_keyword_ids", "pair_keyword_offsets"):
            assert_bit_equal(reader.read(name), arrays[name], name)
            assert_bit_equal(reader.map(name), arrays[name], name)
    jasper.validate(seed)


def test_convert_seed_to_jasper_layout_keeps_config(seed: Path, tmp_path: Path) -> None:
    config = json.loads((seed / "config.json").read_text())
    arrays, _ = make_arrays(**KW)
    report = jasper.convert(seed, tmp_path / "converted", to="pt", progress=False)
    out = report.dst
    assert (out / "pair_keyword_offsets.pt").is_file()
    assert isinstance(torch.load(out / "pair_keyword_ids.pt", weights_only=True), torch.Tensor)
    m = Manifest.load(out)
    assert not m.is_seed_era and m.writer and m.writer["backend"] == "pt"
    written = json.loads((out / "config.json").read_text())
    for key, value in config.items():
        assert written[key] == value, key
    assert jasper.validate(out, deep=True).checksums_verified == len(ARRAYS)
    with jasper.open_store(out) as reader:
        for name in ARRAYS:
            assert_bit_equal(reader.read(name), arrays[name], name)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=30), data=st.data())
def test_any_ragged_keyword_lists_become_csr(tmp_path_factory: pytest.TempPathFactory,
                                             lengths: list[int], data: st.DataObject) -> None:
    n = len(lengths)
    arrays, manifest = make_arrays(n, 4, seed=n)
    n_k = arrays["keyword_embs"].shape[0]
    lists = [data.draw(st.lists(st.integers(0, n_k - 1), min_size=k, max_size=k)) for k in lengths]
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    arrays["pair_keyword_offsets"] = offsets
    arrays["pair_keyword_ids"] = torch.tensor([v for row in lists for v in row], dtype=torch.int64)
    path = write_seed_dataset(tmp_path_factory.mktemp("ragged") / "seed", arrays, manifest)
    with jasper.open_store(path) as reader:
        assert_bit_equal(reader.read("pair_keyword_offsets"), offsets, "offsets")
        assert csr_to_lists(reader.read("pair_keyword_offsets"),
                            reader.read("pair_keyword_ids")) == lists
    jasper.validate(path)


@pytest.mark.parametrize(
    "bad",
    [[[1, 2], ["x"]], {"not": "a list"}, [[1], None], torch.zeros(3)],
    ids=["string-id", "dict", "none-row", "tensor"],
)
def test_malformed_seed_keyword_ids_raise_format_error(seed: Path, bad: object) -> None:
    torch.save(bad, seed / "pair_keyword_ids.pt")
    with pytest.raises(FormatError, match="pair_keyword_ids"), jasper.open_store(seed) as reader:
        reader.read("pair_keyword_offsets")
