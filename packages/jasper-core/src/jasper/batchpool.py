"""Shared-memory batch buffers for DataLoader worker processes, reused once the receiver is done.

A worker process hands each batch to the main process through shared memory. Fresh shared memory
for every batch costs a file and a mapping on both sides and, in the worker, a zero-filled page
fault per 4 KiB as the gather writes it: at batch 1024, D=384, n_neg=8 (17 MB a batch) a gather
into fresh shared memory took 32 ms against 5 ms into a reused buffer (one thread, loaded 2-core
machine), which is why worker processes served preloaded data at 0.17x of the in-process gather.

So a worker keeps a few buffers (:data:`SLOTS`), each one shared storage that holds every field
of a batch; a buffer free for one batch shape is re-made for another when all are taken, so
batches of changing sizes cannot make a worker hold more than :data:`SLOTS` of them. A batch assembled in a buffer carries a
:class:`Lease` (the worker's flag tensor and the slot); when the batch is pickled to the main
process the lease travels with it, and there :func:`rebuild_leased` puts a finalizer on the
received storage that clears the slot's flag once the last tensor, view or numpy array of that
batch in the receiving process is gone (storages keep their Python object while any tensor refers
to them, so the finalizer cannot run early). The worker takes a slot again only when its flag is
clear **and** nothing in the worker still refers to the buffer. A batch that never reaches a
receiver through its own pickling (a collate function that builds new tensors, say) keeps its
slot busy for good: the pool then allocates a fresh buffer, as if it did not exist.

Between passes the buffers would hold a worker's high-water mark of batches in flight (4 x 70 MB
at batch 4096): a worker drops its free buffers once it has assembled nothing for
:data:`IDLE_RELEASE_S` seconds, and then hands its free heap back to the kernel
(:func:`jasper.allocator.release_free_memory`), as the in-process loaders do: the tuned heap a
worker inherits keeps what each batch's temporaries freed. Measured with the benchmark's memory
probe (B=4096, 2 persistent workers, mapped, 2 cores): each worker's private pages after an
epoch 31-37 MB without the trim, 12 MB with it.

One rule for users: a batch the main process sends on to a third process must be copied first
(``clone``), since the worker reuses the buffer once the main process drops it. Set
``JASPER_BATCH_POOL=0`` to give every batch fresh shared memory.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from jasper.allocator import release_free_memory
from jasper.envflags import switched_off

#: Buffers a process keeps at most (batches in flight to, or held by, the receiver); beyond
#: them a batch gets fresh shared memory.
SLOTS = 8
#: Fields start at multiples of this many bytes (a cache line).
ALIGN = 64
#: A pool idle this many seconds drops its free buffers.
IDLE_RELEASE_S = 1.0

# Shape and dtype of every field of a batch: what a pool buffer is laid out from.
Shapes = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class BatchLayout:
    """Where each field of a batch lies in one buffer: ``(key, shape, dtype, byte offset)``."""

    fields: tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]
    nbytes: int

    @classmethod
    def of(cls, shapes: Shapes) -> BatchLayout:
        fields = []
        offset = 0
        for key, (shape, dtype) in shapes.items():
            fields.append((key, tuple(int(s) for s in shape), dtype, offset))
            n = dtype.itemsize
            for s in shape:
                n *= int(s)
            offset += -(-n // ALIGN) * ALIGN
        return cls(tuple(fields), max(offset, ALIGN))

    def views(self, storage: torch.UntypedStorage) -> dict[str, torch.Tensor]:
        """One contiguous tensor per field, each a view of ``storage``."""
        return {key: storage_view(storage, offset, shape, dtype)
                for key, shape, dtype, offset in self.fields}


def storage_view(storage: torch.UntypedStorage, offset: int, shape: Sequence[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """A contiguous ``dtype`` tensor of ``shape`` on ``storage`` from byte ``offset``."""
    strides: list[int] = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(1, int(s))
    return torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize,
                                            tuple(int(s) for s in shape), strides[::-1])


@dataclass(frozen=True)
class Lease:
    """Slot ``slot`` of the pool whose flags are ``flags`` (shared memory, int32: 1 = busy)."""

    flags: torch.Tensor
    slot: int


def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


def enabled() -> bool:
    """Whether worker batches are reused (``JASPER_BATCH_POOL`` is not ``0``) and this torch
    can tell when nothing in the worker refers to a buffer any more."""
    if switched_off("JASPER_BATCH_POOL"):
        return False
    return hasattr(torch._C, "_storage_Use_Count")


class BatchPool:
    """One process's batch buffers (see the module docstring). Not shared between processes: a
    forked child starts with an empty pool."""

    def __init__(self, idle_release_s: float = IDLE_RELEASE_S) -> None:
        self.pid = os.getpid()
        self.idle_release_s = idle_release_s
        self._lock = threading.Lock()
        self._flags: torch.Tensor | None = None
        # per slot: its buffer and the layout it was made for (None: no buffer, made when the
        # slot is next used; a slot's buffer is dropped while idle or re-made for a new layout)
        self._storages: list[torch.UntypedStorage | None] = []
        self._layouts: list[BatchLayout | None] = []
        self._last_use = time.monotonic()
        self._reaper: threading.Thread | None = None

    def _free(self, slot: int, busy: Any) -> bool:
        storage = self._storages[slot]
        # the receiver gave it back, and the pool's own reference is the only one left here
        return busy[slot] == 0 and (storage is None or _use_count(storage) == 1)

    def acquire(self, layout: BatchLayout) -> tuple[dict[str, torch.Tensor], Lease | None]:
        """The fields of a batch in a shared buffer, and its lease (``None``: a fresh buffer
        outside the pool, when every slot is busy or pooling is off)."""
        if not enabled():
            return layout.views(torch.UntypedStorage._new_shared(layout.nbytes)), None
        with self._lock:
            self._last_use = time.monotonic()
            if self._flags is None:
                self._flags = torch.zeros(SLOTS, dtype=torch.int32).share_memory_()
            flags = self._flags
            busy = flags.numpy()
            n = len(self._storages)
            # a free buffer of this layout; else a free slot without a buffer; else a new slot;
            # else a free slot whose buffer is re-made for this layout
            slot = next((i for i in range(n) if self._layouts[i] == layout
                         and self._storages[i] is not None and self._free(i, busy)), None)
            if slot is None:
                slot = next((i for i in range(n) if self._storages[i] is None
                             and busy[i] == 0), None)
            if slot is None and n < SLOTS:
                slot = n
                self._storages.append(None)
                self._layouts.append(None)
            if slot is None:
                slot = next((i for i in range(n) if self._free(i, busy)), None)
            if slot is None:
                return layout.views(torch.UntypedStorage._new_shared(layout.nbytes)), None
            storage = self._storages[slot]
            if storage is None or self._layouts[slot] != layout:
                self._storages[slot] = None  # the old buffer goes before the new one is made
                storage = self._storages[slot] = torch.UntypedStorage._new_shared(layout.nbytes)
                self._layouts[slot] = layout
            busy[slot] = 1
            self._start_reaper()
            return layout.views(storage), Lease(flags, slot)

    def release(self, lease: Lease) -> None:
        """Give ``lease``'s slot back at once (its batch never left this process)."""
        lease.flags[lease.slot] = 0

    def drop_free(self) -> int:
        """Drop the buffers of free slots (their memory goes back to the system); returns how
        many were dropped."""
        with self._lock:
            if self._flags is None:
                return 0
            busy = self._flags.numpy()
            dropped = 0
            for slot, storage in enumerate(self._storages):
                if storage is not None and self._free(slot, busy):
                    self._storages[slot] = None
                    dropped += 1
            return dropped

    def slots(self) -> int:
        """Buffers this pool holds now."""
        return sum(s is not None for s in self._storages)

    def _start_reaper(self) -> None:
        if self._reaper is None and self.idle_release_s > 0:
            self._reaper = threading.Thread(target=self._reap, name="jasper-batchpool",
                                            daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        # one polling thread per pool (a timer re-armed per batch would start a thread per
        # batch); it polls while idle too, since the receiver may give buffers back later
        period = min(self.idle_release_s / 4, 0.25)
        trimmed = True
        while self.pid == os.getpid():
            time.sleep(period)
            if time.monotonic() - self._last_use >= self.idle_release_s:
                # once per idle spell, and again whenever the receiver gave buffers back since
                if self.drop_free() or not trimmed:
                    release_free_memory()
                    trimmed = True
            else:
                trimmed = False


_pool: BatchPool | None = None
_pool_lock = threading.Lock()


def pool() -> BatchPool:
    """This process's pool (a new one after fork: a child must never write into buffers its
    parent hands out)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = BatchPool()
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def lease_batch(batch: Any, fields: Mapping[str, torch.Tensor], lease: Lease) -> None:
    """Give ``batch`` (a :class:`jasper.dataset.JasperBatch` gathered into ``fields``, the
    views :meth:`BatchPool.acquire` returned with ``lease``) the lease its pickling carries:
    (flags, slot, a key whose tensor lies in the buffer). A batch that holds nothing of the
    buffer gives the slot back at once."""
    buffer = next(iter(fields.values())).untyped_storage().data_ptr()
    key = next((k for k, v in batch.items() if v.untyped_storage().data_ptr() == buffer), None)
    if key is None:
        lease.flags[lease.slot] = 0
    else:
        batch.lease = (lease.flags, lease.slot, key)


class _Countdown:
    """Clears a slot's flag when the last of several storages that map its buffer is gone."""

    __slots__ = ("flags", "left", "lock", "slot")

    def __init__(self, flags: torch.Tensor, slot: int, left: int) -> None:
        self.flags, self.slot, self.left = flags, slot, left
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.flags[self.slot] = 0


def rebuild_leased(items: dict[str, Any], flags: torch.Tensor, slot: int, key: str
                   ) -> dict[str, Any]:
    """The receiving side of a leased batch: ``items`` as received, with finalizers that give
    the slot back once every storage object mapping the buffer of ``items[key]`` (the buffer
    the pooled fields share) is gone from this process. torch hands the fields one storage
    object; should it ever hand out several for one buffer, the slot waits for all of them."""
    buffer = items[key].untyped_storage().data_ptr()
    storages = {id(st): st for st in (v.untyped_storage() for v in items.values()
                                      if isinstance(v, torch.Tensor))
                if st.data_ptr() == buffer}
    done = _Countdown(flags, slot, len(storages))
    for st in storages.values():
        weakref.finalize(st, done)
    return items


__all__ = [
    "ALIGN",
    "IDLE_RELEASE_S",
    "SLOTS",
    "BatchLayout",
    "BatchPool",
    "Lease",
    "enabled",
    "lease_batch",
    "pool",
    "rebuild_leased",
    "storage_view",
]
