"""PT backend data safety: corrupt headers say corrupt, files outside the dataset are refused,
one version is served (each case failed on the code before its fix)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import jasper
from jasper.errors import FormatError, ShapeError, UnsafeFileError
from jasper.files import OutsideDatasetError
from jasper.testing import make_arrays


@pytest.fixture
def pt_dataset(tmp_path: Path) -> Path:
    arrays, manifest = make_arrays(n_pairs=32, embedding_dim=8, seed=3)
    return jasper.write_store(tmp_path / "ds", arrays, manifest, backend="pt", progress=False)


def test_zeroed_header_is_reported_as_corrupt_not_legacy_tar(pt_dataset: Path) -> None:
    f = pt_dataset / "steering_centroid.pt"
    data = bytearray(f.read_bytes())
    data[:512] = bytes(512)
    f.write_bytes(data)
    with jasper.open_store(pt_dataset) as r, pytest.raises(FormatError) as e:
        r.read("steering_centroid")
    assert "not a .pt file" in str(e.value) and "steering_centroid.pt" in str(e.value)
    assert "legacy" not in str(e.value) and not isinstance(e.value, UnsafeFileError)


def test_symlinked_array_file_is_refused_unless_trusted(pt_dataset: Path, tmp_path: Path) -> None:
    f = pt_dataset / "source_embs.pt"
    shutil.move(f, tmp_path / "elsewhere.pt")
    f.symlink_to(tmp_path / "elsewhere.pt")
    with jasper.open_store(pt_dataset) as r, pytest.raises(OutsideDatasetError,
                                                           match="source_embs.pt"):
        r.read("source_embs")
    from jasper_pt.backend import PTReader

    trusting = PTReader(pt_dataset, jasper.Manifest.load(pt_dataset), follow_links=True)
    assert trusting.read("source_embs").shape[0] > 0
    trusting.close()


def test_wrong_embedding_dim_is_a_typed_error_from_read_into(pt_dataset: Path) -> None:
    with jasper.open_store(pt_dataset) as r:
        info = r.info("question_embs")
        with pytest.raises(ShapeError, match="question_embs"):
            r.read_into("question_embs", torch.empty(info.shape[0], info.shape[1] + 1))


def test_mapped_reader_keeps_its_version_after_a_commit(pt_dataset: Path, tmp_path: Path) -> None:
    with jasper.open_store(pt_dataset, mmap=True) as r:
        expect = jasper.open_store(pt_dataset).read("steering_residual")
        arrays, manifest = make_arrays(n_pairs=32, embedding_dim=8, seed=4)
        new = jasper.write_store(tmp_path / "new", arrays, manifest, backend="pt",
                                 progress=False)
        os.rename(pt_dataset, tmp_path / "old")
        os.rename(new, pt_dataset)
        assert torch.equal(r.map("steering_residual"), expect)  # first opened after the swap
