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

import itertools
import logging
import multiprocessing
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from jasper import gcfreeze
from jasper.allocator import cancel_idle_release, release_when_idle
from jasper.dataset import BATCH_KEYS, JASPERSteeringDataset, passthrough_collate

LOGGER = logging.getLogger(__name__)


def _worker_context(dataset: JASPERSteeringDataset, asked: Any) -> Any:
    """The multiprocessing context for worker processes: what was asked, except that workers
    of a store whose reader does not survive a fork (an object-store client on a tokio runtime
    hangs in a forked child) are spawned. Fork is the default on Linux, so it is replaced
    whether asked for or implied; an explicit request gets a warning saying so."""
    method = asked if isinstance(asked, str) or asked is None else asked.get_start_method()
    if dataset.tables.fork_safe or method not in (None, "fork"):
        return asked
    import multiprocessing

    if method is None and multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        return asked  # the process-wide default is already spawn or forkserver
    message = (f"{dataset.storage_format} dataset {dataset.dataset_dir}: its store's client "
               "does not survive a fork, so worker processes are started with spawn")
    if method == "fork":
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        LOGGER.info(message)
    return multiprocessing.get_context("spawn")


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
    initialised process group). ``pin_memory`` is reported as asked and honoured where an
    accelerator is available.
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
    index_sampler: Any = None
    if distributed:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                     shuffle=shuffle, seed=dataset.seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
        index_sampler = sampler
    elif shuffle:
        index_sampler = EpochShuffleSampler(dataset, seed=dataset.seed, epoch=epoch)
    threaded = num_workers > 0 and (
        worker_type == "thread" or (worker_type == "auto" and dataset.tables.in_memory))
    kwargs: dict[str, Any] = {}
    if threaded:
        # ``prefetch_factor`` batches in flight per thread, by default one: while the consumer
        # waits every thread is busy, and at most num_workers + 1 batches are alive (measured at
        # 10^5 pairs, B=1024: summed PSS 1.20x of 0 workers with 4 in flight, 1.05-1.09x with 2)
        kwargs["prefetch"] = num_workers * (prefetch_factor or 1)
    elif num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        context = _worker_context(dataset, multiprocessing_context)
        if context is not None:
            kwargs["multiprocessing_context"] = context
    loader: JasperLoader = (ThreadedLoader if threaded else JasperLoader)(
        dataset,
        batch_size=batch_size,
        sampler=index_sampler,
        num_workers=num_workers,
        collate_fn=passthrough_collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        # only the iterator's base seed (worker seeds) comes from here: the global RNG is untouched
        generator=torch.Generator().manual_seed(_shuffle_seed(dataset.seed, epoch)),
        **kwargs,
    )
    loader.dataset_obj = dataset
    loader.sampler_obj = sampler
    LOGGER.info("created %s loader: %d samples, batch_size=%d, num_workers=%d (%s), "
                "distributed=%s", split, len(dataset), batch_size, num_workers,
                "threads" if threaded else "processes", distributed)
    return loader


class EpochShuffleSampler(RandomSampler):
    """A :class:`~torch.utils.data.RandomSampler` whose order is a pure function of
    ``(seed, epoch, pass)``, where ``pass`` counts the iterations since the last
    :meth:`set_epoch` (iterating again without ``set_epoch`` still reshuffles, as a DataLoader
    does). That is what makes a loader's position restorable without replaying the epoch.

    The first pass of an epoch is the order jasper's loaders drew before this class existed
    (a generator seeded from (seed, epoch), one draw for the iterator's base seed, a randperm).
    """

    def __init__(self, data_source: Sized, *, seed: int, epoch: int = 0) -> None:
        # RandomSampler.__init__ refuses an empty source, but an empty split is valid (it
        # yields no batch): set its attributes here instead
        self.data_source = data_source
        self.replacement = False
        self._num_samples = None
        self.generator = torch.Generator()
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.next_pass = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from its first pass."""
        self.epoch = int(epoch)
        self.next_pass = 0

    def order(self, pass_index: int) -> torch.Tensor:
        """The permutation of pass ``pass_index`` of the current epoch."""
        g = self.generator
        assert g is not None
        seed = _shuffle_seed(self.seed, self.epoch)
        if pass_index:
            seed = _shuffle_seed(seed ^ 0x9E3779B97F4A7C15 & ((1 << 63) - 1), pass_index)
        g.manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the legacy base-seed draw
        return torch.randperm(len(self.data_source), generator=g)

    def __iter__(self) -> Iterator[int]:
        pass_index = self.next_pass
        self.next_pass += 1
        yield from self.order(pass_index).tolist()

    def __len__(self) -> int:
        return len(self.data_source)


class IndexBatches:
    """The batch sampler of in-process loading: each batch of positions is an int64 tensor view
    of the pass's one order tensor (the DataLoader's ``BatchSampler`` builds a Python list of
    ``batch_size`` ints per batch, which ``__getitems__`` turns back into a tensor). Same
    batches, same ``len``; ``skip`` leaves out the first batches without drawing them."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, skip: int = 0) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.skip = skip

    def _order(self) -> torch.Tensor:
        s = self.sampler
        if isinstance(s, EpochShuffleSampler):
            pass_index = s.next_pass
            s.next_pass += 1
            return s.order(pass_index)
        if isinstance(s, SequentialSampler):
            return torch.arange(len(s), dtype=torch.int64)
        return torch.as_tensor(list(iter(s)), dtype=torch.int64)  # e.g. DistributedSampler

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._order()
        b = self.batch_size
        for i in range(self.skip, self._batches(order.shape[0])):
            yield order[i * b : (i + 1) * b]

    def _batches(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return max(0, self._batches(len(self.sampler)) - self.skip)


class _SkipFirst:
    """An index batch sampler without its first ``skip`` batches (drawn, not fetched)."""

    def __init__(self, batches: Iterable[list[int]], skip: int) -> None:
        self.batches = batches
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)  # type: ignore[arg-type]


#: The layout version of the loaders' ``state_dict``.
STATE_FORMAT = "jasper.loader/1"


def check_loader_state(state: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``state`` is a jasper loader state taken from a loader built
    like this one (same kind, split length, batch size, world size and rank)."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a jasper loader state (format {state.get('format')!r}, expected "
                         f"{STATE_FORMAT!r})")
    for key, want in expect.items():
        if state.get(key) != want:
            raise ValueError(
                f"loader state has {key}={state.get(key)!r} but this loader has {key}={want!r}; "
                "restore into a loader created with the same arguments (and, under DDP, the "
                "same world size and rank)")


class JasperLoader(DataLoader):
    """The DataLoader :func:`create_loader` returns (worker processes, or none).

    Besides the DataLoader API it has :meth:`set_epoch` and the checkpoint protocol of
    torchdata's ``StatefulDataLoader``: :meth:`state_dict` / :meth:`load_state_dict` restore
    the exact next batch in a fresh process without replaying the epoch, because the order
    (:class:`EpochShuffleSampler` or ``DistributedSampler``) and the curriculum are pure
    functions of (seed, epoch). ``pin_memory`` reports what was asked; batches are pinned only
    where an accelerator exists.
    """

    dataset_obj: JASPERSteeringDataset
    sampler_obj: DistributedSampler[Any] | None

    def __init__(self, dataset: JASPERSteeringDataset, **kwargs: Any) -> None:
        self._making_iterator = False
        self._resume_skip = 0  # batches of the next pass already served before a checkpoint
        self._skip_once = 0  # ... handed to the next index sampler built for iteration
        self._pass: int | None = None  # the pass being served (None between passes)
        self._yielded = 0
        super().__init__(dataset, **kwargs)
        self.dataset_obj = dataset
        sampler = self.sampler
        self.sampler_obj = sampler if isinstance(sampler, DistributedSampler) else None

    # ``pin_memory`` reads as asked; the iterator sees whether pinning can happen here (so a
    # CPU-only machine gets no "no accelerator" warning per epoch)
    @property
    def pin_memory(self) -> bool:
        if self.__dict__.get("_making_iterator"):
            return self._pin_effective
        return self._pin_requested

    @pin_memory.setter
    def pin_memory(self, value: bool) -> None:
        self._pin_requested = bool(value)
        self._pin_effective = bool(value) and torch.accelerator.is_available()

    def _get_iterator(self) -> Any:
        self._making_iterator = True
        # forked workers share this process's pages: keep the collector off the objects they
        # share while they live (jasper.gcfreeze), from just before the fork
        release = gcfreeze.freeze_for_fork() if self._forks_workers() else None
        try:
            iterator = super()._get_iterator()
        except BaseException:
            if release is not None:
                release()
            raise
        finally:
            self._making_iterator = False
        if release is not None:
            weakref.finalize(iterator, release)  # the workers go with their iterator
        return iterator

    def _forks_workers(self) -> bool:
        if self.num_workers == 0:
            return False
        context = self.multiprocessing_context
        method = (context.get_start_method() if context is not None
                  else multiprocessing.get_start_method())
        return method == "fork"

    @property
    def _in_process(self) -> bool:
        """Batches are fetched in this process (no worker processes to send indices to)."""
        return self.num_workers == 0

    @property
    def _index_sampler(self) -> Any:
        batches = super()._index_sampler
        if self._in_process and self.batch_size is not None:
            skip, self._skip_once = self._skip_once, 0
            return IndexBatches(self.sampler, self.batch_size, self.drop_last, skip)
        # worker processes get Python lists: a tensor per batch would cost a shared-memory
        # segment in the index queue
        skip, self._skip_once = self._skip_once, 0
        return _SkipFirst(batches, skip) if skip else batches

    # --- epochs and positions -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the curriculum epoch of the dataset and the shuffle's epoch."""
        self.dataset_obj.set_epoch(epoch)
        sampler = self.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _shuffle_position(self) -> dict[str, Any]:
        sampler = self.sampler
        if isinstance(sampler, EpochShuffleSampler):
            return {"shuffle": "epoch", "sampler_epoch": sampler.epoch,
                    "pass": sampler.next_pass if self._pass is None else self._pass}
        if isinstance(sampler, DistributedSampler):
            return {"shuffle": "distributed", "sampler_epoch": sampler.epoch, "pass": 0}
        return {"shuffle": "none", "sampler_epoch": None, "pass": 0}

    def _identity(self) -> dict[str, Any]:
        sampler = self.sampler
        replicas, rank = ((sampler.num_replicas, sampler.rank)
                          if isinstance(sampler, DistributedSampler) else (1, 0))
        return {"batch_size": self.batch_size, "num_replicas": replicas, "rank": rank,
                "shuffle": self._shuffle_position()["shuffle"], "length": len(self)}

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: the curriculum controls, the shuffle's epoch and pass, and the
        batches already yielded of the pass in progress (0 between passes). Small and
        ``torch.save``-able; restore it with :meth:`load_state_dict`."""
        return {
            "format": STATE_FORMAT,
            **self._identity(),
            **self._shuffle_position(),
            "dataset": self.dataset_obj.state_dict(),
            "batches_yielded": self._yielded if self._pass is not None else 0,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader created with the same
        arguments): the next iteration yields exactly the batches the saved loader had left."""
        check_loader_state(state, self._identity())
        self.dataset_obj.load_state_dict(state["dataset"])
        sampler = self.sampler
        if isinstance(sampler, EpochShuffleSampler | DistributedSampler):
            sampler.set_epoch(int(state["sampler_epoch"]))
        if isinstance(sampler, EpochShuffleSampler):
            sampler.next_pass = int(state["pass"])
        self._resume_skip = int(state["batches_yielded"])
        self._pass = None
        self._yielded = 0

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        self._pass = sampler.next_pass if isinstance(sampler, EpochShuffleSampler) else 0
        skip, self._resume_skip = self._resume_skip, 0
        self._skip_once = skip  # taken by the index sampler the iteration builds
        self._yielded = skip  # a restored pass continues counting where it stopped
        cancel_idle_release()  # this pass reuses what the last one left in the heap
        try:
            for batch in self._iterate():
                self._yielded += 1
                yield batch
        finally:
            # the batches of this pass are freed: unless the next pass starts at once, what the
            # tuned heap kept of them goes back to the kernel (jasper.allocator)
            release_when_idle()
        self._pass = None
        self._yielded = 0

    def _iterate(self) -> Iterator[Any]:
        return super().__iter__()


class ThreadedLoader(JasperLoader):
    """A loader whose ``num_workers`` are threads of this process.

    It draws index batches from its batch sampler exactly as a DataLoader does (same sampler,
    ``drop_last`` and ``len``) and hands each to the dataset's ``__getitems__`` on a thread
    pool, keeping ``prefetch`` batches in flight and yielding them in order. Nothing is pickled
    or copied between processes, so memory stays that of one process. ``num_workers`` reports
    the threads.
    """

    def __init__(self, dataset: JASPERSteeringDataset, *, num_workers: int, prefetch: int,
                 **kwargs: Any) -> None:
        super().__init__(dataset, num_workers=0, **kwargs)
        self.num_workers = num_workers
        self.prefetch = max(prefetch, num_workers)

    @property
    def _in_process(self) -> bool:
        return True

    @property
    def thread_workers(self) -> int:
        """The number of gathering threads (``num_workers``)."""
        return self.num_workers

    def _get_iterator(self) -> Any:
        raise TypeError("a ThreadedLoader iterates its own threads")  # never a process iterator

    def _iterate(self) -> Iterator[Any]:
        ds = self.dataset_obj
        pin = self._pin_effective
        batches = iter(self._index_sampler)
        pending: deque[Future[Any]] = deque()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="jasper-loader") as pool:
            try:
                for indices in batches:
                    # the output is allocated here, in the consumer's thread: freed batches go
                    # back to one malloc arena and are reused, instead of each gathering thread's
                    # arena keeping its own high-water mark of batches
                    out = ds.empty_batch(len(indices))
                    pending.append(pool.submit(ds.__getitems__, indices, out=out))
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
    if callable(set_fn):  # jasper's loaders (create_loader's, GPULoader)
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
