"""``from jasper import ClusterLabeledDataset``: the domain-classification dataset.

The class lives in the ``jasper-memmap-sqlite`` package (it is served from memory-mapped
``.npy`` matrices and a SQLite metadata store); this module only re-exports it, and says what to
install when that package is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jasper.errors import BackendNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from jasper_memmap_sqlite.cluster import ClusterLabeledDataset

__all__ = ["ClusterLabeledDataset"]


def _load() -> Any:
    try:
        from jasper_memmap_sqlite.cluster import ClusterLabeledDataset as cls
    except ImportError as exc:
        if exc.name is not None and not exc.name.startswith("jasper_memmap_sqlite"):
            raise  # the package is there but one of its own imports failed: show that
        from jasper.registry import list_backends

        raise BackendNotFoundError(
            "memmap-sqlite", list_backends(), "pip install jasper-memmap-sqlite"
        ) from exc
    return cls


def __getattr__(name: str) -> Any:
    if name == "ClusterLabeledDataset":
        value = _load()
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jasper.cluster' has no attribute {name!r}")
