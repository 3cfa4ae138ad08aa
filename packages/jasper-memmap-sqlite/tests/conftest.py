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


@pytest.fixture(scope="session")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cluster-labeled dataset (do not modify; copy it first)."""
    from jasper_memmap_sqlite import write_synthetic_cluster_labeled

    return write_synthetic_cluster_labeled(tmp_path_factory.mktemp("cluster") / "cl",
                                           n_samples=300, embedding_dim=16, n_clusters=6, seed=3)


@pytest.fixture()
def cluster_copy(cluster_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cl-copy"
    shutil.copytree(cluster_dir, dst)
    return dst
