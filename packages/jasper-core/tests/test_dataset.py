"""JASPERSteeringDataset: parity with the original's per-item computation, modes, errors."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.multiprocessing  # registers the tensor-sharing reductions of ForkingPickler
from torch.utils.data import DataLoader, Subset, default_collate

import jasper.dataset as dataset_mod
from jasper.backend import Capabilities
from jasper.curriculum import VARIANT_NAMES, curriculum_from_manifest, draw_variants
from jasper.dataset import BATCH_KEYS, JasperBatch, JASPERSteeringDataset
from jasper.errors import (
    CapabilityError,
    DatasetNotFoundError,
    IntegrityError,
    JasperError,
    ShapeError,
    SplitNotFoundError,
    UnknownVariantError,
)
from jasper.registry import list_backends, register_backend, unregister_backend
from jasper.store import write_store
from jasper.testing.data import make_arrays, write_seed_dataset
from jasper.testing.reference import ReferenceSteeringDataset
from jasper_pt.backend import PTBackend

FLOAT_KEYS = ("question_emb", "target_source_emb", "steering", "negative_embs")


class RowsOnlyPT(PTBackend):
    """The PT format behind a backend that cannot map but reads single rows (like HDF5)."""

    name: ClassVar[str] = "test-rows-pt"
    capabilities: ClassVar[Capabilities] = Capabilities(mmap=False, row_access=True)
    marker_files: ClassVar[tuple[str, ...]] = ()


class WholeOnlyPT(PTBackend):
    """The PT format behind a backend that can only read whole arrays."""

    name: ClassVar[str] = "test-whole-pt"
    capabilities: ClassVar[Capabilities] = Capabilities(mmap=False, row_access=False)
    marker_files: ClassVar[tuple[str, ...]] = ()


@pytest.fixture(scope="module", autouse=True)
def _test_backends() -> Iterator[None]:
    register_backend(RowsOnlyPT.name, RowsOnlyPT, force=True)
    register_backend(WholeOnlyPT.name, WholeOnlyPT, force=True)
    yield
    unregister_backend(RowsOnlyPT.name)
    unregister_backend(WholeOnlyPT.name)


# (storage_format, use_mmap) -> expected mode
MODES = [("pt", False, "preload"), ("pt", True, "mmap"), (RowsOnlyPT.name, True, "rows")]


def _open(path: Path, fmt: str, mmap: bool, split: str = "train", **kw: object
          ) -> JASPERSteeringDataset:
    return JASPERSteeringDataset(path, split, storage_format=fmt, use_mmap=mmap, **kw)  # type: ignore[arg-type]


def _expected(path: Path, split: str, variant: str | None, epoch: int = 0,
              positions: list[int] | None = None) -> dict[str, torch.Tensor]:
    ref = ReferenceSteeringDataset(path, split, forced=variant, epoch=epoch)
    idx = positions if positions is not None else list(range(len(ref)))
    return default_collate([ref[i] for i in idx])


def _assert_parity(batch: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(batch) == list(BATCH_KEYS)
    for key in BATCH_KEYS:
        want = expected[key].to(batch[key].dtype)
        assert torch.equal(batch[key], want), f"{key} differs from the reference"


# --- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "mmap", "mode"), MODES)
@pytest.mark.parametrize("variant", [*VARIANT_NAMES, None])
def test_batches_equal_the_per_item_reference(small_dataset: Path, fmt: str, mmap: bool,
                                              mode: str, variant: str | None) -> None:
    with _open(small_dataset, fmt, mmap, split="val") as ds:
        assert ds.mode == mode
        ds.force_steering(variant)
        positions = [5, 0, 17, 5, len(ds) - 1, 3]  # any order, repeats allowed
        batch = ds.__getitems__(positions)
        _assert_parity(batch, _expected(small_dataset, "val", variant, positions=positions))
        # the whole split through a plain DataLoader with the default collate path
        whole = next(iter(DataLoader(ds, batch_size=len(ds))))
        _assert_parity(whole, _expected(small_dataset, "val", variant))
        # single items: the batch keys without the leading dimension
        item = ds[17]
        ref_item = ReferenceSteeringDataset(small_dataset, "val", forced=variant)[17]
        for key in BATCH_KEYS:
            assert item[key].shape == ref_item[key].shape
            assert torch.equal(item[key], ref_item[key].to(item[key].dtype))


def test_parity_on_a_dataset_the_original_wrote(tmp_path: Path) -> None:
    """Seed-era layout (list-of-lists keyword ids, linear curriculum, seed's config keys)."""
    path = write_seed_dataset(tmp_path / "seed", n_pairs=80, embedding_dim=8, tier_dtype="int8")
    with JASPERSteeringDataset(path, "train") as ds:
        assert ds.curriculum.kind == "linear"
        assert ds.seed == 0  # the seed's config has no random_seed
        for variant in (*VARIANT_NAMES, None):
            ds.force_steering(variant)
            _assert_parity(ds.__getitems__(list(range(len(ds)))),
                           _expected(path, "train", variant))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tables_and_narrow_tiers(tmp_path: Path, dtype: str) -> None:
    arrays, manifest = make_arrays(n_pairs=60, embedding_dim=8, dtype=dtype, tier_dtype="int8")
    path = write_store(tmp_path / dtype, arrays, manifest, backend="pt")
    with JASPERSteeringDataset(path, "train") as ds:
        ds.force_steering("zero")
        b = ds.__getitems__([0, 1, 2])
        for key in FLOAT_KEYS:
            assert b[key].dtype == getattr(torch, dtype), key
        assert not b["steering"].any()
        assert b["negative_tiers"].dtype == torch.int64
        assert b["relevance"].dtype == b["centroid_distance"].dtype == torch.float32
        ds.force_steering(None)
        _assert_parity(ds.__getitems__(list(range(len(ds)))), _expected(path, "train", None))


def test_shapes_and_dtypes_are_the_documented_ones(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "train") as ds:
        d, k = ds.embedding_dim, ds.n_neg
        b = ds.__getitems__(list(range(7)))
        assert isinstance(b, JasperBatch)
        want = {
            "question_emb": ((7, d), torch.float32), "target_source_emb": ((7, d), torch.float32),
            "steering": ((7, d), torch.float32), "negative_embs": ((7, k, d), torch.float32),
            "cluster_id": ((7,), torch.int64), "relevance": ((7,), torch.float32),
            "centroid_distance": ((7,), torch.float32), "steering_variant": ((7,), torch.int64),
            "negative_tiers": ((7, k), torch.int64),
        }
        assert {key: (tuple(v.shape), v.dtype) for key, v in b.items()} == want
        item = ds[0]
        assert {key: tuple(v.shape) for key, v in item.items()} == {
            key: shape[1:] for key, (shape, _) in want.items()}


def test_unforced_variants_are_the_pure_draw(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "train", epoch=12, seed=99) as ds:
        pids = ds.split_indices
        expect = draw_variants(pids, 12, 99, curriculum_from_manifest(ds.manifest))
        assert torch.equal(ds.__getitems__(list(range(len(ds))))["steering_variant"], expect)
        ds.set_epoch(13)
        assert ds.current_epoch == 13
        expect13 = draw_variants(pids, 13, 99, ds.curriculum)
        got = ds.__getitems__(torch.arange(len(ds)).flip(0))["steering_variant"]
        assert torch.equal(got, expect13.flip(0))


# --- curriculum controls --------------------------------------------------------------------
def test_force_steering_names_aliases_and_errors(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "val") as ds:
        for name, vid in (("none", 0), ("keyword_weighted", 2), ("residual", 3), (1, 1)):
            ds.force_steering(name)
            assert set(ds.__getitems__(list(range(20)))["steering_variant"].tolist()) == {vid}
        with pytest.raises(UnknownVariantError) as info:
            ds.force_steering("random")
        assert isinstance(info.value, ValueError)
        assert ds.forced_variant == "centroid"  # a failed call changes nothing
        ds.force_steering(None)
        assert ds.forced_variant is None


def test_get_steering_stats(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "train", epoch=25) as ds:
        stats = ds.get_steering_stats()
        assert stats["epoch"] == 25
        assert stats["probs"] == [0.3, 0.3, 0.25, 0.15]
        assert stats["variant_names"] == ["zero", "centroid", "keyword", "residual"]
        assert stats["forced"] is None and stats["curriculum"] == "step"
        ds.set_epoch(41)
        assert ds.get_steering_stats()["probs"] == [0.0, 0.2, 0.4, 0.4]
        assert ds.steering_probs == {"zero": 0.0, "centroid": 0.2, "keyword": 0.4,
                                     "residual": 0.4}


# --- subsets --------------------------------------------------------------------------------
def test_subset_by_cluster(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "train") as ds:
        clusters = ds.pair_cluster_id[ds.split_indices]
        sub = ds.subset_by_cluster([1, 3])
        assert isinstance(sub, Subset)
        assert len(sub) == int(((clusters == 1) | (clusters == 3)).sum()) > 0
        got = torch.cat([b["cluster_id"] for b in DataLoader(sub, batch_size=64)])
        assert len(got) == len(sub) and set(got.tolist()) == {1, 3}
        first = sub[0]
        assert int(first["cluster_id"]) in (1, 3)
        assert len(ds.subset_by_cluster(torch.tensor([99]))) == 0


# --- storage modes --------------------------------------------------------------------------
def test_mmap_mode_holds_maps_not_copies(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "train", use_mmap=True) as mapped, \
            JASPERSteeringDataset(small_dataset, "train", use_mmap=False) as loaded:
        assert mapped.memory_bytes() == 0
        assert loaded.memory_bytes() >= sum(
            t.numel() * t.element_size() for t in (loaded.source_embs, loaded.steering_residual))
        # the three preloaded steering arrays are views of one table with a zero row first
        table = loaded.steering_table
        assert table is not None and mapped.steering_table is None
        assert table.shape[0] == 1 + 3 * loaded.n_pairs and not table[0].any()
        assert loaded.steering_keyword_weighted.untyped_storage().data_ptr() == \
            table.untyped_storage().data_ptr()


def test_use_mmap_none_decides_by_available_memory(small_dataset: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with JASPERSteeringDataset(small_dataset, "val") as ds:
        assert ds.mode == "preload" and not ds.use_mmap
    monkeypatch.setattr(dataset_mod, "available_memory", lambda: 1024)
    with JASPERSteeringDataset(small_dataset, "val") as ds:
        assert ds.mode == "mmap" and ds.use_mmap
    with JASPERSteeringDataset(small_dataset, "val", storage_format=RowsOnlyPT.name) as ds:
        assert ds.mode == "rows"
    with pytest.warns(ResourceWarning, match="neither map nor read rows"), \
            JASPERSteeringDataset(small_dataset, "val", storage_format=WholeOnlyPT.name) as ds:
        assert ds.mode == "preload"


def test_available_memory_reads_the_system() -> None:
    assert 0 < dataset_mod.available_memory() < 1 << 50


def test_mmap_on_a_backend_that_cannot_map_or_read_rows(small_dataset: Path) -> None:
    with pytest.raises(CapabilityError, match="use_mmap=False"):
        JASPERSteeringDataset(small_dataset, "val", storage_format=WholeOnlyPT.name,
                              use_mmap=True)
    with JASPERSteeringDataset(small_dataset, "val", storage_format=WholeOnlyPT.name,
                               use_mmap=False) as ds:
        assert ds.mode == "preload"


@pytest.mark.parametrize(("fmt", "mmap", "mode"), MODES)
def test_pickled_dataset_serves_the_same_batches(small_dataset: Path, fmt: str, mmap: bool,
                                                 mode: str) -> None:
    """What a spawned worker receives: mapped and lazy datasets ship paths, not data."""
    with _open(small_dataset, fmt, mmap) as ds:
        blob = bytes(ForkingPickler.dumps(ds))  # how DataLoader ships it to a spawned worker
        if mode != "preload":
            assert len(blob) < 64 * 1024
        clone = pickle.loads(blob)
        ds.set_epoch(30)  # the control tensor is shared with the clone
        idx = list(range(0, len(ds), 7))
        a, b = ds.__getitems__(idx), clone.__getitems__(idx)
        for key in BATCH_KEYS:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif("hdf5" not in list_backends(), reason="jasper-hdf5 is not installed")
def test_every_installed_backend_serves_the_same_batches(small_dataset: Path,
                                                         tmp_path: Path) -> None:
    from jasper.store import convert

    with JASPERSteeringDataset(small_dataset, "test") as base:
        expect = base.__getitems__(list(range(len(base))))
    for name, info in list_backends().items():
        if name.startswith("test-"):
            continue
        from jasper.registry import get_backend

        if not get_backend(name).capabilities.write:
            continue
        out = convert(small_dataset, tmp_path / name, to=name).dst
        for mmap in (False, True):
            with JASPERSteeringDataset(out, "test", use_mmap=mmap) as ds:
                assert ds.storage_format == name, info
                got = ds.__getitems__(list(range(len(ds))))
                for key in BATCH_KEYS:
                    assert torch.equal(got[key], expect[key]), (name, mmap, key)


# --- errors ---------------------------------------------------------------------------------
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        JASPERSteeringDataset(tmp_path / "nowhere", "train")


def test_missing_split_is_a_value_error_listing_the_splits(small_dataset: Path) -> None:
    with pytest.raises(SplitNotFoundError, match="available splits: test, train, val") as info:
        JASPERSteeringDataset(small_dataset, "validation")
    assert isinstance(info.value, ValueError)


def test_failed_integrity_check_names_array_row_and_rule(
        small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    neg = torch.load(path / "hard_negatives.pt")
    n_s = torch.load(path / "source_embs.pt").shape[0]
    neg[15, 2] = n_s + 5
    torch.save(neg, path / "hard_negatives.pt")
    for mmap in (False, True):
        with pytest.raises(IntegrityError, match=rf"hard_negatives\[15, 2\] = {n_s + 5}") as info:
            JASPERSteeringDataset(path, "train", use_mmap=mmap)
        assert isinstance(info.value, ValueError)
        assert info.value.array == "hard_negatives" and info.value.row == 15


def test_non_finite_steering_fails_in_every_mode(small_dataset: Path,
                                                 copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    st = torch.load(path / "steering_residual.pt")
    st[33, 4] = float("nan")
    torch.save(st, path / "steering_residual.pt")
    for fmt, mmap, _ in MODES:
        with pytest.raises(IntegrityError, match=r"steering_residual\[33, 4\] = nan"):
            _open(path, fmt, mmap)


def test_missing_array(small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    (path / "centroid_distances.pt").unlink()
    with pytest.raises(IntegrityError, match="centroid_distances"):
        JASPERSteeringDataset(path, "train")


def test_index_errors(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "val") as ds:
        n = len(ds)
        for bad in (n, -1):
            with pytest.raises(IndexError, match=str(bad)):
                ds[bad]
        with pytest.raises(IndexError, match=str(n + 3)):
            ds.__getitems__([0, n + 3, 1])


def test_closed_dataset(small_dataset: Path) -> None:
    ds = JASPERSteeringDataset(small_dataset, "val")
    with ds:
        ds.__getitems__([0])
    with pytest.raises(JasperError, match="closed"):
        ds.__getitems__([0])
    ds.close()  # idempotent


# --- reloading negatives --------------------------------------------------------------------
def _remine(path: Path, shift: int = 1) -> torch.Tensor:
    """Replace the dataset's negatives with new ones, atomically (as a re-miner would)."""
    from jasper.store import open_store

    with open_store(path) as r:
        arrays = {n: r.read(n) for n in r.array_names()}
        manifest = r.manifest
    n_s = arrays["source_embs"].shape[0]
    arrays["hard_negatives"] = (arrays["hard_negatives"] + shift) % n_s
    arrays["negative_tiers"] = torch.flip(arrays["negative_tiers"], dims=[1]).contiguous()
    write_store(path, arrays, manifest, backend="pt", overwrite=True)
    return arrays["hard_negatives"]


@pytest.mark.parametrize(("fmt", "mmap", "mode"), MODES)
def test_reload_negatives(small_dataset: Path, copy_dataset: Callable[[Path], Path], fmt: str,
                          mmap: bool, mode: str) -> None:
    path = copy_dataset(small_dataset)
    with _open(path, fmt, mmap) as ds:
        before = ds.__getitems__([0, 1, 2])["negative_embs"].clone()
        new_neg = _remine(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a shifted negative may hit the pair's own source
            ds.reload_negatives()
        after = ds.__getitems__([0, 1, 2])
        assert not torch.equal(before, after["negative_embs"])
        _assert_parity(after, _expected(path, "train", None, positions=[0, 1, 2]))
        assert torch.equal(ds.hard_negatives, new_neg)


def test_reload_rejects_bad_negatives_and_keeps_the_old(
        small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    with JASPERSteeringDataset(path, "train") as ds:
        old = ds.hard_negatives.clone()
        neg = torch.load(path / "hard_negatives.pt")
        neg[7, 1] = -3
        torch.save(neg, path / "hard_negatives.pt")
        with pytest.raises(IntegrityError, match=r"hard_negatives\[7, 1\] = -3"):
            ds.reload_negatives()
        torch.save(neg[:, :2].contiguous(), path / "hard_negatives.pt")
        with pytest.raises(ShapeError, match="hard_negatives"):
            ds.reload_negatives()
        assert torch.equal(ds.hard_negatives, old)


# --- flat memory ----------------------------------------------------------------------------
def _python_elements(value: object, depth: int = 0) -> int:
    """Number of elements in Python containers reachable from ``value`` (tensors count 0)."""
    if depth > 4 or isinstance(value, torch.Tensor | str | bytes):
        return 0
    if isinstance(value, dict):
        return len(value) + sum(_python_elements(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return len(value) + sum(_python_elements(v, depth + 1) for v in value)
    return 0


def test_only_flat_tensors_are_held(small_dataset: Path) -> None:
    """No per-sample Python objects: forked workers must not copy pages as they read."""
    for mmap in (False, True):
        with JASPERSteeringDataset(small_dataset, "train", use_mmap=mmap) as ds:
            n = len(ds)
            assert n > 1000
            total = sum(_python_elements(v)
                        for v in (*vars(ds).values(), *vars(ds.tables).values()))
            assert total < 300, f"{total} Python container elements for {n} samples"
            for name in ("question_embs", "source_embs", "hard_negatives", "split_indices"):
                assert getattr(ds, name).is_contiguous(), name
