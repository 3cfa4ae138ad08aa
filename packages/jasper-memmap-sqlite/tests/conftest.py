from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jasper.synth import SynthConfig, write_synthetic


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic JASPER dataset written by this backend (read-only for tests)."""
    path = tmp_path_factory.mktemp("stores") / "small"
    return write_synthetic(path, SynthConfig(n_pairs=600, embedding_dim=32, n_neg=4,
                                             n_clusters=4, seed=1), backend="memmap-sqlite")


@pytest.fixture()
def store_copy(store_dir: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`store_dir` that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(store_dir, dst)
    return dst
