"""jasper-core's backend conformance kit against PersistentClient directories, and its
dataset-level tests (both dataset kinds) against datasets on the test session's Chroma server.
The byte-level kit inspects files, which a server dataset has none of; the server's own rules
(locations, commits, errors) are tested in test_server_location.py."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.errors import CapabilityError
from jasper.testing import BackendConformance, RemoteDatasetConformance
from jasper.testing.conformance import DTYPE_CASES

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


class TestChromaDatasetsOnTheServer(RemoteDatasetConformance):
    """The kit's dataset-level tests on datasets written to ``chroma://`` locations on the
    session's server instead of a local directory."""

    @pytest.fixture
    def backend(self, chroma_server: str) -> BackendEntrypoint:
        return jasper.get_backend("chroma")

    @pytest.fixture
    def remote_prefix(self, chroma_server: str) -> str:
        # one server serves the whole session: each test's datasets get names of their own
        return f"{chroma_server}/t{uuid.uuid4().hex[:10]}-"
