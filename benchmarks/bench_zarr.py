"""jasper-zarr on an S3-compatible server (SeaweedFS on 127.0.0.1, started for the session).

Local zarr rows (size per preset, preload vs raw read) come from ``bench_storage.py`` like every
backend's. This module adds what needs the server, measured in the same run:

- preload of the whole dataset from the server vs a raw concurrent GET of the same objects
  (obstore) and the same GETs through fsspec/s3fs (the client-layer comparison);
- lazy rows: samples/s of random batches and of block-shuffled batches vs the preloaded dataset.
"""

from __future__ import annotations

import asyncio
import os

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


def test_s3_preload(benchmark, s3_dataset):
    import jasper

    url, _keys, size, kind = s3_dataset

    def preload():
        with jasper.open_store(url) as reader:
            n = 0
            for name in reader.array_names():
                info = reader.info(name)
                reader.read_into(name, torch.empty(info.shape, dtype=info.dtype))
                n += info.nbytes
            return n

    data = benchmark.pedantic(preload, rounds=CFG.open_rounds)
    tag(benchmark, 1, "s3_preload", POINT, server=kind, file_bytes=size, data_bytes=data)


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
