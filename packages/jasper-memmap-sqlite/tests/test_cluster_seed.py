"""Datasets the original system wrote (labels as JSON text, SHA-256 in embeddings_meta) open,
serve the same items, take label updates in their own format, and are deep-validated."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from seed_cluster import write_seed_cluster_dataset

from jasper.errors import ChecksumError, FormatError, IntegrityError, ShapeError, UnsafeFileError
from jasper_memmap_sqlite import ClusterLabeledDataset, validate_cluster_labeled


@pytest.fixture()
def seed(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    d = tmp_path / "seed"
    return d, write_seed_cluster_dataset(d)


@pytest.mark.parametrize("label_type", ["source", "steering", "combined"])
def test_seed_items_match_what_was_written(seed: tuple[Path, dict[str, Any]],
                                           label_type: str) -> None:
    d, ref = seed
    with ClusterLabeledDataset(d, label_type=label_type, return_metadata=True) as ds:
        assert ds.generation == "seed"
        assert (len(ds), ds.embedding_dim, ds.n_clusters) == (ref["n"], ref["dim"],
                                                              ref["n_clusters"])
        idx = ref["embedding_idx"]
        base, steering, label, meta = ds.__getitems__(list(range(ref["n"])))
        assert torch.equal(base, torch.from_numpy(ref["base"][idx]))
        assert torch.equal(steering, torch.from_numpy(ref["steering"][idx]))
        np.testing.assert_allclose(label.numpy(), ref["labels"][label_type], rtol=1e-6)
        assert meta["sample_id"] == list(range(1, ref["n"] + 1))
        assert meta["chroma_id"][0] is None and meta["chroma_id"][1] == "chroma-1"
        assert meta["suggestions"][0] is None and meta["suggestions"][1] == ["sugg-1"]
        row = ds.get_sample_by_id(3)
        assert row is not None and row["text"] == "text number 2"
        assert row["embedding_idx"] == int(idx[2])


def test_seed_label_update_is_written_back_as_json(seed: tuple[Path, dict[str, Any]]) -> None:
    d, ref = seed
    new = np.eye(ref["n_clusters"], dtype=np.float32)[1]
    with ClusterLabeledDataset(d) as ds:
        ds.update_labels(2, steering_label=new)
        assert np.array_equal(ds.get_sample_by_id(2)["steering_label"], new)
        temp = ds.reader.store.temp_dir
        assert temp is not None and temp.exists()
    conn = sqlite3.connect(d / "dataset.db")
    (text,) = conn.execute("SELECT steering_label FROM samples WHERE sample_id = 2").fetchone()
    conn.close()
    assert json.loads(text) == new.tolist()
    with ClusterLabeledDataset(d, label_type="steering") as again:
        assert torch.equal(again[1][2], torch.from_numpy(new))
    del ds
    import gc

    gc.collect()
    assert not temp.exists()  # the private label matrices go with the dataset object


def test_seed_checksums_are_verified_by_deep_validation(seed: tuple[Path, dict[str, Any]]) -> None:
    d, _ = seed
    report = validate_cluster_labeled(d, deep=True)
    assert report.ok and report.generation == "seed" and report.checksums_verified == 2
    f = d / "steering_embeddings.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert validate_cluster_labeled(d, deep=False).ok
    with pytest.raises(ChecksumError) as e:
        validate_cluster_labeled(d, deep=True)
    assert e.value.path == f and "SHA-256" in (e.value.rule or "")


def test_moved_seed_dataset_still_finds_its_files(seed: tuple[Path, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    d, ref = seed
    moved = tmp_path / "moved"
    shutil.move(d, moved)  # embeddings_meta still holds the old absolute paths
    with ClusterLabeledDataset(moved) as ds:
        assert len(ds) == ref["n"]


def _sql(d: Path, statement: str, *args: Any) -> None:
    conn = sqlite3.connect(d / "dataset.db")
    conn.execute(statement, args)
    conn.commit()
    conn.close()


def test_seed_label_of_the_wrong_width(seed: tuple[Path, dict[str, Any]]) -> None:
    d, _ = seed
    _sql(d, "UPDATE samples SET combined_label = ? WHERE sample_id = 17", json.dumps([0.5, 0.5]))
    with pytest.raises(ShapeError) as e:
        ClusterLabeledDataset(d)
    assert e.value.row == 16 and "sample_id 17" in str(e.value)
    assert e.value.rule == "labels have n_clusters values" and e.value.path == d / "dataset.db"


def test_seed_label_that_is_not_json(seed: tuple[Path, dict[str, Any]]) -> None:
    d, _ = seed
    _sql(d, "UPDATE samples SET source_label = ? WHERE sample_id = 9", "[0.1, oops]")
    with pytest.raises(FormatError, match="sample_id=9"):
        ClusterLabeledDataset(d)


def test_seed_embedding_index_out_of_range(seed: tuple[Path, dict[str, Any]]) -> None:
    d, ref = seed
    _sql(d, "UPDATE samples SET embedding_idx = ? WHERE sample_id = 31", ref["n"] + 3)
    with pytest.raises(IntegrityError) as e:
        ClusterLabeledDataset(d)
    assert e.value.row == 30 and f"embedding_idx {ref['n'] + 3}" in str(e.value)
    assert e.value.rule == "0 <= embedding_idx < embedding rows"


def test_seed_missing_table_and_missing_registration(seed: tuple[Path, dict[str, Any]]) -> None:
    d, _ = seed
    _sql(d, "DELETE FROM embeddings_meta WHERE embedding_type = 'steering'")
    with pytest.raises(FormatError, match="'steering'"):
        ClusterLabeledDataset(d)
    _sql(d, "DROP TABLE dataset_info")
    with pytest.raises(FormatError, match="table 'dataset_info' is missing"):
        ClusterLabeledDataset(d)


def test_seed_truncated_embedding_file(seed: tuple[Path, dict[str, Any]]) -> None:
    d, _ = seed
    f = d / "base_embeddings.npy"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 12 * 4 * 3 - 1])
    with pytest.raises(ShapeError) as e:
        ClusterLabeledDataset(d)
    assert e.value.path == f and e.value.row == 36


# --- only files inside the dataset are read -------------------------------------------------------
@pytest.mark.parametrize("recorded", ["absolute", "dotdot"])
def test_embedding_file_outside_the_dataset_is_refused(seed: tuple[Path, dict[str, Any]],
                                                       tmp_path: Path, recorded: str) -> None:
    d, ref = seed
    outside = tmp_path / "elsewhere" / "base_embeddings.npy"
    outside.parent.mkdir()
    np.save(outside, np.ones((ref["n"], ref["dim"]), np.float32))  # a plausible foreign file
    path = str(outside) if recorded == "absolute" else "../elsewhere/base_embeddings.npy"
    _sql(d, "UPDATE embeddings_meta SET file_path = ? WHERE embedding_type = 'base'", path)
    with pytest.raises(UnsafeFileError, match="outside the dataset directory") as e:
        ClusterLabeledDataset(d)
    assert e.value.path == d / "dataset.db" and path in str(e.value)
    from jasper.validation import validate

    with pytest.raises(UnsafeFileError):
        validate(d, deep=True)  # the in-place file is never checked instead
    with pytest.raises(UnsafeFileError):
        validate_cluster_labeled(d, deep=True)


def test_symlinked_embedding_file_is_refused(seed: tuple[Path, dict[str, Any]],
                                             tmp_path: Path) -> None:
    d, _ = seed
    real = tmp_path / "real.npy"
    (d / "steering_embeddings.npy").rename(real)
    (d / "steering_embeddings.npy").symlink_to(real)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        ClusterLabeledDataset(d)


def test_seed_dataset_validates_and_converts_like_any_dataset(
        seed: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from jasper.cli import main
    from jasper.store import convert
    from jasper.validation import validate

    d, ref = seed
    report = validate(d, deep=True)
    assert report.ok and report.n_pairs == ref["n"]
    assert main(["validate", str(d), "--deep"]) == 0
    out = convert(d, tmp_path / "converted", to="memmap-sqlite").dst
    validate(out, deep=True)
    with ClusterLabeledDataset(d, return_metadata=True) as a, \
            ClusterLabeledDataset(out, return_metadata=True) as b:
        assert a.generation == "seed" and b.generation == "jasper"
        rows = list(range(ref["n"]))
        for x, y in zip(a.__getitems__(rows)[:3], b.__getitems__(rows)[:3]):
            assert torch.equal(x, y)
        ma, mb = a.__getitems__(rows)[3], b.__getitems__(rows)[3]
        assert {k: v for k, v in ma.items() if not k.endswith("_label")} == \
            {k: v for k, v in mb.items() if not k.endswith("_label")}
        b.update_labels(3, combined_label=np.full(ref["n_clusters"], 0.2, np.float32))
    f = d / "base_embeddings.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        validate(d, deep=True)
