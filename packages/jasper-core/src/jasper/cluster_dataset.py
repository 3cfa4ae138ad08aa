"""``ClusterLabeledDataset``: (base embedding, steering embedding, cluster label) triplets.

The API of the original system (docs/migrating.md#cluster-labeled-datasets), served from any backend through
:class:`~jasper.backend.StoreReader` (a ``cluster-labeled`` dataset, see
:mod:`jasper.cluster_kind`, or a layout a backend reads without ``config.json``, such as the
original system's ``dataset.db``):

- embeddings, labels, sample ids and embedding indices are arrays, mapped where the backend maps
  (read rows on demand where it only reads rows, preloaded otherwise); a batch is a handful of
  vectorised gathers (``__getitems__``);
- the per-sample metadata (sample type, text, chroma id, suggestions, steering mode) are records
  (:mod:`jasper.records`), decoded for a batch in one pass; the LRU cache (``cache_size``
  entries per process) keeps decoded rows, used only with ``return_metadata=True`` and by
  :meth:`prefill_cache`;
- cache statistics are true with DataLoader workers: every process counts its hits and misses in
  its own row of a small shared-memory tensor created with the dataset, and
  :meth:`get_cache_stats` sums the rows (the original counted in each worker's private copy, so
  the main process always reported zero);
- :meth:`update_labels` is one atomic change on backends with the ``write_rows`` capability
  (:meth:`~jasper.backend.StoreReader.write_rows`): every label type it touches changes together,
  for readers in any process (labels are read under
  :meth:`~jasper.backend.StoreReader.reading_rows`, so no batch holds half of a change) and
  across a crash. Other backends raise :class:`~jasper.errors.CapabilityError` naming those that
  can.

Items are ``(base_emb [D], steering_emb [D], label [n_clusters])`` plus, with
``return_metadata=True``, a dict (sample_id, sample_type, text, chroma_id, suggestions,
steering_mode, source_label, steering_label, combined_label). A DataLoader given
``collate_fn=ClusterLabeledDataset.collate`` (or :meth:`ClusterLabeledDataset.loader`) receives
whole batches from ``__getitems__``: tensors stacked, metadata as a dict of lists (labels
stacked).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate_fn_map

from jasper import records
from jasper.atomic import pid_alive
from jasper.backend import StoreReader
from jasper.errors import CapabilityError, FormatError, JasperError, ShapeError
from jasper.rows import as_row_index
from jasper.schema import (
    CLUSTER_ARRAYS,
    CLUSTER_KIND,
    CLUSTER_LABEL_TYPES,
    CLUSTER_RECORDS,
    cluster_label_array,
)

LABEL_TYPES = CLUSTER_LABEL_TYPES
#: Rows of the shared statistics tensor: one per process that ever read through the dataset.
STAT_SLOTS = 1024
_PID, _HITS, _MISSES, _ENTRIES = range(4)
_META = tuple(CLUSTER_RECORDS)  # sample_type, text, chroma_id, suggestions, steering_mode

Batch = tuple[torch.Tensor, ...] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]


class PreCollated(torch.Tensor):
    """Marks the first tensor of a batch that ``__getitems__`` already collated."""


def _unmark(batch: Any) -> Any:
    if isinstance(batch, tuple) and batch and isinstance(batch[0], PreCollated):
        return (batch[0].as_subclass(torch.Tensor), *batch[1:])
    return batch


def _collate_precollated(batch: Any, *, collate_fn_map: Any = None) -> Any:
    # default_collate dispatches on type(batch[0]); for a batch from __getitems__ that is the
    # marked tensor, and the batch itself is the finished result
    return _unmark(batch)


default_collate_fn_map[PreCollated] = _collate_precollated


class SampleNotFoundError(JasperError, KeyError):
    """``update_labels`` was given a sample id that is not in the dataset."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def as_index(rows: object) -> torch.Tensor:
    """``rows`` (tensor, list, range, numpy array) as a flat int64 CPU tensor."""
    return as_row_index(rows, "indices").reshape(-1)


def check_bounds(rows: torch.Tensor, n: int, what: str) -> None:
    """IndexError naming the first index outside ``[0, n)`` (one reduction when all are fine)."""
    if rows.numel() == 0:
        return
    lo, hi = torch.aminmax(rows)
    if int(lo) >= 0 and int(hi) < n:
        return
    pos = int(torch.nonzero((rows < 0) | (rows >= n))[0])
    raise IndexError(f"{what}: index {int(rows[pos])} (position {pos}) is out of range for "
                     f"{n} rows")


def _gather(src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``src[rows]`` reading each distinct row once in ascending order (a shuffled batch from a
    map then faults its pages in one sweep), as a tensor the caller owns."""
    if rows.numel() == 0:
        return torch.empty((0, *src.shape[1:]), dtype=src.dtype)
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    got = src.index_select(0, uniq)
    if uniq.numel() != rows.numel() or not torch.equal(uniq, rows):
        got = got.index_select(0, inverse)
    return got


def open_cluster_reader(path: str | Path, backend: str = "auto", *,
                        mmap: bool = True) -> StoreReader:
    """Open a cluster-labeled dataset for reading: mapped where the backend maps (``mmap``),
    else plainly; a dataset of another kind is a :class:`FormatError`."""
    from jasper.store import open_store

    try:
        reader = open_store(path, backend, mmap=mmap)
    except CapabilityError:
        if not mmap:
            raise
        reader = open_store(path, backend, mmap=False)
    kind = reader.manifest.dataset_kind
    if kind != CLUSTER_KIND:
        reader.close()
        raise FormatError(path, f"this is a {kind!r} dataset, not a {CLUSTER_KIND!r} one "
                          f"(rule: ClusterLabeledDataset serves {CLUSTER_KIND!r} datasets; "
                          "JASPERSteeringDataset serves the others)")
    return reader


class _Tables:
    """The arrays one process reads from: mapped tensors (per process, never pickled),
    preloaded tensors (pickled with the dataset: torch's worker pickler shares their memory),
    or ``None`` for arrays read row by row through the reader."""

    def __init__(self) -> None:
        self.t: dict[str, torch.Tensor | None] = {}


class ClusterLabeledDataset(Dataset[Any]):
    """Domain-classification triplets from a cluster-labeled dataset.

    Args:
        dataset_dir: a ``cluster-labeled`` dataset directory written by any backend, or a
            directory in a layout a backend reads without ``config.json`` (the original system's
            ``dataset.db`` with jasper-memmap-sqlite installed).
        label_type: ``"combined"`` (default), ``"source"`` or ``"steering"``.
        return_metadata: add the metadata dict (decoded from the records, through the cache) to
            every item.
        mmap_mode: ``"r"`` (read-only map where the backend maps, default), ``"c"`` (the same:
            maps are never written through) or ``None`` (read the embeddings into RAM once).
            Writable modes are refused: embeddings are checksummed.
        cache_size: metadata entries each process keeps (LRU); 0 disables the cache.
        backend: the backend to read with (``"auto"``: the writer recorded in the manifest).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        label_type: str = "combined",
        return_metadata: bool = False,
        mmap_mode: str | None = "r",
        cache_size: int = 1000,
        backend: str = "auto",
    ) -> None:
        if label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be 'source', 'steering', or 'combined', got "
                             f"{label_type!r}")
        if mmap_mode not in ("r", "c", None):
            raise ValueError(f"mmap_mode must be 'r', 'c' or None, got {mmap_mode!r}; writable "
                             "maps ('r+', 'w+') are refused because embeddings are checksummed "
                             "and 'w+' would truncate the file")
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative integer, got {cache_size!r}")
        from jasper.cluster_kind import check_layout
        from jasper.location import as_target
        from jasper.registry import get_backend

        # a URL stays a Location (Path() would mangle s3://); it names the dataset in messages
        self.dataset_dir = cast(Path, as_target(dataset_dir))
        self.label_type = label_type
        self.return_metadata = return_metadata
        self.mmap_mode = mmap_mode
        self._cache_size = cache_size
        self._reader = open_cluster_reader(self.dataset_dir, backend)
        try:
            caps = get_backend(self._reader.backend_name).capabilities
            self._maps = caps.mmap
            self._rows = caps.row_access
            self._can_write_rows = caps.write_rows
            infos = {n: self._reader.info(n) for n in CLUSTER_ARRAYS if self._reader.has(n)}
            self.n_samples = check_layout(infos, self._reader.manifest, self.dataset_dir)
            self.embedding_dim: int = int(infos["base_embeddings"].shape[1])
            self.n_clusters: int = int(infos[cluster_label_array("combined")].shape[1])
            self._embedding_rows = int(infos["base_embeddings"].shape[0])
            self._preloaded: dict[str, torch.Tensor] = {}
            self._tables = _Tables()
            self._preload_what_is_not_mapped()
            self._check_indices()
        except BaseException:
            self._reader.close()
            raise
        # Created before any worker starts: forked workers inherit the shared pages, spawned ones
        # receive a handle through torch's multiprocessing pickler.
        self._stats = torch.zeros((STAT_SLOTS, 4), dtype=torch.int64).share_memory_()
        # Claims of statistics rows are serialised across processes (whatever their start
        # method) by an flock on a private file this process creates and removes.
        fd, claim = tempfile.mkstemp(prefix="jasper-cluster-stats-")
        os.close(fd)
        self._claim_path = claim
        owner = os.getpid()
        weakref.finalize(self, _unlink_in, owner, claim)
        self._reset_process_state()

    # --- arrays ------------------------------------------------------------------------------
    def _mapped_array(self, name: str) -> bool:
        if not self._maps:
            return False
        if name in ("base_embeddings", "steering_embeddings"):
            return self.mmap_mode is not None
        return True

    def _preload_what_is_not_mapped(self) -> None:
        for name in CLUSTER_ARRAYS:
            if self._mapped_array(name):
                continue
            if name in ("base_embeddings", "steering_embeddings") and self.mmap_mode is not None \
                    and self._rows:
                continue  # read row by row on demand
            self._preloaded[name] = self._reader.read(name)

    def _table(self, name: str) -> torch.Tensor | None:
        """The tensor serving ``name`` in this process (``None``: read rows through the reader)."""
        tables = self._tables.t
        if name not in tables:
            if name in self._preloaded:
                tables[name] = self._preloaded[name]
            elif self._mapped_array(name):
                tables[name] = self._reader.map(name)
            else:
                tables[name] = None
        return tables[name]

    def _rows_of(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        t = self._table(name)
        if t is None:
            return self._reader.read_rows(name, rows)
        return _gather(t, rows)

    def _check_indices(self) -> None:
        """What opening checks of the index arrays (cheap: two reductions): embedding indices
        in range, sample ids strictly increasing."""
        from jasper.errors import IntegrityError

        ids = self._whole("sample_ids")
        emb = self._whole("embedding_idx")
        if emb.numel():
            lo, hi = torch.aminmax(emb)
            if int(lo) < 0 or int(hi) >= self._embedding_rows:
                pos = int(torch.nonzero((emb < 0) | (emb >= self._embedding_rows))[0])
                raise IntegrityError(
                    f"sample_id {int(ids[pos])} (item {pos}) has embedding_idx {int(emb[pos])} "
                    f"but base_embeddings has {self._embedding_rows} rows",
                    array="embedding_idx", row=pos, rule="0 <= embedding_idx < embedding rows",
                    path=self.dataset_dir)
        if ids.numel() > 1:
            step = ids[1:] - ids[:-1]
            if int(step.min()) <= 0:
                pos = int(torch.nonzero(step <= 0)[0]) + 1
                raise IntegrityError(f"sample_ids[{pos}] = {int(ids[pos])} does not follow "
                                     f"{int(ids[pos - 1])}", array="sample_ids", row=pos,
                                     rule="sample ids strictly increase", path=self.dataset_dir)

    def _whole(self, name: str) -> torch.Tensor:
        t = self._table(name)
        return t if t is not None else self._reader.read(name)

    # --- per-process state ---------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._tables = _Tables()
        self._cache: OrderedDict[int, tuple[Any, ...]] = OrderedDict()
        self._slot: int | None = None
        self._mutex = threading.RLock()

    def _process(self) -> None:
        if self._pid != os.getpid():
            # forked: the parent's maps and preloaded tensors stay valid and shared, and so do
            # its cached metadata rows; counters and the statistics row are this process's own
            tables, cache = self._tables, self._cache
            self._reset_process_state()
            self._tables, self._cache = tables, cache

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_tables", "_cache", "_slot", "_mutex", "_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _stat_slot(self) -> int:
        """This process's row of the statistics tensor, claimed once per process."""
        self._process()
        if self._slot is not None:
            return self._slot
        pid = os.getpid()
        with self._claim_lock():
            pids = self._stats[:, _PID].tolist()
            slot = pids.index(pid) if pid in pids else None
            if slot is None:
                free = [i for i, p in enumerate(pids) if p == 0]
                dead = [i for i, p in enumerate(pids) if p and not pid_alive(p)]
                # A dead process's row keeps its counts (they are history), and a new process
                # continues adding to it, so totals stay right when rows run out.
                slot = (free or dead or [STAT_SLOTS - 1])[0]
                self._stats[slot, _PID] = pid
        self._slot = slot
        return slot

    @contextmanager
    def _claim_lock(self) -> Iterator[None]:
        with self._mutex:
            try:
                fd = os.open(self._claim_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # the creating process is gone: nobody else claims
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    # --- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_samples

    @property
    def generation(self) -> str:
        """``"jasper"`` for datasets jasper wrote, ``"seed"`` for the original system's."""
        return str(getattr(self._reader, "generation", "jasper"))

    @property
    def reader(self) -> StoreReader:
        """The store this dataset reads from."""
        return self._reader

    # --- items and batches ---------------------------------------------------------------------
    def __getitem__(self, idx: int) -> tuple[Any, ...]:
        if isinstance(idx, torch.Tensor | np.ndarray) and idx.ndim == 0:
            idx = int(idx)
        if not isinstance(idx, int | np.integer) or isinstance(idx, bool):
            raise TypeError(f"index must be an integer, got {type(idx).__name__}")
        if not 0 <= idx < len(self):
            raise IndexError(f"Index {idx} out of range [0, {len(self)})")
        batch = self._fetch(torch.tensor([int(idx)]))
        item: list[Any] = [t[0] for t in batch[:3]]
        if self.return_metadata:
            meta = cast(dict[str, Any], batch[3])
            item.append({k: v[0] for k, v in meta.items()})
        return tuple(item)

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """A whole batch in one call: ``(base [B, D], steering [B, D], label [B, C])`` and,
        with ``return_metadata``, a dict of lists (labels stacked as ``[B, C]`` tensors).

        The first tensor is marked (a :class:`PreCollated` view) so that ``default_collate``,
        which a plain ``DataLoader(ds, batch_size=32)`` applies to what this returns, hands the
        batch back instead of stacking it a second time; the original README's loop keeps working.
        """
        batch = self._fetch(as_index(indices))
        return (batch[0].as_subclass(PreCollated), *batch[1:])

    @staticmethod
    def collate(batch: Batch) -> Batch:
        """The ``collate_fn`` for a DataLoader over this dataset: batches arrive collated."""
        return _unmark(batch)

    def loader(self, batch_size: int, *, shuffle: bool = False, num_workers: int = 0,
               **kwargs: Any) -> DataLoader[Any]:
        """A DataLoader whose batches come from one ``__getitems__`` call each. Workers of a
        store whose reader does not survive a fork (an object-store client) are spawned, as
        :func:`jasper.loader.create_loader` does."""
        if num_workers > 0 and not self._reader.fork_safe:
            import multiprocessing
            import warnings

            asked = kwargs.get("multiprocessing_context")
            method = asked if isinstance(asked, str) or asked is None else \
                asked.get_start_method()
            default = multiprocessing.get_start_method(allow_none=True)
            if method == "fork" or (method is None and default in (None, "fork")):
                if method == "fork":
                    warnings.warn(f"cluster-labeled dataset {self.dataset_dir}: its store's "
                                  "client does not survive a fork, so worker processes are "
                                  "started with spawn", RuntimeWarning, stacklevel=2)
                kwargs["multiprocessing_context"] = multiprocessing.get_context("spawn")
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle,
                          num_workers=num_workers, collate_fn=self.collate,  # type: ignore[arg-type]
                          **kwargs)

    def _labels(self, idx: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        with self._mutex, self._reader.reading_rows():
            return {t: self._rows_of(cluster_label_array(t), idx) for t in wanted}

    def _fetch(self, idx: torch.Tensor) -> Batch:
        self._process()
        check_bounds(idx, len(self), "ClusterLabeledDataset")
        eidx = self._rows_of("embedding_idx", idx)
        base = self._rows_of("base_embeddings", eidx)
        steering = self._rows_of("steering_embeddings", eidx)
        wanted = LABEL_TYPES if self.return_metadata else (self.label_type,)
        labels = self._labels(idx, wanted)
        if not self.return_metadata:
            return base, steering, labels[self.label_type]
        rows = self._metadata_rows(idx)
        meta: dict[str, Any] = {"sample_id": [r[0] for r in rows]}
        for i, name in enumerate(_META, start=1):
            meta[name] = [r[i] for r in rows]
        meta.update({"source_label": labels["source"], "steering_label": labels["steering"],
                     "combined_label": labels["combined"]})
        return base, steering, labels[self.label_type], meta

    # --- the metadata cache --------------------------------------------------------------------
    def _metadata_rows(self, idx: torch.Tensor) -> list[tuple[Any, ...]]:
        slot = self._stat_slot()
        found: dict[int, tuple[Any, ...]] = {}
        missing: list[int] = []
        cache = self._cache
        positions = idx.tolist()
        for pos in positions:
            row = cache.get(pos)
            if row is None:
                missing.append(pos)
            else:
                cache.move_to_end(pos)
                found[pos] = row
        hits = len(positions) - len(missing)
        if missing:
            fetched = self._decode(sorted(set(missing)))
            found.update(fetched)
            self._cache_put(fetched)
        self._stats[slot, _HITS] += hits
        self._stats[slot, _MISSES] += len(missing)
        self._stats[slot, _ENTRIES] = len(cache)
        return [found[p] for p in positions]

    def _decode(self, positions: list[int]) -> dict[int, tuple[Any, ...]]:
        """Metadata rows of items ``positions``: one gather and decode per record."""
        rows = np.asarray(positions, dtype=np.int64)
        ids = self._rows_of("sample_ids", torch.from_numpy(rows)).tolist()
        columns = []
        for name in _META:
            spec = CLUSTER_RECORDS[name]
            offsets = self._table(spec.offsets_array)
            data = self._table(spec.bytes_array)
            if offsets is None or data is None:  # pragma: no cover - records are always loaded
                offsets = self._reader.read(spec.offsets_array)
                data = self._reader.read(spec.bytes_array)
            columns.append(records.decode(offsets, data, rows, spec))
        return {p: (ids[i], *(c[i] for c in columns)) for i, p in enumerate(positions)}

    def _cache_put(self, rows: dict[int, tuple[Any, ...]]) -> None:
        if self._cache_size == 0:
            return
        cache = self._cache
        for pos, row in rows.items():
            cache[pos] = row
            cache.move_to_end(pos)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    def prefill_cache(self, indices: Sequence[int] | torch.Tensor | None = None) -> int:
        """Load the metadata of items ``indices`` (default: from the first item on) into this
        process's cache, up to ``cache_size`` entries; returns how many entries it holds.

        Prefill in the main process before a DataLoader starts: forked workers inherit the
        entries. Prefilling is not an access: it changes no hit or miss count.
        """
        self._process()
        if self._cache_size == 0:
            return 0
        if indices is None:
            idx = torch.arange(min(len(self), self._cache_size))
        else:
            idx = as_index(indices)
            check_bounds(idx, len(self), "prefill_cache")
            idx = idx[-self._cache_size :]
        positions = idx.tolist()
        rows = self._decode(sorted(set(positions)))
        self._cache_put({p: rows[p] for p in positions})
        self._stats[self._stat_slot(), _ENTRIES] = len(self._cache)
        return len(self._cache)

    def clear_cache(self) -> None:
        """Empty this process's metadata cache (the counters keep their history; see
        :meth:`reset_cache_stats`)."""
        self._process()
        self._cache.clear()
        self._stats[self._stat_slot(), _ENTRIES] = 0

    def reset_cache_stats(self) -> None:
        """Zero the hit and miss counters of every process."""
        self._stats[:, _HITS] = 0
        self._stats[:, _MISSES] = 0

    def get_cache_stats(self) -> dict[str, Any]:
        """Cache statistics summed over the main process and every DataLoader worker.

        ``cache_hits`` / ``cache_misses`` count metadata lookups (items fetched with
        ``return_metadata=True``) in every process that read through this dataset object, live
        or finished. ``cache_size`` is this process's entry count; ``process_cache_sizes`` maps
        each process id to its entry count at its last access; ``max_cache_size`` is the
        per-process capacity.
        """
        s = self._stats.clone()
        hits, misses = int(s[:, _HITS].sum()), int(s[:, _MISSES].sum())
        total = hits + misses
        self._process()
        used = s[:, _PID] != 0
        return {
            "cache_hits": hits,
            "cache_misses": misses,
            "total_accesses": total,
            "hit_rate": hits / total if total else 0.0,
            "cache_size": len(self._cache),
            "max_cache_size": self._cache_size,
            "process_cache_sizes": {int(p): int(e) for p, e in
                                    zip(s[used, _PID].tolist(), s[used, _ENTRIES].tolist())},
            "processes": int(used.sum()),
        }

    # --- lookups and label updates -------------------------------------------------------------
    def _position(self, sample_id: int) -> int | None:
        self._process()
        ids = self._table("sample_ids")
        if ids is None:  # pragma: no cover - sample ids are always loaded or mapped
            ids = self._reader.read("sample_ids")
        if ids.numel() == 0:
            return None
        pos = int(torch.searchsorted(ids, torch.tensor([int(sample_id)]))[0])
        if pos < ids.numel() and int(ids[pos]) == int(sample_id):
            return pos
        return None

    def get_sample_by_id(self, sample_id: int) -> dict[str, Any] | None:
        """The sample with database id ``sample_id`` (``None`` when absent): its metadata with
        parsed suggestions, its embedding index and its three labels as float32 numpy arrays
        (``created_at`` / ``updated_at`` where the store keeps them, else ``None``)."""
        pos = self._position(sample_id)
        if pos is None:
            return None
        row = self._decode([pos])[pos]
        idx = torch.tensor([pos])
        labels = self._labels(idx, LABEL_TYPES)
        times = getattr(self._reader, "sample_times", None)
        created, updated = times(int(sample_id)) if times is not None else (None, None)
        out: dict[str, Any] = {"sample_id": row[0]}
        out.update({name: row[i] for i, name in enumerate(_META, start=1)})
        out.update({
            "source_label": labels["source"][0].numpy().copy(),
            "steering_label": labels["steering"][0].numpy().copy(),
            "combined_label": labels["combined"][0].numpy().copy(),
            "embedding_idx": int(self._rows_of("embedding_idx", idx)[0]),
            "created_at": created, "updated_at": updated,
        })
        return out

    def update_labels(
        self,
        sample_id: int,
        source_label: Any = None,
        steering_label: Any = None,
        combined_label: Any = None,
    ) -> None:
        """Replace some labels of one sample as ONE atomic change, and persist it.

        Every label type given changes together: readers in every process see all of the change
        or none of it, and so does the next open after a crash at any point of the call (see
        :meth:`~jasper.backend.StoreReader.write_rows`; checksums stay true). The cached
        metadata of the sample is dropped in this process (labels themselves are never cached,
        so no process can serve a stale label from a mapped store). Raises
        :class:`SampleNotFoundError` for an unknown id, :class:`ShapeError` for a label that is
        not ``n_clusters`` finite floats, and :class:`CapabilityError` on a backend that cannot
        change rows in place (it names those that can).
        """
        new = {t: v for t, v in zip(LABEL_TYPES, (source_label, steering_label, combined_label))
               if v is not None}
        if not new:
            return
        pos = self._position(sample_id)
        if pos is None:
            raise SampleNotFoundError(f"{self.dataset_dir}: sample_id {sample_id} is not in the "
                                      "dataset (rule: update an existing sample)")
        rows = {t: self._check_label(v, t, int(sample_id)) for t, v in new.items()}
        index = torch.tensor([pos], dtype=torch.int64)
        updates = {cluster_label_array(t): (index, torch.from_numpy(r).reshape(1, -1))
                   for t, r in rows.items()}
        with self._mutex:
            self._reader.write_rows(updates, note={"change": "update_labels",
                                                   "sample_id": int(sample_id)})
            for name, (_, values) in updates.items():
                held = self._preloaded.get(name)
                if held is not None:  # a store that does not map: keep this process's copy true
                    held[pos] = values[0]
        self._cache.pop(pos, None)
        if self._slot is not None:
            self._stats[self._slot, _ENTRIES] = len(self._cache)

    def _check_label(self, value: Any, label_type: str, sample_id: int) -> np.ndarray:
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        try:
            arr = np.asarray(arr, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ShapeError(f"{label_type}_label for sample_id {sample_id} is not numeric: "
                             f"{exc}", array=cluster_label_array(label_type), row=sample_id,
                             rule="labels are floats", path=self.dataset_dir) from None
        if arr.shape != (self.n_clusters,):
            raise ShapeError(
                f"{label_type}_label for sample_id {sample_id} has shape {arr.shape}, expected "
                f"({self.n_clusters},)", array=cluster_label_array(label_type), row=sample_id,
                rule="labels have n_clusters values", path=self.dataset_dir)
        if not np.isfinite(arr).all():
            raise ShapeError(f"{label_type}_label for sample_id {sample_id} holds NaN or Inf",
                             array=cluster_label_array(label_type), row=sample_id,
                             rule="labels are finite", path=self.dataset_dir)
        return np.ascontiguousarray(arr)

    # --- conveniences --------------------------------------------------------------------------
    def create_subset(self, indices: Sequence[int]) -> Subset[Any]:
        """A ``torch.utils.data.Subset`` of this dataset (e.g. a train/val split)."""
        return Subset(self, list(indices))

    def close(self) -> None:
        """Release this process's maps and the reader's files."""
        self._tables = _Tables()
        self._cache.clear()
        self._reader.close()

    def __enter__(self) -> ClusterLabeledDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ClusterLabeledDataset({str(self.dataset_dir)!r}, samples={len(self)}, "
                f"embedding_dim={self.embedding_dim}, n_clusters={self.n_clusters}, "
                f"label_type={self.label_type!r}, backend={self._reader.backend_name!r}, "
                f"generation={self.generation!r})")


def _unlink_in(owner: int, path: str) -> None:
    """Remove ``path`` if this is process ``owner`` (forked workers share the file)."""
    if os.getpid() == owner:
        _unlink(path)


def _unlink(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)


__all__ = ["ClusterLabeledDataset", "PreCollated", "SampleNotFoundError", "open_cluster_reader"]
