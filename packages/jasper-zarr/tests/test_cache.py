"""The bounded on-disk chunk cache of lazy rows over S3 (jasper_zarr.cache), against the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import obstore
import pytest
import torch

import jasper
from jasper.location import Location, committed_generation, generation_prefix
from jasper.manifest import checksum
from jasper.testing.conformance import assert_bit_equal, child_env
from jasper.testing.data import make_arrays
from jasper_zarr.cache import ENV_BYTES, ENV_DIR, SCAN_FRACTION, ChunkCache, parse_bytes
from jasper_zarr.stores import S3Objects, s3_client


def test_parse_bytes() -> None:
    assert parse_bytes("512M") == 512 << 20 and parse_bytes("3") == 3
    assert parse_bytes("2GiB") == 2 << 30
    with pytest.raises(ValueError, match=ENV_BYTES):
        parse_bytes("lots")


def test_eviction_keeps_the_directory_under_its_bound(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c", max_bytes=10_000)
    for i in range(200):
        cache.put(f"k{i}", bytes([i % 256]) * 500)
        assert cache.size() <= 10_000 * (1 + SCAN_FRACTION) + 500
    assert cache.get("k199") == bytes([199]) * 500  # the newest survive
    assert cache.get("k0") is None  # the oldest were evicted
    assert not list((tmp_path / "c").rglob(".tmp-*"))


def _dataset(s3_url: str) -> dict[str, torch.Tensor]:
    arrays, manifest = make_arrays(n_pairs=400, embedding_dim=32)
    jasper.write_store(s3_url, arrays, manifest, backend="zarr", shard_bytes=16 << 10,
                       chunk_rows=16)
    return arrays


def test_lazy_rows_are_served_from_the_cache(s3_url, tmp_path: Path, monkeypatch) -> None:
    """After one read of some rows, the same rows come from the cache: they are still served,
    bit-exact, once the chunk objects are gone from the server."""
    arrays = _dataset(s3_url)
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "cache"))
    n = arrays["source_embs"].shape[0]
    rows = torch.tensor([3, n // 2, 5, n - 1, 17, 3, n // 3])
    with jasper.open_store(s3_url) as reader:
        assert_bit_equal(reader.read_rows("source_embs", rows), arrays["source_embs"][rows],
                         "first read")
        cache = ChunkCache(tmp_path / "cache")
        assert cache.size() > 0
        loc = Location.parse(s3_url)
        prefix = generation_prefix(committed_generation(S3Objects(loc), loc))
        client = s3_client(loc)
        chunks = [str(m["path"]) for batch in obstore.list(client, f"{prefix}source_embs/c/")
                  for m in batch]
        assert chunks
        obstore.delete(client, chunks)
        assert_bit_equal(reader.read_rows("source_embs", rows), arrays["source_embs"][rows],
                         "second read, objects deleted")
        with pytest.raises(jasper.errors.FormatError):
            reader.read_rows("source_embs", torch.tensor([n // 4]))  # never cached: not found


_READER = """
import sys, torch, jasper
from jasper.manifest import checksum
url, seed = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(seed)
with jasper.open_store(url) as reader:
    n = reader.info("source_embs").shape[0]
    for _ in range(3):  # epochs: the same rows again
        g.manual_seed(seed)
        for _ in range(8):
            rows = torch.randint(0, n, (40,), generator=g)
            print(checksum(reader.read_rows("source_embs", rows)), flush=True)
"""


def test_two_processes_share_one_bounded_cache(s3_url, tmp_path: Path) -> None:
    """Two processes read rows through one small cache directory at the same time: every
    batch is bit-exact, the directory stays within its bound (plus what each process may
    write between two eviction scans) and no temporary file is left."""
    arrays = _dataset(s3_url)
    bound = 96 << 10
    env = child_env(**{ENV_DIR: str(tmp_path / "cache"), ENV_BYTES: str(bound)})
    procs = [subprocess.Popen([sys.executable, "-c", _READER, s3_url, str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    for seed, (out, _) in zip((1, 2), outs, strict=True):
        g = torch.Generator()
        want = []
        for _ in range(3):
            g.manual_seed(seed)
            for _ in range(8):
                rows = torch.randint(0, arrays["source_embs"].shape[0], (40,), generator=g)
                want.append(checksum(arrays["source_embs"][rows]))
        assert out.split() == want
    cache = ChunkCache(tmp_path / "cache", bound)
    assert 0 < cache.size() <= bound * (1 + 2 * SCAN_FRACTION) + (32 << 10)
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
