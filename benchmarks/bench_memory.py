"""Question 2: memory. RSS growth from opening a dataset against the data's bytes; summed PSS of
the main process and its DataLoader workers after one epoch with each worker count (issue 3's
target: 2 workers within 10% of 0), and its peak during the epoch. jasper's loaders serve every
worker count, so "after the epoch" includes their release of the heap the batches used.

Each case runs in a fresh interpreter (``benchlib.memprobe``) so the suite's own allocations are
not counted; the benchmark's time is that probe's wall time. The worker counts are measured one
after the other in that interpreter, each after its own epoch, with the previous workers shut down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from benchlib.config import ENV_CONFIG, load_config
from benchlib.contenders import Unavailable, optional_import
from benchlib.data import base_preset, data_bytes, dataset_cases, ensure_dataset, installed_presets
from benchlib.record import case_id, tag

CFG = load_config()
FIRST = [(p, b) for p, b in dataset_cases(CFG.grid) if b.first]
if not CFG.memory_all_backends:
    _base = base_preset(installed_presets())
    FIRST = [(p, b) for p, b in FIRST if b == _base]
CASES = [(p, b, m) for p, b in FIRST for m in ([False, True] if b.mmap else [False])]
BENCH_DIR = Path(__file__).resolve().parent


def _probe(*args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), env.get("PYTHONPATH", "")])
    env[ENV_CONFIG] = CFG.to_json()
    done = subprocess.run([sys.executable, "-m", "benchlib.memprobe", *args], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("point", "preset", "mapped"), CASES,
                         ids=[case_id(p, b, "mmap" if m else "preload") for p, b, m in CASES])
def test_memory(benchmark, point, preset, mapped):
    try:
        optional_import("jasper.dataset", "jasper's dataset module has not landed yet")
    except Unavailable as exc:
        pytest.skip(str(exc))
    path = ensure_dataset(point, preset, CFG.seed)
    args = [str(path), "--batch-size", str(max(CFG.batch_sizes)),
            "--workers", *map(str, CFG.worker_counts)]
    if mapped:
        args.append("--mmap")
    got = benchmark.pedantic(_probe, args=tuple(args), rounds=1)
    tag(benchmark, 2, "memory", point, preset, mapped=mapped, data_bytes=data_bytes(path),
        rss_delta=got["rss_after"] - got["rss_before"], open_s=got["open_s"],
        pss=got["pss"], pss_peak=got["pss_peak"], procs=got["procs"], epoch_s=got["epoch_s"])
