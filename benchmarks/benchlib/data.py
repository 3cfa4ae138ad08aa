"""Synthetic datasets for the benchmarks, cached under ``benchmarks/.cache/`` by their parameters.

One synthetic dataset is generated per grid point (with ``jasper.synth``) and written once with
the first writable backend; every other (backend, preset) pair is a ``jasper.convert`` of it, so
all backends hold bit-identical data (convert checks the checksums). A directory holding
``config.json`` is complete (core writes it last), so an interrupted run never leaves a dataset
the next run would trust.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.config import GridPoint, cache_dir

#: Bump when the synthetic generator or the cache layout changes meaning.
CACHE_VERSION = 1


@dataclass(frozen=True)
class BackendPreset:
    """One (backend, write preset) pair of the installed backends."""

    backend: str
    preset: str
    options: tuple[tuple[str, Any], ...]
    mmap: bool
    write: bool
    first: bool  # the backend's first preset: the one measured at every grid point

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.preset}"


def installed_presets() -> list[BackendPreset]:
    """Every installed backend's every write preset, discovered through the registry."""
    import jasper

    out: list[BackendPreset] = []
    for name in sorted(jasper.list_backends()):
        impl = jasper.get_backend(name)
        caps = impl.capabilities
        presets = impl.write_presets or {"default": {}}
        for i, (preset, options) in enumerate(presets.items()):
            out.append(BackendPreset(name, preset, tuple(sorted(options.items())), caps.mmap,
                                     caps.write, i == 0))
    return out


def dataset_cases(grid: tuple[GridPoint, ...]) -> list[tuple[GridPoint, BackendPreset]]:
    """Every preset at the base grid point; each backend's first preset at the other points."""
    presets = [p for p in installed_presets() if p.write]
    cases = [(grid[0], p) for p in presets]
    for point in grid[1:]:
        cases.extend((point, p) for p in presets if p.first)
    return cases


def base_preset(presets: list[BackendPreset]) -> BackendPreset:
    """The preset whose dataset the ceilings and peers read: pt's first when installed (the
    data is bit-identical in every backend; pt preloads fastest)."""
    firsts = [p for p in presets if p.write and p.first]
    if not firsts:
        raise RuntimeError("no installed jasper backend can write datasets")
    return next((p for p in firsts if p.backend == "pt"), firsts[0])


def _point_dir(point: GridPoint, seed: int) -> Path:
    return cache_dir() / f"{point.key}-s{seed}-v{CACHE_VERSION}"


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file()


def _meta_path(path: Path) -> Path:
    return path.parent / f"{path.name}.meta.json"


def dataset_meta(path: Path) -> dict[str, Any]:
    """What was recorded when the cached dataset was written (write seconds, how)."""
    mp = _meta_path(path)
    return json.loads(mp.read_text()) if mp.is_file() else {}


def _source(point: GridPoint, seed: int) -> Path:
    """The synthetic dataset of ``point``, written with the first writable backend's first
    preset (``pt`` when installed)."""
    from jasper.synth import SynthConfig, write_synthetic

    src = base_preset(installed_presets())
    path = _point_dir(point, seed) / src.id
    if not _complete(path):
        cfg = SynthConfig(n_pairs=point.n_pairs, embedding_dim=point.embedding_dim,
                          n_neg=point.n_neg, dtype=point.dtype, seed=seed,
                          dataset_name=f"bench-{point.key}")
        t0 = time.perf_counter()
        write_synthetic(path, cfg, backend=src.backend, overwrite=True, progress=False,
                        **dict(src.options))
        _meta_path(path).write_text(json.dumps({
            "how": "jasper.synth.write_synthetic", "backend": src.backend, "preset": src.preset,
            "write_s": time.perf_counter() - t0,
        }))
    return path


def ensure_dataset(point: GridPoint, preset: BackendPreset, seed: int = 0) -> Path:
    """The cached dataset of ``point`` written by ``preset``, creating it when missing."""
    from jasper.store import convert

    path = _point_dir(point, seed) / preset.id
    if _complete(path):
        return path
    src = _source(point, seed)
    if src == path:
        return path
    report = convert(src, path, to=preset.backend, overwrite=True, progress=False,
                     **dict(preset.options))
    _meta_path(path).write_text(json.dumps({
        "how": f"jasper.convert from {src.name}", "backend": preset.backend,
        "preset": preset.preset, "write_s": report.seconds,
    }))
    return path


def data_bytes(path: Path) -> int:
    """The logical bytes of every array of the dataset at ``path`` (from its manifest)."""
    from jasper.manifest import Manifest

    m = Manifest.load(path)
    total = 0
    for rec in m.arrays.values():
        total += _nbytes(rec.shape, rec.dtype)
    return total


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    from jasper.dtypes import torch_dtype

    n = torch_dtype(dtype).itemsize
    for s in shape:
        n *= s
    return n
