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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=64), st.sampled_from([list, tuple]))
def test_a_list_of_ints_converts_as_torch_would(values: list[int], kind: type) -> None:
    """The numpy fast path for Python lists gives exactly torch's int64 tensor."""
    got = as_row_index(kind(values))
    assert got.dtype == torch.int64 and got.tolist() == values


@pytest.mark.parametrize("bad", [[0.5, 1], [True, False], [1, 2.0], ["1"], [2**63], [2**64], [None]])
def test_a_list_that_is_not_integers_is_refused(bad: list[object]) -> None:
    with pytest.raises((TypeError, ValueError, OverflowError, RuntimeError)):
        as_row_index(bad)


def test_nested_lists_and_numpy_ints_convert() -> None:
    import numpy as np

    assert as_row_index([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]
    assert as_row_index([np.int32(3), np.int64(5)]).tolist() == [3, 5]
    assert as_row_index([]).dtype == torch.int64


def test_gather_rows_keeps_the_index_shape() -> None:
    src = torch.arange(20).reshape(10, 2)
    idx = torch.tensor([[3, 1], [3, 9]])
    assert torch.equal(gather_rows(src, idx), src[idx])
