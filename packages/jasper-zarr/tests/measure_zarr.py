"""The measurements behind the README (run by hand: ``python tests/measure_zarr.py``).

Writes a synthetic dataset with every preset to local disk and once to a SeaweedFS server on
127.0.0.1, then reports size, preload speed against a raw read of the same bytes, the S3 client
layers (obstore vs fsspec/s3fs) on the same objects, and lazy row batches (random vs
block-shuffled vs preloaded). Sizes are small enough for a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import jasper
from jasper.dataset import JASPERSteeringDataset
from jasper.location import Location, committed_generation, generation_prefix
from jasper.synth import SynthConfig, synthesize
from jasper_zarr.s3server import s3_server
from jasper_zarr.shuffle import block_shuffled_indices
from jasper_zarr.stores import S3Objects, s3_client


def _best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _files(path: Path) -> list[Path]:
    return [f for f in sorted(path.rglob("*")) if f.is_file()]


def raw_local(path: Path) -> int:
    n = 0
    buf = bytearray(8 << 20)
    for f in _files(path):
        with open(f, "rb", buffering=0) as fh:
            while k := fh.readinto(buf):
                n += k
    return n


def preload(where) -> int:
    with jasper.open_store(where) as reader:
        total = 0
        for name in reader.array_names():
            info = reader.info(name)
            reader.read_into(name, torch.empty(info.shape, dtype=info.dtype))
            total += info.nbytes
    return total


def raw_obstore(url: str, keys: list[str], concurrency: int = 16) -> int:
    import obstore

    client = s3_client(Location.parse(url))

    async def run() -> int:
        sem = asyncio.Semaphore(concurrency)

        async def one(k: str) -> int:
            async with sem:
                r = await obstore.get_async(client, k)
                return len(await r.bytes_async())

        return sum(await asyncio.gather(*(one(k) for k in keys)))

    return asyncio.run(run())


def raw_s3fs(url: str, keys: list[str]) -> int:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    loc = Location.parse(url)
    paths = [f"{loc.path}/{k}" for k in keys]
    return sum(len(v) for v in fs.cat(paths).values())


def batches_per_s(ds: JASPERSteeringDataset, order: torch.Tensor, batch: int,
                  n_batches: int) -> float:
    t0 = time.perf_counter()
    for b in range(n_batches):
        ds.__getitems__(order[b * batch : (b + 1) * batch].tolist())
    return n_batches * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("JASPER_PROGRESS", "0")
    report: dict = {"pairs": args.pairs, "dim": args.dim}
    tmp = Path(tempfile.mkdtemp(prefix="jasper-zarr-measure-"))
    arrays, manifest = synthesize(SynthConfig(n_pairs=args.pairs, embedding_dim=args.dim,
                                              n_neg=8, seed=0))
    data_bytes = sum(int(t.nbytes) for t in arrays.values())  # tensors or sources
    report["data_bytes"] = data_bytes
    presets = jasper.get_backend("zarr").write_presets
    local = {}
    for preset, opts in presets.items():
        t0 = time.perf_counter()
        path = jasper.write_store(tmp / preset, arrays, manifest, backend="zarr", **opts)
        write_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in _files(path))
        raw_s = _best(lambda p=path: raw_local(p))
        pre_s = _best(lambda p=path: preload(p))
        local[preset] = {"size_bytes": size, "size_ratio": size / data_bytes,
                         "write_s": write_s, "raw_MBps": size / raw_s / 1e6,
                         "preload_MBps": data_bytes / pre_s / 1e6,
                         "preload_vs_raw": raw_s / pre_s}
        print(preset, json.dumps(local[preset]), flush=True)
    report["local"] = local
    with s3_server() as server:
        os.environ.update(server.env)
        report["server"] = server.kind
        url = f"s3://{server.bucket}/measure"
        t0 = time.perf_counter()
        jasper.write_store(url, arrays, manifest, backend="zarr", overwrite=True)
        report["s3_write_s"] = time.perf_counter() - t0
        loc = Location.parse(url)
        objects = S3Objects(loc)
        prefix = generation_prefix(committed_generation(objects, loc))
        keys = [k for k in objects.list(prefix)]
        size = objects.total_size(prefix)
        s3 = {"objects": len(keys), "bytes": size}
        for name, fn in (("raw_obstore", lambda: raw_obstore(url, keys)),
                         ("raw_s3fs", lambda: raw_s3fs(url, keys)),
                         ("preload", lambda: preload(url))):
            s = _best(fn)
            s3[f"{name}_MBps"] = (data_bytes if name == "preload" else size) / s / 1e6
        s3["preload_vs_raw_obstore"] = s3["preload_MBps"] / s3["raw_obstore_MBps"]
        s3["obstore_vs_s3fs"] = s3["raw_obstore_MBps"] / s3["raw_s3fs_MBps"]
        print("s3", json.dumps(s3), flush=True)
        # lazy rows: batches of 256 drawn randomly, block-shuffled (blocks = inner chunks of
        # the embedding arrays), and from the preloaded dataset
        batch, n_batches = 256, 8
        rows = JASPERSteeringDataset(url, "train", use_mmap=True)
        pre = JASPERSteeringDataset(url, "train", use_mmap=False)
        n = len(rows)
        g = torch.Generator().manual_seed(0)
        random_order = torch.randperm(n, generator=g)
        with jasper.open_store(url) as reader:
            block = reader._metadata("question_embs")[2].chunk_rows
        blocked = block_shuffled_indices(torch.arange(n), block, 0, 0)
        lazy = {
            "rows_random_per_s": batches_per_s(rows, random_order, batch, n_batches),
            "rows_block_shuffled_per_s": batches_per_s(rows, blocked, batch, n_batches),
            "preloaded_per_s": batches_per_s(pre, random_order, batch, 50),
            "block_rows": block,
        }
        print("lazy", json.dumps(lazy), flush=True)
        report["s3"] = s3
        report["lazy"] = lazy
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
