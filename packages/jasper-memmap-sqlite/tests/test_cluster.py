"""ClusterLabeledDataset on memmap-sqlite datasets: items, batches, lookups, crash-safe label
updates, the writer."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jasper
from jasper.errors import IntegrityError, ShapeError
from jasper.validation import validate
from jasper_memmap_sqlite import (
    ClusterLabeledDataset,
    write_cluster_labeled,
    write_synthetic_cluster_labeled,
)
from jasper_memmap_sqlite.cluster import SampleNotFoundError

META_KEYS = {"sample_id", "sample_type", "text", "chroma_id", "suggestions", "steering_mode",
             "source_label", "steering_label", "combined_label"}


def _expected(path: Path, label_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.load(path / "embedding_idx.npy")
    return (np.load(path / "base_embeddings.npy")[idx],
            np.load(path / "steering_embeddings.npy")[idx],
            np.load(path / f"{label_type}_labels.npy"))


def test_importable_from_jasper() -> None:
    assert jasper.ClusterLabeledDataset is ClusterLabeledDataset


def test_the_class_is_cores_and_needs_no_import_of_this_package() -> None:
    code = ("import sys; sys.modules['jasper_memmap_sqlite'] = None\n"
            "from jasper import ClusterLabeledDataset\n"
            "print('OK', ClusterLabeledDataset.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "OK jasper.cluster_dataset" in out.stdout, out


@pytest.mark.parametrize("label_type", ["source", "steering", "combined"])
def test_items_are_exactly_the_stored_rows(cluster_dir: Path, label_type: str) -> None:
    base, steering, labels = _expected(cluster_dir, label_type)
    with ClusterLabeledDataset(cluster_dir, label_type=label_type) as ds:
        assert len(ds) == 300 and ds.embedding_dim == 16 and ds.n_clusters == 6
        for i in (0, 7, 299):
            item = ds[i]
            assert len(item) == 3
            assert torch.equal(item[0], torch.from_numpy(base[i]))
            assert torch.equal(item[1], torch.from_numpy(steering[i]))
            assert torch.equal(item[2], torch.from_numpy(labels[i]))
        with pytest.raises(IndexError):
            ds[300]
        with pytest.raises(IndexError):
            ds[-1]


def test_metadata_item_has_exactly_the_documented_keys(cluster_dir: Path) -> None:
    with ClusterLabeledDataset(cluster_dir, return_metadata=True) as ds:
        _base, _steering, label, meta = ds[10]
        assert set(meta) == META_KEYS
        assert meta["sample_id"] == 11 and meta["chroma_id"] == "syn-10"
        assert meta["sample_type"] in ("source", "question")
        assert isinstance(meta["suggestions"], list)
        assert torch.equal(meta["combined_label"], label)
        row = ds.get_sample_by_id(11)
        assert row is not None and row["text"] == meta["text"]
        assert row["embedding_idx"] == 10
        np.testing.assert_array_equal(row["source_label"], meta["source_label"].numpy())
        assert ds.get_sample_by_id(10_000) is None


@settings(max_examples=25, deadline=None)
@given(indices=st.lists(st.integers(0, 299), min_size=1, max_size=64))
def test_getitems_equals_stacked_items(cluster_dir: Path, indices: list[int]) -> None:
    with ClusterLabeledDataset(cluster_dir, return_metadata=True, cache_size=16) as ds:
        base, steering, label, meta = ds.__getitems__(indices)
        assert base.shape == (len(indices), 16) and label.shape == (len(indices), 6)
        items = [ds[i] for i in indices]
        assert torch.equal(base, torch.stack([it[0] for it in items]))
        assert torch.equal(steering, torch.stack([it[1] for it in items]))
        assert torch.equal(label, torch.stack([it[2] for it in items]))
        assert meta["text"] == [it[3]["text"] for it in items]
        assert meta["sample_id"] == [it[3]["sample_id"] for it in items]
        assert torch.equal(meta["source_label"], torch.stack([it[3]["source_label"]
                                                              for it in items]))


def test_mmap_modes_serve_the_same_data(cluster_dir: Path) -> None:
    ref = ClusterLabeledDataset(cluster_dir).__getitems__(list(range(0, 300, 7)))
    for mode in ("c", None):
        got = ClusterLabeledDataset(cluster_dir, mmap_mode=mode).__getitems__(
            list(range(0, 300, 7)))
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
    for bad in ("r+", "w+"):
        with pytest.raises(ValueError, match="refused"):
            ClusterLabeledDataset(cluster_dir, mmap_mode=bad)
    with pytest.raises(ValueError, match="label_type"):
        ClusterLabeledDataset(cluster_dir, label_type="both")


def test_cache_counts_hits_misses_and_evicts(cluster_dir: Path) -> None:
    with ClusterLabeledDataset(cluster_dir, return_metadata=True, cache_size=10) as ds:
        ds.__getitems__(list(range(10)))
        ds.__getitems__(list(range(10)))
        s = ds.get_cache_stats()
        assert (s["cache_hits"], s["cache_misses"], s["cache_size"]) == (10, 10, 10)
        assert s["hit_rate"] == 0.5 and s["max_cache_size"] == 10
        ds.__getitems__(list(range(10, 15)))  # evicts the 5 least recently used
        ds.__getitems__(list(range(5, 10)))
        assert ds.get_cache_stats()["cache_hits"] == 15
        ds.clear_cache()
        assert ds.get_cache_stats()["cache_size"] == 0
        assert ds.prefill_cache(range(100, 120)) == 10
        before = ds.get_cache_stats()
        assert before["total_accesses"] == 30  # prefill is not an access
        ds.__getitems__(list(range(110, 120)))
        assert ds.get_cache_stats()["cache_hits"] == before["cache_hits"] + 10
        ds.reset_cache_stats()
        assert ds.get_cache_stats()["total_accesses"] == 0
    with ClusterLabeledDataset(cluster_dir, return_metadata=True, cache_size=0) as ds:
        ds.__getitems__([1, 1, 2])
        assert ds.get_cache_stats()["cache_misses"] == 3
        assert ds.prefill_cache() == 0


def test_update_labels_persists_logs_and_invalidates(cluster_copy: Path) -> None:
    new = np.zeros(6, np.float32)
    new[2] = 1.0
    with ClusterLabeledDataset(cluster_copy, return_metadata=True, label_type="source") as ds:
        ds.prefill_cache([4])
        assert 4 in ds._cache
        old = ds.get_sample_by_id(5)
        assert old is not None
        ds.update_labels(5, source_label=new, combined_label=torch.from_numpy(new))
        assert 4 not in ds._cache  # the cached metadata row (item 4) was dropped
        assert torch.equal(ds[4][2], torch.from_numpy(new))
        np.testing.assert_array_equal(ds.get_sample_by_id(5)["steering_label"],
                                      old["steering_label"])
        ds.update_labels(5)  # nothing to change is a no-op
    with ClusterLabeledDataset(cluster_copy, label_type="combined") as ds:  # a fresh open
        assert torch.equal(ds[4][2], torch.from_numpy(new))
    conn = sqlite3.connect(cluster_copy / "catalogue.db")
    hist = conn.execute("SELECT note, changes FROM row_history ORDER BY id").fetchall()
    journal = conn.execute("SELECT count(*) FROM row_journal").fetchone()[0]
    conn.close()
    assert len(hist) == 1  # one call, one change, both label types in it
    assert json.loads(hist[0][0]) == {"change": "update_labels", "sample_id": 5}
    assert json.loads(hist[0][1]) == {"combined_labels": [4], "source_labels": [4]}
    assert journal == 0 and not (cluster_copy / "rows.pending").exists()
    report = validate(cluster_copy, deep=True)  # manifest and block checksums were updated
    assert report.ok and report.checksums_verified == 17


def test_update_labels_rejects_bad_input_and_changes_nothing(cluster_copy: Path) -> None:
    with ClusterLabeledDataset(cluster_copy) as ds:
        before = ds[0][2].clone()
        with pytest.raises(ShapeError) as e:
            ds.update_labels(1, combined_label=np.ones(5))
        assert e.value.row == 1 and "n_clusters" in (e.value.rule or "")
        assert str(cluster_copy) in str(e.value)
        with pytest.raises(ShapeError, match="NaN"):
            ds.update_labels(1, combined_label=np.full(6, np.nan))
        with pytest.raises(SampleNotFoundError, match="sample_id 999"):
            ds.update_labels(999, combined_label=np.ones(6))
        with pytest.raises(KeyError):  # the original's callers may catch KeyError
            ds.update_labels(0, combined_label=np.ones(6))
        assert torch.equal(ds[0][2], before)


def test_failed_commit_restores_the_label_and_its_checksums(cluster_copy: Path) -> None:
    from jasper_memmap_sqlite.cluster_rows import RowWriteError

    conn = sqlite3.connect(cluster_copy / "catalogue.db")
    # fails after the label rows and config.json were written: both must be restored
    conn.execute("CREATE TRIGGER fail BEFORE INSERT ON row_history BEGIN "
                 "SELECT RAISE(ABORT, 'injected failure'); END")
    conn.commit()
    with ClusterLabeledDataset(cluster_copy) as ds:
        before = ds[3][2].clone()
        with pytest.raises(RowWriteError, match="injected failure"):
            ds.update_labels(4, source_label=np.ones(6), combined_label=np.ones(6))
        assert torch.equal(ds[3][2], before)
    assert torch.equal(torch.from_numpy(np.load(cluster_copy / "combined_labels.npy")[3]), before)
    assert conn.execute("SELECT count(*) FROM row_history").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM row_journal").fetchone()[0] == 0
    conn.execute("DROP TRIGGER fail")
    conn.commit()
    conn.close()
    assert validate(cluster_copy, deep=True).ok


def test_labels_of_a_backend_without_row_writes_name_the_ones_with_them(tmp_path: Path) -> None:
    p = write_synthetic_cluster_labeled(tmp_path / "pt", n_samples=20, embedding_dim=4,
                                        n_clusters=3, backend="pt")
    with ClusterLabeledDataset(p) as ds, pytest.raises(jasper.errors.CapabilityError,
                                                       match="memmap-sqlite"):
        ds.update_labels(1, combined_label=np.ones(3))


# --- the writer ---------------------------------------------------------------------------------
def _arrays(n: int = 20, m: int = 20, d: int = 4, c: int = 3) -> dict:
    rng = np.random.default_rng(0)
    lab = rng.dirichlet(np.ones(c), n).astype(np.float32)
    return dict(base_embeddings=rng.standard_normal((m, d)).astype(np.float32),
                steering_embeddings=torch.randn(m, d),
                source_labels=lab, steering_labels=lab, combined_labels=torch.from_numpy(lab),
                sample_type=["source"] * n, text=[f"t{i}" for i in range(n)])


def test_writer_round_trip_with_custom_ids_and_indices(tmp_path: Path) -> None:
    a = _arrays(n=5, m=8)
    p = write_cluster_labeled(tmp_path / "w", **a, sample_ids=[3, 9, 10, 20, 21],
                              embedding_idx=[7, 0, 0, 2, 1], chroma_id=["a", None, "c", "d", "e"])
    with ClusterLabeledDataset(p, return_metadata=True) as ds:
        assert len(ds) == 5 and ds.embedding_dim == 4 and ds.n_clusters == 3
        b, _, lab, meta = ds.__getitems__([0, 1, 4])
        assert torch.equal(b, torch.from_numpy(a["base_embeddings"][[7, 0, 1]]))
        assert meta["sample_id"] == [3, 9, 21] and meta["chroma_id"] == ["a", None, "e"]
        assert torch.equal(lab, a["combined_labels"][[0, 1, 4]])
    assert validate(p, deep=True).checksums_verified == 17
    with pytest.raises(jasper.store.DatasetExistsError):
        write_cluster_labeled(p, **a)


@pytest.mark.parametrize("change, error, rule", [
    ({"source_labels": np.ones((20, 4), np.float32)}, ShapeError, "columns"),
    ({"embedding_idx": [0] * 19 + [20]}, IntegrityError, "0 <= embedding_idx < embedding rows"),
    ({"sample_ids": list(range(10)) + list(range(5, 15))}, IntegrityError,
     "sample ids strictly increase"),
    ({"sample_type": ["source"] * 19 + ["answer"]}, IntegrityError, "sample_type choices"),
    ({"steering_embeddings": torch.randn(19, 4)}, ShapeError, "same shape"),
    ({"steering_embeddings": torch.randn(20, 5)}, ShapeError, "columns"),
])
def test_writer_rejects_bad_input_atomically(tmp_path: Path, change: dict, error: type,
                                             rule: str) -> None:
    a = {**_arrays(), **change}
    with pytest.raises(error) as e:
        write_cluster_labeled(tmp_path / "bad", **a)
    assert rule in (e.value.rule or "")
    assert list(tmp_path.iterdir()) == []  # no dataset, no temporary directory


def test_writer_rejects_non_finite_labels_and_leaves_nothing(tmp_path: Path) -> None:
    a = _arrays()
    a["steering_labels"] = a["source_labels"].copy()
    a["steering_labels"][13, 2] = np.inf
    with pytest.raises(IntegrityError) as e:
        write_cluster_labeled(tmp_path / "bad", **a)
    assert e.value.row == 13 and e.value.array == "steering_labels"
    assert list(tmp_path.iterdir()) == []


def test_synthetic_is_deterministic_and_overwrites(tmp_path: Path) -> None:
    p1 = write_synthetic_cluster_labeled(tmp_path / "a", n_samples=50, embedding_dim=8,
                                         n_clusters=3, seed=5)
    p2 = write_synthetic_cluster_labeled(tmp_path / "b", n_samples=50, embedding_dim=8,
                                         n_clusters=3, seed=5)
    for f in ("base_embeddings.npy", "combined_labels.npy"):
        np.testing.assert_array_equal(np.load(p1 / f), np.load(p2 / f))
    lab = np.load(p1 / "source_labels.npy")
    np.testing.assert_allclose(lab.sum(1), 1.0, rtol=1e-5)
    write_synthetic_cluster_labeled(p1, n_samples=10, embedding_dim=8, n_clusters=3,
                                    overwrite=True)
    assert len(ClusterLabeledDataset(p1)) == 10


# --- bad datasets -------------------------------------------------------------------------------
def test_truncated_embeddings_name_the_file(cluster_copy: Path) -> None:
    f = cluster_copy / "steering_embeddings.npy"
    with open(f, "r+b") as fh:
        fh.truncate(4096 + 16 * 4 * 120 + 9)
    with pytest.raises(jasper.errors.JasperError) as e:
        ClusterLabeledDataset(cluster_copy)
    assert "steering_embeddings" in str(e.value)


def test_label_matrix_of_the_wrong_width(cluster_copy: Path) -> None:
    m = json.loads((cluster_copy / "config.json").read_text())
    m["n_clusters"] = 7
    (cluster_copy / "config.json").write_text(json.dumps(m))
    with pytest.raises(ShapeError, match="n_clusters is 7") as e:
        ClusterLabeledDataset(cluster_copy)
    assert e.value.array == "source_labels" and e.value.rule == "columns"


def test_embedding_index_out_of_range(cluster_copy: Path) -> None:
    idx = np.load(cluster_copy / "embedding_idx.npy", mmap_mode="r+")
    idx[42] = 300
    idx.flush()
    del idx
    with pytest.raises(IntegrityError) as e:
        ClusterLabeledDataset(cluster_copy)
    assert e.value.row == 42 and "sample_id 43" in str(e.value)
    assert e.value.path == cluster_copy


def test_corrupted_array_fails_deep_validation(cluster_copy: Path) -> None:
    with open(cluster_copy / "base_embeddings.npy", "r+b") as fh:
        fh.seek(4096 + 64 * 10)
        fh.write(b"\x00\x00\x00\x00")
    assert validate(cluster_copy, deep=False).ok
    with pytest.raises(jasper.errors.ChecksumError) as e:
        validate(cluster_copy, deep=True)
    assert e.value.array == "base_embeddings"


def test_not_a_dataset(cluster_copy: Path) -> None:
    (cluster_copy / "catalogue.db").write_text("id,text\n1,hello\n")
    with pytest.raises(jasper.errors.FormatError, match="not a SQLite database"):
        ClusterLabeledDataset(cluster_copy)
    with pytest.raises(jasper.errors.DatasetNotFoundError):
        ClusterLabeledDataset(cluster_copy / "nowhere")


def test_a_steering_dataset_is_not_cluster_labeled(store_dir: Path) -> None:
    with pytest.raises(jasper.errors.FormatError, match="'jasper-steering' dataset"):
        ClusterLabeledDataset(store_dir)


def test_plain_dataloader_from_the_original_readme_works(tmp_path) -> None:
    """`DataLoader(dataset, batch_size=32, shuffle=True)` with the default collate, exactly as
    the original README shows, yields (base, steering, label) batches of plain tensors."""
    import torch
    from torch.utils.data import DataLoader

    from jasper import ClusterLabeledDataset
    from jasper_memmap_sqlite import write_synthetic_cluster_labeled

    path = write_synthetic_cluster_labeled(tmp_path / "cl", n_samples=100, embedding_dim=8,
                                           n_clusters=3, seed=1)
    ds = ClusterLabeledDataset(path, label_type="combined")
    seen = 0
    for base, steering, label in DataLoader(ds, batch_size=32, shuffle=True):
        assert type(base) is torch.Tensor and base.shape[1] == 8 and base.dim() == 2
        assert steering.shape == base.shape and label.shape == (base.shape[0], 3)
        seen += base.shape[0]
    assert seen == 100
    first = next(iter(DataLoader(ds, batch_size=4)))
    expected = [ds[i] for i in range(4)]
    assert torch.equal(first[0], torch.stack([e[0] for e in expected]))
    assert torch.equal(first[2], torch.stack([e[2] for e in expected]))


def test_a_copy_pickled_before_a_label_update_keeps_reading(cluster_copy: Path) -> None:
    """A spawned worker receives the dataset pickled when it starts and pins the directory on
    first use; a label update in between re-seals checksums in config.json but is the same
    dataset version, so the worker reads (the new labels), never a DatasetChangedError."""
    import pickle

    new = np.full(6, 1 / 6, np.float32)
    with ClusterLabeledDataset(cluster_copy, return_metadata=True) as ds:
        ds[0]
        shipped = pickle.dumps(ds)
        ds.update_labels(3, source_label=new, combined_label=new)
        worker = pickle.loads(shipped)
        assert torch.equal(worker[2][2], torch.from_numpy(new))
        assert torch.equal(worker[2][3]["source_label"], torch.from_numpy(new))
        worker.close()
