"""The structural check of the HDF5 group index (jasper_hdf5.structure) before HDF5 walks it.

Sound files of every kind the reader meets pass (jasper-hdf5's own, the original system's
legacy layout with per-pair keyword datasets, libver "latest"); damage HDF5 follows unchecked
(a B-tree cycle, a node claiming more entries than it holds, a name outside its heap, an object
header continued into itself) is a FormatError naming dataset.h5 and the structure, raised on
open; a dataset where the reader expects a group is a FormatError too (it was an
AttributeError, found by the fuzz target).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import jasper
from jasper.errors import FormatError
from jasper_hdf5.layout import FILE_NAME
from jasper_hdf5.structure import StructureError, check_group_index

OFFSET = 8  # h5py's files use 8-byte offsets and lengths
ROOT_ENTRY = 0x38  # the root group's symbol-table entry in a version-0 superblock


def check(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        check_group_index(lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _u(data: bytes | bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + OFFSET], "little")


def _root_btree(data: bytes | bytearray) -> int:
    # entry: name offset, object header address, cache type, reserved, then the scratch pad
    return _u(data, ROOT_ENTRY + 2 * OFFSET + 8)


def _first_snod(data: bytes | bytearray) -> int:
    bt = _root_btree(data)
    assert data[bt : bt + 4] == b"TREE" and data[bt + 5] == 0
    return _u(data, bt + 8 + 2 * OFFSET + OFFSET)  # after the header and key 0


def _legacy(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        g = f.create_group("pair_data/keyword_ids")
        for i in range(300):
            g.create_dataset(str(i), data=np.arange(3))
        for i in range(40):
            f.create_dataset(f"d{i}", data=np.arange(2))
    return path


def test_sound_files_pass(small_dataset: Path, tmp_path: Path) -> None:
    check(small_dataset / FILE_NAME)
    check(_legacy(tmp_path / "legacy.h5"))
    with h5py.File(tmp_path / "latest.h5", "w", libver="latest") as f:
        f.create_dataset("x", data=np.arange(3))
        f.create_group("g").create_dataset("y", data=np.arange(2))
    check(tmp_path / "latest.h5")


def _damaged(small_dataset: Path, copy_dataset: Callable[[Path], Path],
             damage: Callable[[bytearray], None]) -> Path:
    path = copy_dataset(small_dataset)
    data = bytearray((path / FILE_NAME).read_bytes())
    damage(data)
    (path / FILE_NAME).write_bytes(bytes(data))
    return path


def _cycle(data: bytearray) -> None:
    bt = _root_btree(data)
    data[bt + 5] = 1  # an internal node ...
    child = bt + 8 + 2 * OFFSET + OFFSET
    data[child : child + OFFSET] = bt.to_bytes(OFFSET, "little")  # ... whose child is itself


def _too_many_entries(data: bytearray) -> None:
    snod = _first_snod(data)
    data[snod + 6 : snod + 8] = (1000).to_bytes(2, "little")


def _name_outside_heap(data: bytearray) -> None:
    snod = _first_snod(data)
    data[snod + 8 : snod + 8 + OFFSET] = (10**9).to_bytes(OFFSET, "little")


def _continuation_cycle(data: bytearray) -> None:
    # the root object header's first message becomes a continuation back to its own block
    header = _u(data, ROOT_ENTRY + OFFSET)
    assert data[header] == 1, "version-1 object header"
    msg = header + 16
    data[msg : msg + 2] = (0x10).to_bytes(2, "little")
    data[msg + 2 : msg + 4] = (2 * OFFSET).to_bytes(2, "little")
    data[msg + 8 : msg + 8 + OFFSET] = (header + 16).to_bytes(OFFSET, "little")
    data[msg + 8 + OFFSET : msg + 8 + 2 * OFFSET] = (64).to_bytes(OFFSET, "little")


@pytest.mark.parametrize(("damage", "rule"), [
    (_cycle, "reached twice"),
    (_too_many_entries, "more than its capacity"),
    (_name_outside_heap, "outside its heap"),
    (_continuation_cycle, "continued into twice"),
], ids=["btree-cycle", "snod-capacity", "name-offset", "continuation-cycle"])
def test_damaged_index_is_a_format_error_on_open(small_dataset: Path,
                                                 copy_dataset: Callable[[Path], Path],
                                                 damage, rule: str) -> None:
    path = _damaged(small_dataset, copy_dataset, damage)
    with pytest.raises(StructureError, match=rule):
        check(path / FILE_NAME)
    with pytest.raises(FormatError, match=rf"{FILE_NAME}.*damaged HDF5 group index.*{rule}"), \
            jasper.open_store(path, "hdf5") as reader:
        reader.array_names()


def test_dataset_where_a_group_is_expected_is_a_format_error(
        small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    with h5py.File(path / FILE_NAME, "r+") as f:
        group = next(k for k in f if isinstance(f[k], h5py.Group))
        members = list(f[group])
        del f[group]
        f.create_dataset(group, data=np.arange(3))
    with pytest.raises(FormatError, match=rf"'{group}' is a Dataset, expected a group"), \
            jasper.open_store(path, "hdf5") as reader:
        for name in reader.array_names():
            reader.read(name)
    assert members, "the replaced group held arrays"
