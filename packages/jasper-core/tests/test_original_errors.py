"""What user code of the original system relies on: the errors it raised as ``ValueError`` are
still caught by ``except ValueError`` (and ``FileNotFoundError`` where natural) with the
original's key phrases, and opening a dataset logs the memory of its tensors at INFO."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from jasper.dataset import JASPERSteeringDataset
from jasper.loader import create_loader


def _raises_value_error(phrase: str, call: Callable[[], object],
                        also: type[BaseException] | None = None) -> BaseException:
    with pytest.raises(ValueError, match=phrase) as info:
        call()
    if also is not None:
        assert isinstance(info.value, also)
    return info.value


def test_missing_dataset_directory(tmp_path: Path) -> None:
    for make in (lambda: JASPERSteeringDataset(tmp_path / "nowhere", "train"),
                 lambda: create_loader(tmp_path / "nowhere", "train", batch_size=4)):
        _raises_value_error("Dataset directory not found", make, FileNotFoundError)


def test_missing_config(small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    (path / "config.json").unlink()
    _raises_value_error("Config file not found", lambda: JASPERSteeringDataset(path, "train"),
                        FileNotFoundError)


def test_unknown_split(small_dataset: Path) -> None:
    _raises_value_error("Split file not found",
                        lambda: JASPERSteeringDataset(small_dataset, "validation"))


def test_no_dataset_files(tmp_path: Path, small_dataset: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((small_dataset / "config.json").read_text())
    _raises_value_error("No dataset files found", lambda: JASPERSteeringDataset(empty, "train"),
                        FileNotFoundError)


def test_invalid_storage_format(small_dataset: Path) -> None:
    _raises_value_error("storage backend 'parquet'", lambda: JASPERSteeringDataset(
        small_dataset, "train", storage_format="parquet"))


def test_index_out_of_range(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "val") as ds:
        n = len(ds)
        with pytest.raises(IndexError, match=rf"Index {n} out of range"):
            ds[n]
        sub = ds.subset_by_cluster([0, 1])
        with pytest.raises(IndexError, match=rf"Index {len(sub)} out of range"):
            sub.__getitems__([0, len(sub)])


@pytest.mark.parametrize(("col", "table", "word"), [(0, "question_embs", "question"),
                                                    (1, "source_embs", "source")])
def test_pair_index_references_question_or_source(small_dataset: Path,
                                                  copy_dataset: Callable[[Path], Path],
                                                  col: int, table: str, word: str) -> None:
    path = copy_dataset(small_dataset)
    pairs = torch.load(path / "pair_index.pt")
    rows = torch.load(path / f"{table}.pt").shape[0]
    pairs[11, col] = rows + 2
    torch.save(pairs, path / "pair_index.pt")
    err = _raises_value_error(f"pair_index references {word}",
                              lambda: JASPERSteeringDataset(path, "train"))
    assert re.search(rf"pair_index\[11, {col}\] = {rows + 2} but {table} has {rows} rows",
                     str(err))


@pytest.mark.parametrize("use_mmap", [False, True])
def test_opening_logs_the_memory_of_the_loaded_tensors(small_dataset: Path, use_mmap: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="jasper.dataset"), \
            JASPERSteeringDataset(small_dataset, "train", use_mmap=use_mmap) as ds:
        mib = ds.memory_bytes() / 2**20
    opened = [r.getMessage() for r in caplog.records if "opened" in r.getMessage()]
    assert len(opened) == 1 and f"{mib:.1f} MiB of tensors in memory" in opened[0]
    assert (mib > 0) != use_mmap
