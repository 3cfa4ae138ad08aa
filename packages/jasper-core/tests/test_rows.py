"""Row-read planning (jasper.rows) and the contract's default read_rows on top of it."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.rows import (
    RowIndexError,
    as_row_index,
    check_rows,
    gather_rows,
    plan_spans,
    span_positions,
    unique_sorted,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 500), min_size=1, max_size=60), st.integers(0, 40))
def test_spans_cover_exactly_and_positions_select_the_rows(rows: list[int], gap: int) -> None:
    uniq, _ = unique_sorted(torch.tensor(rows))
    spans = plan_spans(uniq, gap)
    covered = torch.cat([torch.arange(a, b) for a, b in spans])
    assert all(b > a for a, b in spans)
    for (_, b), (a2, _) in itertools.pairwise(spans):
        assert a2 - b > gap  # spans are merged whenever the gap allows it
    assert set(uniq.tolist()) <= set(covered.tolist())
    pos = span_positions(spans, uniq)
    picked = covered if pos is None else covered.index_select(0, pos)
    assert torch.equal(picked, uniq)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 99), max_size=50))
def test_unique_sorted_round_trips(rows: list[int]) -> None:
    t = torch.tensor(rows, dtype=torch.int64)
    uniq, inverse = unique_sorted(t)
    assert bool((uniq[1:] > uniq[:-1]).all())
    assert torch.equal(uniq if inverse is None else uniq[inverse], t)


def test_out_of_range_is_a_typed_index_error_naming_array_and_row() -> None:
    with pytest.raises(RowIndexError, match="source_embs: row index 7 .position 2.") as e:
        check_rows(torch.tensor([0, 3, 7]), 5, "source_embs", "/data/x")
    assert isinstance(e.value, IndexError) and e.value.array == "source_embs" and e.value.row == 7
    with pytest.raises(RowIndexError, match="-1"):
        gather_rows(torch.zeros(4, 2), [1, -1])
    with pytest.raises(TypeError, match="integers"):
        as_row_index(torch.tensor([0.5]))


def test_gather_rows_keeps_the_index_shape() -> None:
    src = torch.arange(20).reshape(10, 2)
    idx = torch.tensor([[3, 1], [3, 9]])
    assert torch.equal(gather_rows(src, idx), src[idx])
