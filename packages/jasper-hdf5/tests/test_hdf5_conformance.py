"""jasper-core's backend conformance kit, run against the HDF5 backend."""

from __future__ import annotations

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.testing import BackendConformance


class TestHDF5Conformance(BackendConformance):
    heavy_modules = ("h5py",)

    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("hdf5")
