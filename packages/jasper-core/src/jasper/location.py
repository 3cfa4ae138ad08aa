"""Where a dataset lives: a local directory or a URL, and how a write to it is committed.

A :class:`Location` is parsed from what a user types (``data/qa``, ``file:///data/qa``,
``s3://bucket/prefix``) plus optional ``storage_options`` (credentials, endpoint, region...).
Local locations keep the directory commit of :mod:`jasper.store` (temporary directory, fsync,
rename, parent fsync). Object stores have no rename, so core commits to them with the
**generation protocol** implemented here, on top of any :class:`ObjectStore` (a few byte
operations a backend's client layer provides):

- a write puts every object under a fresh generation prefix
  ``<location>/generations/<generation>/``, the manifest (``config.json``) last;
- then it puts the small pointer object ``<location>/jasper-pointer.json`` naming that
  generation. A single PUT is atomic on S3-compatible stores, so a reader that follows the
  pointer sees a whole generation or, before the first commit, no dataset; never a partial one;
- an overwrite leaves the previous generation untouched until the new pointer has landed, and
  the pointer keeps naming it as ``previous`` so readers that opened it before the overwrite can
  finish their epoch; generations older than that are deleted by the committing writer;
- every generation in progress carries a small writer record (host, process id, start time); the
  next writer deletes generations no pointer names whose writer is dead (same host, process
  gone) or older than :data:`STALE_AFTER_S` (a writer on another host cannot be probed).

This module imports nothing heavy and knows no client library: the object-store client lives in
the backend that takes URLs (see ``BackendEntrypoint.object_store``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jasper.atomic import pid_alive
from jasper.errors import DatasetNotFoundError, FormatError

#: Scheme of a local directory.
LOCAL_SCHEME = "file"
#: Name of the pointer object at the root of an object-store location.
POINTER_NAME = "jasper-pointer.json"
#: Prefix (below the location) holding one sub-prefix per generation.
GENERATIONS = "generations"
#: Writer record inside a generation in progress.
WRITER_RECORD = ".jasper-writer.json"
#: A generation no pointer names, whose writer cannot be probed (another host), is stale after
#: this many seconds: longer than any write should take, short enough that space comes back.
STALE_AFTER_S = 24 * 3600.0
POINTER_FORMAT = "jasper-pointer"
POINTER_VERSION = 1


@dataclass(frozen=True)
class Location:
    """A dataset's address: ``scheme`` ("file" for a local directory, "s3", "gs", ...) and
    ``path`` (the absolute local path, or ``bucket/key/prefix`` without slashes at either end),
    with the ``storage_options`` a client needs (never part of equality or the printed form).

    Build one with :meth:`parse`; ``str(location)`` is the URL (or the local path).
    """

    scheme: str
    path: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False,
                                               repr=False)

    @classmethod
    def parse(cls, target: str | os.PathLike[str] | Location,
              storage_options: Mapping[str, Any] | None = None) -> Location:
        """Parse a local path, a ``file://`` URL or an object-store URL (``s3://bucket/prefix``).

        A string without ``://`` is a local path (relative paths are made absolute); a
        one-letter scheme is a Windows drive, not a URL. ``storage_options`` given here are
        merged over those of a ``Location`` passed in.
        """
        if isinstance(target, Location):
            if not storage_options:
                return target
            return cls(target.scheme, target.path, {**target.storage_options, **storage_options})
        opts = dict(storage_options or {})
        text = os.fspath(target)
        scheme, sep, rest = text.partition("://")
        if not sep or len(scheme) == 1:
            return cls(LOCAL_SCHEME, str(Path(text).absolute()), opts)
        scheme = scheme.lower()
        if scheme == LOCAL_SCHEME:
            if rest.startswith("localhost/"):
                rest = rest[len("localhost"):]
            if not rest.startswith("/"):
                raise FormatError(text, "a file:// URL needs an absolute path (file:///data/qa)")
            return cls(LOCAL_SCHEME, str(Path(rest)), opts)
        if not scheme.replace("+", "").replace("-", "").isalnum():
            raise FormatError(text, f"{scheme!r} is not a URL scheme")
        path = rest.strip("/")
        if not path:
            raise FormatError(text, f"a {scheme}:// URL needs a bucket ({scheme}://bucket/prefix)")
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise FormatError(text, "empty, '.' and '..' segments are not allowed in a dataset URL")
        return cls(scheme, path, opts)

    @property
    def is_local(self) -> bool:
        """True for a local directory (committed by rename), False for an object store."""
        return self.scheme == LOCAL_SCHEME

    @property
    def local_path(self) -> Path:
        """The local directory (only for local locations)."""
        if not self.is_local:
            raise ValueError(f"{self} is not a local directory")
        return Path(self.path)

    @property
    def bucket(self) -> str:
        """The bucket (container) of an object-store location."""
        return self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        """The key prefix inside the bucket ("" for the bucket root)."""
        parts = self.path.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def name(self) -> str:
        """The last segment (what a directory's name is for a local path)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` below this one (same scheme and storage options)."""
        clean = [p.strip("/") for p in parts if p.strip("/")]
        if not clean:
            return self
        return Location(self.scheme, "/".join([self.path.rstrip("/"), *clean]),
                        self.storage_options)

    def __truediv__(self, part: str) -> Location:
        """``location / "config.json"``, as with a Path (messages name objects this way)."""
        return self.join(part)

    def __str__(self) -> str:
        return self.url


def is_url(target: object) -> bool:
    """Whether ``target`` is a non-local location (a string with a scheme other than file://)."""
    if isinstance(target, Location):
        return not target.is_local
    if not isinstance(target, str):
        return False
    scheme, sep, _ = target.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.lower() != LOCAL_SCHEME


def as_target(target: str | os.PathLike[str] | Location,
              storage_options: Mapping[str, Any] | None = None) -> Path | Location:
    """A local directory as a :class:`~pathlib.Path` (``file://`` URLs included), an object-store
    URL as a :class:`Location`: what :mod:`jasper.store` dispatches on."""
    if isinstance(target, Path) and not storage_options:
        return target
    loc = Location.parse(target, storage_options)
    return loc.local_path if loc.is_local else loc


@runtime_checkable
class ObjectStore(Protocol):
    """The byte operations the generation protocol needs, on keys relative to one location.

    ``get`` of a missing key raises ``FileNotFoundError``; ``put`` replaces atomically (a reader
    sees the old or the new object, never a part); ``list`` yields every key below a prefix
    (recursively, relative to the location); ``delete`` ignores missing keys.
    """

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def delete(self, keys: Iterable[str]) -> None: ...


class DirectoryObjectStore:
    """An :class:`ObjectStore` over a local directory (``put`` through a temporary file and a
    rename). It lets the generation protocol run, and be tested, without a server."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _file(self, key: str) -> Path:
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"bad object key {key!r}")
        return self.root / key

    def get(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        for p in sorted(base.rglob("*")):
            if p.is_file():
                yield p.relative_to(self.root).as_posix()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._file(key)
            path.unlink(missing_ok=True)
            # directories are an artefact of this store, not objects: drop emptied ones
            for parent in path.parents:
                if parent == self.root or self.root not in parent.parents:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break


@dataclass(frozen=True)
class Pointer:
    """What the pointer object says: the committed generation and the one it replaced."""

    generation: str
    previous: str | None = None
    committed_at: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps({"format": POINTER_FORMAT, "version": POINTER_VERSION,
                           "generation": self.generation, "previous": self.previous,
                           "committed_at": self.committed_at}, indent=2).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Pointer:
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(where, f"the dataset pointer is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != POINTER_FORMAT:
            raise FormatError(where, "not a jasper dataset pointer (no 'format': "
                              f"{POINTER_FORMAT!r})")
        if int(d.get("version", 0)) > POINTER_VERSION:
            from jasper.registry import install_hint

            raise FormatError(where, f"pointer version {d.get('version')} is newer than this "
                              f"jasper reads ({POINTER_VERSION}); upgrade: "
                              + install_hint("jasper-core", upgrade=True))
        gen = d.get("generation")
        if not isinstance(gen, str) or not _valid_generation(gen):
            raise FormatError(where, f"the pointer names no valid generation ({gen!r})")
        prev = d.get("previous")
        return cls(gen, prev if isinstance(prev, str) and _valid_generation(prev) else None,
                   float(d.get("committed_at") or 0.0))


def _valid_generation(gen: str) -> bool:
    return bool(gen) and "/" not in gen and gen not in (".", "..")


def generation_prefix(generation: str) -> str:
    """Key prefix (relative to the location) of one generation's objects, ending in ``/``."""
    return f"{GENERATIONS}/{generation}/"


def read_pointer(store: ObjectStore, where: str | Location = "") -> Pointer | None:
    """The committed pointer, or None when nothing was ever committed at this location."""
    try:
        data = store.get(POINTER_NAME)
    except FileNotFoundError:
        return None
    return Pointer.from_bytes(data, f"{where}/{POINTER_NAME}" if where else POINTER_NAME)


def committed_generation(store: ObjectStore, location: Location) -> str:
    """The generation readers must use; :class:`DatasetNotFoundError` when none is committed."""
    ptr = read_pointer(store, location)
    if ptr is None:
        raise DatasetNotFoundError(
            str(location), "dataset",
            f"no {POINTER_NAME} at this location: nothing was committed there (an interrupted "
            "write commits nothing). Check the URL, or write one with `jasper convert` or "
            "`jasper synth`")
    return ptr.generation


def _new_generation() -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _generations(store: ObjectStore) -> dict[str, list[str]]:
    """Every generation present, with its keys."""
    out: dict[str, list[str]] = {}
    for key in store.list(f"{GENERATIONS}/"):
        parts = key.split("/", 2)
        if len(parts) >= 3 and parts[0] == GENERATIONS:
            out.setdefault(parts[1], []).append(key)
    return out


def _writer_dead(store: ObjectStore, generation: str, keys: list[str], now: float,
                 stale_after: float) -> bool:
    record_key = generation_prefix(generation) + WRITER_RECORD
    if record_key not in keys:
        return True  # a generation whose writer record is gone was being deleted: finish it
    try:
        rec = json.loads(store.get(record_key))
        host, pid, started = str(rec["host"]), int(rec["pid"]), float(rec["started"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return True
    if now - started > stale_after:
        return True
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def clean_stale_generations(store: ObjectStore, *, stale_after: float = STALE_AFTER_S,
                            keep: Iterable[str] = ()) -> list[str]:
    """Delete generations no pointer names whose writer is dead; returns the ones deleted.

    The committed generation and its ``previous`` are never touched, nor a generation whose
    writer may still be running (a live process on this host, or a younger record from another
    host), nor any generation in ``keep``.
    """
    ptr = read_pointer(store)
    protected = set(keep)
    if ptr is not None:
        protected.add(ptr.generation)
        if ptr.previous:
            protected.add(ptr.previous)
    now = time.time()
    removed = []
    for gen, keys in sorted(_generations(store).items()):
        if gen in protected or not _writer_dead(store, gen, keys, now, stale_after):
            continue
        _delete_generation(store, gen, keys)
        removed.append(gen)
    return removed


def _delete_generation(store: ObjectStore, generation: str, keys: list[str]) -> None:
    # the writer record goes last: a cleaner interrupted half-way leaves a generation that is
    # still recognisably dead and gets finished by the next one
    record = generation_prefix(generation) + WRITER_RECORD
    store.delete([k for k in keys if k != record])
    store.delete([record])


@dataclass
class PendingGeneration:
    """A generation being written: write every object under :attr:`prefix` (a key prefix
    relative to the dataset location), the manifest last; the pointer is core's job."""

    generation: str
    prefix: str
    location: Location
    previous: str | None

    @property
    def generation_location(self) -> Location:
        """The location of this generation's objects (what a backend's writer gets)."""
        return self.location.join(self.prefix)


@contextmanager
def commit_generation(store: ObjectStore, location: Location, *,
                      overwrite: bool = False) -> Iterator[PendingGeneration]:
    """Write a new generation at ``location`` and commit it by moving the pointer.

    Yields a :class:`PendingGeneration`; when the block ends without an exception the pointer
    object is put (naming the new generation, and the one it replaces as ``previous``) and
    generations older than ``previous`` are deleted. On an exception the new generation's
    objects are deleted and the committed dataset is untouched. Stale generations of dead
    writers are removed first. The block must write the manifest last.
    """
    from jasper.store import DatasetExistsError

    old = read_pointer(store, location)
    if old is not None and not overwrite:
        raise DatasetExistsError(f"{location} holds a dataset; pass overwrite=True "
                                 "(--overwrite) to replace it")
    clean_stale_generations(store)
    gen = _new_generation()
    prefix = generation_prefix(gen)
    store.put(prefix + WRITER_RECORD, json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode())
    pending = PendingGeneration(gen, prefix, location, old.generation if old else None)
    try:
        yield pending
        # the pointer is re-read: a writer that committed meanwhile keeps its generation
        # protected as `previous` (last writer wins, nothing it committed is half-deleted)
        current = read_pointer(store, location)
        previous = current.generation if current else None
        store.put(POINTER_NAME, Pointer(gen, previous, time.time()).to_bytes())
    except BaseException:
        keys = list(store.list(prefix))
        _delete_generation(store, gen, keys or [prefix + WRITER_RECORD])
        raise
    # committed: the generations the old pointer named, except the one now kept as `previous`
    # (its readers get one overwrite's time to finish)
    superseded = {g for g in (old.generation if old else None, old.previous if old else None,
                              current.previous if current else None) if g} - {gen, previous}
    if superseded:
        present = _generations(store)
        for other in sorted(superseded & present.keys()):
            _delete_generation(store, other, present[other])


def object_store_size(store: ObjectStore, prefix: str = "") -> int:
    """Bytes of every object below ``prefix`` (one listing where the store reports sizes)."""
    total = getattr(store, "total_size", None)
    if total is not None:
        return int(total(prefix))
    size = getattr(store, "size", None)
    if size is None:
        return sum(len(store.get(k)) for k in store.list(prefix))
    return int(sum(size(k) for k in store.list(prefix)))


__all__ = [
    "GENERATIONS",
    "LOCAL_SCHEME",
    "POINTER_NAME",
    "STALE_AFTER_S",
    "DirectoryObjectStore",
    "Location",
    "ObjectStore",
    "PendingGeneration",
    "Pointer",
    "as_target",
    "clean_stale_generations",
    "commit_generation",
    "committed_generation",
    "generation_prefix",
    "is_url",
    "object_store_size",
    "read_pointer",
]
