"""Reading a Chroma-backed dataset: tables by id-paged bulk reads, other arrays from .npy."""

from __future__ import annotations

import os
import tokenize
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from jasper.backend import ArrayInfo, StoreReader
from jasper.dtypes import from_storage, torch_dtype
from jasper.errors import FormatError, JasperError
from jasper.progress import count_bar
from jasper_chroma.client import ChromaStoreError, check_not_forked, get_client, get_collection
from jasper_chroma.layout import ARRAYS_DIR, CHROMA_DIR, Layout, ServerLocation, regular_file

if TYPE_CHECKING:
    from jasper.manifest import Manifest

#: Ids per ``get``: Chroma's maximum batch size on these machines (``get_max_batch_size()``).
PAGE = 5461


def _storage_logical(dtype: np.dtype) -> str:
    # uint16 holds bfloat16 bit patterns: no array of the data model is uint16 otherwise
    return "bfloat16" if dtype == np.uint16 else str(dtype)


def fetch_ids(collection: Any, ids: list[str], out: np.ndarray | torch.Tensor, where: str,
              progress: bool | None = None, include_metadata: bool = False,
              ) -> list[dict[str, Any] | None]:
    """Fill ``out[i]`` with the embedding of ``ids[i]`` (distinct ids), paging by ids.

    Chroma returns a page in insertion order, not request order, and silently drops ids it
    does not have: every row is placed by its returned id, and a missing id is a
    :class:`ChromaStoreError` naming the collection and the id. float64 from Chroma is cast to
    ``out``'s dtype in the assignment (no intermediate array of the whole table). Returns the
    metadata of each id when asked (else an empty list).
    """
    check_not_forked()  # a collection object inherited through fork would hang
    as_numpy = isinstance(out, np.ndarray) or out.dtype != torch.bfloat16
    target: Any = out if isinstance(out, np.ndarray) else (out.numpy() if as_numpy else out)
    metas: list[dict[str, Any] | None] = [None] * len(ids) if include_metadata else []
    include = ["embeddings", "metadatas"] if include_metadata else ["embeddings"]
    with count_bar(len(ids), f"reading {collection.name}", progress, unit="row") as update:
        for start in range(0, len(ids), PAGE):
            want = ids[start : start + PAGE]
            try:
                got = collection.get(ids=want, include=include)
            except Exception as exc:
                raise ChromaStoreError(f"{where}: reading collection {collection.name!r} "
                                       f"failed: {type(exc).__name__}: {str(exc)[:300]}") from None
            pos = {i: start + k for k, i in enumerate(want)}
            returned = got["ids"]
            if len(returned) != len(want):
                have = set(returned)
                missing = next(i for i in want if i not in have)
                raise ChromaStoreError(f"{where}: collection {collection.name!r} has no id "
                                       f"{missing!r}; {len(want) - len(returned)} of "
                                       f"{len(want)} requested ids are missing")
            dest = np.fromiter((pos[i] for i in returned), dtype=np.int64, count=len(returned))
            emb = got["embeddings"]
            if len(returned) and np.shape(emb)[1:] != tuple(out.shape[1:]):
                raise ChromaStoreError(f"{where}: collection {collection.name!r} holds "
                                       f"{np.shape(emb)[1]}-dimensional embeddings, expected "
                                       f"{out.shape[1]}")
            if as_numpy:
                target[dest] = emb
            else:
                target[torch.from_numpy(dest)] = torch.from_numpy(np.asarray(emb)).to(out.dtype)
            if include_metadata:
                for k, m in zip(dest.tolist(), got["metadatas"] or [None] * len(dest)):
                    metas[k] = m
            update(len(want))
    return metas


def fetch_rows(collection: Any, rows: np.ndarray, out: np.ndarray | torch.Tensor,
               where: str, progress: bool | None = None) -> None:
    """:func:`fetch_ids` of a jasper-written collection: row ``r`` is id ``str(r)``."""
    fetch_ids(collection, [str(int(r)) for r in rows], out, where, progress)


class ChromaReader(StoreReader):
    """A read handle on a Chroma-backed dataset. Holds paths only in its pickled state; the
    client is made lazily in the process that reads (see :mod:`jasper_chroma.client` for why
    a forked child is refused)."""

    backend_name = "chroma"

    def __init__(self, path: Path, manifest: Manifest, progress: bool | None = None) -> None:
        super().__init__(path, manifest)
        self.layout = Layout.load(self.path, manifest.dataset_kind)
        self.progress = progress
        self._cols: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cols"] = {}
        return state

    # --- where things are
    @property
    def where(self) -> str:
        server = self.layout.server
        return server.url() if server is not None else str(self.path / CHROMA_DIR)

    def _location(self) -> Path | ServerLocation:
        if self.layout.server is not None:
            return self.layout.server
        d = self.path / CHROMA_DIR
        if not (d / "chroma.sqlite3").is_file():
            raise FormatError(d / "chroma.sqlite3", "missing: the Chroma directory of this "
                              "dataset has no database")
        return d

    def _collection(self, table: str) -> Any:
        # collections are per process: one inherited through fork must never be used
        key = f"{os.getpid()}:{table}"
        col = self._cols.get(key)
        if col is None:
            client = get_client(self._location())
            col = get_collection(client, self.layout.tables[table].collection, self.where)
            self._cols[key] = col
        return col

    def _npy(self, name: str) -> Path:
        return self.path / ARRAYS_DIR / f"{name}.npy"

    def _open_npy(self, name: str) -> np.ndarray:
        p = self._npy(name)
        regular_file(p, f"the file of array {name!r} is not in the dataset")
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError, SyntaxError, TypeError, RecursionError,
                MemoryError, tokenize.TokenError) as exc:  # numpy's header literal parser
            raise FormatError(p, f"not a readable .npy file (truncated?): {exc}",
                              array=name) from None

    # --- StoreReader
    def array_names(self) -> list[str]:
        names = list(self.manifest.arrays) or []
        if not names:
            names = [p.stem for p in sorted((self.path / ARRAYS_DIR).glob("*.npy"))]
        tables = list(self.layout.tables)
        return [*tables, *(n for n in names if n not in tables)]

    def info(self, name: str) -> ArrayInfo:
        if name in self.layout.tables:
            t = self.layout.tables[name]
            return ArrayInfo((t.rows, t.cols), torch_dtype(t.dtype))
        arr = self._open_npy(name)
        rec = self.manifest.arrays.get(name)
        logical = rec.dtype if rec is not None else _storage_logical(arr.dtype)
        return ArrayInfo(tuple(arr.shape), torch_dtype(logical))

    def _logical(self, name: str, arr: np.ndarray) -> str:
        rec = self.manifest.arrays.get(name)
        return rec.dtype if rec is not None else _storage_logical(arr.dtype)

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        out = torch.empty(info.shape, dtype=info.dtype)
        return self.read_into(name, out)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self.check_out(name, out)
        if name in self.layout.tables:
            n = info.shape[0]
            if n:
                fetch_rows(self._collection(name), np.arange(n, dtype=np.int64), out,
                           self.where, self.progress)
            return out
        arr = self._open_npy(name)
        try:
            src = from_storage(np.array(arr), self._logical(name, arr))
        except (ValueError, OSError) as exc:
            raise FormatError(self._npy(name), f"unreadable: {exc}", array=name) from None
        out.copy_(src)
        return out

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.layout.tables:
            return self.read_rows(name, torch.arange(start, stop, dtype=torch.int64))
        arr = self._open_npy(name)
        return from_storage(np.array(arr[start:stop]), self._logical(name, arr))

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        idx = rows.to(torch.int64).numpy()
        if name in self.layout.tables:
            info = self.info(name)
            if idx.size and (idx.min() < 0 or idx.max() >= info.shape[0]):
                raise IndexError(f"rows of {name} must be in [0, {info.shape[0]})")
            uniq, inv = np.unique(idx, return_inverse=True)
            part = torch.empty((len(uniq), *info.shape[1:]), dtype=info.dtype)
            if len(uniq):
                fetch_rows(self._collection(name), uniq, part, self.where)
            return part[torch.from_numpy(inv.reshape(-1))]
        arr = self._open_npy(name)
        return from_storage(np.array(arr[idx]), self._logical(name, arr))

    def close(self) -> None:
        self._cols.clear()

    def count(self, table: str) -> int:
        """Rows the collection of ``table`` holds now."""
        try:
            return int(self._collection(table).count())
        except JasperError:
            raise
        except Exception as exc:
            raise ChromaStoreError(f"{self.where}: counting {table} failed: {exc}") from None
