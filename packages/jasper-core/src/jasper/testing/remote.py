"""The kit's dataset-level tests against datasets at a URL (an object store, a database server)
instead of a local directory.

A backend that writes to a server subclasses :class:`RemoteDatasetConformance` and supplies two
fixtures: ``backend`` (its entrypoint, usually depending on the fixture that starts the server)
and ``remote_prefix`` (the string every dataset URL of one test starts with). The byte-level
tests of :class:`~jasper.testing.BackendConformance` are not included: they inspect files,
which a dataset on a server has none of.

    class TestMyStoreOnTheServer(RemoteDatasetConformance):
        @pytest.fixture
        def backend(self, my_server):
            return jasper.get_backend("mystore")

        @pytest.fixture
        def remote_prefix(self, my_server):
            return f"mystore://{my_server}/kit-"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from jasper.backend import BackendEntrypoint, Capabilities
from jasper.manifest import Manifest
from jasper.testing.data import make_arrays
from jasper.testing.datasets import DatasetConformance, KitClusterDataset, make_cluster


@dataclass
class RemoteKitDataset:
    """A dataset the kit wrote to a remote store: its URL, and what went in (the remote
    counterpart of :class:`~jasper.testing.KitDataset`)."""

    path: str
    arrays: dict[str, torch.Tensor]
    manifest: Manifest


class RemoteDatasetConformance(DatasetConformance):
    """Dataset-level conformance (both dataset kinds: open, serve the reference, label updates
    or the capability error, fork and spawn DataLoader workers) for datasets written to
    ``remote_prefix + name``. The kit still passes each test a local path; only its name is
    used, to keep the datasets of one test apart."""

    # a worker's first batch includes its connection set-up on a loaded machine
    worker_timeout: ClassVar[float] = 120.0

    @pytest.fixture
    def remote_prefix(self) -> str:  # pragma: no cover - every subclass overrides it
        """Where this test's datasets go: a URL prefix the dataset's name is appended to."""
        raise NotImplementedError("a RemoteDatasetConformance subclass defines remote_prefix")

    @pytest.fixture(autouse=True)
    def _remote(self, remote_prefix: str) -> None:
        self._remote_prefix = remote_prefix

    def dataset_url(self, path: Path) -> str:
        """The URL of the dataset the kit asked to write at ``path``."""
        return f"{self._remote_prefix}{Path(path).name}"

    def caps(self, backend: BackendEntrypoint) -> Capabilities:
        return backend.capabilities

    def require_write(self, backend: BackendEntrypoint) -> None:
        # a remote backend is tested because it writes; one that cannot fails the tests loudly
        pass

    def write_dataset(self, backend: BackendEntrypoint, path: Path, arrays: dict[str, Any],
                      manifest: Manifest, **options: Any) -> Any:
        import jasper

        return str(jasper.write_store(self.dataset_url(path), arrays, manifest,
                                      backend=backend.name, progress=False, **options))

    def write(self, backend: BackendEntrypoint, path: Path, **kwargs: Any) -> RemoteKitDataset:
        arrays, manifest = make_arrays(48, 8, **kwargs)
        return RemoteKitDataset(self.write_dataset(backend, path, arrays, manifest), arrays,
                          manifest)

    @pytest.fixture
    def cluster_dataset(self, backend: BackendEntrypoint, tmp_path: Path) -> KitClusterDataset:
        """The kit's cluster-labeled dataset at its URL (the local kit makes a ``Path`` of what
        was written, which a URL is not)."""
        arrays, meta, manifest = make_cluster(self.cluster_samples)
        url = self.write_dataset(backend, tmp_path / "kit-cluster", arrays, manifest)
        return KitClusterDataset(url, arrays, meta)


__all__ = ["RemoteDatasetConformance", "RemoteKitDataset"]
