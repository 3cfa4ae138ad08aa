"""jasper-core's backend conformance kit, run against the zarr backend on local disk."""

from __future__ import annotations

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.testing import BackendConformance


class TestZarrConformance(BackendConformance):
    heavy_modules = ("zarr", "numcodecs", "obstore")

    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("zarr")
