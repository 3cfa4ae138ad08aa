"""Which code serves each dataset kind: the one place ``store``, ``validation`` and the CLI look up.

Every job is named by import path and loaded on first use, so looking a kind up imports nothing
heavy. The ``jasper-steering`` kind's jobs are core's original code paths; a job a kind does not
list is done by that original code (the steering kind is the default and the reference).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jasper.schema import CLUSTER_KIND, KINDS, STEERING_KIND

#: kind -> job -> ``"module:function"``.
#:
#: - ``check_layout(arrays, manifest)``: shape-level rules before a write (no data read);
#: - ``validate(reader, *, deep, strict, progress)``: every rule of an open dataset, a
#:   :class:`~jasper.validation.ValidationReport`;
#: - ``summary(manifest, infos)``: the kind's line of ``jasper info``;
#: - ``dataset``: the ``torch`` dataset class serving the kind.
JOBS: dict[str, dict[str, str]] = {
    STEERING_KIND: {
        "check_layout": "jasper.store:check_steering_layout",
        "dataset": "jasper.dataset:JASPERSteeringDataset",
    },
    CLUSTER_KIND: {
        "check_layout": "jasper.cluster_kind:check_layout",
        "validate": "jasper.cluster_kind:validate",
        "summary": "jasper.cluster_kind:summary",
        "dataset": "jasper.cluster_dataset:ClusterLabeledDataset",
    },
}

if TYPE_CHECKING:
    from jasper.backend import StoreReader

assert set(JOBS) == set(KINDS), "every dataset kind of jasper.schema has its jobs here"


def kind_job(kind: str, job: str) -> Any:
    """The function (or class) doing ``job`` for ``kind``, or ``None`` where the steering
    kind's original code path does it."""
    target = JOBS.get(kind, {}).get(job)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def open_foreign(path: str | Path, backend: str = "auto") -> StoreReader | None:
    """A reader for a dataset directory without ``config.json`` in a layout some installed
    backend reads (its :attr:`~jasper.backend.BackendEntrypoint.foreign_markers` are present),
    e.g. the original system's cluster-labeled ``dataset.db``; ``None`` when no backend does."""
    from jasper.registry import get_backend, list_backends

    p = Path(path)
    for name in ([backend] if backend != "auto" else list(list_backends())):
        impl = get_backend(name)
        if any((p / m).exists() for m in impl.foreign_markers):
            reader = impl.open_foreign(p)
            if reader is not None:
                return reader
    return None


__all__ = ["JOBS", "kind_job", "open_foreign"]
