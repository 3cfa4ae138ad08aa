"""Shared fixtures of jasper-hdf5's tests.

These tests run in an environment holding only jasper-core and jasper-hdf5 (noxfile.py), so
datasets are synthesised with jasper-core and written with this backend; tests that need the PT
backend skip without it. Shared (module-scoped) datasets are read-only: tests that change a dataset
copy it first (``copy_dataset``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hdf5_testutil import synth_tensors

from jasper.manifest import Manifest

os.environ.setdefault("JASPER_PROGRESS", "0")


@pytest.fixture(scope="module")
def small_arrays() -> tuple[dict[str, torch.Tensor], Manifest]:
    return synth_tensors()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory,
                  small_arrays: tuple[dict[str, torch.Tensor], Manifest]) -> Path:
    """:data:`SMALL` written with hdf5, lzf-compressed (so its arrays are chunked)."""
    from jasper.store import write_store

    arrays, manifest = small_arrays
    return write_store(tmp_path_factory.mktemp("datasets") / "small", arrays, manifest,
                       backend="hdf5", compression="lzf")


@pytest.fixture
def copy_dataset(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a dataset directory into this test's tmp_path (for tests that change it)."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy
