"""Reading ``dataset.h5``: preload, lazy row access, worker safety, the original's files.

- **Preload.** :meth:`HDF5Reader.read_into` hands the numpy view of the caller's tensor to
  h5py's ``read_direct``: HDF5 decodes (or, for a contiguous array, ``pread``\\ s) straight into
  it; :meth:`HDF5Reader.read` allocates once and calls it. No intermediate copy.
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

import contextlib
import functools
import itertools
import mmap as _mmap
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from jasper.backend import ArrayInfo, StoreReader
from jasper.dtypes import STORAGE_NUMPY, TORCH_DTYPES, from_storage, to_storage, torch_dtype
from jasper.errors import (
    DatasetNotFoundError,
    FormatError,
    JasperError,
    ShapeError,
    UnsafeFileError,
)
from jasper.manifest import Manifest
from jasper.schema import ALL_ARRAYS
from jasper_hdf5.layout import (
    ATTR_DTYPE,
    ATTR_LAYOUT_VERSION,
    FILE_NAME,
    LAYOUT_VERSION,
    LEGACY_KEYWORD_GROUP,
    SPLIT_PT_FALLBACK,
    candidate_paths,
)

T = TypeVar("T")

#: Chunk cache per open dataset while reading: a sorted batch of random rows revisits a chunk
#: only while it walks through it, so a few chunks suffice.
READ_CACHE_BYTES = 4 << 20
#: Read the whole span ``[first, last]`` of a sorted row batch when it is at most this many
#: times the number of rows asked for (one sequential read beats a scattered selection).
DENSE_SPAN_FACTOR = 4
#: Read the runs of consecutive rows one call each when there are at most this many.
MAX_RUN_CALLS = 8

_CSR = ("pair_keyword_offsets", "pair_keyword_ids")


def open_h5(file: Path) -> Any:
    """Open ``file`` read-only with h5py; typed errors for a missing, foreign or broken file."""
    import h5py

    if not file.is_file():
        raise DatasetNotFoundError(
            file, "HDF5 file", "An hdf5 dataset directory holds dataset.h5 beside config.json"
        )
    try:
        # "best-effort": take HDF5's file lock where the filesystem supports it, and open anyway
        # where it does not (NFS, some container mounts), instead of failing.
        return h5py.File(file, "r", locking="best-effort", rdcc_nbytes=READ_CACHE_BYTES)
    except OSError as exc:
        if not h5py.is_hdf5(file):
            raise FormatError(file, "not an HDF5 file (no HDF5 signature)") from None
        raise FormatError(file, f"cannot open the HDF5 file (truncated or corrupt?): {exc}") from None


def load_pt_split(file: Path, name: str) -> torch.Tensor:
    """A split saved by the original system as ``<split>_idx.pt``, loaded with
    ``weights_only=True`` only (never a full unpickle: that can run code)."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            file, "refused: loading it needs unrestricted unpickling, which can run arbitrary "
            f"code ({str(exc).splitlines()[0][:200]})", array=name,
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FormatError(file, f"not a readable .pt file: {type(exc).__name__}: {exc}",
                          array=name) from None
    if not isinstance(obj, torch.Tensor):
        raise FormatError(file, f"expected a tensor of pair ids, found {type(obj).__name__}",
                          array=name)
    if obj.dim() != 1 or obj.dtype.is_floating_point or obj.dtype in (torch.bool, torch.complex64):
        raise ShapeError(f"{file}: {name} is {tuple(obj.shape)} {obj.dtype}, expected a 1-D "
                         "integer tensor", array=name, rule="split shape", path=file)
    return obj.to(torch.int64).contiguous()


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


class HDF5Reader(StoreReader):
    """A read handle on one ``dataset.h5`` (see the module docstring)."""

    backend_name = "hdf5"

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        self.file = self.path / FILE_NAME
        self._entries: dict[str, _Entry | None] = {}
        # arrays that are not plain datasets (legacy CSR, .pt splits), decoded once
        self._loaded: dict[str, torch.Tensor] = {}
        self._h5: Any = None
        self._pid: int | None = None
        self._dsets: dict[str, Any] = {}
        self._maps: dict[str, torch.Tensor | None] = {}

    # --- process-local handles ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_h5=None, _pid=None, _dsets={}, _maps={})
        return state

    def _file(self) -> Any:
        pid = os.getpid()
        if self._h5 is not None and self._pid == pid:
            return self._h5
        if self._h5 is not None:
            # inherited through fork: the parent's HDF5 state must not be used here
            self._drop_handles()
        f = self._wrap(None, lambda: open_h5(self.file))
        version = f.attrs.get(ATTR_LAYOUT_VERSION)
        if version is not None and int(version) > LAYOUT_VERSION:
            f.close()
            raise FormatError(
                self.file, f"written with layout version {int(version)}, newer than this "
                f"jasper-hdf5 reads ({LAYOUT_VERSION}); upgrade with `pip install -U jasper-hdf5`"
            )
        self._h5, self._pid = f, pid
        return f

    def _drop_handles(self) -> None:
        h5, self._h5, self._pid = self._h5, None, None
        self._dsets = {}
        self._maps = {}
        if h5 is not None:
            # closing a handle inherited from another process's HDF5 state may fail
            with contextlib.suppress(Exception):
                h5.close()

    def check_open(self) -> None:
        """Open the file now, so that a missing, foreign or truncated file fails on open."""
        self._file()

    def close(self) -> None:
        self._drop_handles()
        self._loaded.clear()

    def _wrap(self, name: str | None, fn: Callable[[], T]) -> T:
        """Run an h5py call; its generic errors become a FormatError naming file and array."""
        try:
            return fn()
        except JasperError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise FormatError(
                self.file, f"HDF5 read failed (truncated or corrupt file?): "
                f"{type(exc).__name__}: {exc}", array=name,
            ) from None

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
            group = f.get(LEGACY_KEYWORD_GROUP)
            if isinstance(group, h5py.Group):
                return _Entry("legacy_csr", LEGACY_KEYWORD_GROUP)
        for p in candidate_paths(name):
            obj = f.get(p)
            if obj is None:
                continue
            if not isinstance(obj, h5py.Dataset):
                raise FormatError(self.file, f"{p!r} is a {type(obj).__name__}, expected a "
                                  "dataset", array=name)
            return _Entry("dataset", p, tuple(int(s) for s in obj.shape),
                          self._logical_dtype(name, p, obj))
        if name in SPLIT_PT_FALLBACK and (self.path / f"{name}.pt").is_file():
            return _Entry("pt", str(self.path / f"{name}.pt"))
        return None

    def _logical_dtype(self, name: str, hpath: str, dset: Any) -> str:
        stored = np.dtype(dset.dtype)
        attr = dset.attrs.get(ATTR_DTYPE)
        if attr is not None:
            logical = attr.decode() if isinstance(attr, bytes) else str(attr)
            if logical not in STORAGE_NUMPY or STORAGE_NUMPY[logical] != stored.newbyteorder("="):
                raise ShapeError(
                    f"{self.file}: {name} ({hpath}) is stored as {stored} but its {ATTR_DTYPE} "
                    f"attribute says {logical!r}", array=name, rule="dtype", path=self.file)
            return logical
        # The original system's files carry no attribute: the stored dtype is the logical one,
        # except that narrower integer ids are widened to the int64 the data model asks for.
        logical = stored.name
        if logical not in TORCH_DTYPES or stored.kind not in "iufb":
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
            self._loaded[name] = load_pt_split(Path(entry.location), name)
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
        f = self._file()  # first: it forgets the handles of a parent process
        d = self._dsets.get(name)
        if d is None:
            d = self._dsets[name] = self._wrap(name, lambda: f[entry.location])
        return d

    def _map(self, name: str, entry: _Entry) -> torch.Tensor | None:
        """A read-only tensor over a map of an uncompressed contiguous dataset's bytes (stored
        dtype, bfloat16 as such), else None."""
        dset = self._dset(name, entry)
        if name in self._maps:
            return self._maps[name]
        mapped: torch.Tensor | None = None
        stored = np.dtype(dset.dtype)
        if (dset.chunks is None and dset.compression is None and not dset.external
                and dset.size and stored.isnative):
            offset = dset.id.get_offset()
            nbytes = int(dset.size) * stored.itemsize
            # a file shorter than the dataset's extent would SIGBUS on touch: read through HDF5
            # instead, which reports the truncation as an error
            if offset is not None and offset + nbytes <= self.file.stat().st_size:
                mm = np.memmap(self.file, mode="r", dtype=stored, offset=offset,
                               shape=tuple(dset.shape))
                raw = getattr(mm, "_mmap", None)
                if raw is not None and hasattr(_mmap, "MADV_RANDOM"):
                    raw.madvise(_mmap.MADV_RANDOM)
                # the tensor shares the map (and keeps it alive); it is only ever read
                stored_logical = "bfloat16" if entry.logical == "bfloat16" else stored.name
                mapped = from_storage(mm, stored_logical)
        self._maps[name] = mapped
        return mapped

    # --- the StoreReader API -----------------------------------------------------------------
    def array_names(self) -> list[str]:
        return [n for n in ALL_ARRAYS if self._entry(n) is not None]

    def info(self, name: str) -> ArrayInfo:
        entry = self._require(name)
        if entry.kind == "dataset":
            info = ArrayInfo(entry.shape, torch_dtype(entry.logical))
        else:
            t = self._load(name, entry)
            info = ArrayInfo(tuple(t.shape), t.dtype)
        self._check(name, info)
        return info

    def _check(self, name: str, info: ArrayInfo) -> None:
        from jasper.dtypes import dtype_name

        spec = ALL_ARRAYS[name]
        logical = dtype_name(info.dtype)
        if len(info.shape) != spec.rank:
            raise ShapeError(f"{self.file}: {name} has shape {info.shape}, expected rank "
                             f"{spec.rank}", array=name, rule="rank", path=self.file)
        if logical not in spec.dtypes:
            raise ShapeError(f"{self.file}: {name} has dtype {logical}; allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype",
                             path=self.file)
        rec = self.manifest.arrays.get(name)
        if rec is not None and (tuple(rec.shape) != info.shape or rec.dtype != logical):
            raise ShapeError(f"{self.file}: {name} is {info.shape} {logical} in the file but "
                             f"the manifest records {tuple(rec.shape)} {rec.dtype}", array=name,
                             rule="manifest shape", path=self.file)

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        entry = self._require(name)
        if entry.kind != "dataset":
            return self._load(name, entry).clone()
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        info = self.check_out(name, out)
        if out.device.type != "cpu":
            raise ValueError(f"read_into({name!r}): out must be a CPU tensor, got {out.device}")
        entry = self._require(name)
        if entry.kind != "dataset":
            return out.copy_(self._load(name, entry))
        if out.numel() == 0:
            return out
        dset = self._dset(name, entry)
        target = out if out.is_contiguous() else torch.empty(info.shape, dtype=info.dtype)
        buf = to_storage(target)  # a view of target's memory: HDF5 writes straight into it
        self._wrap(name, lambda: dset.read_direct(buf))
        if target is not out:
            out.copy_(target)
        return out

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.info(name)
        n = info.shape[0]
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        entry = self._require(name)
        if entry.kind != "dataset":
            return self._load(name, entry)[start:stop].clone()
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.dtype)
        if stop == start:
            return out
        mapped = self._map(name, entry)
        if mapped is not None:
            return out.copy_(mapped[start:stop])  # copy_ also widens legacy narrow ints
        dset = self._dset(name, entry)
        buf = to_storage(out)
        self._wrap(name, lambda: dset.read_direct(buf, source_sel=np.s_[start:stop]))
        return out

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        info = self.info(name)
        rows = torch.as_tensor(rows)
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype.is_complex \
                or rows.dtype == torch.bool:
            raise TypeError(f"read_rows({name!r}): rows must be a 1-D integer tensor, got "
                            f"{tuple(rows.shape)} {rows.dtype}")
        rows = rows.to(device="cpu", dtype=torch.int64)
        n = info.shape[0]
        if rows.numel() == 0:
            return torch.empty((0, *info.shape[1:]), dtype=info.dtype)
        lo, hi = torch.aminmax(rows)
        if int(lo) < 0 or int(hi) >= n:
            bad = int(torch.nonzero((rows < 0) | (rows >= n))[0])
            raise IndexError(f"read_rows({name!r}): rows[{bad}] = {int(rows[bad])} is out of "
                             f"range for {n} rows ({self.file})")
        entry = self._require(name)
        if entry.kind != "dataset":
            return self._load(name, entry).index_select(0, rows)
        mapped = self._map(name, entry)
        if mapped is not None:
            # One gather from the map: the kernel pages the rows in, so nothing gains from
            # sorting (MADV_RANDOM already stops read-ahead), and HDF5 is not involved.
            return mapped.index_select(0, rows).to(info.dtype)
        uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        data = self._read_sorted(name, entry, uniq.numpy(), info)
        if uniq.shape[0] == rows.shape[0] and bool(torch.equal(uniq, rows)):
            return data
        return data.index_select(0, inverse)

    def _read_sorted(self, name: str, entry: _Entry, idx: np.ndarray,
                     info: ArrayInfo) -> torch.Tensor:
        """Rows ``idx`` (sorted, unique, in range) of a dataset read through HDF5."""
        dset = self._dset(name, entry)
        k = idx.shape[0]
        first, last = int(idx[0]), int(idx[-1])
        span = last - first + 1
        out = torch.empty((k, *info.shape[1:]), dtype=info.dtype)
        buf = to_storage(out)
        if span <= DENSE_SPAN_FACTOR * k:
            if span == k:
                self._wrap(name, lambda: dset.read_direct(buf, source_sel=np.s_[first:last + 1]))
                return out
            whole = torch.empty((span, *info.shape[1:]), dtype=info.dtype)
            wbuf = to_storage(whole)
            self._wrap(name, lambda: dset.read_direct(wbuf, source_sel=np.s_[first:last + 1]))
            return whole.index_select(0, torch.from_numpy(idx - first))
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        if breaks.shape[0] < MAX_RUN_CALLS:
            bounds = [0, *breaks.tolist(), k]
            for a, b in itertools.pairwise(bounds):
                s = int(idx[a])
                self._wrap(name, functools.partial(dset.read_direct, buf,
                                                   source_sel=np.s_[s : s + (b - a)],
                                                   dest_sel=np.s_[a:b]))
            return out
        self._wrap(name, lambda: dset.read_direct(buf, source_sel=np.s_[idx]))
        return out
