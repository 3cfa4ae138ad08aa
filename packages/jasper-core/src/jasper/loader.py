"""``create_loader``, ``set_epoch`` and ``validate_first_batch``: the original loader API.

``create_loader`` keeps the original parameters and defaults (drop_last and shuffle for the train
split only, ``DistributedSampler`` when ``distributed``) and returns a DataLoader carrying
``.dataset_obj`` and ``.sampler_obj``. Batches are assembled by the dataset's ``__getitems__``
(one gather per field), so the loader's ``collate_fn`` passes the batch through. With a non-CPU
``device`` it returns the GPU-resident :class:`jasper.gpu_loader.GPULoader` instead (no workers,
every table on the device).

Workers. For a dataset held in memory (preloaded or memory-mapped) a batch is a handful of
``index_select`` calls that release the GIL, so ``num_workers`` threads in the main process
assemble batches ahead of the training step (:class:`ThreadedLoader`). Worker *processes* would
gather the same bytes and then pay for a fresh shared-memory segment per batch, its page faults
and the IPC on top (pytorch#154318 reports in-memory data getting slower with workers; on two
cores we measured 2 worker processes at about a sixth of the 0-worker rate). Datasets read lazily
through ``read_rows`` (e.g. compressed HDF5, whose library holds a global lock) keep worker
processes, where parallel decoding pays. ``worker_type`` forces either.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, DistributedSampler

from jasper.dataset import BATCH_KEYS, JASPERSteeringDataset, passthrough_collate

LOGGER = logging.getLogger(__name__)


def create_loader(
    dataset_dir: str | Path,
    split: str,
    batch_size: int,
    num_workers: int = 0,
    distributed: bool = False,
    epoch: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = True,
    device: torch.device | str | None = None,
    storage_format: str = "auto",
    use_mmap: bool | None = None,
    seed: int | None = None,
    *,
    shuffle: bool | None = None,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    multiprocessing_context: Any = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    worker_type: Literal["auto", "thread", "process"] = "auto",
) -> Any:
    """A loader over ``split`` of the dataset at ``dataset_dir``.

    Args mirror the original: ``drop_last`` defaults to ``split == "train"``, shuffling happens
    for the train split only (override with ``shuffle``), ``distributed=True`` shards with
    :class:`~torch.utils.data.DistributedSampler` (``num_replicas``/``rank`` default to the
    initialised process group). ``pin_memory`` is honoured only when CUDA is available.
    ``device`` other than the CPU returns a :class:`~jasper.gpu_loader.GPULoader` over a dataset
    preloaded on that device. ``seed`` is the curriculum seed and (for the GPU loader and the
    sampler) the shuffle seed.

    ``worker_type`` says what ``num_workers`` starts: ``"thread"`` (a :class:`ThreadedLoader`
    gathering batches in that many threads), ``"process"`` (DataLoader worker processes) or
    ``"auto"``: threads for datasets held in memory or mapped, processes for lazily read ones.

    The returned loader has ``.dataset_obj`` (the :class:`JASPERSteeringDataset`) and
    ``.sampler_obj`` (the DistributedSampler, or ``None``).
    """
    if worker_type not in ("auto", "thread", "process"):
        raise ValueError(f"worker_type must be 'auto', 'thread' or 'process', got {worker_type!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last is None:
        drop_last = split == "train"
    if shuffle is None:
        shuffle = split == "train"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        from jasper.gpu_loader import GPULoader

        dataset = JASPERSteeringDataset(dataset_dir, split, epoch=epoch, device=dev,
                                        storage_format=storage_format, use_mmap=False, seed=seed)
        return GPULoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last,
                         distributed=distributed, num_replicas=num_replicas, rank=rank,
                         seed=seed, epoch=epoch)

    dataset = JASPERSteeringDataset(dataset_dir, split, epoch=epoch, device=dev,
                                    storage_format=storage_format, use_mmap=use_mmap, seed=seed)
    sampler: DistributedSampler[Any] | None = None
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                     shuffle=shuffle, seed=dataset.seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    generator = None
    if shuffle and sampler is None:
        # the shuffle is reproducible from (seed, epoch) like the sampler's; set_epoch reseeds
        generator = torch.Generator().manual_seed(_shuffle_seed(dataset.seed, epoch))
    threaded = num_workers > 0 and (
        worker_type == "thread" or (worker_type == "auto" and dataset.tables.in_memory))
    kwargs: dict[str, Any] = {}
    if threaded:
        kwargs["prefetch"] = num_workers * (prefetch_factor or 2)
    elif num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = multiprocessing_context
    loader: Any = (ThreadedLoader if threaded else DataLoader)(
        dataset,
        batch_size=batch_size,
        shuffle=bool(shuffle) if sampler is None else None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=passthrough_collate,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )
    loader.dataset_obj = dataset
    loader.sampler_obj = sampler
    LOGGER.info("created %s loader: %d samples, batch_size=%d, num_workers=%d (%s), "
                "distributed=%s", split, len(dataset), batch_size, num_workers,
                "threads" if threaded else "processes", distributed)
    return loader


class ThreadedLoader(DataLoader):
    """A DataLoader whose ``num_workers`` are threads of this process.

    It draws index batches from its batch sampler exactly as a DataLoader does (same sampler,
    generator, ``drop_last`` and ``len``) and hands each to the dataset's ``__getitems__`` on a
    thread pool, keeping ``prefetch`` batches in flight and yielding them in order. Nothing is
    pickled or copied between processes, so memory stays that of one process.
    """

    def __init__(self, dataset: JASPERSteeringDataset, *, num_workers: int, prefetch: int,
                 **kwargs: Any) -> None:
        super().__init__(dataset, num_workers=0, **kwargs)
        self.thread_workers = num_workers
        self.prefetch = max(prefetch, num_workers)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        fetch = self.dataset.__getitems__  # type: ignore[attr-defined]
        pin = self.pin_memory
        batches = iter(self._index_sampler)
        # A DataLoader iterator draws its base seed from the generator before the sampler's first
        # permutation; doing the same keeps the shuffle identical to the process-worker path.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        pending: deque[Future[Any]] = deque()
        with ThreadPoolExecutor(self.thread_workers, thread_name_prefix="jasper-loader") as pool:
            try:
                for indices in batches:
                    pending.append(pool.submit(fetch, indices))
                    if len(pending) >= self.prefetch:
                        yield _pinned(pending.popleft().result(), pin)
                while pending:
                    yield _pinned(pending.popleft().result(), pin)
            finally:
                for f in pending:
                    f.cancel()


def _pinned(batch: Any, pin: bool) -> Any:
    if not pin:
        return batch
    return type(batch)({k: v.pin_memory() for k, v in batch.items()})


def _shuffle_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) & ((1 << 63) - 1)


def set_epoch(loader: Any, epoch: int) -> None:
    """Set the curriculum epoch of the loader's dataset and reseed its shuffle for ``epoch``
    (the DistributedSampler's, or the GPU loader's)."""
    set_fn = getattr(loader, "set_epoch", None)
    if callable(set_fn):  # GPULoader
        set_fn(epoch)
        return
    dataset = getattr(loader, "dataset_obj", None)
    if dataset is None:
        dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = getattr(loader, "sampler_obj", None)
    if sampler is None and isinstance(getattr(loader, "sampler", None), DistributedSampler):
        sampler = loader.sampler
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = getattr(loader, "generator", None)
    if sampler is None and generator is not None and isinstance(dataset, JASPERSteeringDataset):
        generator.manual_seed(_shuffle_seed(dataset.seed, epoch))


def validate_first_batch(loader: Any) -> bool:
    """Check the loader's first batch; returns ``True`` or raises ``AssertionError`` naming the
    failed check: the exact key set; the shapes of docs/loading.md#what-a-batch-holds; no NaN/Inf in the
    four embedding keys; ``cluster_id`` in [0, N_c); ``relevance`` in [0, 1];
    ``centroid_distance`` in [0, 2]; ``steering_variant`` in [0, 3]."""
    batch = next(iter(loader))
    expected = set(BATCH_KEYS)
    actual = set(batch.keys())
    assert actual == expected, (
        f"batch keys: expected {sorted(expected)}, got {sorted(actual)} "
        f"(missing {sorted(expected - actual)}, unexpected {sorted(actual - expected)})")
    q = batch["question_emb"]
    assert q.dim() == 2, f"question_emb shape: expected [B, D], got {tuple(q.shape)}"
    b, d = q.shape
    n_neg = batch["negative_embs"].shape[1] if batch["negative_embs"].dim() == 3 else -1
    shapes = {
        "question_emb": (b, d),
        "target_source_emb": (b, d),
        "steering": (b, d),
        "negative_embs": (b, n_neg, d),
        "cluster_id": (b,),
        "relevance": (b,),
        "centroid_distance": (b,),
        "steering_variant": (b,),
        "negative_tiers": (b, n_neg),
    }
    for key, shape in shapes.items():
        got = tuple(batch[key].shape)
        assert got == shape, f"{key} shape: expected {shape} (B={b}, D={d}, n_neg={n_neg}), got {got}"
    for key in ("question_emb", "target_source_emb", "steering", "negative_embs"):
        t = batch[key]
        assert not bool(torch.isnan(t).any()), f"NaN detected in {key}"
        assert not bool(torch.isinf(t).any()), f"Inf detected in {key}"
    cluster = batch["cluster_id"]
    assert bool((cluster >= 0).all()), f"cluster_id must be non-negative, got min {int(cluster.min())}"
    dataset = _jasper_dataset(loader)
    if dataset is not None:
        n_c = dataset.n_clusters
        assert bool((cluster < n_c).all()), (
            f"cluster_id must be < {n_c} (N_c), got max {int(cluster.max())}")
    rel = batch["relevance"]
    assert bool((rel >= 0).all()), f"relevance must be >= 0, got min {float(rel.min())}"
    assert bool((rel <= 1).all()), f"relevance must be <= 1, got max {float(rel.max())}"
    dist = batch["centroid_distance"]
    assert bool((dist >= 0).all()), f"centroid_distance must be >= 0, got min {float(dist.min())}"
    assert bool((dist <= 2).all()), f"centroid_distance must be <= 2, got max {float(dist.max())}"
    var = batch["steering_variant"]
    assert bool((var >= 0).all()), f"steering_variant must be >= 0, got min {int(var.min())}"
    assert bool((var <= 3).all()), f"steering_variant must be <= 3, got max {int(var.max())}"
    return True


def _jasper_dataset(loader: Any) -> JASPERSteeringDataset | None:
    for candidate in (getattr(loader, "dataset_obj", None), getattr(loader, "dataset", None)):
        while candidate is not None and not isinstance(candidate, JASPERSteeringDataset):
            candidate = getattr(candidate, "dataset", None)  # a Subset
        if candidate is not None:
            return candidate
    return None


__all__ = ["create_loader", "set_epoch", "validate_first_batch"]
