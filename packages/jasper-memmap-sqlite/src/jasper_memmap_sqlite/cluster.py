"""``ClusterLabeledDataset``: (base embedding, steering embedding, cluster label) triplets.

The API of the original system (docs/migrating.md#cluster-labeled-datasets), served the jasper way:

- embeddings, labels, sample ids and embedding indices are memory-mapped matrices; a batch is
  a handful of vectorised gathers (``__getitems__``), never a SQLite query per item;
- SQLite keeps what only a person reads: text, chroma id, suggestions, steering mode. That is
  what the LRU cache (``cache_size`` samples) holds, and only ``return_metadata=True`` and
  :meth:`prefill_cache` use it;
- cache statistics are true with DataLoader workers: every process (main and each worker)
  counts its hits and misses in its own row of a small shared-memory tensor created with the
  dataset, and :meth:`get_cache_stats` sums the rows. The original counted in each worker's
  private copy, so the main process always reported zero;
- :meth:`update_labels` is atomic for readers in any process. Label rows are read under a shared
  ``flock`` on ``labels.lock`` and written under an exclusive one (plus a thread lock inside a
  process), inside a SQLite transaction that logs the change in ``label_history`` and updates
  the block checksums; a failure restores the old rows and rolls back. Workers read the same
  shared mapping, so they see a new label from their next batch on, never half of one. A lock
  was chosen over a generation counter because a reader then needs no retry loop and the
  guarantee holds on every CPU without relying on memory ordering; it costs two system calls
  per batch (microseconds) and a label read holds it for a copy of ``B x n_clusters`` floats.

Items are ``(base_emb [D], steering_emb [D], label [n_clusters])`` plus, with
``return_metadata=True``, a dict (sample_id, sample_type, text, chroma_id, suggestions,
steering_mode, source_label, steering_label, combined_label). A DataLoader given
``collate_fn=ClusterLabeledDataset.collate`` (or :meth:`ClusterLabeledDataset.loader`) receives
whole batches from ``__getitems__``: tensors stacked, metadata as a dict of lists (labels
stacked).
"""

from __future__ import annotations

import fcntl
import json
import mmap as _mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data._utils.collate import default_collate_fn_map

from jasper.errors import JasperError, ShapeError
from jasper_memmap_sqlite.catalogue import ProcessConnection
from jasper_memmap_sqlite.cluster_store import (
    LABEL_TYPES,
    ClusterStore,
    MappedFile,
    open_cluster_store,
    remove_temp_on_collect,
)
from jasper_memmap_sqlite.gather import as_index, check_bounds, gather_rows
from jasper_memmap_sqlite.npy import map_tensor, open_memmap

#: Rows of the shared statistics tensor: one per process that ever read through the dataset.
STAT_SLOTS = 1024
_PID, _HITS, _MISSES, _ENTRIES = range(4)
_META_COLUMNS = "sample_id, sample_type, text, chroma_id, suggestions, steering_mode"
_SQL_BATCH = 10_000

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
    """``update_labels`` was given a sample id that is not in ``dataset.db``."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class _Maps:
    """The per-process mapped tensors of one dataset."""

    def __init__(self, store: ClusterStore, mmap_mode: str | None) -> None:
        self.base = _embeddings(store.base, mmap_mode)
        self.steering = _embeddings(store.steering, mmap_mode)
        self.labels = {t: _map(store.labels[t]) for t in LABEL_TYPES}
        self.sample_ids = (store.sample_ids if isinstance(store.sample_ids, torch.Tensor)
                           else _map(store.sample_ids))
        self.embedding_idx = (store.embedding_idx if isinstance(store.embedding_idx, torch.Tensor)
                              else _map(store.embedding_idx))


def _map(f: MappedFile, mode: str = "r") -> torch.Tensor:
    return map_tensor(open_memmap(f.path, f.header, mode=mode, advice=_mmap.MADV_RANDOM),
                      f.logical)


def _embeddings(f: MappedFile, mmap_mode: str | None) -> torch.Tensor:
    if mmap_mode is None:
        from jasper_memmap_sqlite.npy import read_rows_direct

        return read_rows_direct(f.path, f.header, 0, f.header.shape[0], f.logical)
    return _map(f, mmap_mode)


class ClusterLabeledDataset(Dataset):  # type: ignore[type-arg]
    """Domain-classification triplets from a cluster-labeled dataset directory.

    Args:
        dataset_dir: directory holding ``dataset.db`` and the ``.npy`` files (written by jasper
            or by the original system).
        label_type: ``"combined"`` (default), ``"source"`` or ``"steering"``.
        return_metadata: add the metadata dict (from SQLite, through the cache) to every item.
        mmap_mode: ``"r"`` (read-only map, default), ``"c"`` (copy-on-write map) or ``None``
            (read the embeddings into RAM once). Writable modes are refused: embeddings are
            checksummed, and a file rewritten under a map kills its readers.
        cache_size: metadata entries each process keeps (LRU); 0 disables the cache.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        label_type: str = "combined",
        return_metadata: bool = False,
        mmap_mode: str | None = "r",
        cache_size: int = 1000,
    ) -> None:
        if label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be 'source', 'steering', or 'combined', got "
                             f"{label_type!r}")
        if mmap_mode not in ("r", "c", None):
            raise ValueError(f"mmap_mode must be 'r', 'c' or None, got {mmap_mode!r}; writable "
                             "maps ('r+', 'w+') are refused because embeddings are checksummed "
                             "and 'w+' would truncate the file")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative integer, got {cache_size!r}")
        self.dataset_dir = Path(dataset_dir)
        self.label_type = label_type
        self.return_metadata = return_metadata
        self.mmap_mode = mmap_mode
        self._cache_size = cache_size
        self._store = open_cluster_store(self.dataset_dir)
        remove_temp_on_collect(self, self._store)
        self.n_clusters: int = self._store.n_clusters
        self.embedding_dim: int = self._store.embedding_dim
        writable = os.access(self._store.db_path, os.W_OK)
        self._db = ProcessConnection(self._store.db_path, readonly=not writable)
        # Created before any worker starts: forked workers inherit the shared pages, spawned ones
        # receive a handle through torch's multiprocessing pickler.
        self._stats = torch.zeros((STAT_SLOTS, 4), dtype=torch.int64).share_memory_()
        self._reset_process_state()

    # --- per-process state ---------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._maps: _Maps | None = None
        self._cache: OrderedDict[int, tuple[Any, ...]] = OrderedDict()
        self._slot: int | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()
        self._rw_labels: dict[str, np.memmap] = {}

    def _process(self) -> _Maps:
        if self._pid != os.getpid():
            maps = self._maps  # forked: the parent's read-only maps stay valid and shared
            cache = self._cache
            self._reset_process_state()
            self._maps, self._cache = maps, cache
        if self._maps is None:
            self._maps = _Maps(self._store, self.mmap_mode)
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_maps", "_cache", "_slot", "_lock_fd", "_mutex", "_rw_labels", "_pid"):
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
        # Claiming a row happens once per process; the label lock file serialises claims across
        # processes whatever their start method (a multiprocessing Lock is tied to one).
        with self._labels_exclusive():
            pids = self._stats[:, _PID].tolist()
            slot = pids.index(pid) if pid in pids else None
            if slot is None:
                free = [i for i, p in enumerate(pids) if p == 0]
                dead = [i for i, p in enumerate(pids) if p and not _alive(p)]
                # A dead process's row keeps its counts (they are history), and a new process
                # continues adding to it, so totals stay right when rows run out.
                slot = (free or dead or [STAT_SLOTS - 1])[0]
                self._stats[slot, _PID] = pid
        self._slot = slot
        return slot

    # --- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._store.n_samples

    @property
    def generation(self) -> str:
        """``"jasper"`` for datasets jasper wrote, ``"seed"`` for the original system's."""
        return self._store.generation

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
            meta = batch[3]
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
        return (batch[0].as_subclass(PreCollated), *batch[1:])  # type: ignore[return-value]

    @staticmethod
    def collate(batch: Batch) -> Batch:
        """The ``collate_fn`` for a DataLoader over this dataset: batches arrive collated."""
        return _unmark(batch)

    def loader(self, batch_size: int, *, shuffle: bool = False, num_workers: int = 0,
               **kwargs: Any) -> DataLoader:  # type: ignore[type-arg]
        """A DataLoader whose batches come from one ``__getitems__`` call each."""
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle,
                          num_workers=num_workers, collate_fn=self.collate, **kwargs)

    def _fetch(self, idx: torch.Tensor) -> Batch:
        maps = self._process()
        check_bounds(idx, len(self), "ClusterLabeledDataset")
        eidx = maps.embedding_idx.index_select(0, idx)
        base = gather_rows(maps.base, eidx, "base_embeddings")
        steering = gather_rows(maps.steering, eidx, "steering_embeddings")
        wanted = LABEL_TYPES if self.return_metadata else (self.label_type,)
        with self._labels_shared():
            labels = {t: gather_rows(maps.labels[t], idx, f"{t}_labels") for t in wanted}
        if not self.return_metadata:
            return base, steering, labels[self.label_type]
        sids = maps.sample_ids.index_select(0, idx).tolist()
        rows = self._metadata_rows(sids)
        meta: dict[str, Any] = {
            "sample_id": sids,
            "sample_type": [r[1] for r in rows],
            "text": [r[2] for r in rows],
            "chroma_id": [r[3] for r in rows],
            "suggestions": [r[4] for r in rows],
            "steering_mode": [r[5] for r in rows],
            "source_label": labels["source"],
            "steering_label": labels["steering"],
            "combined_label": labels["combined"],
        }
        return base, steering, labels[self.label_type], meta

    # --- the metadata cache --------------------------------------------------------------------
    def _metadata_rows(self, sids: list[int]) -> list[tuple[Any, ...]]:
        slot = self._stat_slot()
        found: dict[int, tuple[Any, ...]] = {}
        missing: list[int] = []
        cache = self._cache
        for sid in sids:
            row = cache.get(sid)
            if row is None:
                missing.append(sid)
            else:
                cache.move_to_end(sid)
                found[sid] = row
        hits = len(sids) - len(missing)
        if missing:
            fetched = self._query_metadata(sorted(set(missing)))
            found.update(fetched)
            self._cache_put(fetched)
        self._stats[slot, _HITS] += hits
        self._stats[slot, _MISSES] += len(missing)
        self._stats[slot, _ENTRIES] = len(cache)
        return [found[s] for s in sids]

    def _cache_put(self, rows: dict[int, tuple[Any, ...]]) -> None:
        if self._cache_size == 0:
            return
        cache = self._cache
        for sid, row in rows.items():
            cache[sid] = row
            cache.move_to_end(sid)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _query_metadata(self, sids: list[int]) -> dict[int, tuple[Any, ...]]:
        out: dict[int, tuple[Any, ...]] = {}
        with self._db.use() as conn:
            for start in range(0, len(sids), _SQL_BATCH):
                part = json.dumps(sids[start : start + _SQL_BATCH])
                for row in conn.execute(
                        f"SELECT {_META_COLUMNS} FROM samples WHERE sample_id IN "
                        "(SELECT value FROM json_each(?))", (part,)):
                    out[row[0]] = (row[0], row[1], row[2], row[3], _suggestions(row[4]), row[5])
        return out

    def prefill_cache(self, indices: Sequence[int] | torch.Tensor | None = None) -> int:
        """Load the metadata of items ``indices`` (default: from the first item on) into this
        process's cache, up to ``cache_size`` entries; returns how many entries it holds.

        Prefill in the main process before a DataLoader starts: forked workers inherit the
        entries. Prefilling is not an access: it changes no hit or miss count.
        """
        maps = self._process()
        if self._cache_size == 0:
            return 0
        if indices is None:
            idx = torch.arange(min(len(self), self._cache_size))
        else:
            idx = as_index(indices)
            check_bounds(idx, len(self), "prefill_cache")
            idx = idx[-self._cache_size :]
        sids = maps.sample_ids.index_select(0, idx).tolist()
        for start in range(0, len(sids), _SQL_BATCH):
            part = sids[start : start + _SQL_BATCH]
            rows = self._query_metadata(sorted(set(part)))
            self._cache_put({s: rows[s] for s in part if s in rows})
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
        ids = self._process().sample_ids
        if ids.numel() == 0:
            return None
        pos = int(torch.searchsorted(ids, torch.tensor([int(sample_id)]))[0])
        if pos < ids.numel() and int(ids[pos]) == int(sample_id):
            return pos
        return None

    def get_sample_by_id(self, sample_id: int) -> dict[str, Any] | None:
        """The sample with database id ``sample_id`` (``None`` when absent): its ``samples``
        row with parsed suggestions, and its three labels as float32 numpy arrays."""
        maps = self._process()
        pos = self._position(sample_id)
        if pos is None:
            return None
        with self._db.use() as conn:
            row = conn.execute(
                f"SELECT {_META_COLUMNS}, created_at, updated_at FROM samples WHERE "
                "sample_id = ?", (int(sample_id),)).fetchone()
        if row is None:
            return None
        with self._labels_shared():
            labels = {t: maps.labels[t][pos].numpy().copy() for t in LABEL_TYPES}
        return {
            "sample_id": row[0], "sample_type": row[1], "text": row[2], "chroma_id": row[3],
            "suggestions": _suggestions(row[4]),
            "source_label": labels["source"], "steering_label": labels["steering"],
            "combined_label": labels["combined"],
            "embedding_idx": int(maps.embedding_idx[pos]), "steering_mode": row[5],
            "created_at": row[6], "updated_at": row[7],
        }

    def update_labels(
        self,
        sample_id: int,
        source_label: Any = None,
        steering_label: Any = None,
        combined_label: Any = None,
    ) -> None:
        """Replace some labels of one sample, atomically for every reader, and persist them.

        One SQLite transaction covers the change; for jasper datasets it logs each label in
        ``label_history`` and updates the block checksums of the label files, for the original
        system's datasets it rewrites the JSON columns as that system did. The cached metadata
        of the sample is dropped in this process (labels themselves are never cached, so no
        process can serve a stale label). Raises :class:`SampleNotFoundError` for an unknown
        id and :class:`ShapeError` for a label that is not ``n_clusters`` finite floats.
        """
        new = {t: v for t, v in zip(LABEL_TYPES, (source_label, steering_label, combined_label))
               if v is not None}
        if not new:
            return
        pos = self._position(sample_id)
        if pos is None:
            raise SampleNotFoundError(f"{self._store.db_path}: sample_id {sample_id} is not in "
                                      "the samples table (rule: update an existing sample)")
        rows = {t: self._check_label(v, t, int(sample_id)) for t, v in new.items()}
        maps = self._process()
        with self._labels_exclusive(), self._db.use() as conn:
            old = {t: maps.labels[t][pos].clone() for t in rows}
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._store.is_seed:
                    sets = ", ".join(f"{t}_label = ?" for t in rows)
                    conn.execute(f"UPDATE samples SET {sets}, updated_at = CURRENT_TIMESTAMP "
                                 "WHERE sample_id = ?",
                                 [json.dumps(r.tolist()) for r in rows.values()] + [sample_id])
                else:
                    conn.execute("UPDATE samples SET updated_at = CURRENT_TIMESTAMP WHERE "
                                 "sample_id = ?", (int(sample_id),))
                    conn.executemany(
                        "INSERT INTO label_history (sample_id, label_type, old_label, new_label)"
                        " VALUES (?, ?, ?, ?)",
                        [(int(sample_id), t, json.dumps(old[t].tolist()),
                          json.dumps(r.tolist())) for t, r in rows.items()])
                for t, r in rows.items():
                    self._write_label_row(t, pos, r)
                if not self._store.is_seed:
                    self._update_block_checksums(conn, rows, pos)
                conn.execute("COMMIT")
            except BaseException:
                for t, r in old.items():
                    self._write_label_row(t, pos, r.numpy())
                conn.execute("ROLLBACK")
                raise
        self._cache.pop(int(sample_id), None)
        if self._slot is not None:
            self._stats[self._slot, _ENTRIES] = len(self._cache)

    def _check_label(self, value: Any, label_type: str, sample_id: int) -> np.ndarray:
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape != (self.n_clusters,):
            raise ShapeError(
                f"{label_type}_label for sample_id {sample_id} has shape {arr.shape}, expected "
                f"({self.n_clusters},)", array=f"{label_type}_labels", row=sample_id,
                rule="labels have n_clusters values", path=self._store.db_path)
        if not np.isfinite(arr).all():
            raise ShapeError(f"{label_type}_label for sample_id {sample_id} holds NaN or Inf",
                             array=f"{label_type}_labels", row=sample_id,
                             rule="labels are finite", path=self._store.db_path)
        return arr

    def _write_label_row(self, label_type: str, pos: int, row: np.ndarray) -> None:
        mm = self._rw_labels.get(label_type)
        if mm is None:
            f = self._store.labels[label_type]
            mm = np.memmap(f.path, dtype=f.header.dtype, mode="r+", offset=f.header.offset,
                           shape=f.header.shape)
            self._rw_labels[label_type] = mm
        mm[pos] = row
        mm.flush()

    def _update_block_checksums(self, conn: Any, rows: dict[str, np.ndarray], pos: int) -> None:
        from jasper.manifest import Checksummer

        for t in rows:
            name = f"{t}_labels"
            entry = self._store.catalogue[name]
            block = pos // entry.rows_per_block
            start = block * entry.rows_per_block
            data = self._rw_labels[t][start : start + entry.rows_per_block]
            c = Checksummer()
            c.update(np.ascontiguousarray(data))
            conn.execute("UPDATE array_blocks SET checksum = ? WHERE array = ? AND block = ?",
                         (c.hexdigest(), name, block))

    # --- locks ---------------------------------------------------------------------------------
    def _lock_file(self) -> int:
        self._process()
        if self._lock_fd is None:
            # One descriptor per process: flock locks belong to the open file description, which
            # a forked child shares with its parent, so an inherited descriptor would not
            # exclude the parent.
            self._lock_fd = os.open(self._store.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        return self._lock_fd

    @contextmanager
    def _labels_shared(self) -> Iterator[None]:
        fd = self._lock_file()
        with self._mutex:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _labels_exclusive(self) -> Iterator[None]:
        fd = self._lock_file()
        with self._mutex:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    # --- conveniences --------------------------------------------------------------------------
    def create_subset(self, indices: Sequence[int]) -> Subset:  # type: ignore[type-arg]
        """A ``torch.utils.data.Subset`` of this dataset (e.g. a train/val split)."""
        return Subset(self, list(indices))

    def close(self) -> None:
        """Release this process's maps, descriptors and connection."""
        if self._pid == os.getpid():
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            self._db.close()
        self._lock_fd = None
        self._maps = None
        self._rw_labels.clear()
        self._cache.clear()

    def __enter__(self) -> ClusterLabeledDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ClusterLabeledDataset({str(self.dataset_dir)!r}, samples={len(self)}, "
                f"embedding_dim={self.embedding_dim}, n_clusters={self.n_clusters}, "
                f"label_type={self.label_type!r}, generation={self.generation!r})")


def _suggestions(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
