"""``GPULoader``: batches assembled where the tables live, without DataLoader workers.

A per-item dataset preloaded on a GPU serves about as few samples per second as on the CPU
(10-13k/s on an H200, docs/design.md#the-gpu) because every item is Python. This loader instead:

- draws the epoch's order on the device: a stable sort of a counter hash of (seed, epoch, position)
  (:func:`shuffle_order`), identical on the CPU and on CUDA, then shards it exactly like
  :class:`~torch.utils.data.DistributedSampler` (padding by repeating the start of the order, or
  truncating with ``drop_last``) with :class:`DeviceShardSampler`;
- gathers each batch with ``index_select`` straight into output buffers that are reused from batch
  to batch (:meth:`JASPERSteeringDataset.gather` with ``out=``); on CUDA the fixed sequence of
  gathers of a full batch is captured once in a CUDA graph and replayed (measured on an H200:
  3.9M samples/s eager vs 17.7M replayed at batch 1024, docs/design.md#the-gpu);
- from a CPU-resident dataset to a GPU ("staged" mode), gathers on the CPU into pinned staging
  buffers and copies them with non-blocking copies on a side stream, one batch ahead.

Every path is device-generic: with ``device="cpu"`` the same logic runs (streams, events and
graphs are simply absent), which is how the tests exercise it on machines without a GPU.

Batches are **reused buffers**: a batch is valid until the next one is requested. Clone what you
keep (``{k: v.clone() for k, v in batch.items()}``) or pass ``reuse_buffers=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from jasper.curriculum import draw_key, hash32
from jasper.dataset import JasperBatch, JASPERSteeringDataset

#: Salt that separates the shuffle's hash stream from the curriculum draw's.
_SHUFFLE_SALT = 0x5BD1E995


def shuffle_order(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A permutation of ``range(n)`` (int64, on ``device``) that is a pure function of
    ``(seed, epoch)``: positions sorted by a counter hash (stable, so ties keep their order)."""
    pos = torch.arange(n, dtype=torch.int64, device=device)
    h = hash32(pos, draw_key(seed ^ _SHUFFLE_SALT, epoch))
    return torch.sort(h, stable=True).indices


class DeviceShardSampler:
    """The epoch's positions for one rank, computed on the device, with the sharding of
    :class:`~torch.utils.data.DistributedSampler`: ``num_samples = ceil(n / R)`` (or
    ``ceil((n - R) / R)`` with ``drop_last`` when ``n % R``); the order is padded by repeating its
    start (or truncated) to ``num_samples * R`` and rank ``r`` takes every ``R``-th from ``r``."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False, epoch: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = epoch
        self.device = torch.device(device)
        if drop_last and n % num_replicas:
            self.num_samples = math.ceil((n - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def indices(self) -> torch.Tensor:
        """This rank's positions for the current epoch (int64 tensor on the device)."""
        if self.shuffle:
            order = shuffle_order(self.n, self.seed, self.epoch, self.device)
        else:
            order = torch.arange(self.n, dtype=torch.int64, device=self.device)
        if self.total_size > self.n:
            pad = self.total_size - self.n
            reps = math.ceil(pad / max(1, self.n))
            order = torch.cat([order, order.repeat(reps)[:pad]])
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())


class _Slot:
    """One staging slot: pinned host buffers, device buffers and their events."""

    def __init__(self, host: JasperBatch, dev: JasperBatch) -> None:
        self.host = host
        self.dev = dev
        self.copied: Any = None  # event: the host -> device copy finished
        self.consumed: Any = None  # event: the consumer's work on ``dev`` was queued before it


class GPULoader:
    """Batches of a :class:`JASPERSteeringDataset` assembled on ``device`` without workers.

    Args:
        dataset: the dataset; preloaded on ``device`` (resident mode) or on the CPU (staged mode
            when ``device`` is a GPU).
        batch_size: samples per batch.
        shuffle: draw a new order each epoch from (seed, epoch).
        drop_last: drop the last incomplete batch (and, when distributed, the tail that does not
            divide evenly, like DistributedSampler).
        distributed: shard across ranks; ``num_replicas``/``rank`` default to the initialised
            process group.
        seed: the shuffle seed (default: the dataset's curriculum seed).
        epoch: the initial epoch (default: the dataset's).
        device: where batches are delivered (default: the dataset's device).
        reuse_buffers: write every batch into the same output buffers (the default; a batch is
            valid until the next one is requested).
        cuda_graph: capture the full-batch gathers in a CUDA graph (default: on CUDA in resident
            mode with reused buffers).
        staged: force the staged path (pinned host buffers + copies one batch ahead); default:
            when the dataset is on the CPU and ``device`` is not.

    Attributes ``dataset_obj`` / ``dataset`` and ``sampler_obj`` / ``sampler`` match
    :func:`jasper.loader.create_loader`'s loader, so :func:`jasper.loader.set_epoch` works.
    """

    def __init__(
        self,
        dataset: JASPERSteeringDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        distributed: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int | None = None,
        epoch: int | None = None,
        device: torch.device | str | None = None,
        reuse_buffers: bool = True,
        cuda_graph: bool | None = None,
        staged: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = self.dataset_obj = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.device = torch.device(device) if device is not None else dataset.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if distributed:
            import torch.distributed as dist

            if num_replicas is None or rank is None:
                if not (dist.is_available() and dist.is_initialized()):
                    raise RuntimeError("distributed=True needs an initialised process group "
                                       "(torch.distributed.init_process_group) or explicit "
                                       "num_replicas and rank")
                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
        else:
            num_replicas, rank = 1, 0
        if staged is None:
            staged = dataset.device.type == "cpu" and self.device.type != "cpu"
        if not staged and dataset.device != self.device and not (
                dataset.device.type == self.device.type == "cuda"):
            raise ValueError(f"the dataset is on {dataset.device} but the loader delivers on "
                             f"{self.device}; open the dataset with device={self.device} or use "
                             "a CPU dataset (staged copies)")
        if not staged and not dataset.tables.resident and self.device.type != "cpu":
            raise ValueError("a mapped dataset can only feed a GPU through staged copies")
        self.staged = bool(staged)
        self.reuse_buffers = reuse_buffers or self.staged
        index_device = dataset.split_indices.device
        self.sampler = self.sampler_obj = DeviceShardSampler(
            len(dataset), shuffle=shuffle, seed=dataset.seed if seed is None else seed,
            num_replicas=int(num_replicas), rank=int(rank), drop_last=drop_last,
            epoch=dataset.current_epoch if epoch is None else epoch, device=index_device)
        if epoch is not None:
            dataset.set_epoch(epoch)
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        # derived steering computes each variant for its own rows (data-dependent shapes), which
        # a CUDA graph cannot capture: such datasets gather eagerly
        derived = dataset.tables.derived is not None
        if cuda_graph and derived:
            from jasper.errors import CapabilityError

            raise CapabilityError("cuda_graph=True cannot capture the gather of a dataset with "
                                  "derived steering (jasper.steering); pass cuda_graph=None")
        if cuda_graph is None:
            cuda_graph = on_cuda and not self.staged and self.reuse_buffers and (
                dataset.tables.resident) and not derived
        self.cuda_graph = bool(cuda_graph) and on_cuda
        self._out: JasperBatch | None = None
        self._graph: Any = None
        self._graph_generation = -1
        self._idx_static: torch.Tensor | None = None
        self._slots: list[_Slot] = []
        self._side_stream: Any = None
        # the draw's parameters as device tensors, so the captured gathers read them at replay
        self._key = torch.zeros(2, dtype=torch.int64, device=index_device)
        self._thresholds = torch.zeros(3, dtype=torch.int64, device=index_device)
        self._forced = torch.full((1,), -1, dtype=torch.int64, device=index_device)
        self._draw_state: tuple[int, tuple[int, int], tuple[int, int, int]] | None = None
        self._resume_skip = 0  # batches of the next pass already served before a checkpoint
        self._skip_once = 0
        self._yielded: int | None = None  # batches yielded of the pass in progress

    # --- epochs -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the dataset's curriculum epoch and the shuffle's epoch."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # --- iteration ----------------------------------------------------------------------------
    def _sync_draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self.dataset.draw_params()
        if state != self._draw_state:
            forced, key, thresholds = state
            self._key.copy_(torch.tensor(key, dtype=torch.int64), non_blocking=False)
            self._thresholds.copy_(torch.tensor(thresholds, dtype=torch.int64))
            self._forced.fill_(forced)
            self._draw_state = state
        return self._key, self._thresholds, self._forced

    def _batches(self) -> Iterator[torch.Tensor]:
        order = self.sampler.indices()
        b = self.batch_size
        skip, self._skip_once = self._skip_once, 0
        for i in range(skip, len(self)):
            yield order[i * b : (i + 1) * b]

    def __iter__(self) -> Iterator[JasperBatch]:
        skip, self._resume_skip = self._resume_skip, 0
        self._skip_once = skip
        self._yielded = skip
        for batch in self._iter_staged() if self.staged else self._iter_resident():
            self._yielded += 1
            yield batch
        self._yielded = None

    # --- checkpoints --------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        s = self.sampler
        return {"batch_size": self.batch_size, "num_replicas": s.num_replicas, "rank": s.rank,
                "shuffle": "device" if s.shuffle else "none", "length": len(self)}

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is (torchdata's ``StatefulDataLoader`` protocol): the curriculum
        controls, the shuffle's epoch and the batches yielded of the pass in progress. The
        order is a pure function of (seed, epoch), so nothing else is needed."""
        from jasper.loader import STATE_FORMAT

        return {"format": STATE_FORMAT, **self._identity(), "sampler_epoch": self.sampler.epoch,
                "pass": 0, "dataset": self.dataset.state_dict(),
                "batches_yielded": self._yielded or 0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields exactly the batches the saved
        loader had left (raises ``ValueError`` for a state of a differently built loader)."""
        from jasper.loader import check_loader_state

        check_loader_state(state, self._identity())
        self.dataset.load_state_dict(state["dataset"])
        self.sampler.set_epoch(int(state["sampler_epoch"]))
        self._resume_skip = int(state["batches_yielded"])
        self._yielded = None

    def _iter_resident(self) -> Iterator[JasperBatch]:
        ds = self.dataset
        b = self.batch_size
        for idx in self._batches():
            draw = self._sync_draw()
            if not self.reuse_buffers:
                yield ds.gather(idx, draw=draw)
                continue
            if self._out is None:
                self._out = ds.empty_batch(b, device=self.device)
            if idx.shape[0] == b and self.cuda_graph:
                yield self._replay(idx, draw)
            elif idx.shape[0] == b:
                yield ds.gather(idx, self._out, draw=draw)
            else:
                part = JasperBatch({k: v[: idx.shape[0]] for k, v in self._out.items()})
                yield ds.gather(idx, part, draw=draw)

    def _replay(self, idx: torch.Tensor,
                draw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> JasperBatch:
        ds = self.dataset
        assert self._out is not None
        generation = ds.generation
        if self._graph is None or generation != self._graph_generation:
            self._idx_static = idx.clone()
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up outside the capture (allocator, lazy init)
                    ds.gather(self._idx_static, self._out, draw=draw)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ds.gather(self._idx_static, self._out, draw=draw)
            self._graph = graph
            self._graph_generation = generation
        assert self._idx_static is not None
        self._idx_static.copy_(idx)
        self._graph.replay()
        return self._out

    def _iter_staged(self) -> Iterator[JasperBatch]:
        ds = self.dataset
        b = self.batch_size
        on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if not self._slots:
            for _ in range(2):
                host = ds.empty_batch(b, pin=on_cuda, device="cpu")
                dev = ds.empty_batch(b, device=self.device)
                self._slots.append(_Slot(host, dev))
            if on_cuda:
                self._side_stream = torch.cuda.Stream(device=self.device)
        batches = list(self._batches())  # views of one order tensor; no per-sample objects

        def prefetch(i: int) -> JasperBatch:
            slot = self._slots[i % 2]
            n = batches[i].shape[0]
            if slot.copied is not None:
                slot.copied.synchronize()  # the pinned buffers are free again
            host = JasperBatch({k: v[:n] for k, v in slot.host.items()})
            ds.gather(batches[i], host)
            dev = JasperBatch({k: v[:n] for k, v in slot.dev.items()})
            if on_cuda:
                stream = self._side_stream
                if slot.consumed is not None:
                    stream.wait_event(slot.consumed)
                with torch.cuda.stream(stream):
                    for k, t in dev.items():
                        t.copy_(host[k], non_blocking=True)
                    slot.copied = torch.cuda.Event()
                    slot.copied.record(stream)
            else:
                for k, t in dev.items():
                    t.copy_(host[k])
            return dev

        if not batches:
            return
        ready = prefetch(0)
        for i in range(len(batches)):
            current = ready
            if i + 1 < len(batches):
                ready = prefetch(i + 1)  # one batch ahead, while the consumer works on batch i
            slot = self._slots[i % 2]
            if on_cuda:
                torch.cuda.current_stream(self.device).wait_event(slot.copied)
            yield current
            if on_cuda:
                slot.consumed = torch.cuda.Event()
                slot.consumed.record(torch.cuda.current_stream(self.device))


__all__ = ["DeviceShardSampler", "GPULoader", "shuffle_order"]
