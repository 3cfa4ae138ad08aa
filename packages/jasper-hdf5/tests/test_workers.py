"""Readers in DataLoader workers: opened lazily per process, safe across fork, picklable."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from hdf5_testutil import RowsDataset, assert_same, keep_batch
from torch.utils.data import DataLoader

import jasper

START_METHODS = ["fork", "spawn"]


def test_reader_pickles_without_handles(small_dataset: Path, small_arrays: tuple) -> None:
    arrays, _ = small_arrays
    with jasper.open_store(small_dataset) as reader:
        reader.read_rows("steering_centroid", torch.tensor([3, 1]))
        assert reader._handle.is_open  # open in this process
        blob = pickle.dumps(reader)
    clone = pickle.loads(blob)
    assert not clone._handle.is_open and clone._handle._handle is None
    rows = torch.tensor([5, 2, 5])
    assert_same(clone.read_rows("steering_centroid", rows), arrays["steering_centroid"][rows], "c")
    assert clone._handle.is_open and clone._handle._pid == os.getpid()
    clone.close()


def test_reopens_after_fork(small_dataset: Path, small_arrays: tuple) -> None:
    """A forked child never touches the parent's HDF5 handle: it opens its own."""
    arrays, _ = small_arrays
    reader = jasper.open_store(small_dataset)
    reader.read_rows("pair_index", torch.tensor([0]))
    parent_handle = reader._handle.get().h5
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            got = reader.read_rows("pair_index", torch.tensor([9, 4]))
            ok = (torch.equal(got, arrays["pair_index"][torch.tensor([9, 4])])
                  and reader._handle.get().h5 is not parent_handle
                  and reader._handle._pid == os.getpid())
            code = 0 if ok else 2
        finally:
            os.write(write_fd, bytes([code]))
            os._exit(0)
    os.close(write_fd)
    status = os.read(read_fd, 1)
    os.waitpid(pid, 0)
    os.close(read_fd)
    assert status == b"\x00", f"child failed with code {status!r}"
    # the parent's handle still works after the child closed its inherited copy
    assert reader._handle.get().h5 is parent_handle
    assert_same(reader.read("pair_index"), arrays["pair_index"], "parent")
    reader.close()


@pytest.mark.parametrize("start_method", START_METHODS)
def test_dataloader_workers_read_rows(small_dataset: Path, small_arrays: tuple,
                                      start_method: str) -> None:
    arrays, _ = small_arrays
    reader = jasper.open_store(small_dataset)
    reader.read_rows("pair_index", torch.tensor([0]))  # the parent holds an open handle
    ds = RowsDataset(reader, arrays["pair_index"].shape[0])
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
        batch_size=64, drop_last=False)
    loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=2,
                        multiprocessing_context=start_method, collate_fn=keep_batch, timeout=120)
    seen = torch.zeros(len(ds), dtype=torch.int64)
    pids = set()
    for batch in loader:
        rows = batch["rows"]
        seen[rows] += 1
        pids.add(batch["pid"])
        assert batch["own_handle"], "a worker read through a handle it did not open"
        for name in RowsDataset.NAMES:
            assert_same(batch[name], arrays[name][rows], name)
    assert torch.all(seen == 1)
    assert os.getpid() not in pids and len(pids) == 2
    reader.close()


@pytest.mark.parametrize("start_method", START_METHODS)
def test_steering_dataset_rows_mode_in_workers(small_dataset: Path, start_method: str) -> None:
    """The full dataset in lazy (rows) mode serves the same batches as a preloaded one."""
    from jasper.loader import create_loader

    lazy = create_loader(small_dataset, "val", batch_size=16, num_workers=2, use_mmap=True,
                         pin_memory=False, multiprocessing_context=start_method)
    eager = create_loader(small_dataset, "val", batch_size=16, num_workers=0, use_mmap=False,
                          pin_memory=False)
    assert lazy.dataset_obj.storage_format == "hdf5"
    assert lazy.dataset_obj.mode != eager.dataset_obj.mode
    n = 0
    for a, b in zip(lazy, eager, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], key)
        n += a["cluster_id"].shape[0]
    assert n == len(eager.dataset_obj)
    lazy.dataset_obj.close()
    eager.dataset_obj.close()
