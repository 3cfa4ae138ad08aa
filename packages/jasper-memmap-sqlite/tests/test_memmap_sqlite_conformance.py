"""jasper-memmap-sqlite passes the backend conformance kit."""

from __future__ import annotations

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.testing import BackendConformance


class TestMemmapSqliteConformance(BackendConformance):
    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("memmap-sqlite")
