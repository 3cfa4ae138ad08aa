"""Partially derived steering: a derived dataset that keeps some variants stored
(``derived_steering.stored_variants``). The manifest record and its rules, writes, serving
bit-identical to stored steering for every subset of kept variants (preloaded and mapped),
``convert --derive-steering --keep-steering``, ``validate --deep`` and the CLI."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jasper
from jasper.cli import main
from jasper.errors import ChecksumError, IntegrityError, ManifestError, ShapeError
from jasper.manifest import MANIFEST_NAME, Manifest
from jasper.steering import (
    EXCEPTION_ROWS,
    EXCEPTION_VALUES,
    JASPER_V1,
    KEEPABLE,
    STEERING,
    DerivedSpec,
    check_exceptions,
    derive_arrays,
    derived_spec,
    kept_variants,
    stored_names,
)
from jasper.synth import SynthConfig, synthesize, write_synthetic
from jasper.testing.conformance import assert_bit_equal

N, D = 240, 16
#: Every subset of kept variants a derived dataset may have (none up to two of the three).
SUBSETS: list[tuple[str, ...]] = [c for r in range(3) for c in itertools.combinations(KEEPABLE, r)]


def _cfg(keep: tuple[str, ...] | None, **kw: object) -> SynthConfig:
    """``keep`` None: stored steering; else derived, keeping ``keep`` stored."""
    return SynthConfig(n_pairs=N, embedding_dim=D, n_clusters=4, n_keywords=20, seed=7,
                       derived_steering=keep is not None, keep_steering=keep or (),
                       **kw)  # type: ignore[arg-type]


def _arrays(keep: tuple[str, ...] | None) -> tuple[dict[str, torch.Tensor], Manifest]:
    sources, m = synthesize(_cfg(keep))
    return {n: s.materialize().clone() for n, s in sources.items()}, m


def _same_batches(a: Path, b: Path, *, use_mmap: bool, split: str = "train",
                  idx: list[int] | None = None, epoch: int = 35) -> None:
    with jasper.JASPERSteeringDataset(a, split, use_mmap=use_mmap) as s, \
            jasper.JASPERSteeringDataset(b, split, use_mmap=use_mmap) as d:
        rows = idx if idx is not None else list(range(len(s)))[::-1]
        for v in (None, 0, 1, 2, 3):
            s.force_steering(v)
            d.force_steering(v)
            s.set_epoch(epoch)
            d.set_epoch(epoch)
            want, got = s.__getitems__(rows), d.__getitems__(rows)
            assert list(got) == list(want)
            for k in want:
                assert_bit_equal(got[k], want[k], f"{k} variant {v} use_mmap={use_mmap}")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("partial")


@pytest.fixture(scope="module")
def stored(root: Path) -> Path:
    return write_synthetic(root / "stored", _cfg(None), progress=False)


@pytest.fixture(scope="module")
def keyword_kept(root: Path) -> Path:
    return write_synthetic(root / "keyword", _cfg(("keyword",)), progress=False)


# --- the manifest record ----------------------------------------------------------------------
@pytest.mark.parametrize("keep", SUBSETS)
def test_the_record_round_trips(keep: tuple[str, ...]) -> None:
    spec = DerivedSpec(JASPER_V1, "float32", stored_variants=keep)
    d = json.loads(json.dumps(spec.to_dict()))
    assert ("stored_variants" in d) == bool(keep)
    back = DerivedSpec.from_dict(d)
    assert back == spec and back.stored_variants == keep
    assert back.stored_arrays == tuple(STEERING[KEEPABLE.index(n)] for n in keep)
    assert set(back.stored_arrays) | set(back.derived_arrays) == set(STEERING)


def test_a_record_without_the_key_derives_everything() -> None:
    spec = DerivedSpec.from_dict({"formula": "jasper-v1", "dtype": "float32", "exceptions": 0})
    assert spec.stored_variants == () and spec.derived_ids == (1, 2, 3)


@pytest.mark.parametrize(("value", "match"), [
    (["bogus"], "'bogus' is not a steering variant"),
    (["keyword", "keyword"], "named twice"),
    (["centroid", "keyword", "residual"], "all three"),
    (["residual", "centroid"], "variant order"),
    ("keyword", "must be a list"),
    (["zero"], "'zero' is not a steering variant"),
])
def test_bad_records_are_manifest_errors_naming_the_rule(value: object, match: str) -> None:
    d = {"formula": "jasper-v1", "dtype": "float32", "stored_variants": value}
    with pytest.raises(ManifestError, match=match) as info:
        DerivedSpec.from_dict(d)
    assert "config.json" in str(info.value) and "stored_variants" in str(info.value)


def test_a_bad_record_on_disk_is_caught_on_open(keyword_kept: Path, tmp_path: Path) -> None:
    copy = tmp_path / "edited"
    shutil.copytree(keyword_kept, copy)
    cfg = json.loads((copy / MANIFEST_NAME).read_text())
    cfg["derived_steering"]["stored_variants"] = ["keyword", "nonsense"]
    (copy / MANIFEST_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match="stored_variants"):
        jasper.JASPERSteeringDataset(copy, "train")


def test_kept_variants_reads_comma_lists() -> None:
    assert kept_variants("residual, keyword") == ("keyword", "residual")
    assert kept_variants(None) == ()
    with pytest.raises(ValueError, match="all three"):
        kept_variants(["centroid", "keyword", "residual"])


# --- writes -----------------------------------------------------------------------------------
def test_a_partial_dataset_stores_exactly_the_kept_arrays(keyword_kept: Path,
                                                          stored: Path) -> None:
    m = Manifest.load(keyword_kept)
    spec = derived_spec(m)
    assert spec is not None and spec.stored_variants == ("keyword",)
    assert m.derived_steering is not None
    assert m.derived_steering["stored_variants"] == ["keyword"]
    assert set(m.arrays) == set(stored_names(m))
    assert "steering_keyword_weighted" in m.arrays
    assert not {"steering_centroid", "steering_residual"} & set(m.arrays)
    # the kept array is the stored dataset's, byte for byte (the same kernel wrote it)
    assert m.arrays["steering_keyword_weighted"].checksum == \
        Manifest.load(stored).arrays["steering_keyword_weighted"].checksum


def test_writes_are_checked_against_the_kept_variants(tmp_path: Path) -> None:
    arrays, m = _arrays(("keyword",))
    full, _ = _arrays(None)
    with pytest.raises(ShapeError, match="steering_centroid must not be written"):
        jasper.write_store(tmp_path / "a", {**arrays, "steering_centroid":
                                            full["steering_centroid"]}, m)
    with pytest.raises(ShapeError, match="steering_keyword_weighted") as info:
        jasper.write_store(tmp_path / "b", {k: v for k, v in arrays.items()
                                            if k != "steering_keyword_weighted"}, m)
    assert info.value.rule == "required array"
    wrong = {**arrays, "steering_keyword_weighted": arrays["steering_keyword_weighted"].double()}
    with pytest.raises(ShapeError, match="served dtype") as info:
        jasper.write_store(tmp_path / "c", wrong, m)
    assert info.value.array == "steering_keyword_weighted"


def test_an_exception_of_a_kept_variant_is_an_integrity_error(tmp_path: Path) -> None:
    kw = {"n_pairs": 10, "dim": 4, "dtype": torch.float32}
    check_exceptions(torch.tensor([[1, 2], [3, 0]]), torch.zeros((2, 4)), stored_ids=(2,), **kw)
    with pytest.raises(IntegrityError, match=r"\[1\] is an exception of variant 2") as info:
        check_exceptions(torch.tensor([[1, 2], [2, 0]]), torch.zeros((2, 4)), stored_ids=(2,),
                         **kw)
    assert info.value.rule == "exceptions of derived variants" and info.value.row == 1
    # written that way, the dataset fails validation and opening
    arrays, m = _arrays(("keyword",))
    arrays[EXCEPTION_ROWS] = torch.tensor([[2, 5]])
    arrays[EXCEPTION_VALUES] = torch.zeros((1, D))
    m.derived_steering = {**(m.derived_steering or {}), "exceptions": 1}
    ds = jasper.write_store(tmp_path / "bad", arrays, m, progress=False)
    with pytest.raises(IntegrityError, match="exceptions are rows of derived variants"):
        jasper.validate(ds)
    with pytest.raises(IntegrityError, match="exceptions are rows of derived variants"):
        jasper.JASPERSteeringDataset(ds, "train")


def test_keep_without_derived_is_refused() -> None:
    with pytest.raises(ValueError, match="needs derived_steering"):
        SynthConfig(n_pairs=N, keep_steering=("keyword",))
    with pytest.raises(ValueError, match="not a steering variant"):
        SynthConfig(n_pairs=N, derived_steering=True, keep_steering=("kw",))


# --- serving ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", SUBSETS, ids=lambda k: "+".join(k) or "none")
def test_every_subset_serves_the_stored_batches(root: Path, stored: Path,
                                                keep: tuple[str, ...]) -> None:
    ds = write_synthetic(root / f"keep-{'-'.join(keep) or 'none'}", _cfg(keep), progress=False)
    for use_mmap in (False, True):
        for split in ("train", "val"):
            _same_batches(stored, ds, use_mmap=use_mmap, split=split)
    with jasper.JASPERSteeringDataset(ds, "train") as d:
        assert d.tables.derived is not None
        # nothing is computed once for a kept variant, and the keyword table is normalised
        # only when the keyword variant is derived
        assert not set(d.tables.derived.caches) & set(d.tables.derived.stored_ids)
        assert (d.tables.derived.keyword_units is None) == ("keyword" in keep)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(idx=st.lists(st.integers(0, 10_000), min_size=1, max_size=64),
       epoch=st.integers(0, 60), use_mmap=st.booleans())
def test_any_batch_of_the_keyword_kept_dataset_is_the_stored_batch(
        stored: Path, keyword_kept: Path, idx: list[int], epoch: int, use_mmap: bool) -> None:
    with jasper.JASPERSteeringDataset(stored, "train") as s:
        n = len(s)
    _same_batches(stored, keyword_kept, use_mmap=use_mmap, idx=[i % n for i in idx],
                  epoch=epoch)


def test_a_keyword_only_batch_is_one_gather_of_the_kept_array(keyword_kept: Path) -> None:
    with jasper.JASPERSteeringDataset(keyword_kept, "train") as d, \
            jasper.open_store(keyword_kept) as r:
        kept = r.read("steering_keyword_weighted")
        d.force_steering("keyword")
        idx = list(range(len(d)))
        got = d.__getitems__(idx)
        pids = d.tables.arrays["train_idx"].to(torch.int64)
        assert_bit_equal(got["steering"], kept.index_select(0, pids), "keyword rows")


# --- convert ----------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["pt", "memmap-sqlite", "hdf5"])
def test_convert_keeping_the_keyword_variant(stored: Path, tmp_path: Path, to: str) -> None:
    pytest.importorskip({"pt": "jasper_pt", "hdf5": "jasper_hdf5",
                         "memmap-sqlite": "jasper_memmap_sqlite"}[to])
    report = jasper.convert(stored, tmp_path / "dst", to=to, derive_steering="jasper-v1",
                            keep_steering=["keyword"], progress=False)
    assert report.derived is not None and report.derived.total == 0
    assert set(report.derived.exceptions) == {"centroid", "residual"}
    assert "kept stored, copied: keyword" in str(report.derived)
    dst = Path(str(report.dst))
    m = Manifest.load(dst)
    assert m.derived_steering is not None
    assert m.derived_steering["stored_variants"] == ["keyword"]
    assert m.derived_steering["checked_rows"] == 2 * N
    name = "steering_keyword_weighted"
    assert m.arrays[name].checksum == Manifest.load(stored).arrays[name].checksum
    with jasper.open_store(stored) as a, jasper.open_store(dst) as b:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.numpy().tobytes() == y.numpy().tobytes()
    for use_mmap in (False, True):
        for split in ("train", "val", "test"):
            _same_batches(stored, dst, use_mmap=use_mmap, split=split)
    assert jasper.validate(dst, deep=True).ok


def test_convert_copies_the_kept_array_without_comparing_it(tmp_path: Path) -> None:
    """A kept variant's rows are never checked against the formula: altered keyword rows stay
    as they are (no exceptions), altered derived rows become exceptions."""
    arrays, m = _arrays(None)
    g = torch.Generator().manual_seed(2)
    altered = list(range(3, N, 5))  # rows of every split
    arrays["steering_keyword_weighted"][altered] = torch.randn(len(altered), D, generator=g)
    arrays["steering_residual"][7] = torch.randn(D, generator=g)
    src = jasper.write_store(tmp_path / "src", arrays, m, progress=False)
    report = jasper.convert(src, tmp_path / "dst", to="pt", derive_steering="jasper-v1",
                            keep_steering="keyword", progress=False)
    assert report.derived is not None
    assert report.derived.exceptions == {"centroid": 0, "residual": 1}
    with jasper.open_store(report.dst) as r:
        assert r.read(EXCEPTION_ROWS).tolist() == [[3, 7]]
    for use_mmap in (False, True):
        for split in ("train", "val", "test"):
            _same_batches(src, Path(str(report.dst)), use_mmap=use_mmap, split=split)
    _, _, direct = derive_arrays(arrays, m, keep=("keyword",))
    assert direct.total == 1


def test_convert_verifies_the_kept_array_checksum(stored: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(stored, src)
    t = torch.load(src / "steering_keyword_weighted.pt", weights_only=True)
    t.view(-1)[0] += 1
    torch.save(t, src / "steering_keyword_weighted.pt")
    with pytest.raises(ChecksumError, match="steering_keyword_weighted"):
        jasper.convert(src, tmp_path / "dst", to="pt", derive_steering="jasper-v1",
                       keep_steering=["keyword"], progress=False)
    assert not (tmp_path / "dst").exists()


def test_convert_keep_needs_derive(stored: Path, tmp_path: Path) -> None:
    from jasper.errors import WriteOptionError

    with pytest.raises(WriteOptionError, match="needs derive_steering"):
        jasper.convert(stored, tmp_path / "dst", to="pt", keep_steering=["keyword"],
                       progress=False)
    with pytest.raises(WriteOptionError, match="all three"):
        jasper.convert(stored, tmp_path / "dst", to="pt", derive_steering="jasper-v1",
                       keep_steering=list(KEEPABLE), progress=False)


# --- validate ---------------------------------------------------------------------------------
def test_validate_deep_checks_the_kept_array_and_derives_the_rest(keyword_kept: Path,
                                                                  tmp_path: Path) -> None:
    report = jasper.validate(keyword_kept, deep=True)
    assert report.ok and report.derived_rows_checked == 2 * N
    assert report.checksums_verified == len(stored_names(Manifest.load(keyword_kept)))
    copy = tmp_path / "corrupt"
    shutil.copytree(keyword_kept, copy)
    t = torch.load(copy / "steering_keyword_weighted.pt", weights_only=True)
    t.view(-1)[5] += 1
    torch.save(t, copy / "steering_keyword_weighted.pt")
    assert jasper.validate(copy).ok  # still finite, right shape: only the checksum knows
    with pytest.raises(ChecksumError, match="steering_keyword_weighted"):
        jasper.validate(copy, deep=True)
    t.view(-1)[5] = float("nan")
    torch.save(t, copy / "steering_keyword_weighted.pt")
    with pytest.raises(IntegrityError, match="steering_keyword_weighted"):
        jasper.validate(copy)


# --- CLI --------------------------------------------------------------------------------------
def test_cli_synth_keeps_the_named_variants(tmp_path: Path, stored: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(["synth", str(out), "--pairs", str(N), "--dim", str(D), "--clusters", "4",
                 "--seed", "7", "--derived-steering", "--keep-steering", "residual",
                 "--keep-steering", "keyword", "--backend", "pt", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    m = Manifest.load(out)
    assert m.derived_steering is not None
    assert m.derived_steering["stored_variants"] == ["keyword", "residual"]
    code = main(["synth", str(tmp_path / "comma"), "--pairs", "64", "--dim", str(D),
                 "--derived-steering", "--keep-steering", "keyword,centroid", "--backend", "pt",
                 "--no-progress"])
    assert code == 0
    assert Manifest.load(tmp_path / "comma").derived_steering["stored_variants"] == [
        "centroid", "keyword"]


@pytest.mark.parametrize(("argv", "match"), [
    (["--derived-steering", "--keep-steering", "kw"], "'kw' is not a steering variant"),
    (["--keep-steering", "keyword"], "needs --derived-steering"),
    (["--derived-steering", "--keep-steering", "keyword,keyword"], "named twice"),
    (["--derived-steering", "--keep-steering", "centroid,keyword,residual"], "all three"),
])
def test_cli_synth_bad_keep_values_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        match: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["synth", str(tmp_path / "x"), "--pairs", "64", "--dim", str(D), *argv,
              "--no-progress"])
    err = capsys.readouterr().err + str(info.value.code)
    assert info.value.code != 0 and match in err and "Traceback" not in err
    assert "--keep-steering" in err
    assert not (tmp_path / "x").exists()


def test_cli_convert_keep_steering(stored: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", str(stored), str(tmp_path / "d"), "--to", "pt",
                 "--derive-steering", "--keep-steering", "keyword", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "0 of 480 stored rows kept as exceptions" in out
    assert "kept stored, copied: keyword" in out
    with pytest.raises(SystemExit) as info:
        main(["convert", str(stored), str(tmp_path / "e"), "--to", "pt", "--keep-steering",
              "keyword", "--no-progress"])
    assert "needs --derive-steering" in str(info.value.code)


# --- jasper.build -----------------------------------------------------------------------------
def test_build_keeps_the_named_variants_with_the_stored_bits(tmp_path: Path,
                                                             stored: Path) -> None:
    """A build with ``keep_steering`` writes the kept array exactly as the stored build does
    (the same kernel) and serves the stored build's batches."""
    from jasper.build import BuildConfig, BuildError, build_dataset

    with jasper.JASPERSteeringDataset(stored, "train") as s:
        tables = {n: s.tables.arrays[n].numpy() for n in ("question_embs", "source_embs",
                                                         "pair_index")}
    out = {}
    for name, cfg in (("stored", BuildConfig(n_neg=4, n_clusters=3, seed=1)),
                      ("partial", BuildConfig(n_neg=4, n_clusters=3, seed=1,
                                              derived_steering=True,
                                              keep_steering=("residual",)))):
        out[name] = build_dataset(tmp_path / name, tables["question_embs"],
                                  tables["source_embs"], tables["pair_index"], config=cfg,
                                  progress=False)
    m = Manifest.load(out["partial"])
    assert m.derived_steering is not None
    assert m.derived_steering["stored_variants"] == ["residual"]
    assert m.arrays["steering_residual"].checksum == \
        Manifest.load(out["stored"]).arrays["steering_residual"].checksum
    assert "steering_residual" in m.extra["build"]["derived"]
    assert "steering_centroid" not in m.extra["build"]["derived"]
    for use_mmap in (False, True):
        _same_batches(out["stored"], out["partial"], use_mmap=use_mmap)
    with pytest.raises(BuildError, match="needs derived_steering"):
        BuildConfig(keep_steering=("keyword",))
    with pytest.raises(BuildError, match="keep_steering: 'bogus' is not a steering variant"):
        BuildConfig(derived_steering=True, keep_steering=("bogus",))
