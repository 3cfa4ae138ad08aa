"""Measure the HDF5 backend against raw reads, jasper-pt and in-RAM gathers.

Not collected by pytest (no ``test_`` prefix). Run once, on a quiet machine::

    python packages/jasper-hdf5/tests/measure_hdf5.py --workdir /tmp/jasper-h5-measure

It synthesises one dataset (default 10^5 pairs, D=384, n_neg=8), writes it with jasper-pt and
converts it to hdf5 with each compression, then measures, with the page cache warm:

- file sizes against PT;
- preload: every array read into preallocated, already-touched tensors with ``read_into``,
  against ``open().readinto()`` of the same file bytes into a preallocated buffer and against
  jasper-pt's ``read_into`` (copies from its memory-mapped files); MB/s of decoded data;
- lazy mode: batches of 1024 random rows of every pair array with ``read_rows`` on a reader that
  never preloaded, against ``index_select`` on the same arrays in RAM.

Each timing is the median of ``--repeats`` runs. Results print as Markdown tables and are saved
as JSON beside the datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("JASPER_PROGRESS", "0")

import jasper
from jasper.schema import ARRAYS, PAIR_ARRAYS
from jasper.store import dir_size
from jasper.synth import SynthConfig, write_synthetic

MB = 1e6
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"compression": "none"},
    "lzf": {"compression": "lzf"},
    "gzip": {"compression": "gzip", "compression_level": 4},
    "lzf, chunk_rows=32": {"compression": "lzf", "chunk_rows": 32},
}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: page cache, allocator, lazily opened handles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def data_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and f.name != "config.json")


def raw_read_time(path: Path, repeats: int) -> tuple[float, int]:
    files = data_files(path)
    total = sum(f.stat().st_size for f in files)
    buf = np.zeros(total, dtype=np.uint8)  # touched, like the preload buffers
    view = memoryview(buf)

    def run() -> None:
        pos = 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                n = f.stat().st_size
                got = fh.readinto(view[pos : pos + n])
                assert got == n
                pos += n

    return median_time(run, repeats), total


def preload_time(path: Path, repeats: int) -> tuple[float, int]:
    reader = jasper.open_store(path)
    infos = {n: reader.info(n) for n in ARRAYS}
    out = {n: torch.zeros(i.shape, dtype=i.dtype) for n, i in infos.items()}

    def run() -> None:
        for n in ARRAYS:
            reader.read_into(n, out[n])

    t = median_time(run, repeats)
    reader.close()
    return t, sum(i.nbytes for i in infos.values())


def lazy_rate(read: Callable[[str, torch.Tensor], torch.Tensor], n_pairs: int, batch: int,
              budget_s: float, seed: int = 0) -> float:
    """Samples per second reading every pair array for random batches of ``batch`` rows."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n in PAIR_ARRAYS]

    def one() -> None:
        rows = torch.randint(0, n_pairs, (batch,), generator=g)
        for n in names:
            read(n, rows)

    one()
    done, t0 = 0, time.perf_counter()
    while done < 3 or (time.perf_counter() - t0 < budget_s and done < 200):
        one()
        done += 1
    return done * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/jasper-h5-measure"))
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--n-neg", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lazy-seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a small shared machine, OpenMP "
                    "synchronisation costs more than a 1024-row gather)")
    ap.add_argument("--keep", action="store_true", help="keep the datasets afterwards")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work: Path = args.workdir
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cfg = SynthConfig(n_pairs=args.pairs, embedding_dim=args.dim, n_neg=args.n_neg, seed=0)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "dataset": {"pairs": args.pairs, "dim": args.dim, "n_neg": args.n_neg},
        "h5py": __import__("h5py").version.version,
        "hdf5": __import__("h5py").version.hdf5_version,
        "torch": torch.__version__,
        "torch_threads": args.threads,
    }
    t0 = time.perf_counter()
    pt = write_synthetic(work / "pt", cfg, backend="pt")
    results["pt_write_s"] = time.perf_counter() - t0
    paths = {"pt": pt}
    writes = {}
    for name, opts in CONFIGS.items():
        t0 = time.perf_counter()
        report = jasper.convert(pt, work / name.replace(", ", "-").replace("=", ""),
                                to="hdf5", **opts)
        writes[name] = time.perf_counter() - t0
        paths[name] = report.dst

    sizes = {k: dir_size(p) for k, p in paths.items()}
    logical = None
    preload: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        t_raw, file_bytes = raw_read_time(path, args.repeats)
        t_pre, logical = preload_time(path, args.repeats)
        preload[name] = {"file_bytes": file_bytes, "raw_s": t_raw, "preload_s": t_pre,
                         "decoded_MBps": logical / t_pre / MB, "vs_raw": t_pre / t_raw}
    assert logical is not None

    # lazy mode: readers that never preloaded, against index_select on arrays in RAM
    with jasper.open_store(pt) as r:
        in_ram = {n: r.read(n) for n in PAIR_ARRAYS}
    lazy = {"in-RAM index_select": lazy_rate(lambda n, rows: in_ram[n].index_select(0, rows),
                                             args.pairs, args.batch, args.lazy_seconds)}
    for name, path in paths.items():
        with jasper.open_store(path, mmap=name == "pt") as r:
            lazy[f"{name} read_rows"] = lazy_rate(r.read_rows, args.pairs, args.batch,
                                                  args.lazy_seconds)
    results.update(sizes=sizes, logical_bytes=logical, convert_s=writes, preload=preload,
                   lazy_samples_per_s=lazy)
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nmachine: {results['machine']}; h5py {results['h5py']} / HDF5 {results['hdf5']}; "
          f"torch {results['torch']} ({args.threads} thread(s))")
    print(f"dataset: {args.pairs} pairs, D={args.dim}, n_neg={args.n_neg}, "
          f"{logical / MB:.1f} MB of arrays\n")
    print("| store | size MB | vs PT | write s | raw read ms | preload ms | preload / raw |"
          " decoded MB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in paths:
        p = preload[name]
        w = results["pt_write_s"] if name == "pt" else writes[name]
        print(f"| {name} | {sizes[name] / MB:.1f} | {sizes[name] / sizes['pt']:.3f} | {w:.1f} | "
              f"{p['raw_s'] * 1e3:.0f} | {p['preload_s'] * 1e3:.0f} | {p['vs_raw']:.2f} | "
              f"{p['decoded_MBps']:.0f} |")
    print(f"\nlazy batches of {args.batch} random rows of the {len(PAIR_ARRAYS)} pair arrays:\n")
    print("| reader | samples/s | vs in-RAM |")
    print("| --- | ---: | ---: |")
    base = lazy["in-RAM index_select"]
    for name, rate in lazy.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.3f} |")
    print(f"\nresults saved to {work / 'results.json'}")
    if not args.keep:
        for p in paths.values():
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
