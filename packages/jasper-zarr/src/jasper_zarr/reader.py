"""Reading a jasper-zarr group: preload, lazy rows, strict chunk checks, worker safety.

- **Preload.** :meth:`ZarrReader.read_into` splits the array into groups of whole shards and
  reads the groups concurrently (threads submitting to zarr's event loop; inside a group zarr
  fetches each shard in one request), each decoded straight into its rows of the caller's
  tensor: no second copy of the array. A bytes progress bar follows large arrays.
- **Lazy rows.** Core's :meth:`~jasper.backend.StoreReader.read_rows` checks, sorts and
  de-duplicates the rows and un-permutes the result; :meth:`ZarrReader.read_sorted_rows` reads
  the inner chunks holding them as coalesced ranged reads, all in flight together, with the
  shard indexes kept per reader (:mod:`jasper_zarr.rowread`); arrays of other zarr writers go
  through zarr's own selection.
- **Missing chunks are errors.** zarr reads a missing chunk as the fill value, silently, on
  every version. The writer stores every chunk; the reader lists each array's objects once
  before its first read and raises :class:`~jasper.errors.FormatError` naming the first
  missing shard; inside a shard every inner chunk carries a crc32c, so a truncated or corrupted
  object fails its checksum instead of decoding to garbage.
- **Workers.** zarr stores and obstore clients are opened lazily per process (see
  :mod:`jasper_zarr.stores`); the pickled state is the location and small metadata.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from jasper.allocator import advise_huge_pages
from jasper.backend import ArrayInfo, StoreReader
from jasper.dtypes import STORAGE_NUMPY, dtype_name, torch_dtype
from jasper.errors import DatasetNotFoundError, FormatError, JasperError, ShapeError
from jasper.files import DatasetDir
from jasper.location import Location
from jasper.manifest import Manifest
from jasper.progress import byte_bar
from jasper.rows import merge_gap_rows, plan_spans, span_positions
from jasper.schema import ALL_ARRAYS
from jasper_zarr.cache import CachingStore, ChunkCache
from jasper_zarr.layout import (
    ATTR_DTYPE,
    ATTR_FORMAT,
    ATTR_LAYOUT_VERSION,
    FORMAT_NAME,
    GROUP_FILE,
    LAYOUT_VERSION,
    Grid,
    expected_chunk_keys,
    shard_key,
)
from jasper_zarr.pinned import PinnedGroup, PinnedStore, read_range
from jasper_zarr.shardread import (
    Piece,
    ShardLayout,
    decode_piece,
    fill_chunks,
    parse_index,
    plan_pieces,
    read_index_local,
    read_piece_local,
)
from jasper_zarr.stores import zarr_store

T = TypeVar("T")

#: Concurrent shard groups in a preload (each is one zarr call; zarr adds its own concurrency).
PRELOAD_THREADS = 16
#: Bytes of one ranged read of the fast preload of local files: several per shard, so that
#: one shard is read by several threads.
PRELOAD_PIECE_BYTES = 2 << 20
#: The same over an object store, where each request costs a round trip and the server's work:
#: 8 MiB ranges preloaded at 0.48-0.69x of a raw concurrent GET of the same objects from
#: SeaweedFS on loopback, against 0.36x with 2 MiB, 0.52x with 4 MiB, 0.42-0.62x with
#: 16-32 MiB (two alternating runs, quiet 2-core machine, 100,000 pairs, D=384).
REMOTE_PIECE_BYTES = 8 << 20
#: Arrays at least this large get a progress bar during a preload.
PROGRESS_MIN_BYTES = 64 << 20


def _ndbuffer(array: np.ndarray) -> Any:
    from zarr.core.buffer.cpu import NDBuffer

    return NDBuffer.from_numpy_array(array)


class ZarrReader(StoreReader):
    """A read handle on one jasper-zarr group (a directory, or one generation at a URL)."""

    backend_name = "zarr"

    @property  # type: ignore[override]
    def fork_safe(self) -> bool:
        """Local groups are read by plain file I/O; object stores through obstore, whose tokio
        runtime hangs in a child forked after the parent used it."""
        return not isinstance(self.where, Location)

    def __init__(self, where: Path | Location, manifest: Manifest) -> None:
        self.manifest = manifest
        if isinstance(where, Location) and where.is_local:
            where = Path(where.local_path)
        self.where: Path | Location = where if isinstance(where, Location) else Path(where)
        #: a local group is read through descriptors pinned at open (jasper_zarr.pinned), so
        #: a commit to the same path while this reader is open never mixes two versions
        self._pinned = PinnedGroup(self.where) if isinstance(self.where, Path) else None
        # reader.path names the dataset (core sets it to the dataset URL, above a generation)
        self.path = self.where  # type: ignore[assignment]
        self._pid: int | None = None
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._checked: set[str] = set()
        self._listing: tuple[int, set[str]] | None = None
        self._meta: dict[str, tuple[tuple[int, ...], str, Grid]] = {}
        self._names: list[str] | None = None
        #: arrays opened on the chunk-caching store, for lazy row reads (jasper_zarr.cache)
        self._row_arrays: dict[str, Any] = {}
        #: shard indexes of lazy row reads, read once per array (jasper_zarr.rowread)
        self._indexes: dict[str, Any] = {}
        self._layouts: dict[str, ShardLayout | None] = {}
        self._lock = threading.Lock()

    @property
    def files(self) -> DatasetDir | None:  # type: ignore[override]
        """The pinned dataset directory of a local group (``None`` at a URL, where the
        generation pointer pins the version)."""
        return self._pinned.pin() if self._pinned is not None else None

    # --- process-local handles ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _group=None, _arrays={}, _names=None, _row_arrays={},
                     _lock=None, _listing=None, _indexes={}, _layouts={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _open_group(self) -> Any:
        import zarr

        pid = os.getpid()
        if self._group is not None and self._pid == pid:
            return self._group
        with self._lock:
            if self._group is not None and self._pid == pid:
                return self._group
            self._arrays, self._names = {}, None
            self._row_arrays, self._indexes, self._layouts = {}, {}, {}
            if self._pinned is not None:
                store = PinnedStore(self._pinned)
            else:
                store = zarr_store(self.where, read_only=True)
            group = self._wrap(None, lambda: zarr.open_group(store=store, mode="r",
                                                             zarr_format=3), key=GROUP_FILE)
            attrs = dict(group.attrs)
            if attrs.get(ATTR_FORMAT) != FORMAT_NAME:
                raise FormatError(self._where_str(GROUP_FILE), "not a jasper-zarr group (no "
                                  f"{ATTR_FORMAT}={FORMAT_NAME!r} attribute)")
            raw_version = attrs.get(ATTR_LAYOUT_VERSION, 0)
            if not isinstance(raw_version, int) or isinstance(raw_version, bool):
                raise FormatError(self._where_str(GROUP_FILE), f"{ATTR_LAYOUT_VERSION} is "
                                  f"{raw_version!r}, not a layout version number (rule: "
                                  "integer layout version)")
            version = raw_version
            if version > LAYOUT_VERSION:
                raise FormatError(self._where_str(GROUP_FILE), f"layout version {version} is "
                                  f"newer than this jasper-zarr reads ({LAYOUT_VERSION}); "
                                  "upgrade with `pip install -U jasper-zarr`")
            self._group, self._pid = group, pid
        return group

    def check_open(self) -> None:
        """Open the group now, so that a missing or foreign dataset fails on open. A local
        group is pinned here: every file of it opened (regular files inside it only; zarr's
        own local store would follow a symbolic link anywhere), and the manifest taken from
        the pinned version, so data and manifest agree even if a commit swapped the directory
        between core reading the manifest and this open."""
        if self._pinned is not None:
            self._pinned.pin()
            if self._pinned.fd(GROUP_FILE) is None:
                raise DatasetNotFoundError(self.where / GROUP_FILE, "zarr group",
                                           "a zarr dataset directory holds zarr.json beside "
                                           "config.json")
            self.manifest = self._pinned_manifest(self.manifest)
        self._open_group()

    def _pinned_manifest(self, manifest: Manifest) -> Manifest:
        """The pinned version's manifest when it records other arrays than ``manifest``."""
        import json

        from jasper.manifest import MANIFEST_NAME

        assert self._pinned is not None
        data = self._pinned.read_bytes(MANIFEST_NAME)
        if data is None:
            return manifest
        try:
            pinned = Manifest.from_dict(json.loads(data), self.where / MANIFEST_NAME)
        except (JasperError, ValueError, RecursionError):
            return manifest  # core already parsed one; its errors are core's to report
        return manifest if pinned.arrays == manifest.arrays else pinned

    def close(self) -> None:
        self._group, self._pid, self._arrays, self._names = None, None, {}, None
        self._listing, self._indexes, self._layouts = None, {}, {}
        if self._pinned is not None:
            self._pinned.close()

    def _where_str(self, key: str = "") -> str:
        base = str(self.where)
        return f"{base}/{key}" if key else base

    def _wrap(self, name: str | None, fn: Callable[[], T], *, key: str | None = None) -> T:
        """Run a zarr call; its errors become a FormatError naming the object ``key`` (else
        the array's directory, else the group) and the array."""
        where = key or name
        try:
            return fn()
        except JasperError:
            raise
        except FileNotFoundError as exc:
            raise FormatError(self._where_str(where or GROUP_FILE),
                              f"missing object: {_short(exc)}", array=name) from None
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            raise FormatError(self._where_str(where or ""), "zarr read failed (missing, "
                              f"truncated or corrupt object?): {type(exc).__name__}: "
                              f"{_short(exc)}", array=name) from None

    # --- metadata ----------------------------------------------------------------------------
    def _array(self, name: str) -> Any:
        group = self._open_group()
        arr = self._arrays.get(name)
        if arr is None:
            if name not in self.array_names():
                raise self._missing_array(name)
            arr = self._arrays[name] = self._open_array(group, name)
        return arr

    def _row_array(self, name: str) -> Any:
        """Array ``name`` for lazy row reads: at a URL with the chunk cache on
        (``JASPER_ZARR_CACHE_DIR``), opened on a :class:`~jasper_zarr.cache.CachingStore`, so
        repeated rows come from local disk; a preload (:meth:`read_into`) bypasses the cache."""
        arr = self._array(name)
        if self._pinned is not None:
            return arr
        cached = self._row_arrays.get(name)
        if cached is None:
            cache = ChunkCache.from_env()
            if cache is None:
                return arr
            import zarr

            store = CachingStore(arr.store, cache, scope=str(self.where))
            group = self._wrap(None, lambda: zarr.open_group(store=store, mode="r",
                                                             zarr_format=3), key=GROUP_FILE)
            cached = self._row_arrays[name] = self._open_array(group, name)
        return cached

    def _open_array(self, group: Any, name: str) -> Any:
        """Array ``name`` of the group; a missing, damaged or foreign ``name/zarr.json`` is a
        FormatError naming that file (zarr raises JSON, pydantic-style or KeyError errors)."""
        import zarr

        key = f"{name}/{GROUP_FILE}"
        try:
            arr = group[name]
        except JasperError:
            raise
        except (KeyError, FileNotFoundError):
            raise FormatError(self._where_str(key), f"array {name!r} has no metadata file",
                              array=name) from None
        except Exception as exc:  # zarr's metadata parsing raises many kinds
            raise FormatError(self._where_str(key), "array metadata is unreadable (damaged "
                              f"zarr.json?): {type(exc).__name__}: {_short(exc)}",
                              array=name) from None
        if not isinstance(arr, zarr.Array):
            raise FormatError(self._where_str(key), f"{name!r} is a zarr group, expected an "
                              "array", array=name)
        return arr

    def _missing_array(self, name: str) -> FormatError:
        if name not in ALL_ARRAYS:
            return FormatError(self._where_str(), f"array {name!r} is not in this store",
                               array=name)
        return FormatError(self._where_str(name), f"array {name!r} is missing from the zarr "
                           "group", array=name)

    def _metadata(self, name: str) -> tuple[tuple[int, ...], str, Grid]:
        meta = self._meta.get(name)
        if meta is not None:
            return meta
        arr = self._array(name)
        shape = tuple(int(s) for s in arr.shape)
        logical = str(arr.attrs.get(ATTR_DTYPE, ""))
        stored = np.dtype(str(arr.dtype))
        if logical not in STORAGE_NUMPY or STORAGE_NUMPY[logical] != stored:
            raise ShapeError(f"{self._where_str(name)}: {name} is stored as {stored} but its "
                             f"{ATTR_DTYPE} attribute says {logical!r}", array=name,
                             rule="dtype", path=self._where_str(name))
        shards = arr.shards or arr.chunks
        grid = Grid(shard_rows=int(shards[0]), chunk_rows=int(arr.chunks[0]))
        meta = self._meta[name] = (shape, logical, grid)
        return meta

    def array_names(self) -> list[str]:
        """Catalogue arrays among the group's children, from one listing of the group (the
        members' metadata is read when an array is used, so one damaged ``zarr.json`` is an
        error naming that file, not a failure of every member read at once)."""
        names = self._names
        if names is not None and self._pid == os.getpid():
            return names
        from zarr.core.sync import sync

        store = self._open_group().store

        async def children() -> set[str]:
            return {k async for k in store.list_dir("")}

        present = self._wrap(None, lambda: sync(children()))
        names = self._names = [n for n in ALL_ARRAYS if n in present]
        if len(names) > 1:
            self._open_arrays(names)
        return names

    def _open_arrays(self, names: list[str]) -> None:
        """Open the metadata of every array in ``names`` at once, in one call into zarr's
        event loop: one by one, each open is a round trip to that loop (and over an object
        store one request), about 1 ms apiece locally, which was most of the time it took to
        open a dataset. An array that fails here is left unopened: its first use opens it
        again and raises the error naming its own ``zarr.json``."""
        import asyncio

        import zarr
        from zarr.core.sync import sync

        group = self._open_group()
        async_group = getattr(group, "_async_group", None)
        todo = [n for n in names if n not in self._arrays]
        if async_group is None or not todo:
            return

        async def open_all() -> list[Any]:
            return await asyncio.gather(*(async_group.getitem(n) for n in todo),
                                        return_exceptions=True)

        try:
            got = sync(open_all())
        except Exception:  # the loop itself failed: every array opens on its first use
            return
        for name, node in zip(todo, got, strict=True):
            if isinstance(node, zarr.AsyncArray):
                self._arrays.setdefault(name, zarr.Array(node))

    def info(self, name: str) -> ArrayInfo:
        shape, logical, _ = self._metadata(name)
        info = ArrayInfo(shape, torch_dtype(logical))
        spec = ALL_ARRAYS.get(name)
        if spec is not None and len(shape) != spec.rank:
            raise ShapeError(f"{self._where_str(name)}: {name} has shape {shape}, expected rank "
                             f"{spec.rank}", array=name, rule="rank", path=self._where_str(name))
        rec = self.manifest.arrays.get(name)
        if rec is not None and (tuple(rec.shape) != shape or rec.dtype != logical):
            raise ShapeError(f"{self._where_str(name)}: {name} is {shape} {logical} in the store "
                             f"but the manifest records {tuple(rec.shape)} {rec.dtype}",
                             array=name, rule="manifest shape", path=self._where_str(name))
        return info

    def missing_chunks(self, name: str) -> list[str]:
        """Shard keys the array's shape implies that are not in the store (empty when sound)."""
        shape, _, grid = self._metadata(name)
        present = self._chunk_listing(name)
        return [k for k in expected_chunk_keys(name, shape, grid) if k not in present]

    def _chunk_listing(self, name: str) -> set[str]:
        """Every object key of the group, from one listing per reader and process (an object
        store answers a listing in pages of 1,000 keys: one request instead of one per
        array)."""
        from zarr.core.sync import sync

        listing = self._listing
        if listing is not None and listing[0] == os.getpid():
            return listing[1]
        store = self._array(name).store

        async def every_key() -> set[str]:
            return {k async for k in store.list()}

        keys = self._wrap(name, lambda: sync(every_key()))
        self._listing = (os.getpid(), keys)
        return keys

    def _check_chunks(self, name: str) -> None:
        if name in self._checked:
            return
        missing = self.missing_chunks(name)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FormatError(self._where_str(missing[0]), f"chunk object {missing[0]!r} of "
                              f"array {name!r} is missing{more}; zarr would read it as zeros",
                              array=name)
        self._checked.add(name)

    # --- reads -------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self.check_out(name, out)
        if out.device.type != "cpu":
            raise ValueError(f"read_into({name!r}): out must be a CPU tensor, got {out.device}")
        if out.numel() == 0:
            return out
        self._check_chunks(name)
        _, logical, grid = self._metadata(name)
        target = out if out.is_contiguous() else torch.empty(info.shape, dtype=info.dtype)
        buf = _storage_view(target, logical)
        arr = self._array(name)
        layout = self._shard_layout(name)
        with byte_bar(info.nbytes if info.nbytes >= PROGRESS_MIN_BYTES else 0,
                      f"reading {name}", None) as update:
            if layout is not None:
                # every byte is about to be written: one page fault per 2 MiB, not per 4 KiB
                advise_huge_pages(buf.ctypes.data, buf.nbytes)
                self._preload_shards(name, arr, layout, buf, update)
            else:
                self._preload_via_zarr(name, arr, grid, buf, update)
        if target is not out:
            out.copy_(target)
        return out

    def _shard_layout(self, name: str) -> ShardLayout | None:
        """The writer's layout of array ``name`` when the fast preload can read it, else
        ``None`` (a zarr array of other software: read through zarr)."""
        if name in self._layouts:
            return self._layouts[name]
        arr = self._array(name)
        layout = self._layouts[name] = self._wrap(
            name, lambda: ShardLayout.of(arr.metadata.to_dict(), np.dtype(str(arr.dtype)),
                                         arr.metadata.fill_value))
        return layout

    def _preload_shards(self, name: str, arr: Any, layout: ShardLayout, buf: np.ndarray,
                        update: Callable[[int], Any]) -> None:
        """Every shard of ``name`` read and decoded into its rows of ``buf`` without zarr's
        codec pipeline (:mod:`jasper_zarr.shardread`): first every shard's index, then the
        shards' data as ranged reads of about :data:`PRELOAD_PIECE_BYTES`
        (:data:`REMOTE_PIECE_BYTES` over an object store), all in parallel threads (the reads,
        the checksums and the decoders release the GIL)."""
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        flat = buf.reshape(-1).view(np.uint8)
        rb = layout.row_bytes
        ndim = len(layout.shape)
        store = arr.store
        prototype = default_buffer_prototype()
        pinned = self._pinned
        piece_bytes = PRELOAD_PIECE_BYTES if pinned is not None else REMOTE_PIECE_BYTES
        keys = [shard_key(name, i, ndim) for i in range(layout.n_shards)]

        def rows_of(shard: int) -> np.ndarray:
            a, b = layout.shard_span(shard)
            return flat[a * rb : b * rb]

        def fd_of(shard: int) -> int:
            assert pinned is not None
            fd = pinned.fd(keys[shard])
            if fd is None:
                raise FormatError(self._where_str(keys[shard]), f"chunk object "
                                  f"{keys[shard]!r} of array {name!r} is missing", array=name)
            return fd

        def fetch(shard: int, request: Any) -> np.ndarray:
            got = sync(store.get(keys[shard], prototype, request))
            if got is None:  # deleted after the listing: an error, never zeros
                raise FormatError(self._where_str(keys[shard]), f"chunk object "
                                  f"{keys[shard]!r} of array {name!r} vanished after the "
                                  "listing", array=name)
            return np.asarray(got.as_numpy_array()).reshape(-1).view(np.uint8)

        def index_of(shard: int) -> list[Piece]:
            """The shard's index and its pieces still to read; a shard no larger than a
            piece is read whole with its index in one request, and decoded here."""
            where = self._where_str(keys[shard])
            a, b = layout.shard_span(shard)
            whole: np.ndarray | None = None
            if pinned is not None and layout.compressor == "none":
                index = read_index_local(layout, fd_of(shard), where, name)
            else:
                if (b - a) * rb <= piece_bytes:
                    whole = read_range(fd_of(shard), 0, None) if pinned is not None \
                        else fetch(shard, None)
                    tail, size = whole[-layout.index_bytes:], int(whole.size)
                elif pinned is not None:
                    index = read_index_local(layout, fd_of(shard), where, name)
                else:
                    tail, size = fetch(shard, SuffixByteRequest(layout.index_bytes)), None
                if whole is not None or pinned is None:
                    index = parse_index(layout, tail, size, where, name)
            pieces, empty = plan_pieces(layout, shard, index,
                                        piece_bytes if whole is None else 1 << 62)
            if empty:
                fill_chunks(layout, shard, empty, rows_of(shard))
                update(sum(min(layout.chunk_rows, b - a - j * layout.chunk_rows)
                           for j in empty) * rb)
            if whole is None:
                return pieces
            for piece in pieces:
                decode_piece(layout, piece, whole[piece.start : piece.stop], rows_of(shard),
                             where, name)
                update(piece.row_bytes(layout))
            return []

        def read_piece(piece: Piece) -> None:
            where = self._where_str(keys[piece.shard])
            rows = rows_of(piece.shard)
            if pinned is not None and layout.compressor == "none":
                read_piece_local(layout, piece, fd_of(piece.shard), rows, where, name)
            elif pinned is not None:
                data = read_range(fd_of(piece.shard), piece.start, piece.stop)
                decode_piece(layout, piece, data, rows, where, name)
            else:
                data = fetch(piece.shard, RangeByteRequest(piece.start, piece.stop))
                decode_piece(layout, piece, data, rows, where, name)
            update(piece.row_bytes(layout))

        def run(fn: Callable[[Any], T], items: list[Any], key_of: Callable[[Any], int]
                ) -> list[T]:
            def one(item: Any) -> T:
                return self._wrap(name, lambda: fn(item), key=keys[key_of(item)])

            if len(items) <= 1:
                return [one(i) for i in items]
            return list(_preload_pool(pinned is not None).map(one, items))

        shards = list(range(layout.n_shards))
        pieces = [p for ps in run(index_of, shards, lambda s: s) for p in ps]
        run(read_piece, pieces, lambda p: p.shard)

    def _preload_via_zarr(self, name: str, arr: Any, grid: Grid, buf: np.ndarray,
                          update: Callable[[int], Any]) -> None:
        """Groups of whole shards read through zarr's codec pipeline, concurrently (the path
        for arrays whose layout :mod:`jasper_zarr.shardread` does not read)."""
        n = int(buf.shape[0])
        shards = [(a, min(n, a + grid.shard_rows)) for a in range(0, n, grid.shard_rows)]
        row_bytes = buf.nbytes // max(1, n)

        def one(span: tuple[int, int]) -> None:
            a, b = span
            self._wrap(name, lambda: arr.get_basic_selection(
                np.s_[a:b], out=_ndbuffer(buf[a:b])))
            update((b - a) * row_bytes)

        if len(shards) == 1:
            one(shards[0])
        else:
            with ThreadPoolExecutor(min(PRELOAD_THREADS, len(shards))) as pool:
                list(pool.map(one, shards))

    def read_slice_into(self, name: str, start: int, stop: int, out: torch.Tensor
                        ) -> torch.Tensor:
        """Rows ``start:stop`` decoded straight into ``out`` (core checked the bounds)."""
        return self._slice_into(self._array(name), name, start, stop, out)

    def _slice_into(self, arr: Any, name: str, start: int, stop: int, out: torch.Tensor
                    ) -> torch.Tensor:
        if stop <= start:
            return out
        self._check_chunks(name)
        _, logical, _ = self._metadata(name)
        buf = _storage_view(out, logical)
        self._wrap(name, lambda: arr.get_basic_selection(np.s_[start:stop],
                                                         out=_ndbuffer(buf)))
        return out

    def read_sorted_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Sorted unique ``rows`` (core's :meth:`StoreReader.read_rows` checked, sorted and
        de-duplicated them and un-permutes the result).

        An array in the writer's layout is read by :func:`jasper_zarr.rowread.read_rows`: only
        the inner chunks holding the rows, as coalesced ranged reads all in flight together,
        shard indexes read once per reader, the chunk cache consulted per chunk. Any other
        layout goes through zarr: one slice when the rows coalesce into one span, else one
        orthogonal selection of exactly these rows.
        """
        info = self.info(name)
        self._check_chunks(name)
        _, logical, _ = self._metadata(name)
        layout = self._shard_layout(name)
        if layout is not None:
            data = torch.empty((int(rows.shape[0]), *info.shape[1:]), dtype=info.dtype)
            self._wrap(name, lambda: self._rows_in_layout(name, layout, rows.numpy(),
                                                          _storage_view(data, logical)))
            return data
        spans = plan_spans(rows, merge_gap_rows(ArrayInfo(info.shape[1:], info.dtype).nbytes))
        if len(spans) == 1:
            a, b = spans[0]
            data = self._slice_into(self._row_array(name), name, a, b,
                                    torch.empty((b - a, *info.shape[1:]), dtype=info.dtype))
            pos = span_positions(spans, rows)
            return data if pos is None else data.index_select(0, pos)
        data = torch.empty((int(rows.shape[0]), *info.shape[1:]), dtype=info.dtype)
        buf = _storage_view(data, logical)
        arr = self._row_array(name)
        idx = rows.numpy()
        self._wrap(name, lambda: arr.get_orthogonal_selection((idx,), out=_ndbuffer(buf)))
        return data

    def _rows_in_layout(self, name: str, layout: ShardLayout, rows: np.ndarray,
                        out: np.ndarray) -> None:
        from jasper_zarr import rowread

        indexes = self._indexes.get(name)
        if indexes is None or indexes.layout != layout:
            indexes = self._indexes[name] = rowread.ShardIndexes(layout, name, self._where_str)
        fetcher = rowread.RangeFetcher(self._array(name).store, self._where_str, name)
        local_fd = None
        if self._pinned is not None:
            suffixes = self._local_suffixes(name, layout)
            cache, gap = None, rowread.LOCAL_GAP_BYTES
            local_fd = self._local_fd(name)
        else:
            def suffixes(keys: list[str]) -> list[tuple[np.ndarray, int | None]]:
                return fetcher.suffixes(keys, layout.index_bytes)

            cache, gap = ChunkCache.from_env(), rowread.REMOTE_GAP_BYTES
        rowread.read_rows(layout, name, rows, out, indexes=indexes, fetcher=fetcher,
                          suffixes=suffixes, gap_bytes=gap, where=self._where_str,
                          pool=_preload_pool(local_fd is not None), local_fd=local_fd, cache=cache,
                          scope=str(self.where))

    def _local_fd(self, name: str) -> Callable[[str], int]:
        """The pinned descriptor of shard object ``key`` (missing: a FormatError)."""
        assert self._pinned is not None
        pinned = self._pinned

        def fd(key: str) -> int:
            got = pinned.fd(key)
            if got is None:
                raise FormatError(self._where_str(key), f"chunk object {key!r} of array "
                                  f"{name!r} is missing", array=name)
            return got

        return fd

    def _local_suffixes(self, name: str, layout: ShardLayout
                        ) -> Callable[[list[str]], list[tuple[np.ndarray, int | None]]]:
        """Shard index reader of a pinned local group: each tail with the file's size."""
        fd_of = self._local_fd(name)

        def suffixes(keys: list[str]) -> list[tuple[np.ndarray, int | None]]:
            out: list[tuple[np.ndarray, int | None]] = []
            for key in keys:
                fd = fd_of(key)
                size = os.fstat(fd).st_size
                out.append((read_range(fd, max(0, size - layout.index_bytes), size), size))
            return out

        return suffixes


_pools: dict[tuple[int, bool], ThreadPoolExecutor] = {}


def _preload_pool(local: bool = False) -> ThreadPoolExecutor:
    """This process's read threads, started once (starting threads for every array cost more
    than reading a small one on a loaded machine); a forked child makes its own. Reads of
    local files are CPU work (page-cache copies, checksums): one thread per core, as more only
    contend; reads over a network wait on it: :data:`PRELOAD_THREADS`."""
    key = (os.getpid(), local)
    pool = _pools.get(key)
    if pool is None:
        with _pool_lock:
            pool = _pools.get(key)
            if pool is None:
                for old in [k for k in _pools if k[0] != key[0]]:
                    del _pools[old]
                size = max(2, os.cpu_count() or 2) if local else PRELOAD_THREADS
                pool = _pools[key] = ThreadPoolExecutor(
                    min(size, PRELOAD_THREADS), thread_name_prefix="jasper-zarr-read")
    return pool


_pool_lock = threading.Lock()


def _short(exc: BaseException, limit: int = 300) -> str:
    """One line of an exception's message (zarr's validation errors span many lines)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _storage_view(t: torch.Tensor, logical: str) -> np.ndarray:
    """A writable numpy view of a contiguous CPU tensor, in the stored dtype."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


__all__ = ["ZarrReader", "dtype_name"]
