"""A bounded on-disk cache of the reads of lazy rows from an object store.

Lazy rows over ``s3://`` fetch the inner chunks holding requested rows as ranged GETs; a second
epoch (or another process on the same machine) needs the same chunks again. With the cache on,
:mod:`jasper_zarr.rowread` keeps every inner chunk it fetched as one file under the cache
directory (its stored bytes, checksum included), keyed by the object's full location and the
chunk number, so that how a batch's reads were coalesced never changes what a later batch finds.
Arrays of other zarr writers, read through zarr, go through :class:`CachingStore`, which keys
an entry by object and byte range. Committed objects never change (a write goes to a fresh
generation prefix, :mod:`jasper.location`), so an entry is valid for as long as it exists. A
preload's shard reads bypass the cache.

- **Off by default.** ``JASPER_ZARR_CACHE_DIR=/local/disk/dir`` turns it on;
  ``JASPER_ZARR_CACHE_BYTES`` bounds it (default :data:`DEFAULT_MAX_BYTES`; suffixes ``K``,
  ``M``, ``G``).
- **Several processes** may share one directory (DataLoader workers, ranks on one node): an
  entry is written to a temporary file and renamed into place (``os.replace``), so a reader sees
  a whole entry or none; eviction deletes the least recently used entries (a hit refreshes the
  entry's mtime) until the directory is under 90% of the bound, and tolerates entries another
  process deleted first. Every inner chunk carries its crc32c, so a damaged entry fails its
  checksum on decode instead of serving wrong rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype

ENV_DIR = "JASPER_ZARR_CACHE_DIR"
ENV_BYTES = "JASPER_ZARR_CACHE_BYTES"
#: The bound when only the directory is given.
DEFAULT_MAX_BYTES = 10 << 30
#: Eviction scans the directory after this fraction of the bound was written since the last
#: scan (a scan lists every entry; doing it per write would cost more than the reads saved).
SCAN_FRACTION = 0.05
_TMP_PREFIX = ".tmp-"


def parse_bytes(text: str) -> int:
    """``"512M"`` -> 536870912 (suffixes K, M, G, T; powers of 1024); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{ENV_BYTES}={text!r} is not a size (e.g. 512M, 20G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


class ChunkCache:
    """Files under ``directory``, at most about ``max_bytes`` in all (see the module
    docstring). Safe for threads and for processes sharing the directory."""

    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"chunk cache bound must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._written = 0
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> ChunkCache | None:
        """The cache ``JASPER_ZARR_CACHE_DIR`` / ``_BYTES`` describe, or None when off."""
        directory = os.environ.get(ENV_DIR)
        if not directory:
            return None
        limit = os.environ.get(ENV_BYTES)
        return cls(directory, parse_bytes(limit) if limit else DEFAULT_MAX_BYTES)

    def _path(self, ident: str) -> Path:
        digest = hashlib.blake2b(ident.encode(), digest_size=20).hexdigest()
        return self.directory / digest[:2] / digest

    def get(self, ident: str) -> bytes | None:
        """The entry's bytes, or None (and a hit counts as a use for eviction)."""
        path = self._path(ident)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return data

    def put(self, ident: str, data: bytes) -> None:
        """Store an entry (temporary file, then rename); evict when the bound is passed."""
        if len(data) > self.max_bytes:
            return
        path = self._path(ident)
        path.parent.mkdir(exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return  # a full or read-only cache disk must not fail the read
        with self._lock:
            self._written += len(data)
            due = self._written >= self.max_bytes * SCAN_FRACTION
            if due:
                self._written = 0
        if due:
            self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry (temporary files excluded)."""
        out = []
        for sub in self.directory.iterdir():
            if not sub.is_dir():
                continue
            for entry in sub.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue  # evicted by another process meanwhile
                out.append((st.st_mtime, st.st_size, entry))
        return out

    def size(self) -> int:
        """Bytes of all entries now."""
        return sum(s for _, s, _ in self.entries())

    def evict(self) -> None:
        """Delete least recently used entries until under 90% of the bound."""
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        if total <= self.max_bytes:
            return
        target = int(self.max_bytes * 0.9)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size


def _range_ident(byte_range: ByteRequest) -> str | None:
    if isinstance(byte_range, RangeByteRequest):
        return f"r{byte_range.start}-{byte_range.end}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"o{byte_range.offset}"
    if isinstance(byte_range, SuffixByteRequest):
        return f"s{byte_range.suffix}"
    return None


class CachingStore(Store):
    """A read-only zarr store that keeps the reads of ``inner`` in a
    :class:`ChunkCache`; ``scope`` names the immutable objects (the generation's location)."""

    supports_writes: bool = False
    supports_deletes: bool = False
    supports_listing: bool = True

    def __init__(self, inner: Store, cache: ChunkCache, scope: str) -> None:
        super().__init__(read_only=True)
        self.inner = inner
        self.cache = cache
        self.scope = scope

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CachingStore) and other.inner == self.inner
                and other.scope == self.scope)

    def __hash__(self) -> int:
        return hash(self.scope)

    def with_read_only(self, read_only: bool = False) -> CachingStore:
        if not read_only:
            raise ValueError("the chunk-caching store is read-only")
        return self

    async def _open(self) -> None:
        await self.inner._ensure_open()
        await super()._open()

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        import asyncio

        rng = "all" if byte_range is None else _range_ident(byte_range)
        if rng is None:
            return await self.inner.get(key, prototype, byte_range)
        ident = f"{self.scope}\0{key}\0{rng}"
        hit = await asyncio.to_thread(self.cache.get, ident)
        if hit is not None:
            return prototype.buffer.from_bytes(hit)
        got = await self.inner.get(key, prototype, byte_range)
        if got is None:
            if "/c/" in key:
                # the reader listed this chunk object before its first read: gone since is an
                # error, never the fill value zarr would make of it
                raise FileNotFoundError(f"{self.scope}/{key}")
            return None
        await asyncio.to_thread(self.cache.put, ident, got.to_bytes())
        return got

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]
                                 ) -> list[Buffer | None]:
        import asyncio

        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def getsize(self, key: str) -> int:
        return await self.inner.getsize(key)

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    def list(self) -> AsyncIterator[str]:
        return self.inner.list()

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self.inner.list_prefix(prefix)

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self.inner.list_dir(prefix)

    def __getstate__(self) -> dict[str, Any]:  # pragma: no cover - readers never pickle stores
        raise TypeError("CachingStore is opened per process; pickle the reader instead")


__all__ = [
    "DEFAULT_MAX_BYTES",
    "ENV_BYTES",
    "ENV_DIR",
    "CachingStore",
    "ChunkCache",
    "parse_bytes",
]
