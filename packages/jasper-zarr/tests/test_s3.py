"""jasper-zarr against a real S3-compatible server (SeaweedFS on 127.0.0.1).

Writes go through core's generation commit; reads follow the pointer. The only configuration
is the standard AWS environment (set by the ``s3`` fixture), as a user would have it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import obstore
import pytest
import torch

import jasper
from jasper.errors import CapabilityError, ChecksumError, DatasetNotFoundError, FormatError
from jasper.location import POINTER_NAME, Location, committed_generation, generation_prefix
from jasper.manifest import Manifest
from jasper.schema import ARRAYS
from jasper.testing.conformance import assert_bit_equal, child_env
from jasper_zarr.stores import S3Objects, s3_client


def _client(url: str):
    return s3_client(Location.parse(url))


def _keys(url: str) -> list[str]:
    return sorted(str(m["path"]) for batch in obstore.list(_client(url)) for m in batch)


def _generation_keys(url: str) -> tuple[str, list[str]]:
    loc = Location.parse(url)
    gen = committed_generation(S3Objects(loc), loc)
    prefix = generation_prefix(gen)
    return prefix, [k for k in _keys(url) if k.startswith(prefix)]


@pytest.mark.parametrize("preset", ["none", "zstd", "blosc-lz4"])
def test_round_trip_bit_exact_every_preset(s3_url, small, preset) -> None:
    arrays, manifest = small
    opts = jasper.get_backend("zarr").write_presets[preset]
    out = jasper.write_store(s3_url, arrays, manifest, backend="zarr", **opts)
    assert str(out) == s3_url
    with jasper.open_store(s3_url) as reader:
        assert reader.backend_name == "zarr"
        for name, expected in arrays.items():
            assert_bit_equal(reader.read(name), expected, name)
        n = arrays["question_embs"].shape[0]
        rows = torch.tensor([5, 0, n - 1, 5, 17, 18, 19, n // 2])
        assert_bit_equal(reader.read_rows("question_embs", rows),
                         arrays["question_embs"][rows], "read_rows")
        assert_bit_equal(reader.read_slice("pair_index", 10, 40), arrays["pair_index"][10:40],
                         "read_slice")
    assert Manifest.load(s3_url).arrays.keys() == arrays.keys()


def test_objects_layout_pointer_last_and_manifest_in_generation(s3_url, small) -> None:
    arrays, manifest = small
    jasper.write_store(s3_url, arrays, manifest, backend="zarr")
    keys = _keys(s3_url)
    assert POINTER_NAME in keys
    prefix, gen_keys = _generation_keys(s3_url)
    assert prefix + "config.json" in gen_keys and prefix + "zarr.json" in gen_keys
    assert all(k == POINTER_NAME or k.startswith("generations/") for k in keys)
    ptr = json.loads(bytes(obstore.get(_client(s3_url), POINTER_NAME).bytes()))
    assert ptr["format"] == "jasper-pointer" and ptr["previous"] is None


def test_overwrite_needs_flag_and_keeps_previous_generation(s3_url, small) -> None:
    arrays, manifest = small
    jasper.write_store(s3_url, arrays, manifest, backend="zarr")
    first, _ = _generation_keys(s3_url)
    with pytest.raises(FileExistsError):
        jasper.write_store(s3_url, arrays, manifest, backend="zarr")
    changed = dict(arrays)
    changed["question_embs"] = arrays["question_embs"] + 1
    jasper.write_store(s3_url, changed, manifest, backend="zarr", overwrite=True)
    with jasper.open_store(s3_url) as reader:
        assert_bit_equal(reader.read("question_embs"), changed["question_embs"], "new data")
    assert any(k.startswith(first) for k in _keys(s3_url)), "previous generation kept"


def test_convert_local_to_s3_and_back_bit_exact(s3_url, small, tmp_path: Path) -> None:
    arrays, manifest = small
    src = jasper.write_store(tmp_path / "src", arrays, manifest, backend="pt")
    there = jasper.convert(src, s3_url, to="zarr", progress=False)
    back = jasper.convert(s3_url, tmp_path / "back", to="pt", progress=False)
    assert there.dst_bytes > 0 and back.src_bytes == there.dst_bytes
    a, b = Manifest.load(src), Manifest.load(back.dst)
    assert {n: r.checksum for n, r in a.arrays.items()} == \
        {n: r.checksum for n, r in b.arrays.items()}
    assert Manifest.load(s3_url).arrays["question_embs"].checksum == \
        a.arrays["question_embs"].checksum


def test_cli_convert_info_validate_with_urls(s3_url, small, tmp_path: Path) -> None:
    """`jasper convert DIR s3://bucket/prefix --to zarr` with only the AWS environment set."""
    arrays, manifest = small
    src = jasper.write_store(tmp_path / "src", arrays, manifest, backend="pt")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "jasper", *args], capture_output=True,
                              text=True, env=child_env(), timeout=120)

    r = cli("convert", str(src), s3_url, "--to", "zarr", "-o", "compression=zstd")
    assert r.returncode == 0, r.stderr
    r = cli("info", s3_url, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backend"] == "zarr" and info["size_bytes"] > 0
    assert info["path"].startswith(s3_url)
    r = cli("validate", s3_url, "--deep")
    assert r.returncode == 0, r.stderr
    assert "checksums verified" in r.stdout
    r = cli("info", s3_url + "-absent")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "nothing was committed" in r.stderr


def test_local_backends_refuse_urls(s3_url, small) -> None:
    arrays, manifest = small
    with pytest.raises(CapabilityError, match="zarr"):
        jasper.write_store(s3_url, arrays, manifest, backend="pt")


def test_missing_url_is_dataset_not_found(s3_url) -> None:
    with pytest.raises(DatasetNotFoundError):
        jasper.open_store(s3_url)


def test_missing_and_corrupt_shard_on_s3_are_typed_errors(s3_url, small) -> None:
    arrays, manifest = small
    jasper.write_store(s3_url, arrays, manifest, backend="zarr")
    prefix, gen_keys = _generation_keys(s3_url)
    shard = next(k for k in gen_keys if k.startswith(prefix + "question_embs/c/"))
    client = _client(s3_url)
    data = bytearray(bytes(obstore.get(client, shard).bytes()))
    data[100] ^= 0xFF
    obstore.put(client, shard, bytes(data))
    with jasper.open_store(s3_url) as reader, pytest.raises(FormatError, match="question_embs"):
        reader.read("question_embs")
    with pytest.raises((FormatError, ChecksumError)):
        jasper.validate(s3_url, deep=True)
    obstore.delete(client, shard)
    with jasper.open_store(s3_url) as reader, pytest.raises(FormatError, match="missing"):
        reader.read_rows("question_embs", torch.tensor([1, 2]))
    assert jasper.get_backend("zarr").deep_check(Location.parse(s3_url)), \
        "deep_check lists the missing shard"


def test_every_array_present_on_server(s3_url, small) -> None:
    arrays, manifest = small
    jasper.write_store(s3_url, arrays, manifest, backend="zarr")
    with jasper.open_store(s3_url) as reader:
        assert reader.array_names() == [n for n in ARRAYS if n in arrays]
        # regression: the typed row-index error of a reader named by a URL raised TypeError
        n = arrays["question_embs"].shape[0]
        with pytest.raises(IndexError, match=rf"{s3_url}.*{n}.*out of range"):
            reader.read_rows("question_embs", torch.tensor([0, n]))
