"""Memory probe, run in a fresh interpreter so that nothing else the suite did is counted.

    python -m benchlib.memprobe PATH [--mmap] [--workers 0 2] [--batch-size B]

Opens PATH with ``JASPERSteeringDataset(..., use_mmap=...)`` and records the resident set size
before and after; then, for each worker count in turn (worker processes, then worker threads as
``create_loader`` starts them for data in memory), serves one epoch of the train split through
jasper's loaders and records the summed proportional set size of this process and its workers
(shared pages counted once in total) after the epoch, and its peak during the epoch (sampled
every few batches: the batches in flight), before shutting them down.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

#: batches between two samples of the peak (a sample reads every process's smaps_rollup)
PEAK_EVERY = 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("--mmap", action="store_true")
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args(argv)

    from benchlib.contenders import Unavailable, dataloader, index_stream, jasper_dataset
    from benchlib.measure import child_pids, pss_bytes, rss_bytes

    try:
        from jasper.allocator import IDLE_RELEASE_S as idle_s
    except ImportError:  # a revision before the idle release
        idle_s = 0.0
    gc.collect()
    out: dict = {"rss_before": rss_bytes(), "pss": {}, "pss_peak": {}, "procs": {},
                 "epoch_s": {}}
    t0 = time.perf_counter()
    ds = jasper_dataset(args.path, use_mmap=args.mmap)
    out["open_s"] = time.perf_counter() - t0
    gc.collect()
    out["rss_after"] = rss_bytes()
    n = len(ds)
    b = min(args.batch_size, n)
    stream = index_stream(n, b, max(1, n // b))
    runs = [(w, t) for w in args.workers for t in (("process", "thread") if w else ("none",))]
    for workers, kind in runs:
        try:
            loader = dataloader(ds, stream, workers, worker_type=kind, jasper_loader=True)
        except Unavailable:
            continue
        label = f"{workers} {'processes' if kind == 'process' else 'threads'}" if workers else "0"
        it = iter(loader)
        peak = 0
        t0 = time.perf_counter()
        _batch = None
        for i, _batch in enumerate(it):
            if i % PEAK_EVERY == PEAK_EVERY - 1:
                peak = max(peak, pss_bytes([os.getpid(), *child_pids()]))
        out["epoch_s"][label] = time.perf_counter() - t0
        # no batch outlives its epoch here: a loop variable still bound to the last batch
        # (70 MB at B=4096) was counted in this worker count's memory, and again in the next
        # count's, whose forked workers inherit it and keep it once this process frees it
        del _batch
        gc.collect()
        # memory between epochs: jasper's loaders hand the batches' heap back once idle
        time.sleep(idle_s + 0.5 if idle_s else 0.0)
        pids = [os.getpid(), *child_pids()]
        out["pss_peak"][label] = max(peak, pss_bytes(pids))
        out["procs"][label] = len(pids)
        out["pss"][label] = pss_bytes(pids)
        # persistent worker processes belong to the DataLoader's iterator, which a JasperLoader
        # keeps as the DataLoader does: stop them before the next worker count is measured
        for owner in (it, getattr(loader, "_iterator", None)):
            if hasattr(owner, "_shutdown_workers"):
                owner._shutdown_workers()
        del it, loader
        gc.collect()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
