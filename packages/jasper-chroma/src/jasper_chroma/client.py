"""Chroma clients: one per process and location, fork-aware, with a single-writer lock.

Facts this module is built around (chromadb 1.5):

- a process forked after it used a client hangs on its next Chroma call (the Rust runtime's
  threads do not survive ``fork``); a spawned process works. So a forked child of a process
  that used Chroma is refused with :class:`ForkedClientError` before it can hang;
- a second client in one process with other settings raises, so every client here uses the
  same :data:`SETTINGS`;
- no model may be downloaded: every collection is opened with ``embedding_function=None`` and
  given embeddings explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jasper.errors import BackendError, FormatError, JasperError
from jasper_chroma.layout import ServerLocation

_LOCK = threading.Lock()
_CLIENTS: dict[tuple[int, str], Any] = {}
#: pid of this process once it has made a client; inherited by a forked child.
_USED_BY: int | None = None
#: the parent's pid when this process was forked from one that had used Chroma.
_FORKED_FROM: int | None = None


class ChromaStoreError(JasperError, ValueError):
    """A Chroma store is missing something (collection, id) or answered with an error."""


#: What a failed Chroma call of a local store most likely means, and what to do about it.
DAMAGED_STORE = ("the Chroma database (chroma.sqlite3) or an index file in this directory is "
                 "damaged; restore the dataset from a copy or write it again")
#: The same for a store on a server.
SERVER_FAILED = "check that the Chroma server is running and its store is intact"
#: Never turned into a ChromaStoreError: jasper's own errors, and the interpreter's exits.
_PASS_THROUGH = (JasperError, KeyboardInterrupt, SystemExit, GeneratorExit)


@contextlib.contextmanager
def chroma_errors(where: str, doing: str, advice: str = "") -> Iterator[None]:
    """Turn any failure of the Chroma calls inside into a :class:`ChromaStoreError`
    ``"{where}: {doing}: {type}: {message}; {advice}"`` (``doing`` says what failed, e.g.
    ``"reading collection 'x' failed"``).

    chromadb's Rust code panics on some damaged stores (a flipped byte in ``chroma.sqlite3``:
    ``Result::unwrap()`` on a column that is no longer UTF-8); pyo3 raises that as
    ``pyo3_runtime.PanicException``, a ``BaseException``, so ``except Exception`` misses it.
    jasper's own errors, Ctrl-C, ``sys.exit`` and a closed generator pass through unchanged.
    """
    try:
        yield
    except _PASS_THROUGH:
        raise
    except BaseException as exc:
        tail = f"; {advice}" if advice else ""
        raise ChromaStoreError(f"{where}: {doing}: {type(exc).__name__}: "
                               f"{str(exc)[:300]}{tail}") from None


class ForkedClientError(BackendError, RuntimeError):
    """This process was forked from one that had used Chroma: Chroma would hang here."""


class StoreLockedError(BackendError, RuntimeError):
    """Another writer holds the store's lock."""


def _after_fork_in_child() -> None:
    global _FORKED_FROM
    if _USED_BY is not None:
        _FORKED_FROM = _USED_BY
    _CLIENTS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def settings() -> Any:
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False, allow_reset=False)


def check_not_forked() -> None:
    """Raise :class:`ForkedClientError` in a child forked after its parent used Chroma."""
    if _FORKED_FROM is not None:
        raise ForkedClientError(
            f"this process (pid {os.getpid()}) was forked from pid {_FORKED_FROM} after that "
            "process used Chroma; Chroma's runtime does not survive fork and would hang. Start "
            "workers with the 'spawn' method (DataLoader(multiprocessing_context='spawn') or "
            "multiprocessing.get_context('spawn')), or preload the dataset (the default), "
            "which serves workers from memory")


def get_client(location: Path | ServerLocation) -> Any:
    """The process's client for a PersistentClient directory or a server (created lazily)."""
    global _USED_BY
    check_not_forked()
    key = (os.getpid(), str(location))
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            return client
        import chromadb

        where = location.url() if isinstance(location, ServerLocation) else str(location)
        with chroma_errors(where, "cannot connect to Chroma"):
            if isinstance(location, ServerLocation):
                client = chromadb.HttpClient(host=location.host, port=location.port,
                                             tenant=location.tenant, database=location.database,
                                             settings=settings())
                client.heartbeat()
            else:
                if not Path(location).is_dir():
                    raise FormatError(location, "the Chroma directory does not exist")
                client = chromadb.PersistentClient(path=str(location), settings=settings())
        _USED_BY = os.getpid()
        _CLIENTS[key] = client
        return client


def open_persistent(path: Path, where: str) -> Any:
    """A PersistentClient of this reader's own on ``path`` (a pinned ``/proc/self/fd/N/...``
    directory), not shared through the cache: the caller closes it."""
    global _USED_BY
    check_not_forked()
    import chromadb

    # e.g. SQLite cannot open the database of a version a commit is deleting
    with _LOCK, chroma_errors(where, "cannot open the Chroma directory",
                              DAMAGED_STORE):
        client = chromadb.PersistentClient(path=str(path), settings=settings())
        _USED_BY = os.getpid()
    return client


def release_client(location: Path | ServerLocation) -> None:
    """Close this process's client for ``location`` (before a directory is renamed)."""
    with _LOCK:
        client = _CLIENTS.pop((os.getpid(), str(location)), None)
    if client is not None and hasattr(client, "close"):
        # best effort; the data is already written (a panic of Chroma's is suppressed too)
        with contextlib.suppress(ChromaStoreError), chroma_errors("", "closing"):
            client.close()


class WriterLock:
    """An exclusive ``flock`` on ``LOCKFILE`` in a store directory: one writer at a time.

    Released when the process exits, however it exits, so a killed writer never blocks the
    next one.
    """

    def __init__(self, directory: Path, what: str = "Chroma store") -> None:
        self.path = Path(directory) / ".jasper-writer.lock"
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLockedError(
                f"{self.path.parent}: the {self.what} is being written by pid {holder}; "
                "Chroma directories allow one writer at a time. Wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def get_collection(client: Any, name: str, where: str, advice: str = "") -> Any:
    """An existing collection, never with an embedding function; a typed error naming the
    location and collection when it is missing or cannot be read (``advice`` says what to do
    then)."""
    with chroma_errors(where, f"opening collection {name!r} failed", advice):
        try:
            return client.get_collection(name, embedding_function=None)
        except Exception as exc:
            raise ChromaStoreError(f"{where}: collection {name!r} not found "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None
