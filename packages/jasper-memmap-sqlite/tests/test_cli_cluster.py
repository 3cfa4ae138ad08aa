"""`jasper synth --kind cluster-labeled` and `jasper validate` on such a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jasper.cli import main


def test_synth_and_validate_cluster_labeled(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cl"
    assert main(["synth", str(out), "--kind", "cluster-labeled", "--backend", "memmap-sqlite",
                 "--samples", "400", "--dim", "8",
                 "--clusters", "3"]) == 0
    assert "wrote cluster-labeled dataset" in capsys.readouterr().out
    assert main(["validate", str(out), "--deep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["n_samples"] == 400 and report["checksums_verified"] > 0

    from jasper import ClusterLabeledDataset

    ds = ClusterLabeledDataset(out)
    assert len(ds) == 400 and ds.embedding_dim == 8 and ds.n_clusters == 3

    # a corrupted label file is caught by the deep check, with exit code 1 and no traceback
    labels = out / "combined_labels.npy"
    data = bytearray(labels.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # +inf in the last label
    labels.write_bytes(bytes(data))
    assert main(["validate", str(out), "--deep"]) == 1
    err = capsys.readouterr().err
    assert "jasper validate: error:" in err and "Traceback" not in err
