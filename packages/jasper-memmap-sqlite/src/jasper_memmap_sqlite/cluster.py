"""``ClusterLabeledDataset`` under its historical import path.

The class lives in jasper-core (:mod:`jasper.cluster_dataset`) and serves cluster-labeled
datasets from any backend; this package contributes what only it does: crash-safe in-place label
updates (:mod:`jasper_memmap_sqlite.cluster_rows`) and reading the original system's
``dataset.db`` layout (:mod:`jasper_memmap_sqlite.cluster_reader`).
"""

from __future__ import annotations

from jasper.cluster_dataset import ClusterLabeledDataset, SampleNotFoundError

__all__ = ["ClusterLabeledDataset", "SampleNotFoundError"]
