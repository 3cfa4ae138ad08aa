"""The cluster-labeled dataset kind: manifest kind, catalogue, write, validate, convert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper.cluster_kind import write_cluster_labeled, write_synthetic_cluster_labeled
from jasper.errors import ChecksumError, IntegrityError, ManifestError, ShapeError
from jasper.manifest import Manifest
from jasper.schema import (
    ALL_ARRAYS,
    ARRAYS,
    CLUSTER_ARRAYS,
    CLUSTER_RECORDS,
    KINDS,
    STEERING_EXCEPTION_ARRAYS,
)
from jasper.store import DatasetExistsError, convert, open_store
from jasper.validation import validate


def test_a_manifest_without_kind_is_a_steering_dataset() -> None:
    m = Manifest.from_dict({"embedding_dim": 4, "n_neg": 2})
    assert m.kind is None and m.dataset_kind == "jasper-steering"
    assert "kind" not in m.to_dict()
    c = Manifest.from_dict({"kind": "cluster-labeled", "embedding_dim": 4, "n_clusters": 3})
    assert c.dataset_kind == "cluster-labeled" and c.to_dict()["kind"] == "cluster-labeled"
    assert "n_neg" not in c.to_dict()
    with pytest.raises(ManifestError, match="known dataset kinds"):
        Manifest.from_dict({"kind": "other", "embedding_dim": 4, "n_neg": 2})
    with pytest.raises(ManifestError, match="n_clusters"):
        Manifest.from_dict({"kind": "cluster-labeled", "embedding_dim": 4})


def test_catalogue_has_one_entry_per_kind_and_unique_names() -> None:
    assert set(KINDS) == {"jasper-steering", "cluster-labeled"}
    assert KINDS["jasper-steering"].arrays is ARRAYS
    assert not set(ARRAYS) & set(CLUSTER_ARRAYS)
    # derived steering's exception arrays are known to every backend too
    assert not set(STEERING_EXCEPTION_ARRAYS) & (set(ARRAYS) | set(CLUSTER_ARRAYS))
    assert len(ALL_ARRAYS) == len(ARRAYS) + len(CLUSTER_ARRAYS) + len(STEERING_EXCEPTION_ARRAYS)
    for rec in CLUSTER_RECORDS.values():
        assert rec.offsets_array in CLUSTER_ARRAYS and rec.bytes_array in CLUSTER_ARRAYS


def _small(tmp_path: Path, **kw: object) -> Path:
    return write_synthetic_cluster_labeled(tmp_path / "c", n_samples=40, embedding_dim=8,
                                           n_clusters=3, seed=1, backend="pt", **kw)


def test_write_validate_and_convert_through_pt(tmp_path: Path) -> None:
    src = _small(tmp_path)
    m = json.loads((src / "config.json").read_text())
    assert m["kind"] == "cluster-labeled" and m["n_clusters"] == 3
    assert set(m["arrays"]) == set(CLUSTER_ARRAYS)
    assert all(r["checksum"] for r in m["arrays"].values())
    report = validate(src, deep=True)
    assert report.n_pairs == 40 and report.checksums_verified == len(CLUSTER_ARRAYS)
    out = convert(src, tmp_path / "copy", to="pt").dst
    with open_store(src) as a, open_store(out) as b:
        for n in CLUSTER_ARRAYS:
            assert torch.equal(a.read(n), b.read(n)), n
    with pytest.raises(DatasetExistsError):
        _small(tmp_path)


def test_deep_validation_catches_a_changed_record_byte(tmp_path: Path) -> None:
    src = _small(tmp_path)
    t = torch.load(src / "text_bytes.pt")
    t[0] ^= 1
    torch.save(t, src / "text_bytes.pt")
    validate(src)  # structure holds; only the checksum can tell
    with pytest.raises(ChecksumError, match="text_bytes"):
        validate(src, deep=True)


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    emb = np.zeros((3, 4), np.float32)
    lab = np.full((3, 2), 0.5, np.float32)
    good = dict(base_embeddings=emb, steering_embeddings=emb, source_labels=lab,
                steering_labels=lab, combined_labels=lab, sample_type=["source"] * 3,
                text=["a", "b", "c"], backend="pt")
    with pytest.raises(IntegrityError, match="sample_type"):
        write_cluster_labeled(tmp_path / "a", **{**good, "sample_type": ["x"] * 3})
    with pytest.raises(IntegrityError, match="embedding_idx"):
        write_cluster_labeled(tmp_path / "b", **{**good, "embedding_idx": [0, 1, 3]})
    with pytest.raises(IntegrityError, match="does not follow"):
        write_cluster_labeled(tmp_path / "c", **{**good, "sample_ids": [1, 1, 2]})
    bad = lab.copy()
    bad[1, 1] = np.nan
    with pytest.raises(IntegrityError, match=r"source_labels\[1, 1\]"):
        write_cluster_labeled(tmp_path / "d", **{**good, "source_labels": bad})
    with pytest.raises(ShapeError, match="steering_embeddings"):
        write_cluster_labeled(tmp_path / "e", **{**good, "steering_embeddings": emb[:2]})
    with pytest.raises(ShapeError, match="chroma_id has 1 entries for 3"):
        write_cluster_labeled(tmp_path / "f", **{**good, "chroma_id": ["x"]})
    assert not any(tmp_path.iterdir())
    write_cluster_labeled(tmp_path / "ok", **good)
    validate(tmp_path / "ok", deep=True)
