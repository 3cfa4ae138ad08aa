"""A local reader is pinned to the version it opened (jasper_zarr.pinned): commits to the same
path while it is open change nothing it serves; it reads only regular files of its tree."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import pytest
import torch

import jasper
from jasper.files import DatasetChangedError, OutsideDatasetError
from jasper.manifest import checksum
from jasper.schema import ARRAYS
from jasper.testing.conformance import assert_bit_equal
from jasper.testing.data import make_arrays


def _versions(tmp_path: Path) -> tuple[Path, dict, dict]:
    """A dataset at ``tmp_path/live`` (seed 1) and the arrays of a second version (seed 2,
    same shapes: only the pinning tells them apart)."""
    v1, manifest = make_arrays(n_pairs=120, embedding_dim=8, seed=1)
    v2, _ = make_arrays(n_pairs=120, embedding_dim=8, seed=2)
    assert not torch.equal(v1["source_embs"], v2["source_embs"])
    path = jasper.write_store(tmp_path / "live", v1, manifest, backend="zarr",
                              shard_bytes=2048, chunk_rows=8)
    return path, v1, v2


def _commit(path: Path, arrays: dict) -> None:
    _, manifest = make_arrays(n_pairs=120, embedding_dim=8, seed=2)
    jasper.write_store(path, arrays, manifest, backend="zarr", overwrite=True,
                       shard_bytes=2048, chunk_rows=8)


def test_open_reader_serves_its_version_after_a_commit_replaced_it(tmp_path: Path) -> None:
    """Regression: a local group used to be read by path, so a reader opened before an
    overwrite served the new version's chunks (with the old manifest) after it."""
    path, v1, v2 = _versions(tmp_path)
    with jasper.open_store(path) as reader:
        _commit(path, v2)  # swaps the directory and deletes the old one
        assert not [p for p in tmp_path.iterdir() if p.name != "live"], "old version kept"
        for name in ARRAYS:
            got = reader.read(name)
            assert_bit_equal(got, v1[name], f"{name} after the commit")
            assert checksum(got) == reader.manifest.arrays[name].checksum
        last = v1["question_embs"].shape[0] - 1
        rows = torch.tensor([5, 0, 5, last, last // 2])
        assert_bit_equal(reader.read_rows("question_embs", rows), v1["question_embs"][rows],
                         "rows after the commit")
    with jasper.open_store(path) as reader:  # a new reader sees the new version
        assert_bit_equal(reader.read("source_embs"), v2["source_embs"], "new version")


def _child_checksum(reader, queue) -> None:  # runs in a forked child
    try:
        queue.put(checksum(reader.read("source_embs")))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


def test_forked_child_reads_the_parents_pinned_version(tmp_path: Path) -> None:
    path, v1, v2 = _versions(tmp_path)
    ctx = multiprocessing.get_context("fork")
    with jasper.open_store(path) as reader:
        reader.read("question_embs")  # zarr and the pins are in use before the fork
        _commit(path, v2)
        queue = ctx.Queue()
        child = ctx.Process(target=_child_checksum, args=(reader, queue))
        child.start()
        got = queue.get(timeout=120)
        child.join(60)
        assert got == checksum(v1["source_embs"]), got


def test_unpickled_reader_refuses_a_replaced_dataset(tmp_path: Path) -> None:
    """A pickled reader (what a spawned worker gets) reopens the path; when a commit replaced
    the version meanwhile it raises DatasetChangedError rather than serve a mix."""
    path, v1, v2 = _versions(tmp_path)
    with jasper.open_store(path) as reader:
        blob = pickle.dumps(reader)
        same = pickle.loads(blob)
        assert_bit_equal(same.read("source_embs"), v1["source_embs"], "unchanged version")
        same.close()
        _commit(path, v2)
        moved = pickle.loads(blob)
        with pytest.raises(DatasetChangedError, match="replaced"):
            moved.read("source_embs")


def test_fifo_in_the_tree_is_refused_without_blocking(tmp_path: Path) -> None:
    path, _, _ = _versions(tmp_path)
    os.mkfifo(path / "source_embs" / "c" / "planted")
    with pytest.raises(OutsideDatasetError, match="planted.*not a regular file"):
        jasper.open_store(path)


def test_symlinked_directory_in_the_tree_is_refused(tmp_path: Path) -> None:
    path, _, _ = _versions(tmp_path)
    chunks = path / "source_embs" / "c"
    chunks.rename(tmp_path / "elsewhere")
    chunks.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(OutsideDatasetError, match="symbolic link"):
        jasper.open_store(path)
