"""``JASPERSteeringDataset``: a JASPER split served as PyTorch batches, from any backend.

Users of the original system keep their code (DATA_MODEL.md sections 3-5): the constructor, ``len``,
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
  half of the available RAM.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset, Subset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from jasper.allocator import tune_host_allocator
from jasper.backend import ArrayInfo, StoreReader
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
    ShapeError,
    SplitNotFoundError,
)
from jasper.manifest import Manifest
from jasper.registry import get_backend, guess_backend
from jasper.schema import ARRAYS, SPLITS, split_array
from jasper.validation import DataQualityWarning, check_arrays

LOGGER = logging.getLogger(__name__)

#: The keys of a sample and of a batch, in the documented order (DATA_MODEL.md section 3).
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

#: ``use_mmap=None`` maps when the arrays exceed this fraction of the available RAM.
AUTO_MMAP_FRACTION = 0.5

MODE_PRELOAD = "preload"
MODE_MMAP = "mmap"
MODE_ROWS = "rows"

_STEERING = ("steering_centroid", "steering_keyword_weighted", "steering_residual")
_FLOAT_TABLES = ("question_embs", "source_embs", "keyword_embs")
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


def _shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor allocated directly in shared memory (what ``default_collate``
    does in workers, so sending the batch to the main process copies nothing)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    storage = torch.UntypedStorage._new_shared(max(1, numel) * dtype.itemsize)
    strides = []
    acc = 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(1, int(s))
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape), tuple(reversed(strides)))


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
        # an object-store URL is pinned to its committed generation once; the Location stands
        # in for the Path in messages (it prints as the URL)
        self._pinned = None
        if isinstance(target, Location):
            from jasper.remote import pin_generation

            self._pinned = pin_generation(target, storage_format)
        self.dataset_dir = cast(Path, target)
        self.split = split
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cpu":
            tune_host_allocator()  # batches reuse freed memory instead of faulting in new pages
        self._closed = True
        self._reader: StoreReader | None = None
        if self._pinned is None and not self.dataset_dir.is_dir():
            raise DatasetNotFoundError(
                self.dataset_dir, hint="Check the path; `jasper synth DIR` creates a dataset")
        self.manifest = (self._pinned.manifest if self._pinned is not None
                         else Manifest.load(self.dataset_dir))
        self.config: dict[str, Any] = self.manifest.to_dict()
        self.embedding_dim = int(self.manifest.embedding_dim)
        self.n_neg = int(self.manifest.n_neg)
        self.curriculum: Curriculum = curriculum_from_manifest(self.manifest)
        if seed is None:
            seed = self.manifest.random_seed if self.manifest.random_seed is not None else 0
        self.seed = int(seed)

        if self._pinned is not None:
            backend_name = self._pinned.backend
        elif storage_format == "auto":
            preferred = (self.manifest.writer or {}).get("backend")
            backend_name = guess_backend(self.dataset_dir, preferred)
        else:
            backend_name = storage_format
        backend = get_backend(backend_name)  # BackendNotFoundError lists what is installed
        self.storage_format = backend_name
        caps = backend.capabilities

        reader = self._open_reader(mmap=False)
        try:
            names = set(reader.array_names())
            available = [s for s in SPLITS if split_array(s) in names]
            if split not in SPLITS or split_array(split) not in names:
                raise SplitNotFoundError(split, available, self.dataset_dir)
            missing = [n for n in ARRAYS if n not in names]
            if missing:
                raise IntegrityError(
                    f"array {missing[0]!r} is missing from the dataset (also missing: "
                    f"{', '.join(missing[1:]) or 'none'})", array=missing[0],
                    rule="required array", path=self.dataset_dir)
            infos = {n: reader.info(n) for n in ARRAYS}
            self.mode = self._choose_mode(use_mmap, caps, infos, backend_name)
            if self.mode == MODE_MMAP:
                reader.close()
                reader = self._open_reader(mmap=True)
            self._reader = reader
            self._infos = infos
            self._control = torch.tensor([-1, int(epoch), 0], dtype=torch.int64).share_memory_()
            self._draw_cache: tuple[int, tuple[int, int], tuple[int, int, int]] | None = None
            self._generation = 0
            self._attach(check=True)
        except BaseException:
            reader.close()
            self._reader = None
            raise
        if self.mode == MODE_PRELOAD:
            # everything is in memory: drop the store's maps and handles (they would keep file
            # pages resident); reload_negatives() reopens it
            reader.close()
            self._reader = None
        self._closed = False
        LOGGER.info("opened %s split %r: %d samples, backend %s, mode %s, device %s",
                    self.dataset_dir, split, len(self), backend_name, self.mode, self.device)

    # --- opening ------------------------------------------------------------------------------
    def _choose_mode(self, use_mmap: bool | None, caps: Any, infos: Mapping[str, ArrayInfo],
                     backend_name: str) -> str:
        if use_mmap is None:
            if self.device.type != "cpu":
                return MODE_PRELOAD
            total = sum(i.nbytes for i in infos.values())
            if total <= AUTO_MMAP_FRACTION * available_memory():
                return MODE_PRELOAD
            if caps.mmap:
                return MODE_MMAP
            if caps.row_access:
                return MODE_ROWS
            warnings.warn(
                f"{self.dataset_dir}: the arrays ({total / 2**30:.1f} GiB) exceed half the "
                f"available RAM but backend {backend_name!r} can neither map nor read rows; "
                "preloading anyway", ResourceWarning, stacklevel=3)
            return MODE_PRELOAD
        if not use_mmap:
            return MODE_PRELOAD
        if self.device.type != "cpu":
            raise CapabilityError(
                f"use_mmap=True keeps the data in files on the CPU; it cannot be combined with "
                f"device={self.device} (which preloads onto the device). Pass use_mmap=False.")
        if caps.mmap:
            return MODE_MMAP
        if caps.row_access:
            return MODE_ROWS
        raise CapabilityError(
            f"backend {backend_name!r} can neither memory-map nor read single rows of "
            f"{self.dataset_dir}; open with use_mmap=False (preload) or convert the dataset to a "
            "backend that maps (e.g. `jasper convert SRC DST --to pt`)")

    def _attach(self, *, check: bool) -> None:
        """Load (or map) the arrays of the current mode; optionally run the integrity check."""
        reader = self._reader
        assert reader is not None
        if self.mode == MODE_PRELOAD:
            arrays = self._preload(reader)
        elif self.mode == MODE_MMAP:
            arrays = {n: reader.map(n) for n in ARRAYS}
        else:
            arrays = self._rows_arrays(reader)
        if check:
            self._check(arrays, reader)
        if self.device.type != "cpu":
            arrays = self._to_device(arrays)
        self._bind(arrays)

    def _preload(self, reader: StoreReader) -> dict[str, torch.Tensor]:
        infos = self._infos
        n_pairs = infos["pair_index"].shape[0]
        d = self.embedding_dim
        st_dtype = infos[_STEERING[0]].dtype
        for n in _STEERING[1:]:
            st_dtype = torch.promote_types(st_dtype, infos[n].dtype)
        # One buffer for the three steering arrays plus a zero row: one gather serves any variant.
        table = torch.empty((1 + 3 * n_pairs, d), dtype=st_dtype)
        table[0].zero_()
        arrays: dict[str, torch.Tensor] = {}
        for i, name in enumerate(_STEERING):
            view = table[1 + i * n_pairs : 1 + (i + 1) * n_pairs]
            if infos[name].dtype == st_dtype:
                reader.read_into(name, view)
            else:
                view.copy_(reader.read(name))
            arrays[name] = view
        self._steering_table = table
        for name in ARRAYS:
            if name in arrays:
                continue
            info = infos[name]
            # negatives and tiers live in shared memory so that reload_negatives() reaches
            # forked (and persistent) workers by an in-place update
            shared = name in ("hard_negatives", "negative_tiers") and self.device.type == "cpu"
            out = _shared_empty(info.shape, info.dtype) if shared else torch.empty(
                info.shape, dtype=info.dtype)
            arrays[name] = reader.read_into(name, out)
        return arrays

    def _rows_arrays(self, reader: StoreReader) -> dict[str, torch.Tensor]:
        """Rows mode: the pair-level index arrays and scalars are read (small), the embedding
        tables and steering arrays stay in storage and are read row by row per batch; they
        appear in the returned dict as meta tensors (shape and dtype only)."""
        arrays: dict[str, torch.Tensor] = {}
        for name in ARRAYS:
            info = self._infos[name]
            if name in _FLOAT_TABLES or name in _STEERING:
                arrays[name] = torch.empty(info.shape, dtype=info.dtype, device="meta")
            else:
                arrays[name] = reader.read(name)
        return arrays

    def _check(self, arrays: Mapping[str, torch.Tensor], reader: StoreReader) -> None:
        lazy = self.mode == MODE_ROWS
        check_arrays(arrays, self.manifest, path=self.dataset_dir, check_finite=not lazy)
        if lazy:
            # one streamed pass over the float arrays that stay in storage
            for name in (*_FLOAT_TABLES, *_STEERING):
                _check_finite_stream(reader, name, self.dataset_dir)

    def _to_device(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        table = self._steering_table.to(self.device)
        n_pairs = self._infos["pair_index"].shape[0]
        for i, name in enumerate(_STEERING):
            out[name] = table[1 + i * n_pairs : 1 + (i + 1) * n_pairs]
        self._steering_table = table
        keep_on_cpu = ("pair_keyword_offsets", "pair_keyword_ids")
        for name, t in arrays.items():
            if name not in out:
                out[name] = t if name in keep_on_cpu else t.to(self.device)
            arrays[name] = out[name]  # drop the CPU copy as soon as the device copy exists
        return out

    def _bind(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self._arrays = dict(arrays)
        self.split_indices = arrays[split_array(self.split)]
        self.n_pairs = int(arrays["pair_index"].shape[0])
        # attributes of the original dataset, for code that reads them
        for name in ("question_embs", "source_embs", "keyword_embs", "centroid_embs",
                     "pair_index", "pair_cluster_id", "pair_relevance", "pair_keyword_offsets",
                     "pair_keyword_ids", "hard_negatives", "negative_tiers", "steering_centroid",
                     "steering_keyword_weighted", "steering_residual", "centroid_distances"):
            setattr(self, name, arrays[name])
        self.n_clusters = int(self._infos["centroid_embs"].shape[0])
        self.n_sources = int(self._infos["source_embs"].shape[0])
        pair = arrays["pair_index"]
        self._q_col = pair[:, 0].contiguous() if self.mode != MODE_MMAP else None
        self._s_col = pair[:, 1].contiguous() if self.mode != MODE_MMAP else None

    # --- pickling to spawned workers ------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.mode != MODE_PRELOAD:
            # mapped and lazily read arrays are re-attached from the files in the worker; pickling
            # them would copy the data into the message
            for key in [k for k, v in state.items() if isinstance(v, torch.Tensor)]:
                if key != "_control":
                    del state[key]
            state["_arrays"] = None
            state["_needs_attach"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.device.type == "cpu":
            tune_host_allocator()  # a spawned worker is a fresh process

    def _ensure_ready(self) -> None:
        if self._closed:
            raise JasperError(f"dataset {self.dataset_dir} ({self.split}) is closed")
        if self.__dict__.get("_needs_attach"):
            self._attach(check=False)
            self._needs_attach = False
            self._generation = int(self._control[_GENERATION])
        elif int(self._control[_GENERATION]) != self._generation:
            # reload_negatives() ran in the main process after this worker started
            self._generation = int(self._control[_GENERATION])
            self._reopen()
            self._load_negatives(check=False, in_place_ok=False)
            if self.mode == MODE_PRELOAD:
                self._release_reader()

    def _reopen(self) -> StoreReader:
        # a re-mined dataset is a new file (writes are atomic renames): reopen to see it
        self._release_reader()
        self._reader = self._open_reader(mmap=self.mode == MODE_MMAP)
        return self._reader

    def _open_reader(self, *, mmap: bool) -> StoreReader:
        if self._pinned is not None:
            from jasper.remote import open_pinned

            return open_pinned(self._pinned, mmap=mmap)
        return get_backend(self.storage_format).open(self.dataset_dir, self.manifest, mmap=mmap)

    def _release_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # --- sizes --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._infos[split_array(self.split)].shape[0])

    @property
    def current_epoch(self) -> int:
        """The curriculum epoch (shared with DataLoader workers)."""
        return int(self._control[_EPOCH])

    @property
    def use_mmap(self) -> bool:
        """True when the arrays stay in storage (mapped, or read by rows)."""
        return self.mode != MODE_PRELOAD

    @property
    def steering_probs(self) -> dict[str, float]:
        """The schedule's probabilities at the current epoch, by variant name."""
        return dict(zip(VARIANT_NAMES, self.curriculum.probabilities(self.current_epoch),
                        strict=True))

    def memory_bytes(self) -> int:
        """Bytes of the tensors this dataset holds in RAM or device memory (mapped files and
        rows left in storage do not count)."""
        if self.mode == MODE_MMAP or not self._arrays:
            return 0
        seen: set[int] = set()
        total = 0
        for t in (*self._arrays.values(), getattr(self, "_steering_table", None)):
            if t is None or t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return total

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
        v = int(self._control[_FORCED])
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

    def draw_params(self) -> tuple[int, tuple[int, int], tuple[int, int, int]]:
        """``(forced variant or -1, hash key, thresholds)`` of the current epoch."""
        forced = int(self._control[_FORCED])
        epoch = int(self._control[_EPOCH])
        cache = self._draw_cache
        if cache is None or cache[0] != epoch:
            cache = (epoch, draw_key(self.seed, epoch), self.curriculum.thresholds(epoch))
            self._draw_cache = cache
        return forced, cache[1], cache[2]

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
            raise IndexError(f"index {idx} out of range [0, {n}) of the {self.split} split")
        batch = self.__getitems__([idx])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> JasperBatch:
        """The collated batch of the given split positions: one vectorised gather per field."""
        self._ensure_ready()
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.split_indices.device)
        if idx.dim() != 1:
            idx = idx.reshape(-1)
        n = len(self)
        if idx.numel():
            lo, hi = torch.aminmax(idx)
            if int(lo) < 0 or int(hi) >= n:
                bad = int(idx[(idx < 0) | (idx >= n)][0])
                raise IndexError(f"index {bad} out of range [0, {n}) of the {self.split} split")
        out = None
        if get_worker_info() is not None and self.device.type == "cpu":
            out = self.empty_batch(idx.numel(), shared=True)
        return self.gather(idx, out)

    def empty_batch(self, batch_size: int, *, shared: bool = False, pin: bool = False,
                    device: torch.device | str | None = None) -> JasperBatch:
        """Uninitialised output buffers for :meth:`gather` (optionally in shared or pinned
        memory, or on another device)."""
        b, d, k = batch_size, self.embedding_dim, self.n_neg
        emb = self._infos["question_embs"].dtype
        src = self._infos["source_embs"].dtype
        st = self._steering_dtype()
        shapes = {
            "question_emb": ((b, d), emb),
            "target_source_emb": ((b, d), src),
            "steering": ((b, d), st),
            "negative_embs": ((b, k, d), src),
            "cluster_id": ((b,), torch.int64),
            "relevance": ((b,), torch.float32),
            "centroid_distance": ((b,), torch.float32),
            "steering_variant": ((b,), torch.int64),
            "negative_tiers": ((b, k), torch.int64),
        }
        dev = torch.device(device) if device is not None else self.device
        batch = JasperBatch()
        for key, (shape, dtype) in shapes.items():
            if shared and dev.type == "cpu":
                batch[key] = _shared_empty(shape, dtype)
            else:
                batch[key] = torch.empty(shape, dtype=dtype, device=dev,
                                         pin_memory=pin and dev.type == "cpu")
        return batch

    def _steering_dtype(self) -> torch.dtype:
        dt = self._infos[_STEERING[0]].dtype
        for n in _STEERING[1:]:
            dt = torch.promote_types(dt, self._infos[n].dtype)
        return dt

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
        pids = self.split_indices.index_select(0, idx)
        if draw is None:
            variant = self.variants_for_pairs(pids)
        else:
            key, thresholds, forced = draw
            drawn = variants_from_hash(hash32(pids, key), thresholds)
            variant = torch.where(forced >= 0, forced, drawn)
        b = idx.shape[0]
        d, k = self.embedding_dim, self.n_neg
        a = self._arrays
        o = out or {}
        if self._q_col is not None and self._s_col is not None:
            q = self._q_col.index_select(0, pids)
            s = self._s_col.index_select(0, pids)
        else:
            pair = a["pair_index"].index_select(0, pids)
            q, s = pair[:, 0].contiguous(), pair[:, 1].contiguous()
        neg_ids = a["hard_negatives"].index_select(0, pids).reshape(-1)
        batch = JasperBatch()
        batch["question_emb"] = self._table_rows("question_embs", q, o.get("question_emb"))
        batch["target_source_emb"] = self._table_rows("source_embs", s,
                                                      o.get("target_source_emb"))
        batch["steering"] = self._steering_rows(pids, variant, o.get("steering"))
        neg_out = o.get("negative_embs")
        negs = self._table_rows("source_embs", neg_ids,
                                None if neg_out is None else neg_out.view(b * k, d))
        batch["negative_embs"] = neg_out if neg_out is not None else negs.view(b, k, d)
        batch["cluster_id"] = _take(a["pair_cluster_id"], pids, o.get("cluster_id"), torch.int64)
        batch["relevance"] = _take(a["pair_relevance"], pids, o.get("relevance"), torch.float32)
        batch["centroid_distance"] = _take(a["centroid_distances"], pids,
                                           o.get("centroid_distance"), torch.float32)
        if "steering_variant" in o:
            batch["steering_variant"] = o["steering_variant"].copy_(variant)
        else:
            batch["steering_variant"] = variant
        batch["negative_tiers"] = _take(a["negative_tiers"], pids, o.get("negative_tiers"),
                                        torch.int64)
        return batch

    def _table_rows(self, name: str, rows: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if self.mode == MODE_ROWS:
            assert self._reader is not None
            got = self._reader.read_rows(name, rows)
            return got if out is None else out.copy_(got)
        return _take(self._arrays[name], rows, out, None)

    def _steering_rows(self, pids: torch.Tensor, variant: torch.Tensor,
                       out: torch.Tensor | None) -> torch.Tensor:
        if self.mode == MODE_PRELOAD:
            rows = torch.where(variant > 0, 1 + (variant - 1) * self.n_pairs + pids,
                               torch.zeros_like(pids))
            return _take(self._steering_table, rows, out, None)
        # mapped arrays cannot be stacked without a copy: gather each variant from its array
        dtype = self._steering_dtype()
        res = out if out is not None else torch.empty((pids.shape[0], self.embedding_dim),
                                                       dtype=dtype)
        res.zero_()
        for v, name in enumerate(_STEERING, start=1):
            where = torch.nonzero(variant == v).reshape(-1)
            if where.numel() == 0:
                continue
            sel = pids.index_select(0, where)
            if self.mode == MODE_ROWS:
                assert self._reader is not None
                rows = self._reader.read_rows(name, sel)
            else:
                rows = self._arrays[name].index_select(0, sel)
            res.index_copy_(0, where, rows.to(dtype))
        return res

    # --- subsets and reloads ------------------------------------------------------------------
    def subset_by_cluster(self, cluster_ids: Iterable[int] | torch.Tensor) -> ClusterSubset:
        """The samples of the split whose pair belongs to one of ``cluster_ids``."""
        self._ensure_ready()
        ids = torch.as_tensor(list(cluster_ids) if not isinstance(cluster_ids, torch.Tensor)
                              else cluster_ids, dtype=torch.int64)
        clusters = self._arrays["pair_cluster_id"].index_select(
            0, self.split_indices).to(torch.int64).cpu()
        positions = torch.nonzero(torch.isin(clusters, ids)).reshape(-1)
        return ClusterSubset(self, positions)

    def reload_negatives(self) -> None:
        """Re-read ``hard_negatives`` and ``negative_tiers`` from storage (after re-mining).

        The new arrays are checked (shape, range, non-negative tiers) before they replace the
        old ones. DataLoader workers, persistent ones included, serve the new negatives from
        their next batch: preloaded arrays are updated in place in shared memory, and in the
        other cases the workers reopen the store.
        """
        self._ensure_ready()
        self._reopen()
        try:
            in_place = self._load_negatives(check=True, in_place_ok=True)
        finally:
            if self.mode == MODE_PRELOAD:
                self._release_reader()
        if not in_place:
            self._control[_GENERATION] += 1
            self._generation = int(self._control[_GENERATION])

    def _load_negatives(self, *, check: bool, in_place_ok: bool) -> bool:
        reader = self._reader
        assert reader is not None
        new: dict[str, torch.Tensor] = {}
        for name in ("hard_negatives", "negative_tiers"):
            if self.mode == MODE_MMAP:
                new[name] = reader.map(name)
            else:
                new[name] = reader.read(name)
        if check:
            self._check_negatives(new["hard_negatives"], new["negative_tiers"])
        if self.mode == MODE_PRELOAD:
            old = self._arrays
            if in_place_ok and all(
                    old[n].shape == new[n].shape and old[n].dtype == new[n].dtype for n in new):
                for n in new:
                    old[n].copy_(new[n])
                return True
            if self.device.type == "cpu":
                new = {n: _shared_empty(t.shape, t.dtype).copy_(t) for n, t in new.items()}
            else:
                new = {n: t.to(self.device) for n, t in new.items()}
        self._arrays.update(new)
        self.hard_negatives = self._arrays["hard_negatives"]
        self.negative_tiers = self._arrays["negative_tiers"]
        return False

    def _check_negatives(self, neg: torch.Tensor, tiers: torch.Tensor) -> None:
        path = self.dataset_dir
        want = (self.n_pairs, self.n_neg)
        for name, t in (("hard_negatives", neg), ("negative_tiers", tiers)):
            if tuple(t.shape) != want:
                raise ShapeError(f"{name} has shape {tuple(t.shape)} after reload, expected "
                                 f"{want} (N_p, n_neg)", array=name, rule="shape", path=path)
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ShapeError(f"{name} has dtype {t.dtype}, expected an integer dtype",
                                 array=name, rule="dtype", path=path)
        if neg.numel():
            bad = (neg < 0) | (neg >= self.n_sources)
            if bool(bad.any()):
                row, col = (int(x) for x in torch.nonzero(bad)[0])
                value = int(neg[row, col])
                rule = "non-negative index" if value < 0 else "index < source_embs rows"
                raise IntegrityError(
                    f"hard_negatives[{row}, {col}] = {value} but source_embs has "
                    f"{self.n_sources} rows", array="hard_negatives", row=row, rule=rule,
                    path=path)
            own = self._arrays["pair_index"][:, 1:2].to(neg.device)
            same = int((neg == own).sum())
            if same:
                warnings.warn(f"{path}: hard_negatives: {same} negative(s) equal the pair's own "
                              "source after reload", DataQualityWarning, stacklevel=3)
        if tiers.numel() and int(tiers.min()) < 0:
            row, col = (int(x) for x in torch.nonzero(tiers < 0)[0])
            raise IntegrityError(f"negative_tiers[{row}, {col}] = {int(tiers[row, col])} is "
                                 "negative", array="negative_tiers", row=row,
                                 rule="non-negative", path=path)

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the tensors and the store (idempotent)."""
        self._release_reader()
        for name in list(self.__dict__):
            if isinstance(self.__dict__[name], torch.Tensor) and name != "_control":
                self.__dict__[name] = None
        self._arrays = {}
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
            raise IndexError(f"subset index out of range [0, {n})")
        return self.dataset.__getitems__(self.positions.index_select(0, idx))

    def __len__(self) -> int:
        return int(self.positions.shape[0])


def _take(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None,
          dtype: torch.dtype | None) -> torch.Tensor:
    """``src[rows]`` (cast to ``dtype``), written into ``out`` when given."""
    target = dtype or src.dtype
    if out is None:
        got = src.index_select(0, rows)
        return got if got.dtype == target else got.to(target)
    if out.dtype == src.dtype:
        return torch.index_select(src, 0, rows, out=out)
    return out.copy_(src.index_select(0, rows))


def _check_finite_stream(reader: StoreReader, name: str, path: Path) -> None:
    """NaN/Inf check of a stored float array, chunk by chunk (one pass, bounded memory)."""
    row0 = 0
    for chunk in reader.iter_chunks(name):
        if chunk.numel() and not bool(torch.isfinite(chunk.sum(dtype=torch.float64))):
            bad = ~torch.isfinite(chunk)
            if bool(bad.any()):
                r, c = (int(x) for x in torch.nonzero(bad.reshape(chunk.shape[0], -1))[0])
                raise IntegrityError(
                    f"{name}[{row0 + r}, {c}] = {float(chunk.reshape(chunk.shape[0], -1)[r, c])} "
                    "is not finite", array=name, row=row0 + r, rule="finite values", path=path)
        row0 += chunk.shape[0]


__all__ = [
    "BATCH_KEYS",
    "ClusterSubset",
    "JASPERSteeringDataset",
    "JasperBatch",
    "available_memory",
    "passthrough_collate",
]
