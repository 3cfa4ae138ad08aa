"""open_store / write_store / convert: round trips, atomic writes, typed errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import jasper
from jasper.backend import ArraySource, TensorSource
from jasper.errors import (
    BackendNotFoundError,
    CapabilityError,
    DatasetNotFoundError,
    NoBackendCanOpenError,
    ShapeError,
    WriteOptionError,
)
from jasper.manifest import Manifest
from jasper.store import TMP_MARK, DatasetExistsError, clean_leftovers, open_store, write_store
from jasper.synth import SynthConfig, synthesize


def tiny(n_pairs: int = 300, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], Manifest]:
    sources, manifest = synthesize(SynthConfig(n_pairs=n_pairs, embedding_dim=16, n_neg=3,
                                               n_clusters=4, dtype=dtype, seed=3))
    return {n: s.materialize().clone() for n, s in sources.items()}, manifest


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: str) -> None:
    arrays, manifest = tiny(dtype=dtype)
    manifest.extra["site"] = {"owner": "team-a"}
    out = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    with open_store(out) as r:
        assert r.backend_name == "pt"
        assert r.manifest.extra["site"] == {"owner": "team-a"}
        for name, t in arrays.items():
            back = r.read(name)
            assert back.dtype == t.dtype, name
            assert torch.equal(back.view(torch.uint8) if back.is_floating_point() else back,
                               t.view(torch.uint8) if t.is_floating_point() else t), name
            assert r.manifest.arrays[name].shape == tuple(t.shape)
    assert jasper.validate(out, deep=True).checksums_verified == len(arrays)


class Exploding(ArraySource):
    """Yields half of a tensor, then fails: an interrupted write."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.inner = TensorSource(tensor)
        self.shape, self.dtype = self.inner.shape, self.inner.dtype

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        yield self.inner.tensor[: self.shape[0] // 2]
        raise OSError("disk on fire")


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    bad = dict(arrays)
    bad["steering_residual"] = Exploding(arrays["steering_residual"])  # type: ignore[assignment]
    with pytest.raises(OSError, match="disk on fire"):
        write_store(tmp_path / "ds", bad, manifest, backend="pt")
    assert sorted(os.listdir(tmp_path)) == []


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    out = write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    before = Manifest.load(out).arrays
    bad = dict(arrays)
    bad["source_embs"] = Exploding(arrays["source_embs"] + 1)  # type: ignore[assignment]
    with pytest.raises(OSError):
        write_store(out, bad, manifest, backend="pt", overwrite=True)
    assert Manifest.load(out).arrays == before
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_killed_writer_leftovers_are_cleaned_by_the_next_write(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-write leaves a temporary directory but no dataset."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from jasper.backend import ArraySource, TensorSource
        from jasper.store import write_store
        from jasper.synth import SynthConfig, synthesize
        src, m = synthesize(SynthConfig(n_pairs=200, embedding_dim=8, n_neg=2, n_clusters=2))
        class Killer(ArraySource):
            def __init__(self, s):
                self.s = s; self.shape, self.dtype = s.shape, s.dtype
            def iter_chunks(self, n):
                yield from []
                os.kill(os.getpid(), signal.SIGKILL)
        src["steering_residual"] = Killer(src["steering_residual"])
        write_store({str(tmp_path / 'ds')!r}, src, m, backend="pt")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert not (tmp_path / "ds").exists()
    leftovers = [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
    assert leftovers, "the killed writer should have left its temporary directory"
    arrays, manifest = tiny()
    write_store(tmp_path / "ds", arrays, manifest, backend="pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert clean_leftovers(tmp_path / "ds") == []


def test_existing_target_needs_overwrite(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    out = write_store(tmp_path / "ds", arrays, manifest)
    with pytest.raises(DatasetExistsError, match="overwrite"):
        write_store(out, arrays, manifest)
    arrays["pair_relevance"] = arrays["pair_relevance"] * 0.5
    write_store(out, arrays, manifest, overwrite=True)
    with open_store(out) as r:
        assert torch.equal(r.read("pair_relevance"), arrays["pair_relevance"])


def test_write_rejects_bad_layout_and_options(tmp_path: Path) -> None:
    arrays, manifest = tiny()
    with pytest.raises(WriteOptionError, match="does not accept option.*compression; accepted: none"):
        write_store(tmp_path / "a", arrays, manifest, compression="lzf")
    broken = dict(arrays)
    del broken["val_idx"]
    with pytest.raises(ShapeError, match="without arrays: val_idx"):
        write_store(tmp_path / "b", broken, manifest)
    broken = dict(arrays)
    broken["steering_centroid"] = arrays["steering_centroid"][:, :5]
    with pytest.raises(ShapeError, match="steering_centroid has 5 columns, expected 16"):
        write_store(tmp_path / "c", broken, manifest)
    broken = dict(arrays)
    broken["extra_thing"] = torch.zeros(3)
    with pytest.raises(ShapeError, match="unknown arrays extra_thing"):
        write_store(tmp_path / "d", broken, manifest)
    assert list(tmp_path.iterdir()) == []


def test_open_errors(tmp_path: Path, small_dataset: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="jasper synth"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="config.json"):
        open_store(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"embedding_dim": 4, "n_neg": 1}')
    with pytest.raises(NoBackendCanOpenError, match="no installed backend recognises"):
        open_store(tmp_path / "empty")
    with pytest.raises(BackendNotFoundError, match="unknown storage backend 'nope'; installed"):
        open_store(small_dataset, backend="nope")


def test_missing_known_backend_names_its_package(monkeypatch: pytest.MonkeyPatch,
                                                 small_dataset: Path) -> None:
    monkeypatch.setenv("JASPER_BACKENDS_DISABLE", "hdf5")
    jasper.refresh_backends()
    try:
        with pytest.raises(BackendNotFoundError, match=r"pip install -c constraints\.txt \./packages/jasper-hdf5 .*; installed backends: .*pt"):
            open_store(small_dataset, backend="hdf5")
    finally:
        monkeypatch.delenv("JASPER_BACKENDS_DISABLE")
        jasper.refresh_backends()


def test_mapped_open(small_dataset: Path) -> None:
    with open_store(small_dataset, mmap=True) as r:
        mapped = r.map("steering_centroid")
        assert torch.equal(mapped[:10], r.read("steering_centroid")[:10])
        rows = torch.tensor([5, 1, 5, 1999, 0])
        assert torch.equal(r.read_rows("steering_centroid", rows), mapped[rows])


def test_capability_error_for_mapping_a_backend_that_cannot(
    small_dataset: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jasper.backend import Capabilities
    from jasper_pt.backend import PTBackend

    class NoMapPT(PTBackend):
        name = "pt-nomap"
        capabilities = Capabilities(mmap=False)

    jasper.register_backend("pt-nomap", NoMapPT)
    try:
        with pytest.raises(CapabilityError, match="cannot memory-map"):
            open_store(small_dataset, backend="pt-nomap", mmap=True)
    finally:
        from jasper.registry import unregister_backend

        unregister_backend("pt-nomap")


def test_convert_reports_sizes(tmp_path: Path, small_dataset: Path) -> None:
    report = jasper.convert(small_dataset, tmp_path / "copy", to="pt")
    assert report.src_bytes > 0 and report.dst_bytes > 0
    assert "MiB" in str(report) and "saved" in str(report)
    assert Manifest.load(tmp_path / "copy").arrays == Manifest.load(small_dataset).arrays
