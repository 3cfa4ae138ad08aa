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
    from jasper.backend import BackendEntrypoint as BackendEntrypoint
    from jasper.backend import Capabilities as Capabilities
    from jasper.backend import StoreReader as StoreReader
    from jasper.manifest import Manifest as Manifest
    from jasper.registry import get_backend as get_backend
    from jasper.registry import guess_backend as guess_backend
    from jasper.registry import list_backends as list_backends
    from jasper.registry import refresh_backends as refresh_backends
    from jasper.registry import register_backend as register_backend
    from jasper.store import ConvertReport as ConvertReport
    from jasper.store import convert as convert
    from jasper.store import open_store as open_store
    from jasper.store import write_store as write_store
    from jasper.validation import DataQualityWarning as DataQualityWarning
    from jasper.validation import check_arrays as check_arrays
    from jasper.validation import validate as validate
