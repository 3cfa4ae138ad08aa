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
from jasper.files import ProcessLocal
from jasper.manifest import Manifest
from jasper.schema import ALL_ARRAYS

ARCHIVE = "dataset.npz"
COMPRESSION = {None: zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED}

# What the zip and .npy readers raise on damaged input; all of it becomes FormatError.
_BROKEN = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def _logical(storage: np.dtype) -> str:
    return "bfloat16" if storage == np.dtype(np.uint16) else storage.name


class NpzReader(StoreReader):
    """Reads members of ``dataset.npz``. The archive is opened through core's pinned dataset
    directory (:mod:`jasper.files`: one dataset version, regular files only) and held per
    process (:class:`jasper.files.ProcessLocal`: a zip handle must not be shared across
    ``fork``); pickling keeps paths only."""

    backend_name = "npz"

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        self.archive = self.path / ARCHIVE
        self._zip: ProcessLocal[zipfile.ZipFile] = ProcessLocal(self._open_archive,
                                                                _close_archive)

    def _open_archive(self) -> zipfile.ZipFile:
        try:
            fh = self.files.open_file(ARCHIVE)
        except DatasetNotFoundError:
            raise DatasetNotFoundError(self.archive, "npz archive",
                                       "The dataset is incomplete; write it again") from None
        try:
            return zipfile.ZipFile(fh)
        except _BROKEN as exc:
            fh.close()
            raise FormatError(self.archive, f"not a readable zip archive (truncated?): {exc}") \
                from None

    def _zipfile(self) -> zipfile.ZipFile:
        return self._zip.get()

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

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop``: one ``pread`` for a stored member, a forward read through the
        decompressor for a deflated one."""
        with self._member(name) as (f, shape, dtype):
            if not shape:
                return from_storage(self._read_exact(f, name, np.empty((), dtype), 0), _logical(dtype))
            start, stop, _ = slice(start, stop).indices(shape[0])
            stop = max(start, stop)
            buf = np.empty((stop - start, *shape[1:]), dtype)
            row_bytes = buf.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            zinfo = self._zipfile().getinfo(f"{name}.npy")
            if buf.size and zinfo.compress_type == zipfile.ZIP_STORED:
                offset = self._data_offset(zinfo) + f.tell() + start * row_bytes
                view = memoryview(buf.reshape(-1).view(np.uint8))
                fd = self._zipfile().fp.fileno()  # type: ignore[union-attr]
                got = os.preadv(fd, [view], offset)
                if got != buf.nbytes:
                    raise FormatError(self.archive, f"{name}.npy is truncated at row {start}",
                                      array=name)
            elif buf.size:
                f.seek(f.tell() + start * row_bytes)
                self._read_exact(f, name, buf, start)
            return from_storage(buf, _logical(dtype))

    def _data_offset(self, zinfo: zipfile.ZipInfo) -> int:
        """Where a member's bytes start in the archive (after its local file header)."""
        fh = self._zipfile().fp
        assert fh is not None
        head = os.pread(fh.fileno(), 30, zinfo.header_offset)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(self.archive, f"bad local header of member {zinfo.filename}")
        name_len = int.from_bytes(head[26:28], "little")
        extra_len = int.from_bytes(head[28:30], "little")
        return zinfo.header_offset + 30 + name_len + extra_len

    def _read_exact(self, f: IO[bytes], name: str, buf: np.ndarray, row: int) -> np.ndarray:
        try:
            got = f.readinto(memoryview(buf.reshape(-1).view(np.uint8)))  # type: ignore[attr-defined]
        except _BROKEN as exc:
            raise FormatError(self.archive, f"{name}.npy is damaged: {exc}", array=name) from None
        if got != buf.nbytes:
            raise FormatError(self.archive, f"{name}.npy is truncated at row {row}", array=name)
        return buf

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """One forward pass through the member, slice by slice into ``out``."""
        info = self.check_out(name, out)
        with self._member(name) as (f, shape, dtype):
            n = shape[0] if shape else 1
            step = default_rows_per_chunk(info, 8 << 20)
            for start in range(0, n, step):
                rows = min(step, n - start)
                buf = np.empty((rows, *shape[1:]) if shape else (), dtype)
                self._read_exact(f, name, buf, start)
                t = from_storage(buf, _logical(dtype))
                if shape:
                    out[start : start + rows].copy_(t)
                else:
                    out.copy_(t)
        return out

    def close(self) -> None:
        self._zip.close()
        super().close()


def _close_archive(zf: zipfile.ZipFile) -> None:
    fh = zf.fp  # a ZipFile leaves a file object it was given open
    zf.close()
    if fh is not None:
        fh.close()


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
    # pinned_reads=False: the archive is opened again by path in each process, so a reader
    # open while a writer commits may not find it (a known gap of the example)
    capabilities: ClassVar[Capabilities] = Capabilities(
        write=True, mmap=False, compression=True, row_access=True, worker_safe=True,
        pinned_reads=False,
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
