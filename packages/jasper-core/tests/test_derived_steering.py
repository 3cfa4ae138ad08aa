"""Derived steering end to end: the manifest record, writes, validation, serving (threads and
worker processes), ``convert --derive-steering`` with exceptions, and the original formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import jasper
from jasper.cli import main
from jasper.errors import IntegrityError, ManifestError, ShapeError
from jasper.loader import create_loader
from jasper.manifest import MANIFEST_NAME, Manifest
from jasper.steering import (
    EXCEPTION_ROWS,
    EXCEPTION_VALUES,
    STEERING,
    check_exceptions,
    derive_arrays,
    formula,
    keyword_rows_of,
    steering_rows,
    stored_names,
)
from jasper.synth import SynthConfig, synthesize, write_synthetic
from jasper.testing.conformance import assert_bit_equal

N, D = 240, 16


def _cfg(derived: bool, **kw: object) -> SynthConfig:
    return SynthConfig(n_pairs=N, embedding_dim=D, n_clusters=4, n_keywords=20, seed=7,
                       derived_steering=derived, **kw)  # type: ignore[arg-type]


def _arrays(derived: bool, **kw: object) -> tuple[dict[str, torch.Tensor], Manifest]:
    sources, m = synthesize(_cfg(derived, **kw))
    return {n: s.materialize().clone() for n, s in sources.items()}, m


def _same_batches(a: Path, b: Path, *, use_mmap: bool = False, split: str = "train") -> None:
    with jasper.JASPERSteeringDataset(a, split, use_mmap=use_mmap) as s, \
            jasper.JASPERSteeringDataset(b, split, use_mmap=use_mmap) as d:
        idx = list(range(len(s)))[::-1]
        for v in (None, 0, 1, 2, 3):
            s.force_steering(v)
            d.force_steering(v)
            want, got = s.__getitems__(idx), d.__getitems__(idx)
            for k in want:
                assert_bit_equal(got[k], want[k], f"{k} variant {v}")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("derived")
    return (write_synthetic(root / "stored", _cfg(False)),
            write_synthetic(root / "derived", _cfg(True)))


def test_a_derived_dataset_stores_no_steering_and_serves_the_same(pair: tuple[Path, Path]) -> None:
    stored, derived = pair
    m = Manifest.load(derived)
    assert m.derived_steering is not None and m.derived_steering["formula"] == "jasper-v1"
    assert m.derived_steering["exceptions"] == 0
    assert set(m.arrays) == set(stored_names(m)) and not set(STEERING) & set(m.arrays)
    assert not any((derived / f"{n}.pt").exists() for n in STEERING)
    _same_batches(stored, derived)
    _same_batches(stored, derived, use_mmap=True, split="val")
    with jasper.JASPERSteeringDataset(stored, "train", use_mmap=False) as s, \
            jasper.JASPERSteeringDataset(derived, "train", use_mmap=False) as d:
        # the stacked steering table [1 + 3 N_p, D] is gone; held instead: the keyword table
        # normalised once (20 rows) and the cache table [1 + N_c + N_s, D] (a zero row, the
        # centroid variant per cluster, the residual variant per source)
        n_c, n_s = (int(d.tables.arrays[n].shape[0]) for n in ("centroid_embs", "source_embs"))
        assert d.tables.derived is not None and sorted(d.tables.derived.caches) == [1, 3]
        assert s.memory_bytes() - d.memory_bytes() == (1 + 3 * N) * D * 4 - 20 * D * 4 - (
            1 + n_c + n_s) * D * 4
        assert d.steering_table is None and d.steering_centroid.device.type == "meta"
        assert d[3].keys() == s[3].keys()


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_derived_steering_in_loader_workers(pair: tuple[Path, Path], worker_type: str) -> None:
    stored, derived = pair
    got = [b["steering"] for b in create_loader(derived, "train", 32, num_workers=2,
                                                worker_type=worker_type)]  # type: ignore[arg-type]
    want = [b["steering"] for b in create_loader(stored, "train", 32, num_workers=0)]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert_bit_equal(g, w, "steering")


def test_validate_deep_computes_every_derived_row(pair: tuple[Path, Path]) -> None:
    report = jasper.validate(pair[1], deep=True)
    assert report.derived_rows_checked == 3 * N
    assert report.checksums_verified == len(stored_names(Manifest.load(pair[1])))


def test_seed_and_stored_manifests_still_validate(pair: tuple[Path, Path]) -> None:
    stored = Manifest.load(pair[0])
    assert stored.derived_steering is None and stored.edited_data_keys() == []
    # a manifest written before the key existed has no digest for it: still unedited
    stored.data_digests = {k: v for k, v in (stored.data_digests or {}).items()
                           if k != "derived_steering"}
    assert stored.edited_data_keys() == []


def test_editing_the_record_after_writing_is_caught(pair: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(pair[1], copy)
    cfg = json.loads((copy / MANIFEST_NAME).read_text())
    cfg["derived_steering"]["params"]["keyword_sharpness"] = 2.0
    (copy / MANIFEST_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="derived_steering"):
        jasper.validate(copy, deep=True)
    cfg["derived_steering"] = {"formula": "made-up"}
    (copy / MANIFEST_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="made-up"):
        jasper.JASPERSteeringDataset(copy, "train")


def test_writes_are_checked_against_the_record(tmp_path: Path) -> None:
    arrays, m = _arrays(True)
    stored, _ = _arrays(False)
    with pytest.raises(ShapeError, match="must not be written"):
        jasper.write_store(tmp_path / "a", {**arrays, "steering_residual": stored[
            "steering_residual"]}, m)
    with pytest.raises(ShapeError, match="steering_exception_rows"):
        jasper.write_store(tmp_path / "b", {k: v for k, v in arrays.items()
                                            if k != EXCEPTION_ROWS}, m)
    m.derived_steering = {**(m.derived_steering or {}), "exceptions": 2}
    with pytest.raises(ShapeError, match="records 2 exceptions"):
        jasper.write_store(tmp_path / "c", arrays, m)


def test_exception_rules_name_the_row() -> None:
    vals = torch.zeros((3, 4))
    kw = {"n_pairs": 10, "dim": 4, "dtype": torch.float32}
    check_exceptions(torch.tensor([[1, 2], [1, 5], [3, 0]]), vals, **kw)
    with pytest.raises(IntegrityError, match=r"\[1, 0\] = 4 is not a steering variant"):
        check_exceptions(torch.tensor([[1, 2], [4, 5], [3, 0]]), vals, **kw)
    with pytest.raises(IntegrityError, match=r"\[2, 1\] = 10 but the dataset has 10 pairs"):
        check_exceptions(torch.tensor([[1, 2], [1, 5], [3, 10]]), vals, **kw)
    with pytest.raises(IntegrityError, match="sorted"):
        check_exceptions(torch.tensor([[1, 5], [1, 2], [3, 0]]), vals, **kw)
    with pytest.raises(IntegrityError, match="not finite"):
        check_exceptions(torch.tensor([[1, 2], [1, 5], [3, 0]]),
                         torch.tensor([[0.0] * 4, [float("nan")] * 4, [0.0] * 4]), **kw)


def _array_bytes(m: Manifest) -> int:
    from jasper.dtypes import torch_dtype

    return sum(torch_dtype(r.dtype).itemsize * int(torch.tensor(r.shape).prod())
               for r in m.arrays.values())


def _altered(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A stored dataset with deliberately altered steering rows (what a foreign builder's
    random fallbacks look like), and its arrays."""
    arrays, m = _arrays(False)
    g = torch.Generator().manual_seed(1)
    for name, rows in (("steering_centroid", [0, 9]), ("steering_keyword_weighted", [4]),
                       ("steering_residual", [1, 2, 200])):
        for r in rows:
            arrays[name][r] = torch.randn(D, generator=g)
    return jasper.write_store(tmp_path / "altered", arrays, m, progress=False), arrays


@pytest.mark.parametrize("to", ["pt", "memmap-sqlite", "hdf5"])
def test_convert_derive_steering_keeps_what_the_formula_misses(tmp_path: Path, to: str) -> None:
    pytest.importorskip({"pt": "jasper_pt", "hdf5": "jasper_hdf5",
                         "memmap-sqlite": "jasper_memmap_sqlite"}[to])
    src, arrays = _altered(tmp_path)
    report = jasper.convert(src, tmp_path / "dst", to=to, derive_steering="jasper-v1",
                            progress=False)
    assert report.derived is not None and report.derived.total == 6
    assert report.derived.exceptions == {"centroid": 2, "keyword": 1, "residual": 3}
    assert report.derived.max_abs_diff == 0.0  # jasper's own rows are reproduced bit for bit
    m = Manifest.load(report.dst)
    assert m.derived_steering is not None and m.derived_steering["exceptions"] == 6
    with jasper.open_store(report.dst) as r:
        assert r.read(EXCEPTION_ROWS).tolist() == [[1, 0], [1, 9], [2, 4], [3, 1], [3, 2],
                                                   [3, 200]]
        assert_bit_equal(r.read(EXCEPTION_VALUES)[5], arrays["steering_residual"][200], "row")
    # the bytes of arrays: the three steering arrays gone, 6 exception rows (ids + values) in
    assert _array_bytes(Manifest.load(src)) - _array_bytes(m) == 3 * N * D * 4 - 6 * (16 + D * 4)
    for split in ("train", "val", "test"):
        _same_batches(src, Path(str(report.dst)), split=split)
    assert jasper.validate(report.dst, deep=True).ok
    # a derived dataset converts on as it is (the exceptions travel)
    again = jasper.convert(report.dst, tmp_path / "again", to="pt", progress=False)
    _same_batches(src, Path(str(again.dst)))


def test_tolerance_decides_what_is_float_noise(tmp_path: Path) -> None:
    arrays, m = _arrays(False)
    for n in STEERING:
        arrays[n] += 1e-7  # noise far below the default tolerance of 1e-6
    _, _, loose = derive_arrays(arrays, m)
    assert loose.total == 0 and 0 < loose.max_abs_diff <= 1e-6
    _, _, exact = derive_arrays(arrays, m, atol=0.0)
    assert exact.total == 3 * N  # every row differs by the noise


def test_convert_cli_reports_the_exceptions(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _altered(tmp_path)
    code = main(["convert", str(src), str(tmp_path / "d"), "--to", "pt", "--derive-steering",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "6 of 720 stored rows kept as exceptions" in out
    code = main(["convert", str(tmp_path / "d"), str(tmp_path / "e"), "--to", "pt",
                 "--derive-steering", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "derived already" in err and "Traceback" not in err


def test_original_formula_with_random_fallbacks(tmp_path: Path) -> None:
    """A dataset built the original's way (its per-pair float32 code, here restated per row;
    pairs without keywords given random unit vectors, its "random" fallback) converts with the
    ``original`` formula: the random rows become exceptions, float noise does not."""
    arrays, m = _arrays(False, max_keywords_per_pair=2)
    pi, cl = arrays["pair_index"], arrays["pair_cluster_id"]
    off, ids = arrays["pair_keyword_offsets"], arrays["pair_keyword_ids"]
    q, c = arrays["question_embs"][pi[:, 0]], arrays["centroid_embs"][cl]
    g = torch.Generator().manual_seed(3)
    counts = off[1:] - off[:-1]
    # drop the keywords of every 7th pair to get some fallbacks
    keep = torch.ones(N, dtype=torch.bool)
    keep[::7] = False
    new_counts = torch.where(keep, counts, 0)
    new_off = torch.zeros(N + 1, dtype=torch.int64)
    new_off[1:] = torch.cumsum(new_counts, 0)
    owner = torch.repeat_interleave(torch.arange(N), counts)
    arrays["pair_keyword_ids"] = ids[keep[owner]].clone()
    arrays["pair_keyword_offsets"] = new_off
    no_kw = torch.nonzero(new_counts == 0).reshape(-1)
    for p in range(N):
        d = c[p] - q[p]
        arrays["steering_centroid"][p] = d / d.norm()
        arrays["steering_residual"][p] = q[p] - c[p]
        k = arrays["keyword_embs"][arrays["pair_keyword_ids"][new_off[p]:new_off[p + 1]]]
        if k.shape[0]:
            mean = k.mean(dim=0)
            arrays["steering_keyword_weighted"][p] = mean / mean.norm()
        else:
            r = torch.randn(D, generator=g)
            arrays["steering_keyword_weighted"][p] = r / r.norm()
    out, m2, report = derive_arrays(arrays, m, formula("original"))
    assert report.exceptions == {"centroid": 0, "keyword": int(no_kw.numel()), "residual": 0}
    assert out[EXCEPTION_ROWS][:, 1].tolist() == no_kw.tolist()
    a = jasper.write_store(tmp_path / "orig", arrays, m, progress=False)
    b = jasper.write_store(tmp_path / "orig-derived", out, m2, progress=False)
    # served values stay within the stated tolerance of the stored ones
    with jasper.JASPERSteeringDataset(a, "train") as s, jasper.JASPERSteeringDataset(b, "train") as d:
        for v in (1, 2, 3):
            s.force_steering(v)
            d.force_steering(v)
            idx = list(range(len(s)))
            diff = (s.__getitems__(idx)["steering"] - d.__getitems__(idx)["steering"]).abs()
            assert float(diff.max()) <= 1e-6
    # the kernel's original keyword variant, directly: unit(mean)
    kw = keyword_rows_of(new_off, arrays["pair_keyword_ids"], torch.arange(N),
                         lambda i: arrays["keyword_embs"].index_select(0, i))
    got = steering_rows(formula("original"), 2, centroids=c, questions=q, keywords=kw)
    assert torch.allclose(got[new_counts > 0], arrays["steering_keyword_weighted"][new_counts > 0],
                          atol=1e-6)
