"""Open and write datasets at object-store locations (``s3://bucket/prefix`` ...).

:mod:`jasper.store` hands every non-local :class:`~jasper.location.Location` here. The backend
that takes the URL's scheme provides the bytes (``BackendEntrypoint.object_store``); core keeps
the manifest, the checksums and the generation commit of :mod:`jasper.location`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jasper.backend import BackendEntrypoint, StoreReader
from jasper.errors import CapabilityError, DatasetNotFoundError, ManifestError
from jasper.location import (
    Location,
    ObjectStore,
    commit_generation,
    committed_generation,
    generation_prefix,
    object_store_size,
)
from jasper.manifest import MANIFEST_NAME, Manifest
from jasper.registry import get_backend, install_hint, list_backends


def backends_for(scheme: str) -> list[str]:
    """Installed backends whose capabilities list ``scheme`` (best first by open priority)."""
    out = []
    for name in list_backends():
        try:
            impl = get_backend(name)
        except Exception:
            continue
        if scheme in impl.capabilities.locations:
            out.append((impl.open_priority, name))
    return [n for _, n in sorted(out, key=lambda t: (-t[0], t[1]))]


def require_location_support(impl: BackendEntrypoint, location: Location) -> None:
    """:class:`CapabilityError` unless backend ``impl`` takes ``location``'s scheme."""
    if location.scheme in impl.capabilities.locations:
        return
    able = backends_for(location.scheme)
    hint = (f"backends that can: {', '.join(able)}" if able else
            f"install one that can: {install_hint('jasper-zarr')}")
    raise CapabilityError(
        f"backend {impl.name!r} cannot use {location.scheme}:// locations ({location}); it "
        f"reads and writes local directories only; {hint}")


def _auto_backend(location: Location) -> BackendEntrypoint:
    able = backends_for(location.scheme)
    if not able:
        raise CapabilityError(
            f"no installed backend reads {location.scheme}:// locations ({location}); "
            f"{install_hint('jasper-zarr')}")
    return get_backend(able[0])


def load_manifest(store: ObjectStore, location: Location, generation: str) -> Manifest:
    """The manifest of a committed generation."""
    key = generation_prefix(generation) + MANIFEST_NAME
    where = f"{location}/{key}"
    try:
        data = store.get(key)
    except FileNotFoundError:
        raise DatasetNotFoundError(where, "manifest", "the pointer names a generation without "
                                   "config.json; the dataset was changed by hand") from None
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(where, f"not valid JSON: {exc}") from None
    return Manifest.from_dict(d, where)


@dataclass(frozen=True)
class PinnedGeneration:
    """The committed generation of a URL, resolved once: where its objects are, its manifest
    and the backend that reads it. Readers opened from it never see a later overwrite."""

    location: Location
    where: Location
    manifest: Manifest
    backend: str


def pin_generation(location: Location, backend: str = "auto") -> PinnedGeneration:
    """Follow the pointer at ``location`` once (``backend="auto"``: the manifest's writer when
    it takes the scheme, else the best installed backend that does)."""
    impl = _auto_backend(location) if backend == "auto" else get_backend(backend)
    require_location_support(impl, location)
    store = impl.object_store(location)
    generation = committed_generation(store, location)
    manifest = load_manifest(store, location, generation)
    if backend == "auto":
        preferred = (manifest.writer or {}).get("backend")
        if preferred and preferred != impl.name and preferred in backends_for(location.scheme):
            impl = get_backend(preferred)
    return PinnedGeneration(location, location.join(generation_prefix(generation)), manifest,
                            impl.name)


def open_pinned(pinned: PinnedGeneration, *, mmap: bool = False) -> StoreReader:
    """A reader of a pinned generation; ``reader.path`` is the dataset's URL."""
    impl = get_backend(pinned.backend)
    if mmap and not impl.capabilities.mmap:
        raise CapabilityError(f"backend {impl.name!r} cannot memory-map {pinned.location}: "
                              "object stores are preloaded or read by rows; open with "
                              "mmap=False")
    reader = impl.open(pinned.where, pinned.manifest)  # type: ignore[arg-type]
    # reader.path names the dataset (what `jasper info` shows and sizes), not one generation
    reader.path = pinned.location  # type: ignore[assignment]
    return reader


def open_remote(location: Location, backend: str = "auto", *, mmap: bool = False) -> StoreReader:
    """Open the committed generation at ``location`` (see :func:`pin_generation`)."""
    return open_pinned(pin_generation(location, backend), mmap=mmap)


def write_remote(
    location: Location,
    impl: BackendEntrypoint,
    write: Callable[[Any], Manifest],
    *,
    overwrite: bool,
) -> Location:
    """Commit one generation at ``location``: ``write(generation_location)`` makes the backend
    write its objects and returns the finished manifest, which is put last; then the pointer."""
    require_location_support(impl, location)
    store = impl.object_store(location)
    with commit_generation(store, location, overwrite=overwrite) as pending:
        manifest = write(pending.generation_location)
        text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
        store.put(pending.prefix + MANIFEST_NAME, text.encode("utf-8"))
    return location


def remote_size(location: Location, backend: str | None = None) -> int:
    """Bytes of the committed generation at ``location``."""
    impl = _auto_backend(location) if backend is None else get_backend(backend)
    store = impl.object_store(location)
    return object_store_size(store, generation_prefix(committed_generation(store, location)))


def manifest_at(location: Location, backend: str | None = None) -> Manifest:
    """The committed manifest at ``location``."""
    impl = _auto_backend(location) if backend is None else get_backend(backend)
    store = impl.object_store(location)
    return load_manifest(store, location, committed_generation(store, location))


__all__ = ["PinnedGeneration", "backends_for", "manifest_at", "open_pinned", "open_remote",
           "pin_generation", "remote_size",
           "require_location_support", "write_remote"]
