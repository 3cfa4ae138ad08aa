"""Reading a Chroma-backed dataset: tables by id-paged bulk reads, other arrays from .npy."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tokenize
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from jasper.backend import ArrayInfo, StoreReader
from jasper.dtypes import from_storage, torch_dtype
from jasper.errors import FormatError, JasperError
from jasper.files import PIN_ATTEMPTS, DatasetChangedError, names_directory
from jasper.location import Location
from jasper.progress import count_bar
from jasper_chroma.client import (
    DAMAGED_STORE,
    SERVER_FAILED,
    ChromaStoreError,
    check_not_forked,
    chroma_errors,
    get_client,
    get_collection,
    open_persistent,
)
from jasper_chroma.layout import ARRAYS_DIR, CHROMA_DIR, LAYOUT_FILE, Layout, ServerDataset
from jasper_chroma.objects import ChromaObjects

if TYPE_CHECKING:
    from jasper.manifest import Manifest

#: Ids per ``get``: Chroma's maximum batch size on these machines (``get_max_batch_size()``).
PAGE = 5461


def _storage_logical(dtype: np.dtype) -> str:
    # uint16 holds bfloat16 bit patterns: no array of the data model is uint16 otherwise
    return "bfloat16" if dtype == np.uint16 else str(dtype)


def fetch_ids(collection: Any, ids: list[str], out: np.ndarray | torch.Tensor, where: str,
              progress: bool | None = None, include_metadata: bool = False,
              advice: str = "") -> list[dict[str, Any] | None]:
    """Fill ``out[i]`` with the embedding of ``ids[i]`` (distinct ids), paging by ids.

    Chroma returns a page in insertion order, not request order, and silently drops ids it
    does not have: every row is placed by its returned id, and a missing id is a
    :class:`ChromaStoreError` naming the collection and the id. float64 from Chroma is cast to
    ``out``'s dtype in the assignment (no intermediate array of the whole table). Returns the
    metadata of each id when asked (else an empty list). A failed read (a panic of chromadb's
    Rust code included) is a :class:`ChromaStoreError` ending in ``advice``.
    """
    check_not_forked()  # a collection object inherited through fork would hang
    as_numpy = isinstance(out, np.ndarray) or out.dtype != torch.bfloat16
    target: Any = out if isinstance(out, np.ndarray) else (out.numpy() if as_numpy else out)
    metas: list[dict[str, Any] | None] = [None] * len(ids) if include_metadata else []
    include = ["embeddings", "metadatas"] if include_metadata else ["embeddings"]
    with count_bar(len(ids), f"reading {collection.name}", progress, unit="row") as update:
        for start in range(0, len(ids), PAGE):
            want = ids[start : start + PAGE]
            with chroma_errors(where, f"reading collection {collection.name!r} failed", advice):
                got = collection.get(ids=want, include=include)
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
                target[torch.from_numpy(dest)] = torch.from_numpy(np.asarray(emb)).to(torch.bfloat16)
            if include_metadata:
                for k, m in zip(dest.tolist(), got["metadatas"] or [None] * len(dest)):
                    metas[k] = m
            update(len(want))
    return metas


def fetch_all(collection: Any, out: torch.Tensor, where: str,
              progress: bool | None = None, advice: str = "") -> None:
    """Fill ``out`` with every row of a jasper-written collection (row ``r`` is id ``str(r)``),
    paging by ``limit``/``offset``: faster than paging by ids over HTTP (measured, see the
    README), and as safe: every returned id is placed by its value, an id that is not a row
    number in range is an error, and after the last page every row must have been seen (the
    first missing one is named). Pages come in insertion order, which for jasper's writes is
    row order, so most pages are one contiguous slice assignment. A failed read is a
    :class:`ChromaStoreError` ending in ``advice``."""
    check_not_forked()
    n = int(out.shape[0])
    seen = np.zeros(n, dtype=bool)
    as_numpy = out.dtype != torch.bfloat16
    target: Any = out.numpy() if as_numpy else out
    offset = 0
    with count_bar(n, f"reading {collection.name}", progress, unit="row") as update:
        while True:
            with chroma_errors(where, f"reading collection {collection.name!r} failed", advice):
                got = collection.get(include=["embeddings"], limit=PAGE, offset=offset)
            ids = got["ids"]
            if not ids:
                break
            try:
                dest = np.fromiter((int(i) for i in ids), dtype=np.int64, count=len(ids))
            except ValueError:
                bad = next(i for i in ids if not i.isdigit())
                raise ChromaStoreError(f"{where}: collection {collection.name!r} holds id "
                                       f"{bad!r}, not a row number") from None
            wrong = (dest < 0) | (dest >= n)
            if wrong.any() or any(a != str(b) for a, b in zip(ids, dest.tolist())):
                k = int(np.argmax(wrong)) if wrong.any() else next(
                    k for k, (a, b) in enumerate(zip(ids, dest.tolist())) if a != str(b))
                raise ChromaStoreError(f"{where}: collection {collection.name!r} holds id "
                                       f"{ids[k]!r}, not a row number in [0, {n})")
            emb = got["embeddings"]
            if np.shape(emb)[1:] != tuple(out.shape[1:]):
                raise ChromaStoreError(f"{where}: collection {collection.name!r} holds "
                                       f"{np.shape(emb)[1]}-dimensional embeddings, expected "
                                       f"{out.shape[1]}")
            lo, hi = int(dest[0]), int(dest[-1]) + 1
            run = hi - lo == len(dest) and bool((np.diff(dest) == 1).all())
            if as_numpy:
                if run:
                    target[lo:hi] = emb
                else:
                    target[dest] = emb
            else:
                vals = torch.from_numpy(np.asarray(emb)).to(torch.bfloat16)
                if run:
                    target[lo:hi] = vals
                else:
                    target[torch.from_numpy(dest)] = vals
            seen[dest] = True
            update(len(ids))
            offset += len(ids)
            if len(ids) < PAGE:
                break
    if not seen.all():
        missing = int(np.argmin(seen))
        raise ChromaStoreError(f"{where}: collection {collection.name!r} has no id "
                               f"{str(missing)!r}; {int(n - seen.sum())} of {n} rows are missing")


def fetch_rows(collection: Any, rows: np.ndarray, out: np.ndarray | torch.Tensor,
               where: str, progress: bool | None = None, advice: str = "") -> None:
    """:func:`fetch_ids` of a jasper-written collection: row ``r`` is id ``str(r)``."""
    fetch_ids(collection, [str(int(r)) for r in rows], out, where, progress, advice=advice)


class ChromaReader(StoreReader):
    """A read handle on one version of a Chroma-backed dataset: a local directory, or one
    generation on a Chroma server (the location core hands :meth:`ChromaBackend.open`).

    Pinned reads: a local reader opens every file of the directory it pinned (the ``.npy``
    maps, and a PersistentClient on ``/proc/self/fd/N/chroma`` whose collections it loads)
    before checking that the path still names that directory, so a writer's commit, which
    moves the old version aside and deletes it, never mixes versions under it. A server reader
    reads one generation's collections and objects, which a commit never changes (they are
    deleted one overwrite later, see :mod:`jasper.location`). Pickled state holds locations
    only; clients open in the process that reads (a forked child of a process that used Chroma
    is refused: :mod:`jasper_chroma.client`).
    """

    backend_name = "chroma"
    fork_safe = False  # Chroma's runtime hangs in a forked child: loaders spawn instead

    def __init__(self, where: Path | Location, manifest: Manifest,
                 progress: bool | None = None) -> None:
        self.progress = progress
        self._cols: dict[str, Any] = {}
        self._npys: dict[str, np.ndarray] = {}
        self._local: _LocalPin | None = None
        self.dataset: ServerDataset | None = None
        if isinstance(where, Location):
            self.dataset = ServerDataset.parse(where)
            if self.dataset.generation is None:
                raise FormatError(str(where), "open a server dataset through jasper.open_store "
                                  "(it follows the dataset's pointer to one generation)")
            self.path = where  # type: ignore[assignment]
            self.manifest = manifest
            self._objects = ChromaObjects(self.dataset)
            data = self._object(LAYOUT_FILE)
            self.layout = Layout.parse(data, f"{self.dataset.url}/{self._prefix}{LAYOUT_FILE}",
                                       manifest.dataset_kind)
            return
        for _attempt in range(PIN_ATTEMPTS):
            super().__init__(Path(where), manifest)
            try:
                self.layout = Layout.parse(self.files.read_bytes(LAYOUT_FILE, limit=16 << 20),
                                           self.path / LAYOUT_FILE, self.manifest.dataset_kind)
                if self.layout.where != "local":
                    raise FormatError(self.path / LAYOUT_FILE, f"chroma.json says 'where': "
                                      f"{self.layout.where!r}, but a dataset directory is "
                                      "'local' (a dataset on a server is opened by its "
                                      "chroma:// URL)")
                self._local = _LocalPin.open(self)
            except (JasperError, OSError):
                if names_directory(self.path, self.files.fd):
                    self._release_local()
                    raise
                self._release_local()
                continue  # replaced while being opened: open the new version
            if names_directory(self.path, self.files.fd):
                return
            self._release_local()
        raise DatasetChangedError(self.path, f"the dataset was replaced {PIN_ATTEMPTS} times "
                                  "while it was being opened; open it again later")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_cols={}, _npys={}, _local=None)
        return state

    # --- where things are
    @property
    def _prefix(self) -> str:
        assert self.dataset is not None and self.dataset.generation is not None
        return f"generations/{self.dataset.generation}/"

    @property
    def where(self) -> str:
        if self.dataset is not None:
            return self.dataset.url
        return str(self.path / CHROMA_DIR)

    @property
    def advice(self) -> str:
        """What to do when a Chroma call of this reader fails (ends its error messages)."""
        return SERVER_FAILED if self.dataset is not None else DAMAGED_STORE

    def _object(self, key: str) -> bytes:
        try:
            return self._objects.get(self._prefix + key)
        except FileNotFoundError:
            raise FormatError(f"{self.where}/{self._prefix}{key}", "missing: the generation "
                              "the pointer names has no such object (changed by hand?)") from None

    def _pin(self) -> _LocalPin:
        if self._local is None or self._local.pid != os.getpid():
            check_not_forked()
            self._local = _LocalPin.open(self)
        return self._local

    def _collection(self, table: str) -> Any:
        # collections are per process: one inherited through fork must never be used
        key = f"{os.getpid()}:{table}"
        col = self._cols.get(key)
        if col is None:
            name = self.layout.tables[table].collection
            if self.dataset is not None:
                client = get_client(self.dataset.server)
            else:
                client = self._pin().client
            col = get_collection(client, name, self.where, self.advice)
            self._cols[key] = col
        return col

    def collection(self, table: str) -> Any:
        """The Chroma collection holding ``table`` in this reader's version (this process's
        handle; e.g. to query it by similarity, or to time Chroma alone against a preload)."""
        if table not in self.layout.tables:
            raise KeyError(f"{table!r} is not an embedding table of this dataset "
                           f"({', '.join(self.layout.tables)})")
        return self._collection(table)

    def _open_npy(self, name: str) -> np.ndarray:
        arr = self._npys.get(name)
        if arr is not None:
            return arr
        if self.dataset is not None:
            key = f"{ARRAYS_DIR}/{name}.npy"
            where: Any = f"{self.where}/{self._prefix}{key}"
            try:
                arr = np.load(io.BytesIO(self._object(key)), allow_pickle=False)
            except (ValueError, OSError, EOFError, SyntaxError, TypeError, RecursionError,
                    MemoryError, tokenize.TokenError) as exc:  # numpy's header literal parser
                raise FormatError(where, f"not a readable .npy object (truncated?): {exc}",
                                  array=name) from None
        else:
            arr = self._pin().npy(name)
        self._npys[name] = arr
        return arr

    def _npy(self, name: str) -> Path:
        return self.path / ARRAYS_DIR / f"{name}.npy"

    # --- StoreReader
    def array_names(self) -> list[str]:
        names = list(self.manifest.arrays)
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
                fetch_all(self._collection(name), out, self.where, self.progress, self.advice)
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
                fetch_rows(self._collection(name), uniq, part, self.where, advice=self.advice)
            return part[torch.from_numpy(inv.reshape(-1))]
        arr = self._open_npy(name)
        return from_storage(np.array(arr[idx]), self._logical(name, arr))

    def _release_local(self) -> None:
        self._cols.clear()
        self._npys.clear()
        local, self._local = self._local, None
        if local is not None:
            local.close()
        files = getattr(self, "files", None)
        if files is not None:
            files.close()

    def close(self) -> None:
        if self.dataset is not None:
            self._cols.clear()
            self._npys.clear()
            return
        self._release_local()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._local is not None and self._local.pid == os.getpid():
                self._local.close()

    def count(self, table: str) -> int:
        """Rows the collection of ``table`` holds now."""
        col = self._collection(table)
        with chroma_errors(self.where, f"counting {table} in collection {col.name!r} failed",
                           self.advice):
            return int(col.count())




class _LocalPin:
    """What a local reader opened of its pinned directory in one process: the ``.npy`` maps
    and a PersistentClient on the pinned ``chroma/`` with every table collection loaded."""

    def __init__(self, pid: int, dir_fd: int, client: Any, npys: dict[str, np.ndarray]) -> None:
        self.pid = pid
        self.dir_fd = dir_fd  # keeps /proc/self/fd/N naming the pinned directory
        self.client = client
        self.npys = npys

    @classmethod
    def open(cls, reader: ChromaReader) -> _LocalPin:
        files = reader.files
        # a descriptor of our own: the client's path stays valid (and unique) while it is open
        dir_fd = os.dup(files.fd)
        try:
            # Chroma opens SQLite connections by name whenever it wants one, long after this
            # pin: the commit that replaces this version must leave its files in place
            if not files.hold():
                raise DatasetChangedError(reader.path, "the dataset is being replaced; open it "
                                          "again")
            arrays_fd = _open_subdir(dir_fd, ARRAYS_DIR, reader.path)
            try:
                npys = {}
                for entry in sorted(os.listdir(arrays_fd)):
                    if entry.endswith(".npy"):
                        npys[entry[:-4]] = _map_npy(arrays_fd, entry, reader.path)
            finally:
                os.close(arrays_fd)
            chroma_fd = _open_subdir(dir_fd, CHROMA_DIR, reader.path)
            os.close(chroma_fd)
            try:
                st = os.stat(f"{CHROMA_DIR}/chroma.sqlite3", dir_fd=dir_fd,
                             follow_symlinks=False)
            except FileNotFoundError:
                raise FormatError(reader.path / CHROMA_DIR / "chroma.sqlite3", "missing: the "
                                  "Chroma directory of this dataset has no database") from None
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(reader.path / CHROMA_DIR / "chroma.sqlite3", "is not a regular "
                                  "file; a dataset reads only regular files inside its own "
                                  "directory")
            client = open_persistent(Path(f"/proc/self/fd/{dir_fd}/{CHROMA_DIR}"),
                                     str(reader.path / CHROMA_DIR))
            pin = cls(os.getpid(), dir_fd, client, npys)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            for table, rec in reader.layout.tables.items():
                if rec.rows:  # load each collection now, while its files are surely there
                    col = get_collection(client, rec.collection, reader.where, reader.advice)
                    reader._cols[f"{os.getpid()}:{table}"] = col
                    fetch_ids(col, ["0"], np.empty((1, rec.cols), np.float32), reader.where,
                              False, advice=reader.advice)
        except BaseException:
            pin.close()
            raise
        return pin

    def npy(self, name: str) -> np.ndarray:
        arr = self.npys.get(name)
        if arr is None:
            raise FormatError(f"{ARRAYS_DIR}/{name}.npy", f"missing: the file of array {name!r} "
                              "is not in the dataset")
        return arr

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            # best effort: releases Chroma's system; a panic here (a damaged store) must not
            # replace the typed error a failed open is being closed for
            with contextlib.suppress(ChromaStoreError), chroma_errors("", "closing"):
                client.close()
        if self.dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)
            self.dir_fd = -1


def _open_subdir(dir_fd: int, name: str, path: Path) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except FileNotFoundError:
        raise FormatError(path / name, "missing: a Chroma-backed dataset has this "
                          "directory") from None
    except OSError as exc:
        raise FormatError(path / name, "is not a directory inside the dataset (a symlink is "
                          f"refused, never followed): {exc.strerror}") from None


def _map_npy(arrays_fd: int, entry: str, path: Path) -> np.ndarray:
    where = path / ARRAYS_DIR / entry
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=arrays_fd)
    except OSError as exc:
        raise FormatError(where, "is a symlink or unreadable; a dataset reads only regular "
                          f"files inside its own directory ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(where, "is not a regular file; a dataset reads only regular files "
                              "inside its own directory")
        try:
            # the map keeps the file's pages reachable after the version is deleted
            return np.load(f"/proc/self/fd/{fd}", mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError, SyntaxError, TypeError, RecursionError,
                MemoryError, tokenize.TokenError) as exc:  # numpy's header literal parser
            raise FormatError(where, f"not a readable .npy file (truncated?): {exc}",
                              array=entry[:-4]) from None
    finally:
        os.close(fd)
