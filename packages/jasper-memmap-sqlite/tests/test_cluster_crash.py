"""A label update killed at any point is one atomic change: after SIGKILL, every sample holds
all of its old labels or all of its new ones, and deep validation passes."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from jasper.validation import validate
from jasper_memmap_sqlite import ClusterLabeledDataset, write_cluster_labeled

N, C = 16, 256


def _flat_dataset(path: Path) -> Path:
    """Sample i's three label rows all hold the constant i: a torn row, or one label type
    ahead of another, shows as unequal values."""
    rows = np.repeat(np.arange(N, dtype=np.float32)[:, None], C, axis=1)
    return write_cluster_labeled(
        path, base_embeddings=np.zeros((N, 4), np.float32),
        steering_embeddings=np.zeros((N, 4), np.float32), source_labels=rows,
        steering_labels=rows, combined_labels=rows, sample_type=["source"] * N,
        text=[str(i) for i in range(N)])


def _update_forever(path: str, seed: int, fd: int) -> None:
    """Child process: update all three labels of random samples, one call at a time, and
    report each finished call on the pipe."""
    ds = ClusterLabeledDataset(path)
    rng = random.Random(seed)
    k = 0
    while True:
        value = np.full(C, float(seed * 10_000 + k), np.float32)
        ds.update_labels(rng.randrange(1, N + 1), source_label=value, steering_label=value,
                         combined_label=value)
        os.write(fd, b"x")
        k += 1


def _assert_consistent(ds: ClusterLabeledDataset) -> None:
    labels = ds.__getitems__(list(range(N)))[3]
    src, steer, comb = (labels[f"{t}_label"] for t in ("source", "steering", "combined"))
    for name, t in (("source", src), ("steering", steer), ("combined", comb)):
        torn = (t != t[:, :1]).any(dim=1)
        assert not bool(torn.any()), f"{name} label rows {torch.nonzero(torn).tolist()} are torn"
    assert torch.equal(src, steer) and torch.equal(src, comb), \
        "a sample shows new labels of one type and old labels of another"


def test_sigkill_mid_update_leaves_all_old_or_all_new(tmp_path: Path) -> None:
    path = _flat_dataset(tmp_path / "flat")
    ctx = mp.get_context("fork")
    # how long one call takes here, so that kills land inside calls
    with ClusterLabeledDataset(path) as probe:
        t0 = time.perf_counter()
        for i in range(3):
            v = np.full(C, float(i), np.float32)
            probe.update_labels(i + 1, source_label=v, steering_label=v, combined_label=v)
        call = (time.perf_counter() - t0) / 3
    watcher = ClusterLabeledDataset(path, return_metadata=True)  # stays open across the kills
    rng = random.Random(0)
    interrupted = 0
    kills = 30
    for i in range(kills):
        r, w = os.pipe()
        child = ctx.Process(target=_update_forever, args=(str(path), i + 1, w), daemon=True)
        child.start()
        os.close(w)
        assert os.read(r, 1) == b"x"  # a first call finished: the next one is under way
        time.sleep(rng.uniform(0.0, 1.5 * call))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        os.close(r)
        interrupted += int((path / "rows.pending").exists())
        _assert_consistent(watcher)  # an open reader rolls the dead change back itself
        with ClusterLabeledDataset(path, return_metadata=True) as fresh:
            _assert_consistent(fresh)
        assert not (path / "rows.pending").exists()
        report = validate(path, deep=True)
        assert report.ok and report.checksums_verified == 17
    watcher.close()
    # the test is only worth something if kills landed inside the journaled part of calls
    assert interrupted >= kills // 5, f"only {interrupted} of {kills} kills interrupted a change"
