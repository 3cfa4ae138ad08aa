"""jasper-core's backend conformance kit, run against the zarr backend on local disk, and its
dataset-level tests against datasets on the S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

import jasper
from jasper.backend import BackendEntrypoint, Capabilities
from jasper.manifest import Manifest
from jasper.testing import BackendConformance
from jasper.testing.conformance import KitDataset
from jasper.testing.data import make_arrays
from jasper.testing.datasets import DatasetConformance, KitClusterDataset, make_cluster


class TestZarrConformance(BackendConformance):
    heavy_modules = ("zarr", "numcodecs", "obstore")

    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("zarr")


class TestZarrDatasetsOnTheServer(DatasetConformance):
    """The kit's dataset-level tests (both dataset kinds: open, serve the reference, label
    updates or the capability error, fork and spawn DataLoader workers) on datasets written to
    an ``s3://`` location on the test session's server instead of a local directory."""

    worker_timeout: ClassVar[float] = 120.0

    @pytest.fixture
    def backend(self, s3) -> BackendEntrypoint:
        return jasper.get_backend("zarr")

    @pytest.fixture
    def s3_prefix(self, s3_url: str) -> str:
        return s3_url

    @pytest.fixture(autouse=True)
    def _prefix(self, s3_prefix: str) -> None:
        self._url = s3_prefix

    def caps(self, backend: BackendEntrypoint) -> Capabilities:
        return backend.capabilities

    def require_write(self, backend: BackendEntrypoint) -> None:
        pass

    def write_dataset(self, backend: BackendEntrypoint, path: Path, arrays: dict[str, Any],
                      manifest: Manifest, **options: Any) -> Any:
        """Write to ``<prefix>/<name>`` on the server; the kit passes a local path, whose name
        keeps datasets of one test apart."""
        url = f"{self._url}/{Path(path).name}"
        return str(jasper.write_store(url, arrays, manifest, backend=backend.name,
                                      progress=False, **options))

    def write(self, backend: BackendEntrypoint, path: Path, **kwargs: Any) -> KitDataset:
        arrays, manifest = make_arrays(48, 8, **kwargs)
        return KitDataset(self.write_dataset(backend, path, arrays, manifest), arrays,
                          manifest)

    @pytest.fixture
    def cluster_dataset(self, backend: BackendEntrypoint, tmp_path: Path) -> KitClusterDataset:
        """The kit's cluster-labeled dataset, at its URL (the kit's fixture makes a Path of
        what was written, which a URL is not)."""
        arrays, meta, manifest = make_cluster(self.cluster_samples)
        url = self.write_dataset(backend, tmp_path / "kit-cluster", arrays, manifest)
        return KitClusterDataset(url, arrays, meta)
