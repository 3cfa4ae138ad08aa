"""The page-aligned .npy files: numpy-compatible, aligned, streamed, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jasper.errors import FormatError, ShapeError, UnsafeFileError
from jasper.manifest import Checksummer
from jasper_memmap_sqlite.npy import (
    BlockHasher,
    check_size,
    header_bytes,
    open_memmap,
    read_header,
    write_npy,
)

DTYPES = st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.int8, np.uint16,
                          np.uint8, np.bool_])


def _chunks(a: np.ndarray, step: int):
    for i in range(0, a.shape[0], step):
        yield a[i : i + step]
    if a.shape[0] == 0:
        yield a


@settings(max_examples=40, deadline=None)
@given(
    arr=DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=2,
                                                                    min_side=0, max_side=40))),
    step=st.integers(1, 50),
    align=st.sampled_from([64, 4096, 8192]),
)
def test_written_file_is_plain_npy_with_aligned_data(tmp_path_factory: pytest.TempPathFactory,
                                                     arr: np.ndarray, step: int,
                                                     align: int) -> None:
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    w = write_npy(path, arr.shape, arr.dtype, _chunks(arr, step), align=align)
    assert w.offset % align == 0
    back = np.load(path)  # numpy itself reads the file
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    h = read_header(path)
    assert (h.dtype, h.shape, h.offset) == (arr.dtype, arr.shape, w.offset)
    whole = Checksummer()
    whole.update(arr)
    assert w.checksum == whole.hexdigest()
    mm = open_memmap(path, h)
    np.testing.assert_array_equal(np.asarray(mm), arr)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 300), cols=st.integers(1, 9), pieces=st.lists(st.integers(1, 97),
                                                                        min_size=1, max_size=6))
def test_block_checksums_do_not_depend_on_chunking(rows: int, cols: int,
                                                   pieces: list[int]) -> None:
    a = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    one = BlockHasher(a[0:1].nbytes if rows else cols * 4)
    one.rows_per_block = 7
    one.update(a)
    many = BlockHasher(a[0:1].nbytes if rows else cols * 4)
    many.rows_per_block = 7
    start, i = 0, 0
    while start < rows:
        n = pieces[i % len(pieces)]
        many.update(a[start : start + n])
        start += n
        i += 1
    assert one.finish() == many.finish()
    assert len(one.blocks) == -(-rows // 7)


def test_truncated_file_names_file_row_and_rule(tmp_path: Path) -> None:
    a = np.ones((10, 8), np.float32)
    path = tmp_path / "t.npy"
    write_npy(path, a.shape, a.dtype, iter([a]), array="t")
    with open(path, "r+b") as f:
        f.truncate(4096 + 3 * 32 + 5)
    with pytest.raises(ShapeError) as e:
        check_size(path, read_header(path), "t")
    assert e.value.row == 3 and e.value.array == "t" and e.value.path == path
    assert "file size covers the recorded shape" in (e.value.rule or "")
    assert "t.npy" in str(e.value)


def test_garbage_and_pickled_npy_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an npy file at all")
    with pytest.raises(FormatError, match="bad.npy"):
        read_header(bad)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError):
        read_header(obj)
    fortran = tmp_path / "f.npy"
    np.save(fortran, np.asfortranarray(np.ones((3, 4))))
    with pytest.raises(FormatError, match="C order"):
        read_header(fortran)


def test_header_alignment_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        header_bytes(np.dtype(np.float32), (3, 3), align=100)


@pytest.mark.parametrize("damage", [b"\x00" * 40, bytes(range(128, 168))])
def test_damaged_header_is_refused_before_numpy_parses_it(tmp_path: Path, damage: bytes) -> None:
    """A zeroed or flipped range inside the header dict is a FormatError at once (numpy's
    literal parser used to spend seconds on it, hanging every reader of the file): the
    message is the pre-check's, so numpy's parser never ran."""
    from jasper.errors import FormatError
    from jasper_memmap_sqlite.npy import read_header

    f = tmp_path / "a.npy"
    np.save(f, np.zeros((4, 3), dtype=np.float32))
    data = bytearray(f.read_bytes())
    data[20 : 20 + len(damage)] = damage
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not text"):
        read_header(f, "a")
