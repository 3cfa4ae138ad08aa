"""Reading a dataset's files: one pinned directory, regular files inside it, handles per process.

Two helpers every reader uses (the idea follows xarray's ``CachingFileManager``: a handle is
opened lazily by the process that uses it, and the object pickles as what is needed to reopen it):

- :class:`DatasetDir` opens the dataset directory once (``O_DIRECTORY``) and opens every file
  *relative to that descriptor* (``openat``) with ``O_NOFOLLOW``. A writer that commits a new
  version of the dataset renames a new directory into place; a reader holding the descriptor keeps
  reading the generation it opened, file after file, and never mixes two versions. A member that
  is a symbolic link, a directory, a FIFO or anything but a regular file is refused with
  :class:`OutsideDatasetError` naming it, unless the user opts in with ``follow_links=True`` (the
  target must still be a regular file). Libraries that want a path (h5py, ``torch.load`` with
  ``mmap``) get ``/proc/self/fd/N`` of a descriptor opened this way, which names the same inode.
- :class:`ProcessLocal` holds a library handle (an h5py file, a zip archive, a SQLite connection)
  opened lazily in the process that reads, reopened after ``fork`` (library handles must not cross
  a fork), dropped on pickling.

A :class:`DatasetDir` pickles as its path plus the identity of its generation (the directory's
device and inode and the digest of its ``config.json``). A spawned worker reopens the path and
raises :class:`DatasetChangedError` if a different version is there now, rather than serving a
mix. A forked worker inherits the descriptor itself and keeps reading the same generation.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from jasper.atomic import hold_version
from jasper.errors import DatasetNotFoundError, FormatError, JasperError, UnsafeFileError

T = TypeVar("T")

MANIFEST_FILE = "config.json"

_HAVE_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
_PROC_FD = Path("/proc/self/fd")


#: how many times a reader re-opens a path whose directory was swapped while it was pinning it
PIN_ATTEMPTS = 50


def names_directory(path: Path, fd: int) -> bool:
    """Whether ``path`` (followed) still names the directory open as ``fd``: a reader that
    pinned a directory checks it afterwards, since a commit may have swapped it meanwhile."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


class OutsideDatasetError(UnsafeFileError):
    """A dataset member is not a regular file inside the dataset directory (a symbolic link, a
    directory, a device, a name with ``/`` or ``..``): by default jasper reads nothing else."""


class DatasetChangedError(JasperError):
    """The dataset at a path was replaced by a new version after a reader opened it (a worker
    that reopens the path finds a different generation). Open the dataset again."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def check_member_name(name: str, directory: str | Path = ".") -> str:
    """``name`` if it is a plain file name inside a directory (no ``/``, not ``.``/``..``, no
    NUL), else :class:`OutsideDatasetError`. Names come from manifests and catalogues, which an
    attacker may have written."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\x00" in name):
        raise OutsideDatasetError(
            directory, f"member name {name!r} is not a plain file name inside the dataset "
            "directory (rule: no '/', '..' or empty names)")
    return name


@dataclass(frozen=True)
class Generation:
    """Which version of a dataset a directory descriptor holds: the directory's device and inode
    (a commit renames a new directory into place) and the digest of its manifest (inodes are
    reused once an old version is deleted)."""

    device: int
    inode: int
    manifest_digest: str


def _version_part(manifest: bytes) -> bytes:
    """The bytes of ``config.json`` that identify a dataset version: all of it except the
    checksums of arrays whose rows change in place (``StoreReader.write_rows``, e.g. label
    updates) and the digests derived from them. A label update re-seals those checksums; it
    is the same version, and a worker opened before it must keep reading."""
    import json

    from jasper.schema import ALL_ARRAYS

    try:
        d = json.loads(manifest)
        arrays = d.get("arrays") if isinstance(d, dict) else None
        if not isinstance(arrays, dict) or not any(
                ALL_ARRAYS[n].mutable for n in arrays if n in ALL_ARRAYS):
            return manifest
        for name, rec in arrays.items():
            if name in ALL_ARRAYS and ALL_ARRAYS[name].mutable and isinstance(rec, dict):
                rec.pop("checksum", None)
        d.pop("data_digests", None)
        return json.dumps(d, sort_keys=True).encode()
    except (ValueError, RecursionError):
        return manifest  # not JSON: the raw bytes, and the manifest parser reports it


class DatasetDir:
    """One dataset directory, pinned: every member is opened relative to one directory
    descriptor (see the module docstring).

    ``follow_links=True`` lets members be symbolic links (to anywhere); they must still resolve
    to regular files. The descriptor opens on first use (or :meth:`pin`); it survives ``fork``.
    """

    def __init__(self, path: str | Path, *, follow_links: bool = False) -> None:
        self.path = Path(path)
        self.follow_links = follow_links
        self._fd: int | None = None
        self._pid: int | None = None
        self._generation: Generation | None = None
        #: read-only descriptors of the regular files present when the directory was pinned:
        #: a writer's commit moves this version aside and deletes it, and only an open file
        #: survives that, so members are opened with the directory, not on first read
        self._members: dict[str, int] = {}
        self._manifest_at_pin: bytes | None = None
        self._lock = threading.Lock()

    # --- the directory descriptor ------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The directory descriptor (opened on first use; raises if the generation changed
        since this object was pickled)."""
        fd = self._fd
        if fd is not None:
            return fd
        with self._lock:
            if self._fd is None:
                self._open_dir()
            assert self._fd is not None
            return self._fd

    def _open_dir(self) -> None:
        # A writer's commit swaps a new directory into place and then deletes the old one file by
        # file. A reader that opened the old directory just before the swap could list it while
        # it is being emptied and pin only part of it. So after opening the members, check that
        # the path still names the directory that was opened: a replaced directory never comes
        # back to the path, so if it is still there, nothing had started deleting it while its
        # members were being opened. Otherwise open the path again (the new version).
        for _attempt in range(PIN_ATTEMPTS):
            fd, gen, members, manifest = self._open_dir_once()
            if names_directory(self.path, fd):
                break
            self._close_fds([*members.values(), fd])
        else:
            raise DatasetChangedError(
                self.path, f"the dataset was replaced {PIN_ATTEMPTS} times while it was being "
                "opened (a writer commits to this path in a loop); open it again later")
        if self._generation is not None and gen != self._generation:
            self._close_fds([*members.values(), fd])
            raise DatasetChangedError(
                self.path, "the dataset was replaced by a new version after it was opened (a "
                "writer committed to this path); open it again to read the new version")
        self._fd, self._pid, self._generation = fd, os.getpid(), gen
        self._members, self._manifest_at_pin = members, manifest

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _open_dir_once(self) -> tuple[int, Generation, dict[str, int], bytes | None]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise DatasetNotFoundError(self.path) from None
        except NotADirectoryError:
            raise DatasetNotFoundError(self.path, hint="the path is a file, not a dataset "
                                       "directory") from None
        except OSError as exc:
            raise FormatError(self.path, f"cannot open the dataset directory: {exc.strerror}") \
                from None
        try:
            gen, manifest = self._identity(fd)
            members = self._open_members(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, gen, members, manifest

    def _open_members(self, dir_fd: int) -> dict[str, int]:
        members: dict[str, int] = {}
        if not _HAVE_DIR_FD:  # pragma: no cover - no openat: nothing to pin members with
            return members
        for name in os.listdir(dir_fd):
            # the manifest may be rewritten in place (a label update); it is read when needed
            if name == MANIFEST_FILE:
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue  # links, directories...: refused (or followed) when asked for
                members[name] = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
                                        | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
            except OSError:
                continue  # vanished or unreadable: opening it by name reports why
        return members

    def _identity(self, fd: int) -> tuple[Generation, bytes | None]:
        st = os.fstat(fd)
        digest, data = "", None
        try:
            data = self._read_member_at(fd, MANIFEST_FILE, limit=64 << 20)
            digest = hashlib.blake2b(_version_part(data), digest_size=16).hexdigest()
        except (DatasetNotFoundError, FormatError):
            pass  # no manifest (yet): the directory identity alone
        return Generation(st.st_dev, st.st_ino, digest), data

    @property
    def manifest_at_pin(self) -> bytes | None:
        """The bytes of the manifest as the pinned directory held it when it was pinned (None
        without one): it describes the pinned members even after a commit has deleted the
        pinned version's files by name."""
        self.pin()
        return self._manifest_at_pin

    def pin(self) -> Generation:
        """Open the directory now (the generation this object reads from then on)."""
        _ = self.fd
        assert self._generation is not None
        return self._generation

    @property
    def generation(self) -> Generation:
        return self.pin()

    def hold(self) -> bool:
        """Keep this version from being deleted by a commit that replaces it while the
        descriptor is open (:func:`jasper.atomic.hold_version`): for readers whose libraries
        open files by name after the dataset was opened. False when a writer is deleting this
        version already: open the path again."""
        return hold_version(self.fd)

    def close(self) -> None:
        """Close the directory descriptor (files and maps opened through it stay valid)."""
        with self._lock:
            fd, self._fd = self._fd, None
            members, self._members = self._members, {}
            if self._pid == os.getpid():
                for member_fd in [*members.values(), *([fd] if fd is not None else [])]:
                    with contextlib.suppress(OSError):
                        os.close(member_fd)
            # in a forked child the descriptor is a copy of the parent's; closing the copy is
            # harmless, but forget it either way so that nothing here uses it again

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "follow_links": self.follow_links,
                "generation": self._generation}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], follow_links=state["follow_links"])  # type: ignore[misc]
        self._generation = state["generation"]

    # --- members -------------------------------------------------------------------------------
    def member(self, name: str) -> Path:
        """The path of member ``name`` (for messages)."""
        return self.path / name

    def open_fd(self, name: str, flags: int = os.O_RDONLY) -> int:
        """A descriptor of member ``name`` of the pinned directory; the caller closes it.

        Refuses (``OutsideDatasetError``) symbolic links unless ``follow_links``, and anything
        that is not a regular file; a missing member is :class:`DatasetNotFoundError`.
        """
        dir_fd = self.fd
        pinned = self._members.get(name)
        if pinned is not None and flags == os.O_RDONLY and _PROC_FD.is_dir():
            # a new open file description of the pinned file (its own offset), even if the
            # name has been deleted since
            try:
                return os.open(f"{_PROC_FD}/{pinned}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # e.g. closed by another thread's close(): open it by name
        return self._open_member_at(dir_fd, name, flags)

    def _open_member_at(self, dir_fd: int, name: str, flags: int) -> int:
        check_member_name(name, self.path)
        where = self.path / name
        nofollow = 0 if self.follow_links else getattr(os, "O_NOFOLLOW", 0)
        # O_NONBLOCK: opening a FIFO planted under a member's name must not block the reader
        flags |= os.O_CLOEXEC | nofollow | (os.O_NONBLOCK if flags & 3 == os.O_RDONLY else 0)
        try:
            if _HAVE_DIR_FD:
                fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
            else:  # pragma: no cover - platforms without openat: by path (no pinning)
                fd = os.open(where, flags, 0o644)
        except FileNotFoundError:
            raise DatasetNotFoundError(where, "dataset file") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and nofollow):
                raise OutsideDatasetError(
                    where, "is a symbolic link; jasper reads only regular files inside the "
                    "dataset directory (copy the file in, or open with follow_links=True to "
                    "trust links)") from None
            if exc.errno == errno.EISDIR:
                raise OutsideDatasetError(where, "is a directory, expected a regular file "
                                          "(rule: dataset members are regular files)") from None
            raise FormatError(where, f"cannot open: {exc.strerror} (errno {exc.errno})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise OutsideDatasetError(where, f"is {kind}; jasper reads only regular files "
                                          "inside the dataset directory")
            if flags & os.O_NONBLOCK:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_file(self, name: str) -> IO[bytes]:
        """Member ``name`` as a binary file object (read-only); the caller closes it."""
        return os.fdopen(self.open_fd(name), "rb")

    @contextlib.contextmanager
    def path_for(self, name: str) -> Iterator[str]:
        """A path string naming exactly the pinned member ``name`` while the block runs, for
        libraries that open files by name (``/proc/self/fd/N`` on Linux; the plain path where
        there is no ``/proc``). What the library opened stays valid after the block."""
        fd = self.open_fd(name)
        try:
            yield self.fd_path(fd, name)
        finally:
            os.close(fd)

    def fd_path(self, fd: int, name: str) -> str:
        """The path string for an open descriptor ``fd`` of member ``name``."""
        if _PROC_FD.is_dir():
            return f"{_PROC_FD}/{fd}"
        return str(self.path / name)  # pragma: no cover - no /proc: unpinned, but still checked

    def read_bytes(self, name: str, *, limit: int | None = None) -> bytes:
        """The whole content of a (small) member; ``limit`` bytes at most."""
        return self._read_member_at(self.fd, name, limit=limit)

    def _read_member_at(self, dir_fd: int, name: str, *, limit: int | None) -> bytes:
        fd = self._open_member_at(dir_fd, name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise FormatError(self.path / name, f"is {size} bytes, more than the {limit} "
                                  "this kind of file may have")
            parts = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def size(self, name: str) -> int:
        """Bytes of member ``name`` (after the same checks as :meth:`open_fd`)."""
        fd = self.open_fd(name)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        """Whether a member of that name exists (any kind: opening it still checks it)."""
        check_member_name(name, self.path)
        try:
            if _HAVE_DIR_FD:
                os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            else:  # pragma: no cover
                os.lstat(self.path / name)
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return True

    def listdir(self) -> list[str]:
        """Names in the pinned directory."""
        return sorted(os.listdir(self.fd) if _HAVE_DIR_FD else os.listdir(self.path))


class ProcessLocal(Generic[T]):
    """A library handle opened lazily by ``opener`` in the process that uses it.

    After a ``fork`` the inherited handle is never used again, not even closed (closing is a use:
    SQLite and HDF5 forbid it); it is kept referenced so garbage collection cannot close it
    either, and a fresh one is opened. Pickling drops the handle (the opener travels, so it must
    be picklable: a bound method of a picklable reader is).
    """

    _inherited: list[Any] = []

    def __init__(self, opener: Callable[[], T], closer: Callable[[T], None] | None = None) -> None:
        self.opener = opener
        self.closer = closer
        self._handle: T | None = None
        self._pid: int | None = None
        self._lock = threading.RLock()

    def get(self) -> T:
        """This process's handle (opened now if needed)."""
        pid = os.getpid()
        h = self._handle
        if h is not None and self._pid == pid:
            return h
        if self._pid is not None and self._pid != pid:
            # first use after a fork: forget (but keep alive) the parent's handle; the parent's
            # lock may have been held by another thread at fork time
            if self._handle is not None:
                ProcessLocal._inherited.append(self._handle)
            self._handle, self._pid = None, None
            self._lock = threading.RLock()
        with self._lock:
            if self._handle is None:
                self._handle = self.opener()
                self._pid = pid
            return self._handle

    @property
    def is_open(self) -> bool:
        return self._handle is not None and self._pid == os.getpid()

    def close(self) -> None:
        """Close this process's handle (an inherited one is only forgotten)."""
        h, self._handle = self._handle, None
        if h is not None:
            if self._pid == os.getpid():
                if self.closer is not None:
                    with contextlib.suppress(Exception):
                        self.closer(h)
            else:
                ProcessLocal._inherited.append(h)
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"opener": self.opener, "closer": self.closer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["opener"], state["closer"])  # type: ignore[misc]


__all__ = [
    "PIN_ATTEMPTS",
    "DatasetChangedError",
    "DatasetDir",
    "Generation",
    "OutsideDatasetError",
    "ProcessLocal",
    "check_member_name",
    "names_directory",
]
