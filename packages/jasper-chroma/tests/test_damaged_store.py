"""A damaged ``chroma.sqlite3`` is a typed error on every read path, never chromadb's panic.

The damage is the reliability campaign's "region" family for a file without a known layout:
the last byte of ``chroma.sqlite3`` with all its bits flipped. In a small dataset that byte lies
in a collection's configuration text, which chromadb's Rust code then fails to decode as UTF-8
and panics on (``pyo3_runtime.PanicException``, a ``BaseException`` that ``except Exception``
misses).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import jasper
from jasper.testing.data import make_arrays
from jasper_chroma.client import ChromaStoreError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arrays, manifest = make_arrays(40, 8, seed=2)
    return jasper.write_store(tmp_path_factory.mktemp("pristine") / "ds", arrays, manifest,
                              backend="chroma", progress=False)


def _flip_last_byte(path: Path) -> None:
    """What ``reliability.families.region_cases`` does to the "tail" region of a file."""
    with open(path, "r+b") as fh:
        fh.seek(-1, 2)
        byte = fh.read(1)[0]
        fh.seek(-1, 2)
        fh.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def damaged(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(pristine, copy)
    _flip_last_byte(copy / "chroma" / "chroma.sqlite3")
    return copy


def _preload(ds: Path) -> Any:
    return jasper.JASPERSteeringDataset(ds, "train")


def _rows(ds: Path) -> Any:
    data = jasper.JASPERSteeringDataset(ds, "train", use_mmap=True)
    try:
        return data.__getitems__([0, 1, 2])
    finally:
        data.close()


def _validate(ds: Path) -> Any:
    return jasper.validate(ds, progress=False)


def _deep(ds: Path) -> Any:
    return jasper.validate(ds, deep=True, progress=False)


def _convert(ds: Path) -> Any:
    return jasper.convert(ds, ds.parent / "converted", to="pt", progress=False)


@pytest.mark.parametrize("operation", [_preload, _rows, _validate, _deep, _convert],
                         ids=["preload", "rows", "validate", "deep", "convert"])
def test_flipped_tail_byte_is_a_typed_error(damaged: Path,
                                            operation: Callable[[Path], Any]) -> None:
    with pytest.raises(ChromaStoreError) as caught:
        operation(damaged)
    message = str(caught.value)
    assert str(damaged / "chroma") in message  # the store's directory
    assert "collection 'jasper" in message  # which collection failed
    assert "chroma.sqlite3" in message and "restore the dataset" in message  # what to do
    assert not (damaged.parent / "converted").exists()


def test_a_sound_store_still_reads_after_a_damaged_one(damaged: Path, pristine: Path) -> None:
    # chromadb's panic must leave this process able to read other stores
    with pytest.raises(ChromaStoreError):
        _preload(damaged)
    data = _preload(pristine)
    assert len(data) and data.__getitems__([0, len(data) - 1])["question_emb"].shape[0] == 2
    jasper.validate(pristine, deep=True, progress=False)
