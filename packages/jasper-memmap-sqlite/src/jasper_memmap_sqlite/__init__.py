"""jasper-memmap-sqlite: memory-mapped ``.npy`` arrays with a SQLite catalogue, and the
domain-classification :class:`ClusterLabeledDataset`.

This module is the plugin registered under the ``jasper.backends`` entry point; it imports
nothing heavy. The backend class is registered by path and the public names below load on first
use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from jasper.hookspecs import RegisterBackend, hookimpl

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "MemmapSqliteBackend": "jasper_memmap_sqlite.backend",
    "MemmapSqliteReader": "jasper_memmap_sqlite.backend",
    "ClusterLabeledDataset": "jasper_memmap_sqlite.cluster",
    "write_cluster_labeled": "jasper_memmap_sqlite.cluster_write",
    "write_synthetic_cluster_labeled": "jasper_memmap_sqlite.cluster_write",
    "validate_cluster_labeled": "jasper_memmap_sqlite.cluster_write",
}

__all__ = ["__version__", "jasper_register_backends", *_LAZY]


@hookimpl
def jasper_register_backends(register: RegisterBackend) -> None:
    register(
        "memmap-sqlite",
        "jasper_memmap_sqlite.backend:MemmapSqliteBackend",
        description="memory-mapped page-aligned .npy arrays + SQLite catalogue; serves data "
        "larger than RAM",
        url="https://pypi.org/project/jasper-memmap-sqlite/",
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jasper_memmap_sqlite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from jasper_memmap_sqlite.backend import MemmapSqliteBackend as MemmapSqliteBackend
    from jasper_memmap_sqlite.backend import MemmapSqliteReader as MemmapSqliteReader
    from jasper_memmap_sqlite.cluster import ClusterLabeledDataset as ClusterLabeledDataset
    from jasper_memmap_sqlite.cluster_write import (
        validate_cluster_labeled as validate_cluster_labeled,
    )
    from jasper_memmap_sqlite.cluster_write import write_cluster_labeled as write_cluster_labeled
    from jasper_memmap_sqlite.cluster_write import (
        write_synthetic_cluster_labeled as write_synthetic_cluster_labeled,
    )
