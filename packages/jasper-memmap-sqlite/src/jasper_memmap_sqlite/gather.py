"""Row gathers from memory maps, for the cluster-labeled dataset: core's :mod:`jasper.rows`.

Sorting, de-duplication, bounds checks and un-permuting exist once, in core; these names stay
for the modules that import them from here.
"""

from __future__ import annotations

import torch

from jasper.rows import as_row_index, check_rows, gather_rows


def as_index(rows: object) -> torch.Tensor:
    """``rows`` (tensor, list, range, numpy array) as an int64 CPU tensor."""
    return as_row_index(rows)


def check_bounds(rows: torch.Tensor, n: int, what: str) -> None:
    """:class:`jasper.rows.RowIndexError` (an ``IndexError``) naming the first index outside
    ``[0, n)``."""
    check_rows(rows, n, what)


__all__ = ["as_index", "check_bounds", "gather_rows"]
