"""Bad input gives typed jasper errors naming the file and the array, never a bare OSError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import jasper
from jasper.errors import (
    DatasetNotFoundError,
    FormatError,
    IntegrityError,
    JasperError,
    ShapeError,
    UnsafeFileError,
)
from jasper.schema import ARRAYS
from jasper_hdf5.layout import FILE_NAME, PATHS


def read_all(path: Path) -> None:
    with jasper.open_store(path) as reader:
        for name in ARRAYS:
            reader.read(name)


def test_missing_file(small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    (path / FILE_NAME).unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        jasper.open_store(path, "hdf5")
    assert FILE_NAME in str(err.value)


def test_not_an_hdf5_file(small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    (path / FILE_NAME).write_bytes(b"PK\x03\x04 this is a zip file, not HDF5" * 100)
    with pytest.raises(FormatError, match="not an HDF5 file") as err:
        jasper.open_store(path)
    assert str(path / FILE_NAME) in str(err.value)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.97])
def test_truncated_file(small_dataset: Path, copy_dataset: Callable[[Path], Path],
                        keep: float) -> None:
    path = copy_dataset(small_dataset)
    f = path / FILE_NAME
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FormatError) as err:
        read_all(path)
    assert str(f) in str(err.value)


def test_truncated_uncompressed_file_row_reads(tmp_path: Path, small_arrays: tuple) -> None:
    """Uncompressed arrays are read by row through a map of the file: a truncated file must be
    a typed error before any mapped byte is touched (a SIGBUS would kill the process)."""
    from jasper.store import write_store

    arrays, manifest = small_arrays
    path = write_store(tmp_path / "n", arrays, manifest, backend="hdf5", compression="none")
    f = path / FILE_NAME
    with h5py.File(f) as h:
        end = h[PATHS["steering_residual"]].id.get_offset() + arrays["steering_residual"].nbytes
    with open(f, "r+b") as fh:
        fh.truncate(end - 100)
    with pytest.raises(FormatError) as err, jasper.open_store(path) as reader:
        reader.read_rows("steering_residual", torch.tensor([599, 3]))
    assert str(f) in str(err.value)


def test_corrupt_compressed_chunk(small_dataset: Path, copy_dataset: Callable[[Path], Path]
                                  ) -> None:
    path = copy_dataset(small_dataset)
    f = path / FILE_NAME
    with h5py.File(f) as h:
        info = h[PATHS["hard_negatives"]].id.get_chunk_info(0)
    with open(f, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with jasper.open_store(path) as reader:
        for read in (lambda: reader.read("hard_negatives"),
                     lambda: reader.read_rows("hard_negatives", torch.tensor([1, 0])),
                     lambda: reader.read_slice("hard_negatives", 0, 3)):
            with pytest.raises(FormatError) as err:
                read()
            assert str(f) in str(err.value) and "'hard_negatives'" in str(err.value)


def test_missing_dataset_in_the_file(small_dataset: Path, copy_dataset: Callable[[Path], Path]
                                     ) -> None:
    path = copy_dataset(small_dataset)
    with h5py.File(path / FILE_NAME, "a") as h:
        del h[PATHS["steering_residual"]]
    with jasper.open_store(path) as reader:
        assert "steering_residual" not in reader.array_names()
        for call in (lambda: reader.read("steering_residual"),
                     lambda: reader.info("steering_residual"),
                     lambda: reader.read_rows("steering_residual", torch.tensor([0]))):
            with pytest.raises(FormatError) as err:
                call()
            msg = str(err.value)
            assert FILE_NAME in msg and "steering_residual" in msg and "steering/residual" in msg
    with pytest.raises(IntegrityError, match="steering_residual"):
        jasper.validate(path)


def test_unknown_array_name(small_dataset: Path) -> None:
    with jasper.open_store(small_dataset) as reader, pytest.raises(FormatError, match="nope"):
        reader.read("nope")


def _replace(path: Path, name: str, data: np.ndarray, attrs: dict | None = None) -> None:
    with h5py.File(path / FILE_NAME, "a") as h:
        del h[PATHS[name]]
        d = h.create_dataset(PATHS[name], data=data)
        for k, v in (attrs or {}).items():
            d.attrs[k] = v


def test_wrong_shape_against_the_manifest(small_dataset: Path,
                                          copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    _replace(path, "steering_centroid", np.zeros((600, 23), np.float32),
             {"jasper_dtype": "float32"})
    with jasper.open_store(path) as reader, pytest.raises(ShapeError) as err:
        reader.read("steering_centroid")
    assert err.value.array == "steering_centroid" and str(path / FILE_NAME) in str(err.value)
    assert "(600, 23)" in str(err.value) and "(600, 24)" in str(err.value)


def test_wrong_rank(small_dataset: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    _replace(path, "pair_cluster_id", np.zeros((600, 2), np.int64))
    with jasper.open_store(path) as reader, pytest.raises(ShapeError, match="rank") as err:
        reader.info("pair_cluster_id")
    assert err.value.array == "pair_cluster_id"


@pytest.mark.parametrize(
    ("data", "attrs", "needle"),
    [
        (np.zeros((600, 2), np.float32), {}, "dtype float32"),
        (np.zeros((600, 2), np.uint32), {}, "uint32"),
        (np.zeros((600, 2), np.float32), {"jasper_dtype": "bfloat16"}, "bfloat16"),
        (np.zeros((600, 2), np.int64), {"jasper_dtype": "complex"}, "complex"),
    ],
)
def test_wrong_dtype(small_dataset: Path, copy_dataset: Callable[[Path], Path],
                     data: np.ndarray, attrs: dict, needle: str) -> None:
    path = copy_dataset(small_dataset)
    _replace(path, "pair_index", data, attrs)
    with jasper.open_store(path) as reader, pytest.raises(ShapeError, match=needle) as err:
        reader.read("pair_index")
    assert err.value.array == "pair_index" and str(path / FILE_NAME) in str(err.value)


def test_group_where_a_dataset_belongs(small_dataset: Path,
                                       copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    with h5py.File(path / FILE_NAME, "a") as h:
        del h[PATHS["centroid_distances"]]
        h.create_group(PATHS["centroid_distances"])
    with jasper.open_store(path) as reader, pytest.raises(FormatError, match="expected a dataset"):
        reader.info("centroid_distances")


def test_newer_layout_version_is_refused(small_dataset: Path,
                                         copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    with h5py.File(path / FILE_NAME, "a") as h:
        h.attrs["jasper_layout_version"] = 99
    with pytest.raises(FormatError, match="upgrade"):
        jasper.open_store(path)


def _null_root_symbol_table_message(file: Path) -> None:
    """Turn the root group's symbol-table message into a NIL message (type 0), as a fuzzed
    input did: HDF5 then cannot tell what the root object is. The message is found by its
    data, the B-tree and local-heap addresses that a version-0 superblock also caches in the
    root group's symbol-table entry (bytes 56..96: name offset, header address, cache type,
    reserved, B-tree address, heap address)."""
    import struct

    data = bytearray(file.read_bytes())
    assert data[:8] == b"\x89HDF\r\n\x1a\n" and data[8] == 0, "expected a version-0 superblock"
    cache_type, = struct.unpack_from("<I", data, 72)
    assert cache_type == 1, "the root entry caches no symbol-table addresses"
    stab = bytes(data[80:96])  # B-tree address, heap address
    # message header: type u16, size u16 (16), flags u8, 3 reserved bytes; then the addresses
    at = data.find(struct.pack("<HH", 0x11, 16), 96)
    while at >= 0 and bytes(data[at + 8 : at + 24]) != stab:
        at = data.find(struct.pack("<HH", 0x11, 16), at + 1)
    assert at >= 0, "the root group's symbol-table message was not found"
    data[at : at + 2] = b"\0\0"
    file.write_bytes(bytes(data))


def test_root_group_of_unknown_type(small_dataset: Path,
                                    copy_dataset: Callable[[Path], Path]) -> None:
    # h5py raises KeyError ("unable to determine object type") reading the root's attributes
    path = copy_dataset(small_dataset)
    _null_root_symbol_table_message(path / FILE_NAME)
    with pytest.raises(FormatError, match="HDF5 read failed") as err:
        jasper.open_store(path)
    assert str(path / FILE_NAME) in str(err.value)


class _NotATensor:
    """Pickling this needs the full unpickler, which jasper refuses."""


def test_unsafe_split_pt_is_refused(small_dataset: Path, copy_dataset: Callable[[Path], Path]
                                    ) -> None:
    path = copy_dataset(small_dataset)
    with h5py.File(path / FILE_NAME, "a") as h:
        del h[PATHS["test_idx"]]
    torch.save({"ids": _NotATensor()}, path / "test_idx.pt")
    with jasper.open_store(path) as reader, pytest.raises(UnsafeFileError) as err:
        reader.read("test_idx")
    assert "test_idx.pt" in str(err.value)


@pytest.mark.parametrize("content", [b"garbage", None])
def test_broken_split_pt(small_dataset: Path, copy_dataset: Callable[[Path], Path],
                         content: bytes | None) -> None:
    path = copy_dataset(small_dataset)
    with h5py.File(path / FILE_NAME, "a") as h:
        del h[PATHS["val_idx"]]
    if content is None:
        torch.save(torch.zeros(3, 2), path / "val_idx.pt")
    else:
        (path / "val_idx.pt").write_bytes(content)
    with jasper.open_store(path) as reader, pytest.raises(JasperError) as err:
        reader.read("val_idx")
    assert "val_idx" in str(err.value)
    assert isinstance(err.value, (FormatError, ShapeError))


def test_mmap_refused(small_dataset: Path) -> None:
    from jasper.errors import CapabilityError

    with pytest.raises(CapabilityError):
        jasper.open_store(small_dataset, mmap=True)
    reader = jasper.get_backend("hdf5").open(small_dataset, jasper.Manifest.load(small_dataset))
    with reader, pytest.raises(CapabilityError, match="to pt"):
        reader.map("question_embs")
