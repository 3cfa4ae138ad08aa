"""Derived against stored steering (a plain script): bytes per pair and serving speed.

For D in {384, 1024} it writes the same synthetic dataset three times (``jasper synth``'s
pipeline: stored steering, derived steering, and derived with the keyword variant kept stored
(``--keep-steering keyword``); bit-identical batches) and reports

  - bytes per pair of the pair-level arrays (from the manifests: exact), on disk (the whole
    directory / N_p) and in RAM (a preloaded dataset's ``memory_bytes()`` / N_p),
  - CPU serving samples/s of the batched gather (``__getitems__``, B=1024, random positions)
    with the schedule's late mix (epoch 40: 0 zero / 0.2 centroid / 0.4 keyword / 0.4
    residual, the heaviest for derived steering) and per forced variant, stored and derived
    measured alternately in one run (target: derived >= 0.8 x stored), for both derived
    datasets,
  - the largest pair count whose pair-level arrays preload into 16 GB, either way (arithmetic
    from the bytes per pair; the tables, shared by many pairs, are listed separately).

Usage: ``python benchmarks/derived_steering.py [--pairs 100000] [--dims 384 1024] [--json F]``.
Uses the ``pt`` backend (any installed writer serves the same batches; the kit proves it).
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
VARIANTS: tuple[str | None, ...] = (None, "centroid", "keyword", "residual")
#: The datasets compared: name -> the variants a derived one keeps stored (None: stored).
KINDS: dict[str, tuple[str, ...] | None] = {"stored": None, "derived": (),
                                            "derived, keyword stored": ("keyword",)}
DERIVED_KINDS: tuple[str, ...] = tuple(k for k, v in KINDS.items() if v is not None)


def _pair_bytes(manifest: Any) -> tuple[int, int]:
    """(bytes of the pair-level arrays, bytes of the tables) from the manifest's records."""
    from jasper.dtypes import torch_dtype
    from jasper.schema import ALL_ARRAYS, Role

    pair = table = 0
    for name, rec in manifest.arrays.items():
        n = torch_dtype(rec.dtype).itemsize
        for s in rec.shape:
            n *= int(s)
        if ALL_ARRAYS[name].role is Role.TABLE:
            table += n
        else:
            pair += n  # pair arrays, CSR keyword ids, splits, exceptions: all grow with N_p
    return pair, table


def _rate(ds: Any, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process). On a shared machine
    the CPU-time rate is the stable one: other processes' load stretches wall time only."""
    ds.__getitems__(batches[0])  # warm-up: first touch of pages and allocator arenas
    t0, c0 = time.perf_counter(), time.process_time()
    for idx in batches:
        ds.__getitems__(idx)
    n = sum(int(b.numel()) for b in batches)
    return n / (time.perf_counter() - t0), n / max(1e-9, time.process_time() - c0)


def measure(root: Path, pairs: int, dim: int, n_batches: int, batch: int,
            rounds: int) -> dict[str, Any]:
    import jasper
    from jasper.manifest import Manifest
    from jasper.store import dir_size
    from jasper.synth import SynthConfig, write_synthetic

    out: dict[str, Any] = {"pairs": pairs, "dim": dim, "batch": batch}
    paths = {}
    for kind, keep in KINDS.items():
        cfg = SynthConfig(n_pairs=pairs, embedding_dim=dim, n_neg=8, seed=0,
                          derived_steering=keep is not None, keep_steering=keep or ())
        path = write_synthetic(root / f"{kind.replace(', ', '-').replace(' ', '-')}-{dim}", cfg,
                               backend="pt", overwrite=True)
        paths[kind] = path
        pair_b, table_b = _pair_bytes(Manifest.load(path))
        with jasper.JASPERSteeringDataset(path, "train", use_mmap=False) as ds:
            ram = ds.memory_bytes()
        out[kind] = {"pair_bytes_per_pair": pair_b / pairs, "table_bytes": table_b,
                     "disk_bytes_per_pair": dir_size(path) / pairs, "ram_bytes_per_pair":
                     ram / pairs, "max_pairs_16GB_pair_arrays": int(GB16 // (pair_b / pairs))}
    g = torch.Generator().manual_seed(0)
    opened = {k: jasper.JASPERSteeringDataset(p, "train", use_mmap=False)
              for k, p in paths.items()}
    try:
        n = len(opened["stored"])
        batches = [torch.randint(0, n, (batch,), generator=g) for _ in range(n_batches)]
        rates: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for variant in VARIANTS:
            key = variant or "schedule@40"
            rates[key] = {k: [] for k in KINDS}
            for ds in opened.values():
                ds.set_epoch(40)
                ds.force_steering(variant)
            for _ in range(rounds):  # alternate, so drift hits every dataset alike
                for k, ds in opened.items():
                    rates[key][k].append(_rate(ds, batches))
    finally:
        for ds in opened.values():
            ds.close()
    out["serving"] = {}
    for key, v in rates.items():
        best = {k: (max(r[0] for r in v[k]), max(r[1] for r in v[k])) for k in KINDS}
        row: dict[str, Any] = {"stored": best["stored"][0], "stored_cpu": best["stored"][1]}
        for k in DERIVED_KINDS:
            row[k] = best[k][0]
            row[f"{k} cpu"] = best[k][1]
            row[f"{k} ratio"] = best[k][0] / best["stored"][0]
            row[f"{k} ratio_cpu"] = best[k][1] / best["stored"][1]
        out["serving"][key] = row
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| D | steering | pair-level B/pair | disk B/pair | RAM B/pair (preloaded) | "
             "max pairs in 16 GB (pair arrays) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for kind in KINDS:
            k = r[kind]
            lines.append(f"| {r['dim']} | {kind} | {k['pair_bytes_per_pair']:,.0f} | "
                         f"{k['disk_bytes_per_pair']:,.0f} | {k['ram_bytes_per_pair']:,.0f} | "
                         f"{k['max_pairs_16GB_pair_arrays']:,} |")
    lines += ["", "| D | variant mix | steering | samples/s | / stored | samples/CPU-s "
              "| / stored (CPU) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for key, v in r["serving"].items():
            lines.append(f"| {r['dim']} | {key} | stored | {v['stored']:,.0f} | 1.00 | "
                         f"{v['stored_cpu']:,.0f} | 1.00 |")
            for k in DERIVED_KINDS:
                lines.append(f"| {r['dim']} | {key} | {k} | {v[k]:,.0f} | "
                             f"{v[f'{k} ratio']:.2f} | {v[f'{k} cpu']:,.0f} | "
                             f"{v[f'{k} ratio_cpu']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--dims", type=int, nargs="+", default=[384, 1024])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path, help="where the datasets go (default: a temp dir)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the CPU-time rates are then per core)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="jasper-derived-"))
    try:
        results = [measure(root, args.pairs, d, args.batches, args.batch, args.rounds)
                   for d in args.dims]
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    doc = {"machine": {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, "results": results}
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
