"""The ``memmap-sqlite`` backend: one page-aligned ``.npy`` per array, a SQLite catalogue.

Layout of a dataset directory::

    config.json          core's manifest, written last (the commit marker)
    catalogue.db         SQLite (WAL): for every array its file, logical and storage dtype,
                         shape, data offset and block checksums (core's config.json holds the
                         whole-array checksums; see the README on why blocks are hashed)
    <array>.npy          one per array of jasper.schema.ARRAYS (CSR keyword ids as two arrays)

Reads come three ways:

- :meth:`MemmapSqliteReader.map`: a zero-copy read-only tensor over ``numpy.memmap`` with
  ``madvise(MADV_RANDOM)`` (shuffled batches fault in only the pages they touch; readahead would
  waste the page cache on neighbours nobody asked for);
- :meth:`~MemmapSqliteReader.read_rows`: core sorts, de-duplicates and checks the indices, the
  backend gathers the sorted rows from the map, core un-permutes;
- :meth:`~MemmapSqliteReader.read` / ``read_into`` / ``read_slice``: ``preadv`` straight from
  the file into the destination tensor, the one copy a preload needs.

Mapped tensors are read-only: writing into one crashes the process (the pages are mapped without
write permission). Clone a tensor before changing it.
"""

from __future__ import annotations

import contextlib
import mmap as _mmap
import os
import sqlite3
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
    check_format_version,
    default_rows_per_chunk,
)
from jasper.dtypes import STORAGE_NUMPY, dtype_name, to_storage
from jasper.errors import DatasetNotFoundError, FormatError, JasperError, ShapeError
from jasper.lazy import lazy_torch
from jasper.manifest import MANIFEST_NAME, Manifest
from jasper.schema import ARRAYS, dataset_kind
from jasper_memmap_sqlite.catalogue import (
    CATALOGUE_DDL,
    CatalogueEntry,
    block_checksums,
    check_entry_file,
    connect,
    connect_pinned,
    insert_array,
    load_catalogue,
    require_tables,
    sqlite_checks,
    transaction,
    verify_blocks,
)
from jasper_memmap_sqlite.cluster_rows import LOCK_NAME as ROW_LOCK_NAME
from jasper_memmap_sqlite.cluster_rows import ROWS_DDL, RowStore
from jasper_memmap_sqlite.npy import (
    DEFAULT_ALIGN,
    check_size,
    madvise,
    map_tensor,
    open_memmap,
    pread_into,
    read_header,
    read_rows_direct,
    tensor_chunks,
    write_npy,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

CATALOGUE_NAME = "catalogue.db"
FORMAT = "jasper-memmap-sqlite"
FORMAT_VERSION = 1
TABLES = ("jasper_meta", "arrays", "array_blocks", "csr")

_BACKEND_DDL = """
CREATE TABLE IF NOT EXISTS csr (
    name TEXT PRIMARY KEY,
    offsets TEXT NOT NULL REFERENCES arrays(name),
    "values" TEXT NOT NULL REFERENCES arrays(name)
);
"""


class MemmapSqliteReader(StoreReader):
    """A read handle on a ``memmap-sqlite`` dataset.

    The catalogue is read and every file's header and size checked when the reader opens; maps
    are created on first use in each process. Pickling keeps paths and catalogue only, so readers
    travel to spawned workers and remap there; forked workers share the parent's maps.
    """

    backend_name = "memmap-sqlite"

    def __init__(self, path: Path, manifest: Manifest, *, follow_links: bool = False) -> None:
        super().__init__(path, manifest, follow_links=follow_links)
        self._maps: dict[str, torch.Tensor] = {}
        self._mms: dict[str, np.ndarray] = {}
        self.entries = self._load_catalogue()
        self._row_store = RowStore(self.path, self.path / CATALOGUE_NAME, self.entries)
        if self._row_store.recover():  # a row writer died mid-change: rolled back
            self.entries = self._load_catalogue()
            self._row_store = RowStore(self.path, self.path / CATALOGUE_NAME, self.entries)
            self.manifest = Manifest.load(self.path)

    def _load_catalogue(self) -> dict[str, CatalogueEntry]:
        db = self.path / CATALOGUE_NAME
        conn = connect_pinned(self.files, CATALOGUE_NAME)
        try:
            require_tables(conn, db, TABLES, "memmap-sqlite catalogue")
            meta = dict(conn.execute("SELECT key, value FROM jasper_meta"))
            if meta.get("format") != FORMAT:
                raise FormatError(db, f"jasper_meta.format is {meta.get('format')!r}, expected "
                                  f"{FORMAT!r} (rule: memmap-sqlite catalogue)")
            check_format_version(meta.get("format_version", "0"), FORMAT_VERSION, db,
                                 "jasper_meta.format_version", "jasper-memmap-sqlite")
            entries = load_catalogue(conn, db)
        except sqlite3.DatabaseError as exc:
            raise FormatError(db, f"SQLite cannot read the catalogue (damaged?): {exc}") from None
        finally:
            conn.close()
        for e in entries.values():
            f = self.path / e.file
            with self.files.open_file(e.file) as fh:
                header = read_header(f, e.name, fileobj=fh)
                size = os.fstat(fh.fileno()).st_size
            if (header.dtype, header.shape, header.offset) != (e.storage_dtype, e.shape,
                                                                e.data_offset):
                raise ShapeError(
                    f"{e.file}: header says {header.dtype.str} {header.shape} with data at "
                    f"byte {header.offset}, the catalogue records {e.storage_dtype.str} "
                    f"{e.shape} at {e.data_offset}", array=e.name, row=None,
                    rule="file header matches the catalogue", path=f)
            check_size(f, header, e.name, size=size)
        return entries

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_mms"] = {}
        return state

    # --- the contract ------------------------------------------------------------------------
    def array_names(self) -> list[str]:
        known = [n for n in ARRAYS if n in self.entries]
        return known + [n for n in self.entries if n not in ARRAYS]

    def _entry(self, name: str) -> CatalogueEntry:
        e = self.entries.get(name)
        if e is None:
            raise self._missing(name)
        return e

    def info(self, name: str) -> ArrayInfo:
        e = self._entry(name)
        return ArrayInfo(e.shape, e.dtype)

    def map_numpy(self, name: str) -> np.ndarray:
        mm = self._mms.get(name)
        if mm is None:
            e = self._entry(name)
            with self.files.open_file(e.file) as fh:
                mm = open_memmap(self.path / e.file, e.header(), mode="r",
                                 advice=_mmap.MADV_RANDOM, fileobj=fh)
            self._mms[name] = mm
        return mm

    def map(self, name: str) -> torch.Tensor:
        t = self._maps.get(name)
        if t is None:
            t = self._maps[name] = map_tensor(self.map_numpy(name), self._entry(name).dtype)
        return t

    def advise(self, name: str, advice: int) -> None:
        """Change the ``madvise`` hint of ``name``'s map, e.g. ``mmap.MADV_SEQUENTIAL`` before
        a full scan through the map (maps start as ``MADV_RANDOM``)."""
        self.map(name)
        mm = self._mms.get(name)
        if mm is not None:
            madvise(mm, advice)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        e = self._entry(name)
        self.check_out(name, out)
        if out.device.type != "cpu" or not out.is_contiguous():
            return out.copy_(self.read(name))
        if e.nbytes:
            view = to_storage(out).reshape(-1).view(np.uint8)
            fd = self.files.open_fd(e.file)
            try:
                pread_into(self.path / e.file, e.data_offset, memoryview(view), array=name, fd=fd)
            finally:
                os.close(fd)
        return out

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        e = self._entry(name)
        n = e.shape[0] if e.shape else 0
        start, stop, _ = slice(start, stop).indices(n)
        fd = self.files.open_fd(e.file)
        try:
            return read_rows_direct(self.path / e.file, e.header(), start, max(start, stop),
                                    e.dtype, array=name, fd=fd)
        finally:
            os.close(fd)

    def read_sorted_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        # ascending rows fault the map's pages in one sweep; core sorted and checked them
        return self.map(name).index_select(0, rows)

    def write_rows(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                   note: Mapping[str, Any] | None = None) -> None:
        """Replace rows of mutable arrays in place as one crash-safe change (see
        :mod:`jasper_memmap_sqlite.cluster_rows`); maps of this and every other process see
        the new rows from their next :meth:`reading_rows` on."""
        self._row_store.write(updates, note, dataset_kind(self.manifest.dataset_kind).arrays)
        self.entries = dict(self._row_store.entries)
        self.manifest = Manifest.load(self.path)

    def reading_rows(self) -> contextlib.AbstractContextManager[None]:
        return self._row_store.reading()

    def close(self) -> None:
        self._maps.clear()
        self._mms.clear()
        self._row_store.close()
        super().close()


class MemmapSqliteBackend(BackendEntrypoint):
    """Memory-mapped page-aligned ``.npy`` arrays with a SQLite catalogue."""

    name: ClassVar[str] = "memmap-sqlite"
    description: ClassVar[str] = (
        "memory-mapped page-aligned .npy arrays + SQLite catalogue; serves data larger than RAM"
    )
    url: ClassVar[str] = "https://pypi.org/project/jasper-memmap-sqlite/"
    capabilities: ClassVar[Capabilities] = Capabilities(
        write=True, mmap=True, compression=False, row_access=True, worker_safe=True,
        write_rows=True,
    )
    marker_files: ClassVar[tuple[str, ...]] = (CATALOGUE_NAME,)
    #: The cluster-labeled ``dataset.db`` layouts (the original system's and jasper's first).
    foreign_markers: ClassVar[tuple[str, ...]] = ("dataset.db",)
    write_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {},
        # numpy's own alignment: smaller files for tiny arrays, rows may straddle pages
        "align-64": {"align": 64},
    }

    def open(self, path: Path, manifest: Manifest) -> MemmapSqliteReader:
        p = Path(path)
        if not p.is_dir():
            raise DatasetNotFoundError(p)
        if not (p / CATALOGUE_NAME).exists():
            raise DatasetNotFoundError(p / CATALOGUE_NAME, "memmap-sqlite catalogue",
                                       "The directory was not written by the memmap-sqlite "
                                       "backend, or its write was interrupted")
        return MemmapSqliteReader(p, manifest)

    def write_arrays(
        self,
        directory: Path,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
        *,
        align: int = DEFAULT_ALIGN,
    ) -> None:
        """Stream every array into ``<name>.npy`` (data page-aligned), then record the catalogue
        in one transaction. ``align``: byte multiple where each file's data starts."""
        if not isinstance(align, int) or align < 64 or align % 64:
            from jasper.errors import WriteOptionError

            raise WriteOptionError(f"align must be a positive multiple of 64, got {align!r}")
        directory = Path(directory)
        written = {}
        for name, source in arrays.items():
            logical = dtype_name(source.dtype)
            storage = STORAGE_NUMPY[logical]
            rows = default_rows_per_chunk(source)
            written[name] = (logical, write_npy(
                directory / f"{name}.npy", tuple(source.shape), storage,
                tensor_chunks(source.iter_chunks(rows)), align=align, array=name,
                whole_checksum=False))
        mutable = any(s.mutable for s in dataset_kind(manifest.dataset_kind).arrays.values())
        conn = connect(directory / CATALOGUE_NAME, readonly=False, create=True)
        try:
            rows_ddl = ROWS_DDL if mutable else ""  # tables of in-place row changes
            conn.executescript(CATALOGUE_DDL + _BACKEND_DDL + rows_ddl)
            with transaction(conn):
                conn.executemany("INSERT INTO jasper_meta (key, value) VALUES (?, ?)", [
                    ("format", FORMAT),
                    ("format_version", str(FORMAT_VERSION)),
                    ("align", str(align)),
                ])
                for name, (logical, w) in written.items():
                    insert_array(conn, name, logical, w)
                if "pair_keyword_offsets" in written and "pair_keyword_ids" in written:
                    conn.execute('INSERT INTO csr (name, offsets, "values") VALUES (?, ?, ?)',
                                 ("pair_keywords", "pair_keyword_offsets", "pair_keyword_ids"))
        finally:
            conn.close()  # the last close checkpoints the WAL into the database file
        if mutable:
            (directory / ROW_LOCK_NAME).touch()  # readers and row writers meet here

    def open_foreign(self, path: Path) -> StoreReader | None:
        """The cluster-labeled ``dataset.db`` layouts (no ``config.json``), read as arrays."""
        if not (Path(path) / "dataset.db").is_file():
            return None
        from jasper_memmap_sqlite.cluster_reader import ClusterDbReader

        return ClusterDbReader.open(Path(path))

    def deep_check(self, path: Path) -> list[str]:
        """``integrity_check``, ``foreign_key_check``, and every file against the catalogue:
        header, size, block checksums, and the catalogue against ``config.json``."""
        p = Path(path)
        if not (p / CATALOGUE_NAME).exists() and (p / "dataset.db").is_file():
            from jasper_memmap_sqlite.cluster_reader import deep_check_cluster_db

            return deep_check_cluster_db(p)
        db = p / CATALOGUE_NAME
        try:
            conn = connect(db, readonly=True)
        except JasperError as exc:
            return [str(exc)]
        problems: list[str] = []
        try:
            problems = sqlite_checks(conn, db)
            try:
                require_tables(conn, db, TABLES, "memmap-sqlite catalogue")
                entries = load_catalogue(conn, db)
            except FormatError as exc:
                return [*problems, str(exc)]
            blocks = {n: block_checksums(conn, n) for n in entries}
        except sqlite3.DatabaseError as exc:
            return [*problems, f"{db}: SQLite cannot read the catalogue (damaged page?): {exc} "
                    "(rule: readable SQLite file)"]
        finally:
            conn.close()
        for e in entries.values():
            file_problems = check_entry_file(p, e)
            problems += file_problems
            if not file_problems:
                problems += verify_blocks(p, e, blocks[e.name])
        manifest_path = p / MANIFEST_NAME
        if manifest_path.is_file():
            try:
                recorded = Manifest.load(p).arrays
            except JasperError as exc:
                return [*problems, str(exc)]
            for n in recorded:
                if n not in entries:
                    problems.append(f"{db}: array {n!r} is in {MANIFEST_NAME} but not in the "
                                    "catalogue (rule: catalogue covers the manifest)")
        return problems


__all__ = ["CATALOGUE_NAME", "MemmapSqliteBackend", "MemmapSqliteReader"]
