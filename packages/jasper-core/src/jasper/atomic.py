"""Atomic, race-checked replacement of a dataset directory.

A write fills a temporary directory beside the target and commits it with one rename:

- a new target is committed with ``renameat2(RENAME_NOREPLACE)``: if another writer created the
  target meanwhile, this commit fails with :class:`~jasper.errors.ConcurrentWriteError` instead of
  replacing the other writer's dataset;
- an existing dataset is swapped with ``renameat2(RENAME_EXCHANGE)``: the target path always names
  one complete dataset, and the old one (now under the temporary name) is removed only after the
  new one is in place. What is swapped out must be what was checked at the start (directory and
  manifest identity); anything else is swapped back and the write fails;
- where ``renameat2`` is missing (not Linux, old libc, a file system without the flags) the swap is
  two renames through a trash directory. A crash between them leaves the old dataset complete in
  the trash; :func:`recover_interrupted_commit` (run by the next write and the next open) moves it
  back.

Overwrite replaces only a jasper dataset: a real directory (not a symlink) holding a dataset
marker as a regular file, that neither contains nor lies inside a protected path (the source of a
conversion). Everything else is an :class:`~jasper.errors.OverwriteRefusedError`.

Every temporary name carries the writer's pid, so :func:`clean_leftovers` removes only what dead
writers left.

An old version is deleted only when no reader holds it. A reader that must open files by name
after it opened the dataset (Chroma's SQLite opens new connections by path, through
``/proc/self/fd/N``) calls :func:`hold_version` on its directory descriptor: a shared ``flock``.
The commit takes an exclusive one (never waiting) before deleting; when a reader holds the old
version it is renamed to a held name instead, and the first write after the last such reader
closes removes it (:func:`clean_leftovers`). A held version is never restored as the dataset.

``JASPER_NO_RENAMEAT2=1`` forces the two-rename fallback (the tests run both ways).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jasper.errors import (
    ConcurrentWriteError,
    DatasetExistsError,
    JasperError,
    OverwriteRefusedError,
    StorageError,
)
from jasper.interrupts import checkpoint

#: Name part of a write's temporary directory: ``.<target>.jasper-tmp-<pid>-<hex>``.
TMP_MARK = ".jasper-tmp-"
#: Name part of an old dataset moved aside by the two-rename fallback.
TRASH_MARK = ".jasper-old-"
#: Name part of an old version a reader still held when its replacement was committed.
HELD_MARK = ".jasper-held-"
#: Name part of a writer's scratch space (e.g. synth's memory-mapped pair arrays).
SCRATCH_MARK = ".jasper-scratch-"
#: Files whose presence (as a regular file) makes a directory a dataset jasper may replace:
#: the manifest of a jasper dataset, the catalogue of a cluster-labeled dataset.
DATASET_MARKERS: tuple[str, ...] = ("config.json", "dataset.db")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _load_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the call or the flag is unsupported (the
    caller falls back), ``OSError`` for a real failure (``EEXIST`` for a taken target)."""
    if _renameat2_fn is None or os.environ.get("JASPER_NO_RENAMEAT2"):
        return False
    rc = _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)  # type: ignore[operator]
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _between_renames() -> None:
    """Called between the two renames of the fallback swap (a crash point tests exercise)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts as
    alive). Writers and readers leave their pid in names and records; only a dead one's
    leftovers may be cleaned."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_pid(p: Path, prefix: str) -> int | None:
    try:
        return int(p.name[len(prefix):].split("-")[0])
    except ValueError:
        return None


def _dead_writers(target: Path, mark: str) -> list[Path]:
    """Directories named for ``target`` with ``mark`` whose writer (another process) is dead."""
    prefix = f".{target.name}{mark}"
    found = []
    for p in sorted(target.parent.glob(f"{prefix}*")):
        pid = _leftover_pid(p, prefix)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        found.append(p)
    return found


def is_dataset_dir(path: Path, markers: Iterable[str] = DATASET_MARKERS) -> bool:
    """True for a real directory (not a symlink) holding one of ``markers`` as a regular file."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    for m in markers:
        try:
            if stat.S_ISREG(os.lstat(path / m).st_mode):
                return True
        except OSError:
            continue
    return False


def recover_interrupted_commit(target: str | Path,
                               markers: Iterable[str] = DATASET_MARKERS) -> Path | None:
    """Move back the old dataset a writer that died mid-swap left in the trash.

    Only when nothing is at ``target``; returns the restored path or None.
    """
    target = Path(os.path.abspath(target))
    if os.path.lexists(target) or not target.parent.is_dir():
        return None
    markers = tuple(markers)
    for trash in sorted(_dead_writers(target, TRASH_MARK), key=lambda p: p.stat().st_mtime,
                        reverse=True):
        if is_dataset_dir(trash, markers):
            try:
                _rename_noreplace(trash, target)
            except FileExistsError:
                return None
            _fsync_dir(target.parent)
            return target
    return None


def clean_leftovers(target: str | Path) -> list[Path]:
    """Restore an interrupted swap's old dataset, then remove temporary, trash and scratch
    directories of ``target`` whose writer is dead, and old versions no reader holds any more.
    Returns what was removed."""
    target = Path(os.path.abspath(target))
    if not target.parent.is_dir():
        return []
    recover_interrupted_commit(target)
    removed: list[Path] = []
    for mark in (TRASH_MARK, TMP_MARK, SCRATCH_MARK):
        for p in _dead_writers(target, mark):
            if remove_unless_held(p):
                removed.append(p)
    # a held old version is complete and no writer's work: whoever wrote it, it goes as soon
    # as no reader holds it
    for p in sorted(target.parent.glob(f".{target.name}{HELD_MARK}*")):
        if remove_unless_held(p):
            removed.append(p)
    return removed


def hold_version(fd: int) -> bool:
    """Keep the dataset version open on directory descriptor ``fd`` from being deleted by a
    commit that replaces it, for as long as the descriptor (or a duplicate, or a forked child's
    copy) stays open: a shared ``flock``. False when a writer is deleting that version already
    (open the path again: it names the new one). Where the file system has no locks it returns
    True and holds nothing."""
    return _try_lock(fd, fcntl.LOCK_SH)


def _try_lock(fd: int, kind: int) -> bool:
    """``flock(fd, kind)`` without waiting: False when another holder conflicts; True when
    taken, or when the file system has no locks (nothing is held then)."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def remove_unless_held(path: Path) -> bool:
    """Delete the directory ``path`` unless a reader holds it (:func:`hold_version`); True when
    it was deleted. The exclusive lock is kept while deleting, so a reader that opens ``path``
    meanwhile cannot hold a half-deleted version."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return not os.path.lexists(path)
    try:
        if not _try_lock(fd, fcntl.LOCK_EX):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _retire(old: Path, target: Path) -> None:
    """Delete the old version a commit replaced, or, while a reader holds it, rename it to a
    held name: never restored as the dataset, removed by the first write after its readers."""
    if remove_unless_held(old):
        return
    with contextlib.suppress(OSError):
        os.rename(old, leftover_name(target, HELD_MARK))


def leftover_name(target: Path, mark: str) -> Path:
    """A fresh directory name beside ``target`` that :func:`clean_leftovers` recognises."""
    return target.parent / f".{target.name}{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class _Identity:
    """What was at the target when the write started (directory and marker inodes)."""

    dev: int
    ino: int
    marker: tuple[int, int, int] | None


def _identity(path: Path, markers: Iterable[str]) -> _Identity | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    marker = None
    for m in markers:
        try:
            ms = os.lstat(path / m)
        except OSError:
            continue
        marker = (ms.st_ino, ms.st_size, ms.st_mtime_ns)
        break
    return _Identity(st.st_dev, st.st_ino, marker)


def check_target(target: Path, *, overwrite: bool, protect: Iterable[str | Path] = (),
                 markers: Iterable[str] = DATASET_MARKERS) -> _Identity | None:
    """Refuse a target jasper must not write, and record the identity of what a commit may
    replace (None for a new target)."""
    markers = tuple(markers)
    real = Path(os.path.realpath(target))
    for p in protect:
        rp = Path(os.path.realpath(p))
        if real == rp or real.is_relative_to(rp) or rp.is_relative_to(real):
            raise OverwriteRefusedError(
                f"{target} {'is' if real == rp else 'contains' if rp.is_relative_to(real) else 'lies inside'} "
                f"the source {p}; write to a path outside the source")
    if not os.path.lexists(target):
        return None
    if not overwrite:
        raise DatasetExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.islink(target):
        raise OverwriteRefusedError(
            f"{target} is a symlink (to {os.readlink(target)}); jasper does not replace what a "
            "link points to: remove the link or write to the real path")
    if not is_dataset_dir(target, markers):
        raise OverwriteRefusedError(
            f"{target} exists but is not a dataset (no {' or '.join(markers)}); --overwrite "
            "replaces only datasets, never other files: choose a new path or remove it yourself")
    return _identity(target, markers)


def allocate_file(path: Path) -> None:
    """Allocate a memory-mapped scratch file's blocks now: a full disk is then an ``OSError``
    (ENOSPC) here instead of a SIGBUS on the first write into a page that has no block."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def require_free_space(path: Path, need: int, what: str) -> None:
    """Raise :class:`StorageError` (ENOSPC) naming ``path`` when the file system that will hold
    it has fewer than ``need`` bytes free: for writers whose library fails badly half-way
    through a full disk, checked before the write starts."""
    if not hasattr(os, "statvfs"):  # pragma: no cover - not POSIX
        return
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise StorageError(path, f"no space left on the device: writing {what} needs about "
                           f"{need:,} bytes and {free:,} are free; free space there or write "
                           "elsewhere", errno.ENOSPC)


class FreeSpaceGuard:
    """Free-space checks as a write goes, for writes whose size is known only then (compressed
    output) through a library that fails badly when the disk fills half-way (h5py's close can
    crash). Before each part is written, :meth:`require` raises the :class:`StorageError` of
    :func:`require_free_space` unless the file system holding ``path`` has room for the part:
    its uncompressed bytes (a compressor's output is no bigger, but for ``growth``: what a
    filter adds to incompressible data, and the index entries of the part's chunks), plus
    ``slack`` (the writer's metadata), plus what the writer may hold unwritten from earlier
    parts: at most ``buffered`` bytes (its cache) and at most what was handed to it so far.
    So the disk never fills under the library: the write stops with a typed error first."""

    def __init__(self, path: Path, slack: int, buffered: int = 0, growth: float = 1 / 64) -> None:
        self.path = path
        self.slack = slack
        self.buffered = buffered
        self.growth = growth
        self.submitted = 0  # uncompressed bytes of the parts already required

    def require(self, nbytes: int, what: str) -> None:
        """Raise :class:`StorageError` (ENOSPC) unless writing ``nbytes`` more uncompressed
        bytes (``what``, for the message) cannot fill the disk; then count them as handed on."""
        held = min(self.buffered, self.submitted)
        need = int((nbytes + held) * (1 + self.growth)) + self.slack
        require_free_space(self.path, need, what)
        self.submitted += nbytes


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory``."""
    for root, _dirs, files in os.walk(directory):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising ``FileExistsError`` if ``dst`` exists (atomically
    where renameat2 works; otherwise ``rename`` still refuses a non-empty directory)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _raced(target: Path) -> ConcurrentWriteError:
    return ConcurrentWriteError(
        f"{target} was written by another writer while this write ran; this write was not "
        "committed and the other dataset is intact (run one writer per target)")


def commit(tmp: Path, target: Path, expected: _Identity | None,
           markers: Iterable[str] = DATASET_MARKERS) -> None:
    """Put the complete directory ``tmp`` at ``target``, replacing only ``expected``."""
    markers = tuple(markers)
    if expected is None:
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            raise _raced(target) from None
        _fsync_dir(target.parent)
        return
    if _identity(target, markers) != expected:
        raise _raced(target)
    if _renameat2(tmp, target, _RENAME_EXCHANGE):
        if _identity(tmp, markers) != expected:  # another commit slipped in: put it back
            _renameat2(tmp, target, _RENAME_EXCHANGE)
            raise _raced(target)
        _fsync_dir(target.parent)
        _retire(tmp, target)  # the old dataset; the new one is in place
        return
    _commit_two_renames(tmp, target, expected, markers)


def _commit_two_renames(tmp: Path, target: Path, expected: _Identity,
                        markers: tuple[str, ...]) -> None:
    trash = leftover_name(target, TRASH_MARK)
    try:
        os.rename(target, trash)
    except FileNotFoundError:  # another writer is between its own two renames
        raise _raced(target) from None
    if _identity(trash, markers) != expected:  # another writer's dataset: put it back
        _rename_noreplace(trash, target)
        raise _raced(target)
    _between_renames()
    try:
        _rename_noreplace(tmp, target)
    except FileExistsError:
        raise _raced(target) from None  # the other writer's dataset is at target
    _fsync_dir(target.parent)
    _retire(trash, target)


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False,
                     protect: Iterable[str | Path] = (),
                     markers: Iterable[str] = DATASET_MARKERS) -> Iterator[Path]:
    """Build a directory atomically: yields a fresh temporary directory beside ``target``; when
    the block ends without an exception every file in it is fsynced and it is committed in one
    atomic step (see the module docstring). On an exception the temporary directory is removed
    and ``target`` is untouched. Leftovers of writers that died are removed first.

    ``overwrite`` allows replacing an existing *dataset* (a directory holding one of
    ``markers``); ``protect`` names paths (a conversion's source) the target must neither be,
    contain nor lie inside. Write the commit marker (e.g. the manifest) last.
    """
    target = Path(os.path.abspath(target))
    markers = tuple(markers)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        expected = check_target(target, overwrite=overwrite, protect=protect, markers=markers)
        tmp = leftover_name(target, TMP_MARK)
        tmp.mkdir()
    except JasperError:
        raise
    except OSError as exc:
        raise storage_error(exc, target) from exc
    try:
        yield tmp
        checkpoint()  # a Ctrl-C held during the write (jasper.interrupts) stops it uncommitted
        fsync_tree(tmp)
        commit(tmp, target, expected, markers)
    except BaseException as exc:
        mapped = _map_write_failure(exc, target, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if mapped is not None:
            raise mapped from exc
        raise


#: What to do about an OS error on a write path, by errno.
_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space there or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space in your quota or write elsewhere",
    errno.EACCES: "permission denied: write to a directory you own or fix its permissions",
    errno.EPERM: "operation not permitted: write to a directory you own or fix its permissions",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or close other readers",
}


def storage_error(exc: OSError, target: Path) -> StorageError:
    """A typed :class:`StorageError` for an OS error met while writing ``target``, naming the
    file the OS named (else the target) and what to do."""
    if isinstance(exc, JasperError):
        return exc  # type: ignore[return-value]
    where = exc.filename if exc.filename else target
    advice = _ADVICE.get(exc.errno or -1, exc.strerror or str(exc))
    return StorageError(where, f"writing {target.name} failed: {advice} ({exc.strerror or exc})",
                        exc.errno)


def _disk_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _map_write_failure(exc: BaseException, target: Path, tmp: Path) -> StorageError | None:
    """A typed error for an OS failure inside a write, also when a library hid the errno
    (torch's ``PytorchStreamWriter`` RuntimeError, SQLite's "cannot rollback"): a write that
    fails while the device has under 1 MiB free failed for lack of space."""
    if isinstance(exc, JasperError) or not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno in _ADVICE:
        return storage_error(exc, target)
    if _disk_full(tmp if tmp.exists() else target.parent):
        return StorageError(tmp, f"writing {target.name} failed: {_ADVICE[errno.ENOSPC]} "
                                 f"({type(exc).__name__}: {exc})", errno.ENOSPC)
    return None


__all__ = [
    "DATASET_MARKERS",
    "SCRATCH_MARK",
    "TMP_MARK",
    "TRASH_MARK",
    "FreeSpaceGuard",
    "allocate_file",
    "atomic_directory",
    "check_target",
    "clean_leftovers",
    "commit",
    "fsync_tree",
    "is_dataset_dir",
    "leftover_name",
    "pid_alive",
    "recover_interrupted_commit",
    "require_free_space",
    "storage_error",
]
