"""In-place row writes (``StoreReader.write_rows``) for memmap-sqlite datasets, crash-safe.

This is what ``ClusterLabeledDataset.update_labels`` runs on: one call replaces rows of several
mutable arrays (e.g. a sample's source and combined labels) as ONE change.

Readers and writers of rows meet at an ``flock`` on ``rows.lock`` in the dataset directory:
readers hold it shared while they copy rows, the writer holds it exclusive for the whole change
(plus a thread lock inside each process, because an flock belongs to the open file description
that a process's threads share). A lock was chosen over a generation counter because a reader
then needs no retry loop and the guarantee holds on every CPU without relying on memory
ordering; it costs two system calls per batch.

Across a crash, the change is journaled: the writer

1. creates ``rows.pending`` (and fsyncs the directory) - "a change may be under way";
2. commits the old and new bytes of every row to ``row_journal`` in ``catalogue.db``;
3. writes the new rows into the ``.npy`` files and fsyncs them;
4. recomputes the checksums of the changed arrays and writes ``config.json`` atomically;
5. in one transaction updates the catalogue's checksums, logs the change in ``row_history`` and
   empties the journal; then removes ``rows.pending``.

Whoever next finds ``rows.pending`` while holding the lock exclusively (so its writer is dead)
rolls the change back from the journal - the old rows, their checksums, ``config.json`` - and
removes it: after a kill at any point the dataset holds all of the old rows or, once step 5 has
committed, all of the new ones, and deep validation passes. Readers look for ``rows.pending``
(one ``stat``) each time they take the lock, so a reader that stays open across a writer's
death never serves a half-written change either.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.dtypes import dtype_name, to_storage
from jasper.errors import IntegrityError, JasperError, ShapeError
from jasper.lazy import lazy_torch
from jasper.manifest import Checksummer, Manifest
from jasper.schema import ALL_ARRAYS
from jasper_memmap_sqlite.catalogue import CatalogueEntry, connect, transaction
from jasper_memmap_sqlite.npy import pread_into

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())


class RowWriteError(JasperError, OSError):
    """A row change failed (disk, SQLite) and was rolled back; the message says why."""


LOCK_NAME = "rows.lock"
PENDING_NAME = "rows.pending"

ROWS_DDL = """
CREATE TABLE IF NOT EXISTS row_journal (
    id INTEGER PRIMARY KEY,
    array TEXT NOT NULL REFERENCES arrays(name),
    row INTEGER NOT NULL CHECK (row >= 0),
    old BLOB NOT NULL,
    new BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS row_history (
    id INTEGER PRIMARY KEY,
    note TEXT,
    changes TEXT NOT NULL,
    changed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
"""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RowStore:
    """The row lock, the journal and the commit of row changes of one dataset directory.

    Picklable (paths only); per-process descriptors are reopened after ``fork`` and in spawned
    workers.
    """

    def __init__(self, directory: Path, db: Path, entries: Mapping[str, CatalogueEntry]) -> None:
        self.directory = Path(directory)
        self.db = Path(db)
        self.entries = dict(entries)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fd: int | None = None
        self._mutex = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "db": self.db, "entries": self.entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def lock_path(self) -> Path:
        return self.directory / LOCK_NAME

    @property
    def pending_path(self) -> Path:
        return self.directory / PENDING_NAME

    # --- the lock ----------------------------------------------------------------------------
    def _forked(self) -> None:
        if self._pid != os.getpid():
            # one descriptor per process: an flock belongs to the open file description, which a
            # forked child shares with its parent, so an inherited one would not exclude it; and
            # a fresh thread lock, since the parent's may have been held by one of its threads
            # at the fork
            self._reset()

    def _lock_fd(self) -> int | None:
        self._forked()
        if self._fd is None:
            try:
                self._fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None  # written before row writes existed and never changed since
        return self._fd

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self._forked()
        with self._mutex:
            fd = self._lock_fd()
            if fd is None:
                yield
                return
            fcntl.flock(fd, mode)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while copying rows: no row write is half-visible. Rolls back the change of a
        writer that died first."""
        with self._locked(fcntl.LOCK_SH):
            if not self.pending_path.exists():
                yield
                return
        self.recover()
        with self._locked(fcntl.LOCK_SH):
            yield

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    # --- recovery ----------------------------------------------------------------------------
    def needs_recovery(self) -> bool:
        return self.pending_path.exists()

    def recover(self) -> bool:
        """Roll back the change of a writer that died (if any); True when one was rolled back.
        Needs write access to the directory; without it, an :class:`IntegrityError` says so."""
        if not self.needs_recovery():
            return False
        if not os.access(self.directory, os.W_OK):
            raise IntegrityError(
                f"{self.directory}: a row change was interrupted (rows.pending is present) and "
                "this process cannot write the directory to roll it back; open the dataset once "
                "with write access", rule="interrupted row change rolled back",
                path=self.directory)
        self.lock_path.touch(exist_ok=True)
        with self._locked(fcntl.LOCK_EX):
            if not self.needs_recovery():
                return False  # another process rolled it back while we waited
            conn = connect(self.db, readonly=False)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(ROWS_DDL)
                journal = conn.execute("SELECT array, row, old FROM row_journal "
                                       "ORDER BY id").fetchall()
                touched = sorted({a for a, _r, _o in journal})
                for array, row, old in journal:
                    self._put_row(array, int(row), bytes(old))
                self._sync_files(touched)
                self._seal(conn, touched, note=None, changes=None)
            finally:
                conn.close()
            self.pending_path.unlink(missing_ok=True)
            _fsync_path(self.directory)
        return True

    # --- the write ---------------------------------------------------------------------------
    def write(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              note: Mapping[str, Any] | None, kind_arrays: Mapping[str, Any]) -> None:
        """Replace rows as one crash-safe change (module docstring, steps 1-5)."""
        plan = self._plan(updates, kind_arrays)
        if not plan:
            return
        self.lock_path.touch(exist_ok=True)
        self.recover()
        with self._locked(fcntl.LOCK_EX):
            conn = connect(self.db, readonly=False)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(ROWS_DDL)
                journal = [(name, row, self._get_row(name, row), new)
                           for name, row, new in plan]
                self.pending_path.touch()
                _fsync_path(self.directory)
                with transaction(conn):
                    conn.executemany("INSERT INTO row_journal (array, row, old, new) VALUES "
                                     "(?, ?, ?, ?)", journal)
                touched = sorted({name for name, _r, _n in plan})
                try:
                    for name, row, new in plan:
                        self._put_row(name, row, new)
                    self._sync_files(touched)
                    changes = {n: sorted({r for a, r, _ in plan if a == n}) for n in touched}
                    self._seal(conn, touched, note=note, changes=changes)
                except Exception as exc:
                    # a failure we live through: put the old rows back now (a crash is rolled
                    # back by the next reader or writer)
                    for name, row, old, _new in journal:
                        self._put_row(name, row, old)
                    self._sync_files(touched)
                    self._seal(conn, touched, note=None, changes=None)
                    if isinstance(exc, JasperError):
                        raise
                    raise RowWriteError(f"{self.directory}: changing rows of "
                                        f"{', '.join(touched)} failed and was rolled back: "
                                        f"{type(exc).__name__}: {exc}") from exc
                finally:
                    # only a complete seal empties the journal; otherwise leave the marker
                    if not conn.execute("SELECT count(*) FROM row_journal").fetchone()[0]:
                        self.pending_path.unlink(missing_ok=True)
                        _fsync_path(self.directory)
            finally:
                conn.close()

    def _plan(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              kind_arrays: Mapping[str, Any]) -> list[tuple[str, int, bytes]]:
        plan: list[tuple[str, int, bytes]] = []
        for name, (rows, values) in updates.items():
            spec = kind_arrays.get(name) or ALL_ARRAYS.get(name)
            e = self.entries.get(name)
            if spec is None or e is None:
                raise ShapeError(f"{self.directory}: array {name!r} is not in this dataset",
                                 array=name, rule="write rows of an existing array",
                                 path=self.directory)
            if not spec.mutable:
                raise ShapeError(f"{name} is not a mutable array (only arrays the data model "
                                 "marks mutable, such as label matrices, change in place)",
                                 array=name, rule="mutable array", path=self.directory)
            idx = torch.as_tensor(rows)
            if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise ShapeError(f"write_rows({name!r}): rows must be a 1-D integer tensor",
                                 array=name, rule="row indices")
            idx = idx.to(torch.int64)
            n = e.shape[0]
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                bad = int(torch.nonzero((idx < 0) | (idx >= n))[0])
                raise IndexError(f"write_rows({name!r}): rows[{bad}] = {int(idx[bad])} is out "
                                 f"of range for {n} rows")
            if int(torch.unique(idx).numel()) != idx.numel():
                raise ShapeError(f"write_rows({name!r}): a row is given twice", array=name,
                                 rule="each row once per change")
            vals = torch.as_tensor(values)
            if tuple(vals.shape) != (idx.numel(), *e.shape[1:]) or dtype_name(vals.dtype) != e.dtype:
                raise ShapeError(f"write_rows({name!r}): values are {tuple(vals.shape)} "
                                 f"{vals.dtype}, expected ({idx.numel()}, "
                                 f"{', '.join(map(str, e.shape[1:]))}) {e.dtype}", array=name,
                                 rule="values match the array's rows")
            storage = to_storage(vals)
            for i, r in enumerate(idx.tolist()):
                plan.append((name, r, np.ascontiguousarray(storage[i]).tobytes()))
        return plan

    # --- bytes on disk -----------------------------------------------------------------------
    def _row_bytes(self, e: CatalogueEntry) -> int:
        return e.header().row_bytes

    def _get_row(self, name: str, row: int) -> bytes:
        e = self.entries[name]
        size = self._row_bytes(e)
        buf = bytearray(size)
        pread_into(self.directory / e.file, e.data_offset + row * size, memoryview(buf),
                   array=name)
        return bytes(buf)

    def _put_row(self, name: str, row: int, data: bytes) -> None:
        e = self.entries[name]
        size = self._row_bytes(e)
        if len(data) != size:
            raise IntegrityError(f"row_journal holds {len(data)} bytes for a row of {name!r}, "
                                 f"which has {size} (rule: journal rows match the array)",
                                 array=name, row=row, path=self.db)
        fd = os.open(self.directory / e.file, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.pwrite(fd, data, e.data_offset + row * size)
            if written != size:
                raise OSError(f"short write to {e.file}: {written} of {size} bytes")
        finally:
            os.close(fd)

    def _sync_files(self, names: list[str]) -> None:
        for name in names:
            _fsync_path(self.directory / self.entries[name].file)

    def _checksums(self, name: str) -> tuple[str, list[str]]:
        """The whole-array and per-block checksums of ``name`` as it is on disk now."""
        e = self.entries[name]
        row = self._row_bytes(e)
        n = e.shape[0] if e.shape else 1
        whole = Checksummer()
        blocks: list[str] = []
        buf = np.empty(e.rows_per_block * row, dtype=np.uint8)
        for start in range(0, n, e.rows_per_block):
            stop = min(n, start + e.rows_per_block)
            view = buf[: (stop - start) * row]
            pread_into(self.directory / e.file, e.data_offset + start * row, memoryview(view),
                       array=name)
            c = Checksummer()
            c.update(view)
            whole.update(view)
            blocks.append(c.hexdigest())
        return whole.hexdigest(), blocks

    def _seal(self, conn: Any, names: list[str], *, note: Mapping[str, Any] | None,
              changes: Mapping[str, list[int]] | None) -> None:
        """Checksums of ``names`` into ``config.json`` and the catalogue; history; an empty
        journal. ``config.json`` goes first: if the process dies between the two, the journal
        is still there and the roll-back recomputes both."""
        sums = {n: self._checksums(n) for n in names}
        manifest_path = self.directory / "config.json"
        if manifest_path.exists() and names:
            m = Manifest.load(self.directory)
            for n, (whole, _blocks) in sums.items():
                rec = m.arrays.get(n)
                if rec is not None:
                    rec.checksum = whole
            if getattr(m, "data_digests", None):  # a change jasper made: not an edit by hand
                m.data_digests = m.compute_data_digests()
            m.dump(self.directory)
            _fsync_path(self.directory)
        with transaction(conn):
            for n, (whole, blocks) in sums.items():
                e = self.entries[n]
                conn.execute("UPDATE arrays SET checksum = ? WHERE name = ?",
                             (None if e.mutable and e.checksum is None else whole, n))
                conn.executemany("UPDATE array_blocks SET checksum = ? WHERE array = ? AND "
                                 "block = ?", [(c, n, i) for i, c in enumerate(blocks)])
            if changes is not None:
                conn.execute("INSERT INTO row_history (note, changes) VALUES (?, ?)",
                             (None if note is None else json.dumps(dict(note)),
                              json.dumps(dict(changes))))
            conn.execute("DELETE FROM row_journal")
        for n, (whole, _b) in sums.items():  # keep this process's view of the catalogue true
            e = self.entries[n]
            self.entries[n] = CatalogueEntry(e.name, e.file, e.dtype, e.storage_dtype, e.shape,
                                             e.data_offset, e.nbytes,
                                             e.checksum if e.checksum is None else whole,
                                             e.rows_per_block, e.mutable)


__all__ = ["LOCK_NAME", "PENDING_NAME", "ROWS_DDL", "RowStore", "RowWriteError"]
