"""The PT backend: one ``.pt`` file per array, the layout of the original system.

Reading goes through core's :func:`jasper.ptload.load_pt` (weights-only, typed errors, never an
unsafe retry) and core's pinned :class:`jasper.files.DatasetDir` (one dataset version, regular
files inside the directory only).

Files are opened with ``mmap=True``: :meth:`PTReader.map` hands out the mapped tensor itself
(zero-copy, pages fault in on use) and :meth:`PTReader.read` makes the single copy a preload
needs, from the page cache into the caller's tensor.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from jasper.backend import (
    ArrayInfo,
    ArraySource,
    BackendEntrypoint,
    Capabilities,
    StoreReader,
    default_rows_per_chunk,
)
from jasper.errors import DatasetNotFoundError, FormatError
from jasper.lazy import lazy_torch
from jasper.manifest import Manifest
from jasper.ptload import load_pt, load_pt_tensor, map_pt_numpy, pt_info
from jasper.schema import ALL_ARRAYS

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

SUFFIX = ".pt"
_CSR = ("pair_keyword_ids", "pair_keyword_offsets")
#: Arrays above this size are assembled in a file-backed scratch tensor while writing, so writing
#: a dataset larger than RAM needs only page cache, not anonymous memory.
SCRATCH_THRESHOLD = 256 << 20


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

    def __init__(self, path: Path, manifest: Manifest, *, follow_links: bool = False) -> None:
        super().__init__(path, manifest, follow_links=follow_links)
        self._cache: dict[str, torch.Tensor] = {}
        self._legacy_csr: bool | None = None

    # Mapped tensors must not travel to spawned workers (pickling would copy the data): ship
    # the path and reopen lazily there.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def array_names(self) -> list[str]:
        names = [n for n in ALL_ARRAYS if self.files.exists(f"{n}{SUFFIX}")]
        if "pair_keyword_ids" in names and "pair_keyword_offsets" not in names:
            names.append("pair_keyword_offsets")  # derived from the original's list of lists
        return [n for n in ALL_ARRAYS if n in names]

    def _member(self, name: str) -> str:
        if name not in ALL_ARRAYS:
            raise self._missing(name)
        stored = "pair_keyword_ids" if name == "pair_keyword_offsets" and self._is_legacy_csr() else name
        return f"{stored}{SUFFIX}"

    def _is_legacy_csr(self) -> bool:
        if self._legacy_csr is None:
            self._legacy_csr = not self.files.exists(f"pair_keyword_offsets{SUFFIX}")
        return self._legacy_csr

    def _mapped(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is not None:
            return t
        if name in _CSR and self._is_legacy_csr():
            member = self._member("pair_keyword_ids")
            raw = load_pt(self.files, member, array="pair_keyword_ids")
            offsets, values = _ragged_to_csr(raw, self.files.member(member))
            self._cache["pair_keyword_offsets"] = offsets
            self._cache["pair_keyword_ids"] = values
            return self._cache[name]
        obj = load_pt_tensor(self.files, self._member(name), mmap=True, array=name)
        self._cache[name] = obj
        return obj

    def info(self, name: str) -> ArrayInfo:
        # without torch loaded, describe from the file's pickle (jasper info stays torch-free);
        # with it, map the tensor once: the read that follows uses the cached map
        if ("torch" not in sys.modules and name not in self._cache
                and not (name in _CSR and self._is_legacy_csr())):
            meta = pt_info(self.files, self._member(name))
            if meta is not None:
                return ArrayInfo(*meta)
        t = self._mapped(name)
        return ArrayInfo(tuple(t.shape), t.dtype)

    def map(self, name: str) -> torch.Tensor:
        return self._mapped(name)

    def map_numpy(self, name: str) -> np.ndarray | None:
        # the file's bytes mapped as its pickle describes them (no torch); None leaves anything
        # but a plain contiguous tensor to torch's weights-only load and its checks
        if name in self._cache or (name in _CSR and self._is_legacy_csr()):
            return None
        return map_pt_numpy(self.files, self._member(name))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.check_out(name, out)
        return out.copy_(self._mapped(name))  # one copy, page cache -> out

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._mapped(name)[start:stop].clone()

    def read_sorted_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self._mapped(name).index_select(0, rows)

    def close(self) -> None:
        self._cache.clear()
        super().close()


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
    marker_files: ClassVar[tuple[str, ...]] = ("pair_index.pt", "sample_ids.pt")  # per kind

    def open(self, path: Path, manifest: Manifest) -> PTReader:
        if not Path(path).is_dir():
            raise DatasetNotFoundError(path)
        return PTReader(Path(path), manifest)

    def write_arrays(
        self,
        directory: Path,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
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
