"""Row gathers from memory maps: sorted, de-duplicated, un-permuted.

A shuffled batch read straight from a map faults pages in random order and reads a repeated row
twice. Sorting the indices first turns the faults into one ascending sweep (the kernel can merge
neighbouring pages), de-duplication reads each row once, and one small in-RAM gather restores the
caller's order (docs/design.md#performance).
"""

from __future__ import annotations

import torch


def as_index(rows: object) -> torch.Tensor:
    """``rows`` (tensor, list, range, numpy array) as an int64 CPU tensor."""
    if isinstance(rows, torch.Tensor):
        t = rows
    else:
        t = torch.as_tensor(rows)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"row indices must be integers, got {t.dtype}")
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    return t.cpu()


def check_bounds(rows: torch.Tensor, n: int, what: str) -> None:
    """IndexError naming the first index outside ``[0, n)`` (one reduction when all are fine)."""
    if rows.numel() == 0:
        return
    lo, hi = torch.aminmax(rows)
    if int(lo) >= 0 and int(hi) < n:
        return
    flat = rows.reshape(-1)
    pos = int(torch.nonzero((flat < 0) | (flat >= n))[0])
    raise IndexError(f"{what}: index {int(flat[pos])} (position {pos}) is out of range for "
                     f"{n} rows")


def gather_rows(src: torch.Tensor, rows: torch.Tensor, what: str = "array") -> torch.Tensor:
    """``src[rows]`` for a (mapped) tensor: reads each distinct row once, in ascending order.

    ``rows`` may have any shape; the result has shape ``rows.shape + src.shape[1:]`` and is a new
    tensor the caller owns.
    """
    idx = as_index(rows)
    check_bounds(idx, int(src.shape[0]), what)
    flat = idx.reshape(-1)
    tail = tuple(src.shape[1:])
    if flat.numel() == 0:
        return torch.empty((*idx.shape, *tail), dtype=src.dtype)
    uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    got = src.index_select(0, uniq)
    if uniq.numel() != flat.numel() or not torch.equal(uniq, flat):
        got = got.index_select(0, inverse)
    return got.reshape(*idx.shape, *tail)
