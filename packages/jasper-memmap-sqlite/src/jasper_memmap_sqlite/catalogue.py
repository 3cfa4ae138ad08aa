"""The SQLite side: connections done right, and the array catalogue.

SQLite rules this module enforces (docs/design.md#sqlite):

- every connection turns ``PRAGMA foreign_keys=ON`` (SQLite leaves them off per connection);
- databases jasper creates use the WAL journal with ``synchronous=FULL`` (WAL with NORMAL may
  roll back the last commits on power loss);
- every write runs inside an explicit transaction (:func:`transaction`);
- one connection per process: :class:`ProcessConnection` remembers the pid that opened it and
  opens a fresh one in a forked child, never touching (not even closing) the inherited handle,
  because SQLite forbids using a connection across ``fork``.

The catalogue (tables ``arrays`` and ``array_blocks``) records for every ``.npy`` file its logical
and storage dtype, shape, where the data starts, the xxh3 checksum of the data and one checksum per
block of rows, so a deep check names the damaged rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jasper.dtypes import STORAGE_NUMPY
from jasper.errors import DatasetNotFoundError, FormatError
from jasper.files import DatasetDir, check_member_name
from jasper.manifest import Checksummer
from jasper_memmap_sqlite.npy import NpyHeader, Written, pread_into, read_header

SQLITE_MAGIC = b"SQLite format 3\x00"
#: A catalogue larger than this is not one jasper wrote (a 100 GB array needs ~2 MB of rows).
MAX_CATALOGUE_BYTES = 1 << 30

CATALOGUE_DDL = """
CREATE TABLE IF NOT EXISTS jasper_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS arrays (
    name TEXT PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    dtype TEXT NOT NULL,
    storage_dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data_offset INTEGER NOT NULL CHECK (data_offset >= 0),
    nbytes INTEGER NOT NULL CHECK (nbytes >= 0),
    checksum TEXT,
    rows_per_block INTEGER NOT NULL CHECK (rows_per_block > 0),
    mutable INTEGER NOT NULL DEFAULT 0 CHECK (mutable IN (0, 1))
);
CREATE TABLE IF NOT EXISTS array_blocks (
    array TEXT NOT NULL REFERENCES arrays(name) ON DELETE CASCADE,
    block INTEGER NOT NULL CHECK (block >= 0),
    checksum TEXT NOT NULL,
    PRIMARY KEY (array, block)
) WITHOUT ROWID;
"""

#: Connections a forked child inherited. They are kept referenced so that garbage collection
#: never closes them in the child: closing is a use, and SQLite forbids using them after fork.
_INHERITED: list[sqlite3.Connection] = []


def check_sqlite_file(path: Path) -> None:
    """Raise a typed error unless ``path`` starts with the SQLite file header."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise DatasetNotFoundError(path, "SQLite database") from None
    if head != SQLITE_MAGIC:
        raise FormatError(
            path, f"not a SQLite database: the file starts with {head[:16]!r}, not "
            f"{SQLITE_MAGIC!r} (rule: SQLite file header)")


def connect(path: Path, *, readonly: bool, create: bool = False) -> sqlite3.Connection:
    """Open ``path`` with foreign keys on and explicit transactions (autocommit off in SQLite's
    sense is managed by :func:`transaction`, so Python's implicit BEGINs are disabled)."""
    if not create:
        check_sqlite_file(path)
    quoted = urllib.parse.quote(str(Path(path).absolute()))
    mode = "ro" if readonly else ("rwc" if create else "rw")
    try:
        conn = _open(f"file:{quoted}?mode={mode}")
    except sqlite3.OperationalError:
        if not readonly:
            raise
        # A WAL database on a read-only medium cannot create its -shm file; immutable=1 reads it
        # without locking, which is safe exactly because nobody can write there.
        conn = _open(f"file:{quoted}?mode=ro&immutable=1")
    try:
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        if create:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise FormatError(path, f"SQLite cannot read this database (rule: readable SQLite "
                          f"file): {exc}") from None
    return conn


def connect_pinned(files: DatasetDir, name: str) -> sqlite3.Connection:
    """A read-only in-memory copy of database ``name`` of a pinned dataset directory.

    The catalogue of a committed dataset is small and never changes, so reading its bytes once
    through the pinned directory (``sqlite3.Connection.deserialize``) gives the reader exactly
    the generation it opened, no lock or ``-shm`` file, and damaged pages surface as
    :class:`FormatError` here. A database with a non-empty write-ahead log beside it (being
    written) is opened by path instead.
    """
    where = files.member(name)
    wal = f"{name}-wal"
    if files.exists(wal) and files.size(wal) > 0:
        return connect(where, readonly=True)
    data = bytearray(files.read_bytes(name, limit=MAX_CATALOGUE_BYTES))
    if bytes(data[:16]) != SQLITE_MAGIC:
        raise FormatError(where, f"not a SQLite database: the file starts with {bytes(data[:16])!r}"
                          f", not {SQLITE_MAGIC!r} (rule: SQLite file header)")
    if data[18:20] == b"\x02\x02":
        data[18:20] = b"\x01\x01"  # WAL mode needs a -shm file; the log is empty
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    try:
        conn.deserialize(bytes(data))
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA query_only=ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise FormatError(where, f"SQLite cannot read this database (rule: readable SQLite "
                          f"file): {exc}") from None
    return conn


def _open(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0,
                           check_same_thread=False)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class ProcessConnection:
    """One SQLite connection per process, opened lazily, reopened after ``fork``.

    Pickles as its path only, so it travels to spawned DataLoader workers; a thread lock makes
    the one connection safe to share between threads of a process.
    """

    def __init__(self, path: Path, *, readonly: bool) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self.lock = threading.RLock()

    def get(self) -> sqlite3.Connection:
        pid = os.getpid()
        if self._conn is not None and self._pid == pid:
            return self._conn
        if self._conn is not None:
            _INHERITED.append(self._conn)
            self.lock = threading.RLock()  # the parent's lock may have been held at fork time
        self._conn = connect(self.path, readonly=self.readonly)
        self._pid = pid
        return self._conn

    @contextlib.contextmanager
    def use(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, held under the thread lock."""
        conn = self.get()
        with self.lock:
            yield conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        elif self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "readonly": self.readonly}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], readonly=state["readonly"])  # type: ignore[misc]


def existing_tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def require_tables(conn: sqlite3.Connection, path: Path, tables: tuple[str, ...],
                   what: str) -> None:
    """Raise :class:`FormatError` naming the first missing table."""
    have = existing_tables(conn)
    for t in tables:
        if t not in have:
            raise FormatError(
                path, f"table {t!r} is missing (rule: a {what} holds the tables "
                f"{', '.join(tables)}; found: {', '.join(sorted(have)) or 'none'})")


def sqlite_checks(conn: sqlite3.Connection, path: Path) -> list[str]:
    """``PRAGMA integrity_check`` and ``PRAGMA foreign_key_check``, as problem strings."""
    problems = []
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    if rows != ["ok"]:
        problems += [f"{path}: integrity_check: {r}" for r in rows]
    for table, rowid, parent, _fk in conn.execute("PRAGMA foreign_key_check"):
        problems.append(f"{path}: table {table!r} row {rowid} refers to a missing row of "
                        f"{parent!r} (rule: foreign_key_check)")
    return problems


# --- the array catalogue ------------------------------------------------------------------------
@dataclass(frozen=True)
class CatalogueEntry:
    """One row of the ``arrays`` table."""

    name: str
    file: str
    dtype: str
    storage_dtype: np.dtype
    shape: tuple[int, ...]
    data_offset: int
    nbytes: int
    checksum: str | None
    rows_per_block: int
    mutable: bool

    def header(self) -> NpyHeader:
        return NpyHeader(self.storage_dtype, self.shape, self.data_offset)


def insert_array(conn: sqlite3.Connection, name: str, logical: str, w: Written, *,
                 mutable: bool = False) -> None:
    conn.execute(
        "INSERT INTO arrays (name, file, dtype, storage_dtype, shape, data_offset, nbytes, "
        "checksum, rows_per_block, mutable) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (name, w.file, logical, np.lib.format.dtype_to_descr(w.storage_dtype),
         json.dumps(list(w.shape)), w.offset, w.nbytes, None if mutable else w.checksum,
         w.rows_per_block, int(mutable)))
    conn.executemany("INSERT INTO array_blocks (array, block, checksum) VALUES (?, ?, ?)",
                     [(name, i, c) for i, c in enumerate(w.blocks)])


def load_catalogue(conn: sqlite3.Connection, path: Path) -> dict[str, CatalogueEntry]:
    """Every row of ``arrays``, checked for well-formedness."""
    out: dict[str, CatalogueEntry] = {}
    query = ("SELECT rowid, name, file, dtype, storage_dtype, shape, data_offset, nbytes, checksum,"
             " rows_per_block, mutable FROM arrays ORDER BY rowid")
    for rowid, name, file, dtype, sdt, shape, off, nbytes, cks, rpb, mut in conn.execute(query):
        try:
            shp = tuple(int(s) for s in json.loads(shape))
            storage = np.dtype(np.lib.format.descr_to_dtype(sdt))
            if dtype not in STORAGE_NUMPY or STORAGE_NUMPY[dtype] != storage:
                raise ValueError(f"logical dtype {dtype!r} is not stored as {sdt!r}")
            check_member_name(file, path.parent)
            if any(s < 0 for s in shp) or int(off) < 0 or int(nbytes) < 0:
                raise ValueError("shape, data_offset and nbytes must not be negative")
            if int(rpb) < 1:
                raise ValueError(f"rows_per_block is {rpb}, must be at least 1")
        except (ValueError, TypeError, RecursionError) as exc:
            raise FormatError(path, f"arrays row {rowid} ({name!r}) is malformed (rule: "
                              f"catalogue row): {exc}", array=name) from None
        out[name] = CatalogueEntry(name, file, dtype, storage, shp, int(off), int(nbytes), cks,
                                   int(rpb), bool(mut))
    return out


def block_checksums(conn: sqlite3.Connection, name: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT checksum FROM array_blocks WHERE array = ? ORDER BY block", (name,))]


def check_entry_file(directory: Path, e: CatalogueEntry) -> list[str]:
    """The file of ``e`` against its catalogue row: present, same header, long enough."""
    f = directory / e.file
    if not f.is_file():
        return [f"{f}: file of array {e.name!r} is missing (rule: every catalogued array has "
                "its file)"]
    try:
        h = read_header(f, e.name)
    except FormatError as exc:
        return [str(exc)]
    problems = []
    if h.dtype != e.storage_dtype or h.shape != e.shape or h.offset != e.data_offset:
        problems.append(
            f"{f}: header says {h.dtype.str} {h.shape} at offset {h.offset}, the catalogue "
            f"{e.storage_dtype.str} {e.shape} at {e.data_offset} (rule: header matches catalogue)")
        return problems
    size = f.stat().st_size
    if size < e.data_offset + e.nbytes:
        row_bytes = max(1, h.row_bytes)
        complete = max(0, size - e.data_offset) // row_bytes
        problems.append(f"{f}: {size} bytes hold {complete} complete rows of {e.shape[0]}; row "
                        f"{complete} is cut short (rule: file size covers the recorded shape)")
    return problems


def verify_blocks(directory: Path, e: CatalogueEntry, blocks: list[str]) -> list[str]:
    """Recompute every block checksum (and the whole-array one) of ``e``'s data."""
    f = directory / e.file
    h = e.header()
    n_rows = e.shape[0] if e.shape else 1
    rpb = e.rows_per_block
    expected_blocks = -(-n_rows // rpb) if n_rows else 0
    problems = []
    if len(blocks) != expected_blocks:
        problems.append(f"{f}: the catalogue holds {len(blocks)} block checksums for "
                        f"{expected_blocks} blocks of {rpb} rows (rule: one checksum per block)")
    whole = Checksummer()
    buf = np.empty(rpb * h.row_bytes, dtype=np.uint8)
    for b in range(expected_blocks):
        start = b * rpb
        stop = min(n_rows, start + rpb)
        view = buf[: (stop - start) * h.row_bytes]
        pread_into(f, e.data_offset + start * h.row_bytes, memoryview(view), array=e.name)
        c = Checksummer()
        c.update(view)
        whole.update(view)
        if b < len(blocks) and c.hexdigest() != blocks[b]:
            problems.append(f"{f}: rows {start}..{stop - 1} of {e.name!r} do not match their "
                            f"block checksum {blocks[b]} (rule: block checksum; the data changed "
                            "or was corrupted after it was written)")
    if e.checksum is not None and whole.hexdigest() != e.checksum:
        problems.append(f"{f}: checksum {whole.hexdigest()} of {e.name!r} differs from the "
                        f"catalogue's {e.checksum} (rule: array checksum)")
    return problems
