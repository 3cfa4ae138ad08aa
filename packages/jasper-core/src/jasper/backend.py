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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from jasper.errors import CapabilityError, FormatError

if TYPE_CHECKING:
    from jasper.location import Location, ObjectStore
    from jasper.manifest import Manifest


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
    """

    write: bool = True
    mmap: bool = False
    compression: bool = False
    row_access: bool = False
    worker_safe: bool = True
    locations: tuple[str, ...] = ("file",)


@dataclass(frozen=True)
class ArrayInfo:
    """Shape and logical dtype of a stored array, as the store itself reports them."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


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


def default_rows_per_chunk(source: ArraySource | ArrayInfo, target_bytes: int = 64 << 20) -> int:
    """Rows in a chunk of about ``target_bytes`` (64 MiB): big enough to stream at disk speed,
    small enough that writing a 100 GB array needs little RAM."""
    row = source.dtype.itemsize
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


class StoreReader(abc.ABC):
    """A read handle on one stored dataset. Get one with :func:`jasper.open_store`.

    Subclasses implement :meth:`array_names`, :meth:`info` and :meth:`read`, and override
    :meth:`map`, :meth:`read_rows` and :meth:`read_slice` where the format does better than the
    defaults. All methods return CPU tensors with the logical dtype. Readers must be picklable
    when the backend claims ``worker_safe``: hold paths, not open handles, in the pickled state,
    and open lazily in the process that reads.
    """

    backend_name: ClassVar[str] = ""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    # --- what every backend implements -----------------------------------------------------
    @abc.abstractmethod
    def array_names(self) -> list[str]:
        """Names of the arrays present in the store (physical names, e.g. CSR parts)."""

    @abc.abstractmethod
    def info(self, name: str) -> ArrayInfo:
        """Shape and dtype of ``name`` as the store records them (without reading the data)."""

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """The whole array, in RAM, as a tensor this caller owns (one copy from storage)."""

    # --- optional, with defaults -----------------------------------------------------------
    def map(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only, memory-mapped tensor (backends with ``mmap`` capability)."""
        raise CapabilityError(
            f"backend {self.backend_name!r} cannot memory-map arrays ({self.path}); "
            "open without mmap to preload, or convert to a backend that maps "
            "(e.g. `jasper convert SRC DST --to pt`)"
        )

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (a preallocated CPU tensor of the array's shape and dtype, possibly a
        view into a larger buffer) with the whole array; returns ``out``.

        This is how a preload avoids double copies: backends override it to read straight into
        ``out`` (h5py ``read_direct``, a copy from a mapped file). The default streams chunks, so
        its extra memory is one chunk, never a second whole array.
        """
        self.check_out(name, out)
        row = 0
        for chunk in self.iter_chunks(name):
            n = chunk.shape[0] if chunk.dim() else 1
            out[row : row + n].copy_(chunk)
            row += n
        return out

    def check_out(self, name: str, out: torch.Tensor) -> ArrayInfo:
        """Raise ``ValueError`` unless ``out`` has the shape and dtype of array ``name``; every
        :meth:`read_into` override starts with it."""
        info = self.info(name)
        if tuple(out.shape) != tuple(info.shape) or out.dtype != info.dtype:
            raise ValueError(f"read_into({name!r}): out is {tuple(out.shape)} {out.dtype}, "
                             f"the array is {info.shape} {info.dtype}")
        return info

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` (default: slice a whole read)."""
        return self.read(name)[start:stop].clone()

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64, any order, repeats allowed) of ``name``, in that order.

        The default reads everything; backends with ``row_access`` read only what is asked,
        sorting and de-duplicating the indices first and un-permuting after.
        """
        return self.read(name).index_select(0, rows)

    def iter_chunks(self, name: str, rows_per_chunk: int | None = None) -> Iterator[torch.Tensor]:
        """Stream ``name`` in row chunks (used by convert and deep validation)."""
        info = self.info(name)
        n = info.shape[0] if info.shape else 0
        step = rows_per_chunk or default_rows_per_chunk(info)
        if n == 0:
            yield self.read_slice(name, 0, 0)
            return
        for start in range(0, n, step):
            yield self.read_slice(name, start, min(n, start + step))

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for stateless readers
        """Release files and maps. Tensors already returned by :meth:`read` stay valid."""

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

    def guess_can_open(self, path: str | Path) -> bool:
        """Whether ``path`` (a dataset directory) looks like this backend's. Cheap: no parsing."""
        p = Path(path)
        return p.is_dir() and any((p / m).exists() for m in self.marker_files)

    @abc.abstractmethod
    def open(self, path: Path, manifest: Manifest, *, mmap: bool = False) -> StoreReader:
        """Open the dataset directory ``path`` for reading.

        ``manifest`` is the parsed ``config.json``. With ``mmap=True`` the reader must be able to
        :meth:`StoreReader.map`; a backend without the capability raises ``CapabilityError``.
        """

    def write_arrays(
        self,
        directory: Path,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
        *,
        progress: Any = None,
    ) -> None:
        """Write every array into the (new, empty) ``directory``.

        Backend-specific options (compression, chunking...) are explicit keyword-only
        parameters of the subclass's override; :func:`jasper.convert` checks option names
        against the signature. ``progress`` is a callable ``progress(nbytes)`` to report bytes
        written (may be ``None``). Core writes ``config.json`` afterwards and commits atomically.
        """
        raise CapabilityError(f"backend {self.name!r} cannot write datasets")

    def object_store(self, location: Location) -> ObjectStore:
        """The byte operations core's generation commit needs at an object-store ``location``
        (backends whose ``capabilities.locations`` name a URL scheme); see
        :mod:`jasper.location`. ``open`` and ``write_arrays`` then receive the
        :class:`~jasper.location.Location` of one generation instead of a directory."""
        raise CapabilityError(f"backend {self.name!r} reads and writes local directories only, "
                              f"not {location}")

    def deep_check(self, path: Path) -> list[str]:
        """Backend-specific integrity checks for ``validate --deep`` (e.g. SQLite's
        ``integrity_check``). Returns a list of problems, empty when sound."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.description}>"
