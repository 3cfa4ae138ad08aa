"""Row reads, planned once for every backend: index checks, sorting, de-duplication, coalescing.

A shuffled batch asks for rows in random order, often with repeats. Every backend reads fastest
in ascending order (a map faults pages in one sweep, HDF5 decodes each chunk once, a file is read
forwards), reads a repeated row once, and merges rows that lie close together into one slice read
(one call instead of many; docs/design.md#performance; zarr's ``get_ranges`` and Lance's
scheduler merge near byte ranges the same way). :meth:`jasper.backend.StoreReader.read_rows`
does all of that with the functions below and hands a backend only sorted unique rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jasper.errors import IntegrityError
from jasper.lazy import lazy_torch

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

#: Merge two runs of rows when the rows between them are at most this many bytes: reading them
#: costs less than one more read call (about 20 us, i.e. ~64 KiB at page-cache speed).
MERGE_GAP_BYTES = 64 << 10


class RowIndexError(IntegrityError, IndexError):
    """A row index outside ``[0, rows)`` of an array (also an ``IndexError``)."""


def as_row_index(rows: object, what: str = "rows") -> torch.Tensor:
    """``rows`` (tensor, list, range, numpy array) as an int64 CPU tensor; ``TypeError`` for
    anything that is not integers."""
    if isinstance(rows, torch.Tensor):
        t = rows
    elif isinstance(rows, list | tuple):
        t = _from_sequence(rows)
    else:
        t = torch.as_tensor(rows)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{what}: row indices must be integers, got {t.dtype}")
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    return t.cpu()


def _from_sequence(rows: list[object] | tuple[object, ...]) -> torch.Tensor:
    # a DataLoader hands every batch over as a list of Python ints: numpy converts one 3-4x
    # faster than torch.as_tensor (34 vs 93-150 us at 1024 ints), which is a per-batch cost
    if not rows:
        return torch.empty(0, dtype=torch.int64)
    import numpy as np

    try:
        arr = np.asarray(rows)
    except (ValueError, TypeError, OverflowError):
        arr = None
    if arr is not None and arr.dtype.kind == "i":  # (unsigned only past int64: refused below)
        return torch.from_numpy(arr)
    return torch.as_tensor(rows)  # anything else: torch's conversion and its errors


def check_rows(rows: torch.Tensor, n: int, array: str, path: str | Path | None = None) -> None:
    """:class:`RowIndexError` naming the first index outside ``[0, n)`` (one reduction when all
    are in range)."""
    if rows.numel() == 0:
        return
    lo, hi = torch.aminmax(rows)
    if int(lo) >= 0 and int(hi) < n:
        return
    flat = rows.reshape(-1)
    pos = int(torch.nonzero((flat < 0) | (flat >= n))[0])
    raise RowIndexError(
        f"{array}: row index {int(flat[pos])} (position {pos}) is out of range for {n} rows",
        array=array, row=int(flat[pos]), rule="row index in range", path=path)


def unique_sorted(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(uniq, inverse)`` with ``uniq[inverse] == rows``; ``inverse`` is ``None`` when ``rows``
    is already strictly increasing (nothing to un-permute)."""
    flat = rows.reshape(-1)
    if flat.numel() <= 1 or bool((flat[1:] > flat[:-1]).all()):
        return flat, None
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    return uniq, inverse


def plan_spans(rows: torch.Tensor, max_gap: int) -> list[tuple[int, int]]:
    """Half-open row spans ``[start, stop)`` covering the sorted unique ``rows``, merging
    neighbours whose gap (rows between them) is at most ``max_gap``."""
    if rows.numel() == 0:
        return []
    gaps = rows[1:] - rows[:-1] - 1
    breaks = torch.nonzero(gaps > max_gap).reshape(-1)
    starts = torch.cat([rows[:1], rows[breaks + 1]]).tolist()
    stops = torch.cat([rows[breaks] + 1, rows[-1:] + 1]).tolist()
    return list(zip(starts, stops, strict=True))


def span_positions(spans: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor | None:
    """Where each of the sorted ``rows`` sits in the concatenation of ``spans`` (as planned by
    :func:`plan_spans`), or ``None`` when the spans hold exactly the rows (nothing to select)."""
    if sum(b - a for a, b in spans) == rows.numel():
        return None
    starts = torch.tensor([a for a, _ in spans], dtype=torch.int64)
    lengths = torch.tensor([b - a for a, b in spans], dtype=torch.int64)
    base = torch.cumsum(lengths, 0) - lengths  # where each span starts in the concatenation
    span_of = torch.searchsorted(starts, rows, right=True) - 1
    return base[span_of] + rows - starts[span_of]


def merge_gap_rows(row_bytes: int) -> int:
    """Rows in a gap worth reading through rather than making another call."""
    return MERGE_GAP_BYTES // max(1, row_bytes)


def gather_rows(src: torch.Tensor, rows: object, what: str = "array",
                path: str | Path | None = None) -> torch.Tensor:
    """``src[rows]`` for a (mapped) tensor, reading each distinct row once, in ascending order.

    ``rows`` may have any shape; the result has shape ``rows.shape + src.shape[1:]`` and is a new
    tensor the caller owns.
    """
    idx = as_row_index(rows, what)
    check_rows(idx, int(src.shape[0]), what, path)
    tail = tuple(src.shape[1:])
    if idx.numel() == 0:
        return torch.empty((*idx.shape, *tail), dtype=src.dtype)
    uniq, inverse = unique_sorted(idx)
    got = src.index_select(0, uniq)
    if inverse is not None:
        got = got.index_select(0, inverse)
    return got.reshape(*idx.shape, *tail)


__all__ = [
    "MERGE_GAP_BYTES",
    "RowIndexError",
    "as_row_index",
    "check_rows",
    "gather_rows",
    "merge_gap_rows",
    "plan_spans",
    "span_positions",
    "unique_sorted",
]
