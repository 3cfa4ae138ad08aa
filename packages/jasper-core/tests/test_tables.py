"""Table sets: one interface (gather, steering, reload, pickle, close) for every storage mode."""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from jasper.backend import Capabilities
from jasper.errors import IntegrityError, ShapeError
from jasper.manifest import Manifest
from jasper.registry import get_backend, register_backend, unregister_backend
from jasper.schema import ARRAYS, Cols
from jasper.tables import (
    LAZY_ARRAYS,
    STEERING,
    TABLE_SETS,
    StoreLocation,
    TableSet,
    open_tables,
)
from jasper.validation import check_replacement
from jasper_pt.backend import PTBackend


class RowsOnlyPT(PTBackend):
    name: ClassVar[str] = "test-tables-rows-pt"
    capabilities: ClassVar[Capabilities] = Capabilities(mmap=False, row_access=True)
    marker_files: ClassVar[tuple[str, ...]] = ()


@pytest.fixture(scope="module", autouse=True)
def _rows_backend() -> Iterator[None]:
    register_backend(RowsOnlyPT.name, RowsOnlyPT, force=True)
    yield
    unregister_backend(RowsOnlyPT.name)


BACKEND_OF_MODE = {"preload": "pt", "mmap": "pt", "rows": RowsOnlyPT.name}


def _open(path: Path, mode: str, *, check: bool = True) -> TableSet:
    backend = BACKEND_OF_MODE[mode]
    manifest = Manifest.load(path)
    location = StoreLocation(path, backend, manifest)
    with get_backend(backend).open(path, manifest) as r:
        infos = {n: r.info(n) for n in ARRAYS}
    return open_tables(mode, location, infos, torch.device("cpu"), check=check)


def test_the_schema_names_the_lazy_and_steering_arrays() -> None:
    assert STEERING == ("steering_centroid", "steering_keyword_weighted", "steering_residual")
    assert set(LAZY_ARRAYS) == {n for n, s in ARRAYS.items() if s.cols is Cols.EMBEDDING_DIM} - {
        "centroid_embs"}
    assert set(TABLE_SETS) == {"preload", "mmap", "rows"}


@pytest.mark.parametrize("mode", ["preload", "mmap", "rows"])
def test_every_mode_gathers_the_same_rows(small_dataset: Path, mode: str) -> None:
    ref = _open(small_dataset, "preload")
    t = _open(small_dataset, mode)
    try:
        assert t.mode == mode and t.in_memory == (mode != "rows") and t.resident == (
            mode == "preload")
        rows = torch.tensor([5, 0, 17, 5, 3], dtype=torch.int64)
        for name in ("question_embs", "source_embs", "hard_negatives", "pair_relevance"):
            assert torch.equal(t.gather(name, rows), ref.gather(name, rows)), name
            out = torch.empty_like(ref.gather(name, rows))
            assert t.gather(name, rows, out) is out and torch.equal(out, ref.gather(name, rows))
        variant = torch.tensor([0, 1, 2, 3, 1], dtype=torch.int64)
        got = t.gather_steering(rows, variant)
        assert not got[0].any()
        for i, v in enumerate(variant.tolist()[1:], start=1):
            want = ref.arrays[STEERING[v - 1]][rows[i]]
            assert torch.equal(got[i], want)
        assert torch.equal(torch.stack(t.pair_columns(rows), 1), ref.arrays["pair_index"][rows])
    finally:
        t.close()
        ref.close()
    assert t.arrays == {}
    t.close()  # idempotent


@pytest.mark.parametrize("mode", ["preload", "mmap", "rows"])
def test_pickled_table_sets_serve_the_same_rows(small_dataset: Path, mode: str) -> None:
    t = _open(small_dataset, mode)
    blob = pickle.dumps(t)
    if mode != "preload":  # a location, not the data
        assert len(blob) < 16 * 1024
    clone = pickle.loads(blob)
    assert clone.ensure_attached() == (mode != "preload")
    assert not clone.ensure_attached()
    rows = torch.arange(0, 40, 3)
    for name in ("source_embs", "steering_residual", "negative_tiers"):
        assert torch.equal(clone.gather(name, rows), t.gather(name, rows))
    t.close()
    clone.close()


def test_memory_bytes_counts_what_is_held(small_dataset: Path) -> None:
    pre, mapped, rows = (_open(small_dataset, m) for m in ("preload", "mmap", "rows"))
    try:
        assert mapped.memory_bytes() == 0
        lazy = sum(pre.arrays[n].numel() * pre.arrays[n].element_size() for n in LAZY_ARRAYS)
        assert 0 < rows.memory_bytes() < pre.memory_bytes() - lazy + 4096
    finally:
        for t in (pre, mapped, rows):
            t.close()


def test_rows_mode_checks_every_finite_array(small_dataset: Path,
                                             copy_dataset: Callable[[Path], Path]) -> None:
    """Regression: rows mode skipped the NaN check of the arrays it reads whole (centroids)."""
    path = copy_dataset(small_dataset)
    c = torch.load(path / "centroid_embs.pt")
    c[2, 1] = float("inf")
    torch.save(c, path / "centroid_embs.pt")
    for mode in ("preload", "mmap", "rows"):
        with pytest.raises(IntegrityError, match=r"centroid_embs\[2, 1\] = inf"):
            _open(path, mode)


def test_replace_checks_before_it_replaces(small_dataset: Path,
                                           copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(small_dataset)
    t = _open(path, "preload")
    old = t.arrays["hard_negatives"].clone()

    def validate(new: object) -> None:
        check_replacement(new, t.arrays, t.location.manifest, path=path)  # type: ignore[arg-type]

    neg = torch.load(path / "hard_negatives.pt")
    n_s = t.arrays["source_embs"].shape[0]
    neg[9, 0] = n_s
    torch.save(neg, path / "hard_negatives.pt")
    with pytest.raises(IntegrityError, match=rf"hard_negatives\[9, 0\] = {n_s} but source_embs"):
        t.replace(("hard_negatives", "negative_tiers"), validate=validate)
    torch.save(neg[:-1].contiguous(), path / "hard_negatives.pt")
    with pytest.raises(ShapeError, match="pair rows|rows but pair_index"):
        t.replace(("hard_negatives",), validate=validate)
    assert torch.equal(t.arrays["hard_negatives"], old)
    neg = old.flip(1).contiguous()
    torch.save(neg, path / "hard_negatives.pt")
    shared = t.arrays["hard_negatives"]
    assert t.replace(("hard_negatives",), validate=validate)  # same shape: in place
    assert t.arrays["hard_negatives"] is shared and torch.equal(shared, neg)
    t.close()


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of the file), by ``mincore`` on a fresh map."""
    import ctypes

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    m = np.memmap(path, dtype=np.uint8, mode="r")
    vec = np.zeros(pages, dtype=np.uint8)
    assert libc.mincore(m.ctypes.data, size, vec.ctypes.data) == 0
    del m
    return int((vec & 1).sum()), pages


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise and mincore")
def test_read_ahead_brings_a_cold_mapped_array_into_the_page_cache(tmp_path: Path) -> None:
    """Regression (cold mmap open of memmap-sqlite 3.0-3.3 s vs 0.41 s for pt): maps advised
    MADV_RANDOM fault a sequential scan in one 4 KiB page at a time. ``read_ahead_chunks`` asks
    the kernel for each next chunk before it is scanned; here the pages become resident without
    being touched, and the chunks cover the array in order."""
    import time

    import numpy as np

    from jasper.tables import read_ahead_chunks, will_need

    path = tmp_path / "a.bin"
    data = np.arange(4096 * 64, dtype=np.float32).reshape(-1, 64)  # 1 MiB
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    cached, total = _resident_pages(path)
    if cached == total:
        pytest.skip("the page cache kept the file (cannot make it cold here)")
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=data.shape)
    mm._mmap.madvise(mmap.MADV_RANDOM)  # as the backends map
    t = torch.from_numpy(mm)
    will_need(t)
    deadline = time.monotonic() + 30
    while _resident_pages(path)[0] < total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _resident_pages(path)[0] == total
    chunks = list(read_ahead_chunks(t, chunk_bytes=64 * 4 * 100))
    assert [c.shape[0] for c in chunks[:-1]] == [100] * (len(chunks) - 1)
    assert torch.equal(torch.cat(chunks), torch.from_numpy(data))
