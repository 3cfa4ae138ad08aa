"""The ``dataset.db`` cluster-labeled layouts as a :class:`~jasper.backend.StoreReader`.

Two layouts predate cluster-labeled datasets being an ordinary jasper kind, and neither has a
``config.json`` (see :mod:`jasper_memmap_sqlite.cluster_store`): the original system's
(``generation == "seed"``: labels as JSON text in ``samples``, ``embeddings_meta`` with a SHA-256
per file) and jasper's first (``"jasper"``: label matrices as ``.npy`` files and a block
catalogue in ``dataset.db``). :class:`ClusterDbReader` presents either as the arrays of the
``cluster-labeled`` kind, so ``jasper.ClusterLabeledDataset``, ``jasper validate`` and ``jasper
convert`` serve and convert them like any other dataset. The per-sample text columns are encoded
as records once, on first use.

Label updates: on the original system's layout :meth:`ClusterDbReader.write_rows` rewrites the
JSON label columns in one SQLite transaction (atomic and durable as SQLite is) and then the
process's private label matrices; jasper's first layout is read-only (convert it with ``jasper
convert SRC DST --to memmap-sqlite`` to update labels crash-safely).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from jasper import records
from jasper.backend import ArrayInfo, StoreReader
from jasper.dtypes import torch_dtype
from jasper.errors import CapabilityError, JasperError, ShapeError
from jasper.lazy import lazy_torch
from jasper.manifest import Manifest
from jasper.schema import CLUSTER_ARRAYS, CLUSTER_KIND, CLUSTER_RECORDS, cluster_label_array
from jasper_memmap_sqlite.catalogue import connect, transaction
from jasper_memmap_sqlite.cluster_store import (
    LABEL_TYPES,
    ClusterStore,
    MappedFile,
    open_cluster_store,
    remove_temp_on_collect,
)
from jasper_memmap_sqlite.npy import map_tensor, open_memmap

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

_META_COLUMNS = "sample_type, text, chroma_id, suggestions, steering_mode"


def _suggestions(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text  # the original stored whatever it was given


class ClusterDbReader(StoreReader):
    """A ``dataset.db`` cluster-labeled dataset (either generation) as the kind's arrays."""

    backend_name: ClassVar[str] = "memmap-sqlite"

    def __init__(self, path: Path, manifest: Manifest, store: ClusterStore) -> None:
        super().__init__(path, manifest)
        self.store = store
        self._records: dict[str, torch.Tensor] = {}
        self._maps: dict[str, torch.Tensor] = {}
        self._reset_process()

    @classmethod
    def open(cls, path: Path) -> ClusterDbReader:
        store = open_cluster_store(path)
        extra = {"dataset_info": store.info}
        name = store.info.get("dataset_name")
        manifest = Manifest.from_dict({
            **extra, "kind": CLUSTER_KIND, "embedding_dim": store.embedding_dim,
            "n_clusters": store.n_clusters,
            **({"dataset_name": name} if isinstance(name, str) else {}),
        }, store.db_path)
        reader = cls(Path(path), manifest, store)
        remove_temp_on_collect(reader, store)
        return reader

    @property
    def generation(self) -> str:
        """``"seed"`` for the original system's layout, ``"jasper"`` for jasper's first."""
        return self.store.generation

    def _reset_process(self) -> None:
        self._pid = os.getpid()
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_maps", "_lock_fd", "_mutex", "_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = {}
        self._reset_process()

    # --- what is where -----------------------------------------------------------------------
    def _source(self, name: str) -> MappedFile | torch.Tensor | None:
        s = self.store
        if name == "base_embeddings":
            return s.base
        if name == "steering_embeddings":
            return s.steering
        for t in LABEL_TYPES:
            if name == cluster_label_array(t):
                return s.labels[t]
        if name == "sample_ids":
            return s.sample_ids
        if name == "embedding_idx":
            return s.embedding_idx
        return None

    def _encode_records(self) -> None:
        with contextlib.closing(connect(self.store.db_path, readonly=True)) as conn:
            rows = conn.execute(f"SELECT {_META_COLUMNS} FROM samples ORDER BY "
                                "sample_id").fetchall()
        columns = list(zip(*rows)) if rows else [()] * 5
        for (name, spec), values in zip(CLUSTER_RECORDS.items(), columns):
            vals = [_suggestions(v) for v in values] if name == "suggestions" else list(values)
            try:
                offsets, data = records.encode(vals, spec)
            except JasperError as exc:
                raise type(exc)(f"{self.store.db_path}: samples.{name}: {exc}") from None
            self._records[spec.offsets_array] = offsets
            self._records[spec.bytes_array] = data

    def array_names(self) -> list[str]:
        return list(CLUSTER_ARRAYS)

    def map(self, name: str) -> torch.Tensor:
        if self._pid != os.getpid():
            self._maps = {}  # forked maps stay valid, but descriptors and locks do not
            self._reset_process()
        t = self._maps.get(name)
        if t is not None:
            return t
        src = self._source(name)
        if src is None:
            if name not in CLUSTER_ARRAYS:
                raise self._missing(name)
            if not self._records:
                self._encode_records()
            t = self._records[name]
        elif isinstance(src, torch.Tensor):
            t = src
        else:
            import mmap as _mmap

            t = map_tensor(open_memmap(src.path, src.header, advice=_mmap.MADV_RANDOM),
                           src.logical)
        self._maps[name] = t
        return t

    def info(self, name: str) -> ArrayInfo:
        src = self._source(name)
        if isinstance(src, MappedFile):
            return ArrayInfo(tuple(src.header.shape), torch_dtype(src.logical))
        t = self.map(name)
        return ArrayInfo(tuple(t.shape), t.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self.map(name).clone()

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.map(name)[start:stop].clone()

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self.map(name).index_select(0, rows)

    def close(self) -> None:
        self._maps = {}
        if self._lock_fd is not None and self._pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = None

    # --- label rows --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _flock(self, mode: int) -> Iterator[None]:
        self.map("sample_ids")  # resets the per-process state after a fork
        with self._mutex:
            if self._lock_fd is None:
                self._lock_fd = os.open(self.store.lock_path, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(self._lock_fd, mode)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def reading_rows(self) -> contextlib.AbstractContextManager[None]:
        return self._flock(fcntl.LOCK_SH)

    def sample_times(self, sample_id: int) -> tuple[Any, Any]:
        """``created_at`` and ``updated_at`` of a sample (the original kept them per row)."""
        with contextlib.closing(connect(self.store.db_path, readonly=True)) as conn:
            row = conn.execute("SELECT created_at, updated_at FROM samples WHERE sample_id = ?",
                               (int(sample_id),)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def write_rows(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                   note: Mapping[str, Any] | None = None) -> None:
        """Label rows of the original system's layout: its JSON columns, one transaction."""
        if not self.store.is_seed:
            raise CapabilityError(
                f"{self.path}: jasper's first cluster-labeled layout (dataset.db with label "
                "matrices) is read-only; convert it (`jasper convert SRC DST --to "
                "memmap-sqlite`) to change labels crash-safely")
        columns: dict[int, dict[str, np.ndarray]] = {}
        for name, (rows, values) in updates.items():
            t = next((t for t in LABEL_TYPES if cluster_label_array(t) == name), None)
            if t is None:
                raise ShapeError(f"{name} is not a label matrix; only labels change in place",
                                 array=name, rule="mutable array", path=self.store.db_path)
            vals = torch.as_tensor(values).to(torch.float32).numpy()
            if vals.shape != (len(rows), self.store.n_clusters):
                raise ShapeError(f"write_rows({name!r}): values are {vals.shape}, expected "
                                 f"({len(rows)}, {self.store.n_clusters})", array=name,
                                 rule="values match the array's rows")
            for i, r in enumerate(torch.as_tensor(rows).tolist()):
                columns.setdefault(int(r), {})[t] = vals[i]
        ids = self.map("sample_ids")
        with self._flock(fcntl.LOCK_EX), \
                contextlib.closing(connect(self.store.db_path, readonly=False)) as conn:
            with transaction(conn):
                for pos, labels in columns.items():
                    sets = ", ".join(f"{t}_label = ?" for t in labels)
                    conn.execute(f"UPDATE samples SET {sets}, updated_at = CURRENT_TIMESTAMP "
                                 "WHERE sample_id = ?",
                                 [json.dumps(v.tolist()) for v in labels.values()]
                                 + [int(ids[pos])])
            # the private matrices are derived from the database at open; patch them to match
            for pos, labels in columns.items():
                for t, v in labels.items():
                    f = self.store.labels[t]
                    mm = np.memmap(f.path, dtype=f.header.dtype, mode="r+",
                                   offset=f.header.offset, shape=f.header.shape)
                    mm[pos] = v
                    mm.flush()
                    del mm
        del note  # the original layout keeps no history table


def deep_check_cluster_db(path: Path) -> list[str]:
    """``validate --deep``'s backend part for the ``dataset.db`` layouts: SQLite's integrity
    and foreign-key checks and every checksum the layout records (the original's SHA-256 of
    each embedding file, jasper's block checksums)."""
    from jasper_memmap_sqlite.cluster_write import validate_cluster_labeled

    try:
        report = validate_cluster_labeled(path, deep=True)
    except JasperError as exc:
        return [str(exc)]
    return list(report.problems)


__all__ = ["ClusterDbReader", "deep_check_cluster_db"]
