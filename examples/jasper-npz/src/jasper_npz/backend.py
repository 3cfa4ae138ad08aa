"""The npz backend: a whole dataset in one ``dataset.npz``, one ``<array>.npy`` member per array.

An ``.npz`` is a zip archive of ``.npy`` files, so ``numpy.load`` opens it too. This backend
reads and writes the members itself, row chunk by row chunk, so neither direction holds a whole
array in memory that it does not need:

- writing streams each :class:`~jasper.backend.ArraySource` into its zip member after a ``.npy``
  header (the shape is known up front);
- reading parses the member's ``.npy`` header for shape and dtype (``info`` reads no data) and
  streams rows from there; a preload (``read``) fills one tensor.

bfloat16 has no numpy dtype: it travels as its 16-bit pattern (``uint16``), and since no array of
the data model may be ``uint16``, a ``uint16`` member always means bfloat16.

Zip members cannot be memory-mapped (they may be compressed), so this backend does not claim
``mmap``; jasper raises ``CapabilityError`` when a user asks for a map.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import torch

from jasper.backend import (
    ArrayInfo,
    ArraySource,
    BackendEntrypoint,
    Capabilities,
    StoreReader,
    default_rows_per_chunk,
)
from jasper.dtypes import STORAGE_NUMPY, dtype_name, from_storage, to_storage, torch_dtype
from jasper.errors import DatasetNotFoundError, FormatError, WriteOptionError
from jasper.manifest import Manifest
from jasper.schema import ALL_ARRAYS

ARCHIVE = "dataset.npz"
COMPRESSION = {None: zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED}

# What the zip and .npy readers raise on damaged input; all of it becomes FormatError.
_BROKEN = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def _logical(storage: np.dtype) -> str:
    return "bfloat16" if storage == np.dtype(np.uint16) else storage.name


class NpzReader(StoreReader):
    """Reads members of ``dataset.npz``. Holds only paths when pickled; each process opens the
    archive for itself on first use (a zip handle must not be shared across ``fork``)."""

    backend_name = "npz"

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        self.archive = self.path / ARCHIVE
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"] = None
        return state

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            if not self.archive.is_file():
                raise DatasetNotFoundError(self.archive, "npz archive",
                                           "The dataset is incomplete; write it again")
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except _BROKEN as exc:
                raise FormatError(self.archive, f"not a readable zip archive (truncated?): {exc}") \
                    from None
            self._pid = os.getpid()
        return self._zip

    @contextmanager
    def _member(self, name: str) -> Iterator[tuple[IO[bytes], tuple[int, ...], np.dtype]]:
        """The open member of ``name``, positioned after its ``.npy`` header."""
        if name not in ALL_ARRAYS:
            raise self._missing(name)
        zf = self._zipfile()
        try:
            f = zf.open(f"{name}.npy")
        except KeyError:
            raise FormatError(self.archive, f"the archive has no member {name}.npy",
                              array=name) from None
        except _BROKEN as exc:
            raise FormatError(self.archive, f"cannot open member {name}.npy: {exc}",
                              array=name) from None
        with f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
            except _BROKEN as exc:
                raise FormatError(self.archive, f"bad .npy header in {name}.npy: {exc}",
                                  array=name) from None
            if fortran or dtype.hasobject:
                raise FormatError(self.archive, f"{name}.npy must be a C-ordered plain array",
                                  array=name)
            yield f, tuple(shape), dtype

    def array_names(self) -> list[str]:
        members = set(self._zipfile().namelist())
        return [n for n in ALL_ARRAYS if f"{n}.npy" in members]

    def info(self, name: str) -> ArrayInfo:
        with self._member(name) as (_f, shape, dtype):
            return ArrayInfo(shape, _torch_dtype(dtype))

    def iter_chunks(self, name: str, rows_per_chunk: int | None = None) -> Iterator[torch.Tensor]:
        with self._member(name) as (f, shape, dtype):
            n = shape[0] if shape else 1
            row_shape = shape[1:]
            step = rows_per_chunk or default_rows_per_chunk(
                ArrayInfo(shape, _torch_dtype(dtype)))
            if n == 0:
                yield from_storage(np.empty(shape, dtype), _logical(dtype))
                return
            for start in range(0, n, step):
                rows = min(step, n - start)
                buf = np.empty((rows, *row_shape), dtype)
                want = buf.nbytes
                try:
                    got = f.readinto(memoryview(buf.reshape(-1).view(np.uint8)))
                except _BROKEN as exc:
                    raise FormatError(self.archive, f"{name}.npy is damaged: {exc}",
                                      array=name) from None
                if got != want:
                    raise FormatError(self.archive, f"{name}.npy is truncated at row {start}",
                                      array=name)
                yield from_storage(buf, _logical(dtype))

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def close(self) -> None:
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
        self._zip = None


def _torch_dtype(storage: np.dtype) -> torch.dtype:
    try:
        return torch_dtype(_logical(storage))
    except TypeError:
        raise FormatError(ARCHIVE, f"unsupported dtype {storage}") from None


class NpzBackend(BackendEntrypoint):
    """One ``dataset.npz`` per dataset; ``compression="deflate"`` trades speed for size."""

    name: ClassVar[str] = "npz"
    description: ClassVar[str] = (
        "one uncompressed or deflated .npz archive per dataset (example plugin)"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        write=True, mmap=False, compression=True, row_access=False, worker_safe=True
    )
    marker_files: ClassVar[tuple[str, ...]] = (ARCHIVE,)
    write_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {},
        "deflate": {"compression": "deflate", "compression_level": 1},
    }

    def open(self, path: Path, manifest: Manifest, *, mmap: bool = False) -> NpzReader:
        if not Path(path).is_dir():
            raise DatasetNotFoundError(path)
        return NpzReader(Path(path), manifest)

    def write_arrays(
        self,
        directory: Path,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
        *,
        compression: str | None = None,
        compression_level: int | None = None,
        progress: Any = None,
    ) -> None:
        """Write every array as a member of ``directory/dataset.npz``.

        ``compression``: ``None`` (stored) or ``"deflate"``; ``compression_level``: 1 (fast) to 9.
        Core reports progress and computes checksums as the chunks pass.
        """
        if compression not in COMPRESSION:
            raise WriteOptionError(f"npz: compression must be one of {list(COMPRESSION)}, "
                                   f"got {compression!r}")
        if compression_level is not None and not 0 <= compression_level <= 9:
            raise WriteOptionError(
                f"npz: compression_level must be 0..9, got {compression_level!r}")
        with zipfile.ZipFile(directory / ARCHIVE, "w", compression=COMPRESSION[compression],
                             compresslevel=compression_level, allowZip64=True) as zf:
            for name, source in arrays.items():
                storage = STORAGE_NUMPY[dtype_name(source.dtype)]
                header = {"descr": np.lib.format.dtype_to_descr(storage), "fortran_order": False,
                          "shape": tuple(source.shape)}
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, header)
                    for chunk in source.iter_chunks(default_rows_per_chunk(source)):
                        f.write(to_storage(chunk).reshape(-1).view(np.uint8).data)

    def deep_check(self, path: Path) -> list[str]:
        """``validate --deep``: the CRC of every zip member."""
        try:
            with zipfile.ZipFile(Path(path) / ARCHIVE) as zf:
                bad = zf.testzip()
        except _BROKEN as exc:
            return [f"{ARCHIVE}: {exc}"]
        return [f"{ARCHIVE}: member {bad} fails its CRC check"] if bad else []
