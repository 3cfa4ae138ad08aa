"""jasper-core's backend conformance kit against PersistentClient directories, and its
dataset-level tests (both dataset kinds) against datasets on the test session's Chroma server.
The byte-level kit inspects files, which a server dataset has none of; the server's own rules
(locations, commits, errors) are tested in test_server_location.py."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest

import jasper
from jasper.backend import BackendEntrypoint, Capabilities
from jasper.errors import CapabilityError
from jasper.manifest import Manifest
from jasper.testing import BackendConformance
from jasper.testing.conformance import DTYPE_CASES, KitDataset
from jasper.testing.data import make_arrays
from jasper.testing.datasets import DatasetConformance, KitClusterDataset, make_cluster

# Chroma stores float32: float64 tables are refused (test_float64_tables_are_refused), every
# other dtype round-trips bit-exactly through the kit
CHROMA_DTYPES = [c for c in DTYPE_CASES if c[0] != "float64"]


class _ChromaKit(BackendConformance):
    heavy_modules = ("chromadb",)

    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("chroma")

    @pytest.mark.parametrize(("dtype", "tier_dtype"), CHROMA_DTYPES)
    def test_round_trip_bit_exact(self, backend: BackendEntrypoint, tmp_path: Path, dtype: str,
                                  tier_dtype: str) -> None:
        super().test_round_trip_bit_exact(backend, tmp_path, dtype, tier_dtype)

    def test_float64_tables_are_refused(self, backend: BackendEntrypoint,
                                        tmp_path: Path) -> None:
        with pytest.raises(CapabilityError, match="float64 tables"):
            self.write(backend, tmp_path / "f64", dtype="float64")
        assert not (tmp_path / "f64").exists()


class TestChromaLocalConformance(_ChromaKit):
    # jasper reads tables by id, which Chroma answers from its SQLite record store; the HNSW
    # segment files serve only similarity queries
    optional_files = ("chroma/*/*.bin", "chroma/*/*.pickle")


class TestChromaDatasetsOnTheServer(DatasetConformance):
    """The kit's dataset-level tests (open, serve the reference, label updates or the capability
    error, fork and spawn DataLoader workers, the cluster-labeled kind) on datasets written to
    ``chroma://`` locations on the session's server instead of a local directory."""

    worker_timeout: ClassVar[float] = 120.0

    @pytest.fixture
    def backend(self, chroma_server: str) -> BackendEntrypoint:
        return jasper.get_backend("chroma")

    @pytest.fixture(autouse=True)
    def _server(self, chroma_server: str) -> None:
        self._server_url = chroma_server
        # one server serves the whole session: each test's datasets get names of their own
        self._test_tag = uuid.uuid4().hex[:10]

    def caps(self, backend: BackendEntrypoint) -> Capabilities:
        return backend.capabilities

    def require_write(self, backend: BackendEntrypoint) -> None:
        pass

    def write_dataset(self, backend: BackendEntrypoint, path: Path, arrays: dict[str, Any],
                      manifest: Manifest, **options: Any) -> Any:
        """Write to ``chroma://HOST:PORT/<tag>-<name>``; the kit passes a local path, whose
        name keeps datasets of one test apart."""
        url = f"{self._server_url}/t{self._test_tag}-{Path(path).name}"
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
