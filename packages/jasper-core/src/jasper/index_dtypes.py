"""Compact index arrays: the integer dtype each index array of a steering dataset is stored in.

At 10^9 pairs the index arrays are most of what a dataset with derived steering stores
(docs/derived-steering.md): int64 ids spend 4 of their 8 bytes on zeros whenever the table they
point into has fewer than 2^31 rows, and a tier (1-4) needs one byte, not eight. So each index
array may be stored in the narrowest integer dtype that holds its values
(docs/data-model.md#index-dtypes):

- a row id (``pair_index``, ``pair_cluster_id``, ``pair_keyword_ids``, ``hard_negatives``,
  ``train_idx``/``val_idx``/``test_idx``): ``int32`` or ``int64``; ``int32`` only while every
  row of the table it references is addressable (the table has at most 2^31 rows);
- the CSR offsets ``pair_keyword_offsets``: ``int32`` while ``pair_keyword_ids`` has at most
  2^31 - 1 values (the last offset is their count), else ``int64``;
- ``negative_tiers``: any integer dtype that holds ``n_tiers`` (tiers count from 0 or 1);
  builders write ``int8``.

int64 stays valid for every array, so datasets written before compact indices open unchanged;
``jasper convert`` keeps each array's stored dtype. Batches always carry int64 ids and tiers:
the gather widens the few rows of a batch after selecting them (``index_select`` then
``.to(torch.int64)``), never the whole array.

:func:`check_index_capacity` is the rule :mod:`jasper.validation` and the writer apply; its
``capacities`` argument lets tests put the int32 boundary at a few rows instead of 2^31.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jasper.errors import ShapeError
from jasper.schema import ARRAYS, PAIRS, Role

#: The integer dtypes an index array may be stored in, narrowest first.
INDEX_DTYPES: tuple[str, ...] = ("int32", "int64")
#: The dtype builders store tiers in (``negative_tiers`` may be any integer dtype that holds
#: them; see :data:`jasper.schema.INT_LABEL`).
TIER_DTYPE = "int8"
#: Arrays whose dtype :func:`check_index_capacity` rules on (the steering kind's index arrays).
INDEX_ARRAYS: tuple[str, ...] = tuple(
    n for n, s in ARRAYS.items()
    if s.references or s.role in (Role.CSR_OFFSETS,) or n == "negative_tiers")
#: The CSR offsets and the values they count.
_CSR = ("pair_keyword_offsets", "pair_keyword_ids")


def capacity(dtype: str) -> int:
    """The largest value integer dtype ``dtype`` (a logical name, e.g. ``"int32"``) holds."""
    return int(np.iinfo(np.dtype(dtype)).max)


#: The largest value of every integer dtype (what a rule compares a bound with).
CAPACITIES: dict[str, int] = {
    d: capacity(d) for d in ("int8", "uint8", "int16", "int32", "int64")}


def largest_value(name: str, rows: Mapping[str, int], n_tiers: int | None = None) -> int | None:
    """The largest value array ``name`` must be able to hold, from the row counts ``rows``
    (array name -> rows, plus ``"pairs"`` -> N_p): the last row of the table(s) it references,
    the number of CSR values for the offsets, ``n_tiers`` for tiers (jasper's tiers are 1-4 with
    ``n_tiers = 4``; a builder given tiers from 0 records their maximum + 1). ``None`` when the
    manifest records no ``n_tiers``, or ``name`` is not an index array."""
    spec = ARRAYS.get(name)
    if spec is None:
        return None
    if spec.references:
        return max(int(rows[r]) for r in spec.references) - 1
    if name == _CSR[0]:
        return int(rows[_CSR[1]])
    if name == "negative_tiers":
        return None if n_tiers is None else int(n_tiers)
    return None


def _table_words(name: str, bound: int) -> str:
    spec = ARRAYS[name]
    if spec.references:
        tables = " / ".join("pairs (N_p)" if r == PAIRS else r for r in spec.references)
        return f"{tables} needs row ids up to {bound:,}"
    if name == _CSR[0]:
        return f"the last offset is the {bound:,} values of {_CSR[1]}"
    return f"the manifest records n_tiers = {bound:,}"


def check_index_capacity(
    dtypes: Mapping[str, str],
    rows: Mapping[str, int],
    *,
    n_tiers: int | None = None,
    capacities: Mapping[str, int] | None = None,
    path: str | Path | None = None,
) -> None:
    """Refuse an index array whose stored dtype cannot hold every value it must be able to
    hold (:func:`largest_value`): e.g. ``hard_negatives`` stored as int32 while ``source_embs``
    has more than 2^31 rows. ``dtypes`` maps array names to logical dtype names (arrays it
    does not name, and arrays that are not index arrays, are skipped); ``capacities``
    (default :data:`CAPACITIES`) is the largest value of each dtype. Raises
    :class:`~jasper.errors.ShapeError` naming the array and the rule; costs no data read."""
    caps = CAPACITIES if capacities is None else capacities
    for name in INDEX_ARRAYS:
        dtype = dtypes.get(name)
        if dtype is None or dtype not in caps:
            continue
        bound = largest_value(name, rows, n_tiers)
        if bound is None or bound <= caps[dtype]:
            continue
        wider = next((d for d in INDEX_DTYPES if caps.get(d, -1) >= bound), "int64")
        raise ShapeError(
            f"{name} is stored as {dtype}, which holds values up to {caps[dtype]:,}, but "
            f"{_table_words(name, bound)}; store it as {wider} (e.g. `jasper convert` from "
            "the source, or rebuild)", array=name, rule=f"{dtype} holds the {name} values",
            path=path)


def narrowest(bound: int, choices: tuple[str, ...] = INDEX_DTYPES,
              capacities: Mapping[str, int] | None = None) -> str:
    """The first of ``choices`` (narrowest first) whose capacity is at least ``bound`` (the
    largest value to hold; int64 when none is)."""
    caps = CAPACITIES if capacities is None else capacities
    return next((d for d in choices if caps.get(d, -1) >= bound), "int64")


def compact_dtypes(rows: Mapping[str, int], n_tiers: int | None = None,
                   capacities: Mapping[str, int] | None = None) -> dict[str, str]:
    """The dtype a builder stores each index array in: the narrowest that holds it, tiers
    :data:`TIER_DTYPE` (int8) while ``n_tiers`` fits it."""
    out: dict[str, str] = {}
    for name in INDEX_ARRAYS:
        bound = largest_value(name, rows, n_tiers)
        if name == "negative_tiers":
            out[name] = narrowest(max(bound or 0, 4), (TIER_DTYPE, *INDEX_DTYPES), capacities)
        elif bound is not None:
            out[name] = narrowest(bound, INDEX_DTYPES, capacities)
    return out


def cast_index(arr: np.ndarray, dtype: str, name: str | None = None) -> np.ndarray:
    """``arr`` (array ``name``) in integer dtype ``dtype`` (no copy when it already is); values
    are checked against the dtype's range, so a narrowing never wraps silently."""
    target = np.dtype(dtype)
    if arr.dtype == target:
        return arr
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        info = np.iinfo(target)
        if lo < info.min or hi > info.max:
            raise ShapeError(f"{name or 'an index array'} holds values {lo}..{hi}, which do "
                             f"not fit {dtype}", array=name, rule=f"{dtype} range")
    return arr.astype(target)


__all__ = [
    "CAPACITIES",
    "INDEX_ARRAYS",
    "INDEX_DTYPES",
    "TIER_DTYPE",
    "capacity",
    "cast_index",
    "check_index_capacity",
    "compact_dtypes",
    "largest_value",
    "narrowest",
]
