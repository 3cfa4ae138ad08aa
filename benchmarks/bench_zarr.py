"""jasper-zarr's preload targets and its object-store numbers, each ratio measured in one test.

- Local preload of every zarr preset vs a raw read of the same files, the two timed in
  alternating rounds (``zarr_local_preload``: ``ratio`` = raw-read time / preload time; target
  >= 0.5), and one round through zarr's own codec pipeline (``zarr_pipeline_preload``, the path
  arrays of other zarr writers take) for comparison.
- On an S3-compatible server (SeaweedFS on 127.0.0.1, started for the session): preload of the
  whole dataset vs a raw concurrent GET of the same objects, alternating rounds (``s3_preload``
  ``ratio``; target >= 0.5); the raw GETs alone through obstore and fsspec/s3fs (the client
  layer comparison); lazy rows (random and block-shuffled batches vs preloaded); and the
  on-disk chunk cache (``JASPER_ZARR_CACHE_DIR``): the first and the second epoch of the same
  random batches (``s3_cache_epochs``).

Sizes: the local tests read the base grid point; for moderate runs on a small machine, e.g.
``python benchmarks/run.py --pairs 40000 -k zarr_local`` (about 270 MB) and
``python benchmarks/run.py --pairs 15000 -k s3`` (about 100 MB on the server).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from benchlib.config import load_config
from benchlib.data import ensure_dataset
from benchlib.record import tag

CFG = load_config()
POINT = CFG.grid[0]
BATCH = 1024

zarr_pkg = pytest.importorskip("jasper_zarr", reason="jasper-zarr is not installed")


@pytest.fixture(scope="module")
def s3_dataset():
    """The base grid point written with jasper-zarr to a fresh server."""
    import jasper
    from jasper.location import Location, committed_generation, generation_prefix
    from jasper_zarr.s3server import s3_server
    from jasper_zarr.stores import S3Objects

    presets = _presets()
    base = next((b for b in presets if b.backend == "pt"), presets[0])
    local = ensure_dataset(POINT, base, CFG.seed)
    with s3_server() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        url = f"s3://{server.bucket}/bench"
        jasper.convert(local, url, to="zarr", overwrite=True, progress=False)
        loc = Location.parse(url)
        objects = S3Objects(loc)
        prefix = generation_prefix(committed_generation(objects, loc))
        keys = list(objects.list(prefix))
        try:
            yield url, keys, objects.total_size(prefix), server.kind
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _presets():
    from benchlib.data import dataset_cases

    return [b for p, b in dataset_cases(CFG.grid) if p == POINT]


def _raw_obstore(url, keys, concurrency=16):
    import obstore

    from jasper.location import Location
    from jasper_zarr.stores import s3_client

    client = s3_client(Location.parse(url))

    async def run():
        sem = asyncio.Semaphore(concurrency)

        async def one(k):
            async with sem:
                r = await obstore.get_async(client, k)
                return len(await r.bytes_async())

        return sum(await asyncio.gather(*(one(k) for k in keys)))

    return asyncio.run(run())


def _raw_s3fs(url, keys):
    s3fs = pytest.importorskip("s3fs")
    from jasper.location import Location

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    base = Location.parse(url).path
    return sum(len(v) for v in fs.cat([f"{base}/{k}" for k in keys]).values())


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_s3_raw_get(benchmark, s3_dataset, client):
    url, keys, size, kind = s3_dataset
    fn = _raw_obstore if client == "obstore" else _raw_s3fs
    got = benchmark.pedantic(fn, args=(url, keys), rounds=CFG.open_rounds)
    assert got == size
    tag(benchmark, 1, "s3_raw_get", POINT, client=client, server=kind, file_bytes=size,
        objects=len(keys))


def _zarr_presets():
    return [b for b in _presets() if b.backend == "zarr"]


def _buffers(path):
    import jasper

    with jasper.open_store(path) as reader:
        infos = {n: reader.info(n) for n in reader.array_names()}
    return {n: torch.empty(i.shape, dtype=i.dtype) for n, i in infos.items()}


def _preload(path, out, via_zarr=False):
    """Open the dataset and read every array into its preallocated tensor of ``out``."""
    import jasper

    with jasper.open_store(path) as reader:
        for name, t in out.items():
            if via_zarr:
                _via_zarr_pipeline(reader, name, t)
            else:
                reader.read_into(name, t)
    return sum(t.nbytes for t in out.values())


def _via_zarr_pipeline(reader, name, out):
    """The reader's fallback path (zarr's codec pipeline), for the comparison row."""
    from jasper_zarr.reader import _storage_view

    reader.info(name)
    reader._check_chunks(name)
    _, logical, grid = reader._metadata(name)
    reader._preload_via_zarr(name, reader._array(name), grid, _storage_view(out, logical),
                             lambda n: None)


def _alternating(benchmark, timed, raw, prepare, rounds):
    """Time ``timed`` (the benchmark's rounds) and ``raw`` (in the setup of each round), so
    the two alternate under the same machine load; returns the best time of each.
    ``prepare(which)`` allocates the round's fresh buffers (first-touch page faults count for
    both)."""
    raw_times: list[float] = []
    timed_times: list[float] = []

    def setup():
        raw_out = prepare("raw")
        t0 = time.perf_counter()
        raw(raw_out)
        raw_times.append(time.perf_counter() - t0)
        return (prepare("timed"),), {}

    def run(out):
        t0 = time.perf_counter()
        got = timed(out)
        timed_times.append(time.perf_counter() - t0)
        return got

    benchmark.pedantic(run, setup=setup, rounds=rounds)
    return min(raw_times), min(timed_times)


def _timed(fn):
    """``fn`` wrapped to record its durations (the list is the second value)."""
    times: list[float] = []

    def run(*args):
        t0 = time.perf_counter()
        got = fn(*args)
        times.append(time.perf_counter() - t0)
        return got

    return run, times


@pytest.mark.parametrize("preset", [b.preset for b in _zarr_presets()])
def test_zarr_local_preload(benchmark, preset):
    """Target: preload >= 0.5x a raw read of the same files (same run, alternating rounds)."""
    import numpy as np
    from benchlib.measure import raw_read, total_file_bytes

    case = next(b for b in _zarr_presets() if b.preset == preset)
    path = ensure_dataset(POINT, case, CFG.seed)
    nbytes = total_file_bytes(path)
    raw_read(path, np.empty(nbytes, dtype=np.uint8))  # warm: both read from the page cache

    def prepare(which):
        return np.empty(nbytes, dtype=np.uint8) if which == "raw" else _buffers(path)

    raw_s, best = _alternating(benchmark, lambda out: _preload(path, out),
                               lambda out: raw_read(path, out), prepare,
                               max(3, CFG.open_rounds))
    data = sum(t.nbytes for t in _buffers(path).values())
    tag(benchmark, 1, "zarr_local_preload", POINT, case, temp="warm", file_bytes=nbytes,
        data_bytes=data, raw_s=raw_s, raw_mb_s=nbytes / raw_s / 1e6,
        preload_mb_s=data / best / 1e6, ratio=raw_s / best, target_ratio=0.5)


@pytest.mark.parametrize("preset", [b.preset for b in _zarr_presets()])
def test_zarr_pipeline_preload(benchmark, preset):
    """The same preload through zarr's codec pipeline (what arrays of other writers take)."""
    from benchlib.measure import total_file_bytes

    case = next(b for b in _zarr_presets() if b.preset == preset)
    path = ensure_dataset(POINT, case, CFG.seed)
    benchmark.pedantic(lambda out: _preload(path, out, via_zarr=True),
                       setup=lambda: ((_buffers(path),), {}), rounds=1)
    tag(benchmark, 1, "zarr_pipeline_preload", POINT, case, temp="warm",
        file_bytes=total_file_bytes(path),
        data_bytes=sum(t.nbytes for t in _buffers(path).values()))


def test_s3_preload(benchmark, s3_dataset):
    """Target: preload >= 0.5x a raw concurrent GET of the same objects (same server, same
    run, alternating rounds)."""
    url, keys, size, kind = s3_dataset

    def prepare(which):
        return None if which == "raw" else _buffers(url)

    raw_s, best = _alternating(benchmark, lambda out: _preload(url, out),
                               lambda _: _raw_obstore(url, keys), prepare,
                               max(3, CFG.open_rounds))
    data = sum(t.nbytes for t in _buffers(url).values())
    tag(benchmark, 1, "s3_preload", POINT, server=kind, file_bytes=size, data_bytes=data,
        raw_s=raw_s, raw_mb_s=size / raw_s / 1e6, preload_mb_s=data / best / 1e6,
        ratio=raw_s / best, target_ratio=0.5)


@pytest.mark.parametrize("order", ["random", "block_shuffled", "preloaded"])
def test_s3_lazy_rows(benchmark, s3_dataset, order):
    from jasper.dataset import JASPERSteeringDataset
    from jasper_zarr.shuffle import block_shuffled_order

    url, _, _, kind = s3_dataset
    ds = JASPERSteeringDataset(url, "train", use_mmap=order != "preloaded")
    n = len(ds)
    if order == "block_shuffled":
        perm = block_shuffled_order(n, 256, CFG.seed, 0)
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(CFG.seed))
    n_batches = max(1, min(n // BATCH, 4 if order != "preloaded" else 40))

    def serve():
        for b in range(n_batches):
            ds.__getitems__(perm[b * BATCH : (b + 1) * BATCH].tolist())
        return n_batches * BATCH

    samples = benchmark.pedantic(serve, rounds=CFG.rounds)
    tag(benchmark, 2, "s3_lazy_rows", POINT, order=order, server=kind, samples=samples,
        batch_size=BATCH)
    ds.close()


def test_s3_cache_epochs(benchmark, s3_dataset, tmp_path):
    """Lazy random rows over S3 with the on-disk chunk cache: epoch 1 fills the cache (timed
    once), epoch 2 serves the same batches from it (the benchmark's rounds)."""
    from jasper.dataset import JASPERSteeringDataset

    url, _, _, kind = s3_dataset
    saved = os.environ.get("JASPER_ZARR_CACHE_DIR")
    os.environ["JASPER_ZARR_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        ds = JASPERSteeringDataset(url, "train", use_mmap=True)
        n = len(ds)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(CFG.seed))
        n_batches = max(1, min(n // BATCH, 4))

        def epoch():
            for b in range(n_batches):
                ds.__getitems__(perm[b * BATCH : (b + 1) * BATCH].tolist())
            return n_batches * BATCH

        t0 = time.perf_counter()
        epoch()
        first_s = time.perf_counter() - t0
        timed_epoch, times = _timed(epoch)
        benchmark.pedantic(timed_epoch, rounds=CFG.rounds)
        cached = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
        ds.close()
    finally:
        if saved is None:
            os.environ.pop("JASPER_ZARR_CACHE_DIR", None)
        else:
            os.environ["JASPER_ZARR_CACHE_DIR"] = saved
    samples = n_batches * BATCH
    best = min(times)
    tag(benchmark, 2, "s3_cache_epochs", POINT, server=kind, samples=samples, batch_size=BATCH,
        first_epoch_samples_s=samples / first_s, second_epoch_samples_s=samples / best,
        speedup=first_s / best, cache_bytes=cached)
