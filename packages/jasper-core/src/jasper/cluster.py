"""``from jasper import ClusterLabeledDataset``: the domain-classification dataset.

The class lives in :mod:`jasper.cluster_dataset` and reads through the backend contract, so it
works with jasper-core and any one backend installed; this module keeps the historical import
path.
"""

from __future__ import annotations

from jasper.cluster_dataset import ClusterLabeledDataset, SampleNotFoundError

__all__ = ["ClusterLabeledDataset", "SampleNotFoundError"]
