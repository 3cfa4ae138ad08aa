"""One cluster-labeled dataset, every backend: converted between every pair of backends with
`jasper convert`, each copy serves identical items, metadata included."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import jasper
from jasper.cli import main
from jasper.cluster_kind import write_synthetic_cluster_labeled
from jasper.manifest import Manifest

BACKENDS = ("pt", "hdf5", "memmap-sqlite")
ROWS = [7, 0, 63, 7, 31, 2, 50]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for name in BACKENDS:
        if name not in jasper.list_backends():
            pytest.skip(f"backend {name!r} is not installed")
    root = tmp_path_factory.mktemp("cluster-across")
    first = write_synthetic_cluster_labeled(root / "synth", n_samples=64, embedding_dim=8,
                                            n_clusters=4, seed=11, backend="pt")
    out = {}
    for name in BACKENDS:
        assert main(["convert", str(first), str(root / name), "--to", name,
                     "--no-progress"]) == 0
        out[name] = root / name
    return out


def _served(path: Path, mmap_mode: str | None) -> tuple[torch.Tensor, ...] | tuple:
    with jasper.ClusterLabeledDataset(path, return_metadata=True, mmap_mode=mmap_mode) as ds:
        base, steering, label, meta = ds.__getitems__(ROWS)
        item = ds[31]
        return base, steering, label, meta, item, ds.get_sample_by_id(int(meta["sample_id"][1]))


def _same(a: object, b: object, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), what
        for k in a:
            _same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, tuple | list):
        assert isinstance(b, tuple | list) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{what}[{i}]")
    elif hasattr(a, "shape"):  # numpy label arrays of get_sample_by_id
        assert (a == b).all(), what
    else:
        assert a == b, what


def test_every_backend_serves_identical_items(sources: dict[str, Path]) -> None:
    ref = _served(sources["pt"], "r")
    for name, path in sources.items():
        assert Manifest.load(path).writer["backend"] == name  # type: ignore[index]
        for mode in ("r", None):
            _same(_served(path, mode), ref, f"{name} mmap_mode={mode}")


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(BACKENDS, BACKENDS)))
def test_convert_between_every_pair(sources: dict[str, Path], tmp_path: Path, src: str,
                                    dst: str) -> None:
    out = tmp_path / f"{src}-to-{dst}"
    assert main(["convert", str(sources[src]), str(out), "--to", dst, "--no-progress"]) == 0
    assert main(["validate", str(out), "--deep", "--no-progress"]) == 0
    before, after = Manifest.load(sources[src]), Manifest.load(out)
    assert after.dataset_kind == "cluster-labeled"
    assert {n: r.checksum for n, r in after.arrays.items()} == \
        {n: r.checksum for n, r in before.arrays.items()}
    _same(_served(out, "r"), _served(sources["pt"], "r"), f"{src} -> {dst}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_synth_writes_the_kind_with_any_backend(tmp_path: Path, backend: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / backend
    assert main(["synth", str(out), "--kind", "cluster-labeled", "--samples", "30", "--dim",
                 "4", "--clusters", "3", "--backend", backend, "--no-progress"]) == 0
    assert f"with backend {backend!r}" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "kind=cluster-labeled" in capsys.readouterr().out
    with jasper.ClusterLabeledDataset(out) as ds:
        assert len(ds) == 30 and ds.reader.backend_name == backend
