"""``jasper.ptload.pt_info``: a ``.pt`` tensor's shape and dtype read from its pickle without
torch, equal to what ``torch.load`` gives, and never anything the file asks to run."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.dtypes import LOGICAL_DTYPES, dtype_name
from jasper.files import DatasetDir
from jasper.ptload import load_pt_tensor, pt_info


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(LOGICAL_DTYPES),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=3))
def test_matches_torch_load(tmp_path_factory: pytest.TempPathFactory, dtype: str,
                            shape: list[int]) -> None:
    d = tmp_path_factory.mktemp("pt")
    torch.save(torch.zeros(shape, dtype=getattr(torch, dtype)), d / "a.pt")
    t = load_pt_tensor(DatasetDir(d), "a.pt")
    assert pt_info(DatasetDir(d), "a.pt") == (tuple(t.shape), dtype_name(t.dtype))


def test_a_view_reports_its_own_shape(tmp_path: Path) -> None:
    torch.save(torch.arange(12).reshape(3, 4)[1:, ::2], tmp_path / "v.pt")
    assert pt_info(DatasetDir(tmp_path), "v.pt") == ((2, 2), "int64")


@pytest.mark.parametrize("obj", [[[1, 2], [3]], {"a": torch.zeros(2)}, 7])
def test_anything_but_one_tensor_is_left_to_torch(tmp_path: Path, obj: object) -> None:
    torch.save(obj, tmp_path / "x.pt")
    assert pt_info(DatasetDir(tmp_path), "x.pt") is None


def test_legacy_and_foreign_files_are_left_to_torch(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "junk.pt").write_bytes(b"\0" * 64)
    assert pt_info(DatasetDir(tmp_path), "old.pt") is None
    assert pt_info(DatasetDir(tmp_path), "junk.pt") is None


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save(torch.zeros(3), tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as src, \
            zipfile.ZipFile(tmp_path / "evil.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(_Evil(marker), protocol=2)
            dst.writestr(info, data)
    assert pt_info(DatasetDir(tmp_path), "evil.pt") is None
    assert not marker.exists()
