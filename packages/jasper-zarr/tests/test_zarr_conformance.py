"""jasper-core's backend conformance kit, run against the zarr backend on local disk, and its
dataset-level tests against datasets on the S3 server."""

from __future__ import annotations

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.testing import BackendConformance, RemoteDatasetConformance


class TestZarrConformance(BackendConformance):
    heavy_modules = ("zarr", "numcodecs", "obstore")

    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("zarr")


class TestZarrDatasetsOnTheServer(RemoteDatasetConformance):
    """The kit's dataset-level tests on datasets written to an ``s3://`` location on the test
    session's server instead of a local directory."""

    @pytest.fixture
    def backend(self, s3) -> BackendEntrypoint:
        return jasper.get_backend("zarr")

    @pytest.fixture
    def remote_prefix(self, s3_url: str) -> str:
        return f"{s3_url}/"
