"""jasper: serve precomputed-embedding JASPER steering datasets to PyTorch, from any storage.

Where to look:

- the data model: :mod:`jasper.schema`; the manifest: :mod:`jasper.manifest`
- the backend contract: :mod:`jasper.backend`; plugin hooks: :mod:`jasper.hookspecs`
- the registry: :mod:`jasper.registry`; open / write / convert: :mod:`jasper.store`
- the datasets and loaders: :mod:`jasper.dataset`, :mod:`jasper.loader`
- the conformance kit for backend authors: :mod:`jasper.testing`

Heavy modules are imported on first use, so ``import jasper`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # storage
    "open_store": "jasper.store",
    "write_store": "jasper.store",
    "convert": "jasper.store",
    "ConvertReport": "jasper.store",
    "validate": "jasper.validation",
    "check_arrays": "jasper.validation",
    "DataQualityWarning": "jasper.validation",
    "Manifest": "jasper.manifest",
    # registry
    "list_backends": "jasper.registry",
    "get_backend": "jasper.registry",
    "register_backend": "jasper.registry",
    "refresh_backends": "jasper.registry",
    "guess_backend": "jasper.registry",
    "BackendEntrypoint": "jasper.backend",
    "StoreReader": "jasper.backend",
    "Capabilities": "jasper.backend",
    # datasets and loaders
    "JASPERSteeringDataset": "jasper.dataset",
    "ClusterLabeledDataset": "jasper.cluster",
    "create_loader": "jasper.loader",
    "set_epoch": "jasper.loader",
    "validate_first_batch": "jasper.loader",
    "GPULoader": "jasper.gpu_loader",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jasper' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from jasper.backend import BackendEntrypoint, Capabilities, StoreReader
    from jasper.manifest import Manifest
    from jasper.registry import (
        get_backend,
        guess_backend,
        list_backends,
        refresh_backends,
        register_backend,
    )
    from jasper.store import ConvertReport, convert, open_store, write_store
    from jasper.validation import DataQualityWarning, check_arrays, validate
