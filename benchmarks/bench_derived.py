"""Derived against stored steering, in the suite: the same pairs, the same batches, one run.

At the base grid point the cached (stored-steering) dataset is converted with
``jasper.convert(..., derive_steering="jasper-v1")``, what a user runs on an existing dataset,
and, where core supports it, once more keeping the keyword variant stored (``keep_steering``).
Each derived dataset is then served against the stored one in alternating rounds of the same
batches (the curriculum's late mix, epoch 40, and each variant forced), so drift and load hit
both alike. Recorded per case: both rates, their ratio (target: derived >= 0.8x stored) and the
bytes per pair of the pair-level arrays of both manifests.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from benchlib.config import load_config
from benchlib.data import base_preset, ensure_dataset, installed_presets
from benchlib.record import tag

CFG = load_config()
POINT = CFG.grid[0]
BATCH = 1024
TARGET = 0.8
#: the curriculum epoch whose mix is measured: late, when keyword and residual dominate
MIX_EPOCH = 40
VARIANTS = ("mix", "centroid", "keyword", "residual")


#: steering layouts measured against stored: name -> convert options
LAYOUTS: dict[str, dict[str, Any]] = {
    "derived": {"derive_steering": "jasper-v1"},
    "derived, keyword stored": {"derive_steering": "jasper-v1", "keep_steering": ("keyword",)},
}


def pair_bytes_per_pair(path: Path) -> float:
    """Bytes of the pair-level arrays (everything but the embedding tables) per pair, from the
    manifest's records (exact)."""
    from jasper.dtypes import torch_dtype
    from jasper.manifest import Manifest
    from jasper.schema import ALL_ARRAYS, Role

    m = Manifest.load(path)
    total = 0
    for name, rec in m.arrays.items():
        if ALL_ARRAYS[name].role is Role.TABLE:
            continue
        n = torch_dtype(rec.dtype).itemsize
        for s in rec.shape:
            n *= int(s)
        total += n
    return total / int(m.arrays["pair_index"].shape[0])


def _layout_dir(stored: Path, layout: str) -> Path:
    slug = layout.replace(", ", "-").replace(" ", "-")
    return stored.parent / f"{stored.name}-{slug}"


@pytest.fixture(scope="module")
def datasets() -> dict[str, Path]:
    from jasper.store import convert

    base = base_preset(installed_presets())
    stored = ensure_dataset(POINT, base, CFG.seed)
    out = {"stored": stored}
    for layout, options in LAYOUTS.items():
        path = _layout_dir(stored, layout)
        if not (path / "config.json").is_file():
            convert(stored, path, to=base.backend, overwrite=True, progress=False, **options)
        out[layout] = path
    return out


def _serve(ds: Any, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for idx in batches:
        ds.__getitems__(idx)
    return time.perf_counter() - t0


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_derived_vs_stored(benchmark, datasets, layout, variant):
    """Target: a derived dataset serves >= 0.8x the samples/s of the stored one (same batches,
    alternating rounds, ``__getitems__`` of preloaded datasets)."""
    import jasper

    with jasper.JASPERSteeringDataset(datasets["stored"], "train", use_mmap=False) as stored, \
            jasper.JASPERSteeringDataset(datasets[layout], "train", use_mmap=False) as derived:
        n = len(stored)
        g = torch.Generator().manual_seed(CFG.seed)
        n_batches = max(2, min(40, CFG.samples(POINT) // BATCH))
        batches = [torch.randint(0, n, (BATCH,), generator=g) for _ in range(n_batches)]
        for ds in (stored, derived):
            ds.set_epoch(MIX_EPOCH)
            ds.force_steering(None if variant == "mix" else variant)
            ds.__getitems__(batches[0])  # warm-up: pages, allocator arenas, caches
        a, b = stored.__getitems__(batches[1]), derived.__getitems__(batches[1])
        for key in a:  # the same batch, bit for bit, or the comparison means nothing
            assert torch.equal(a[key], b[key]), f"{layout}: {key} differs from stored"
        stored_times: list[float] = []
        derived_times: list[float] = []

        def setup():  # the stored round runs just before each derived round
            stored_times.append(_serve(stored, batches))
            return (), {}

        def run():
            derived_times.append(_serve(derived, batches))

        benchmark.pedantic(run, setup=setup, rounds=max(3, CFG.rounds))
    samples = n_batches * BATCH
    stored_rate, derived_rate = samples / min(stored_times), samples / min(derived_times)
    tag(benchmark, 7, "derived_serving", POINT, layout=layout, variant=variant,
        batch_size=BATCH, samples=samples, stored_samples_s=stored_rate,
        derived_samples_s=derived_rate, ratio=derived_rate / stored_rate, target_ratio=TARGET,
        stored_pair_bytes=pair_bytes_per_pair(datasets["stored"]),
        pair_bytes=pair_bytes_per_pair(datasets[layout]))
    gc.collect()
