"""Questions 1 and 6: open / preload speed against a raw read of the same files, cold and warm;
size on disk per backend and write preset.

"Cold" drops the dataset's pages from the page cache before every round
(``posix_fadvise(DONTNEED)`` per file) and records, with ``mincore``, how much was still cached;
"warm" reads once untimed first.
"""

from __future__ import annotations

import pytest
import torch
from benchlib.config import load_config
from benchlib.contenders import Unavailable, jasper_dataset, optional_import
from benchlib.data import data_bytes, dataset_cases, dataset_meta, ensure_dataset
from benchlib.measure import drop_pages, raw_read, resident_fraction, total_file_bytes
from benchlib.record import case_id, tag

CFG = load_config()
CASES = dataset_cases(CFG.grid)
IDS = [case_id(p, b) for p, b in CASES]
TEMPS = ["cold", "warm"]


def _setup(path, temp, prepare=None):
    """A pedantic ``setup``: drop or warm the page cache, then allocate the round's buffers."""
    state: dict = {}

    def setup():
        if temp == "cold":
            drop_pages(path)
            state.setdefault("resident_before", resident_fraction(path))
        else:
            buf = bytearray(1 << 20)
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    with open(f, "rb", buffering=0) as fh:
                        while fh.readinto(buf):
                            pass
        return ((prepare(),) if prepare else (), {})

    return setup, state


@pytest.mark.parametrize(("point", "preset"), CASES, ids=IDS)
def test_size_on_disk(benchmark, point, preset):
    path = ensure_dataset(point, preset, CFG.seed)
    size = benchmark.pedantic(total_file_bytes, args=(path,), rounds=1)
    meta = dataset_meta(path)
    tag(benchmark, 6, "size", point, preset, size_bytes=size, data_bytes=data_bytes(path),
        write_s=meta.get("write_s"), written_by=meta.get("how"),
        options=dict(preset.options))


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize(("point", "preset"), CASES, ids=IDS)
def test_raw_read(benchmark, point, preset, temp):
    """The ceiling: every file of the dataset read back to back into one preallocated buffer."""
    import numpy as np

    path = ensure_dataset(point, preset, CFG.seed)
    nbytes = total_file_bytes(path)
    setup, state = _setup(path, temp, lambda: np.empty(nbytes, dtype=np.uint8))
    got = benchmark.pedantic(lambda out: raw_read(path, out), setup=setup,
                             rounds=CFG.open_rounds)
    assert got == nbytes
    tag(benchmark, 1, "raw_read", point, preset, temp=temp, file_bytes=nbytes,
        data_bytes=data_bytes(path), resident_before=state.get("resident_before"))


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize(("point", "preset"), CASES, ids=IDS)
def test_store_preload(benchmark, point, preset, temp):
    """jasper's store API: open, then ``read_into`` every array's preallocated tensor."""
    from jasper.store import open_store

    path = ensure_dataset(point, preset, CFG.seed)
    with open_store(path) as reader:
        infos = {n: reader.info(n) for n in reader.array_names()}

    def buffers():
        return {n: torch.empty(i.shape, dtype=i.dtype) for n, i in infos.items()}

    def preload(out):
        with open_store(path) as reader:
            for n, t in out.items():
                reader.read_into(n, t)
        return out

    setup, state = _setup(path, temp, buffers)
    benchmark.pedantic(preload, setup=setup, rounds=CFG.open_rounds)
    tag(benchmark, 1, "store_preload", point, preset, temp=temp,
        file_bytes=total_file_bytes(path), data_bytes=sum(i.nbytes for i in infos.values()),
        resident_before=state.get("resident_before"))


DATASET_CASES = [(p, b, m) for p, b in CASES for m in ([False, True] if b.mmap else [False])]


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize(("point", "preset", "mapped"), DATASET_CASES,
                         ids=[case_id(p, b, "mmap" if m else "preload")
                              for p, b, m in DATASET_CASES])
def test_dataset_open(benchmark, point, preset, mapped, temp):
    """What a user waits for: ``JASPERSteeringDataset(dir, "train", use_mmap=...)``, integrity
    check included; ``use_mmap=False`` preloads every array, ``True`` only maps."""
    try:
        optional_import("jasper.dataset", "jasper's dataset module has not landed yet")
    except Unavailable as exc:
        pytest.skip(str(exc))
    path = ensure_dataset(point, preset, CFG.seed)
    setup, state = _setup(path, temp)

    def open_close():
        ds = jasper_dataset(path, use_mmap=mapped)
        ds.close()

    benchmark.pedantic(open_close, setup=setup, rounds=CFG.open_rounds)
    tag(benchmark, 1, "dataset_open", point, preset, temp=temp, mapped=mapped,
        file_bytes=total_file_bytes(path), data_bytes=data_bytes(path),
        resident_before=state.get("resident_before"))
