"""The arrays of an open JASPER split, and how rows of them are gathered: one table set per mode.

A :class:`TableSet` is everything the dataset, the threaded loader and the GPU loader need to
know about where the arrays live. There are three, chosen once when a dataset opens:

- :class:`PreloadedTables` (``"preload"``): every array is a tensor in RAM (or on a device).
  The three steering arrays are views of ONE stacked table ``[1 + 3 * N_p, D]`` whose row 0 is
  zeros, so any mix of variants is one gather. ``hard_negatives`` and ``negative_tiers`` live in
  shared memory, so a reload updates forked workers in place.
- :class:`MappedTables` (``"mmap"``): zero-copy read-only maps of the files.
- :class:`RowTables` (``"rows"``): the embedding-dimension arrays stay in storage and each batch
  reads its rows through ``reader.read_rows``; the other (small) arrays are read.

All three answer the same questions: :meth:`TableSet.gather` (rows of an array into an output),
:meth:`TableSet.gather_steering` (each pair's variant row), :meth:`TableSet.pair_columns`,
:meth:`TableSet.replace` (a checked reload), :meth:`TableSet.memory_bytes`, pickling (a
preloaded set pickles its tensors; the others pickle the store's location and re-attach from
the files in the receiving process) and :meth:`TableSet.close`. Array names come from
:mod:`jasper.schema` only.
"""

from __future__ import annotations

import abc
import ctypes
import mmap
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from jasper.allocator import huge_empty
from jasper.backend import ArrayInfo, StoreReader
from jasper.batchpool import storage_view
from jasper.manifest import Manifest
from jasper.registry import get_backend
from jasper.schema import ARRAYS, STEERING_ARRAYS, STEERING_VARIANTS, Cols
from jasper.steering import (
    EXCEPTION_ROWS,
    EXCEPTION_VALUES,
    DerivedSteering,
    check_exceptions,
    derived_spec,
    placeholder,
    stored_names,
)
from jasper.validation import check_arrays, check_finite_chunks

#: The steering arrays in variant order (variant ``v >= 1`` reads ``STEERING[v - 1]``).
STEERING: tuple[str, ...] = tuple(
    a for a in (STEERING_ARRAYS[v] for v in STEERING_VARIANTS) if a is not None)
#: The pair array whose columns are (question row, source row), and the tables they index.
PAIR_INDEX = "pair_index"
QUESTION_TABLE, SOURCE_TABLE = ARRAYS[PAIR_INDEX].references
#: The centroid table (one row per cluster: small, so read whole even in rows mode).
CENTROID_TABLE = ARRAYS["pair_cluster_id"].references[0]
#: Arrays a rows-mode table set leaves in storage: every embedding-dimension array but centroids.
LAZY_ARRAYS: tuple[str, ...] = tuple(
    n for n, s in ARRAYS.items() if s.cols is Cols.EMBEDDING_DIM and n != CENTROID_TABLE)
#: Arrays a preloaded set keeps in shared memory (what ``reload_negatives`` replaces in place).
RELOADABLE: tuple[str, ...] = ("hard_negatives", "negative_tiers")
#: Arrays with a NaN/Inf rule (streamed chunk by chunk where they stay in storage).
FINITE_ARRAYS: tuple[str, ...] = tuple(n for n, s in ARRAYS.items() if s.finite)
#: Bytes per chunk of a scan through a map (and how far the kernel is asked to read ahead).
SCAN_CHUNK_BYTES = 64 << 20
_MADV_WILLNEED = 3  # Linux and the BSDs/macOS agree on the value
_WILLNEED_STEP = 128 << 10  # the default read-ahead window (32 pages)


@dataclass(frozen=True)
class StoreLocation:
    """Where a table set's arrays are stored: picklable as a path, opened per process."""

    path: Path
    backend: str
    manifest: Manifest

    def open(self) -> StoreReader:
        """A fresh reader (it maps, reads rows or preloads as its caller asks)."""
        return get_backend(self.backend).open(self.path, self.manifest)


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor allocated directly in shared memory (what ``default_collate``
    does in workers, so sending the batch to the main process copies nothing)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    storage = torch.UntypedStorage._new_shared(max(1, numel) * dtype.itemsize)
    return storage_view(storage, 0, shape, dtype)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith(("linux", "darwin", "freebsd")):
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def will_need(t: torch.Tensor) -> None:
    """Ask the kernel to start reading the pages behind a mapped tensor now (``MADV_WILLNEED``:
    a one-shot asynchronous read-ahead; the mapping keeps its own advice, e.g. ``MADV_RANDOM``,
    which disables read-ahead for the faults of a sequential scan). A no-op where unsupported."""
    if _LIBC is None or t.numel() == 0 or t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    aligned = start - start % page
    end = start + t.numel() * t.element_size()
    # the kernel caps one WILLNEED at the device's read-ahead window (force_page_cache_ra), so
    # a long range is asked for in window-sized steps
    for lo in range(aligned, end, _WILLNEED_STEP):
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(min(_WILLNEED_STEP, end - lo)),
                      _MADV_WILLNEED)


def read_ahead_chunks(t: torch.Tensor, chunk_bytes: int = SCAN_CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Row chunks of a (mapped) tensor for a sequential scan, each read ahead while the previous
    one is processed: a cold scan costs disk bandwidth, not one page fault per 4 KiB."""
    n = int(t.shape[0]) if t.dim() else 0
    if n == 0:
        yield t
        return
    row_bytes = max(1, t[0].numel() * t.element_size())
    step = max(1, chunk_bytes // row_bytes)
    will_need(t[:step])
    for start in range(0, n, step):
        if start + step < n:
            will_need(t[start + step : start + 2 * step])
        yield t[start : start + step]


def steering_dtype(infos: Mapping[str, ArrayInfo]) -> torch.dtype:
    """The dtype that holds every steering array (they may be stored in different floats)."""
    dt = infos[STEERING[0]].dtype
    for n in STEERING[1:]:
        dt = torch.promote_types(dt, infos[n].dtype)
    return dt


def take(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``src[rows]`` (cast to ``dtype``), written into ``out`` when given."""
    target = dtype or src.dtype
    if out is None:
        got = src.index_select(0, rows)
        return got if got.dtype == target else got.to(target)
    if out.dtype == src.dtype:
        return torch.index_select(src, 0, rows, out=out)
    return out.copy_(src.index_select(0, rows))


class TableSet(abc.ABC):
    """The arrays of one open dataset and the one way to gather rows of them.

    ``arrays`` maps every schema array to a tensor: owned, mapped, or (rows mode, arrays left in
    storage) a ``meta`` tensor carrying only shape and dtype.
    """

    #: ``"preload"``, ``"mmap"`` or ``"rows"``.
    mode: ClassVar[str]
    #: Rows are gathered from tensors of this process (``index_select``, which releases the GIL):
    #: threads parallelise it and worker processes would only add copies.
    in_memory: ClassVar[bool]
    #: Every array is an owned tensor on ``device``: a gather is a fixed kernel sequence
    #: (capturable in a CUDA graph) and a device can be fed without staging.
    resident: ClassVar[bool]
    #: Whether the store's reader stays open while serving (maps and row reads need it).
    keeps_reader: ClassVar[bool] = True
    #: Whether the reader must be able to map.
    maps: ClassVar[bool] = False

    def __init__(self, location: StoreLocation, infos: Mapping[str, ArrayInfo],
                 device: torch.device) -> None:
        self.location = location
        self.infos = dict(infos)
        self.device = device
        self.n_pairs = int(infos[PAIR_INDEX].shape[0])
        self.embedding_dim = int(location.manifest.embedding_dim)
        self.arrays: dict[str, torch.Tensor] = {}
        self._reader: StoreReader | None = None
        self._q_col: torch.Tensor | None = None
        self._s_col: torch.Tensor | None = None
        self._attached = False
        #: the arrays in storage (derived steering: not the steering arrays, but its exceptions)
        self.names: tuple[str, ...] = stored_names(location.manifest)
        self.derived_spec = derived_spec(location.manifest)
        #: the per-batch steering of a derived dataset (None: steering is stored)
        self.derived: DerivedSteering | None = None
        #: arrays that exist only as shape and dtype (meta tensors): derived steering (the
        #: variants a partially derived dataset keeps stored are real arrays)
        self.virtual: frozenset[str] = frozenset(
            self.derived_spec.derived_arrays if self.derived_spec is not None else ())

    @property
    def steering_dtype(self) -> torch.dtype:
        """The dtype of served steering rows."""
        if self.derived_spec is not None:
            from jasper.dtypes import torch_dtype

            return torch_dtype(self.derived_spec.dtype)
        return steering_dtype(self.infos)

    def _virtual_arrays(self) -> dict[str, torch.Tensor]:
        return {n: placeholder(self.n_pairs, self.embedding_dim, self.steering_dtype)
                for n in sorted(self.virtual)}

    # --- opening ------------------------------------------------------------------------------
    def attach(self, reader: StoreReader | None = None, *, check: bool = False) -> None:
        """Load (or map) the arrays from ``reader`` (default: a fresh one); with ``check``, run
        every rule of the data model first (:func:`jasper.validation.check_arrays`)."""
        if reader is None:
            reader = self.location.open()
        try:
            arrays = self._load(reader)
            virtual = self._virtual_arrays()
            if check:
                self._check({**arrays, **virtual}, reader)
                if self.derived_spec is not None:
                    check_exceptions(arrays[EXCEPTION_ROWS], arrays[EXCEPTION_VALUES],
                                     n_pairs=self.n_pairs, dim=self.embedding_dim,
                                     dtype=self.steering_dtype,
                                     expected=self.derived_spec.exceptions,
                                     path=self.location.path,
                                     stored_ids=self.derived_spec.stored_ids)
            self.arrays = {**self._place(arrays), **virtual}
            if self.derived_spec is not None:
                self.derived = DerivedSteering(
                    self.derived_spec, self.n_pairs, self.embedding_dim,
                    self.arrays[EXCEPTION_ROWS], self.arrays[EXCEPTION_VALUES])
                self.derived.prepare(self.arrays, resident=self.resident)
        except BaseException:
            reader.close()
            raise
        if self.keeps_reader:
            self._reader = reader
        else:
            # everything is in memory: drop the store's maps and handles (they would keep file
            # pages resident)
            reader.close()
        self._columns()
        self._attached = True

    def ensure_attached(self) -> bool:
        """Re-attach from the files after unpickling (a spawned worker); True when it did."""
        if self._attached:
            return False
        self.attach(check=False)
        return True

    @property
    def fork_safe(self) -> bool:
        """Whether worker processes forked from this one can serve rows: true unless the store
        stays open through a reader whose client does not survive a fork."""
        return self._reader is None or self._reader.fork_safe

    @abc.abstractmethod
    def _load(self, reader: StoreReader) -> dict[str, torch.Tensor]:
        """Every schema array, the way this mode holds it (on the CPU)."""

    def _place(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move the loaded arrays where they are served from (identity but for a device)."""
        return arrays

    def _check(self, arrays: Mapping[str, torch.Tensor], reader: StoreReader) -> None:
        check_arrays(arrays, self.location.manifest, path=self.location.path,
                     skip_finite=self.virtual)

    def _columns(self) -> None:
        pair = self.arrays[PAIR_INDEX]
        self._q_col = pair[:, 0].contiguous()
        self._s_col = pair[:, 1].contiguous()

    # --- gathers ------------------------------------------------------------------------------
    def pair_columns(self, pair_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The question rows and source rows of ``pair_ids`` (two contiguous tensors in the
        stored index type: row ids only index other tables, and ``index_select`` takes int32
        as it takes int64, so a compact ``pair_index`` is not widened per batch)."""
        assert self._q_col is not None and self._s_col is not None
        return self._q_col.index_select(0, pair_ids), self._s_col.index_select(0, pair_ids)

    def gather(self, name: str, rows: torch.Tensor, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``rows`` of array ``name`` (cast to ``dtype``), written into ``out`` if given."""
        return take(self.arrays[name], rows, out, dtype)

    def gather_many(self, name: str, rows: Sequence[torch.Tensor],
                    out: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """:meth:`gather` of several row sets of one array (each into its ``out``, if given).
        A table set whose rows live in storage reads them all in one request series."""
        return [self.gather(name, r, o) for r, o in zip(rows, out, strict=True)]

    def steering_rows(self, pair_ids: torch.Tensor, variant: torch.Tensor) -> torch.Tensor | None:
        """Where steering is served by one gather of a stacked table, each pair's row in it for
        its variant (to be passed back as ``gather_steering(rows=)``); ``None`` elsewhere."""
        return None

    def gather_steering(self, pair_ids: torch.Tensor, variant: torch.Tensor,
                        out: torch.Tensor | None = None, *,
                        rows: torch.Tensor | None = None,
                        questions: torch.Tensor | None = None,
                        sources: torch.Tensor | None = None,
                        clusters: torch.Tensor | None = None) -> torch.Tensor:
        """Each pair's steering row of its variant (0: zeros), written into ``out`` if given.

        ``rows``: what :meth:`steering_rows` gave for these pairs and variants (precomputed
        once per epoch by the dataset). Derived steering is computed from the batch's
        ``questions``, ``sources`` and ``clusters`` rows when the caller has gathered them
        already (else gathered here)."""
        if self.derived is not None:
            return self._derive(pair_ids, variant, out, questions, sources, clusters)
        # separate arrays cannot be stacked without a copy: gather each variant from its array
        dtype = steering_dtype(self.infos)
        res = out if out is not None else torch.empty(
            (pair_ids.shape[0], self.embedding_dim), dtype=dtype, device=pair_ids.device)
        res.zero_()
        for v, name in enumerate(STEERING, start=1):
            where = torch.nonzero(variant == v).reshape(-1)
            if where.numel() == 0:
                continue
            rows = self.gather(name, pair_ids.index_select(0, where))
            res.index_copy_(0, where, rows.to(dtype))
        return res

    def _derive(self, pair_ids: torch.Tensor, variant: torch.Tensor, out: torch.Tensor | None,
                questions: torch.Tensor | None, sources: torch.Tensor | None,
                clusters: torch.Tensor | None) -> torch.Tensor:
        assert self.derived is not None
        return self.derived.gather(
            pair_ids, variant, table=lambda name, rows: self.gather(name, rows),
            csr=(self.arrays["pair_keyword_offsets"], self.arrays["pair_keyword_ids"]),
            questions=questions, sources=sources, clusters=clusters, out=out,
            stored=lambda name, rows, into: self.gather(name, rows, into))

    # --- reloads ------------------------------------------------------------------------------
    def read_fresh(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``names`` as they are in storage now (a rewritten dataset is new files: reopen)."""
        self._release_reader()
        reader = self.location.open()
        try:
            got = {n: reader.map(n) if self.maps else reader.read(n) for n in names}
        except BaseException:
            reader.close()
            raise
        if self.keeps_reader:
            self._reader = reader
        else:
            reader.close()
        return got

    def replace(self, names: Sequence[str], *, validate: Callable[[Mapping[str, torch.Tensor]],
                object] | None = None, in_place_ok: bool = True) -> bool:
        """Re-read ``names`` from storage, check them with ``validate`` (before anything is
        replaced) and serve them from now on. Returns True when the new values were copied into
        the old (shared-memory) tensors, which reaches forked workers without a reopen."""
        new = self.read_fresh(names)
        if validate is not None:
            validate(new)
        self.arrays.update(new)
        if PAIR_INDEX in new:
            self._columns()
        return False

    # --- sizes and lifetime -------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of the tensors this set holds in RAM or device memory (maps and rows left in
        storage do not count)."""
        seen: set[int] = set()
        total = 0
        for t in self._owned():
            if t.device.type == "meta":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return total

    def _owned(self) -> list[torch.Tensor]:
        extra = [] if self.derived is None else self.derived.owned()
        return [*self.arrays.values(), *extra]

    def _release_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        """Release the arrays and the store (idempotent)."""
        self._release_reader()
        self.arrays = {}
        self._q_col = self._s_col = None
        self._attached = False
        self.derived = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # maps and lazily read arrays are re-attached from the files in the receiving process;
        # pickling them would copy the data into the message
        state.update(arrays={}, _reader=None, _q_col=None, _s_col=None, _attached=False,
                     derived=None)
        return state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location.path} ({self.location.backend})>"


class PreloadedTables(TableSet):
    """Every array read into RAM (or moved onto ``device``) once."""

    mode = "preload"
    in_memory = True
    resident = True
    keeps_reader = False

    def __init__(self, location: StoreLocation, infos: Mapping[str, ArrayInfo],
                 device: torch.device) -> None:
        super().__init__(location, infos, device)
        self.steering_table: torch.Tensor | None = None

    def _load(self, reader: StoreReader) -> dict[str, torch.Tensor]:
        infos = self.infos
        arrays: dict[str, torch.Tensor] = {}
        if self.derived_spec is None:
            n_pairs, d = self.n_pairs, self.embedding_dim
            st_dtype = steering_dtype(infos)
            # One buffer for the three steering arrays plus a zero row: one gather serves any
            # variant.
            table = huge_empty((1 + len(STEERING) * n_pairs, d), st_dtype)
            table[0].zero_()
            for i, name in enumerate(STEERING):
                view = table[1 + i * n_pairs : 1 + (i + 1) * n_pairs]
                if infos[name].dtype == st_dtype:
                    reader.read_into(name, view)
                else:
                    view.copy_(reader.read(name))
                arrays[name] = view
            self.steering_table = table
        for name in self.names:
            if name in arrays:
                continue
            info = infos[name]
            # negatives and tiers live in shared memory so that a reload reaches forked (and
            # persistent) workers by an in-place update
            shared = name in RELOADABLE and self.device.type == "cpu"
            # huge pages: batches gather random rows, and on 4 KiB pages each is a TLB miss
            out = shared_empty(info.shape, info.dtype) if shared else huge_empty(
                info.shape, info.dtype)
            arrays[name] = reader.read_into(name, out)
        return arrays

    def _place(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return arrays
        out: dict[str, torch.Tensor] = {}
        if self.steering_table is not None:
            table = self.steering_table.to(self.device)
            n_pairs = self.n_pairs
            for i, name in enumerate(STEERING):
                out[name] = table[1 + i * n_pairs : 1 + (i + 1) * n_pairs]
            self.steering_table = table
        # the CSR keyword arrays are never gathered per batch: they stay on the CPU
        keep_on_cpu = ("pair_keyword_offsets", "pair_keyword_ids")
        for name, t in arrays.items():
            if name not in out:
                out[name] = t if name in keep_on_cpu else t.to(self.device)
            arrays[name] = out[name]  # drop the CPU copy as soon as the device copy exists
        return out

    def steering_rows(self, pair_ids: torch.Tensor, variant: torch.Tensor) -> torch.Tensor | None:
        if self.derived is not None or self.steering_table is None:
            return None
        rows = torch.where(variant > 0, 1 + (variant - 1) * self.n_pairs + pair_ids,
                           torch.zeros_like(pair_ids))
        # int32 where the table's rows allow it (index_select takes either)
        return rows.to(torch.int32) if self.steering_table.shape[0] < 2**31 else rows

    def gather_steering(self, pair_ids: torch.Tensor, variant: torch.Tensor,
                        out: torch.Tensor | None = None, *,
                        rows: torch.Tensor | None = None,
                        questions: torch.Tensor | None = None,
                        sources: torch.Tensor | None = None,
                        clusters: torch.Tensor | None = None) -> torch.Tensor:
        if self.derived is not None:
            return self._derive(pair_ids, variant, out, questions, sources, clusters)
        assert self.steering_table is not None
        if rows is None:
            rows = self.steering_rows(pair_ids, variant)
            assert rows is not None
        return take(self.steering_table, rows, out)

    def replace(self, names: Sequence[str], *, validate: Callable[[Mapping[str, torch.Tensor]],
                object] | None = None, in_place_ok: bool = True) -> bool:
        new = self.read_fresh(names)
        if validate is not None:
            validate(new)
        old = self.arrays
        if in_place_ok and all(
                old[n].shape == new[n].shape and old[n].dtype == new[n].dtype for n in new):
            for n in new:
                old[n].copy_(new[n])
            return True
        if self.device.type == "cpu":
            new = {n: shared_empty(t.shape, t.dtype).copy_(t) for n, t in new.items()}
        else:
            new = {n: t.to(self.device) for n, t in new.items()}
        self.arrays.update(new)
        if PAIR_INDEX in new:
            self._columns()
        return False

    def _owned(self) -> list[torch.Tensor]:
        extra = [self.steering_table] if self.steering_table is not None else []
        return [*super()._owned(), *extra]

    def close(self) -> None:
        super().close()
        self.steering_table = None

    def __getstate__(self) -> dict[str, Any]:
        # the tensors travel (shared-memory handles under torch.multiprocessing's pickler)
        return self.__dict__.copy()


class MappedTables(TableSet):
    """Zero-copy read-only maps of the stored arrays."""

    mode = "mmap"
    in_memory = True
    resident = False
    maps = True

    def _load(self, reader: StoreReader) -> dict[str, torch.Tensor]:
        return {n: reader.map(n) for n in self.names}

    def _check(self, arrays: Mapping[str, torch.Tensor], reader: StoreReader) -> None:
        # The check reads every page of every array once, sequentially, through maps that
        # backends advise MADV_RANDOM (right for shuffled batches, but it turns a cold scan
        # into one synchronous 4 KiB fault at a time): read each array ahead explicitly.
        path = self.location.path
        for name, t in arrays.items():
            if name not in FINITE_ARRAYS:
                will_need(t)  # index arrays: scanned whole by the range checks below
        check_arrays(arrays, self.location.manifest, path=path,
                     skip_finite=frozenset(FINITE_ARRAYS))
        for name in FINITE_ARRAYS:
            if name not in self.virtual:
                check_finite_chunks(name, read_ahead_chunks(arrays[name]), path)

    def _columns(self) -> None:
        # copying the columns out of a map would read (and hold) the whole pair index
        self._q_col = self._s_col = None

    def memory_bytes(self) -> int:
        return 0  # maps are file pages the kernel may drop, not memory this set holds

    def pair_columns(self, pair_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.arrays[PAIR_INDEX].index_select(0, pair_ids)
        return pair[:, 0].contiguous(), pair[:, 1].contiguous()


class RowTables(TableSet):
    """Embedding-dimension arrays left in storage, read by rows per batch (``read_rows``)."""

    mode = "rows"
    in_memory = False
    resident = False

    def _load(self, reader: StoreReader) -> dict[str, torch.Tensor]:
        arrays: dict[str, torch.Tensor] = {}
        for name in self.names:
            info = self.infos[name]
            if name in LAZY_ARRAYS:
                arrays[name] = torch.empty(info.shape, dtype=info.dtype, device="meta")
            else:
                arrays[name] = reader.read(name)
        return arrays

    def _check(self, arrays: Mapping[str, torch.Tensor], reader: StoreReader) -> None:
        path = self.location.path
        check_arrays(arrays, self.location.manifest, path=path,
                     skip_finite=frozenset(LAZY_ARRAYS))
        # one streamed pass over the float arrays that stay in storage
        for name in LAZY_ARRAYS:
            if name not in self.virtual:
                check_finite_chunks(name, reader.iter_chunks(name), path)

    def gather(self, name: str, rows: torch.Tensor, out: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in LAZY_ARRAYS:
            return super().gather(name, rows, out, dtype)
        assert self._reader is not None
        got = self._reader.read_rows(name, rows.to(torch.int64))  # read_rows takes int64
        if out is not None:
            return out.copy_(got)
        return got if dtype is None or got.dtype == dtype else got.to(dtype)

    def gather_many(self, name: str, rows: Sequence[torch.Tensor],
                    out: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        if name not in LAZY_ARRAYS or len(rows) < 2:
            return super().gather_many(name, rows, out)
        # one read of the union: rows wanted by several sets (a target that is also another
        # pair's negative) and chunks holding rows of several sets are read once
        got = self.gather(name, torch.cat(list(rows)))
        parts, at = [], 0
        for r, o in zip(rows, out, strict=True):
            part = got[at : at + r.shape[0]]
            at += r.shape[0]
            parts.append(part if o is None else o.copy_(part))
        return parts

    def read_fresh(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        lazy = [n for n in names if n in LAZY_ARRAYS]
        got = super().read_fresh([n for n in names if n not in LAZY_ARRAYS])
        for n in lazy:  # stays in storage: the reopened reader serves its rows
            info = self._reader.info(n) if self._reader is not None else self.infos[n]
            got[n] = torch.empty(info.shape, dtype=info.dtype, device="meta")
        return got


#: The table set class of each mode.
TABLE_SETS: dict[str, type[TableSet]] = {
    cls.mode: cls for cls in (PreloadedTables, MappedTables, RowTables)
}


def open_tables(mode: str, location: StoreLocation, infos: Mapping[str, ArrayInfo],
                device: torch.device, *, reader: StoreReader | None = None,
                check: bool = True) -> TableSet:
    """The table set of ``mode`` over ``location``, attached (from ``reader`` when given: it
    must map for ``"mmap"``) and, with ``check``, validated."""
    tables = TABLE_SETS[mode](location, infos, device)
    tables.attach(reader, check=check)
    return tables


__all__ = [
    "TABLE_SETS",
    "MappedTables",
    "PreloadedTables",
    "RowTables",
    "StoreLocation",
    "TableSet",
    "open_tables",
    "shared_empty",
]
