"""config.json: seed-era compatibility, unknown keys kept, typed errors, streaming checksums."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.errors import DatasetNotFoundError, ManifestError, SchemaVersionError
from jasper.manifest import (
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    ArrayRecord,
    Checksummer,
    Manifest,
    checksum,
)

SEED_CONFIG = {
    "embedding_dim": 384,
    "n_neg": 8,
    "n_clusters": 20,
    "dataset_name": "wiki_qa",
    "created_at": "2025-01-01T00:00:00",
    "split_sizes": {"train": 800, "val": 100, "test": 100},
    "steering_probabilities": {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25},
    "curriculum": {"mode": "linear", "warmup_epochs": 5},
    "clustering_source": "keywords",
    "storage_format": "pt",
    "random_seed": 42,
}


def test_seed_era_manifest_opens_and_keeps_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SEED_CONFIG))
    m = Manifest.load(tmp_path)
    assert m.is_seed_era
    assert m.embedding_dim == 384 and m.n_neg == 8 and m.random_seed == 42
    assert m.extra == {"clustering_source": "keywords", "storage_format": "pt"}
    m.stamp("pt", "0.1.0")
    m.dump(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    assert again["clustering_source"] == "keywords"
    assert again["curriculum"] == SEED_CONFIG["curriculum"]
    assert again["schema_version"] == SCHEMA_VERSION
    assert again["writer"]["backend"] == "pt"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)


@given(extra=st.dictionaries(st.text(min_size=1, max_size=12).filter(
    lambda k: k not in MANIFEST_SCHEMA["properties"]), json_values, max_size=5))
def test_unknown_keys_round_trip(extra: dict) -> None:
    m = Manifest.from_dict({"embedding_dim": 4, "n_neg": 2, **extra})
    m.arrays["pair_index"] = ArrayRecord((3, 2), "int64", "xxh3_64:00")
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.extra == extra
    assert again.arrays == m.arrays


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"n_neg": 8}, "'embedding_dim' is missing"),
        ({"embedding_dim": 8}, "'n_neg' is missing"),
        ({"embedding_dim": "384", "n_neg": 8}, "'embedding_dim' must be a non-negative integer"),
        ({"embedding_dim": 4, "n_neg": 1, "arrays": {"x": {"dtype": "int64"}}}, "malformed 'arrays'"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_manifest_is_a_typed_error_naming_the_file(tmp_path: Path, config: object,
                                                       needle: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestError, match=needle) as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    assert isinstance(info.value, ValueError)


def test_not_json_and_missing_and_newer_schema(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="Config file not found"):
        Manifest.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"embedding_dim": 4, "n_neg": 2, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SchemaVersionError, match=r"upgrade: pip install -U -c constraints\.txt \./packages/jasper-core "):
        Manifest.load(tmp_path)
    with pytest.raises(DatasetNotFoundError):
        Manifest.load(tmp_path / "nope")


@settings(max_examples=30)
@given(
    rows=st.integers(0, 50),
    cols=st.integers(1, 7),
    cuts=st.lists(st.integers(0, 50), max_size=5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8]),
)
def test_streaming_checksum_equals_one_shot(rows: int, cols: int, cuts: list[int],
                                            dtype: torch.dtype) -> None:
    t = (torch.randn(rows, cols) * 50).to(dtype)
    h = Checksummer()
    bounds = sorted({0, rows, *[min(c, rows) for c in cuts]})
    for a, b in itertools.pairwise(bounds):
        h.update(t[a:b])
    assert h.hexdigest() == checksum(t)


def test_checksum_sees_every_bit() -> None:
    t = torch.zeros(16, dtype=torch.bfloat16)
    flipped = t.clone()
    flipped.view(torch.int16)[5] ^= 1
    assert checksum(t) != checksum(flipped)
    assert checksum(np.zeros(4, dtype=np.float32)) == checksum(torch.zeros(4))


BASE = {"embedding_dim": 4, "n_neg": 2}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (json.dumps({**BASE, "writer": "pt"}), "writer"),
        (json.dumps({**BASE, "random_seed": "abc"}), "random_seed"),
        ('{"embedding_dim": 4, "n_neg": 2, "random_seed": 1e999}', "random_seed"),
        (json.dumps({**BASE, "schema_version": -1}), "schema_version"),
        (json.dumps({**BASE, "schema_version": "x"}), "schema_version"),
        (json.dumps({**BASE, "n_clusters": -3}), "n_clusters"),
        (json.dumps({**BASE, "split_sizes": {"train": "many"}}), "split_sizes.train"),
        (json.dumps({**BASE, "arrays": {"pair_index": {"shape": ["a"], "dtype": "int64"}}}),
         "arrays.pair_index.shape.0"),
        (json.dumps({**BASE, "kind": 3}), "kind"),
        ('{"embedding_dim": 4, "n_neg": 2, "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
         "nested too deeply"),
    ],
    ids=["writer-str", "seed-str", "seed-inf", "schema-neg", "schema-str", "clusters-neg",
         "split-str", "shape-str", "kind-int", "deep-nesting"],
)
def test_hostile_manifest_is_a_manifest_error_naming_file_and_key(
    tmp_path: Path, text: str, key: str
) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ManifestError) as info:
        Manifest.load(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    assert key in str(info.value)


def test_unreadable_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    import os

    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who reads anything")
        with pytest.raises(ManifestError, match="cannot be read.*permission"):
            Manifest.load(tmp_path)
    finally:
        path.chmod(0o644)


def test_data_digests_name_the_edited_key(tmp_path: Path) -> None:
    m = Manifest.from_dict({**BASE, "dataset_name": "a"})
    m.arrays["pair_index"] = ArrayRecord((3, 2), "int64", "xxh3_64:00ff")
    m.stamp("pt", "0.1.0")
    m.dump(tmp_path)
    assert Manifest.load(tmp_path).edited_data_keys() == []
    d = json.loads((tmp_path / "config.json").read_text())
    d["dataset_name"] = "renamed"  # not data-describing: no finding
    d["arrays"]["pair_index"].pop("checksum")
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert Manifest.load(tmp_path).edited_data_keys() == ["arrays"]
    assert Manifest.from_dict(BASE).edited_data_keys() is None


def test_schema_requires_n_neg_of_steering_datasets_only() -> None:
    from jasper.errors import ManifestError
    from jasper.manifest import Manifest

    m = Manifest.from_dict({"embedding_dim": 4, "n_clusters": 3, "kind": "cluster-labeled"})
    assert m.dataset_kind == "cluster-labeled"
    for d in ({"embedding_dim": 4}, {"embedding_dim": 4, "kind": "jasper-steering"}):
        with pytest.raises(ManifestError, match="n_neg"):
            Manifest.from_dict(d)
