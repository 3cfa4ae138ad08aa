"""Integrity validation: structural rules raise naming array, first bad row and rule; value
rules warn (and fail under strict); deep validation proves the bytes unchanged."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jasper
from jasper.errors import (
    ChecksumError,
    DataQualityError,
    IntegrityError,
    ShapeError,
)
from jasper.manifest import Manifest
from jasper.store import open_store
from jasper.validation import DataQualityWarning, check_arrays


@pytest.fixture(scope="module")
def loaded(small_dataset: Path) -> tuple[dict[str, torch.Tensor], Manifest]:
    with open_store(small_dataset) as r:
        return {n: r.read(n) for n in r.array_names()}, r.manifest


def fresh(loaded: tuple[dict[str, torch.Tensor], Manifest]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loaded[0].items()}


def test_valid_dataset_has_no_findings(loaded: tuple[dict[str, torch.Tensor], Manifest]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_arrays(fresh(loaded), loaded[1]) == []


def test_error_message_style(loaded: tuple[dict[str, torch.Tensor], Manifest]) -> None:
    a = fresh(loaded)
    n_s = a["source_embs"].shape[0]
    a["hard_negatives"][1532, 3] = n_s + 11
    with pytest.raises(IntegrityError) as info:
        check_arrays(a, loaded[1])
    assert str(info.value) == f"hard_negatives[1532, 3] = {n_s + 11} but source_embs has {n_s} rows"
    assert (info.value.array, info.value.row) == ("hard_negatives", 1532)
    assert isinstance(info.value, ValueError)  # original code catches ValueError


@pytest.mark.parametrize(
    ("mutate", "array", "row", "needle"),
    [
        (lambda a: a["pair_index"].__setitem__((7, 0), -1), "pair_index", 7, "pair_index[7, 0] = -1 is negative"),
        (lambda a: a["pair_index"].__setitem__((9, 1), 10**6), "pair_index", 9, "but source_embs has"),
        (lambda a: a["pair_cluster_id"].__setitem__(3, 99), "pair_cluster_id", 3, "but centroid_embs has 8 rows"),
        (lambda a: a["pair_keyword_ids"].__setitem__(5, 10**5), "pair_keyword_ids", 5, "but keyword_embs has"),
        (lambda a: a["steering_residual"].__setitem__((11, 2), float("nan")), "steering_residual", 11, "steering_residual[11, 2] = nan is not finite"),
        (lambda a: a["question_embs"].__setitem__((4, 0), float("inf")), "question_embs", 4, "is not finite"),
        (lambda a: a["negative_tiers"].__setitem__((2, 1), -3), "negative_tiers", 2, "is negative"),
        (lambda a: a["pair_keyword_offsets"].__setitem__(10, 0), "pair_keyword_offsets", 10, "must not decrease"),
    ],
)
def test_structural_rules_name_array_row_and_rule(
    loaded: tuple[dict[str, torch.Tensor], Manifest], mutate: Callable, array: str, row: int,
    needle: str,
) -> None:
    a = fresh(loaded)
    mutate(a)
    with pytest.raises(IntegrityError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
        check_arrays(a, loaded[1], path=Path("/data/x"))
    assert info.value.array == array
    assert info.value.row == row
    assert info.value.rule
    assert str(info.value).startswith("/data/x: ")


def test_splits_must_be_disjoint(loaded: tuple[dict[str, torch.Tensor], Manifest]) -> None:
    a = fresh(loaded)
    a["val_idx"][4] = a["train_idx"][0]
    with pytest.raises(IntegrityError, match=r"val_idx\[4\] = pair \d+ is also in the train split"):
        check_arrays(a, loaded[1])
    a = fresh(loaded)
    a["test_idx"][3] = a["test_idx"][1]
    with pytest.raises(IntegrityError, match=r"test_idx\[3\] = pair \d+ appears twice") as info:
        check_arrays(a, loaded[1])
    assert info.value.rule == "disjoint splits"
    a = fresh(loaded)
    a["train_idx"][0] = 10**7
    with pytest.raises(IntegrityError, match=r"train_idx\[0\] = 10000000 but pairs \(N_p\) has 2000"):
        check_arrays(a, loaded[1])


def test_shape_rules(loaded: tuple[dict[str, torch.Tensor], Manifest]) -> None:
    a = fresh(loaded)
    a["steering_centroid"] = a["steering_centroid"][:-1]
    with pytest.raises(ShapeError, match="steering_centroid has 1999 rows but pair_index has 2000"):
        check_arrays(a, loaded[1])
    a = fresh(loaded)
    a["source_embs"] = a["source_embs"][:, :-1]
    with pytest.raises(ShapeError, match="source_embs has 31 columns"):
        check_arrays(a, loaded[1])
    a = fresh(loaded)
    a["pair_cluster_id"] = a["pair_cluster_id"].to(torch.float32)
    with pytest.raises(ShapeError, match="dtype float32"):
        check_arrays(a, loaded[1])
    a = fresh(loaded)
    del a["val_idx"]
    with pytest.raises(IntegrityError, match="'val_idx' is missing"):
        check_arrays(a, loaded[1])


def test_value_rules_warn_then_fail_under_strict(
    loaded: tuple[dict[str, torch.Tensor], Manifest],
) -> None:
    a = fresh(loaded)
    a["hard_negatives"][12, 0] = a["pair_index"][12, 1]
    a["hard_negatives"][40, 2] = a["pair_index"][40, 1]
    a["pair_relevance"][8] = 1.5
    a["centroid_distances"][30] = -0.25
    with pytest.warns(DataQualityWarning) as record:
        findings = check_arrays(a, loaded[1])
    messages = " | ".join(str(w.message) for w in record)
    assert "hard_negatives: 2 negative(s) equal the pair's own source, first hard_negatives[12, 0]" in messages
    assert "pair_relevance: 1 value(s) outside [0, 1], first pair_relevance[8] = 1.5" in messages
    assert "centroid_distances: 1 value(s) outside [0, 2], first centroid_distances[30] = -0.25" in messages
    assert {f.array for f in findings} == {"hard_negatives", "pair_relevance", "centroid_distances"}
    with pytest.raises(DataQualityError, match="hard_negatives"):
        check_arrays(a, loaded[1], strict=True)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_first_bad_row_is_reported(loaded: tuple[dict[str, torch.Tensor], Manifest],
                                   data: st.DataObject) -> None:
    a = fresh(loaded)
    n_p, k = a["hard_negatives"].shape
    rows = data.draw(st.lists(st.integers(0, n_p - 1), min_size=1, max_size=4, unique=True))
    col = data.draw(st.integers(0, k - 1))
    for r in rows:
        a["hard_negatives"][r, col] = -5
    with pytest.raises(IntegrityError) as info:
        check_arrays(a, loaded[1])
    assert info.value.row == min(rows)


def test_validate_report_and_deep_checksums(small_dataset: Path,
                                           copy_dataset: Callable[[Path], Path]) -> None:
    report = jasper.validate(small_dataset, deep=True)
    assert report.ok and report.n_pairs == 2000 and report.checksums_verified == 18
    assert report.pairs_per_second > 0

    broken = copy_dataset(small_dataset)
    t = torch.load(broken / "steering_centroid.pt", weights_only=True)
    t[100, 3] += 1.0  # same shape and dtype: only the checksum can tell
    torch.save(t, broken / "steering_centroid.pt")
    jasper.validate(broken)  # shallow validation cannot see it
    with pytest.raises(ChecksumError, match="steering_centroid: checksum") as info:
        jasper.validate(broken, deep=True)
    assert info.value.array == "steering_centroid"


def test_validate_catches_store_disagreeing_with_manifest(
    small_dataset: Path, copy_dataset: Callable[[Path], Path],
) -> None:
    broken = copy_dataset(small_dataset)
    t = torch.load(broken / "pair_relevance.pt", weights_only=True)
    torch.save(t[:-1].clone(), broken / "pair_relevance.pt")
    with pytest.raises(ShapeError, match="manifest records"):
        jasper.validate(broken)


def test_streamed_finite_check_for_backends_that_cannot_map(
    small_dataset: Path, copy_dataset: Callable[[Path], Path],
) -> None:
    """Without mmap, large float arrays are checked chunk by chunk, never copied whole; the
    reported row is still the absolute first bad row."""
    from jasper.backend import Capabilities
    from jasper.registry import register_backend, unregister_backend
    from jasper_pt.backend import PTBackend

    class NoMapPT(PTBackend):
        name = "pt-nomap-validate"
        capabilities = Capabilities(mmap=False)

    broken = copy_dataset(small_dataset)
    t = torch.load(broken / "steering_keyword_weighted.pt", weights_only=True)
    t[1777, 5] = float("-inf")
    torch.save(t, broken / "steering_keyword_weighted.pt")
    register_backend("pt-nomap-validate", NoMapPT)
    try:
        jasper.validate(small_dataset, backend="pt-nomap-validate")
        with pytest.raises(IntegrityError, match=r"steering_keyword_weighted\[1777, 5\] = -inf") as info:
            # a tiny chunk size puts the bad row in a later chunk
            import jasper.backend as jb

            original = jb.default_rows_per_chunk
            jb.default_rows_per_chunk = lambda source, target_bytes=0: 100  # type: ignore[assignment]
            try:
                jasper.validate(broken, backend="pt-nomap-validate")
            finally:
                jb.default_rows_per_chunk = original
        assert info.value.row == 1777
    finally:
        unregister_backend("pt-nomap-validate")


def test_huge_finite_values_are_not_mistaken_for_inf(
    loaded: tuple[dict[str, torch.Tensor], Manifest],
) -> None:
    """The fast NaN/Inf check sums each chunk; a sum that overflows must fall back to the exact
    scan instead of reporting a finite array as broken."""
    a = fresh(loaded)
    a["steering_residual"][:50] = 3.0e38  # the float32 sum of these overflows to inf
    assert check_arrays(a, loaded[1]) == []
    a["steering_residual"][49, 7] = float("inf")
    with pytest.raises(IntegrityError, match=r"steering_residual\[49, 7\] = inf"):
        check_arrays(a, loaded[1])
