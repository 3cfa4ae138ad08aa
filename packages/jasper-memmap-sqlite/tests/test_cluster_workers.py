"""ClusterLabeledDataset with real DataLoader workers: batches, true cache statistics, and label
updates racing against readers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper_memmap_sqlite import ClusterLabeledDataset, write_cluster_labeled


def test_loader_batches_come_from_getitems(cluster_dir: Path) -> None:
    ds = ClusterLabeledDataset(cluster_dir, label_type="steering")
    loader = ds.loader(batch_size=32, shuffle=True, num_workers=2,
                       generator=torch.Generator().manual_seed(0))
    seen, bases = [], []
    for base, _steering, label in loader:
        assert base.shape[1:] == (16,) and label.shape[1:] == (6,)
        bases.append(base)
        seen.append(label)
    assert sum(b.shape[0] for b in bases) == 300
    direct = ds.__getitems__(list(range(300)))
    # every item exactly once: compare sorted rows
    got = torch.cat(bases)
    order = torch.argsort(got[:, 0])
    assert torch.equal(got[order], direct[0][torch.argsort(direct[0][:, 0])])


def _drain(loader: torch.utils.data.DataLoader, epochs: int) -> int:
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch[3]["sample_id"])
    return n


@pytest.mark.parametrize("ctx", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_cache_statistics_include_the_workers(cluster_dir: Path, ctx: str) -> None:
    """The original reported zero hits in the main process whatever its workers did."""
    ds = ClusterLabeledDataset(cluster_dir, return_metadata=True, cache_size=300)
    # shuffle off + persistent workers: each worker gets the same batches in both epochs, so
    # epoch 1 misses every item and epoch 2 hits every item
    loader = ds.loader(batch_size=25, num_workers=2, persistent_workers=True,
                       multiprocessing_context=ctx)
    assert _drain(loader, 2) == 600
    s = ds.get_cache_stats()
    assert (s["cache_hits"], s["cache_misses"]) == (300, 300), s
    assert s["hit_rate"] == 0.5
    assert s["processes"] == 2  # the two workers; the main process looked nothing up
    assert sorted(s["process_cache_sizes"].values()) == [150, 150]
    assert s["cache_size"] == 0  # the main process itself read nothing
    del loader


def test_prefilled_cache_is_inherited_by_forked_workers(cluster_dir: Path) -> None:
    ds = ClusterLabeledDataset(cluster_dir, return_metadata=True, cache_size=300)
    assert ds.prefill_cache() == 300
    loader = ds.loader(batch_size=50, num_workers=2, multiprocessing_context="fork")
    assert _drain(loader, 1) == 300
    s = ds.get_cache_stats()
    assert (s["cache_hits"], s["cache_misses"]) == (300, 0), s


def test_small_cache_counts_in_workers(cluster_dir: Path) -> None:
    ds = ClusterLabeledDataset(cluster_dir, return_metadata=True, cache_size=0)
    loader = ds.loader(batch_size=30, num_workers=2, shuffle=True)
    assert _drain(loader, 2) == 600
    s = ds.get_cache_stats()
    assert (s["cache_hits"], s["cache_misses"]) == (0, 600)


@pytest.fixture()
def flat_labels(tmp_path: Path) -> Path:
    """Every label row is constant (all n_clusters entries equal), so a torn row, half old and
    half new, is visible as a row whose entries differ."""
    n, c = 64, 1024  # 4 KiB label rows: a copy of one is many stores, not one
    rows = np.repeat(np.arange(n, dtype=np.float32)[:, None], c, axis=1)
    return write_cluster_labeled(
        tmp_path / "flat", base_embeddings=np.zeros((n, 4), np.float32),
        steering_embeddings=np.zeros((n, 4), np.float32), source_labels=rows,
        steering_labels=rows, combined_labels=rows, sample_type=["source"] * n,
        text=[str(i) for i in range(n)])


def test_update_labels_while_workers_read_never_tears(flat_labels: Path) -> None:
    ds = ClusterLabeledDataset(flat_labels)
    n = len(ds)
    loader = ds.loader(batch_size=16, shuffle=True, num_workers=2, persistent_workers=True)
    written: dict[int, set[float]] = {i: {float(i)} for i in range(n)}
    stop = threading.Event()
    errors: list[BaseException] = []
    final: dict[int, float] = {}

    def writer() -> None:
        try:
            k = 0
            while not stop.is_set() and k < 400:
                sid = k % n + 1
                value = float(1000 + k)
                written[sid - 1].add(value)
                ds.update_labels(sid, combined_label=np.full(1024, value, np.float32))
                final[sid - 1] = value
                k += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    torn, batches = 0, 0
    try:
        for _ in range(6):
            for _base, _steering, label in loader:
                batches += 1
                torn += int((label != label[:, :1]).any(dim=1).sum())
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert final, "the writer made no update while the workers were reading"
    assert batches == 24
    assert torn == 0, f"{torn} label rows were read half old, half new"
    # nothing was lost: a fresh open sees the last value written to every row
    with ClusterLabeledDataset(flat_labels) as again:
        labels = again.__getitems__(list(range(n)))[2]
        for row, value in final.items():
            assert float(labels[row, 0]) == value
            assert bool((labels[row] == value).all())
    # every value a reader saw was one the writer wrote (or the original)
    ds2 = ClusterLabeledDataset(flat_labels)
    seen = ds2.__getitems__(list(range(n)))[2][:, 0].tolist()
    for row, v in enumerate(seen):
        assert v in written[row]


def test_worker_read_waits_for_a_label_write_in_progress(flat_labels: Path) -> None:
    """Deterministic version of the race: the main process stops half-way through writing a
    label row while holding the writer's lock; a DataLoader worker that starts reading then
    must wait and see the whole new row, never the half-written one."""
    ds = ClusterLabeledDataset(flat_labels)
    n = len(ds)
    loader = ds.loader(batch_size=n, num_workers=2)
    import fcntl

    e = ds.reader.entries["combined_labels"]
    rw = np.memmap(flat_labels / e.file, dtype=np.float32, mode="r+", offset=e.data_offset,
                   shape=e.shape)
    got: list[torch.Tensor] = []
    with ds.reader._row_store._locked(fcntl.LOCK_EX):  # what write_rows holds while it writes
        rw[5, :512] = 777.0  # half of the row is new
        rw.flush()
        batches = iter(loader)  # workers start and try to read every row
        reader = threading.Thread(target=lambda: got.append(next(batches)[2]))
        reader.start()
        reader.join(1.0)
        assert reader.is_alive() and not got, "a worker read labels while a write held the lock"
        rw[5, 512:] = 777.0
        rw.flush()
    reader.join(60)
    assert got and bool((got[0][5] == 777.0).all())
