"""The backend contract: what a storage backend implements.

A backend is a small :class:`BackendEntrypoint` subclass (in the spirit of xarray's) with
metadata attributes, capability flags, :meth:`~BackendEntrypoint.guess_can_open`,
:meth:`~BackendEntrypoint.open` returning a :class:`StoreReader`, and
:meth:`~BackendEntrypoint.write_arrays`.

A dataset is always a directory. jasper's core owns ``config.json`` (the manifest) and the atomic
commit: a backend's ``write_arrays`` fills a fresh temporary directory with its own files; core
then writes the manifest last and renames the directory into place (see :mod:`jasper.store`).

Tensors in, tensors out: readers return ``torch.Tensor`` on the CPU with the logical dtype that
the manifest records (bfloat16 included); writers receive :class:`ArraySource` objects that yield
row chunks, so a dataset larger than RAM can be written chunk by chunk.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from jasper.dtypes import to_storage
from jasper.errors import CapabilityError, FormatError, JasperError, ShapeError
from jasper.files import DatasetDir
from jasper.lazy import lazy_torch
from jasper.rows import (
    as_row_index,
    check_rows,
    merge_gap_rows,
    plan_spans,
    span_positions,
    unique_sorted,
)

if TYPE_CHECKING:
    import torch

    from jasper.location import Location, ObjectStore
    from jasper.manifest import Manifest
else:
    torch = lazy_torch(globals())


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. The conformance kit tests every flag that is ``True``.

    - ``write``: can write datasets (``write_arrays``).
    - ``mmap``: :meth:`StoreReader.map` returns zero-copy memory-mapped tensors.
    - ``compression``: accepts a ``compression`` write option.
    - ``row_access``: :meth:`StoreReader.read_rows` reads only the requested rows (no preload).
    - ``worker_safe``: a reader can be pickled to spawned DataLoader workers and reopens itself
      lazily after a fork.
    - ``locations``: the location schemes the backend reads and writes (``"file"``: local
      directories; ``"s3"``...: object stores, through :meth:`BackendEntrypoint.object_store`).
    - ``write_rows``: :meth:`StoreReader.write_rows` replaces rows of mutable arrays in place, as
      one atomic, crash-safe change (e.g. ``ClusterLabeledDataset.update_labels``).
    - ``pinned_reads``: a reader serves the version it opened while a writer commits a new one
      to the same location (every file opened through :attr:`StoreReader.files`, or a
      generation pointer). False for stores whose data lives outside the dataset directory,
      where nothing can pin it (a Chroma server's collections).
    """

    write: bool = True
    mmap: bool = False
    compression: bool = False
    row_access: bool = False
    worker_safe: bool = True
    locations: tuple[str, ...] = ("file",)
    write_rows: bool = False
    pinned_reads: bool = True


@dataclass(frozen=True, init=False)
class ArrayInfo:
    """Shape and logical dtype of a stored array, as the store itself reports them.

    ``ArrayInfo(shape, dtype)`` takes a torch dtype or a logical dtype name (``"float32"``):
    a backend that reads shapes from its own metadata passes the name, so describing a dataset
    (``jasper info``) needs no torch; :attr:`dtype` gives the torch dtype when tensors are made.
    """

    shape: tuple[int, ...]
    #: the logical dtype name, as the manifest records it
    dtype_name: str

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype | str) -> None:
        from jasper.dtypes import dtype_name

        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dtype_name", dtype_name(dtype))

    @property
    def dtype(self) -> torch.dtype:
        from jasper.dtypes import torch_dtype

        return torch_dtype(self.dtype_name)

    @property
    def itemsize(self) -> int:
        from jasper.dtypes import ITEMSIZE

        return ITEMSIZE[self.dtype_name]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.itemsize


class ArraySource(abc.ABC):
    """An array to be written, delivered as row chunks in order (first dimension).

    Writers call :meth:`iter_chunks` exactly once per array. Core wraps every source to compute
    the manifest checksum as the chunks pass, so a backend never hashes.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @abc.abstractmethod
    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        """Yield contiguous CPU tensors whose first dimensions add up to ``shape[0]``."""

    @property
    def nbytes(self) -> int:
        return ArrayInfo(self.shape, self.dtype).nbytes

    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape[1:]:
            n *= s
        return n

    def materialize(self) -> torch.Tensor:
        """The whole array as one tensor (for backends whose format needs it whole)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        row = 0
        for chunk in self.iter_chunks(default_rows_per_chunk(self)):
            out[row : row + chunk.shape[0]] = chunk
            row += chunk.shape[0]
        return out


class TensorSource(ArraySource):
    """An in-memory tensor as an :class:`ArraySource` (chunks are views, no copies)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach().cpu().contiguous()
        self.shape = tuple(self.tensor.shape)
        self.dtype = self.tensor.dtype

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        n = self.shape[0] if self.shape else 1
        if not self.shape:
            yield self.tensor
            return
        for start in range(0, n, max(1, rows_per_chunk)):
            yield self.tensor[start : start + rows_per_chunk]
        if n == 0:
            yield self.tensor

    def materialize(self) -> torch.Tensor:
        return self.tensor


#: Bytes per slice of the default :meth:`StoreReader.read_into`: fits the L2 cache of current
#: CPUs, so the slice is still cached when it is copied into the destination.
COPY_SLICE_BYTES = 1 << 20


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for CPU tensors, as one single-threaded ``memcpy`` when both are
    contiguous with the same dtype: torch parallelises copies of a few MiB over its thread pool,
    which on a loaded machine costs far more than the copy itself (measured: 64 copies of 1 MiB,
    2 threads on 2 busy cores, 4.4 s; one thread 0.05 s)."""
    if (dst.dtype == src.dtype and dst.device.type == "cpu" and src.device.type == "cpu"
            and dst.is_contiguous() and src.is_contiguous() and dst.numel() == src.numel()):
        np.copyto(to_storage(dst), to_storage(src).reshape(tuple(dst.shape)))
        return dst
    return dst.copy_(src)


def default_rows_per_chunk(source: ArraySource | ArrayInfo, target_bytes: int = 64 << 20) -> int:
    """Rows in a chunk of about ``target_bytes`` (64 MiB): big enough to stream at disk speed,
    small enough that writing a 100 GB array needs little RAM."""
    row = source.itemsize if isinstance(source, ArrayInfo) else source.dtype.itemsize
    for s in source.shape[1:]:
        row *= s
    return max(1, target_bytes // max(1, row))


def as_source(array: torch.Tensor | ArraySource) -> ArraySource:
    """Wrap a tensor (or pass through a source)."""
    if isinstance(array, ArraySource):
        return array
    if isinstance(array, torch.Tensor):
        return TensorSource(array)
    raise TypeError(f"expected a torch.Tensor or ArraySource, got {type(array).__name__}")


#: What storage libraries raise on damaged input (h5py, zipfile, numpy's header parser...):
#: :meth:`StoreReader.typed_errors` turns it into a ``FormatError``.
LIBRARY_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, KeyError, ValueError,
                                                   TypeError, EOFError)


def check_format_version(found: object, supported: int, file: Path, what: str,
                         package: str) -> int:
    """The layout version ``found`` in a backend's file, as an int; a
    :class:`~jasper.errors.FormatError` naming ``file`` when it is not a number or newer than
    ``supported`` (the ``package`` to upgrade is named)."""
    try:
        number = int(found)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise FormatError(file, f"{what} is {found!r}, not a layout version number (rule: "
                          "integer layout version)") from None
    if number > supported:
        from jasper.registry import install_hint

        raise FormatError(file, f"written with layout version {number}, newer than this "
                          f"{package} reads ({supported}); upgrade: "
                          + install_hint(package, upgrade=True))
    return number


class StoreReader(abc.ABC):
    """A read handle on one stored dataset. Get one with :func:`jasper.open_store`.

    **Required**: :meth:`array_names`, :meth:`info` and :meth:`read_slice_into` (or, for older
    backends, :meth:`read_slice`). Everything else has a default built on those that is already
    fast: :meth:`read_into` (and so :meth:`read`) reads straight into the caller's tensor,
    :meth:`iter_chunks` reads slices,
    :meth:`read_rows` checks, sorts, de-duplicates and coalesces the indices
    (:mod:`jasper.rows`) and asks :meth:`read_sorted_rows` for sorted unique rows. Override
    where the format does better (``read_into`` straight into ``out``, ``read_sorted_rows``
    from a map, :meth:`map` for zero-copy tensors).

    All methods return CPU tensors with the logical dtype. Open every file through
    :attr:`files` (the pinned dataset directory). Readers must be picklable when the backend
    claims ``worker_safe``: hold paths, not open handles, in the pickled state (library handles in
    a :class:`jasper.files.ProcessLocal`), and open lazily in the process that reads.
    """

    backend_name: ClassVar[str] = ""
    #: Whether a process forked after this reader (or its client library) was used can go on
    #: reading through it. False for clients on a Rust/tokio runtime (object-store clients),
    #: whose threads do not survive a fork: loaders start such workers with spawn instead.
    fork_safe: bool = True

    def __init__(self, path: Path, manifest: Manifest, *, follow_links: bool = False) -> None:
        self.path = Path(path)
        #: The pinned dataset directory: open every file through it (:mod:`jasper.files`), so a
        #: reader serves one version of the dataset even while a writer commits a new one, and
        #: reads only regular files inside the directory (``follow_links`` trusts symlinks).
        if (type(self).read_slice is StoreReader.read_slice
                and type(self).read_slice_into is StoreReader.read_slice_into):
            raise TypeError(f"{type(self).__name__} must implement read_slice_into (preferred) "
                            "or read_slice")
        self.files = DatasetDir(self.path, follow_links=follow_links)
        self.files.pin()
        self.manifest = self._pinned_manifest(manifest)

    def _pinned_manifest(self, manifest: Manifest) -> Manifest:
        """``manifest``, unless the directory was replaced between loading it and pinning the
        directory: then the manifest of the pinned version, so data and manifest agree."""
        import json

        from jasper.manifest import MANIFEST_NAME
        from jasper.manifest import Manifest as _Manifest

        try:
            # the bytes read when the directory was pinned: a commit may since have deleted the
            # pinned version's manifest by name, and core's copy may be of another version
            raw = self.files.manifest_at_pin
            if raw is None:
                return manifest  # no manifest when pinned: core's is all there is
            data = json.loads(raw)
            arrays = data.get("arrays") if isinstance(data, dict) else None
            if arrays == {n: r.to_dict() for n, r in manifest.arrays.items()}:
                return manifest  # the same version: no second schema check (~10 ms an open)
            pinned = _Manifest.from_dict(data, self.files.member(MANIFEST_NAME))
        except (JasperError, ValueError, RecursionError):
            return manifest  # core already parsed one; its errors are core's to report
        return manifest if pinned.arrays == manifest.arrays else pinned


    # --- what every backend implements -----------------------------------------------------
    @abc.abstractmethod
    def array_names(self) -> list[str]:
        """Names of the arrays present in the store (physical names, e.g. CSR parts)."""

    @abc.abstractmethod
    def info(self, name: str) -> ArrayInfo:
        """Shape and dtype of ``name`` as the store records them (without reading the data)."""

    def read_slice_into(self, name: str, start: int, stop: int, out: torch.Tensor
                        ) -> torch.Tensor:
        """Fill ``out`` with rows ``start:stop`` of ``name``; returns ``out``. Implement this
        (preferred: no default then copies twice) or :meth:`read_slice`.

        Core calls it with ``0 <= start <= stop <= rows`` and ``out`` a contiguous CPU tensor of
        shape ``(stop - start, *row_shape)`` and the array's dtype; for a 0-d array ``start,
        stop = 0, 1`` and ``out`` is 0-d."""
        return copy_rows(out, self.read_slice(name, start, stop))

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` as a new tensor (Python slice semantics: bounds are
        clipped, ``stop <= start`` gives zero rows; a 0-d array is returned whole)."""
        info = self.info(name)
        if not info.shape:
            return self.read_slice_into(name, 0, 1, torch.empty((), dtype=info.dtype))
        start, stop, _ = slice(start, stop).indices(info.shape[0])
        stop = max(start, stop)
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        return self.read_slice_into(name, start, stop, out) if stop > start else out

    def _reads_into(self) -> bool:
        """Whether the backend implements :meth:`read_slice_into` itself (no second copy)."""
        return type(self).read_slice_into is not StoreReader.read_slice_into

    # --- optional, with defaults built on the required ones ---------------------------------
    def read(self, name: str) -> torch.Tensor:
        """The whole array, in RAM, as a tensor this caller owns (one copy from storage)."""
        info = self.info(name)
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def map(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only, memory-mapped tensor (backends with ``mmap`` capability)."""
        raise CapabilityError(
            f"backend {self.backend_name!r} cannot memory-map arrays ({self.path}); "
            "open without mmap to preload, or convert to a backend that maps "
            "(e.g. `jasper convert SRC DST --to pt`)"
        )

    def map_numpy(self, name: str) -> np.ndarray | None:
        """A zero-copy, read-only numpy view of the whole array in its storage dtype (bfloat16
        as its ``uint16`` bit pattern, :mod:`jasper.dtypes`), made without torch, or ``None``
        where the backend has none (the default). Checks that make no tensors (``jasper
        validate``) use it before :meth:`map`, so they import no torch."""
        return None

    def read_numpy(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (default: all) of ``name`` as a numpy array in its storage dtype,
        for checks that make no tensors. The default goes through :meth:`read_slice` (and so
        imports torch); backends whose storage library reads into numpy override it."""
        info = self.info(name)
        stop = (info.shape[0] if info.shape else 1) if stop is None else stop
        return to_storage(self.read_slice(name, start, stop))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (a preallocated CPU tensor of the array's shape and dtype, possibly a
        view into a larger buffer) with the whole array; returns ``out``.

        This is how a preload avoids double copies. The default hands a contiguous ``out`` to
        :meth:`read_slice_into` whole (one copy, storage -> ``out``); otherwise it goes through
        slices of about :data:`COPY_SLICE_BYTES` (cache-sized, so the second copy is cheap); its
        extra memory is one slice, never a second whole array.
        """
        info = self.check_out(name, out)
        if not info.shape:
            return out.copy_(self.read_slice(name, 0, 1).reshape(()))
        n = info.shape[0]
        if n == 0:
            return out
        if self._reads_into() and out.is_contiguous() and out.device.type == "cpu":
            return self.read_slice_into(name, 0, n, out)
        step = default_rows_per_chunk(info, COPY_SLICE_BYTES)
        for start in range(0, n, step):
            stop = min(n, start + step)
            copy_rows(out[start:stop], self.read_slice(name, start, stop))
        return out

    def check_out(self, name: str, out: torch.Tensor) -> ArrayInfo:
        """Raise :class:`~jasper.errors.ShapeError` (a ``ValueError``) unless ``out`` has the
        shape and dtype of array ``name``; every :meth:`read_into` override starts with it."""
        info = self.info(name)
        if tuple(out.shape) != tuple(info.shape) or out.dtype != info.dtype:
            raise ShapeError(
                f"read_into({name!r}): the destination is {tuple(out.shape)} {out.dtype} but "
                f"the stored array is {info.shape} {info.dtype}: the manifest or the data model "
                "disagrees with the file (run `jasper validate` on the dataset)",
                array=name, rule="stored shape matches the expected shape", path=self.path)
        return info

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64, any order, repeats allowed) of ``name``, in that order.

        Indices are checked (:class:`~jasper.rows.RowIndexError` names the first bad one),
        sorted and de-duplicated once here; :meth:`read_sorted_rows` reads them; the result is
        un-permuted back to the caller's order.
        """
        info = self.info(name)
        idx = as_row_index(rows, f"read_rows({name!r})")
        if idx.dim() != 1:
            raise TypeError(f"read_rows({name!r}): rows must be 1-D, got shape "
                            f"{tuple(idx.shape)}")
        if not info.shape:
            raise TypeError(f"read_rows({name!r}): the array is a scalar, it has no rows")
        check_rows(idx, info.shape[0], name, self.path)
        if idx.numel() == 0:
            return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        uniq, inverse = unique_sorted(idx)
        data = self.read_sorted_rows(name, uniq)
        return data if inverse is None else data.index_select(0, inverse)

    def read_sorted_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """The hook behind :meth:`read_rows`: rows ``rows`` (int64, strictly increasing, in
        range, at least one) of ``name``. The default reads the coalesced spans of
        :func:`jasper.rows.plan_spans` with :meth:`read_slice`."""
        info = self.info(name)
        row_bytes = ArrayInfo(info.shape[1:], info.dtype).nbytes
        spans = plan_spans(rows, merge_gap_rows(row_bytes))
        if self._reads_into():
            data = torch.empty((sum(b - a for a, b in spans), *info.shape[1:]), dtype=info.dtype)
            at = 0
            for a, b in spans:
                self.read_slice_into(name, a, b, data[at : at + b - a])
                at += b - a
        else:
            parts = [self.read_slice(name, a, b) for a, b in spans]
            data = parts[0] if len(parts) == 1 else torch.cat(parts)
        pos = span_positions(spans, rows)
        return data if pos is None else data.index_select(0, pos)

    def iter_chunks(self, name: str, rows_per_chunk: int | None = None) -> Iterator[torch.Tensor]:
        """Stream ``name`` in row chunks (used by convert and deep validation)."""
        info = self.info(name)
        if not info.shape:
            yield self.read_slice(name, 0, 1)
            return
        n = info.shape[0]
        step = rows_per_chunk or default_rows_per_chunk(info)
        if n == 0:
            yield self.read_slice(name, 0, 0)
            return
        for start in range(0, n, step):
            yield self.read_slice(name, start, min(n, start + step))

    def write_rows(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                   note: Mapping[str, Any] | None = None) -> None:
        """Replace rows of mutable arrays in place: ``updates`` maps an array name to ``(rows
        int64 [k], values [k, ...])``. All of it is ONE change, atomic for readers in every
        process (see :meth:`reading_rows`) and across a crash (after a kill, the next open sees
        all of it or none of it); checksums are kept true. ``note`` is a JSON-able description a
        backend may keep as history. Backends with the ``write_rows`` capability override it."""
        from jasper.registry import get_backend, list_backends

        able = [n for n in list_backends() if _has_write_rows(get_backend, n)]
        raise CapabilityError(
            f"backend {self.backend_name!r} cannot change rows in place ({self.path}); "
            "backends that can: " + (", ".join(able) or "none installed") +
            " (convert with `jasper convert SRC DST --to NAME`)")

    @contextmanager
    def reading_rows(self) -> Iterator[None]:
        """Hold while reading rows that :meth:`write_rows` may change in another process: no
        reader sees half of a change. A no-op for stores that cannot change rows."""
        yield

    def close(self) -> None:
        """Release files and maps. Tensors already returned by :meth:`read` stay valid.
        Overrides call ``super().close()`` last."""
        self.files.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        return name in self.array_names()

    def source(self, name: str) -> ArraySource:
        """``name`` as an :class:`ArraySource`, streamed from this store (for convert)."""
        return _ReaderSource(self, name)

    def _missing(self, name: str) -> FormatError:
        return FormatError(self.path, f"array {name!r} is not in this store", array=name)

    def check_info(self, name: str, info: ArrayInfo, file: Path | None = None) -> ArrayInfo:
        """``info`` if it fits the data model (rank, allowed dtypes) and the manifest's record
        of ``name``, else a :class:`~jasper.errors.ShapeError` naming ``file`` (default: the
        dataset) and the array. Backends whose files carry their own shapes call it in
        :meth:`info`, so a file that disagrees fails before anything is read."""
        from jasper.schema import ALL_ARRAYS

        where = file or self.path
        spec = ALL_ARRAYS[name]
        logical = info.dtype_name
        if len(info.shape) != spec.rank:
            raise ShapeError(f"{where}: {name} has shape {info.shape}, expected rank "
                             f"{spec.rank}", array=name, rule="rank", path=where)
        if logical not in spec.dtypes:
            raise ShapeError(f"{where}: {name} has dtype {logical}; allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype",
                             path=where)
        rec = self.manifest.arrays.get(name)
        if rec is not None and (tuple(rec.shape) != info.shape or rec.dtype != logical):
            raise ShapeError(f"{where}: {name} is {info.shape} {logical} in the file but the "
                             f"manifest records {tuple(rec.shape)} {rec.dtype}", array=name,
                             rule="manifest shape", path=where)
        return info

    @contextmanager
    def typed_errors(self, file: Path, array: str | None = None,
                     what: str = "read failed (truncated or corrupt file?)",
                     errors: tuple[type[BaseException], ...] = LIBRARY_ERRORS) -> Iterator[None]:
        """Turn what a storage library raises on damaged input (``errors``) into a
        :class:`~jasper.errors.FormatError` naming ``file`` and ``array``; jasper's own errors
        pass through. Every backend wraps its library calls in it."""
        try:
            yield
        except JasperError:
            raise
        except errors as exc:
            raise FormatError(file, f"{what}: {type(exc).__name__}: {exc}", array=array) \
                from None


def _has_write_rows(get_backend: Any, name: str) -> bool:
    try:
        return bool(get_backend(name).capabilities.write_rows)
    except Exception:  # a backend that fails to load cannot write rows either
        return False


class _ReaderSource(ArraySource):
    def __init__(self, reader: StoreReader, name: str) -> None:
        self.reader = reader
        self.name = name
        info = reader.info(name)
        self.shape = info.shape
        self.dtype = info.dtype

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        return self.reader.iter_chunks(self.name, rows_per_chunk)


class BackendEntrypoint(abc.ABC):
    """Base class of a storage backend. Subclass it, set the metadata, and register the class
    (lazily, by import path) from a plugin module; see :mod:`jasper.hookspecs`.

    Keep the module that defines the subclass free of heavy imports at module level: import
    h5py/zarr/... inside :meth:`open` and :meth:`write_arrays`, so that listing and guessing
    backends stays fast.
    """

    #: The engine string users pass as ``backend=`` / ``storage_format=``.
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    url: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Names of files whose presence in a directory marks this backend's datasets.
    marker_files: ClassVar[tuple[str, ...]] = ()
    #: When several backends recognise a directory, the highest priority opens it.
    open_priority: ClassVar[int] = 0
    #: Named sets of write options worth comparing (e.g. ``{"lzf": {"compression": "lzf"}}``).
    #: The benchmark suite measures each; the conformance kit round-trips each.
    write_presets: ClassVar[dict[str, dict[str, Any]]] = {"default": {}}
    #: Files marking a layout without ``config.json`` that :meth:`open_foreign` reads (e.g. the
    #: original system's cluster-labeled ``dataset.db``).
    foreign_markers: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # core owns array-name validation for every backend, also for direct write_arrays calls
        from jasper.validation import guard_write_arrays

        guard_write_arrays(cls)

    def guess_can_open(self, path: str | Path) -> bool:
        """Whether ``path`` (a dataset directory) looks like this backend's. Cheap: no parsing."""
        p = Path(path)
        return p.is_dir() and any((p / m).exists() for m in self.marker_files)

    @abc.abstractmethod
    def open(self, path: Path, manifest: Manifest) -> StoreReader:
        """Open the dataset directory ``path`` for reading.

        ``manifest`` is the parsed ``config.json``. How the reader is used is the caller's
        choice per call (:meth:`StoreReader.map`, ``read_into``, ``read_rows``): core checks the
        ``mmap`` capability before it maps, and a reader of a backend that cannot map raises
        ``CapabilityError`` from ``map``. (Until contract v2 ``open`` took an ``mmap`` flag that
        no backend acted on; core no longer passes it, so an override that still accepts it
        keeps working.)
        """

    def write_arrays(
        self,
        directory: Path,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
    ) -> None:
        """Write every array into the (new, empty) ``directory``.

        Backend-specific options (compression, chunking...) are explicit keyword-only
        parameters of the subclass's override; :func:`jasper.convert` checks option names
        against the signature. Progress is core's: it shows a bytes bar as the chunks of
        ``arrays`` pass (and hashes them), so a backend reports nothing. Core writes
        ``config.json`` afterwards and commits atomically.
        """
        raise CapabilityError(f"backend {self.name!r} cannot write datasets")

    def object_store(self, location: Location) -> ObjectStore:
        """The byte operations core's generation commit needs at an object-store ``location``
        (backends whose ``capabilities.locations`` name a URL scheme); see
        :mod:`jasper.location`. ``open`` and ``write_arrays`` then receive the
        :class:`~jasper.location.Location` of one generation instead of a directory."""
        raise CapabilityError(f"backend {self.name!r} reads and writes local directories only, "
                              f"not {location}")

    def open_foreign(self, path: Path) -> StoreReader | None:
        """A reader for ``path``, a directory without ``config.json`` in a layout this backend
        knows (its reader carries a manifest built from that layout), or ``None``."""
        return None

    def deep_check(self, path: Path) -> list[str]:
        """Backend-specific integrity checks for ``validate --deep`` (e.g. SQLite's
        ``integrity_check``). Returns a list of problems, empty when sound."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.description}>"
