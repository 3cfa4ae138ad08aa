"""Reading ``dataset.h5``: preload, lazy row access, worker safety, the original's files.

- **Preload.** :meth:`HDF5Reader.read_slice_into` hands the numpy view of the caller's tensor
  to h5py's ``read_direct``: HDF5 decodes (or, for a contiguous array, ``pread``\\ s) straight
  into it; core's ``read_into`` calls it once with the whole destination. No intermediate copy.
- **Lazy rows.** :meth:`HDF5Reader.read_rows` on an uncompressed (contiguous) array is one
  ``index_select`` on a read-only memory map of the dataset's bytes at its file offset
  (``madvise(MADV_RANDOM)``: no read-ahead for random rows; HDF5 is not involved). On a chunked
  array it sorts and de-duplicates the indices (HDF5 needs increasing selections, and sorted
  access decodes each chunk once), reads a dense span, a few runs or a point selection,
  whichever reads least, then un-permutes.
- **Workers.** h5py handles are not fork-safe and cannot be pickled. The reader opens the file
  lazily in the process that reads, remembers that process id and reopens after a fork; its
  pickled state holds paths and small derived arrays only, so it ships to spawned workers.
- **Bad input.** A missing, foreign (not HDF5) or truncated file, a missing dataset, or a dataset
  with the wrong shape or dtype raises :class:`~jasper.errors.DatasetNotFoundError`,
  :class:`~jasper.errors.FormatError` or :class:`~jasper.errors.ShapeError` naming the file and
  the array. h5py's generic ``OSError`` never escapes.
"""

from __future__ import annotations

import functools
import mmap as _mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from jasper.backend import ArrayInfo, StoreReader, check_format_version
from jasper.dtypes import LOGICAL_DTYPES, STORAGE_NUMPY, from_storage, to_storage
from jasper.errors import DatasetNotFoundError, FormatError, ShapeError
from jasper.files import DatasetDir, OutsideDatasetError, ProcessLocal
from jasper.lazy import lazy_torch
from jasper.manifest import Manifest
from jasper.ptload import load_pt_tensor
from jasper.rows import merge_gap_rows, plan_spans, span_positions
from jasper.schema import ALL_ARRAYS
from jasper_hdf5.layout import (
    ATTR_DTYPE,
    ATTR_LAYOUT_VERSION,
    FILE_NAME,
    LAYOUT_VERSION,
    LEGACY_KEYWORD_GROUP,
    SPLIT_PT_FALLBACK,
    attr_text,
    candidate_paths,
)
from jasper_hdf5.structure import StructureError, check_group_index, find_superblock

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

T = TypeVar("T")

#: Chunk cache per open dataset while reading: a sorted batch of random rows revisits a chunk
#: only while it walks through it, so a few chunks suffice.
READ_CACHE_BYTES = 4 << 20
#: HDF5 calls cost more than a file read: merge row runs whose gaps are this many times core's
#: gap (a chunk decoded once serves both runs).
DENSE_GAP_FACTOR = 4
#: Read the coalesced spans one call each when there are at most this many; more spans become
#: one point selection.
MAX_RUN_CALLS = 8

_CSR = ("pair_keyword_offsets", "pair_keyword_ids")


def open_h5(files: DatasetDir, name: str = FILE_NAME) -> Any:
    """Open member ``name`` of the pinned dataset directory read-only with h5py; typed errors
    for a missing, foreign or broken file. h5py gets ``/proc/self/fd/N`` of a descriptor opened
    through ``files``, so it opens exactly the pinned generation's file."""
    import h5py

    file = files.member(name)
    try:
        fd = files.open_fd(name)
    except DatasetNotFoundError:
        raise DatasetNotFoundError(
            file, "HDF5 file", "An hdf5 dataset directory holds dataset.h5 beside config.json"
        ) from None
    try:
        # HDF5 follows the group index unchecked (a damaged B-tree can loop it forever):
        # walk it first, with bounds (jasper_hdf5.structure)
        size = os.fstat(fd).st_size
        try:
            check_group_index(lambda at, n: os.pread(fd, n, at), size)
        except StructureError as exc:
            if not _has_signature(fd):
                raise FormatError(file, "not an HDF5 file (no HDF5 signature)") from None
            raise FormatError(file, f"damaged HDF5 group index: {exc}") from None
        proc = files.fd_path(fd, name)
        # "best-effort": take HDF5's file lock where the filesystem supports it, and open anyway
        # where it does not (NFS, some container mounts), instead of failing.
        return h5py.File(proc, "r", locking="best-effort", rdcc_nbytes=READ_CACHE_BYTES)
    except OSError as exc:
        if not h5py.is_hdf5(proc):
            raise FormatError(file, "not an HDF5 file (no HDF5 signature)") from None
        raise FormatError(file, "cannot open the HDF5 file (truncated or corrupt?): "
                          f"{str(exc).replace(proc, name)}") from None
    finally:
        os.close(fd)


def _has_signature(fd: int) -> bool:
    try:
        find_superblock(lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size)
    except StructureError:
        return False
    return True


def load_pt_split(files: DatasetDir, member: str, name: str) -> torch.Tensor:
    """A split saved by the original system as ``<split>_idx.pt`` beside the HDF5 file, loaded
    by core's weights-only loader; integer ids in a dtype the data model does not allow for
    them (e.g. int16) are widened to int64, compact int32 ids stay as saved (``info`` checks
    the rest)."""
    t = load_pt_tensor(files, member, array=name)
    integer = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    if not integer or str(t.dtype).removeprefix("torch.") in ALL_ARRAYS[name].dtypes:
        return t
    return t.to(torch.int64).contiguous()

def legacy_keyword_csr(file: Path, group: Any, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original system's ``pair_data/keyword_ids/<row>`` datasets as CSR tensors.

    Names are parsed and checked in one numpy pass; the per-pair datasets are then opened and
    read with h5py's low-level calls, straight into the flat values array (there is no way to
    read many small datasets in one HDF5 call).
    """
    import h5py

    names = list(group.keys())
    where = f"{LEGACY_KEYWORD_GROUP} group"
    try:
        rows = np.asarray(names, dtype=np.str_).astype(np.int64) if names else np.empty(0, np.int64)
    except ValueError:
        bad = next(n for n in names if not n.strip().lstrip("-").isdigit())
        raise FormatError(file, f"{where}: member {bad!r} is not a pair row number",
                          array="pair_keyword_ids") from None
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    expected = np.arange(n_pairs, dtype=np.int64)
    if rows.shape[0] != n_pairs or not np.array_equal(rows, expected):
        k = min(rows.shape[0], n_pairs)
        diff = np.flatnonzero(rows[:k] != expected[:k])
        if diff.size:
            i = int(diff[0])
            problem = (f"pair {i} has no keyword dataset" if rows[i] > i
                       else f"member {names[order[i]]!r} is not a row of the {n_pairs} pairs")
        elif rows.shape[0] < n_pairs:
            problem = f"pair {rows.shape[0]} has no keyword dataset"
        else:
            problem = f"member {names[order[n_pairs]]!r} is not a row of the {n_pairs} pairs"
        raise FormatError(file, f"{where}: {problem}", array="pair_keyword_ids")
    gid = group.id
    dsids = [h5py.h5d.open(gid, names[i].encode()) for i in order]
    lengths = np.fromiter((d.get_space().get_simple_extent_npoints() for d in dsids),
                          dtype=np.int64, count=len(dsids))
    offsets = np.zeros(n_pairs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int64)
    for i in np.flatnonzero(lengths).tolist():
        d = dsids[i]
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        mspace = h5py.h5s.create_simple((hi - lo,))
        kind = d.dtype.kind
        if kind in "iu":
            d.read(mspace, d.get_space(), values[lo:hi])
            continue
        if kind != "f":
            raise FormatError(file, f"{where}: pair {i} holds {d.dtype} values, expected "
                              "integers", array="pair_keyword_ids")
        tmp = np.empty(hi - lo, dtype=np.float64)
        d.read(mspace, d.get_space(), tmp)
        if not np.array_equal(tmp, np.trunc(tmp)):
            raise FormatError(file, f"{where}: pair {i} holds non-integer keyword ids",
                              array="pair_keyword_ids")
        values[lo:hi] = tmp
    return torch.from_numpy(offsets), torch.from_numpy(values)


@dataclass(frozen=True)
class _Entry:
    """Where one array comes from: an HDF5 dataset, the legacy keyword group, or a .pt file."""

    kind: str  # "dataset" | "legacy_csr" | "pt"
    location: str  # HDF5 path or file path
    shape: tuple[int, ...] = ()
    logical: str = ""


@dataclass
class _Handles:
    """What one process holds open: the h5py file, its datasets and the maps of their bytes."""

    h5: Any
    dsets: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, torch.Tensor | None] = field(default_factory=dict)


def _close_handles(handles: _Handles) -> None:
    handles.dsets.clear()
    handles.maps.clear()
    handles.h5.close()


class HDF5Reader(StoreReader):
    """A read handle on one ``dataset.h5`` (see the module docstring).

    ``allow_external=True`` trusts HDF5 external links, external raw storage and virtual
    datasets (read through HDF5, never mapped); by default they are refused, because they make
    the dataset read files outside its directory.
    """

    backend_name = "hdf5"

    def __init__(self, path: Path, manifest: Manifest, *, allow_external: bool = False,
                 follow_links: bool = False) -> None:
        super().__init__(path, manifest, follow_links=follow_links)
        self.file = self.path / FILE_NAME
        self.allow_external = allow_external
        self._entries: dict[str, _Entry | None] = {}
        # arrays that are not plain datasets (legacy CSR, .pt splits), decoded once
        self._loaded: dict[str, torch.Tensor] = {}
        self._handle: ProcessLocal[_Handles] = ProcessLocal(self._open_handles, _close_handles)

    # --- process-local handles ---------------------------------------------------------------
    def _open_handles(self) -> _Handles:
        f = self._wrap(None, lambda: open_h5(self.files))
        try:
            # reading the root group's attributes opens the root object: a damaged header
            # there (no message saying it is a group) fails in h5py with a KeyError
            version = self._wrap(None, lambda: f.attrs.get(ATTR_LAYOUT_VERSION))
            if version is not None:
                check_format_version(version, LAYOUT_VERSION, self.file,
                                     f"file attribute {ATTR_LAYOUT_VERSION}", "jasper-hdf5")
        except BaseException:
            f.close()
            raise
        return _Handles(f)

    def _file(self) -> Any:
        return self._handle.get().h5

    def check_open(self) -> None:
        """Open the file now, so that a missing, foreign or truncated file fails on open."""
        self._file()

    def close(self) -> None:
        self._handle.close()
        self._loaded.clear()
        super().close()

    def _wrap(self, name: str | None, fn: Callable[[], T]) -> T:
        """Run an h5py call; its generic errors become a FormatError naming file and array."""
        with self.typed_errors(self.file, name, "HDF5 read failed (truncated or corrupt file?)"):
            return fn()

    # --- what is where -----------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry | None:
        if name not in ALL_ARRAYS:
            return None
        if name not in self._entries:
            self._entries[name] = self._wrap(name, lambda: self._resolve(name))
        return self._entries[name]

    def _resolve(self, name: str) -> _Entry | None:
        import h5py

        f = self._file()
        if name in _CSR:
            group = self._get(f, LEGACY_KEYWORD_GROUP, name)
            if isinstance(group, h5py.Group):
                return _Entry("legacy_csr", LEGACY_KEYWORD_GROUP)
        for p in candidate_paths(name):
            obj = self._get(f, p, name)
            if obj is None:
                continue
            if not isinstance(obj, h5py.Dataset):
                raise FormatError(self.file, f"{p!r} is a {type(obj).__name__}, expected a "
                                  "dataset", array=name)
            self._check_storage(name, p, obj)
            return _Entry("dataset", p, tuple(int(s) for s in obj.shape),
                          self._logical_dtype(name, p, obj))
        if name in SPLIT_PT_FALLBACK and self.files.exists(f"{name}.pt"):
            return _Entry("pt", f"{name}.pt")
        return None

    def _get(self, f: Any, hpath: str, name: str) -> Any:
        """``f[hpath]`` or None; an external link on the way is refused unless trusted."""
        import h5py

        node = f
        parts = hpath.split("/")
        for i, part in enumerate(parts):
            if not isinstance(node, h5py.Group):
                where = "/".join(parts[:i])
                raise FormatError(self.file, f"{where!r} is a {type(node).__name__}, expected "
                                  f"a group holding {hpath!r}", array=name)
            link = node.get(part, getlink=True)
            if link is None:
                return None
            if isinstance(link, h5py.ExternalLink) and not self.allow_external:
                where = "/".join(parts[: i + 1])
                raise OutsideDatasetError(
                    self.file, f"{where!r} is an external link to {link.filename!r}:"
                    f"{link.path!r}; jasper reads only data inside the dataset directory "
                    "(open with allow_external=True to trust it)", array=name)
            node = node.get(part)
            if node is None:
                return None
        return node

    def _check_storage(self, name: str, hpath: str, dset: Any) -> None:
        """Refuse external raw storage and virtual datasets (unless trusted), and storage that
        does not hold the dataset's extent (unallocated, truncated), before anything is read:
        an HDF5 dataset may claim 10^15 rows it never wrote."""
        import h5py

        if not self.allow_external:
            if dset.is_virtual:
                raise OutsideDatasetError(
                    self.file, f"{hpath!r} is a virtual dataset (its data lives in other files "
                    "or datasets); open with allow_external=True to trust it", array=name)
            if dset.external:
                files = ", ".join(repr(str(e[0])) for e in dset.external)
                raise OutsideDatasetError(
                    self.file, f"{hpath!r} keeps its data in external file(s) {files}; open "
                    "with allow_external=True to trust them", array=name)
        if dset.is_virtual or dset.external or not dset.size:
            return
        stored = np.dtype(dset.dtype)
        nbytes = int(dset.size) * stored.itemsize
        layout = dset.id.get_create_plist().get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = dset.id.get_offset()
            if offset is None:
                raise FormatError(self.file, f"{hpath!r} claims {tuple(dset.shape)} but its "
                                  "storage was never written (rule: stored data covers the "
                                  "shape)", array=name)
            size = self.files.size(FILE_NAME)
            if offset + nbytes > size:
                raise FormatError(self.file, f"{hpath!r} needs bytes {offset}..{offset + nbytes}"
                                  f" but the file has {size} (truncated? rule: stored data "
                                  "covers the shape)", array=name)
        elif layout == h5py.h5d.CHUNKED:
            chunks = dset.chunks
            expected = 1
            for n, c in zip(dset.shape, chunks, strict=True):
                expected *= -(-int(n) // int(c))
            have = dset.id.get_num_chunks()
            if have < expected:
                raise FormatError(self.file, f"{hpath!r} claims {tuple(dset.shape)} in "
                                  f"{expected} chunks but only {have} were written (rule: stored "
                                  "data covers the shape)", array=name)

    def _logical_dtype(self, name: str, hpath: str, dset: Any) -> str:
        stored = np.dtype(dset.dtype)
        attr = dset.attrs.get(ATTR_DTYPE)
        if attr is not None:
            logical = attr_text(attr)
            if logical not in STORAGE_NUMPY or STORAGE_NUMPY[logical] != stored.newbyteorder("="):
                raise ShapeError(
                    f"{self.file}: {name} ({hpath}) is stored as {stored} but its {ATTR_DTYPE} "
                    f"attribute says {logical!r}", array=name, rule="dtype", path=self.file)
            return logical
        # The original system's files carry no attribute: the stored dtype is the logical one,
        # except that integer ids in a dtype the data model does not allow for them (int16,
        # unsigned) are widened to int64; int32 ids are legal compact ids and stay int32 (the
        # batch gather widens the rows it selects).
        logical = stored.name
        if logical not in LOGICAL_DTYPES or stored.kind not in "iufb":
            raise ShapeError(f"{self.file}: {name} ({hpath}) has dtype {stored}, which jasper "
                             "cannot read", array=name, rule="dtype", path=self.file)
        allowed = ALL_ARRAYS[name].dtypes
        if logical not in allowed and stored.kind in "iu" and "int64" in allowed:
            logical = "int64"
        return logical

    def _require(self, name: str) -> _Entry:
        entry = self._entry(name)
        if entry is None:
            if name not in ALL_ARRAYS:
                raise self._missing(name)
            where = " or ".join(repr(p) for p in candidate_paths(name))
            extra = f" and there is no {name}.pt beside it" if name in SPLIT_PT_FALLBACK else ""
            raise FormatError(self.file, f"array {name!r} is missing: the file has no dataset "
                              f"{where}{extra}", array=name)
        return entry

    def _load(self, name: str, entry: _Entry) -> torch.Tensor:
        t = self._loaded.get(name)
        if t is not None:
            return t
        if entry.kind == "pt":
            self._loaded[name] = load_pt_split(self.files, entry.location, name)
        else:
            f = self._file()
            index = self._entry("pair_index")
            if index is not None and index.kind == "dataset":
                n_pairs = index.shape[0]
            else:
                n_pairs = len(f[LEGACY_KEYWORD_GROUP])
            offsets, values = self._wrap(
                name, lambda: legacy_keyword_csr(self.file, f[LEGACY_KEYWORD_GROUP], n_pairs))
            self._loaded["pair_keyword_offsets"] = offsets
            self._loaded["pair_keyword_ids"] = values
        return self._loaded[name]

    def _dset(self, name: str, entry: _Entry) -> Any:
        handles = self._handle.get()
        d = handles.dsets.get(name)
        if d is None:
            d = handles.dsets[name] = self._wrap(name, lambda: handles.h5[entry.location])
        return d

    def _map(self, name: str, entry: _Entry) -> torch.Tensor | None:
        """A read-only tensor over a map of an uncompressed contiguous dataset's bytes (stored
        dtype, bfloat16 as such), else None. Only local contiguous data is ever mapped."""
        handles = self._handle.get()
        if name in handles.maps:
            return handles.maps[name]
        dset = self._dset(name, entry)
        mapped: torch.Tensor | None = None
        stored = np.dtype(dset.dtype)
        # only local contiguous data: never a dataset reached through an external link (its
        # offset is in another file), external raw storage or a virtual dataset
        if (dset.chunks is None and dset.compression is None and not dset.external
                and not dset.is_virtual and dset.size and stored.isnative
                and dset.file.filename == handles.h5.filename):
            offset = dset.id.get_offset()
            nbytes = int(dset.size) * stored.itemsize
            with self.files.open_file(FILE_NAME) as fh:
                # a file shorter than the dataset's extent would SIGBUS on touch: read through
                # HDF5 instead, which reports the truncation as an error
                if offset is not None and offset + nbytes <= os.fstat(fh.fileno()).st_size:
                    mm = np.memmap(fh, mode="r", dtype=stored, offset=offset,
                                   shape=tuple(dset.shape))
                    raw = getattr(mm, "_mmap", None)
                    if raw is not None and hasattr(_mmap, "MADV_RANDOM"):
                        raw.madvise(_mmap.MADV_RANDOM)
                    # the tensor shares the map (and keeps it alive); it is only ever read
                    stored_logical = "bfloat16" if entry.logical == "bfloat16" else stored.name
                    mapped = from_storage(mm, stored_logical)
        handles.maps[name] = mapped
        return mapped

    # --- the StoreReader API -----------------------------------------------------------------
    def array_names(self) -> list[str]:
        return [n for n in ALL_ARRAYS if self._entry(n) is not None]

    def info(self, name: str) -> ArrayInfo:
        entry = self._require(name)
        if entry.kind == "dataset":
            return self.check_info(name, ArrayInfo(entry.shape, entry.logical),
                                   self.file)
        t = self._load(name, entry)
        return self.check_info(name, ArrayInfo(tuple(t.shape), t.dtype), self.file)

    def read_slice_into(self, name: str, start: int, stop: int, out: torch.Tensor
                        ) -> torch.Tensor:
        """Rows ``start:stop`` into ``out``: HDF5 decodes (or ``pread``\\ s) straight into its
        memory (``read_direct``); a legacy CSR or ``.pt`` split is copied from its decoded form."""
        entry = self._require(name)
        if entry.kind != "dataset":
            t = self._load(name, entry)
            return out.copy_(t if t.dim() == 0 else t[start:stop])
        if out.numel():
            dset = self._dset(name, entry)
            sel = np.s_[start:stop] if dset.ndim else None
            self._wrap(name, lambda: dset.read_direct(to_storage(out), source_sel=sel))
        return out

    def read_numpy(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        entry = self._require(name)  # h5py decodes into numpy: validation needs no torch
        if entry.kind != "dataset":
            return super().read_numpy(name, start, stop)
        dset = self._dset(name, entry)
        got = self._wrap(name, lambda: dset[np.s_[start:stop] if dset.ndim else ()])
        return np.asarray(got).astype(STORAGE_NUMPY[entry.logical], copy=False)

    def read_sorted_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Sorted unique in-range rows (core checked, sorted and de-duplicated them): one
        gather from the map of a contiguous array (HDF5 is not involved), else the coalesced
        spans through HDF5 when they are few, else one point selection."""
        info = self.info(name)
        entry = self._require(name)
        if entry.kind != "dataset":
            return self._load(name, entry).index_select(0, rows)
        mapped = self._map(name, entry)
        if mapped is not None:
            return mapped.index_select(0, rows).to(info.dtype)
        dset = self._dset(name, entry)
        row_bytes = ArrayInfo(info.shape[1:], info.dtype).nbytes
        spans = plan_spans(rows, merge_gap_rows(max(row_bytes, 1)) * DENSE_GAP_FACTOR)
        k = rows.shape[0]
        if len(spans) <= MAX_RUN_CALLS:
            covered = sum(b - a for a, b in spans)
            buf_t = torch.empty((covered, *info.shape[1:]), dtype=info.dtype)
            buf = to_storage(buf_t)
            at = 0
            for a, b in spans:
                self._wrap(name, functools.partial(dset.read_direct, buf, source_sel=np.s_[a:b],
                                                   dest_sel=np.s_[at : at + b - a]))
                at += b - a
            pos = span_positions(spans, rows)
            return buf_t if pos is None else buf_t.index_select(0, pos)
        out = torch.empty((k, *info.shape[1:]), dtype=info.dtype)
        idx = rows.numpy()
        self._wrap(name, lambda: dset.read_direct(to_storage(out), source_sel=np.s_[idx]))
        return out
