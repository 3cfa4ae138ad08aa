"""jasper-core's backend conformance kit against PersistentClient directories. The kit writes and
inspects local directories; datasets on a server (``chroma://``) are tested in
test_server_location.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.errors import CapabilityError
from jasper.testing import BackendConformance
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
