"""Compact against int64 index arrays (a plain script): bytes per pair and serving speed.

For D in {384, 1024}, stored and derived steering, and each backend asked for, it writes the
same synthetic dataset twice (``jasper synth``'s pipeline, once with int64 index arrays and once
compact: int32 ids, int8 tiers; batches are bit-identical, the conformance kit proves it) and
reports

  - bytes per pair of the index arrays and of all pair-level arrays (from the manifests: exact),
  - bytes per pair on disk (the whole directory / N_p, synth tables included) and in RAM (a
    preloaded dataset's ``memory_bytes()`` / N_p),
  - CPU serving samples/s of the batched gather (``__getitems__``, B=1024, random positions,
    the schedule's mix at epoch 40), int64 and compact measured alternately in one run,
  - the pair count whose pair-level arrays preload into 16 GB, and the 10^9-pair total.

Usage: ``python benchmarks/compact_indices.py [--pairs 20000] [--dims 384 1024]
[--backends pt hdf5] [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("JASPER_PROGRESS", "0")

GB16 = 16 * 10**9


def _bytes(manifest: Any) -> dict[str, int]:
    """Bytes of the index arrays, of every pair-level array and of the tables (manifest)."""
    from jasper.dtypes import torch_dtype
    from jasper.index_dtypes import INDEX_ARRAYS
    from jasper.schema import ALL_ARRAYS, Role

    out = {"index": 0, "pair": 0, "table": 0}
    for name, rec in manifest.arrays.items():
        n = torch_dtype(rec.dtype).itemsize
        for s in rec.shape:
            n *= int(s)
        if ALL_ARRAYS[name].role is Role.TABLE:
            out["table"] += n
        else:
            out["pair"] += n  # pair arrays, CSR keyword ids, splits, exceptions: grow with N_p
        if name in INDEX_ARRAYS:
            out["index"] += n
    return out


def _rate(ds: Any, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process)."""
    ds.__getitems__(batches[0])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in batches:
        ds.__getitems__(idx)
    n = sum(int(b.numel()) for b in batches)
    return n / (time.perf_counter() - t0), n / max(1e-9, time.process_time() - c0)


def measure(root: Path, pairs: int, dim: int, derived: bool, backend: str, n_batches: int,
            batch: int, rounds: int) -> dict[str, Any]:
    import jasper
    from jasper.manifest import Manifest
    from jasper.store import dir_size
    from jasper.synth import SynthConfig, write_synthetic

    out: dict[str, Any] = {"pairs": pairs, "dim": dim, "backend": backend,
                           "steering": "derived" if derived else "stored", "batch": batch}
    paths = {}
    for kind in ("int64", "compact"):
        cfg = SynthConfig(n_pairs=pairs, embedding_dim=dim, n_neg=8, seed=0,
                          derived_steering=derived, compact_indices=kind == "compact")
        path = write_synthetic(root / f"{kind}-{dim}-{derived}-{backend}", cfg, backend=backend,
                               overwrite=True)
        paths[kind] = path
        b = _bytes(Manifest.load(path))
        with jasper.JASPERSteeringDataset(path, "train", use_mmap=False) as ds:
            ram = ds.memory_bytes()
        out[kind] = {
            "index_bytes_per_pair": b["index"] / pairs,
            "pair_bytes_per_pair": b["pair"] / pairs,
            "table_bytes": b["table"],
            "disk_bytes_per_pair": dir_size(path) / pairs,
            "ram_bytes_per_pair": ram / pairs,
            "max_pairs_16GB_pair_arrays": int(GB16 // (b["pair"] / pairs)),
            "tb_at_1e9_pairs_pair_arrays": b["pair"] / pairs * 1e9 / 1e12,
        }
    g = torch.Generator().manual_seed(0)
    with jasper.JASPERSteeringDataset(paths["int64"], "train", use_mmap=False) as w, \
            jasper.JASPERSteeringDataset(paths["compact"], "train", use_mmap=False) as c:
        n = len(w)
        batches = [torch.randint(0, n, (batch,), generator=g) for _ in range(n_batches)]
        w.set_epoch(40)
        c.set_epoch(40)
        rates: dict[str, list[tuple[float, float]]] = {"int64": [], "compact": []}
        for _ in range(rounds):  # alternate, so both see the same machine load
            rates["int64"].append(_rate(w, batches))
            rates["compact"].append(_rate(c, batches))
        best = {k: (max(r[0] for r in v), max(r[1] for r in v)) for k, v in rates.items()}
        out["serving"] = {
            "int64_samples_per_s": best["int64"][0],
            "compact_samples_per_s": best["compact"][0],
            "int64_samples_per_cpu_s": best["int64"][1],
            "compact_samples_per_cpu_s": best["compact"][1],
            "ratio_wall": best["compact"][0] / best["int64"][0],
            "ratio_cpu": best["compact"][1] / best["int64"][1],
        }
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 1024])
    ap.add_argument("--backends", nargs="+", default=["pt", "hdf5"])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="jasper-compact-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for dim in args.dims:
            for derived in (False, True):
                for backend in args.backends:
                    r = measure(root, args.pairs, dim, derived, backend, args.batches,
                                args.batch, args.rounds)
                    results.append(r)
                    w, c, s = r["int64"], r["compact"], r["serving"]
                    print(f"D={dim} {r['steering']:7s} {backend:5s} index B/pair "
                          f"{w['index_bytes_per_pair']:.0f} -> {c['index_bytes_per_pair']:.0f}, "
                          f"pair {w['pair_bytes_per_pair']:.0f} -> {c['pair_bytes_per_pair']:.0f}, "
                          f"disk {w['disk_bytes_per_pair']:.0f} -> "
                          f"{c['disk_bytes_per_pair']:.0f}, RAM {w['ram_bytes_per_pair']:.0f} -> "
                          f"{c['ram_bytes_per_pair']:.0f}; serving compact/int64 "
                          f"{s['ratio_cpu']:.2f} (cpu) {s['ratio_wall']:.2f} (wall), "
                          f"{s['compact_samples_per_s']:.0f} vs {s['int64_samples_per_s']:.0f}/s",
                          flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__, "torch_threads": 1},
           "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
