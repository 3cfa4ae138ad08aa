"""Compact index arrays (jasper.index_dtypes): the capacity rule, what builders write, and that
narrow storage never changes what a batch serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jasper
from jasper.build import BuildConfig, build_arrays
from jasper.errors import ShapeError
from jasper.index_dtypes import (
    CAPACITIES,
    INDEX_ARRAYS,
    cast_index,
    check_index_capacity,
    compact_dtypes,
    largest_value,
    narrowest,
)
from jasper.schema import ARRAYS, PAIRS
from jasper.store import dir_size
from jasper.synth import SynthConfig, synthesize, write_synthetic
from jasper.testing.data import make_arrays
from jasper.validation import check_arrays

ROW_TABLES = ("question_embs", "source_embs", "keyword_embs", "centroid_embs")


def _rows(**over: int) -> dict[str, int]:
    rows = {t: 10 for t in ROW_TABLES}
    rows.update({PAIRS: 10, "pair_keyword_ids": 10})
    rows.update(over)
    return rows


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(0, 1000), delta=st.integers(-3, 3),
       table=st.sampled_from(["question_embs", "source_embs", "keyword_embs", "centroid_embs",
                              PAIRS, "pair_keyword_ids"]))
def test_int32_is_legal_exactly_while_every_row_is_addressable(cap: int, delta: int,
                                                               table: str) -> None:
    """With int32 made to hold values up to ``cap`` (an artificial limit), every index array
    referencing a table of ``cap + 1 + delta`` rows passes as int32 exactly when the table's last
    row id (or, for the CSR offsets, the value count) fits; builders pick int32 exactly then."""
    caps = {**CAPACITIES, "int32": cap}
    n = max(0, cap + 1 + delta)
    rows = _rows(**{table: n})
    for name in INDEX_ARRAYS:
        if name == "negative_tiers":
            continue
        bound = largest_value(name, rows)
        assert bound is not None
        fits = bound <= cap
        if fits:
            check_index_capacity({name: "int32"}, rows, capacities=caps)
        else:
            with pytest.raises(ShapeError) as err:
                check_index_capacity({name: "int32"}, rows, capacities=caps)
            assert err.value.array == name and "int32" in str(err.value.rule)
            assert f"up to {cap:,}" in str(err.value) and "store it as int64" in str(err.value)
        check_index_capacity({name: "int64"}, rows, capacities=caps)  # int64: always legal
        assert compact_dtypes(rows, 4, capacities=caps)[name] == ("int32" if fits else "int64")


@settings(max_examples=100, deadline=None)
@given(n_tiers=st.integers(0, 70000))
def test_tier_dtype_must_hold_n_tiers(n_tiers: int) -> None:
    """Tiers in int8 pass while the manifest's ``n_tiers`` fits int8 (127), int16 while it fits
    32767; builders write int8 whenever it holds them."""
    rows = _rows()
    for dtype in ("int8", "uint8", "int16", "int32"):
        if n_tiers <= CAPACITIES[dtype]:
            check_index_capacity({"negative_tiers": dtype}, rows, n_tiers=n_tiers)
        else:
            with pytest.raises(ShapeError, match=f"n_tiers = {n_tiers:,}") as err:
                check_index_capacity({"negative_tiers": dtype}, rows, n_tiers=n_tiers)
            assert err.value.array == "negative_tiers"
    assert compact_dtypes(rows, n_tiers)["negative_tiers"] == narrowest(
        max(n_tiers, 4), ("int8", "int32", "int64"))
    check_index_capacity({"negative_tiers": "int8"}, rows, n_tiers=None)  # unknown: no rule


def test_int32_hard_negatives_over_a_huge_table_are_a_typed_error() -> None:
    """Through the open-time checks, with the real int32 limit: a source table of 2^31 + 1 rows
    (a shape-only stand-in) makes int32 ``hard_negatives`` a ShapeError naming the array, its
    dtype and the table; int64 passes the same rule."""
    arrays, manifest = make_arrays(n_pairs=16)
    d = manifest.embedding_dim
    arrays["source_embs"] = torch.zeros((), dtype=torch.float32).expand(2**31 + 1, d)
    skip = frozenset({"source_embs"})
    check_arrays({**arrays}, manifest, skip_finite=skip)  # int64 everywhere: fine
    arrays["hard_negatives"] = arrays["hard_negatives"].to(torch.int32)
    with pytest.raises(ShapeError) as err:
        check_arrays(arrays, manifest, skip_finite=skip)
    assert err.value.array == "hard_negatives"
    assert "int32" in str(err.value) and "source_embs" in str(err.value)
    assert "2,147,483,647" in str(err.value)


def test_int8_tiers_that_cannot_hold_n_tiers_are_refused_on_write_and_open(
        tmp_path: Path) -> None:
    """A manifest recording 200 tiers with int8 tiers: the writer refuses it before writing,
    and the open-time checks refuse the same arrays (typed, naming the array and rule)."""
    arrays, manifest = make_arrays(n_pairs=16, tier_dtype="int8")
    manifest.n_tiers = 200
    with pytest.raises(ShapeError, match="negative_tiers is stored as int8") as err:
        jasper.write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    assert err.value.rule == "int8 holds the negative_tiers values"
    assert not (tmp_path / "ds").exists()
    with pytest.raises(ShapeError, match="n_tiers = 200"):
        check_arrays(arrays, manifest)


def test_narrow_ids_outside_the_allowed_dtypes_are_refused() -> None:
    """int16 ids are not an index dtype (int32 and int64 are): the dtype rule says so."""
    arrays, manifest = make_arrays(n_pairs=16)
    arrays["pair_cluster_id"] = arrays["pair_cluster_id"].to(torch.int16)
    with pytest.raises(ShapeError, match="allowed: int32, int64") as err:
        check_arrays(arrays, manifest)
    assert err.value.array == "pair_cluster_id" and err.value.rule == "dtype"


def test_cast_index_never_wraps() -> None:
    a = np.array([0, 2**31], dtype=np.int64)
    with pytest.raises(ShapeError, match="do not fit int32") as err:
        cast_index(a, "int32", "pair_index")
    assert err.value.array == "pair_index"
    assert cast_index(a[:1], "int32").dtype == np.int32
    same = np.arange(3, dtype=np.int32)
    assert cast_index(same, "int32") is same


def test_builder_writes_narrowest_by_default_and_int64_on_request() -> None:
    """``build_arrays`` stores ids int32 and tiers int8 by default; ``compact_indices=False``
    keeps int64; the values are the same either way (given tiers and splits included)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((30, 8)).astype(np.float32)
    s = rng.standard_normal((40, 8)).astype(np.float32)
    pairs = np.stack([rng.integers(0, 30, 60), rng.integers(0, 40, 60)], axis=1)
    kw = rng.standard_normal((9, 8)).astype(np.float32)
    pair_kw = [list(rng.integers(0, 9, int(k))) for k in rng.integers(0, 4, 60)]
    out = {}
    for compact in (True, False):
        cfg = BuildConfig(n_neg=3, n_clusters=3, compact_indices=compact)
        arrays, _ = build_arrays(q, s, pairs, keywords=kw, pair_keywords=pair_kw, config=cfg)
        out[compact] = {n: a.materialize() for n, a in arrays.items()}
    for name in INDEX_ARRAYS:
        want = torch.int8 if name == "negative_tiers" else torch.int32
        assert out[True][name].dtype == want, name
        assert out[False][name].dtype == torch.int64, name
        assert torch.equal(out[True][name].to(torch.int64), out[False][name]), name
    for name in ARRAYS:
        if name not in INDEX_ARRAYS:
            assert torch.equal(out[True][name], out[False][name]), name


@pytest.mark.parametrize("use_mmap", [False, True])
def test_batches_are_int64_and_identical_to_the_int64_twin(tmp_path: Path,
                                                           use_mmap: bool) -> None:
    """The same synthetic dataset written compact and int64 (pt): every batch key of every
    split is bit-identical, ids, variants and tiers int64; existing int64 datasets still open
    and validate; the compact one is smaller on disk and in RAM."""
    paths = {}
    for compact in (True, False):
        cfg = SynthConfig(n_pairs=300, embedding_dim=8, n_neg=4, seed=3,
                          compact_indices=compact)
        paths[compact] = write_synthetic(tmp_path / f"c{compact}", cfg, backend="pt")
        assert jasper.validate(paths[compact], deep=True).ok
    for split in ("train", "val", "test"):
        with jasper.JASPERSteeringDataset(paths[True], split, use_mmap=use_mmap) as c, \
                jasper.JASPERSteeringDataset(paths[False], split, use_mmap=use_mmap) as w:
            assert c.split_indices.dtype == torch.int32 and w.split_indices.dtype == torch.int64
            idx = torch.randperm(len(c), generator=torch.Generator().manual_seed(1))
            for epoch in (0, 50):
                c.set_epoch(epoch)
                w.set_epoch(epoch)
                got, want = c.__getitems__(idx), w.__getitems__(idx)
                for key in want:
                    assert got[key].dtype == want[key].dtype, key
                    assert torch.equal(got[key], want[key]), key
                for key in ("cluster_id", "steering_variant", "negative_tiers"):
                    assert got[key].dtype == torch.int64
            if not use_mmap:
                assert c.memory_bytes() < w.memory_bytes()
    assert dir_size(paths[True]) < dir_size(paths[False])


def test_compact_synth_keeps_int64_for_arrays_without_references() -> None:
    arrays, manifest = synthesize(SynthConfig(n_pairs=50, embedding_dim=4, n_neg=2))
    assert manifest.n_tiers == 4
    assert arrays["negative_tiers"].dtype == torch.int8
    assert arrays["pair_relevance"].dtype == torch.float32


def test_cli_synth_writes_compact_unless_int64_is_asked_for(tmp_path: Path) -> None:
    from jasper.cli import main
    from jasper.manifest import Manifest

    for flag, want in (([], "int32"), (["--int64-indices"], "int64")):
        out = tmp_path / f"ds{len(flag)}"
        assert main(["synth", str(out), "--pairs", "60", "--dim", "8", "--backend", "pt",
                     *flag]) == 0
        arrays = Manifest.load(out).arrays
        assert arrays["hard_negatives"].dtype == want
        assert arrays["negative_tiers"].dtype == ("int8" if not flag else "int64")
        assert main(["validate", str(out)]) == 0
