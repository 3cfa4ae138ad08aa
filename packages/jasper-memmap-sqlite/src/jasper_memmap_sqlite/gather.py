"""Row gathers from memory maps, for the cluster-labeled dataset: core's :mod:`jasper.rows`.

Sorting, de-duplication, bounds checks and un-permuting exist once, in core; these names stay
for the modules that import them from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jasper.lazy import lazy_torch
from jasper.rows import as_row_index, check_rows, gather_rows

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())


def as_index(rows: object) -> torch.Tensor:
    """``rows`` (tensor, list, range, numpy array) as an int64 CPU tensor."""
    return as_row_index(rows)


def check_bounds(rows: torch.Tensor, n: int, what: str) -> None:
    """:class:`jasper.rows.RowIndexError` (an ``IndexError``) naming the first index outside
    ``[0, n)``."""
    check_rows(rows, n, what)


__all__ = ["as_index", "check_bounds", "gather_rows"]
