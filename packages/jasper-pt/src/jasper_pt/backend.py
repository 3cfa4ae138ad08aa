"""The PT backend: one ``.pt`` file per array, the layout of the original system.

Reading is always ``torch.load(weights_only=True)``; a file that needs full unpickling (it could
run code) is refused with :class:`~jasper.errors.UnsafeFileError`, never retried unsafely
(CVE-2025-32434 showed how thin that line is; jasper requires torch >= 2.10).

Files are opened with ``mmap=True``: :meth:`PTReader.map` hands out the mapped tensor itself
(zero-copy, pages fault in on use) and :meth:`PTReader.read` makes the single copy a preload
needs, from the page cache into the caller's tensor.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

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
from jasper.errors import DatasetNotFoundError, FormatError, UnsafeFileError
from jasper.manifest import Manifest
from jasper.schema import ARRAYS
from jasper.validation import check_tensor_layout

SUFFIX = ".pt"
#: Arrays above this size are assembled in a file-backed scratch tensor while writing, so writing
#: a dataset larger than RAM needs only page cache, not anonymous memory.
SCRATCH_THRESHOLD = 256 << 20


def _load_safe(path: Path, *, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; typed errors for unsafe or broken files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            path,
            "refused: loading it needs unrestricted unpickling, which can run arbitrary code. "
            f"jasper only loads tensors and plain containers ({str(exc).splitlines()[0][:200]})",
        ) from None
    except Exception as exc:
        # The weights-only unpickler runs no code, so whatever it raises on malformed bytes
        # (IndexError, KeyError, struct.error... as well as RuntimeError/EOFError) is a broken
        # file, never a reason to retry unsafely.
        if mmap and isinstance(exc, RuntimeError) and "mmap" in str(exc).lower():
            raise
        raise FormatError(
            path, f"not a readable .pt file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from None


def _ragged_to_csr(lists: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The original system's keyword ids (a list of lists of ints) as CSR tensors."""
    if not isinstance(lists, (list, tuple)):
        raise FormatError(path, f"expected a list of lists of keyword ids, got {type(lists).__name__}",
                          array="pair_keyword_ids")
    try:
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        values = np.fromiter(
            (int(v) for v in itertools.chain.from_iterable(lists)), dtype=np.int64,
            count=int(lengths.sum()),
        )
    except (TypeError, ValueError) as exc:
        raise FormatError(path, f"keyword ids must be lists of ints: {exc}",
                          array="pair_keyword_ids") from None
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return torch.from_numpy(offsets), torch.from_numpy(values)


class PTReader(StoreReader):
    """Reads one ``.pt`` per array; tensors are memory-mapped and cached per process."""

    backend_name = "pt"

    def __init__(self, path: Path, manifest: Manifest, *, mmap: bool = False) -> None:
        super().__init__(path, manifest)
        self.mmap = mmap
        self._cache: dict[str, torch.Tensor] = {}
        self._legacy_csr: bool | None = None

    # Mapped tensors must not travel to spawned workers (pickling would copy the data): ship
    # the path and reopen lazily there.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def array_names(self) -> list[str]:
        names = [n for n in ARRAYS if (self.path / f"{n}{SUFFIX}").is_file()]
        if "pair_keyword_ids" in names and "pair_keyword_offsets" not in names:
            names.append("pair_keyword_offsets")  # derived from the original's list of lists
        return [n for n in ARRAYS if n in names]

    def _file(self, name: str) -> Path:
        if name not in ARRAYS:
            raise self._missing(name)
        stored = "pair_keyword_ids" if name == "pair_keyword_offsets" and self._is_legacy_csr() else name
        f = self.path / f"{stored}{SUFFIX}"
        if not f.is_file():
            raise FormatError(f, "file is missing from the dataset directory", array=name)
        return f

    def _is_legacy_csr(self) -> bool:
        if self._legacy_csr is None:
            self._legacy_csr = not (self.path / f"pair_keyword_offsets{SUFFIX}").exists()
        return self._legacy_csr

    def _mapped(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is not None:
            return t
        if name in ("pair_keyword_ids", "pair_keyword_offsets") and self._is_legacy_csr():
            raw = _load_safe(self._file("pair_keyword_ids"), mmap=False)
            offsets, values = _ragged_to_csr(raw, self._file("pair_keyword_ids"))
            self._cache["pair_keyword_offsets"] = offsets
            self._cache["pair_keyword_ids"] = values
            return self._cache[name]
        f = self._file(name)
        try:
            obj = _load_safe(f, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped; load it whole
            obj = _load_safe(f, mmap=False)
        if not isinstance(obj, torch.Tensor):
            raise FormatError(f, f"expected a tensor, found {type(obj).__name__}", array=name)
        self._check_storage(f, name, obj)
        check_tensor_layout(name, obj, f)  # a stride-0 view would serve one row as many
        self._cache[name] = obj
        return obj

    @staticmethod
    def _check_storage(f: Path, name: str, t: torch.Tensor) -> None:
        # a mapped file shorter than its header says would SIGBUS on first touch of the tail
        need = (t.storage_offset() + t.numel()) * t.element_size()
        if t.numel() and t.untyped_storage().nbytes() < need:
            raise FormatError(f, f"storage holds {t.untyped_storage().nbytes()} bytes, shape "
                              f"{tuple(t.shape)} needs {need}", array=name)

    def info(self, name: str) -> ArrayInfo:
        t = self._mapped(name)
        return ArrayInfo(tuple(t.shape), t.dtype)

    def read(self, name: str) -> torch.Tensor:
        t = self._mapped(name)
        return t.clone(memory_format=torch.contiguous_format)

    def map(self, name: str) -> torch.Tensor:
        return self._mapped(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.check_out(name, out)
        return out.copy_(self._mapped(name))  # one copy, page cache -> out

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._mapped(name)[start:stop].clone()

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self._mapped(name).index_select(0, rows)

    def close(self) -> None:
        self._cache.clear()


class PTBackend(BackendEntrypoint):
    """One ``.pt`` file per array (``<name>.pt``, splits as ``<split>_idx.pt``)."""

    name: ClassVar[str] = "pt"
    description: ClassVar[str] = (
        "one .pt file per array, memory-mapped; reads the original system's datasets"
    )
    url: ClassVar[str] = "https://pypi.org/project/jasper-pt/"
    capabilities: ClassVar[Capabilities] = Capabilities(
        write=True, mmap=True, compression=False, row_access=True, worker_safe=True
    )
    marker_files: ClassVar[tuple[str, ...]] = ("pair_index.pt",)

    def open(self, path: Path, manifest: Manifest, *, mmap: bool = False) -> PTReader:
        if not Path(path).is_dir():
            raise DatasetNotFoundError(path)
        return PTReader(Path(path), manifest, mmap=mmap)

    def write_arrays(
        self,
        directory: Path,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
        *,
        progress: Any = None,
    ) -> None:
        for name, source in arrays.items():
            out = directory / f"{name}{SUFFIX}"
            if source.nbytes > SCRATCH_THRESHOLD:
                self._write_large(out, source)
            else:
                torch.save(source.materialize().contiguous().clone(), out)

    @staticmethod
    def _write_large(out: Path, source: ArraySource) -> None:
        scratch = out.with_suffix(".scratch")
        numel = 1
        for s in source.shape:
            numel *= s
        try:
            buf = torch.from_file(str(scratch), shared=True, size=numel, dtype=source.dtype)
            buf = buf.view(source.shape)
            row = 0
            for chunk in source.iter_chunks(default_rows_per_chunk(source)):
                buf[row : row + chunk.shape[0]] = chunk
                row += chunk.shape[0]
            torch.save(buf, out)
            del buf
        finally:
            scratch.unlink(missing_ok=True)
