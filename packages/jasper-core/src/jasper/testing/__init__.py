"""Test support for jasper and its storage backends, shipped inside the core wheel.

- :class:`BackendConformance`: the conformance kit, a pytest base class that a backend package
  subclasses with one fixture, ``backend`` (see :mod:`jasper.testing.conformance`).
- :class:`RemoteDatasetConformance`: the kit's dataset-level tests against datasets at a URL
  (an object store, a database server), with one more fixture, ``remote_prefix``.
- :func:`make_arrays`: a tiny valid dataset in memory; :func:`write_seed_dataset`: a dataset
  on disk exactly as the original system wrote it (see :mod:`jasper.testing.data`).

pytest is needed only for the kit (the ``test`` extra of jasper-core); it is imported when
:class:`BackendConformance` is first used, so the test-data functions work without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "BackendConformance": "jasper.testing.conformance",
    "RemoteDatasetConformance": "jasper.testing.remote",
    "KitDataset": "jasper.testing.conformance",
    "assert_bit_equal": "jasper.testing.conformance",
    "make_arrays": "jasper.testing.data",
    "write_seed_dataset": "jasper.testing.data",
    "csr_to_lists": "jasper.testing.data",
    "SEED_CONFIG_KEYS": "jasper.testing.data",
}

__all__ = [
    "SEED_CONFIG_KEYS",
    "BackendConformance",
    "KitDataset",
    "RemoteDatasetConformance",
    "assert_bit_equal",
    "csr_to_lists",
    "make_arrays",
    "write_seed_dataset",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jasper.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from jasper.testing.conformance import BackendConformance, KitDataset, assert_bit_equal
    from jasper.testing.data import SEED_CONFIG_KEYS, csr_to_lists, make_arrays, write_seed_dataset
    from jasper.testing.remote import RemoteDatasetConformance
