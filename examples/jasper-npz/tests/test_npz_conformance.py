"""jasper-npz passes the jasper conformance kit, plus checks of its own options."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import jasper
from jasper.backend import BackendEntrypoint
from jasper.errors import JasperError, WriteOptionError
from jasper.testing import BackendConformance, make_arrays


class TestNpzConformance(BackendConformance):
    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        return jasper.get_backend("npz")


def test_deflate_preset_compresses_members(tmp_path: Path) -> None:
    arrays, manifest = make_arrays(64, 16, seed=1)
    path = jasper.write_store(tmp_path / "d", arrays, manifest, backend="npz",
                              compression="deflate", progress=False)
    with zipfile.ZipFile(path / "dataset.npz") as zf:
        methods = {i.compress_type for i in zf.infolist()}
    assert methods == {zipfile.ZIP_DEFLATED}


@pytest.mark.parametrize("options", [{"compression": "lzma"}, {"compression_level": 11}])
def test_bad_option_values_are_refused(tmp_path: Path, options: dict[str, object]) -> None:
    arrays, manifest = make_arrays(8, 4)
    with pytest.raises(WriteOptionError):
        jasper.write_store(tmp_path / "d", arrays, manifest, backend="npz", progress=False,
                           **options)
    assert not (tmp_path / "d").exists()


def test_deep_validation_checks_member_crcs(tmp_path: Path) -> None:
    arrays, manifest = make_arrays(32, 8)
    path = jasper.write_store(tmp_path / "d", arrays, manifest, backend="npz", progress=False)
    archive = path / "dataset.npz"
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("steering_residual.npy")
    # flip one byte in the member's data: stored members' data follows the local header, whose
    # name and extra-field lengths sit at bytes 26..29 of it
    local = info.header_offset
    name_len = int.from_bytes(data[local + 26 : local + 28], "little")
    extra_len = int.from_bytes(data[local + 28 : local + 30], "little")
    data[local + 30 + name_len + extra_len + 200] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(JasperError, match="steering_residual"):
        jasper.validate(path, deep=True)
