"""Integrity validation of a dataset: structural rules raise, value rules warn.

Every check is vectorised (a few reductions per array; the exact first bad row is located only
after a reduction has failed), so checking 10^7 pairs takes well under a second for the index
arrays. The rules are written once, for numpy: a torch tensor is viewed as a numpy array (no
copy on the CPU) where a rule meets it (:func:`as_numpy`), so ``jasper validate`` of a backend
that reads into numpy (:meth:`~jasper.backend.StoreReader.read_numpy`) imports no torch. Structural failures raise :class:`~jasper.errors.IntegrityError` naming the array, the
first bad row and the rule, e.g. ``hard_negatives[1532, 3] = 90211 but source_embs has 90000
rows``. Value rules (docs/data-model.md#what-is-checked-and-when) are data-quality findings: a
:class:`DataQualityWarning` on open, a :class:`~jasper.errors.DataQualityError` under ``strict``.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np

from jasper.dtypes import STORAGE_NUMPY, dtype_name, storage_logical
from jasper.errors import (
    ChecksumError,
    DataQualityError,
    FormatError,
    IntegrityError,
    ManifestError,
    ShapeError,
)
from jasper.lazy import lazy_torch
from jasper.manifest import MANIFEST_NAME, Checksummer, Manifest
from jasper.schema import ALL_ARRAYS, ARRAYS, PAIRS, Cols, Role, split_array

if TYPE_CHECKING:
    import torch

    from jasper.backend import ArrayInfo, StoreReader
    from jasper.location import Location
    from jasper.schema import ArraySpec
else:
    torch = lazy_torch(globals())

#: What a rule checks: a numpy array in the storage dtype (bfloat16 as its ``uint16`` bit
#: pattern, :mod:`jasper.dtypes`) or a torch tensor.
Checkable: TypeAlias = "np.ndarray | torch.Tensor"

#: Rows per chunk for the float checks, so mapped arrays are scanned without a full copy.
_FLOAT_CHUNK_BYTES = 64 << 20


class DataQualityWarning(UserWarning):
    """A value rule is broken (the dataset still opens)."""


@dataclass
class Finding:
    """One broken value rule: which array, which rule, how many rows, the first one."""

    array: str
    rule: str
    count: int
    first_row: int
    message: str


@dataclass
class ValidationReport:
    """What :func:`validate` checked and found."""

    path: Path | None
    n_pairs: int
    seconds: float
    findings: list[Finding] = field(default_factory=list)
    checksums_verified: int = 0
    backend_problems: list[str] = field(default_factory=list)
    #: derived steering: the rows computed and found finite by a deep validation
    derived_rows_checked: int = 0

    @property
    def pairs_per_second(self) -> float:
        return self.n_pairs / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return not self.findings and not self.backend_problems


def _cols_expected(spec_cols: Cols | None, manifest: Manifest) -> int | None:
    if spec_cols is None:
        return None
    return {Cols.EMBEDDING_DIM: manifest.embedding_dim, Cols.N_NEG: manifest.n_neg, Cols.TWO: 2}[
        spec_cols
    ]


def as_numpy(t: Checkable) -> np.ndarray:
    """``t`` as the rules see it: a numpy array passes as it is; a tensor becomes a numpy view
    of its bytes in the storage dtype (no copy for a CPU tensor, strides kept; bfloat16 as its
    ``uint16`` bit pattern)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _logical_dtype(t: Checkable) -> str:
    """The logical dtype name of ``t`` (numpy ``uint16`` is bfloat16's bit pattern); a dtype
    jasper cannot hold is named as it is, for the dtype rule to report."""
    try:
        return storage_logical(t.dtype) if isinstance(t, np.ndarray) else dtype_name(t.dtype)
    except TypeError:
        return str(t.dtype)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: bfloat16 is float32's top half)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _check_columns(name: str, shape: tuple[int, ...], manifest: Manifest,
                   path: Path | None) -> None:
    """The column count of a rank-2 array whose width the manifest fixes (``embedding_dim``,
    ``n_neg``, 2), from its shape alone."""
    spec = ALL_ARRAYS[name]
    want = _cols_expected(spec.cols, manifest)
    if want is not None and shape[1] != want:
        raise ShapeError(
            f"{name} has {shape[1]} columns but {spec.cols.value if spec.cols else ''} is "
            f"{want} in the manifest", array=name, rule="columns", path=path)


def _first_true(mask: np.ndarray) -> tuple[int, ...]:
    """Position of the first True element (row-major), as an index tuple."""
    flat = int(np.argmax(mask.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape))


def _fmt_pos(name: str, pos: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(str(p) for p in pos)}]"


# --- checks a backend (or core) runs before trusting what a file or a manifest claims --------
#: An array name a backend may be asked to write or read: a catalogue name, never a path.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def check_array_names(names: Iterable[str], *, catalogue: Iterable[str] | None = None,
                      path: str | Path | None = None) -> None:
    """Refuse array names that could reach outside a dataset directory (anything but letters,
    digits and ``_``: no path separators, no ``..``) and, given a ``catalogue``, names not in it.
    Core calls it before every backend's ``write_arrays`` and on every manifest it opens, so no
    backend has to trust a name."""
    allowed = None if catalogue is None else frozenset(catalogue)
    for name in names:
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or (
                allowed is not None and name not in allowed):
            raise ShapeError(
                f"array name {name!r} is not a catalogue array name (letters, digits and _ "
                "only; names are never paths)"
                + (f"; the data model has: {', '.join(sorted(allowed))}" if allowed else ""),
                array=str(name), rule="catalogue array name", path=path)


def check_tensor_layout(name: str, t: Checkable, path: str | Path | None = None) -> None:
    """Refuse a tensor whose strides make rows or elements share memory (stride 0 from
    ``expand``, overlapping ``as_strided``): one stored row would stand for many, which no
    writer produces and a checksum of the logical bytes would not reveal. Backends call it on
    every tensor they load."""
    if isinstance(t, np.ndarray):  # numpy counts strides in bytes, torch in elements
        numel, strides = t.size, tuple(st // max(t.itemsize, 1) for st in t.strides)
    else:
        numel, strides = t.numel(), tuple(t.stride())
    if numel == 0:
        return  # no elements, nothing to alias (libraries give empty arrays any strides)
    dims = sorted((abs(st), sz) for st, sz in zip(strides, t.shape, strict=True) if sz > 1)
    extent = 1  # elements spanned by the dimensions checked so far
    for st, sz in dims:
        if st < extent:
            what = "stride 0" if st == 0 else "overlapping strides"
            raise ShapeError(
                f"{name} has {what} (strides {strides} for shape {tuple(t.shape)}): its rows "
                "alias one another (a stride-0 or overlapping view was stored); rewrite the "
                "array from a contiguous tensor", array=name, rule="rows do not alias",
                path=path)
        extent += st * (sz - 1)


def check_claimed_sizes(
    claims: Mapping[str, tuple[tuple[int, ...], int]],
    available_bytes: int,
    *,
    max_ratio: float = 1.0,
    path: str | Path | None = None,
    source: str = "the store",
) -> None:
    """Refuse shapes whose bytes (shape product x itemsize) exceed what the files can hold:
    ``available_bytes`` (the dataset's file sizes) times ``max_ratio`` (the best compression
    ratio the backend can reach; 1 for raw storage), plus 1 MiB. Run before anything is
    allocated from a claimed shape, so a manifest or file claiming 10^15 rows is an error,
    not an allocation."""
    bound = available_bytes * max_ratio + (1 << 20)
    total = 0
    for name, (shape, itemsize) in claims.items():
        nbytes = math.prod(int(s) for s in shape) * int(itemsize)
        total += nbytes
        if nbytes > bound:
            raise FormatError(
                path or ".", f"{source} claims {name} has shape {tuple(shape)} "
                f"({nbytes:.3g} bytes) but the dataset's files hold {available_bytes:,} bytes; "
                "the size is corrupt or hostile", array=name)
    if total > bound:
        raise FormatError(path or ".", f"{source} claims {total:.3g} bytes of arrays but the "
                          f"dataset's files hold {available_bytes:,} bytes; the sizes are corrupt "
                          "or hostile")


def check_manifest_trust(manifest: Manifest, stored: Iterable[str], path: Path) -> None:
    """What a deep validation and a conversion must not take on trust: a jasper-written
    manifest (``schema_version`` set) records a checksum for every stored array, and its
    data-describing keys are unchanged since the write (their digests match)."""
    where = path / MANIFEST_NAME
    edited = manifest.edited_data_keys()
    if edited:
        raise ManifestError(
            where, f"{', '.join(repr(k) for k in edited)} changed after the dataset was written "
            "(the digest recorded at write time no longer matches): the manifest no longer "
            "describes the files; restore config.json or rewrite the dataset from its source")
    if manifest.is_seed_era:
        return  # the original system recorded no checksums
    for name in stored:
        rec = manifest.arrays.get(name)
        if rec is None or not rec.checksum:
            raise ChecksumError(
                f"the manifest records no checksum for {name!r}; a jasper-written dataset has "
                "one for every array, so the manifest was edited or damaged and the data cannot "
                "be verified: restore config.json or rewrite the dataset", array=name,
                rule="checksum recorded", path=path)


def check_shapes(arrays: Mapping[str, Checkable], manifest: Manifest, path: Path | None = None,
                 placeholders: Iterable[str] = ()) -> int:
    """Ranks, dtypes, columns, row counts and non-aliasing strides (except for
    ``placeholders``: stand-ins whose data the caller checks itself). Returns N_p."""
    for name in ARRAYS:
        if name not in arrays:
            raise IntegrityError(f"array {name!r} is missing", array=name, rule="required array",
                                 path=path)
    skip = frozenset(placeholders)
    for name in ARRAYS:
        if name not in skip:
            check_tensor_layout(name, arrays[name], path)
    n_pairs = int(arrays["pair_index"].shape[0])
    for name, spec in ARRAYS.items():
        t = arrays[name]
        if t.ndim != spec.rank:
            raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected rank {spec.rank}",
                             array=name, rule="rank", path=path)
        if _logical_dtype(t) not in spec.dtypes:
            raise ShapeError(f"{name} has dtype {_logical_dtype(t)}; allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype", path=path)
        _check_columns(name, tuple(t.shape), manifest, path)
        if spec.role is Role.PAIR and t.shape[0] != n_pairs:
            raise ShapeError(f"{name} has {t.shape[0]} rows but pair_index has {n_pairs} (N_p)",
                             array=name, row=min(n_pairs, int(t.shape[0])), rule="pair rows", path=path)
        if spec.role is Role.CSR_OFFSETS and t.shape[0] != n_pairs + 1:
            raise ShapeError(f"{name} has {t.shape[0]} rows, expected N_p + 1 = {n_pairs + 1}",
                             array=name, rule="csr offsets rows", path=path)
    check_compact_indices(arrays, manifest, path)
    return n_pairs


def check_compact_indices(arrays: Mapping[str, Checkable], manifest: Manifest,
                          path: Path | None = None,
                          rows: Mapping[str, Checkable] | None = None) -> None:
    """The dtype-capacity rule of compact index arrays (:mod:`jasper.index_dtypes`) on the
    arrays' dtypes and the row counts of ``rows`` (default: ``arrays``): shapes only."""
    from jasper.index_dtypes import check_index_capacity

    tables = arrays if rows is None else {**rows, **arrays}
    counts = {n: int(t.shape[0]) for n, t in tables.items() if t.ndim}
    counts[PAIRS] = counts.get("pair_index", 0)
    check_index_capacity({n: _logical_dtype(t) for n, t in arrays.items()}, counts,
                         n_tiers=manifest.n_tiers, path=path)


def _check_range(name: str, t: Checkable, bound: int, bound_name: str,
                 path: Path | None) -> None:
    a = as_numpy(t)
    if a.size == 0:
        return
    if int(a.min()) >= 0 and int(a.max()) < bound:
        return
    pos = _first_true((a < 0) | (a >= bound))
    value = int(a[pos])
    if value < 0:
        msg, rule = f"{_fmt_pos(name, pos)} = {value} is negative", "non-negative index"
    else:
        msg = f"{_fmt_pos(name, pos)} = {value} but {bound_name} has {bound} rows"
        rule = f"index < {bound_name} rows"
    raise IntegrityError(msg, array=name, row=pos[0], rule=rule, path=path)


def _float_chunks(a: np.ndarray) -> int:
    row = max(1, a[0].size * a.itemsize) if a.shape[0] else 1
    return max(1, _FLOAT_CHUNK_BYTES // row)


def _check_finite(name: str, t: Checkable, path: Path | None, row_offset: int = 0) -> None:
    a = as_numpy(t)
    if a.size == 0:
        return
    step = _float_chunks(a)
    bfloat16 = a.dtype == np.uint16  # bit patterns: NaN/Inf have every exponent bit set
    for start in range(0, a.shape[0], step):
        chunk = a[start : start + step]
        if bfloat16:
            bad = (chunk & 0x7F80) == 0x7F80
        else:
            # A sum is non-finite whenever any element is NaN/Inf, so one reduction clears the
            # chunk; only a non-finite sum (also possible from overflow) pays for the exact scan.
            acc = np.float32 if chunk.itemsize < 4 else chunk.dtype
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found below
                total = chunk.sum(dtype=acc)
            if np.isfinite(total):
                continue
            bad = ~np.isfinite(chunk)
        if bad.any():
            pos = _first_true(bad)
            value = float(_bf16_values(chunk[pos]) if bfloat16 else chunk[pos])
            pos = (pos[0] + start + row_offset, *pos[1:])
            raise IntegrityError(f"{_fmt_pos(name, pos)} = {value} is not finite", array=name,
                                 row=pos[0], rule="finite values", path=path)


def check_arrays(
    arrays: Mapping[str, Checkable],
    manifest: Manifest,
    *,
    path: Path | None = None,
    strict: bool = False,
    check_finite: bool = True,
    skip_finite: frozenset[str] = frozenset(),
    warn: bool = True,
) -> list[Finding]:
    """Check every rule of the data model on in-memory (or mapped) tensors or numpy arrays
    (storage dtype, see :func:`as_numpy`).

    ``skip_finite`` names float arrays whose NaN/Inf check the caller does itself (streamed).
    Raises :class:`IntegrityError` on the first structural failure. Returns the value-rule
    findings; each is also a :class:`DataQualityWarning` (when ``warn``), or raises
    :class:`DataQualityError` when ``strict``.
    """
    n_pairs = check_shapes(arrays, manifest, path, placeholders=skip_finite)
    rows = {n: int(arrays[n].shape[0]) for n in ARRAYS}
    rows[PAIRS] = n_pairs

    for name, spec in ARRAYS.items():
        t = arrays[name]
        if spec.references:
            if len(spec.references) > 1:  # one referenced table per column (pair_index)
                for col, ref in enumerate(spec.references):
                    _check_range_col(name, t, col, rows[ref], ref, path)
            else:
                ref = spec.references[0]
                _check_range(name, t, rows[ref], "pairs (N_p)" if ref == PAIRS else ref, path)
        if spec.non_negative:
            _check_non_negative(name, t, path)
        if check_finite and spec.finite and name not in skip_finite:
            _check_finite(name, t, path)

    _check_csr(arrays["pair_keyword_offsets"], arrays["pair_keyword_ids"], path)
    _check_disjoint_splits(arrays, n_pairs, path)

    findings = _quality_findings(arrays)
    for f in findings:
        if strict:
            raise DataQualityError(f.message, array=f.array, row=f.first_row, rule=f.rule, path=path)
        if warn:
            warnings.warn(f"{path or 'dataset'}: {f.message}", DataQualityWarning, stacklevel=2)
    return findings


def _check_non_negative(name: str, t: Checkable, path: Path | None) -> None:
    a = as_numpy(t)
    if a.size and int(a.min()) < 0:
        pos = _first_true(a < 0)
        raise IntegrityError(f"{_fmt_pos(name, pos)} = {int(a[pos])} is negative", array=name,
                             row=pos[0], rule="non-negative", path=path)


def _check_range_col(name: str, t: Checkable, col: int, bound: int, ref: str,
                     path: Path | None) -> None:
    c = as_numpy(t)[:, col]
    if c.size == 0:
        return
    if int(c.min()) >= 0 and int(c.max()) < bound:
        return
    row = int(np.flatnonzero((c < 0) | (c >= bound))[0])
    value = int(c[row])
    if value < 0:
        msg, rule = f"{name}[{row}, {col}] = {value} is negative", "non-negative index"
    else:
        # "pair_index references question/source ..." is the original system's phrase
        msg = (f"{name}[{row}, {col}] = {value} but {ref} has {bound} rows ({name} references "
               f"{ref.removesuffix('_embs')} {value}, out of range)")
        rule = f"index < {ref} rows"
    raise IntegrityError(msg, array=name, row=row, rule=rule, path=path)


def _check_csr(offsets_in: Checkable, values: Checkable, path: Path | None) -> None:
    name = "pair_keyword_offsets"
    offsets = as_numpy(offsets_in)
    if offsets.size == 0:
        raise IntegrityError(f"{name} is empty; it must hold N_p + 1 offsets", array=name, row=0,
                             rule="csr offsets", path=path)
    if int(offsets[0]) != 0:
        raise IntegrityError(f"{name}[0] = {int(offsets[0])} but CSR offsets start at 0",
                             array=name, row=0, rule="csr offsets start at 0", path=path)
    if offsets.size > 1:
        step = np.diff(offsets)
        if int(step.min()) < 0:
            row = int(np.flatnonzero(step < 0)[0]) + 1
            raise IntegrityError(
                f"{name}[{row}] = {int(offsets[row])} is smaller than {name}[{row - 1}] = "
                f"{int(offsets[row - 1])}; offsets must not decrease", array=name, row=row,
                rule="csr offsets non-decreasing", path=path)
    if int(offsets[-1]) != values.shape[0]:
        raise IntegrityError(
            f"{name}[-1] = {int(offsets[-1])} but pair_keyword_ids has {values.shape[0]} values",
            array=name, row=int(offsets.shape[0]) - 1, rule="csr offsets end at nnz", path=path)


def _check_disjoint_splits(arrays: Mapping[str, Checkable], n_pairs: int,
                           path: Path | None) -> None:
    owner = np.full((n_pairs,), -1, dtype=np.int8)
    for i, split in enumerate(("train", "val", "test")):
        name = split_array(split)
        idx = as_numpy(arrays[name])
        if idx.size == 0:
            continue
        prev = owner[idx]
        taken = prev >= 0
        if bool(taken.any()):
            row = int(np.flatnonzero(taken)[0])
            other = ("train", "val", "test")[int(prev[row])]
            which = "twice in the same split" if other == split else f"also in the {other} split"
            raise IntegrityError(
                f"{name}[{row}] = pair {int(idx[row])} is {which}; splits must be disjoint",
                array=name, row=row, rule="disjoint splits", path=path)
        owner[idx] = i
        # a repeat inside one split is invisible to the owner check above; catch it here
        if idx.size > 1 and int(np.unique(idx).size) != idx.size:
            order = np.argsort(idx, kind="stable")
            s = idx[order]
            dup = int(np.flatnonzero(s[1:] == s[:-1])[0])
            row = int(order[dup + 1])
            raise IntegrityError(
                f"{name}[{row}] = pair {int(idx[row])} appears twice in the {split} split",
                array=name, row=row, rule="disjoint splits", path=path)


def check_finite_chunks(name: str, chunks: Iterable[Checkable], path: Path | None = None) -> None:
    """The NaN/Inf rule of a float array streamed in row chunks (one pass, bounded memory):
    how arrays that stay in storage are checked without a whole copy."""
    row = 0
    for chunk in chunks:
        _check_finite(name, chunk, path, row_offset=row)
        row += chunk.shape[0]


def check_replacement(
    new: Mapping[str, Checkable],
    current: Mapping[str, Checkable],
    manifest: Manifest,
    *,
    path: Path | None = None,
    warn: bool = True,
) -> list[Finding]:
    """Check arrays re-read from storage (e.g. re-mined ``hard_negatives``) before they replace
    the ones a dataset serves: every rule of :func:`check_arrays` that involves them, against
    the row counts of the ``current`` arrays (which may be maps or meta tensors).

    Raises :class:`ShapeError` / :class:`IntegrityError` naming the array, row and rule; returns
    the value-rule findings (each also a :class:`DataQualityWarning` when ``warn``).
    """
    rows = {n: int(t.shape[0]) for n, t in current.items()}
    n_pairs = rows["pair_index"]
    rows[PAIRS] = n_pairs
    for name, t in new.items():
        spec = ARRAYS[name]
        if t.ndim != spec.rank:
            raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected rank {spec.rank}",
                             array=name, rule="rank", path=path)
        if _logical_dtype(t) not in spec.dtypes:
            raise ShapeError(f"{name} has dtype {_logical_dtype(t)}; allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype", path=path)
        want = _cols_expected(spec.cols, manifest)
        if want is not None and t.shape[1] != want:
            raise ShapeError(
                f"{name} has shape {tuple(t.shape)}: {t.shape[1]} columns but "
                f"{spec.cols.value if spec.cols else ''} is {want}", array=name, rule="columns",
                path=path)
        if spec.role is Role.PAIR and t.shape[0] != n_pairs:
            raise ShapeError(f"{name} has {t.shape[0]} rows but pair_index has {n_pairs} (N_p)",
                             array=name, row=min(n_pairs, int(t.shape[0])), rule="pair rows",
                             path=path)
        if len(spec.references) > 1:
            for col, ref in enumerate(spec.references):
                _check_range_col(name, t, col, rows[ref], ref, path)
        elif spec.references:
            ref = spec.references[0]
            _check_range(name, t, rows[ref], "pairs (N_p)" if ref == PAIRS else ref, path)
        if spec.non_negative:
            _check_non_negative(name, t, path)
    check_compact_indices(new, manifest, path, rows=current)
    findings = _quality_findings({**current, **new}, only=frozenset(new))
    if warn:
        for f in findings:
            warnings.warn(f"{path or 'dataset'}: {f.message}", DataQualityWarning, stacklevel=2)
    return findings


def _quality_findings(arrays: Mapping[str, Checkable],
                      only: frozenset[str] | None = None) -> list[Finding]:
    findings: list[Finding] = []
    neg = as_numpy(arrays["hard_negatives"]) if only is None or "hard_negatives" in only else None
    if neg is not None and neg.size:
        own = as_numpy(arrays["pair_index"])[:, 1:2]
        same = neg == own
        count = int(same.sum())
        if count:
            row, col = _first_true(same)
            findings.append(Finding(
                "hard_negatives", "negative differs from the pair's source", count, row,
                f"hard_negatives: {count} negative(s) equal the pair's own source, first "
                f"hard_negatives[{row}, {col}] = {int(neg[row, col])}"))
    for name, spec in ARRAYS.items():
        if spec.quality_range is None or (only is not None and name not in only):
            continue
        t = as_numpy(arrays[name])
        if t.size == 0:
            continue
        if t.dtype == np.uint16:
            t = _bf16_values(t)
        lo, hi = spec.quality_range
        bad = (t < lo) | (t > hi)
        count = int(bad.sum())
        if count:
            row = int(np.flatnonzero(bad)[0])
            findings.append(Finding(
                name, f"value in [{lo:g}, {hi:g}]", count, row,
                f"{name}: {count} value(s) outside [{lo:g}, {hi:g}], first {name}[{row}] = "
                f"{float(t[row]):g}"))
    return findings


def validate(
    path: str | Path | Location,
    *,
    deep: bool = False,
    strict: bool = False,
    backend: str = "auto",
    progress: bool | None = None,
) -> ValidationReport:
    """Open the dataset at ``path`` and check it.

    Always: the structural and value rules of the data model, and the arrays' shapes and dtypes
    against the manifest. ``deep``: also recompute every checksum recorded in the manifest and
    run the backend's own checks (e.g. SQLite ``integrity_check``). ``strict``: value-rule
    findings raise :class:`DataQualityError`.
    """
    from jasper.location import as_target
    from jasper.store import open_store

    # a local Path, or an object-store Location: it stands in for the Path in messages and
    # the report (both print as what the user typed and have a .name)
    p = cast(Path, as_target(path))
    t0 = time.perf_counter()
    with open_store(p, backend, mmap=False) as reader:
        from jasper.kinds import kind_job

        other_kind = kind_job(reader.manifest.dataset_kind, "validate")
        if other_kind is not None:
            report: ValidationReport = other_kind(reader, deep=deep, strict=strict,
                                                  progress=progress)
            return report
        manifest = reader.manifest
        from jasper.steering import stored_names

        infos = {n: reader.info(n) for n in stored_names(manifest) if reader.has(n)}
        check_manifest_trust(manifest, infos, p)
        check_manifest_records(infos, manifest, p)
        arrays, streamed = load_for_checks(reader, infos, ALL_ARRAYS, numpy=True)
        derived = _check_derived(arrays, reader, manifest, p)
        findings = check_arrays(arrays, manifest, path=p, strict=strict, warn=False,
                                skip_finite=frozenset(streamed) | derived)
        del arrays
        stream_finite_checks(reader, streamed, p, numpy=True)
        report = ValidationReport(p, int(infos["pair_index"].shape[0]), 0.0, findings)
        if deep:
            verify_stored(reader, report, [n for n in manifest.arrays if n in infos], infos,
                          progress)
            if derived:
                from jasper.registry import get_backend

                mapped = get_backend(reader.backend_name).capabilities.mmap
                report.derived_rows_checked = _check_derived_values(reader, manifest, p,
                                                                    mapped=mapped)
    report.seconds = time.perf_counter() - t0
    return report


def _check_derived(arrays: dict[str, Checkable], reader: StoreReader, manifest: Manifest,
                   path: Path) -> frozenset[str]:
    """Derived steering: the exception arrays' rules, and shape-only stand-ins for the
    derived steering arrays in ``arrays`` (those a partially derived dataset keeps stored are
    checked as stored arrays); returns their names (nothing when steering is stored)."""
    from jasper.dtypes import torch_dtype
    from jasper.steering import (
        EXCEPTION_ROWS,
        EXCEPTION_VALUES,
        check_exception_layout,
        check_exceptions,
        derived_spec,
        placeholder,
    )

    spec = derived_spec(manifest)
    if spec is None:
        return frozenset()
    n_pairs, dim = int(arrays["pair_index"].shape[0]), int(manifest.embedding_dim)
    dtype = torch_dtype(spec.dtype)
    rows, values = reader.read(EXCEPTION_ROWS), reader.read(EXCEPTION_VALUES)
    try:
        check_exception_layout({**{n: reader.info(n) for n in spec.stored_arrays},
                                EXCEPTION_ROWS: rows, EXCEPTION_VALUES: values}, spec, dim)
    except ShapeError as exc:
        raise ShapeError(str(exc), array=exc.array, rule=exc.rule, path=path) from None
    check_exceptions(rows, values, n_pairs=n_pairs, dim=dim, dtype=dtype,
                     expected=spec.exceptions, path=path, stored_ids=spec.stored_ids)
    for n in spec.derived_arrays:
        arrays[n] = placeholder(n_pairs, dim, dtype)
    return frozenset(spec.derived_arrays)


def _check_derived_values(reader: StoreReader, manifest: Manifest, path: Path, *,
                          mapped: bool) -> int:
    """Compute every derived steering row once (chunk by chunk) and check it is finite, so a
    deep validation proves what batches will serve. Returns the number of rows computed."""
    from jasper.dtypes import torch_dtype
    from jasper.steering import FORMULA_INPUTS, STEERING, derived_chunks, derived_spec, table_args

    spec = derived_spec(manifest)
    assert spec is not None
    tables = {n: reader.map(n) if mapped else reader.read(n) for n in FORMULA_INPUTS}
    rows = 0
    for v, start, got in derived_chunks(spec.formula, dtype=torch_dtype(spec.dtype),
                                        variants=spec.derived_ids, **table_args(tables)):
        _check_finite(f"{STEERING[v - 1]} (derived)", got, path, row_offset=start)
        rows += int(got.shape[0])
    return rows


def check_manifest_records(infos: Mapping[str, ArrayInfo], manifest: Manifest, p: Path) -> None:
    """Every array the manifest records is stored, with the recorded shape and dtype."""
    for n, rec in manifest.arrays.items():
        info = infos.get(n)
        if info is None:
            raise IntegrityError(f"array {n!r} is recorded in the manifest but missing from "
                                 "the store", array=n, rule="manifest arrays present", path=p)
        if tuple(info.shape) != tuple(rec.shape) or info.dtype_name != rec.dtype:
            raise ShapeError(
                f"{n} is {tuple(info.shape)} {info.dtype_name} in the store but the "
                f"manifest records {tuple(rec.shape)} {rec.dtype}", array=n,
                rule="manifest shape", path=p)


def load_for_checks(reader: StoreReader, infos: Mapping[str, ArrayInfo],
                    specs: Mapping[str, ArraySpec], *, numpy: bool = False
                    ) -> tuple[dict[str, Any], set[str]]:
    """The arrays the value rules look at, and the names of those whose NaN/Inf check
    :func:`stream_finite_checks` must stream. Large float arrays are never copied whole: mapped
    where the backend maps, otherwise stood in for by a zero-stride placeholder of the right
    shape and dtype. Validating a dataset larger than RAM works.

    ``numpy``: numpy arrays in the storage dtype (:meth:`StoreReader.map_numpy`,
    :meth:`StoreReader.read_numpy`), so a backend that reads into numpy needs no torch; else
    tensors."""
    from jasper.registry import get_backend

    mapped = get_backend(reader.backend_name).capabilities.mmap
    streamed: set[str] = set()
    arrays: dict[str, Any] = {}
    for n, info in infos.items():
        spec = specs[n]
        if mapped:
            view = reader.map_numpy(n) if numpy else None
            arrays[n] = view if view is not None else reader.map(n)
        elif spec.finite and spec.rank == 2:
            arrays[n] = (np.broadcast_to(np.zeros((), STORAGE_NUMPY[info.dtype_name]), info.shape)
                         if numpy else torch.zeros((), dtype=info.dtype).expand(info.shape))
            streamed.add(n)
        else:
            arrays[n] = reader.read_numpy(n) if numpy else reader.read(n)
    return arrays, streamed


def stream_finite_checks(reader: StoreReader, names: Iterable[str], p: Path, *,
                         numpy: bool = False) -> None:
    """The layout and NaN/Inf checks of arrays ``names``, chunk by chunk (numpy chunks from
    :meth:`StoreReader.read_numpy` with ``numpy``, else tensors)."""
    from jasper.backend import default_rows_per_chunk

    for n in sorted(names):
        row = 0
        if numpy:
            info = reader.info(n)
            step = default_rows_per_chunk(info)
            chunks: Iterable[Checkable] = (
                reader.read_numpy(n, start, min(info.shape[0], start + step))
                for start in range(0, info.shape[0], step))
        else:
            chunks = reader.iter_chunks(n)
        for chunk in chunks:
            check_tensor_layout(n, chunk, p)
            _check_finite(n, chunk, p, row_offset=row)
            row += chunk.shape[0]


def verify_stored(reader: StoreReader, report: ValidationReport, names: list[str],
                  infos: Mapping[str, ArrayInfo], progress: bool | None) -> None:
    """``validate --deep``'s part for every kind: the checksum of each of ``names`` recomputed
    from the store (under :meth:`StoreReader.reading_rows`, so no row change is half seen), then
    the backend's own checks; counts go into ``report``."""
    from jasper.progress import byte_bar
    from jasper.registry import get_backend

    p = report.path if report.path is not None else reader.path  # a Path, or a Location
    total = sum(infos[n].nbytes for n in names)
    with byte_bar(total, f"verifying {p.name}", progress) as update, reader.reading_rows():
        for n in names:
            rec = reader.manifest.arrays[n]
            if not rec.checksum:
                continue  # seed-era only: check_manifest_trust refused the others
            h = Checksummer()
            for chunk in reader.iter_chunks(n):
                h.update(chunk)
                update(chunk.numel() * chunk.element_size())
            if h.hexdigest() != rec.checksum:
                raise ChecksumError(
                    f"{n}: checksum {h.hexdigest()} does not match the manifest's "
                    f"{rec.checksum}; the array was changed or corrupted after it was "
                    "written", array=n, rule="checksum", path=p)
            report.checksums_verified += 1
    report.backend_problems = get_backend(reader.backend_name).deep_check(p)
    if report.backend_problems:
        raise IntegrityError(f"backend checks failed: {'; '.join(report.backend_problems)}",
                             rule="backend deep check", path=p)


def guard_write_arrays(cls: type) -> None:
    """Wrap ``cls.write_arrays`` (when the class defines one) so that every call, from core or
    direct, first passes :func:`check_array_names`: no backend can be made to write a file
    outside its directory by an array name. Called for every backend class on definition."""
    import functools

    impl = cls.__dict__.get("write_arrays")
    if impl is None or getattr(impl, "_jasper_names_checked", False):
        return

    @functools.wraps(impl)
    def write_arrays(self: object, directory: Path, arrays: Mapping[str, object], *args: object,
                     **kwargs: object) -> object:
        check_array_names(arrays, path=directory)
        return impl(self, directory, arrays, *args, **kwargs)

    write_arrays._jasper_names_checked = True  # type: ignore[attr-defined]
    cls.write_arrays = write_arrays  # type: ignore[attr-defined]


def check_info_columns(infos: Mapping[str, ArrayInfo], manifest: Manifest,
                       path: Path | None = None) -> None:
    """The rank and column count of every stored array against the manifest's
    ``embedding_dim`` and ``n_neg``, from shapes alone: run before anything is allocated from
    the manifest's sizes, so a manifest claiming ``embedding_dim`` 10^15 over 16-column files is
    a :class:`~jasper.errors.ShapeError`, not an allocation."""
    for name, info in infos.items():
        spec = ALL_ARRAYS.get(name)
        if spec is None:
            continue
        if len(info.shape) != spec.rank:
            raise ShapeError(f"{name} has shape {tuple(info.shape)}, expected rank {spec.rank}",
                             array=name, rule="rank", path=path)
        _check_columns(name, tuple(info.shape), manifest, path)
