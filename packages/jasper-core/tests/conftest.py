"""Shared fixtures of jasper-core's tests.

Datasets are written with the reference backend, jasper-pt (the test environment of jasper-core
holds it; see noxfile.py). Session-scoped datasets are read-only: tests that modify a dataset copy
it first (``copy_dataset``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jasper.backend import BackendEntrypoint

os.environ.setdefault("JASPER_PROGRESS", "0")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid synthetic dataset (2,000 pairs, D=32, n_neg=4), written with jasper-pt."""
    from jasper.synth import SynthConfig, write_synthetic

    path = tmp_path_factory.mktemp("datasets") / "small"
    return write_synthetic(path, SynthConfig(n_pairs=2000, embedding_dim=32, n_neg=4,
                                             n_clusters=8, seed=7), backend="pt")


@pytest.fixture
def copy_dataset(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a dataset directory into this test's tmp_path (for tests that modify it)."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture
def register_for_test() -> Iterator[Callable[[str, type[BackendEntrypoint]], BackendEntrypoint]]:
    """``register(name, cls)``: a backend class registered at run time (replacing one of that
    name) for the test, unregistered afterwards; returns its instance."""
    import jasper

    names: list[str] = []

    def register(name: str, cls: type[BackendEntrypoint]) -> BackendEntrypoint:
        jasper.register_backend(name, cls, force=True)
        names.append(name)
        return jasper.get_backend(name)

    yield register
    for name in names:
        jasper.registry.unregister_backend(name)
