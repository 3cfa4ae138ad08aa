"""``JASPERSteeringDataset``: a JASPER split served as PyTorch batches, from any backend.

Users of the original system keep their code (docs/loading.md, docs/migrating.md): the constructor, ``len``,
``ds[i]``, ``set_epoch``, ``force_steering``, ``get_steering_stats``, ``subset_by_cluster``,
``reload_negatives``, ``close`` and the context manager behave as before, and the batch keys,
shapes and dtypes are exactly the specified ones. What changes is how it is served:

- **Batched fetch.** :meth:`JASPERSteeringDataset.__getitems__` assembles a whole batch with one
  vectorised gather per field (PyTorch's DataLoader calls it once per batch) and returns the
  collated dict. A plain ``DataLoader(ds, batch_size=...)`` works unchanged: the returned
  :class:`JasperBatch` passes through ``default_collate`` as it is (it registers itself in
  ``default_collate_fn_map``, the extension point torch documents).
- **Flat memory.** Only contiguous tensors are held, never per-sample lists or dicts, so forked
  workers do not copy pages as they read (pytorch#13246). Steering is ONE gather from a stacked
  table ``[1 + 3 * N_p, D]`` whose row 0 is zeros; the three steering arrays are read straight into
  views of that one buffer with the backend's ``read_into``.
- **Deterministic curriculum.** An item's variant is a pure function of (seed, epoch, pair id)
  (:mod:`jasper.curriculum`). The epoch and the forced variant live in a tiny shared-memory tensor,
  so DataLoader workers, persistent ones included, follow ``set_epoch`` and ``force_steering``.
- **Preload or map.** ``use_mmap=False`` preloads (into RAM, or onto ``device``); ``use_mmap=True``
  keeps zero-copy maps where the backend can map, else (backends with ``row_access``) reads the
  rows of each batch through ``reader.read_rows`` -- the mmap-equivalent "rows" mode -- and
  otherwise raises :class:`~jasper.errors.CapabilityError`; ``None`` maps when the arrays exceed
  half of the available RAM. The choice is one :class:`jasper.tables.TableSet` object
  (``ds.tables``): the dataset, the threaded loader and the GPU loader gather through it and
  never branch on the mode themselves.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset, Subset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from jasper import batchpool
from jasper.allocator import tune_host_allocator
from jasper.backend import ArrayInfo
from jasper.curriculum import (
    VARIANT_NAMES,
    Curriculum,
    curriculum_from_manifest,
    draw_key,
    hash32,
    variant_id,
    variants_from_hash,
)
from jasper.errors import (
    CapabilityError,
    DatasetNotFoundError,
    IntegrityError,
    JasperError,
    SplitNotFoundError,
)
from jasper.manifest import Manifest
from jasper.registry import get_backend
from jasper.rows import as_row_index
from jasper.schema import ARRAYS, SPLITS, Role, split_array
from jasper.steering import stored_names
from jasper.tables import (
    CENTROID_TABLE,
    QUESTION_TABLE,
    RELOADABLE,
    SOURCE_TABLE,
    TABLE_SETS,
    MappedTables,
    PreloadedTables,
    RowTables,
    StoreLocation,
    TableSet,
    open_tables,
)
from jasper.validation import check_info_columns, check_replacement

LOGGER = logging.getLogger(__name__)

#: The keys of a sample and of a batch, in the documented order (docs/loading.md#what-a-batch-holds).
BATCH_KEYS: tuple[str, ...] = (
    "question_emb",
    "target_source_emb",
    "steering",
    "negative_embs",
    "cluster_id",
    "relevance",
    "centroid_distance",
    "steering_variant",
    "negative_tiers",
)

#: Splits up to this many samples draw each epoch's variants once, into an int8 table (1 byte a
#: sample); larger ones hash the pair ids of every batch.
VARIANT_TABLE_MAX = 1 << 25

#: ``use_mmap=None`` maps when the arrays exceed this fraction of the available RAM.
AUTO_MMAP_FRACTION = 0.5

#: The table of hard-negative rows (negatives index the source table).
NEGATIVES = "hard_negatives"
# control tensor slots (shared memory): forced variant (-1 = schedule), epoch, reload generation
_FORCED, _EPOCH, _GENERATION = 0, 1, 2


class JasperBatch(dict[str, Any]):
    """A batch that is already collated: ``{key: tensor with a leading batch dimension}``.

    ``default_collate`` starts by reading ``batch[0]``; for this dict that lookup (and only that
    one: ``0`` is never a batch key) answers a marker whose registered collate function hands the
    batch back unchanged. So a user's own ``DataLoader(ds, batch_size=32)`` keeps working.
    """

    def __missing__(self, key: object) -> Any:
        if type(key) is int and key == 0:
            return _CollatedMarker(self)
        raise KeyError(key)

    #: In a worker process, a batch in a reusable buffer: (the pool's flags, slot, a key whose
    #: tensor lies in the buffer). Pickling carries it to the receiving process, which gives the
    #: buffer back when it drops the batch (:mod:`jasper.batchpool`).
    lease: tuple[torch.Tensor, int, str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        if self.lease is None:
            return (JasperBatch, (dict(self),))
        return (_rebuild_leased_batch, (dict(self), *self.lease))

    # copies stay in this process: they must not carry the lease (a copy's death would give
    # the buffer back while the batch itself is still in flight)
    def __copy__(self) -> JasperBatch:
        return JasperBatch(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> JasperBatch:
        return JasperBatch(copy.deepcopy(dict(self), memo))


def _rebuild_leased_batch(items: dict[str, Any], flags: torch.Tensor, slot: int,
                          key: str) -> JasperBatch:
    return JasperBatch(batchpool.rebuild_leased(items, flags, slot, key))


class _CollatedMarker:
    __slots__ = ("batch",)

    def __init__(self, batch: JasperBatch) -> None:
        self.batch = batch


def _collate_marker(batch: Any, *, collate_fn_map: Any = None) -> JasperBatch:
    return batch[0].batch


default_collate_fn_map[_CollatedMarker] = _collate_marker


def passthrough_collate(batch: Any) -> Any:
    """A DataLoader ``collate_fn`` for datasets whose ``__getitems__`` returns a collated batch:
    a dict is returned as it is; anything else goes through ``default_collate``."""
    if isinstance(batch, Mapping):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)


def available_memory() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable`` from ``/proc/meminfo``, else
    free pages from ``sysconf``; psutil is not a dependency of jasper-core)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never map by size


class JASPERSteeringDataset(Dataset[dict[str, torch.Tensor]]):
    """One split of a JASPER dataset, served as PyTorch samples and batches.

    Args:
        dataset_dir: the dataset directory (any registered backend).
        split: ``"train"``, ``"val"`` or ``"test"``.
        epoch: the initial curriculum epoch.
        device: where the tensors live; a CUDA device preloads every tensor onto the GPU.
        storage_format: a registered backend name, or ``"auto"`` to detect it.
        use_mmap: ``False`` preloads, ``True`` maps (or reads rows lazily where the backend cannot
            map but has ``row_access``), ``None`` maps when the data exceeds half the available
            RAM (on the CPU only).
        seed: the curriculum seed; default: the manifest's ``random_seed``, else 0.

    Raises:
        DatasetNotFoundError: ``dataset_dir`` (or its ``config.json``) does not exist.
        SplitNotFoundError: the split is not in the dataset (a ``ValueError``).
        IntegrityError: a structural rule is broken (a ``ValueError``), naming array, row, rule.
        CapabilityError: ``use_mmap=True`` and the backend can neither map nor read rows.

    Mapped tensors are read-only views of the files: do not write into the tables.
    """

    # the arrays, as attributes of the original dataset (flat tensors; see _bind)
    split_indices: torch.Tensor
    question_embs: torch.Tensor
    source_embs: torch.Tensor
    keyword_embs: torch.Tensor
    centroid_embs: torch.Tensor
    pair_index: torch.Tensor
    pair_cluster_id: torch.Tensor
    pair_relevance: torch.Tensor
    pair_keyword_offsets: torch.Tensor
    pair_keyword_ids: torch.Tensor
    hard_negatives: torch.Tensor
    negative_tiers: torch.Tensor
    steering_centroid: torch.Tensor
    steering_keyword_weighted: torch.Tensor
    steering_residual: torch.Tensor
    centroid_distances: torch.Tensor

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        epoch: int = 0,
        device: torch.device | str | None = None,
        storage_format: str = "auto",
        use_mmap: bool | None = None,
        seed: int | None = None,
    ) -> None:
        from jasper.location import Location, as_target

        target = as_target(dataset_dir)
        # an object-store URL is pinned to its committed generation once (workers and reopens
        # read that generation); the Location stands in for the Path in messages
        pinned = None
        if isinstance(target, Location):
            from jasper.remote import pin_generation

            pinned = pin_generation(target, storage_format)
        self.dataset_dir = cast(Path, target)
        self.split = split
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cpu":
            tune_host_allocator()  # batches reuse freed memory instead of faulting in new pages
        self._closed = True
        if pinned is None and not self.dataset_dir.is_dir():
            raise DatasetNotFoundError(
                self.dataset_dir, hint="Check the path; `jasper synth DIR` creates a dataset")
        self.manifest = pinned.manifest if pinned is not None else Manifest.load(self.dataset_dir)
        self.config: dict[str, Any] = self.manifest.to_dict()
        self.embedding_dim = int(self.manifest.embedding_dim)
        self.n_neg = int(self.manifest.n_neg)
        self.curriculum: Curriculum = curriculum_from_manifest(self.manifest)
        if seed is None:
            seed = self.manifest.random_seed if self.manifest.random_seed is not None else 0
        self.seed = int(seed)

        if pinned is not None:
            backend_name = pinned.backend
        else:
            # the same choice as open_store: a forced backend must recognise the dataset, and a
            # missing file of the writer's is named
            from jasper.store import choose_backend

            backend_name = choose_backend(self.dataset_dir, self.manifest, storage_format)
        backend = get_backend(backend_name)  # BackendNotFoundError lists what is installed
        self.storage_format = backend_name
        location = StoreLocation(cast(Path, pinned.where) if pinned else self.dataset_dir,
                                 backend_name, self.manifest)

        reader = location.open()
        try:
            names = set(reader.array_names())
            available = [s for s in SPLITS if split_array(s) in names]
            if split not in SPLITS or split_array(split) not in names:
                raise SplitNotFoundError(split, available, self.dataset_dir)
            stored = stored_names(self.manifest)  # derived steering stores no steering arrays
            missing = [n for n in stored if n not in names]
            if missing:
                raise IntegrityError(
                    f"array {missing[0]!r} is missing from the dataset (also missing: "
                    f"{', '.join(missing[1:]) or 'none'})", array=missing[0],
                    rule="required array", path=self.dataset_dir)
            infos = {n: reader.info(n) for n in stored}
            # before the table set allocates anything from the manifest's sizes
            check_info_columns(infos, self.manifest, self.dataset_dir)
            mode = self._choose_mode(use_mmap, backend.capabilities, infos, backend_name)
            if TABLE_SETS[mode].maps:
                reader.close()
                reader = location.open()
        except BaseException:
            reader.close()
            raise
        self._infos = infos
        self._control = torch.tensor([-1, int(epoch), 0], dtype=torch.int64).share_memory_()
        # the same memory as a numpy array: reading one slot per batch costs ~0.1 us instead of
        # a tensor index and .item() (~3 us), and the gather reads four
        self._ctl = self._control.numpy()
        self._draw_cache: tuple[int, tuple[int, int], tuple[int, int, int]] | None = None
        # (epoch, variant of every split position): one gather per batch instead of the hash
        self._variant_table: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self._generation = 0
        # the table set owns the reader from here on (and closes it on failure)
        self.tables: TableSet = open_tables(mode, location, infos, self.device, reader=reader)
        self._publish()
        self._closed = False
        LOGGER.info("opened %s split %r: %d samples, backend %s, mode %s, device %s, "
                    "%.1f MiB of tensors in memory", self.dataset_dir, split, len(self),
                    backend_name, mode, self.device, self.memory_bytes() / 2**20)

    # --- opening ------------------------------------------------------------------------------
    def _choose_mode(self, use_mmap: bool | None, caps: Any, infos: Mapping[str, ArrayInfo],
                     backend_name: str) -> str:
        if use_mmap is None:
            if self.device.type != "cpu":
                return PreloadedTables.mode
            total = sum(i.nbytes for i in infos.values())
            if total <= AUTO_MMAP_FRACTION * available_memory():
                return PreloadedTables.mode
            if caps.mmap:
                return MappedTables.mode
            if caps.row_access:
                return RowTables.mode
            warnings.warn(
                f"{self.dataset_dir}: the arrays ({total / 2**30:.1f} GiB) exceed half the "
                f"available RAM but backend {backend_name!r} can neither map nor read rows; "
                "preloading anyway", ResourceWarning, stacklevel=3)
            return PreloadedTables.mode
        if not use_mmap:
            return PreloadedTables.mode
        if self.device.type != "cpu":
            raise CapabilityError(
                f"use_mmap=True keeps the data in files on the CPU; it cannot be combined with "
                f"device={self.device} (which preloads onto the device). Pass use_mmap=False.")
        if caps.mmap:
            return MappedTables.mode
        if caps.row_access:
            return RowTables.mode
        raise CapabilityError(
            f"backend {backend_name!r} can neither memory-map nor read single rows of "
            f"{self.dataset_dir}; open with use_mmap=False (preload) or convert the dataset to a "
            "backend that maps (e.g. `jasper convert SRC DST --to pt`)")

    def _publish(self) -> None:
        """Expose the table set's arrays as the attributes of the original dataset."""
        arrays = self.tables.arrays
        self.split_indices = arrays[split_array(self.split)]
        self.n_pairs = self.tables.n_pairs
        for name, spec in ARRAYS.items():
            if spec.role is not Role.SPLIT:
                setattr(self, name, arrays[name])
        self.n_clusters = int(self._infos[CENTROID_TABLE].shape[0])
        self.n_sources = int(self._infos[SOURCE_TABLE].shape[0])

    @property
    def mode(self) -> str:
        """``"preload"``, ``"mmap"`` or ``"rows"``: how the table set holds the arrays."""
        return self.tables.mode

    @property
    def generation(self) -> int:
        """How many times the served arrays were replaced by a reload that workers must follow
        (a CUDA graph captured before a change is captured again)."""
        return self._generation

    @property
    def steering_table(self) -> torch.Tensor | None:
        """The stacked steering table ``[1 + 3 * N_p, D]`` (row 0 zeros) of a preloaded
        dataset; ``None`` when the arrays stay in storage."""
        return getattr(self.tables, "steering_table", None)

    _steering_table = steering_table  # the name earlier benchmark code reads

    # --- pickling to spawned workers ------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # the arrays travel inside the table set (which ships maps and lazy arrays as a path);
        # the published attributes are bound again on the other side
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor)]:
            if key != "_control":
                del state[key]
        state["_variant_table"] = None  # recomputed where it is needed
        del state["_ctl"]  # a numpy view would travel by value: made again from _control
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ctl = self._control.numpy()
        if self.device.type == "cpu":
            tune_host_allocator()  # a spawned worker is a fresh process
        if not self._closed and self.tables.arrays:
            self._publish()

    def _ensure_ready(self) -> None:
        if self._closed:
            raise JasperError(f"dataset {self.dataset_dir} ({self.split}) is closed")
        if self.tables.ensure_attached():
            self._generation = int(self._ctl[_GENERATION])
            self._publish()
        elif int(self._ctl[_GENERATION]) != self._generation:
            # reload_negatives() ran in the main process after this worker started
            self._generation = int(self._ctl[_GENERATION])
            self.tables.replace(RELOADABLE, in_place_ok=False)
            self._publish()

    # --- sizes --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._infos[split_array(self.split)].shape[0])

    @property
    def current_epoch(self) -> int:
        """The curriculum epoch (shared with DataLoader workers)."""
        return int(self._ctl[_EPOCH])

    @property
    def use_mmap(self) -> bool:
        """True when the arrays stay in storage (mapped, or read by rows)."""
        return not self.tables.resident

    @property
    def steering_probs(self) -> dict[str, float]:
        """The schedule's probabilities at the current epoch, by variant name."""
        return dict(zip(VARIANT_NAMES, self.curriculum.probabilities(self.current_epoch),
                        strict=True))

    def memory_bytes(self) -> int:
        """Bytes of the tensors this dataset holds in RAM or device memory (mapped files and
        rows left in storage do not count)."""
        return self.tables.memory_bytes()

    # --- curriculum ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the curriculum epoch (workers, persistent ones included, see it at once)."""
        self._control[_EPOCH] = int(epoch)
        LOGGER.info("epoch %d: steering probabilities %s", epoch, self.steering_probs)

    def force_steering(self, variant: str | int | None) -> None:
        """Pin every item to one variant (``zero``/``none``, ``centroid``,
        ``keyword``/``keyword_weighted``, ``residual``, or 0-3); ``None`` returns to the
        schedule. Raises :class:`~jasper.errors.UnknownVariantError` for an unknown name."""
        self._control[_FORCED] = -1 if variant is None else variant_id(variant)

    @property
    def forced_variant(self) -> str | None:
        """The name of the forced variant, or ``None`` when the schedule applies."""
        v = int(self._ctl[_FORCED])
        return None if v < 0 else VARIANT_NAMES[v]

    def get_steering_stats(self) -> dict[str, Any]:
        """``{"epoch", "probs" [zero, centroid, keyword, residual], "variant_names"}`` plus the
        forced variant (or ``None``), the curriculum form and the seed."""
        epoch = self.current_epoch
        return {
            "epoch": epoch,
            "probs": list(self.curriculum.probabilities(epoch)),
            "variant_names": list(VARIANT_NAMES),
            "forced": self.forced_variant,
            "curriculum": self.curriculum.kind,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, int]:
        """The curriculum controls a checkpoint needs: ``{"epoch", "forced"}`` (-1: schedule)."""
        return {"epoch": self.current_epoch, "forced": int(self._ctl[_FORCED])}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the controls of :meth:`state_dict` (workers see them at once)."""
        forced = int(state["forced"])
        self._control[_FORCED] = -1 if forced < 0 else variant_id(forced)
        self._control[_EPOCH] = int(state["epoch"])

    def draw_params(self) -> tuple[int, tuple[int, int], tuple[int, int, int]]:
        """``(forced variant or -1, hash key, thresholds)`` of the current epoch."""
        forced = int(self._ctl[_FORCED])
        epoch = int(self._ctl[_EPOCH])
        cache = self._draw_cache
        if cache is None or cache[0] != epoch:
            cache = (epoch, draw_key(self.seed, epoch), self.curriculum.thresholds(epoch))
            self._draw_cache = cache
        return forced, cache[1], cache[2]

    def _variants_at(self, positions: torch.Tensor, pair_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The variants of split ``positions`` (whose pair ids are ``pair_ids``) and, where
        the table set serves stored steering from one stacked table, their rows in it (else
        ``None``): from the epoch's tables of the whole split where it is small, else drawn
        for these pairs."""
        forced = int(self._ctl[_FORCED])
        if forced >= 0:
            return torch.full_like(pair_ids, forced, dtype=torch.int64), None
        n = self.split_indices.shape[0]
        if n > VARIANT_TABLE_MAX:
            return self.variants_for_pairs(pair_ids), None
        epoch = int(self._ctl[_EPOCH])
        cached = self._variant_table
        if cached is None or cached[0] != epoch:
            _, key, thresholds = self.draw_params()
            table = variants_from_hash(hash32(self.split_indices, key), thresholds)
            # each position's steering row for the epoch: one gather per batch instead of the
            # half-dozen small kernels that compute it from the variant
            rows = self.tables.steering_rows(self.split_indices, table)
            cached = (epoch, table.to(torch.int8), rows)
            self._variant_table = cached  # one tuple assignment: safe for loader threads
        rows = cached[2]
        return (cached[1].index_select(0, positions).to(torch.int64),
                None if rows is None else rows.index_select(0, positions))

    def variants_for_pairs(self, pair_ids: torch.Tensor) -> torch.Tensor:
        """The variant (int64, 0-3) each pair id gets now: forced, or drawn for the epoch."""
        forced, key, thresholds = self.draw_params()
        if forced >= 0:
            return torch.full_like(pair_ids, forced, dtype=torch.int64)
        return variants_from_hash(hash32(pair_ids, key), thresholds)

    # --- access -------------------------------------------------------------------------------
    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Sample ``idx`` of the split: the batch keys without the leading dimension."""
        if isinstance(idx, torch.Tensor):
            idx = int(idx)
        n = len(self)
        if not 0 <= idx < n:
            raise IndexError(f"Index {idx} out of range [0, {n}) of the {self.split} split")
        batch = self.__getitems__([idx])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int] | torch.Tensor, *,
                     out: Mapping[str, torch.Tensor] | None = None) -> JasperBatch:
        """The collated batch of the given split positions: one vectorised gather per field,
        written into ``out`` (from :meth:`empty_batch`) when given."""
        self._ensure_ready()
        idx = as_row_index(indices, f"{self.split} split").reshape(-1)
        if idx.device != self.split_indices.device:
            idx = idx.to(self.split_indices.device)
        n = len(self)
        if idx.numel():
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= n:
                bad = int(idx[(idx < 0) | (idx >= n)][0])
                raise IndexError(f"Index {bad} out of range [0, {n}) of the {self.split} split")
        if out is not None or get_worker_info() is None or self.device.type != "cpu":
            return self.gather(idx, out)
        # a worker process: assemble in shared memory, so sending the batch copies nothing,
        # and in a buffer the main process gives back once it has dropped the batch
        layout = batchpool.BatchLayout.of(self._batch_shapes(idx.numel()))
        fields, lease = batchpool.pool().acquire(layout)
        batch = self.gather(idx, fields)
        if lease is not None:
            batchpool.lease_batch(batch, fields, lease)
        return batch

    def empty_batch(self, batch_size: int, *, shared: bool = False, pin: bool = False,
                    device: torch.device | str | None = None) -> JasperBatch:
        """Uninitialised output buffers for :meth:`gather` (optionally in shared or pinned
        memory, or on another device)."""
        shapes = self._batch_shapes(batch_size)
        dev = torch.device(device) if device is not None else self.device
        if shared and dev.type == "cpu":
            # one shared buffer for every field: one file and one mapping per batch
            layout = batchpool.BatchLayout.of(shapes)
            return JasperBatch(layout.views(torch.UntypedStorage._new_shared(layout.nbytes)))
        batch = JasperBatch()
        for key, (shape, dtype) in shapes.items():
            batch[key] = torch.empty(shape, dtype=dtype, device=dev,
                                     pin_memory=pin and dev.type == "cpu")
        return batch

    def _batch_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every field of a batch of ``batch_size`` samples."""
        b, d, k = batch_size, self.embedding_dim, self.n_neg
        emb = self._infos[QUESTION_TABLE].dtype
        src = self._infos[SOURCE_TABLE].dtype
        return {
            "question_emb": ((b, d), emb),
            "target_source_emb": ((b, d), src),
            "steering": ((b, d), self.tables.steering_dtype),
            "negative_embs": ((b, k, d), src),
            "cluster_id": ((b,), torch.int64),
            "relevance": ((b,), torch.float32),
            "centroid_distance": ((b,), torch.float32),
            "steering_variant": ((b,), torch.int64),
            "negative_tiers": ((b, k), torch.int64),
        }

    def gather(
        self,
        idx: torch.Tensor,
        out: Mapping[str, torch.Tensor] | None = None,
        *,
        draw: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> JasperBatch:
        """The batch of split positions ``idx`` (int64, on the dataset's device, assumed in
        range), optionally written into ``out`` (from :meth:`empty_batch`).

        ``draw`` = ``(key [2], thresholds [3], forced [1])`` int64 device tensors replaces the
        Python-side draw parameters, so that the whole gather is a fixed sequence of kernels
        (capturable in a CUDA graph by :class:`jasper.gpu_loader.GPULoader`).
        """
        self._ensure_ready()
        t = self.tables
        # compact (int32) ids are widened per batch, after the select, where they reach the
        # batch or arithmetic; row ids that only index other tables keep their stored type
        pids = self.split_indices.index_select(0, idx).to(torch.int64)
        steering_rows = None
        if draw is None:
            variant, steering_rows = self._variants_at(idx, pids)
        else:
            key, thresholds, forced = draw
            drawn = variants_from_hash(hash32(pids, key), thresholds)
            variant = torch.where(forced >= 0, forced, drawn)
        b = idx.shape[0]
        d, k = self.embedding_dim, self.n_neg
        o = out or {}
        q, s = t.pair_columns(pids)
        neg_ids = t.gather(NEGATIVES, pids).reshape(-1)
        batch = JasperBatch()
        batch["question_emb"] = t.gather(QUESTION_TABLE, q, o.get("question_emb"))
        neg_out = o.get("negative_embs")
        # targets and negatives are rows of one table: one gather call (one read in storage)
        target, negs = t.gather_many(
            SOURCE_TABLE, (s, neg_ids),
            (o.get("target_source_emb"), None if neg_out is None else neg_out.view(b * k, d)))
        batch["target_source_emb"] = target
        cluster = t.gather("pair_cluster_id", pids, o.get("cluster_id"), torch.int64)
        # derived steering reuses the rows just gathered (question, source, cluster)
        batch["steering"] = t.gather_steering(pids, variant, o.get("steering"),
                                              rows=steering_rows,
                                              questions=batch["question_emb"],
                                              sources=batch["target_source_emb"],
                                              clusters=cluster)
        batch["negative_embs"] = neg_out if neg_out is not None else negs.view(b, k, d)
        batch["cluster_id"] = cluster
        batch["relevance"] = t.gather("pair_relevance", pids, o.get("relevance"), torch.float32)
        batch["centroid_distance"] = t.gather("centroid_distances", pids,
                                              o.get("centroid_distance"), torch.float32)
        if "steering_variant" in o:
            batch["steering_variant"] = o["steering_variant"].copy_(variant)
        else:
            batch["steering_variant"] = variant
        batch["negative_tiers"] = t.gather("negative_tiers", pids, o.get("negative_tiers"),
                                           torch.int64)
        return batch

    # --- subsets and reloads ------------------------------------------------------------------
    def subset_by_cluster(self, cluster_ids: Iterable[int] | torch.Tensor) -> ClusterSubset:
        """The samples of the split whose pair belongs to one of ``cluster_ids``."""
        self._ensure_ready()
        ids = torch.as_tensor(list(cluster_ids) if not isinstance(cluster_ids, torch.Tensor)
                              else cluster_ids, dtype=torch.int64)
        clusters = self.tables.arrays["pair_cluster_id"].index_select(
            0, self.split_indices).to(torch.int64).cpu()
        positions = torch.nonzero(torch.isin(clusters, ids)).reshape(-1)
        return ClusterSubset(self, positions)

    def reload_negatives(self) -> None:
        """Re-read ``hard_negatives`` and ``negative_tiers`` from storage (after re-mining).

        The new arrays are checked (:func:`jasper.validation.check_replacement`: shape, dtype,
        index range, non-negative tiers) before they replace the old ones. DataLoader workers,
        persistent ones included, serve the new negatives from their next batch: preloaded
        arrays are updated in place in shared memory, and in the other cases the workers reopen
        the store.
        """
        self._ensure_ready()
        in_place = self.tables.replace(RELOADABLE, validate=self._check_replacement)
        self._publish()
        if not in_place:
            self._control[_GENERATION] += 1
            self._generation = int(self._ctl[_GENERATION])

    def _check_replacement(self, new: Mapping[str, torch.Tensor]) -> None:
        check_replacement(new, self.tables.arrays, self.manifest, path=self.dataset_dir)

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the tensors and the store (idempotent)."""
        tables = self.__dict__.get("tables")
        if tables is not None:
            tables.close()
        for name in list(self.__dict__):
            if isinstance(self.__dict__[name], torch.Tensor) and name != "_control":
                self.__dict__[name] = None
        self._variant_table = None
        self._closed = True

    def __enter__(self) -> JASPERSteeringDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"JASPERSteeringDataset({str(self.dataset_dir)!r}, split={self.split!r}, "
                f"n={len(self)}, backend={self.storage_format!r}, mode={self.mode!r}, "
                f"device={str(self.device)!r})")

    @staticmethod
    def create_combined_splits(
        dataset_dir: str | Path,
        epoch: int = 0,
        device: torch.device | str | None = None,
        storage_format: str = "auto",
        use_mmap: bool | None = None,
        seed: int | None = None,
    ) -> dict[str, JASPERSteeringDataset]:
        """The train, val and test splits of one dataset directory."""
        return {
            s: JASPERSteeringDataset(dataset_dir, s, epoch=epoch, device=device,
                                     storage_format=storage_format, use_mmap=use_mmap, seed=seed)
            for s in SPLITS
        }


class ClusterSubset(Subset[dict[str, torch.Tensor]]):
    """A :class:`torch.utils.data.Subset` whose indices are one flat int64 tensor and whose
    batched fetch maps them without per-sample Python."""

    dataset: JASPERSteeringDataset

    def __init__(self, dataset: JASPERSteeringDataset, positions: torch.Tensor) -> None:
        super().__init__(dataset, positions)  # type: ignore[arg-type]
        self.positions = positions

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if isinstance(idx, list):
            return self.__getitems__(idx)
        return self.dataset[int(self.positions[idx])]

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> JasperBatch:  # type: ignore[override]
        idx = torch.as_tensor(indices, dtype=torch.int64)
        n = self.positions.shape[0]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"Index {bad} out of range [0, {n}) of the subset")
        return self.dataset.__getitems__(self.positions.index_select(0, idx))

    def __len__(self) -> int:
        return int(self.positions.shape[0])


__all__ = [
    "BATCH_KEYS",
    "ClusterSubset",
    "JASPERSteeringDataset",
    "JasperBatch",
    "available_memory",
    "passthrough_collate",
]
