"""Integrity validation of a dataset: structural rules raise, value rules warn.

Every check is vectorised (a few reductions per array; the exact first bad row is located only
after a reduction has failed), so checking 10^7 pairs takes well under a second for the index
arrays. Structural failures raise :class:`~jasper.errors.IntegrityError` naming the array, the
first bad row and the rule, e.g. ``hard_negatives[1532, 3] = 90211 but source_embs has 90000
rows``. Value rules (DATA_MODEL.md section 1) are data-quality findings: a
:class:`DataQualityWarning` on open, a :class:`~jasper.errors.DataQualityError` under ``strict``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from jasper.dtypes import dtype_name
from jasper.errors import ChecksumError, DataQualityError, IntegrityError, ShapeError
from jasper.manifest import Checksummer, Manifest
from jasper.schema import ARRAYS, PAIRS, Cols, Role, split_array

if TYPE_CHECKING:
    from jasper.location import Location

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


def _first_true(mask: torch.Tensor) -> tuple[int, ...]:
    """Position of the first True element (row-major), as an index tuple."""
    flat = int(torch.argmax(mask.reshape(-1).to(torch.uint8)))
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape))


def _fmt_pos(name: str, pos: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(str(p) for p in pos)}]"


def check_shapes(arrays: Mapping[str, torch.Tensor], manifest: Manifest, path: Path | None = None) -> int:
    """Ranks, dtypes, columns and row counts. Returns N_p."""
    for name in ARRAYS:
        if name not in arrays:
            raise IntegrityError(f"array {name!r} is missing", array=name, rule="required array",
                                 path=path)
    n_pairs = int(arrays["pair_index"].shape[0])
    for name, spec in ARRAYS.items():
        t = arrays[name]
        if t.dim() != spec.rank:
            raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected rank {spec.rank}",
                             array=name, rule="rank", path=path)
        if dtype_name(t.dtype) not in spec.dtypes:
            raise ShapeError(f"{name} has dtype {dtype_name(t.dtype)}; allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype", path=path)
        want = _cols_expected(spec.cols, manifest)
        if want is not None and t.shape[1] != want:
            raise ShapeError(
                f"{name} has {t.shape[1]} columns but {spec.cols.value if spec.cols else ''} is "
                f"{want}", array=name, rule="columns", path=path)
        if spec.role is Role.PAIR and t.shape[0] != n_pairs:
            raise ShapeError(f"{name} has {t.shape[0]} rows but pair_index has {n_pairs} (N_p)",
                             array=name, row=min(n_pairs, int(t.shape[0])), rule="pair rows", path=path)
        if spec.role is Role.CSR_OFFSETS and t.shape[0] != n_pairs + 1:
            raise ShapeError(f"{name} has {t.shape[0]} rows, expected N_p + 1 = {n_pairs + 1}",
                             array=name, rule="csr offsets rows", path=path)
    return n_pairs


def _check_range(name: str, t: torch.Tensor, bound: int, bound_name: str,
                 path: Path | None) -> None:
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if int(lo) >= 0 and int(hi) < bound:
        return
    pos = _first_true((t < 0) | (t >= bound))
    value = int(t[pos])
    if value < 0:
        msg, rule = f"{_fmt_pos(name, pos)} = {value} is negative", "non-negative index"
    else:
        msg = f"{_fmt_pos(name, pos)} = {value} but {bound_name} has {bound} rows"
        rule = f"index < {bound_name} rows"
    raise IntegrityError(msg, array=name, row=pos[0], rule=rule, path=path)


def _float_chunks(t: torch.Tensor) -> int:
    row = max(1, t[0].numel() * t.element_size()) if t.shape[0] else 1
    return max(1, _FLOAT_CHUNK_BYTES // row)


def _check_finite(name: str, t: torch.Tensor, path: Path | None, row_offset: int = 0) -> None:
    if t.numel() == 0:
        return
    step = _float_chunks(t)
    for start in range(0, t.shape[0], step):
        chunk = t[start : start + step]
        # A sum is non-finite whenever any element is NaN/Inf, so one reduction clears the chunk;
        # only a non-finite sum (also possible from overflow) pays for the exact scan.
        acc = torch.float32 if chunk.element_size() < 4 else chunk.dtype
        if torch.isfinite(chunk.sum(dtype=acc)):
            continue
        bad = ~torch.isfinite(chunk)
        if bad.any():
            pos = _first_true(bad)
            value = float(chunk[pos])
            pos = (pos[0] + start + row_offset, *pos[1:])
            raise IntegrityError(f"{_fmt_pos(name, pos)} = {value} is not finite", array=name,
                                 row=pos[0], rule="finite values", path=path)


def check_arrays(
    arrays: Mapping[str, torch.Tensor],
    manifest: Manifest,
    *,
    path: Path | None = None,
    strict: bool = False,
    check_finite: bool = True,
    skip_finite: frozenset[str] = frozenset(),
    warn: bool = True,
) -> list[Finding]:
    """Check every rule of the data model on in-memory (or mapped) tensors.

    ``skip_finite`` names float arrays whose NaN/Inf check the caller does itself (streamed).
    Raises :class:`IntegrityError` on the first structural failure. Returns the value-rule
    findings; each is also a :class:`DataQualityWarning` (when ``warn``), or raises
    :class:`DataQualityError` when ``strict``.
    """
    n_pairs = check_shapes(arrays, manifest, path)
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
        if spec.non_negative and t.numel() and int(t.min()) < 0:
            pos = _first_true(t < 0)
            raise IntegrityError(f"{_fmt_pos(name, pos)} = {int(t[pos])} is negative", array=name,
                                 row=pos[0], rule="non-negative", path=path)
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


def _check_range_col(name: str, t: torch.Tensor, col: int, bound: int, ref: str,
                     path: Path | None) -> None:
    c = t[:, col]
    if c.numel() == 0:
        return
    lo, hi = torch.aminmax(c)
    if int(lo) >= 0 and int(hi) < bound:
        return
    row = int(torch.nonzero((c < 0) | (c >= bound))[0])
    value = int(c[row])
    if value < 0:
        msg, rule = f"{name}[{row}, {col}] = {value} is negative", "non-negative index"
    else:
        msg, rule = f"{name}[{row}, {col}] = {value} but {ref} has {bound} rows", f"index < {ref} rows"
    raise IntegrityError(msg, array=name, row=row, rule=rule, path=path)


def _check_csr(offsets: torch.Tensor, values: torch.Tensor, path: Path | None) -> None:
    name = "pair_keyword_offsets"
    if offsets.numel() == 0:
        raise IntegrityError(f"{name} is empty; it must hold N_p + 1 offsets", array=name, row=0,
                             rule="csr offsets", path=path)
    if int(offsets[0]) != 0:
        raise IntegrityError(f"{name}[0] = {int(offsets[0])} but CSR offsets start at 0",
                             array=name, row=0, rule="csr offsets start at 0", path=path)
    if offsets.numel() > 1:
        step = offsets[1:] - offsets[:-1]
        if int(step.min()) < 0:
            row = int(torch.nonzero(step < 0)[0]) + 1
            raise IntegrityError(
                f"{name}[{row}] = {int(offsets[row])} is smaller than {name}[{row - 1}] = "
                f"{int(offsets[row - 1])}; offsets must not decrease", array=name, row=row,
                rule="csr offsets non-decreasing", path=path)
    if int(offsets[-1]) != values.shape[0]:
        raise IntegrityError(
            f"{name}[-1] = {int(offsets[-1])} but pair_keyword_ids has {values.shape[0]} values",
            array=name, row=int(offsets.shape[0]) - 1, rule="csr offsets end at nnz", path=path)


def _check_disjoint_splits(arrays: Mapping[str, torch.Tensor], n_pairs: int,
                           path: Path | None) -> None:
    owner = torch.full((n_pairs,), -1, dtype=torch.int8)
    for i, split in enumerate(("train", "val", "test")):
        name = split_array(split)
        idx = arrays[name]
        if idx.numel() == 0:
            continue
        prev = owner[idx]
        taken = prev >= 0
        if bool(taken.any()):
            row = int(torch.nonzero(taken)[0])
            other = ("train", "val", "test")[int(prev[row])]
            which = "twice in the same split" if other == split else f"also in the {other} split"
            raise IntegrityError(
                f"{name}[{row}] = pair {int(idx[row])} is {which}; splits must be disjoint",
                array=name, row=row, rule="disjoint splits", path=path)
        owner[idx] = i
        # a repeat inside one split is invisible to the owner check above; catch it here
        if idx.numel() > 1 and int(torch.unique(idx).numel()) != idx.numel():
            s, order = torch.sort(idx)
            dup = int(torch.nonzero(s[1:] == s[:-1])[0])
            row = int(order[dup + 1])
            raise IntegrityError(
                f"{name}[{row}] = pair {int(idx[row])} appears twice in the {split} split",
                array=name, row=row, rule="disjoint splits", path=path)


def _quality_findings(arrays: Mapping[str, torch.Tensor]) -> list[Finding]:
    findings: list[Finding] = []
    neg = arrays["hard_negatives"]
    if neg.numel():
        own = arrays["pair_index"][:, 1:2]
        same = neg == own
        count = int(same.sum())
        if count:
            row, col = _first_true(same)
            findings.append(Finding(
                "hard_negatives", "negative differs from the pair's source", count, row,
                f"hard_negatives: {count} negative(s) equal the pair's own source, first "
                f"hard_negatives[{row}, {col}] = {int(neg[row, col])}"))
    for name, spec in ARRAYS.items():
        if spec.quality_range is None:
            continue
        t = arrays[name]
        if t.numel() == 0:
            continue
        lo, hi = spec.quality_range
        bad = (t < lo) | (t > hi)
        count = int(bad.sum())
        if count:
            row = int(torch.nonzero(bad)[0])
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
    from jasper.progress import byte_bar
    from jasper.registry import get_backend
    from jasper.store import open_store

    # a local Path, or an object-store Location: it stands in for the Path in messages and
    # the report (both print as what the user typed and have a .name)
    p = cast(Path, as_target(path))
    t0 = time.perf_counter()
    with open_store(p, backend, mmap=False) as reader:
        manifest = reader.manifest
        infos = {n: reader.info(n) for n in ARRAYS if reader.has(n)}
        for n, rec in manifest.arrays.items():
            info = infos.get(n)
            if info is None:
                raise IntegrityError(f"array {n!r} is recorded in the manifest but missing from "
                                     "the store", array=n, rule="manifest arrays present", path=p)
            if tuple(info.shape) != tuple(rec.shape) or dtype_name(info.dtype) != rec.dtype:
                raise ShapeError(
                    f"{n} is {tuple(info.shape)} {dtype_name(info.dtype)} in the store but the "
                    f"manifest records {tuple(rec.shape)} {rec.dtype}", array=n,
                    rule="manifest shape", path=p)
        # Large float arrays are never copied whole: mapped where the backend maps, otherwise
        # stood in for by a zero-stride placeholder of the right shape and dtype while their
        # NaN/Inf check streams chunk by chunk. Validating a dataset larger than RAM works.
        mapped = get_backend(reader.backend_name).capabilities.mmap
        streamed: set[str] = set()
        arrays: dict[str, torch.Tensor] = {}
        for n, info in infos.items():
            spec = ARRAYS[n]
            if mapped:
                arrays[n] = reader.map(n)
            elif spec.finite and spec.rank == 2:
                arrays[n] = torch.zeros((), dtype=info.dtype).expand(info.shape)
                streamed.add(n)
            else:
                arrays[n] = reader.read(n)
        findings = check_arrays(arrays, manifest, path=p, strict=strict, warn=False,
                                skip_finite=frozenset(streamed))
        del arrays
        for n in sorted(streamed):
            row = 0
            for chunk in reader.iter_chunks(n):
                _check_finite(n, chunk, p, row_offset=row)
                row += chunk.shape[0]
        report = ValidationReport(p, int(infos["pair_index"].shape[0]), 0.0, findings)
        if deep:
            total = sum(infos[n].nbytes for n in manifest.arrays if n in infos)
            with byte_bar(total, f"verifying {p.name}", progress) as update:
                for n, rec in manifest.arrays.items():
                    if not rec.checksum:
                        continue
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
                raise IntegrityError(
                    f"backend checks failed: {'; '.join(report.backend_problems)}",
                    rule="backend deep check", path=p)
    report.seconds = time.perf_counter() - t0
    return report
