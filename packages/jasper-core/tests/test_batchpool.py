"""Worker batches in reused shared-memory buffers (jasper.batchpool): a buffer goes back to its
worker only once the receiving process holds nothing of the batch, so a batch, a view of it or a
numpy array of it never changes under the user."""

from __future__ import annotations

import copy
import gc
import multiprocessing
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing  # registers the tensor reducers with ForkingPickler
from torch.utils.data import DataLoader, Dataset

from jasper import batchpool
from jasper.dataset import JasperBatch, JASPERSteeringDataset

B = 32


def _layout() -> batchpool.BatchLayout:
    return batchpool.BatchLayout.of({"a": ((B, 8), torch.float32), "t": ((B, 3), torch.int64)})


def _leased(pool: batchpool.BatchPool, value: float) -> tuple[JasperBatch, int]:
    fields, lease = pool.acquire(_layout())
    assert lease is not None
    fields["a"].fill_(value)
    fields["t"].fill_(int(value))
    batch = JasperBatch(fields)
    batch.lease = (lease.flags, lease.slot, "a")
    return batch, lease.slot


def test_layout_puts_every_field_in_one_aligned_buffer() -> None:
    layout = _layout()
    views = layout.views(torch.UntypedStorage(layout.nbytes))
    ptrs = {v.untyped_storage().data_ptr() for v in views.values()}
    assert len(ptrs) == 1
    assert all(v.is_contiguous() for v in views.values())
    assert [o % batchpool.ALIGN for *_, o in layout.fields] == [0, 0]
    assert views["t"].data_ptr() - views["a"].data_ptr() == B * 8 * 4


def test_a_given_back_slot_is_reused_only_when_nothing_here_refers_to_it() -> None:
    """The receiver gave the buffer back (its finalizer clears the flag, as ``release`` does
    here), but this process may still hold a view or a numpy array of the batch."""
    pool = batchpool.BatchPool(idle_release_s=0)
    batch, slot = _leased(pool, 1.0)
    view = batch["a"][3:5]
    array = batch["t"].numpy()[1:]
    pool.release(batchpool.Lease(batch.lease[0], slot))
    del batch
    gc.collect()
    _other, other_slot = _leased(pool, 2.0)
    assert other_slot != slot
    del view
    gc.collect()
    _, third = _leased(pool, 3.0)
    assert third not in (slot, other_slot)  # the numpy array holds it still
    assert (array == 1).all()
    del array
    gc.collect()
    _fields, lease = pool.acquire(_layout())
    assert lease is not None and lease.slot == slot  # reused: nothing new is mapped
    assert pool.slots() == 3


def test_an_idle_pool_drops_its_free_buffers_and_keeps_busy_ones() -> None:
    pool = batchpool.BatchPool(idle_release_s=0.2)
    busy, _ = _leased(pool, 1.0)
    free, slot = _leased(pool, 2.0)
    pool.release(batchpool.Lease(free.lease[0], slot))
    del free
    gc.collect()
    deadline = time.monotonic() + 30
    while pool.slots() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.slots() == 1  # the busy batch's buffer stays, and its values with it
    assert torch.equal(busy["a"], torch.ones(B, 8))
    _again, again_slot = _leased(pool, 3.0)  # a dropped slot is made again when next used
    assert again_slot == slot and pool.slots() == 2


def test_the_slot_waits_for_every_storage_object_of_the_buffer() -> None:
    """Should a receiver get one buffer as several storage objects (``from_numpy`` makes one
    per call), the slot comes back only when the last of them is gone."""
    flags = torch.ones(4, dtype=torch.int32)
    buffer = np.zeros(16, dtype=np.float32)
    items = batchpool.rebuild_leased({"a": torch.from_numpy(buffer), "b": torch.from_numpy(buffer),
                                      "other": torch.zeros(3)}, flags, 2, "b")
    assert items["a"].untyped_storage() is not items["b"].untyped_storage()
    del items["b"]
    gc.collect()
    assert int(flags[2]) == 1  # "a" still maps the buffer
    del items["other"]
    gc.collect()
    assert int(flags[2]) == 1
    del items["a"]
    gc.collect()
    assert flags.tolist() == [1, 1, 0, 1]


def test_a_received_batch_is_an_ordinary_batch() -> None:
    pool = batchpool.BatchPool(idle_release_s=0)
    batch, _ = _leased(pool, 1.0)
    got = ForkingPickler.loads(bytes(ForkingPickler.dumps(batch)))
    assert type(got) is JasperBatch and got.lease is None
    assert torch.equal(got["a"], torch.ones(B, 8)) and torch.equal(got["t"], batch["t"])


def test_a_batch_never_sent_keeps_its_slot_and_the_pool_falls_back_to_fresh_buffers() -> None:
    pool = batchpool.BatchPool(idle_release_s=0)
    for _ in range(batchpool.SLOTS):
        _leased(pool, 0.0)  # dropped without being sent: no receiver ever gives them back
    gc.collect()
    fields, lease = pool.acquire(_layout())
    assert lease is None and fields["a"].is_shared()
    assert pool.slots() == batchpool.SLOTS


def test_changing_batch_sizes_reuse_free_buffers_of_other_sizes() -> None:
    """A sampler whose batch sizes vary must not make a worker hold a buffer per size."""
    pool = batchpool.BatchPool(idle_release_s=0)
    held = []
    for size in range(1, 3 * batchpool.SLOTS):
        layout = batchpool.BatchLayout.of({"a": ((size, 8), torch.float32)})
        fields, lease = pool.acquire(layout)
        assert lease is not None  # every earlier slot was given back: one is always free
        assert fields["a"].shape == (size, 8)
        fields["a"].fill_(size)
        if size % 5 == 0:
            held.append((size, fields["a"]))  # kept here: its slot stays taken
        else:
            del fields
            gc.collect()
            pool.release(lease)
        assert pool.slots() <= batchpool.SLOTS
    for size, t in held:
        assert torch.equal(t, torch.full((size, 8), float(size)))


def test_copies_do_not_carry_the_lease() -> None:
    pool = batchpool.BatchPool(idle_release_s=0)
    batch, slot = _leased(pool, 1.0)
    for c in (copy.copy(batch), copy.deepcopy(batch)):
        assert type(c) is JasperBatch and c.lease is None
    dup = copy.deepcopy(batch)
    del dup
    gc.collect()
    assert int(batch.lease[0][slot]) == 1  # the copy's death gave nothing back


def test_pool_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JASPER_BATCH_POOL", "0")
    fields, lease = batchpool.BatchPool(idle_release_s=0).acquire(_layout())
    assert lease is None and fields["a"].is_shared()


def _child_pool_slots(q: Any) -> None:
    q.put(batchpool.pool().slots())


def test_a_forked_child_starts_with_an_empty_pool() -> None:
    parent = batchpool.pool()
    _leased(parent, 1.0)
    assert parent.slots() >= 1
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_pool_slots, args=(q,))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert got == 0


class _WithPoolSize(Dataset):  # type: ignore[type-arg]
    """A jasper dataset's batches, each with the number of buffers its worker's pool holds."""

    def __init__(self, ds: JASPERSteeringDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, idx: list[int]) -> dict[str, Any]:
        return {"batch": self.ds.__getitems__(idx), "slots": batchpool.pool().slots()}


def _ident(x: Any) -> Any:
    return x


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_batches_reuse_buffers_and_held_batches_never_change(
        small_dataset: Path, context: str) -> None:
    ds = JASPERSteeringDataset(small_dataset, "train")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3))
    n = len(ds) // B
    order = order[: n * B]
    loader = DataLoader(_WithPoolSize(ds), batch_size=B, sampler=order.tolist(), drop_last=True,
                        num_workers=2, persistent_workers=True, multiprocessing_context=context,
                        collate_fn=_ident)
    want = [ds.__getitems__(order[i * B:(i + 1) * B].tolist()) for i in range(n)]
    try:
        # epoch 1: batches dropped as they are used -> each worker reuses a few buffers
        most = 0
        for i, got in enumerate(loader):
            most = max(most, got["slots"])
            assert torch.equal(got["batch"]["negative_embs"], want[i]["negative_embs"])
        assert n > 3 * batchpool.SLOTS
        assert most < batchpool.SLOTS
        # epochs 2 and 3: everything of epoch 2 held (whole batches, views, numpy arrays) while
        # epoch 3 runs through the same workers
        held = [got["batch"] for got in loader]
        views = [b["question_emb"][1:3] for b in held]
        arrays = [b["steering"].numpy() for b in held]
        del held[::2]
        gc.collect()
        for _ in loader:
            pass
        for i in range(n):
            if i % 2:
                for key, value in held[i // 2].items():
                    assert torch.equal(value, want[i][key]), (i, key)
            assert torch.equal(views[i], want[i]["question_emb"][1:3])
            assert np.array_equal(arrays[i], want[i]["steering"].numpy())
        # epochs 4 and 5: only a view of one field held (not the first field, whose storage a
        # receiver might watch alone), everything else of the batch dropped
        del held, views, arrays
        negatives = [got["batch"]["negative_embs"][2:4] for got in loader]
        gc.collect()
        for _ in loader:
            pass
        for i in range(n):
            assert torch.equal(negatives[i], want[i]["negative_embs"][2:4]), i
    finally:
        it = loader._iterator
        if it is not None:
            it._shutdown_workers()  # type: ignore[attr-defined]
        ds.close()


def test_an_idle_pool_hands_its_free_heap_back_once_per_idle_spell(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker inherits the tuned heap, which keeps what its batches' temporaries freed: once
    idle, the reaper trims it (after dropping free buffers), and not again until the pool was
    used or a buffer came back."""
    trims: list[float] = []
    monkeypatch.setattr(batchpool, "release_free_memory", lambda: trims.append(1.0) or True)
    pool = batchpool.BatchPool(idle_release_s=0.2)
    batch, slot = _leased(pool, 1.0)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 30
        while len(trims) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    wait_for(1)
    assert len(trims) == 1 and pool.slots() == 1  # idle: trimmed, the busy buffer kept
    time.sleep(0.6)
    assert len(trims) == 1  # still idle, nothing given back: no second trim
    pool.release(batchpool.Lease(batch.lease[0], slot))
    del batch
    gc.collect()
    wait_for(2)
    assert len(trims) == 2 and pool.slots() == 0  # the buffer came back: dropped, trimmed
