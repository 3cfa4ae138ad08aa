"""Records: strings and JSON values per row as two ordinary arrays (offsets + UTF-8 bytes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper import records
from jasper.errors import IntegrityError
from jasper.schema import RecordSpec

TEXT = RecordSpec("t", "utf8", "text", nullable=True)
STRICT = RecordSpec("s", "utf8", "choice", choices=("source", "question"))
JSON = RecordSpec("j", "json", "json", nullable=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.none() | st.text(), max_size=40), data=st.data())
def test_text_round_trips_for_any_rows(values: list[str | None], data: st.DataObject) -> None:
    offsets, raw = records.encode(values, TEXT)
    assert offsets.dtype == torch.int64 and raw.dtype == torch.uint8
    assert offsets.shape == (len(values) + 1,) and int(offsets[-1]) == raw.shape[0]
    records.check(offsets, raw, TEXT, len(values))
    rows = data.draw(st.lists(st.integers(0, max(0, len(values) - 1)), max_size=30)
                     if values else st.just([]))
    assert records.decode(offsets, raw, np.array(rows, dtype=np.int64), TEXT) == [
        values[r] for r in rows]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(json_values, max_size=20))
def test_json_round_trips(values: list[object]) -> None:
    offsets, raw = records.encode(values, JSON)
    records.check(offsets, raw, JSON, len(values))
    got = records.decode(offsets, raw, np.arange(len(values)), JSON)
    assert got == values


def test_none_and_empty_string_differ() -> None:
    offsets, raw = records.encode(["", None, "x"], TEXT)
    assert records.decode(offsets, raw, np.array([0, 1, 2]), TEXT) == ["", None, "x"]


def test_rules_are_enforced_on_encode() -> None:
    with pytest.raises(IntegrityError, match="not nullable"):
        records.encode([None], STRICT)
    with pytest.raises(IntegrityError, match="expected one of"):
        records.encode(["answer"], STRICT)
    with pytest.raises(IntegrityError, match="expected a string"):
        records.encode([3], TEXT)
    with pytest.raises(IntegrityError, match="JSON"):
        records.encode([float("nan")], JSON)


def test_check_names_the_broken_rule_and_row() -> None:
    offsets, raw = records.encode(["ab", "cd", "ef"], TEXT)
    bad = offsets.clone()
    bad[2] = 1
    with pytest.raises(IntegrityError, match=r"t_offsets\[2\].*must not decrease") as e:
        records.check(bad, raw, TEXT, 3)
    assert e.value.row == 2
    with pytest.raises(IntegrityError, match="t_bytes has 5 bytes"):
        records.check(offsets, raw[:-1], TEXT, 3)
    with pytest.raises(IntegrityError, match="start at 0"):
        records.check(offsets + 1, raw, TEXT, 3)
    with pytest.raises(IntegrityError, match="expected \\(4,\\)"):
        records.check(offsets[:-1], raw, TEXT, 3)
    broken = raw.clone()
    broken[2] = 0xC3  # a lead byte without its continuation byte
    with pytest.raises(IntegrityError, match=r"t\[1\] is not valid UTF-8") as e:
        records.check(offsets, broken, TEXT, 3)
    assert e.value.row == 1
    records.check(offsets, broken, TEXT, 3, decode_values=False)  # structure only
    off, raw = records.encode(["question", "source"], STRICT)
    raw = raw.clone()
    raw[0] = ord("Q")
    with pytest.raises(IntegrityError, match="expected one of"):
        records.check(off, raw, STRICT, 2)
    joff, jraw = records.encode([{"a": 1}], JSON)
    jraw = jraw.clone()
    jraw[-1] = ord("x")
    with pytest.raises(IntegrityError, match="not JSON"):
        records.check(joff, jraw, JSON, 1)
    with pytest.raises(IntegrityError, match="JSON"):
        records.decode(joff, jraw, np.array([0]), JSON)


def test_decode_reads_the_asked_rows_in_their_order(tmp_path) -> None:
    values = [f"row {i} " + "é" * (i % 5) for i in range(1000)]
    offsets, raw = records.encode(values, TEXT)
    f = tmp_path / "bytes.bin"
    raw.numpy().tofile(f)
    mapped = torch.from_numpy(np.fromfile(f, dtype=np.uint8))
    rows = np.array([999, 0, 500, 500], dtype=np.int64)
    assert records.decode(offsets, mapped, rows, TEXT) == [values[r] for r in rows]
