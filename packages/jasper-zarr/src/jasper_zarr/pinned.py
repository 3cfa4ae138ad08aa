"""A local jasper-zarr group read through pinned descriptors, so a reader serves one version.

A local write commits by renaming a new directory over the old one and then deleting the old
one file by file (:func:`jasper.store.atomic_directory`). zarr's ``LocalStore`` opens every
object by path when it reads it, so a reader open across a commit would read some chunks of
the old version and some of the new. Instead:

- :class:`PinnedGroup` opens the dataset directory through core's
  :class:`jasper.files.DatasetDir` (one directory descriptor, the version's identity) and, at
  the same moment, a read-only descriptor of **every regular file of the group's tree**, each
  opened relative to its directory's descriptor with ``O_NOFOLLOW``. Only an open file
  survives the old version's deletion, so all of them are opened when the group is pinned, not
  on first read. After opening them it checks that the path still names the directory it
  opened; if a commit moved it aside meanwhile (its files may be half deleted), it pins the
  path again. A symbolic link, FIFO, device or socket anywhere in the tree is refused with
  :class:`~jasper.files.OutsideDatasetError`.
- :class:`PinnedStore` is a read-only zarr store over those descriptors (``pread``: no file
  offset, so any number of threads read one descriptor). Its listing is the tree as pinned.

Descriptors: one per file of the group, i.e. one per shard object (about 64 MiB each by default:
1,600 for 100 GB). The soft ``RLIMIT_NOFILE`` is raised towards the hard limit when a pin runs
out of descriptors. A forked child inherits the descriptors and goes on reading the same
version; a pickled :class:`PinnedGroup` travels as its path and the version's identity, and a
spawned process that finds another version at the path raises
:class:`~jasper.files.DatasetChangedError` instead of mixing the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype

from jasper.errors import StorageError
from jasper.files import (
    PIN_ATTEMPTS,
    DatasetChangedError,
    DatasetDir,
    Generation,
    OutsideDatasetError,
    names_directory,
)

_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0) | getattr(
    os, "O_NOFOLLOW", 0)
# O_NONBLOCK: a FIFO planted in the tree must not block the open (it is refused after fstat)
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


def _raise_fd_limit() -> bool:
    """Double the soft descriptor limit (up to the hard one); False when already at it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    new = soft * 2 if hard == resource.RLIM_INFINITY else min(hard, soft * 2)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        return False
    return True


def _open_at(name: str, flags: int, dir_fd: int, where: Path) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.EMFILE and _raise_fd_limit():
            return os.open(name, flags, dir_fd=dir_fd)
        if exc.errno == errno.EMFILE:
            raise StorageError(where, "out of file descriptors while pinning the zarr group "
                               "(one per shard object): raise `ulimit -n`, or rewrite the "
                               "dataset with larger shards (-o shard_bytes=...)",
                               exc.errno) from None
        raise


class PinnedGroup:
    """One local jasper-zarr group directory, pinned with every file of its tree (see the
    module docstring). :meth:`pin` opens it (once; again after unpickling)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files: DatasetDir | None = None
        self._fds: dict[str, int] = {}
        self._expected: Generation | None = None
        self._lock = threading.Lock()

    # --- pinning -----------------------------------------------------------------------------
    def pin(self) -> DatasetDir:
        """Pin the group now (no-op when pinned); returns the pinned directory."""
        files = self.files
        if files is not None:
            return files
        with self._lock:
            if self.files is None:
                self._pin()
            assert self.files is not None
            return self.files

    def _pin(self) -> None:
        for _attempt in range(PIN_ATTEMPTS):
            files = DatasetDir(self.path)
            generation = files.pin()  # DatasetNotFoundError when there is no directory
            if self._expected is not None and generation != self._expected:
                files.close()
                raise DatasetChangedError(
                    self.path, "the dataset was replaced by a new version after it was opened "
                    "(a writer committed to this path); open it again to read the new version")
            fds: dict[str, int] = {}
            try:
                self._open_tree(files.fd, "", fds)
            except BaseException:
                self._close_all(fds)
                files.close()
                raise
            # a replaced directory never comes back to the path: if the path still names it,
            # nothing had started deleting it while its files were being opened
            if names_directory(self.path, files.fd):
                self.files, self._fds, self._expected = files, fds, generation
                return
            self._close_all(fds)
            files.close()
        raise DatasetChangedError(
            self.path, f"the dataset was replaced {PIN_ATTEMPTS} times while it was being "
            "opened (a writer commits to this path in a loop); open it again later")

    def _open_tree(self, dir_fd: int, prefix: str, fds: dict[str, int]) -> None:
        for name in sorted(os.listdir(dir_fd)):
            key = prefix + name
            where = self.path / key
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted under us: only a directory being replaced loses files
            if stat.S_ISLNK(st.st_mode):
                raise OutsideDatasetError(
                    where, "is a symbolic link; jasper reads only regular files inside the "
                    "dataset directory (copy the file in)")
            if stat.S_ISDIR(st.st_mode):
                try:
                    sub = _open_at(name, _DIR_FLAGS, dir_fd, where)
                except FileNotFoundError:
                    continue
                try:
                    self._open_tree(sub, key + "/", fds)
                finally:
                    os.close(sub)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise OutsideDatasetError(where, "is not a regular file (a FIFO, device or "
                                          "socket); jasper reads only regular files inside "
                                          "the dataset directory")
            try:
                fd = _open_at(name, _FILE_FLAGS, dir_fd, where)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # swapped for a link between stat and open
                    raise OutsideDatasetError(where, "is a symbolic link; jasper reads only "
                                              "regular files inside the dataset directory"
                                              ) from None
                raise StorageError(where, f"cannot open: {exc.strerror}", exc.errno) from None
            fds[key] = fd
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutsideDatasetError(where, "is not a regular file; jasper reads only "
                                          "regular files inside the dataset directory")
            os.set_blocking(fd, True)

    # --- members -----------------------------------------------------------------------------
    def fd(self, key: str) -> int | None:
        """The pinned descriptor of object ``key`` (a ``/``-separated path in the group), or
        ``None`` when the pinned version has no such file."""
        self.pin()
        return self._fds.get(key)

    def names(self) -> list[str]:
        """Every file of the pinned tree, as zarr keys, sorted."""
        self.pin()
        return list(self._fds)

    def read_bytes(self, key: str) -> bytes | None:
        """The whole content of the pinned file ``key`` (``None`` when absent)."""
        fd = self.fd(key)
        if fd is None:
            return None
        return bytes(read_range(fd, 0, None))

    # --- life cycle --------------------------------------------------------------------------
    @staticmethod
    def _close_all(fds: dict[str, int]) -> None:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close every descriptor (a later use pins the path again, which must then hold the
        same version)."""
        with self._lock:
            fds, self._fds = self._fds, {}
            files, self.files = self.files, None
        self._close_all(fds)
        if files is not None:
            files.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "generation": self._expected}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
        self._expected = state["generation"]


def read_range(fd: int, start: int, stop: int | None) -> np.ndarray:
    """Bytes ``start:stop`` of the file open as ``fd`` (``stop=None``: to the end), read with
    ``preadv`` straight into one new array; shorter when the file is shorter."""
    size = os.fstat(fd).st_size
    stop = size if stop is None else min(stop, size)
    start = min(max(0, start), size)
    out = np.empty(max(0, stop - start), dtype=np.uint8)
    view = memoryview(out)
    got = 0
    while got < out.size:
        n = os.preadv(fd, [view[got:]], start + got)
        if n == 0:
            break  # truncated since fstat: the chunk's crc32c reports it
        got += n
    return out[:got]


def _byte_span(fd: int, byte_range: ByteRequest | None) -> tuple[int, int | None]:
    if byte_range is None:
        return 0, None
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, None
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, os.fstat(fd).st_size - byte_range.suffix), None
    raise TypeError(f"unexpected byte range {byte_range!r}")


class PinnedStore(Store):
    """A read-only zarr store serving the files of a :class:`PinnedGroup`."""

    supports_writes: bool = False
    supports_deletes: bool = False
    supports_listing: bool = True

    def __init__(self, group: PinnedGroup) -> None:
        super().__init__(read_only=True)
        self.group = group

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PinnedStore) and other.group is self.group

    def __hash__(self) -> int:
        return id(self.group)

    def __str__(self) -> str:
        return f"file://{self.group.path.as_posix()} (pinned)"

    def with_read_only(self, read_only: bool = False) -> PinnedStore:
        if not read_only:
            raise ValueError("a pinned jasper-zarr group is read-only")
        return PinnedStore(self.group)

    def _read(self, key: str, prototype: BufferPrototype,
              byte_range: ByteRequest | None) -> Buffer | None:
        fd = self.group.fd(key)
        if fd is None:
            return None
        start, stop = _byte_span(fd, byte_range)
        return prototype.buffer.from_array_like(read_range(fd, start, stop))

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        return await asyncio.to_thread(self._read, key, prototype, byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return self.group.fd(key) is not None

    async def getsize(self, key: str) -> int:
        fd = self.group.fd(key)
        if fd is None:
            raise FileNotFoundError(key)
        return os.fstat(fd).st_size

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:
        for key in self.group.names():
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self.group.names():
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        seen: set[str] = set()
        for key in self.group.names():
            if prefix and not key.startswith(prefix + "/"):
                continue
            child = (key[len(prefix) + 1:] if prefix else key).split("/")[0]
            if child not in seen:
                seen.add(child)
                yield child


__all__ = ["PinnedGroup", "PinnedStore", "read_range"]
