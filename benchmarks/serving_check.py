"""Serving throughput check (a plain script): how close jasper's batches come to a raw gather.

Measures samples per second at batch 1024, D=384, n_neg=8 on a synthetic dataset for

  (a) the per-item reference dataset + ``default_collate`` (what the original system does),
  (b) jasper's batched CPU path (``create_loader``) with 0 and 2 workers,
  (c) a raw torch gather of the same rows into one preallocated buffer (the ceiling),

reported as ratios (targets: (b) >= 0.5 x (c) and >= 20 x (a)), the summed PSS of the loading
processes with 2 workers against 0 workers (target: within 10%), and, when CUDA is present,

  (d) the GPULoader (CUDA graph replay; eager and staged for reference) against
  (e) a bare on-device ``index_select`` loop over the same bytes (target: (d) >= 0.6 x (e)).

Usage: ``python benchmarks/serving_check.py [--pairs 200000] [--batches 40] [--json out.json]``.
The issue's size is 10^6 pairs; the default is smaller so it runs on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

os.environ.setdefault("JASPER_PROGRESS", "0")


def _rate(batches: Iterator[Any], n_batches: int, batch_size: int,
          sync: Callable[[], None] = lambda: None) -> float:
    """Samples/s over ``n_batches`` batches, after one warm-up batch (worker start, first
    touch of pages)."""
    next(batches)
    sync()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    sync()
    return n_batches * batch_size / (time.perf_counter() - t0)


def _cycle(make: Callable[[], Any]) -> Iterator[Any]:
    while True:
        yield from make()


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def raw_gather_rate(ds: Any, batch_size: int, n_batches: int, device: torch.device) -> float:
    """(c)/(e): the same rows gathered with bare ``index_select`` into preallocated buffers:
    the dataset's own tensors, no curriculum hash, no DataLoader, no dataset code."""
    n = len(ds)
    d, k, n_p = ds.embedding_dim, ds.n_neg, ds.n_pairs
    split = ds.split_indices
    q_col = ds.pair_index[:, 0].contiguous()
    s_col = ds.pair_index[:, 1].contiguous()
    table = ds._steering_table
    out = {
        "q": torch.empty(batch_size, d, device=device),
        "s": torch.empty(batch_size, d, device=device),
        "st": torch.empty(batch_size, d, device=device),
        "neg": torch.empty(batch_size * k, d, device=device),
        "c": torch.empty(batch_size, dtype=torch.int64, device=device),
        "r": torch.empty(batch_size, device=device),
        "dist": torch.empty(batch_size, device=device),
        "t": torch.empty(batch_size, k, dtype=torch.int64, device=device),
    }
    g = torch.Generator(device=device).manual_seed(0)
    order = torch.randperm(n, generator=g, device=device)
    variants = torch.randint(0, 4, (n,), generator=g, device=device)

    def step(i: int) -> None:
        lo = (i * batch_size) % max(1, n - batch_size)
        idx = order[lo : lo + batch_size]
        p = split.index_select(0, idx)
        torch.index_select(ds.question_embs, 0, q_col.index_select(0, p), out=out["q"])
        torch.index_select(ds.source_embs, 0, s_col.index_select(0, p), out=out["s"])
        v = variants.index_select(0, idx)
        rows = torch.where(v > 0, 1 + (v - 1) * n_p + p, torch.zeros_like(p))
        torch.index_select(table, 0, rows, out=out["st"])
        negs = ds.hard_negatives.index_select(0, p).reshape(-1)
        torch.index_select(ds.source_embs, 0, negs, out=out["neg"])
        torch.index_select(ds.pair_cluster_id, 0, p, out=out["c"])
        torch.index_select(ds.pair_relevance, 0, p, out=out["r"])
        torch.index_select(ds.centroid_distances, 0, p, out=out["dist"])
        torch.index_select(ds.negative_tiers, 0, p, out=out["t"])

    def batches() -> Iterator[None]:
        i = 0
        while True:
            step(i)
            i += 1
            yield None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _rate(batches(), n_batches, batch_size, sync)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--n-neg", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--ref-batches", type=int, default=4, help="timed batches for (a)")
    parser.add_argument("--data", type=Path, default=None, help="dataset directory (kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA part")
    args = parser.parse_args(argv)

    from jasper.dataset import JASPERSteeringDataset
    from jasper.gpu_loader import GPULoader
    from jasper.loader import create_loader
    from jasper.synth import SynthConfig, write_synthetic
    from jasper.testing.reference import ReferenceSteeringDataset

    tmp = None
    path = args.data
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="jasper-serving-"))
        path = tmp / "ds"
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}",
        "pairs": args.pairs, "dim": args.dim, "n_neg": args.n_neg, "batch": args.batch,
    }
    b, nb = args.batch, args.batches
    try:
        if not (path / "config.json").is_file():
            t0 = time.perf_counter()
            write_synthetic(path, SynthConfig(n_pairs=args.pairs, embedding_dim=args.dim,
                                              n_neg=args.n_neg, seed=0), progress=False)
            results["synth_seconds"] = round(time.perf_counter() - t0, 1)
        if not args.skip_cpu:
            cpu = torch.device("cpu")
            ds = JASPERSteeringDataset(path, "train", use_mmap=False)
            results["raw_c"] = raw_gather_rate(ds, b, nb, cpu)

            for workers in (0, 2):
                loader = create_loader(path, "train", batch_size=b, num_workers=workers,
                                       persistent_workers=workers > 0, use_mmap=False)
                it = _cycle(lambda loader=loader: loader)
                results[f"jasper_b_w{workers}"] = _rate(it, nb, b)
                pids = [os.getpid()]
                if workers:
                    pids += [w.pid for w in loader._iterator._workers]
                results[f"pss_w{workers}_bytes"] = sum(_pss(p) for p in pids)
                del it, loader

            ref = ReferenceSteeringDataset(path, "train")
            ref_loader = DataLoader(ref, batch_size=b, shuffle=True, collate_fn=default_collate)
            results["reference_a"] = _rate(_cycle(lambda: ref_loader), args.ref_batches, b)
            best_b = max(results["jasper_b_w0"], results["jasper_b_w2"])
            results["ratio_b0_over_c"] = results["jasper_b_w0"] / results["raw_c"]
            results["ratio_b2_over_c"] = results["jasper_b_w2"] / results["raw_c"]
            results["ratio_best_b_over_a"] = best_b / results["reference_a"]
            results["pss_ratio_w2_over_w0"] = (results["pss_w2_bytes"]
                                               / max(1, results["pss_w0_bytes"]))
            ds.close()

        if torch.cuda.is_available():
            dev = torch.device("cuda")
            results["gpu"] = torch.cuda.get_device_name(dev)
            gds = JASPERSteeringDataset(path, "train", device=dev)
            sync = torch.cuda.synchronize
            results["bare_e"] = raw_gather_rate(gds, b, nb * 5, dev)
            for graph in (True, False):
                gl = GPULoader(gds, b, shuffle=True, drop_last=True, cuda_graph=graph)
                results[f"gpu_loader_d_graph{int(graph)}"] = _rate(
                    _cycle(lambda gl=gl: gl), nb * 5, b, sync)
            results["ratio_d_over_e"] = results["gpu_loader_d_graph1"] / results["bare_e"]
            gds.close()
            cds = JASPERSteeringDataset(path, "train")
            staged = GPULoader(cds, b, shuffle=True, drop_last=True, device=dev)
            results["gpu_loader_staged"] = _rate(_cycle(lambda: staged), nb, b, sync)
            cds.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    for key, value in results.items():
        if isinstance(value, float) and key != "synth_seconds":
            fmt = f"{value:,.0f} samples/s" if not key.startswith(("ratio", "pss_ratio")) \
                else f"{value:.3f}"
            print(f"{key:28s} {fmt}")
        elif key.startswith("pss") and isinstance(value, int):
            print(f"{key:28s} {value / 2**20:,.0f} MiB")
        else:
            print(f"{key:28s} {value}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
