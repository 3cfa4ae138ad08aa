"""Steering vectors computed from the tables: one vectorised kernel for building and serving.

The three steering variants of a pair are functions of rows the dataset stores anyway (the
question, the source, the pair's centroid and its keywords). At D=384 the three stored arrays are
4.6 KB of the ~4.8 KB of pair-level data, so a dataset may declare its steering **derived**:
the manifest records the formula (``derived_steering``), the arrays are not stored, and each
batch computes the variant of each of its rows (:class:`DerivedSteering`).

One kernel, :func:`steering_rows`, computes every variant everywhere: jasper's builder calls it
to produce the stored arrays and the batch gather calls it to derive them, on the same inputs
(the tables in their stored dtype, computed in float32, cast to the steering dtype), so stored
and derived values are bit-identical by construction. Every operation works row by row (row
norms, row dot products, a segment sum of each pair's keywords in order), so a row's value does
not depend on which other rows share its batch or build chunk.

Formulas (:data:`FORMULAS`), with ``unit(x) = x / max(|x|, 1e-12)``:

``jasper-v1`` (what ``jasper build`` and ``jasper synth`` write)
    - centroid: the pair's centroid row ``C``;
    - keyword: ``unit(sum_k w_k * unit(K_k))`` with ``w_k = exp(sharpness * unit(K_k) . unit(Q))``
      over the pair's keywords (``sharpness`` 4.0); a pair without keywords steers by ``C``;
    - residual: ``unit(unit(S) - (unit(S) . unit(C)) unit(C))``, the part of the source the
      centroid does not explain.

``original`` (the original system's ``contrastive/build_steering.py``, default options)
    - centroid: ``unit(C - Q)`` (zeros where ``|C - Q| <= 1e-8``);
    - keyword: ``unit(mean_k K_k)``; a pair without keywords (or whose mean is ~0) falls back to
      the centroid steering (``fallback="centroid"``) or zeros (``"zero"``); its ``"random"``
      fallback cannot be derived, such rows become stored exceptions;
    - residual: ``Q - C``, normalised when ``normalize_residual``.

A dataset converted to derived steering (``jasper convert --derive-steering``) keeps the rows
whose stored value the formula does not reproduce within the tolerance as **exceptions**:
``steering_exception_rows`` ``[E, 2]`` (variant 1-3, pair id; sorted) and
``steering_exception_values`` ``[E, D]``, served instead of the formula, so what a batch holds
never changes silently.

Serving (:class:`DerivedSteering`) computes once per table row what depends on one table row
(the centroid variant per cluster; jasper-v1's residual per source, the original's centroid and
residual per question) and serves it with one row gather; only the keyword variant is computed
per batch, slot-major (:class:`KeywordSlots`), with the bits of the pair-major form.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jasper.dtypes import FLOAT_DTYPES, torch_dtype
from jasper.errors import IntegrityError, ManifestError, ShapeError
from jasper.lazy import lazy_torch
from jasper.schema import ARRAYS, STEERING_ARRAYS, STEERING_VARIANTS

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from jasper.manifest import Manifest
else:
    torch = lazy_torch(globals())  # reading a manifest's steering declaration needs no torch

#: The manifest key declaring derived steering.
MANIFEST_KEY = "derived_steering"
#: The stored exceptions of a derived dataset: (variant 1-3, pair id) rows, sorted, and values.
EXCEPTION_ROWS = "steering_exception_rows"
EXCEPTION_VALUES = "steering_exception_values"
EXCEPTION_ARRAYS: tuple[str, str] = (EXCEPTION_ROWS, EXCEPTION_VALUES)
#: The steering arrays in variant order: variant ``v`` (1-3) is ``STEERING[v - 1]``.
STEERING: tuple[str, ...] = tuple(
    a for a in (STEERING_ARRAYS[v] for v in STEERING_VARIANTS) if a is not None)
#: Default tolerance of ``convert --derive-steering``: a stored row is reproduced when every
#: element is within ``atol + rtol * |stored|`` of the formula's value.
DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 0.0

#: A derived dataset normalises its keyword table once when it is at most this big (float32).
UNIT_TABLE_MAX_BYTES = 256 << 20
#: ... and computes a variant's rows once per question or source row (:class:`RowCache`) when
#: the tables are in memory and the cache is at most this big.
CACHE_MAX_BYTES = 256 << 20

_EPS = 1e-12  # unit(): the floor of a row norm (jasper-v1)
_ORIGINAL_EPS = 1e-8  # the original's "is this vector zero" threshold


def unit(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Each row divided by its norm (floored at ``eps``)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def _unit_into(x: torch.Tensor, out: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """:func:`unit` written into ``out`` (the same operations, so the same bits)."""
    return torch.div(x, torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps),
                     out=out)


def _unit_or_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unit rows, mask of rows whose norm exceeds 1e-8)``; rows at or below are zeros."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    ok = n > _ORIGINAL_EPS
    return torch.where(ok, x / n.clamp_min(_ORIGINAL_EPS), torch.zeros_like(x)), ok.squeeze(-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


@dataclass(frozen=True)
class KeywordRows:
    """The keywords of a batch of pairs, flattened: ``rows[i]`` belongs to pair ``owner[i]``
    (owners non-decreasing, each pair's keywords in stored order); ``counts[p]`` per pair.
    ``unit_rows``: the rows are already ``unit()`` of the stored rows, in float32 (a table
    normalised once; row-wise, so the bits equal normalising per batch)."""

    rows: torch.Tensor
    owner: torch.Tensor
    counts: torch.Tensor
    unit_rows: bool = False


def keyword_rows_of(offsets: torch.Tensor, values: torch.Tensor, pair_ids: torch.Tensor,
                    table_rows: Callable[[torch.Tensor], torch.Tensor]) -> KeywordRows:
    """The keyword rows of ``pair_ids`` from the CSR (``offsets``, ``values``), vectorised:
    ``table_rows(ids)`` reads rows of the keyword table."""
    pair_ids = pair_ids.to(offsets.device)
    lo = offsets.index_select(0, pair_ids).to(torch.int64)
    counts = offsets.index_select(0, pair_ids + 1).to(torch.int64) - lo
    b = pair_ids.shape[0]
    owner = torch.repeat_interleave(torch.arange(b, device=offsets.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(owner.shape[0], device=offsets.device) - starts.index_select(0, owner) \
        + lo.index_select(0, owner)
    ids = values.index_select(0, pos).to(torch.int64)
    return KeywordRows(table_rows(ids), owner, counts)


@dataclass(frozen=True)
class KeywordSlots:
    """The keywords of a batch of pairs in **slot-major** order, the pairs sorted by keyword
    count (descending): ``rows[starts[j] : starts[j] + sizes[j]]`` is keyword ``j`` of the first
    ``sizes[j]`` pairs (``sizes`` non-increasing; the pairs after ``sizes[0]`` have none).

    Keyword ``j`` of every pair then lines up with a prefix of the pairs' rows, so the kernel
    multiplies and accumulates contiguous blocks instead of expanding the question rows to one
    copy per keyword (the same products and the same per-pair order of additions as the
    pair-major :class:`KeywordRows`, so the same bits). ``unit_rows`` as in
    :class:`KeywordRows`."""

    rows: torch.Tensor
    sizes: tuple[int, ...]
    n_pairs: int
    unit_rows: bool = False

    @property
    def with_keywords(self) -> int:
        """How many of the pairs (a prefix) have at least one keyword."""
        return self.sizes[0] if self.sizes else 0


def _slot_sizes(sorted_counts: torch.Tensor) -> tuple[int, ...]:
    """``sizes[j]`` = how many counts exceed ``j``, for counts sorted in descending order."""
    if sorted_counts.numel() == 0:
        return ()
    kmax = int(sorted_counts[0])
    if kmax == 0:
        return ()
    hist = torch.bincount(sorted_counts.cpu(), minlength=kmax + 1)
    return tuple(int(n) for n in hist.flip(0).cumsum(0).flip(0)[1:].tolist())


def count_order(offsets: torch.Tensor, pair_ids: torch.Tensor) -> torch.Tensor:
    """The permutation of ``pair_ids`` that sorts them by keyword count, most first (stable):
    the order :func:`keyword_slots_of` wants its pairs in."""
    pair_ids = pair_ids.to(offsets.device)
    counts = offsets.index_select(0, pair_ids + 1) - offsets.index_select(0, pair_ids)
    return torch.argsort(counts, descending=True, stable=True)


def keyword_slots_of(offsets: torch.Tensor, values: torch.Tensor, pair_ids: torch.Tensor,
                     table_rows: Callable[[torch.Tensor], torch.Tensor],
                     unit_rows: bool = False) -> KeywordSlots:
    """The keyword rows of ``pair_ids`` (sorted by :func:`count_order`) from the CSR
    (``offsets``, ``values``), slot-major, with one read of the keyword table
    (``table_rows(ids)``); vectorised."""
    pair_ids = pair_ids.to(offsets.device)
    lo = offsets.index_select(0, pair_ids).to(torch.int64)
    counts = offsets.index_select(0, pair_ids + 1).to(torch.int64) - lo
    if counts.numel() > 1 and bool((counts[1:] > counts[:-1]).any()):
        raise ValueError("keyword_slots_of wants its pairs sorted by keyword count, most "
                         "first (count_order)")
    sizes = _slot_sizes(counts)
    sizes_t = torch.tensor(sizes, dtype=torch.int64, device=offsets.device)
    slot = torch.repeat_interleave(torch.arange(len(sizes), device=offsets.device), sizes_t)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    rank = torch.arange(slot.shape[0], device=offsets.device) - starts.index_select(0, slot)
    ids = values.index_select(0, lo.index_select(0, rank) + slot).to(torch.int64)
    return KeywordSlots(table_rows(ids), sizes, int(pair_ids.shape[0]), unit_rows)


def _slots_from_rows(kw: KeywordRows) -> tuple[KeywordSlots, torch.Tensor]:
    """Pair-major keyword rows rearranged slot-major: ``(slots, order)`` where the slots
    describe the pairs ``order`` (by count, most first)."""
    counts = kw.counts.to(torch.int64)
    b = int(counts.shape[0])
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(b, device=order.device)
    owner = kw.owner.to(torch.int64)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(owner.shape[0], device=owner.device) - first.index_select(0, owner)
    key = slot * max(b, 1) + rank.index_select(0, owner)
    rows = kw.rows.index_select(0, torch.argsort(key))
    return KeywordSlots(rows, _slot_sizes(counts.index_select(0, order)), b,
                        kw.unit_rows), order


#: :func:`_exp` works in pieces of this many elements: a multiple of every CPU vector width
#: (times the two vectors an elementwise loop takes a step), and under ATen's grain size (32,768)
#: so that a piece runs in one thread, never cut where a thread's share happens to end.
_EXP_LANES = 64
_EXP_PIECE = 1 << 14


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp`` of a 1-D tensor whose every element takes the same code path whatever its
    position and length: CPU kernels evaluate the tail of a loop (``numel % (2 * vector
    width)``) with the scalar libm ``exp``, which may differ by an ulp from the vectorised one.
    The input is padded to a multiple of :data:`_EXP_LANES` and evaluated in pieces of
    :data:`_EXP_PIECE`, so the loop never has a tail. (jasper-v1 as first written evaluated
    each element in a row of 64 copies: the same vectorised values at 64 times the work.)"""
    n = int(x.shape[0])
    padded = -(-n // _EXP_LANES) * _EXP_LANES
    if padded == n and n <= _EXP_PIECE:
        return torch.exp(x.contiguous())
    buf = torch.zeros(padded, dtype=x.dtype, device=x.device)
    buf[:n] = x
    for start in range(0, padded, _EXP_PIECE):
        piece = buf[start : start + _EXP_PIECE]
        torch.exp(piece, out=piece)
    return buf[:n]


def _segment_sum(x: torch.Tensor, owner: torch.Tensor, b: int) -> torch.Tensor:
    return torch.zeros((b, x.shape[-1]), dtype=x.dtype, device=x.device).index_add_(0, owner, x)


# --- the formulas -----------------------------------------------------------------------------
#: What each variant of each formula reads: "q" question, "s" source, "c" centroid, "k" keywords.
_NEEDS: dict[str, dict[int, frozenset[str]]] = {
    "jasper-v1": {1: frozenset("c"), 2: frozenset("qck"), 3: frozenset("sc")},
    "original": {1: frozenset("qc"), 2: frozenset("qck"), 3: frozenset("qc")},
}


class Workspace:
    """Buffers a caller reuses across kernel calls (one per thread): a fresh multi-megabyte
    tensor per batch costs page faults and cache misses that the arithmetic itself does not.
    Rows a kernel returns may live in it until the next call with the same workspace."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def rows(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        """A ``[n, like.shape[-1]]`` buffer of ``like``'s dtype and device (contents
        undefined)."""
        d = like.shape[-1]
        t = self._bufs.get(name)
        if t is None or t.shape[0] < n or t.shape[1] != d or t.dtype != like.dtype \
                or t.device != like.device:
            t = torch.empty((max(n, 1024), d), dtype=like.dtype, device=like.device)
            self._bufs[name] = t
        return t[:n]


def _v1_keyword(q: torch.Tensor, c: torch.Tensor, kw: KeywordSlots, sharpness: float,
                ws: Workspace | None = None) -> torch.Tensor:
    """jasper-v1's keyword variant of the pairs ``kw`` describes (in its count order): ``q``
    their question rows (at least the first ``kw.with_keywords``), ``c`` their centroid rows,
    all of them or only those of the trailing pairs without keywords.

    Per pair: ``unit(0 + x_0 + x_1 + ...)`` with ``x_k = w_k unit(K_k)``, summed in keyword
    order, ``w_k = exp(sharpness * (unit(K_k) * unit(Q)).sum())``: products, row sums and
    additions are the ones of a pair-major segment sum (``index_add_`` adds each pair's rows
    to zeros in index order), so the bits are jasper-v1's as first written. One keyword slot
    at a time, so the temporaries (``[with_keywords, D]``) stay in cache."""
    ws = ws or Workspace()
    b, has = kw.n_pairs, kw.with_keywords
    out = ws.rows("out", b, q)
    if has < b:
        out[has:] = c[has:] if c.shape[0] == b else c
    if has == 0:
        return out
    kwe = kw.rows if kw.unit_rows else unit(kw.rows)
    uq = _unit_into(q[:has], ws.rows("uq", has, q))
    acc = ws.rows("acc", has, q).zero_()
    tmp = ws.rows("tmp", has, q)
    start = 0
    for n in kw.sizes:  # keyword j of the first n pairs lines up with their question rows
        k, t = kwe[start : start + n], tmp[:n]
        torch.mul(k, uq[:n], out=t)
        w = _exp(sharpness * t.sum(dim=-1))
        torch.mul(k, w.unsqueeze(-1), out=t)
        acc[:n].add_(t)
        start += n
    _unit_into(acc, out[:has])
    return out


def _jasper_v1(variant: int, q: torch.Tensor | None, s: torch.Tensor | None, c: torch.Tensor,
               kw: KeywordRows | KeywordSlots | None, params: Mapping[str, Any],
               ws: Workspace | None = None) -> torch.Tensor:
    if variant == 1:
        return c
    if variant == 2:
        assert q is not None and kw is not None
        sharpness = float(params.get("keyword_sharpness", 4.0))
        if isinstance(kw, KeywordSlots):
            return _v1_keyword(q, c, kw, sharpness, ws)
        slots, order = _slots_from_rows(kw)
        got = _v1_keyword(q.index_select(0, order), c.index_select(0, order), slots, sharpness)
        return torch.empty_like(got).index_copy_(0, order, got)
    assert s is not None
    se, ce = unit(s), unit(c)
    return unit(se - _dot(se, ce).unsqueeze(-1) * ce)


def _original(variant: int, q: torch.Tensor | None, s: torch.Tensor | None, c: torch.Tensor,
              kw: KeywordRows | KeywordSlots | None, params: Mapping[str, Any],
              ws: Workspace | None = None) -> torch.Tensor:
    assert q is not None
    if isinstance(kw, KeywordSlots):
        raise ValueError("the original formula reads pair-major KeywordRows")
    if variant == 1:
        return _unit_or_zero(c - q)[0]
    if variant == 3:
        r = q - c
        return _unit_or_zero(r)[0] if params.get("normalize_residual", False) else r
    assert kw is not None
    b = c.shape[0]
    mean = _segment_sum(kw.rows, kw.owner, b) / kw.counts.clamp_min(1).to(c.dtype).unsqueeze(-1)
    out, ok = _unit_or_zero(mean)
    fallback = params.get("fallback", "centroid")
    alt = _unit_or_zero(c - q)[0] if fallback == "centroid" else torch.zeros_like(c)
    return torch.where(((kw.counts > 0) & ok).unsqueeze(-1), out, alt)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"jasper-v1": _jasper_v1, "original": _original}


@dataclass(frozen=True)
class Formula:
    """A steering formula and its parameters, as the manifest records them."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def needs(self, variant: int) -> frozenset[str]:
        """Which inputs variant ``variant`` (1-3) reads: ``q``, ``s``, ``c``, ``k``."""
        return _NEEDS[self.name][variant]


#: The formulas and the default parameters of each.
FORMULAS: dict[str, dict[str, Any]] = {
    "jasper-v1": {"keyword_sharpness": 4.0},
    "original": {"normalize_residual": False, "fallback": "centroid"},
}


def formula(name: str, params: Mapping[str, Any] | None = None) -> Formula:
    """The formula ``name`` with its default parameters updated by ``params``."""
    if name not in FORMULAS:
        raise ValueError(f"unknown steering formula {name!r}; known: {', '.join(FORMULAS)}")
    merged = {**FORMULAS[name], **dict(params or {})}
    unknown = sorted(set(merged) - set(FORMULAS[name]))
    if unknown:
        raise ValueError(f"steering formula {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters: {', '.join(FORMULAS[name])}")
    if name == "original" and merged["fallback"] not in ("centroid", "zero"):
        raise ValueError("the original formula derives fallback 'centroid' or 'zero'; rows of "
                         "its 'random' fallback are kept as stored exceptions")
    return Formula(name, merged)


JASPER_V1 = formula("jasper-v1")


def steering_rows(f: Formula, variant: int, *, centroids: torch.Tensor,
                  questions: torch.Tensor | None = None, sources: torch.Tensor | None = None,
                  keywords: KeywordRows | KeywordSlots | None = None,
                  dtype: torch.dtype | None = None,
                  workspace: Workspace | None = None) -> torch.Tensor:
    """THE kernel: variant ``variant`` (1 centroid, 2 keyword, 3 residual) of ``f`` for a batch
    of pairs, from their centroid, question and source rows ``[B, D]`` and keyword rows, as
    they are stored. Computed in float32 (float64 stays float64) and returned as ``dtype``
    (default: the centroid rows' dtype). Only the inputs ``f.needs(variant)`` are required.

    With :class:`KeywordSlots` (jasper-v1's keyword variant, how the gather calls it) the rows
    are those of the pairs in the slots' count order, and ``centroids`` may hold only the rows
    of the trailing pairs without keywords. ``workspace`` lends reusable buffers; the rows
    returned may then live in it until its next use."""
    if variant not in (1, 2, 3):
        raise ValueError(f"steering variant must be 1, 2 or 3, got {variant}")
    work = torch.float64 if centroids.dtype == torch.float64 else torch.float32

    def up(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(work)

    if keywords is not None and keywords.unit_rows and (
            f.name != "jasper-v1" or keywords.rows.dtype != work):
        raise ValueError("normalised keyword rows are jasper-v1's, in its working dtype")
    kw: KeywordRows | KeywordSlots | None
    if keywords is None:
        kw = None
    elif isinstance(keywords, KeywordSlots):
        kw = KeywordSlots(keywords.rows.to(work), keywords.sizes, keywords.n_pairs,
                          keywords.unit_rows)
    else:
        kw = KeywordRows(keywords.rows.to(work), keywords.owner, keywords.counts,
                         keywords.unit_rows)
    out = _KERNELS[f.name](variant, up(questions), up(sources), up(centroids), kw, f.params,
                           workspace)
    return out.to(dtype or centroids.dtype)


# --- the manifest record ----------------------------------------------------------------------
#: The variants a derived dataset may keep stored (``stored_variants``), in variant order.
KEEPABLE: tuple[str, ...] = STEERING_VARIANTS[1:]


def kept_variants(names: Sequence[str] | str | None) -> tuple[str, ...]:
    """``names`` (variant names ``centroid``, ``keyword``, ``residual``; a comma list or a
    sequence) as a derived dataset's ``stored_variants``: in variant order, each once, at
    most two of the three (a dataset keeping all three stores its steering). ``ValueError``
    names the offending value and the rule."""
    if names is None:
        return ()
    items = names.split(",") if isinstance(names, str) else list(names)
    got: list[str] = []
    for raw in items:
        name = str(raw).strip()
        if name not in KEEPABLE:
            raise ValueError(f"{name!r} is not a steering variant that can be kept stored; "
                             f"choose from {', '.join(KEEPABLE)}")
        if name in got:
            raise ValueError(f"steering variant {name!r} is named twice")
        got.append(name)
    if len(got) == len(KEEPABLE):
        raise ValueError("keeping all three steering variants stored is stored steering, not "
                         "derived: drop the derived declaration instead")
    return tuple(n for n in KEEPABLE if n in got)


@dataclass(frozen=True)
class DerivedSpec:
    """A dataset's ``derived_steering`` record: formula, parameters, served dtype, the
    tolerance its stored values were checked with (conversions), the exception count, and
    the variants kept stored (``stored_variants``: variant names, in variant order; their
    arrays are stored and served like stored steering, the others are derived)."""

    formula: Formula
    dtype: str
    exceptions: int = 0
    atol: float | None = None
    rtol: float | None = None
    checked_rows: int | None = None
    stored_variants: tuple[str, ...] = ()

    @property
    def stored_ids(self) -> tuple[int, ...]:
        """The kept variants as ids 1-3."""
        return tuple(STEERING_VARIANTS.index(n) for n in self.stored_variants)

    @property
    def derived_ids(self) -> tuple[int, ...]:
        """The variants computed per batch, as ids 1-3."""
        return tuple(v for v in (1, 2, 3) if v not in self.stored_ids)

    @property
    def stored_arrays(self) -> tuple[str, ...]:
        """The steering arrays this dataset stores (those of the kept variants)."""
        return tuple(STEERING[v - 1] for v in self.stored_ids)

    @property
    def derived_arrays(self) -> tuple[str, ...]:
        """The steering arrays this dataset does not store (computed per batch)."""
        return tuple(STEERING[v - 1] for v in self.derived_ids)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"formula": self.formula.name, "params": dict(self.formula.params),
                             "dtype": self.dtype, "exceptions": self.exceptions}
        if self.atol is not None:
            d["tolerance"] = {"atol": self.atol, "rtol": self.rtol or 0.0}
        if self.checked_rows is not None:
            d["checked_rows"] = self.checked_rows
        if self.stored_variants:  # absent: everything derived (what readers before it assume)
            d["stored_variants"] = list(self.stored_variants)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | Path = "config.json") -> DerivedSpec:
        try:
            f = formula(str(d["formula"]), d.get("params") or {})
        except (KeyError, ValueError) as exc:
            raise ManifestError(path, f"{MANIFEST_KEY}: {exc}") from None
        dtype = str(d.get("dtype", "float32"))
        if dtype not in FLOAT_DTYPES:
            raise ManifestError(path, f"{MANIFEST_KEY}.dtype is {dtype!r}; allowed: "
                                f"{', '.join(sorted(FLOAT_DTYPES))}")
        kept = d.get("stored_variants") or []
        if not isinstance(kept, (list, tuple)):
            raise ManifestError(path, f"{MANIFEST_KEY}.stored_variants must be a list of "
                                f"variant names ({', '.join(KEEPABLE)}), got {kept!r}")
        try:
            stored = kept_variants([str(k) for k in kept])
        except ValueError as exc:
            raise ManifestError(path, f"{MANIFEST_KEY}.stored_variants: {exc}") from None
        if [str(k) for k in kept] != list(stored):
            raise ManifestError(path, f"{MANIFEST_KEY}.stored_variants must list the variants "
                                f"in variant order ({', '.join(stored)}), got {list(kept)}")
        tol = d.get("tolerance") or {}
        return cls(f, dtype, int(d.get("exceptions", 0)),
                   None if not tol else float(tol.get("atol", 0.0)),
                   None if not tol else float(tol.get("rtol", 0.0)),
                   d.get("checked_rows"), stored)


def derived_spec(manifest: Manifest) -> DerivedSpec | None:
    """The manifest's derived-steering record, or ``None`` when steering is stored."""
    d = getattr(manifest, "derived_steering", None)
    if not d:
        return None
    return DerivedSpec.from_dict(d)


def stored_names(manifest: Manifest) -> tuple[str, ...]:
    """The arrays a steering dataset with this manifest stores: the data model's, without the
    derived steering arrays (all three, or those not kept stored) and with the exception
    arrays when its steering is derived."""
    spec = derived_spec(manifest)
    if spec is None:
        return tuple(ARRAYS)
    return (*(n for n in ARRAYS if n not in spec.derived_arrays), *EXCEPTION_ARRAYS)


def placeholder(n_pairs: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """A stand-in for a derived steering array in structural checks: right shape and dtype,
    no data (a meta tensor)."""
    return torch.empty((n_pairs, dim), dtype=dtype, device="meta")


def check_exception_layout(arrays: Mapping[str, Any], spec: DerivedSpec, dim: int) -> None:
    """Shape-level rules of the exception arrays and of the kept steering arrays' dtype
    before a write (``arrays``: name -> anything with ``shape`` and ``dtype``)."""
    want = torch_dtype(spec.dtype)
    for name in spec.stored_arrays:
        kept = arrays.get(name)
        if kept is not None and kept.dtype != want:
            raise ShapeError(f"{name} is kept stored by a derived dataset served as {want}, "
                             f"but is {kept.dtype}: a kept steering array has the served "
                             f"dtype ({MANIFEST_KEY}.dtype)", array=name,
                             rule="kept steering dtype")
    rows, values = arrays[EXCEPTION_ROWS], arrays[EXCEPTION_VALUES]
    e = int(rows.shape[0]) if len(rows.shape) else -1
    if tuple(rows.shape) != (e, 2) or rows.dtype != torch.int64:
        raise ShapeError(f"{EXCEPTION_ROWS} must be int64 [E, 2], got {rows.dtype} "
                         f"{tuple(rows.shape)}", array=EXCEPTION_ROWS, rule="shape")
    if tuple(values.shape) != (e, dim) or values.dtype != want:
        raise ShapeError(f"{EXCEPTION_VALUES} must be {want} [{e}, {dim}] (one row per "
                         f"exception), got {values.dtype} {tuple(values.shape)}",
                         array=EXCEPTION_VALUES, rule="shape")
    if e != spec.exceptions:
        raise ShapeError(f"{EXCEPTION_ROWS} has {e} rows but the manifest's {MANIFEST_KEY} "
                         f"records {spec.exceptions} exceptions", array=EXCEPTION_ROWS,
                         rule="exception count")


def check_exceptions(rows: torch.Tensor, values: torch.Tensor, *, n_pairs: int, dim: int,
                     dtype: torch.dtype, expected: int | None = None,
                     path: Path | None = None, stored_ids: Sequence[int] = ()) -> None:
    """The rules of the exception arrays: ``rows`` int64 ``[E, 2]`` with variant 1-3 and pair
    id < N_p, strictly increasing (variant, pair) order; ``values`` ``[E, D]`` finite, in the
    served dtype; ``E`` as the manifest records; no row of a variant kept stored
    (``stored_ids``: its array already holds every row as served)."""
    if rows.dim() != 2 or rows.shape[1] != 2 or rows.dtype != torch.int64:
        raise ShapeError(f"{EXCEPTION_ROWS} must be int64 [E, 2], got {rows.dtype} "
                         f"{tuple(rows.shape)}", array=EXCEPTION_ROWS, rule="shape", path=path)
    e = int(rows.shape[0])
    if tuple(values.shape) != (e, dim) or values.dtype != dtype:
        raise ShapeError(f"{EXCEPTION_VALUES} must be {dtype} [{e}, {dim}], got {values.dtype} "
                         f"{tuple(values.shape)}", array=EXCEPTION_VALUES, rule="shape",
                         path=path)
    if expected is not None and e != expected:
        raise IntegrityError(f"{EXCEPTION_ROWS} has {e} rows but the manifest's {MANIFEST_KEY} "
                             f"records {expected} exceptions", array=EXCEPTION_ROWS,
                             rule="exception count", path=path)
    if e == 0:
        return
    v, p = rows[:, 0], rows[:, 1]
    bad = (v < 1) | (v > 3)
    if bool(bad.any()):
        r = int(torch.nonzero(bad)[0])
        raise IntegrityError(f"{EXCEPTION_ROWS}[{r}, 0] = {int(v[r])} is not a steering "
                             "variant (1-3)", array=EXCEPTION_ROWS, row=r, rule="variant 1-3",
                             path=path)
    for sv in stored_ids:
        bad = v == sv
        if bool(bad.any()):
            r = int(torch.nonzero(bad)[0])
            raise IntegrityError(f"{EXCEPTION_ROWS}[{r}] is an exception of variant {sv} "
                                 f"({STEERING_VARIANTS[sv]}), which {MANIFEST_KEY}."
                                 f"stored_variants keeps stored: exceptions are rows of "
                                 "derived variants only", array=EXCEPTION_ROWS, row=r,
                                 rule="exceptions of derived variants", path=path)
    bad = (p < 0) | (p >= n_pairs)
    if bool(bad.any()):
        r = int(torch.nonzero(bad)[0])
        raise IntegrityError(f"{EXCEPTION_ROWS}[{r}, 1] = {int(p[r])} but the dataset has "
                             f"{n_pairs} pairs", array=EXCEPTION_ROWS, row=r,
                             rule="index < pairs (N_p)", path=path)
    key = v * n_pairs + p
    if e > 1 and bool((key[1:] <= key[:-1]).any()):
        r = int(torch.nonzero(key[1:] <= key[:-1])[0]) + 1
        raise IntegrityError(f"{EXCEPTION_ROWS}[{r}] is not after row {r - 1}: exceptions are "
                             "sorted by (variant, pair) without repeats", array=EXCEPTION_ROWS,
                             row=r, rule="sorted exceptions", path=path)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        r = int(torch.nonzero(~finite.all(dim=1))[0])
        raise IntegrityError(f"{EXCEPTION_VALUES}[{r}] is not finite", array=EXCEPTION_VALUES,
                             row=r, rule="finite values", path=path)


# --- serving ----------------------------------------------------------------------------------
def _gather_via(table: Callable[[str, torch.Tensor], torch.Tensor]
                ) -> Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A kept-array gather ``(name, rows, out)`` made of a table gather ``(name, rows)``."""
    def gather(name: str, rows: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        got = table(name, rows)
        return got if out is None else out.copy_(got)
    return gather


@dataclass(frozen=True)
class RowCache:
    """One variant's derived rows computed once per row of a table (what :meth:`DerivedSteering.
    prepare` builds): row ``first + r`` of the cache table is the variant for table row ``r``
    with cluster ``cluster[r]``. ``key`` names the table: ``"c"`` the centroids (every pair's
    value is its cluster's row), ``"q"`` the questions or ``"s"`` the sources (a pair whose
    cluster is ``cluster[its row]`` is served that row; the kernel is row-wise, so these are
    the bits it computes per batch; any other pair is computed per batch)."""

    key: str
    first: int
    rows: int
    cluster: torch.Tensor | None = None


class DerivedSteering:
    """The steering of a derived dataset, computed per batch from the tables it gathers.

    A variant that reads nothing per pair but its centroid and one question or source row is
    computed once per table row when the dataset opens (:meth:`prepare`, a :class:`RowCache`);
    a batch then serves the zero, cached and stored-exception rows like stored steering (one
    gather of a table) and computes the rest, each variant only for its rows (one vectorised
    kernel call each, jasper-v1's keyword variant slot-major). ``table`` reads tables by name
    (the table set's ``gather``)."""

    def __init__(self, spec: DerivedSpec, n_pairs: int, dim: int,
                 exception_rows: torch.Tensor, exception_values: torch.Tensor) -> None:
        self.spec = spec
        self.formula = spec.formula
        self.dtype = torch_dtype(spec.dtype)
        self.n_pairs = n_pairs
        self.dim = dim
        #: variants kept stored: served by a row gather of their array, never computed
        self.stored_ids: tuple[int, ...] = spec.stored_ids
        rows = exception_rows.to(torch.int64)
        self.exception_keys = (rows[:, 0] * n_pairs + rows[:, 1]).contiguous()
        self.exception_values = exception_values
        #: jasper-v1 reads every keyword row normalised: done once for the whole table when
        #: it is in memory and small (:meth:`prepare`), else per batch (the same bits)
        self.keyword_units: torch.Tensor | None = None
        #: per variant, its rows computed once per table row (:meth:`prepare`), all in
        #: ``cache_table`` after a zero row
        self.caches: dict[int, RowCache] = {}
        self.cache_table: torch.Tensor | None = None
        self._local = threading.local()  # a Workspace per serving thread

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]  # per-thread scratch buffers do not travel
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _workspace(self) -> Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = Workspace()
        return ws

    def prepare(self, arrays: Mapping[str, torch.Tensor], *, resident: bool = True) -> None:
        """Compute once what the tables allow: the keyword table normalised (jasper-v1), and a
        :class:`RowCache` per variant that reads only the centroid (always: ``N_c`` rows) or
        the centroid and the question or source row (when the tables are ``resident``, read
        into memory, and the cache is at most :data:`CACHE_MAX_BYTES`: ``N_q`` or ``N_s``
        rows of the steering dtype). A table row's cluster is the one its pairs name (a scan
        of the pair columns); pairs naming another are computed per batch."""
        keywords = arrays["keyword_embs"]
        if self.formula.name == "jasper-v1" and 2 not in self.stored_ids \
                and keywords.device.type != "meta" \
                and keywords.numel() * 4 <= UNIT_TABLE_MAX_BYTES:
            work = torch.float64 if keywords.dtype == torch.float64 else torch.float32
            self.keyword_units = unit(keywords.to(work))
        centroids = arrays["centroid_embs"]
        if centroids.device.type == "meta":
            return
        plan: list[tuple[int, str, torch.Tensor, torch.Tensor | None]] = []
        for v in self.spec.derived_ids:
            needs = self.formula.needs(v)
            if needs == frozenset("c"):
                plan.append((v, "c", centroids, None))
            elif resident and needs in (frozenset("qc"), frozenset("sc")):
                key = "q" if "q" in needs else "s"
                table = arrays["question_embs" if key == "q" else "source_embs"]
                n = int(table.shape[0])
                if table.device.type != "meta" \
                        and n * self.dim * self.dtype.itemsize <= CACHE_MAX_BYTES:
                    plan.append((v, key, table, self._row_clusters(key, n, arrays, table)))
        if not plan:
            return
        total = 1 + sum(int(t.shape[0]) for _, _, t, _ in plan)
        cache = torch.empty((total, self.dim), dtype=self.dtype, device=centroids.device)
        cache[0].zero_()
        first = 1
        for v, key, table, cl in plan:
            n = int(table.shape[0])
            self._fill(cache[first : first + n], v, key, table, cl, centroids)
            self.caches[v] = RowCache(key, first, n, cl)
            first += n
        self.cache_table = cache

    @staticmethod
    def _row_clusters(key: str, n: int, arrays: Mapping[str, torch.Tensor],
                      table: torch.Tensor) -> torch.Tensor:
        """Each question or source row's cluster as its pairs name it (the largest, when they
        disagree: the others are computed per batch); 0 for a row no pair names."""
        rows = arrays["pair_index"][:, 0 if key == "q" else 1].to(torch.int64)
        clusters = arrays["pair_cluster_id"].to(torch.int64)
        return torch.full((n,), -1, dtype=torch.int64, device=table.device).scatter_reduce_(
            0, rows.to(table.device), clusters.to(table.device), "amax").clamp_min_(0)

    def _fill(self, out: torch.Tensor, v: int, key: str, table: torch.Tensor,
              cl: torch.Tensor | None, centroids: torch.Tensor, chunk: int = 1 << 14) -> None:
        for start in range(0, int(table.shape[0]), chunk):
            stop = min(int(table.shape[0]), start + chunk)
            if key == "c":
                out[start:stop] = steering_rows(self.formula, v, centroids=table[start:stop],
                                                dtype=self.dtype)
                continue
            assert cl is not None
            rows = table[start:stop]
            out[start:stop] = steering_rows(
                self.formula, v, centroids=centroids.index_select(0, cl[start:stop]),
                questions=rows if key == "q" else None, sources=rows if key == "s" else None,
                dtype=self.dtype)

    def owned(self) -> list[torch.Tensor]:
        """The tensors :meth:`prepare` computed (for memory accounting)."""
        return [t for t in (self.keyword_units, self.cache_table) if t is not None]

    @property
    def n_exceptions(self) -> int:
        return int(self.exception_keys.shape[0])

    def gather(self, pair_ids: torch.Tensor, variant: torch.Tensor, *,
               table: Callable[[str, torch.Tensor], torch.Tensor],
               csr: tuple[torch.Tensor, torch.Tensor],
               questions: torch.Tensor | None = None, sources: torch.Tensor | None = None,
               clusters: torch.Tensor | None = None,
               out: torch.Tensor | None = None,
               stored: Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor]
               | None = None) -> torch.Tensor:
        """Each pair's steering row of its variant (0: zeros), into ``out`` when given.

        ``table(name, rows)`` gathers rows of a stored table; ``csr`` is (keyword offsets,
        keyword ids); ``questions``/``sources``/``clusters`` are the batch's already gathered
        question rows, source rows and cluster ids (gathered here when not given).
        ``stored(name, rows, out)`` gathers rows of a kept steering array into ``out`` (when
        given; default: ``table``): a kept variant is served by that one row gather, as a
        stored-steering dataset serves it."""
        b = pair_ids.shape[0]
        res = out if out is not None else torch.empty((b, self.dim), dtype=self.dtype,
                                                      device=pair_ids.device)
        kept = stored if stored is not None else _gather_via(table)
        for v in self.stored_ids:  # a batch of one kept variant: one gather into the batch
            if b and bool((variant == v).all()):
                got = kept(STEERING[v - 1], pair_ids, res)
                return got if got is res else res.copy_(got)
        if clusters is None:
            clusters = table("pair_cluster_id", pair_ids).to(torch.int64)
        todo = self._serve_cached(res, pair_ids, variant, clusters, table)
        for v in (1, 2, 3):
            where = torch.nonzero(todo == v).reshape(-1)
            if where.numel() == 0:
                continue
            pids = pair_ids.index_select(0, where)
            if v in self.stored_ids:
                res.index_copy_(0, where, kept(STEERING[v - 1], pids, None).to(res.dtype))
                continue
            needs = self.formula.needs(v)
            if "k" in needs and self.formula.name == "jasper-v1":
                self._keyword(res, where, pids, table, csr, questions, clusters)
                continue
            c = table("centroid_embs", clusters.index_select(0, where))
            q = questions.index_select(0, where) if "q" in needs and questions is not None \
                else None
            if "q" in needs and q is None:
                q = table("question_embs", table("pair_index", pids)[:, 0].to(torch.int64))
            s = sources.index_select(0, where) if "s" in needs and sources is not None else None
            if "s" in needs and s is None:
                s = table("source_embs", table("pair_index", pids)[:, 1].to(torch.int64))
            kw = None
            if "k" in needs:
                kw = keyword_rows_of(csr[0], csr[1], pids,
                                     lambda ids: table("keyword_embs", ids.to(res.device)))
                kw = KeywordRows(kw.rows, kw.owner.to(res.device), kw.counts.to(res.device))
            vals = steering_rows(self.formula, v, centroids=c, questions=q, sources=s,
                                 keywords=kw, dtype=res.dtype)
            res.index_copy_(0, where, vals)
        if self.n_exceptions:
            self._serve_exceptions(res, pair_ids, variant)
        return res

    def _serve_cached(self, res: torch.Tensor, pair_ids: torch.Tensor, variant: torch.Tensor,
                      clusters: torch.Tensor,
                      table: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Fill ``res`` with the zero rows and the rows the caches hold (one gather of the
        cache table); returns each row's variant still to compute (0: done)."""
        if self.cache_table is None:
            zero = torch.nonzero(variant == 0).reshape(-1)
            if zero.numel():
                res.index_fill_(0, zero, 0)
            return variant
        rows = torch.zeros_like(pair_ids)
        todo = variant.clone()
        pair_rows: torch.Tensor | None = None
        for v, cache in self.caches.items():
            mine = variant == v
            if cache.key == "c":
                rows = torch.where(mine, cache.first + clusters, rows)
                todo = torch.where(mine, 0, todo)
                continue
            assert cache.cluster is not None
            if pair_rows is None:
                pair_rows = table("pair_index", pair_ids).to(torch.int64)
            r = pair_rows[:, 0 if cache.key == "q" else 1]
            hit = mine & (cache.cluster.index_select(0, r) == clusters)
            rows = torch.where(hit, cache.first + r, rows)
            todo = torch.where(hit, 0, todo)
        torch.index_select(self.cache_table, 0, rows, out=res)
        return todo

    def _keyword(self, res: torch.Tensor, where: torch.Tensor, pids: torch.Tensor,
                 table: Callable[[str, torch.Tensor], torch.Tensor],
                 csr: tuple[torch.Tensor, torch.Tensor], questions: torch.Tensor | None,
                 clusters: torch.Tensor) -> None:
        """jasper-v1's keyword rows ``where``: the pairs in keyword-count order, their keyword
        rows slot-major in one read (of the normalised table when there is one)."""
        order = count_order(csr[0], pids).to(where.device)
        where, pids = where.index_select(0, order), pids.index_select(0, order)
        units = self.keyword_units
        ws = self._workspace()

        def rows_of(ids: torch.Tensor) -> torch.Tensor:
            ids = ids.to(res.device)
            if units is None:
                return table("keyword_embs", ids)
            return torch.index_select(units, 0, ids, out=ws.rows("keywords", ids.shape[0], units))

        slots = keyword_slots_of(csr[0], csr[1], pids, rows_of, unit_rows=units is not None)
        if questions is not None:
            q = questions.index_select(0, where)
        else:
            q = table("question_embs", table("pair_index", pids)[:, 0].to(torch.int64))
        # only the pairs without keywords (the last ones in count order) read their centroid
        c = table("centroid_embs", clusters.index_select(0, where[slots.with_keywords:]))
        res.index_copy_(0, where, steering_rows(self.formula, 2, centroids=c, questions=q,
                                                keywords=slots, dtype=res.dtype, workspace=ws))

    def _serve_exceptions(self, res: torch.Tensor, pair_ids: torch.Tensor,
                          variant: torch.Tensor) -> None:
        keys = self.exception_keys.to(pair_ids.device)
        key = variant.to(torch.int64) * self.n_pairs + pair_ids
        pos = torch.searchsorted(keys, key).clamp_max(keys.shape[0] - 1)
        hit = torch.nonzero((keys.index_select(0, pos) == key) & (variant > 0)).reshape(-1)
        if hit.numel():
            vals = self.exception_values.index_select(0, pos.index_select(0, hit).to(
                self.exception_values.device))
            res.index_copy_(0, hit, vals.to(device=res.device, dtype=res.dtype))


# --- deriving a stored dataset ----------------------------------------------------------------
@dataclass
class DeriveReport:
    """What checking stored steering against a formula found."""

    formula: Formula
    n_pairs: int
    atol: float
    rtol: float
    #: exceptions per variant name
    exceptions: dict[str, int] = field(default_factory=dict)
    #: largest element difference among the rows reproduced within the tolerance
    max_abs_diff: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.exceptions.values())

    def __str__(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in self.exceptions.items())
        kept = [n for n in KEEPABLE if n not in self.exceptions]
        also = f"; kept stored, copied: {', '.join(kept)}" if kept else ""
        return (f"derived steering ({self.formula.name}): {self.total} of "
                f"{len(self.exceptions) * self.n_pairs} stored rows kept as exceptions "
                f"({per}){also}; tolerance "
                f"atol={self.atol:g} rtol={self.rtol:g}; largest difference within it "
                f"{self.max_abs_diff:.3g}")


def derived_chunks(
    f: Formula, *, questions: torch.Tensor, sources: torch.Tensor, centroids: torch.Tensor,
    keyword_embs: torch.Tensor, pair_index: torch.Tensor, pair_cluster_id: torch.Tensor,
    keyword_offsets: torch.Tensor, keyword_ids: torch.Tensor, dtype: torch.dtype,
    chunk: int = 1 << 14, variants: Sequence[int] = (1, 2, 3),
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Every derived steering row of a dataset (of ``variants``: the derived ones of a
    dataset that keeps some stored), as ``(variant, first pair, rows)`` chunks (tables may
    be tensors or maps; bounded memory)."""
    n = int(pair_index.shape[0])
    for v in variants:
        needs = f.needs(v)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            pids = torch.arange(start, stop, dtype=torch.int64)
            pi = pair_index[start:stop].to(torch.int64)
            c = centroids.index_select(0, pair_cluster_id[start:stop].to(torch.int64))
            q = questions.index_select(0, pi[:, 0]) if "q" in needs else None
            s = sources.index_select(0, pi[:, 1]) if "s" in needs else None
            kw = keyword_rows_of(keyword_offsets, keyword_ids, pids,
                                 lambda ids: keyword_embs.index_select(0, ids)) \
                if "k" in needs else None
            yield v, start, steering_rows(f, v, centroids=c, questions=q, sources=s,
                                          keywords=kw, dtype=dtype)


def find_exceptions(
    f: Formula, stored: Sequence[Any], tables: Mapping[str, torch.Tensor], *,
    dtype: torch.dtype, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
    chunk: int = 1 << 14, variants: Sequence[int] = (1, 2, 3),
) -> tuple[torch.Tensor, torch.Tensor, DeriveReport]:
    """Check every stored steering row of ``variants`` (``stored``: the three arrays in
    variant order, tensors or maps; those of other variants are not read) against ``f``
    computed from ``tables`` (the dataset's arrays by name); returns the exception rows
    ``[E, 2]``, their stored values ``[E, D]`` (in ``dtype``) and the report. A row is
    reproduced when every element is within ``atol + rtol * |stored|``."""
    n = int(tables["pair_index"].shape[0])
    d = int(tables["centroid_embs"].shape[1])
    report = DeriveReport(f, n, atol, rtol, {STEERING_VARIANTS[v]: 0 for v in variants})
    rows: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    for v, start, got in derived_chunks(f, dtype=dtype, chunk=chunk, variants=variants,
                                        **table_args(tables)):
        want = stored[v - 1][start : start + got.shape[0]].to(dtype)
        diff = (got.to(torch.float64) - want.to(torch.float64)).abs()
        bound = atol + rtol * want.to(torch.float64).abs()
        off = ~(diff <= bound).all(dim=1)  # NaN differences are exceptions too
        if bool(off.any()):
            where = torch.nonzero(off).reshape(-1)
            rows.append(torch.stack([torch.full_like(where, v), where + start], dim=1))
            vals.append(want.index_select(0, where))
            report.exceptions[STEERING_VARIANTS[v]] += int(where.numel())
        ok = ~off
        if bool(ok.any()):
            report.max_abs_diff = max(report.max_abs_diff, float(diff[ok].max()))
    e_rows = torch.cat(rows) if rows else torch.zeros((0, 2), dtype=torch.int64)
    e_vals = torch.cat(vals) if vals else torch.zeros((0, d), dtype=dtype)
    return e_rows, e_vals, report


def table_args(arrays: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of :func:`derived_chunks` from a dataset's arrays by name."""
    return {"questions": arrays["question_embs"], "sources": arrays["source_embs"],
            "centroids": arrays["centroid_embs"], "keyword_embs": arrays["keyword_embs"],
            "pair_index": arrays["pair_index"], "pair_cluster_id": arrays["pair_cluster_id"],
            "keyword_offsets": arrays["pair_keyword_offsets"],
            "keyword_ids": arrays["pair_keyword_ids"]}


#: The tables derived steering reads (what :func:`table_args` takes).
FORMULA_INPUTS: tuple[str, ...] = ("question_embs", "source_embs", "centroid_embs",
                                   "keyword_embs", "pair_index", "pair_cluster_id",
                                   "pair_keyword_offsets", "pair_keyword_ids")


def derive_arrays(
    arrays: Mapping[str, Any], manifest: Manifest, f: Formula = JASPER_V1, *,
    atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, chunk: int = 1 << 14,
    dtype: torch.dtype | None = None, keep: Sequence[str] | str | None = None,
) -> tuple[dict[str, torch.Tensor], Manifest, DeriveReport]:
    """A stored-steering dataset's arrays and manifest turned into a derived one: the
    steering arrays are dropped, every one of their rows is checked against ``f`` and the
    rows it does not reproduce within (``atol``, ``rtol``) become the stored exceptions, so
    the batches served stay what they were (up to the tolerance). ``keep`` (variant names,
    :func:`kept_variants`) keeps those variants' arrays as they are (not compared; they must
    have the served ``dtype``). ``arrays`` may hold maps or anything sliceable by rows for the
    steering arrays (then pass their ``dtype``)."""
    import copy

    if derived_spec(manifest) is not None:
        raise ValueError("the dataset's steering is derived already")
    if dtype is None:
        dtype = arrays[STEERING[0]].dtype
        for n in STEERING[1:]:
            dtype = torch.promote_types(dtype, arrays[n].dtype)
    from jasper.dtypes import dtype_name

    spec = DerivedSpec(f, dtype_name(dtype), stored_variants=kept_variants(keep))
    for n in spec.stored_arrays:
        if arrays[n].dtype != dtype:
            raise ValueError(f"{n} is {arrays[n].dtype} but the steering is served as {dtype} "
                             "(the widest of the three arrays): a kept array is copied as it "
                             "is, so it must have the served dtype")
    rows, vals, report = find_exceptions(f, [arrays[n] for n in STEERING], arrays,
                                         dtype=dtype, atol=atol, rtol=rtol, chunk=chunk,
                                         variants=spec.derived_ids)
    out = {n: t for n, t in arrays.items() if n not in spec.derived_arrays}
    out[EXCEPTION_ROWS], out[EXCEPTION_VALUES] = rows, vals
    m = copy.deepcopy(manifest)
    m.derived_steering = DerivedSpec(
        f, spec.dtype, int(rows.shape[0]), atol, rtol,
        len(spec.derived_ids) * int(arrays["pair_index"].shape[0]),
        spec.stored_variants).to_dict()
    m.arrays = {}
    return out, m, report


def stored_bytes_per_pair(dim: int, itemsize: int = 4) -> int:
    """Bytes of stored steering per pair (three ``[D]`` rows)."""
    return 3 * dim * itemsize


__all__ = [
    "CACHE_MAX_BYTES",
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "EXCEPTION_ARRAYS",
    "EXCEPTION_ROWS",
    "EXCEPTION_VALUES",
    "FORMULAS",
    "FORMULA_INPUTS",
    "JASPER_V1",
    "KEEPABLE",
    "MANIFEST_KEY",
    "STEERING",
    "DeriveReport",
    "DerivedSpec",
    "DerivedSteering",
    "Formula",
    "KeywordRows",
    "KeywordSlots",
    "RowCache",
    "Workspace",
    "check_exception_layout",
    "check_exceptions",
    "count_order",
    "derive_arrays",
    "derived_chunks",
    "derived_spec",
    "find_exceptions",
    "formula",
    "kept_variants",
    "keyword_rows_of",
    "keyword_slots_of",
    "steering_rows",
    "stored_names",
    "table_args",
    "unit",
]
