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
    LIBRARY_ERRORS,
    ArrayInfo,
    ArraySource,
    BackendEntrypoint,
    Capabilities,
    StoreReader,
    default_rows_per_chunk,
)
from jasper.dtypes import STORAGE_NUMPY, dtype_name, storage_logical, to_storage, torch_dtype
from jasper.errors import FormatError, WriteOptionError
from jasper.files import ProcessLocal
from jasper.manifest import Manifest
from jasper.npy import NpyHeader, pread_into, read_header
from jasper.schema import ALL_ARRAYS

ARCHIVE = "dataset.npz"
COMPRESSION = {None: zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED}

# What the zip reader raises on damaged input (core's typed_errors adds zip's and zlib's own).
_BROKEN = (zipfile.BadZipFile, zlib.error, *LIBRARY_ERRORS)


class NpzReader(StoreReader):
    """Reads members of ``dataset.npz``. The archive is opened through core's pinned dataset
    directory (:mod:`jasper.files`: one dataset version, regular files only) and held per
    process (:class:`jasper.files.ProcessLocal`: a zip handle must not be shared across
    ``fork``); pickling keeps paths only. Core builds every other read on
    :meth:`read_slice_into` (a preload is one call with the whole destination)."""

    backend_name = "npz"

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        self.archive = self.path / ARCHIVE
        self._zip: ProcessLocal[zipfile.ZipFile] = ProcessLocal(self._open_archive,
                                                                _close_archive)

    def _open_archive(self) -> zipfile.ZipFile:
        fh = self.files.open_file(ARCHIVE)
        try:
            with self.typed_errors(self.archive, None, "not a readable zip archive", _BROKEN):
                return zipfile.ZipFile(fh)
        except BaseException:
            fh.close()
            raise

    @contextmanager
    def _member(self, name: str) -> Iterator[tuple[IO[bytes], NpyHeader]]:
        """The open member of ``name`` after its ``.npy`` header (checked by core)."""
        if name not in ALL_ARRAYS:
            raise self._missing(name)
        if f"{name}.npy" not in self._zip.get().NameToInfo:
            raise FormatError(self.archive, f"the archive has no member {name}.npy", array=name)
        with self.typed_errors(self.archive, name, f"member {name}.npy is damaged", _BROKEN), \
                self._zip.get().open(f"{name}.npy") as f:
            yield f, read_header(self.archive, name, fileobj=f)

    def array_names(self) -> list[str]:
        members = set(self._zip.get().namelist())
        return [n for n in ALL_ARRAYS if f"{n}.npy" in members]

    def info(self, name: str) -> ArrayInfo:
        with self._member(name) as (_f, header):
            try:
                return ArrayInfo(header.shape, torch_dtype(storage_logical(header.dtype)))
            except TypeError as exc:
                raise FormatError(self.archive, str(exc), array=name) from None

    def read_slice_into(self, name: str, start: int, stop: int, out: torch.Tensor
                        ) -> torch.Tensor:
        """Rows ``start:stop`` into ``out``: one ``preadv`` for a stored member, a forward
        read through the decompressor for a deflated one."""
        buf = memoryview(to_storage(out).reshape(-1).view(np.uint8))
        with self._member(name) as (f, header):
            first = header.offset + start * header.row_bytes
            zinfo = self._zip.get().getinfo(f"{name}.npy")
            if zinfo.compress_type == zipfile.ZIP_STORED:
                fd = self._zip.get().fp.fileno()  # type: ignore[union-attr]
                pread_into(self.archive, self._data_offset(zinfo) + first, buf, array=name,
                           fd=fd)
            else:
                f.seek(first)
                if f.readinto(buf) != len(buf):  # type: ignore[attr-defined]
                    raise FormatError(self.archive, f"{name}.npy is truncated at row {start}",
                                      array=name)
        return out

    def _data_offset(self, zinfo: zipfile.ZipInfo) -> int:
        """Where a member's bytes start in the archive (after its local file header)."""
        fh = self._zip.get().fp
        assert fh is not None
        head = os.pread(fh.fileno(), 30, zinfo.header_offset)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(self.archive, f"bad local header of member {zinfo.filename}")
        name_len = int.from_bytes(head[26:28], "little")
        extra_len = int.from_bytes(head[28:30], "little")
        return zinfo.header_offset + 30 + name_len + extra_len

    def close(self) -> None:
        self._zip.close()
        super().close()


def _close_archive(zf: zipfile.ZipFile) -> None:
    fh = zf.fp  # a ZipFile leaves a file object it was given open
    zf.close()
    if fh is not None:
        fh.close()


class NpzBackend(BackendEntrypoint):
    """One ``dataset.npz`` per dataset; ``compression="deflate"`` trades speed for size."""

    name: ClassVar[str] = "npz"
    description: ClassVar[str] = (
        "one uncompressed or deflated .npz archive per dataset (example plugin)"
    )
    capabilities: ClassVar[Capabilities] = Capabilities(
        write=True, mmap=False, compression=True, row_access=True, worker_safe=True)
    marker_files: ClassVar[tuple[str, ...]] = (ARCHIVE,)
    write_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {},
        "deflate": {"compression": "deflate", "compression_level": 1},
    }

    def open(self, path: Path, manifest: Manifest) -> NpzReader:
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
