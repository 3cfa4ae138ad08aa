"""Open, write and convert datasets through any installed backend.

Writes are atomic (DESIGN_NOTES, "Atomic dataset write"): the backend fills a temporary directory
beside the target; core fsyncs every file, writes ``config.json`` (checksums, shapes) last as the
commit marker, renames the directory into place and fsyncs the parent. An interrupted write leaves
no dataset at the target; leftovers of dead writers are removed by the next write.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jasper.backend import ArraySource, StoreReader, as_source
from jasper.dtypes import dtype_name
from jasper.errors import (
    CapabilityError,
    DatasetNotFoundError,
    JasperError,
    ShapeError,
    WriteOptionError,
)
from jasper.location import Location, as_target
from jasper.manifest import MANIFEST_NAME, ArrayRecord, Checksummer, Manifest
from jasper.progress import byte_bar
from jasper.registry import get_backend, guess_backend, list_backends
from jasper.schema import ARRAYS, Cols, Role

TMP_MARK = ".jasper-tmp-"
TRASH_MARK = ".jasper-old-"


class DatasetExistsError(JasperError, FileExistsError):
    """The write target exists and ``overwrite`` was not given."""


def open_store(path: str | Path | Location, backend: str = "auto", *,
               mmap: bool = False) -> StoreReader:
    """Open the dataset directory (or object-store URL, see :mod:`jasper.location`) ``path``.

    ``backend="auto"`` uses the writer recorded in the manifest when installed, else asks every
    installed backend's ``guess_can_open``. ``mmap=True`` asks for zero-copy mapped arrays and
    raises :class:`CapabilityError` for a backend that cannot map.
    """
    p = as_target(path)
    if isinstance(p, Location):
        from jasper.remote import open_remote

        return open_remote(p, backend, mmap=mmap)
    if not p.is_dir():
        raise DatasetNotFoundError(p, hint="Check the path; `jasper synth DIR` creates a dataset")
    manifest = Manifest.load(p)
    name = backend
    if backend == "auto":
        preferred = (manifest.writer or {}).get("backend")
        name = guess_backend(p, preferred)
    impl = get_backend(name)
    if mmap and not impl.capabilities.mmap:
        raise CapabilityError(
            f"backend {name!r} cannot memory-map {p}; open with mmap=False (preload) or convert it "
            f"to a backend that maps: "
            + ", ".join(n for n in list_backends() if get_backend(n).capabilities.mmap)
        )
    return impl.open(p, manifest, mmap=mmap)


class _HashingSource(ArraySource):
    """Pass chunks through while checksumming them and counting rows and bytes."""

    def __init__(self, name: str, source: ArraySource, on_bytes: Any) -> None:
        self.name = name
        self.inner = source
        self.shape = source.shape
        self.dtype = source.dtype
        self.hasher = Checksummer()
        self.rows = 0
        self.consumed = False
        self._on_bytes = on_bytes

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        if self.consumed:
            raise RuntimeError(f"array {self.name!r} was iterated twice by the backend writer")
        self.consumed = True
        for chunk in self.inner.iter_chunks(rows_per_chunk):
            if chunk.dtype != self.dtype or tuple(chunk.shape[1:]) != tuple(self.shape[1:]):
                raise ShapeError(
                    f"array {self.name!r}: a chunk has shape {tuple(chunk.shape)} and dtype "
                    f"{chunk.dtype}, expected rows of {self.shape[1:]} and {self.dtype}",
                    array=self.name, rule="chunk shape",
                )
            chunk = chunk.contiguous()
            self.hasher.update(chunk)
            self.rows += chunk.shape[0] if chunk.dim() else 1
            self._on_bytes(chunk.numel() * chunk.element_size())
            yield chunk

    def materialize(self) -> torch.Tensor:
        return ArraySource.materialize(self)


def check_layout(arrays: Mapping[str, ArraySource], manifest: Manifest) -> None:
    """Shape-level checks before a write (no data read): every catalogue array present, ranks,
    dtypes, columns and row counts consistent. Value checks are :func:`jasper.validate`'s job."""
    missing = [n for n in ARRAYS if n not in arrays]
    if missing:
        raise ShapeError(f"cannot write a dataset without arrays: {', '.join(missing)}",
                         array=missing[0], rule="required array")
    unknown = [n for n in arrays if n not in ARRAYS]
    if unknown:
        raise ShapeError(f"unknown arrays {', '.join(unknown)}; the data model has: "
                         f"{', '.join(ARRAYS)}", array=unknown[0], rule="known array")
    n_pairs = arrays["pair_index"].shape[0]
    for name, spec in ARRAYS.items():
        src = arrays[name]
        shape = tuple(src.shape)
        if len(shape) != spec.rank:
            raise ShapeError(f"{name} has shape {shape}, expected rank {spec.rank}", array=name,
                             rule="rank")
        if dtype_name(src.dtype) not in spec.dtypes:
            raise ShapeError(f"{name} has dtype {dtype_name(src.dtype)}, allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype")
        want = {Cols.EMBEDDING_DIM: manifest.embedding_dim, Cols.N_NEG: manifest.n_neg,
                Cols.TWO: 2}.get(spec.cols) if spec.cols else None
        if want is not None and shape[1] != want:
            raise ShapeError(f"{name} has {shape[1]} columns, expected {want}",
                             array=name, rule="columns")
        if spec.role is Role.PAIR and shape[0] != n_pairs:
            raise ShapeError(f"{name} has {shape[0]} rows but pair_index has {n_pairs}",
                             array=name, rule="pair rows")
        if spec.role is Role.CSR_OFFSETS and shape[0] != n_pairs + 1:
            raise ShapeError(f"{name} has {shape[0]} rows, expected N_p + 1 = {n_pairs + 1}",
                             array=name, rule="csr offsets rows")


def _check_options(backend: Any, options: Mapping[str, Any]) -> None:
    sig = inspect.signature(backend.write_arrays)
    accepted = [
        p.name for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "progress"
    ]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise WriteOptionError(
            f"backend {backend.name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


def _fsync_tree(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target: Path) -> list[Path]:
    """Remove temporary directories of interrupted writes to ``target`` whose writer is dead."""
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for mark in (TMP_MARK, TRASH_MARK):
        for p in parent.glob(f".{target.name}{mark}*"):
            try:
                pid = int(p.name[len(f".{target.name}{mark}"):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and _pid_alive(pid):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory atomically: yields a fresh temporary directory beside ``target``; when
    the block ends without an exception every file in it is fsynced and it is renamed into place
    (an existing target only with ``overwrite``, and then only once the new one is complete). On
    an exception the temporary directory is removed and ``target`` is untouched. Leftovers of
    writers that died are removed first. Write the commit marker (e.g. the manifest) last.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise DatasetExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_size(path: str | Path | Location) -> int:
    """Bytes on disk of every file under ``path`` (of the committed objects at a URL)."""
    p = as_target(path)
    if isinstance(p, Location):
        from jasper.remote import remote_size

        return remote_size(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_store(
    path: str | Path | Location,
    arrays: Mapping[str, torch.Tensor | ArraySource],
    manifest: Manifest | Mapping[str, Any],
    *,
    backend: str = "pt",
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Path:
    """Write a dataset directory atomically with ``backend``.

    ``arrays`` maps every array of :data:`jasper.schema.ARRAYS` to a tensor or an
    :class:`~jasper.backend.ArraySource` (for data larger than RAM). ``options`` are the
    backend's write options (e.g. ``compression="lzf"`` for hdf5); unknown ones raise
    :class:`WriteOptionError` listing what the backend accepts. Returns the dataset path (the
    :class:`~jasper.location.Location` for an object-store URL, committed by generation).
    """
    where = as_target(path)
    impl = get_backend(backend)
    if isinstance(where, Location):
        from jasper.remote import require_location_support

        require_location_support(impl, where)
    target = where.absolute() if isinstance(where, Path) else where
    if not impl.capabilities.write:
        raise CapabilityError(f"backend {backend!r} cannot write datasets")
    _check_options(impl, options)
    m = copy.deepcopy(manifest) if isinstance(manifest, Manifest) else Manifest.from_dict(dict(manifest))
    sources = {n: as_source(a) for n, a in arrays.items()}
    check_layout(sources, m)
    total = sum(s.nbytes for s in sources.values())
    if isinstance(target, Location):
        from jasper.remote import write_remote

        return write_remote(  # type: ignore[return-value]
            target, impl, lambda gen: _fill(gen, impl, backend, sources, m, total, progress,
                                            options), overwrite=overwrite)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        _fill(tmp, impl, backend, sources, m, total, progress, options)
        m.dump(tmp, fsync=False)  # config.json last: it is the commit marker
    return target


def _fill(where: Path | Location, impl: Any, backend: str, sources: Mapping[str, ArraySource],
          m: Manifest, total: int, progress: bool | None, options: Mapping[str, Any]) -> Manifest:
    """Let the backend write every array into ``where`` (a temporary directory or a
    generation's location) while core hashes them; fills ``m.arrays`` and stamps ``m``."""
    with byte_bar(total, f"writing {where.name} ({backend})", progress) as update:
        hashing = {n: _HashingSource(n, s, update) for n, s in sources.items()}
        impl.write_arrays(where, hashing, m, **options)
    for n, h in hashing.items():
        expected = h.shape[0] if h.shape else 1
        if not h.consumed or h.rows != expected:
            raise JasperError(
                f"backend {backend!r} wrote {h.rows} of {expected} rows of {n!r}; this is a bug "
                "in the backend"
            )
    m.arrays = {
        n: ArrayRecord(tuple(h.shape), dtype_name(h.dtype), h.hasher.hexdigest())
        for n, h in hashing.items()
    }
    m.stamp(backend, _backend_version(backend))
    return m


def _backend_version(name: str) -> str | None:
    info = list_backends().get(name)
    return info.version if info else None


def _commit(tmp: Path, target: Path) -> None:
    if target.exists():
        trash = target.parent / f".{target.name}{TRASH_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)
        _fsync_dir(target.parent)


@dataclass
class ConvertReport:
    """What :func:`convert` did: both sizes on disk and the time it took."""

    src: Path | Location
    dst: Path | Location
    src_backend: str
    dst_backend: str
    src_bytes: int
    dst_bytes: int
    seconds: float

    @property
    def saving(self) -> float:
        """Fraction of the source size saved (negative when the target is larger)."""
        return 1.0 - self.dst_bytes / self.src_bytes if self.src_bytes else 0.0

    def __str__(self) -> str:
        mb = 1024 * 1024
        return (
            f"converted {self.src} ({self.src_backend}, {self.src_bytes / mb:.1f} MiB) -> "
            f"{self.dst} ({self.dst_backend}, {self.dst_bytes / mb:.1f} MiB): "
            f"{self.saving * 100:+.1f}% saved, {self.seconds:.1f} s"
        )


def convert(
    src: str | Path | Location,
    dst: str | Path | Location,
    *,
    to: str,
    src_backend: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> ConvertReport:
    """Convert the dataset at ``src`` into backend ``to`` at ``dst``, streaming array by array.

    Bit-exact: every array is copied with its dtype, and the target manifest's checksums must
    equal the source's where the source recorded them. Unknown manifest keys are kept.
    """
    t0 = time.perf_counter()
    with open_store(src, src_backend) as reader:
        names = [n for n in ARRAYS if reader.has(n)]
        sources = {n: reader.source(n) for n in names}
        manifest = copy.deepcopy(reader.manifest)
        before = dict(manifest.arrays)
        out = write_store(dst, sources, manifest, backend=to, overwrite=overwrite,
                          progress=progress, **options)
        src_name = reader.backend_name
    if isinstance(out, Location):
        from jasper.remote import manifest_at

        written = manifest_at(out, to)
    else:
        written = Manifest.load(out)
    for n, rec in before.items():
        if rec.checksum and n in written.arrays and written.arrays[n].checksum != rec.checksum:
            from jasper.errors import ChecksumError

            raise ChecksumError(
                f"conversion changed {n!r}: checksum {written.arrays[n].checksum} != {rec.checksum}",
                array=n, rule="bit-exact conversion", path=out,
            )
    return ConvertReport(as_target(src), out, src_name, to, dir_size(src), dir_size(out),
                         time.perf_counter() - t0)


__all__ = [
    "MANIFEST_NAME",
    "ConvertReport",
    "DatasetExistsError",
    "atomic_directory",
    "clean_leftovers",
    "convert",
    "dir_size",
    "open_store",
    "write_store",
]
