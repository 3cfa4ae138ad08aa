"""Files written by the original system open unchanged.

The fixture below writes ``dataset.h5`` the way the original's converter did
(docs/migrating.md#hdf5-files): its groups, keyword ids as one small dataset per pair (an empty list saved with
``np.array([])`` is float64), no splits in the file but ``<split>_idx.pt`` beside it, its own
PT files still in the directory, and a seed-era ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hdf5_testutil import assert_same, synth_tensors

import jasper
from jasper.errors import FormatError
from jasper.registry import guess_backend
from jasper.schema import ARRAYS
from jasper.synth import SynthConfig
from jasper_hdf5.reader import HDF5Reader

ORIGINAL_PATHS = {
    "question_embs": "embeddings/questions",
    "source_embs": "embeddings/sources",
    "keyword_embs": "embeddings/keywords",
    "centroid_embs": "embeddings/centroids",
    "pair_index": "pair_data/index",
    "pair_cluster_id": "pair_data/cluster_id",
    "pair_relevance": "pair_data/relevance",
    "hard_negatives": "negatives/hardnegatives",
    "negative_tiers": "negatives/tiers",
    "steering_centroid": "steering/centroid",
    "steering_keyword_weighted": "steering/keyword_weighted",
    "steering_residual": "steering/residual",
    "centroid_distances": "steering/distances",
}


def write_original(path: Path, arrays: dict[str, torch.Tensor], *, negatives_path: str =
                   "negatives/hardnegatives", narrow_ints: str | None = None,
                   keyword_rows: list[int] | None = None) -> Path:
    """A dataset directory as the original system left it after converting PT to HDF5."""
    path.mkdir(parents=True)
    offsets = arrays["pair_keyword_offsets"].numpy()
    values = arrays["pair_keyword_ids"].numpy()
    n_pairs = arrays["pair_index"].shape[0]
    with h5py.File(path / "dataset.h5", "w") as f:
        for name, hpath in ORIGINAL_PATHS.items():
            data = arrays[name].numpy()
            if name == "hard_negatives":
                hpath = negatives_path
            if narrow_ints and name in ("pair_cluster_id", "negative_tiers"):
                data = data.astype(narrow_ints)
            f.create_dataset(hpath, data=data, compression="gzip")
        group = f.create_group("pair_data/keyword_ids")
        for row in keyword_rows if keyword_rows is not None else range(n_pairs):
            ids = values[offsets[row] : offsets[row + 1]].tolist()
            group.create_dataset(str(row), data=np.array(ids))  # [] -> float64, as np.array does
    for split in ("train", "val", "test"):
        torch.save(arrays[f"{split}_idx"].clone(), path / f"{split}_idx.pt")
    torch.save(arrays["pair_index"].clone(), path / "pair_index.pt")
    (path / "config.json").write_text(json.dumps({
        "embedding_dim": int(arrays["question_embs"].shape[1]),
        "n_neg": int(arrays["hard_negatives"].shape[1]),
        "n_clusters": int(arrays["centroid_embs"].shape[0]),
        "dataset_name": "original",
        "storage_format": "hdf5",
        "curriculum": {"mode": "linear", "warmup_epochs": 3},
    }))
    return path


@pytest.fixture(scope="module")
def original_arrays() -> dict[str, torch.Tensor]:
    # the original system's ids are int64 (torch.long) throughout
    arrays, _ = synth_tensors(SynthConfig(n_pairs=300, embedding_dim=16, n_neg=3, n_clusters=4,
                                          seed=11, compact_indices=False))
    # pairs without keywords: the original saved them as empty float64 datasets
    offsets = arrays["pair_keyword_offsets"].clone()
    values = arrays["pair_keyword_ids"]
    keep = torch.ones(values.shape[0], dtype=torch.bool)
    for row in (0, 7, 299):
        keep[offsets[row] : offsets[row + 1]] = False
    lengths = offsets[1:] - offsets[:-1]
    lengths[[0, 7, 299]] = 0
    arrays["pair_keyword_ids"] = values[keep].clone()
    arrays["pair_keyword_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64),
                                                lengths.cumsum(0)])
    return arrays


@pytest.mark.parametrize("negatives_path", ["negatives/hardnegatives", "negatives/hard"])
def test_original_file_opens_with_every_array(tmp_path: Path, original_arrays: dict,
                                              negatives_path: str) -> None:
    path = write_original(tmp_path / "orig", original_arrays, negatives_path=negatives_path)
    assert guess_backend(path) == "hdf5"  # beats PT although pair_index.pt is there too
    with jasper.open_store(path) as reader:
        assert isinstance(reader, HDF5Reader)
        assert reader.array_names() == list(ARRAYS)
        for name, expected in original_arrays.items():
            assert_same(reader.read(name), expected, name)
        rows = torch.tensor([7, 0, 7, 299, 5])
        for name in ("pair_keyword_offsets", "hard_negatives", "train_idx"):
            n = reader.info(name).shape[0]
            r = rows[rows < n]
            assert_same(reader.read_rows(name, r), original_arrays[name][r], name)
        assert_same(reader.read_slice("pair_keyword_ids", 2, 9),
                    original_arrays["pair_keyword_ids"][2:9], "slice")
    report = jasper.validate(path)
    assert report.n_pairs == 300


@pytest.mark.parametrize(("narrow", "served"), [("int32", torch.int32), ("int16", torch.int64)])
def test_original_narrow_ints_are_served_as_int64(tmp_path: Path, original_arrays: dict,
                                                  narrow: str, served: torch.dtype) -> None:
    """The original's files with narrow cluster ids and tiers are served correctly: int32 ids
    are legal compact ids and stay int32 in the store (never widened whole at open); a dtype
    the data model does not allow for ids (int16) is widened to int64; either way batches
    carry int64 and equal those of the int64 file."""
    path = write_original(tmp_path / "orig", original_arrays, narrow_ints=narrow)
    wide = write_original(tmp_path / "wide", original_arrays)
    with jasper.open_store(path) as reader:
        assert reader.info("pair_cluster_id").dtype == served
        ids = original_arrays["pair_cluster_id"]
        assert_same(reader.read("pair_cluster_id"), ids.to(served), "ids")
        rows = torch.tensor([3, 1, 3])
        assert_same(reader.read_rows("pair_cluster_id", rows), ids[rows].to(served), "rows")
        # tiers allow every integer dtype, so they stay what the file holds
        assert reader.info("negative_tiers").dtype == getattr(torch, narrow)
    assert jasper.validate(path).n_pairs == 300
    with jasper.JASPERSteeringDataset(path, "train", use_mmap=False) as ds, \
            jasper.JASPERSteeringDataset(wide, "train", use_mmap=False) as twin:
        positions = list(range(len(ds)))[::-7]
        got, expected = ds.__getitems__(positions), twin.__getitems__(positions)
        for key in ("cluster_id", "negative_tiers"):
            assert got[key].dtype == torch.int64, key
            assert_same(got[key], expected[key], key)


def test_convert_original_to_jasper_layout_is_bit_exact(tmp_path: Path,
                                                        original_arrays: dict) -> None:
    path = write_original(tmp_path / "orig", original_arrays)
    report = jasper.convert(path, tmp_path / "new", to="hdf5", compression="gzip")
    assert report.src_backend == "hdf5" and report.dst_backend == "hdf5"
    with h5py.File(tmp_path / "new" / "dataset.h5") as f:
        assert isinstance(f["pair_data/keyword_ids"], h5py.Dataset)  # CSR now
        assert "splits/train" in f
    with jasper.open_store(tmp_path / "new") as reader:
        for name, expected in original_arrays.items():
            assert_same(reader.read(name), expected, name)
        assert reader.manifest.extra["storage_format"] == "hdf5"  # unknown keys kept
        assert reader.manifest.curriculum == {"mode": "linear", "warmup_epochs": 3}
    jasper.validate(tmp_path / "new", deep=True)


def test_original_reader_pickles_with_the_decoded_keywords(tmp_path: Path,
                                                            original_arrays: dict) -> None:
    import pickle

    path = write_original(tmp_path / "orig", original_arrays)
    with jasper.open_store(path) as reader:
        reader.read("pair_keyword_ids")
        clone = pickle.loads(pickle.dumps(reader))
    assert not clone._handle.is_open
    assert_same(clone.read("pair_keyword_offsets"), original_arrays["pair_keyword_offsets"], "o")
    clone.close()


def test_original_keyword_group_with_a_missing_pair(tmp_path: Path, original_arrays: dict) -> None:
    rows = [r for r in range(300) if r != 42]
    path = write_original(tmp_path / "orig", original_arrays, keyword_rows=rows)
    with jasper.open_store(path) as reader, pytest.raises(FormatError) as err:
        reader.read("pair_keyword_ids")
    msg = str(err.value)
    assert "dataset.h5" in msg and "pair_keyword_ids" in msg and "pair 42" in msg


def test_original_keyword_group_with_a_foreign_member(tmp_path: Path, original_arrays: dict) -> None:
    path = write_original(tmp_path / "orig", original_arrays)
    with h5py.File(path / "dataset.h5", "a") as f:
        f["pair_data/keyword_ids"].create_dataset("notes", data=np.arange(3))
    with jasper.open_store(path) as reader, pytest.raises(FormatError, match="'notes'"):
        reader.info("pair_keyword_offsets")


def test_missing_split_file_is_a_typed_error(tmp_path: Path, original_arrays: dict) -> None:
    path = write_original(tmp_path / "orig", original_arrays)
    (path / "val_idx.pt").unlink()
    with jasper.open_store(path) as reader:
        assert "val_idx" not in reader.array_names()
        with pytest.raises(FormatError) as err:
            reader.read("val_idx")
    assert "val_idx" in str(err.value) and "splits/val" in str(err.value)


@pytest.mark.parametrize("use_mmap", [False, True])
def test_original_file_through_the_steering_dataset(tmp_path: Path, original_arrays: dict,
                                                     use_mmap: bool) -> None:
    path = write_original(tmp_path / "orig", original_arrays)
    ds = jasper.JASPERSteeringDataset(path, "train", use_mmap=use_mmap)
    try:
        assert ds.storage_format == "hdf5"
        assert len(ds) == original_arrays["train_idx"].shape[0]
        batch = ds.__getitems__([0, 5, 5, len(ds) - 1])
        pairs = original_arrays["train_idx"][torch.tensor([0, 5, 5, len(ds) - 1])]
        q = original_arrays["pair_index"][pairs, 0]
        assert_same(batch["question_emb"], original_arrays["question_embs"][q], "question_emb")
        assert_same(batch["negative_tiers"], original_arrays["negative_tiers"][pairs], "tiers")
    finally:
        ds.close()
