"""Datasets at ``chroma://HOST:PORT/TENANT/DATABASE/NAME``: wholly on a real Chroma server (the
session's ``chroma run`` on loopback), committed by core's generation protocol."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import jasper
from jasper.cli import main
from jasper.errors import DatasetNotFoundError, FormatError, JasperError
from jasper.location import Location, read_pointer
from jasper.manifest import checksum
from jasper.testing.data import make_arrays
from jasper.testing.datasets import make_cluster
from jasper_chroma.client import ChromaStoreError, get_client
from jasper_chroma.layout import ServerDataset
from jasper_chroma.objects import PART_BYTES, ChromaObjects

_names = itertools.count()


@pytest.fixture
def url(chroma_server: str) -> str:
    """A fresh dataset URL on the session's server (explicit tenant and database)."""
    return f"{chroma_server}/default_tenant/default_database/ds{os.getpid()}x{next(_names)}"


def _objects(url: str) -> ChromaObjects:
    return ChromaObjects(ServerDataset.parse(Location.parse(url)))


def _server_collections(chroma_server: str) -> set[str]:
    client = get_client(ServerDataset.parse(Location.parse(f"{chroma_server}/x")).server)
    return {c.name for c in client.list_collections()}


def _assert_version(reader: Any) -> None:
    for name, rec in reader.manifest.arrays.items():
        assert checksum(reader.read(name)) == rec.checksum, name


def test_url_spelling() -> None:
    full = ServerDataset.parse(Location.parse("chroma://127.0.0.1:8000/t1/db1/qa"))
    assert (full.server.host, full.server.port, full.server.tenant, full.server.database,
            full.name) == ("127.0.0.1", 8000, "t1", "db1", "qa")
    short = ServerDataset.parse(Location.parse("chroma://localhost:9/qa"))
    assert (short.server.tenant, short.server.database) == ("default_tenant", "default_database")
    gen = ServerDataset.parse(Location.parse(
        "chroma://h:1/t/d/qa/generations/20261202T023500Z-12-0123456789ab"))
    assert gen.generation == "20261202T023500Z-12-0123456789ab"
    assert gen.table_collection(gen.generation, "source_embs") == \
        "jasper.qa.20261202T023500Z-12-0123456789ab-source_embs"
    assert gen.parse_table_collection("jasper.qa.20261202T023500Z-12-0123456789ab-source_embs") \
        == (gen.generation, "source_embs")
    # another dataset's collections and collections jasper did not name are not ours
    for other in ("jasper.qa2.20261202T023500Z-12-0123456789ab-source_embs", "jasper.qa.objects",
                  "jasper-0123456789ab-source_embs", "qa"):
        assert gen.parse_table_collection(other) is None
    for bad in ("chroma://h:1/t/qa", "chroma://h/t/d/qa", "chroma://h:1/t/d/q a",
                "chroma://h:1/t/d/a.b"):
        with pytest.raises(FormatError):
            ServerDataset.parse(Location.parse(bad))


def test_round_trip_both_kinds_leaves_nothing_local(url: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    arrays, manifest = make_arrays(48, 8, seed=1)
    assert jasper.write_store(url, arrays, manifest, backend="chroma", progress=False) == \
        Location.parse(url)
    with jasper.open_store(url) as reader:
        assert reader.backend_name == "chroma" and str(reader.path) == url
        _assert_version(reader)
        for name, value in arrays.items():
            assert torch.equal(reader.read(name), value), name
        rows = torch.tensor([5, 0, 5, 23])
        assert torch.equal(reader.read_rows("source_embs", rows), arrays["source_embs"][rows])
    carrays, _meta, cmanifest = make_cluster(40)
    curl = url + "cl"
    jasper.write_store(curl, carrays, cmanifest, backend="chroma", progress=False)
    with jasper.open_store(curl) as reader:
        assert reader.manifest.dataset_kind == cmanifest.dataset_kind
        _assert_version(reader)
        for name, value in carrays.items():
            assert torch.equal(reader.read(name), value), name
    assert jasper.validate(url, deep=True).ok
    assert list(tmp_path.iterdir()) == [], "a server dataset wrote local files"


def test_large_arrays_are_split_into_parts(url: str) -> None:
    store = _objects(url)
    data = os.urandom(2 * PART_BYTES + 123)
    store.put("generations/g/arrays/big.npy", data)
    store.put("generations/g/small", b"x")
    assert store.get("generations/g/arrays/big.npy") == data
    assert set(store.list("generations/")) == {"generations/g/arrays/big.npy",
                                               "generations/g/small"}
    store.put("generations/g/arrays/big.npy", data[::-1])  # a replaced object drops old parts
    assert store.get("generations/g/arrays/big.npy") == data[::-1]
    assert store.collection().count() == 2 + 3
    store.delete(["generations/g/arrays/big.npy", "generations/g/small"])
    assert store.collection() is None, "an emptied object collection is dropped"
    with pytest.raises(FileNotFoundError):
        store.get("generations/g/small")


def test_cli_convert_info_validate_and_loader(url: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    arrays, manifest = make_arrays(64, 8, seed=4)
    src = jasper.write_store(tmp_path / "src", arrays, manifest, backend="pt", progress=False)
    assert main(["convert", str(src), url, "--to", "chroma"]) == 0
    assert main(["info", url]) == 0
    assert url in capsys.readouterr().out
    assert main(["validate", url, "--deep"]) == 0
    back = tmp_path / "back"
    assert main(["convert", url, str(back), "--to", "pt"]) == 0
    with jasper.open_store(back) as r:
        for name, value in arrays.items():
            assert torch.equal(r.read(name), value), name
    loader = jasper.create_loader(url, "train", batch_size=8, num_workers=0, pin_memory=False)
    batch = next(iter(loader))
    q = arrays["pair_index"][batch["pair_idx"], 0] if "pair_idx" in batch else None
    if q is not None:
        assert torch.equal(batch["question_emb"], arrays["question_embs"][q])
    assert len(batch["question_emb"]) == 8


def test_reader_keeps_its_generation_through_an_overwrite(url: str,
                                                          chroma_server: str) -> None:
    a, manifest_a = make_arrays(32, 8, seed=1)
    b, manifest_b = make_arrays(32, 8, seed=2)
    jasper.write_store(url, a, manifest_a, backend="chroma", progress=False)
    with jasper.open_store(url) as old:
        jasper.write_store(url, b, manifest_b, backend="chroma", overwrite=True, progress=False)
        with jasper.open_store(url) as new:
            assert torch.equal(new.read("source_embs"), b["source_embs"])
        # the old generation is kept as the pointer's `previous`: its reader finishes
        assert torch.equal(old.read("source_embs"), a["source_embs"])
        assert torch.equal(old.read("steering_residual"), a["steering_residual"])
    jasper.write_store(url, a, manifest_a, backend="chroma", overwrite=True, progress=False)
    mine = {c for c in _server_collections(chroma_server)
            if ServerDataset.parse(Location.parse(url)).parse_table_collection(c)}
    pointer = read_pointer(_objects(url))
    assert pointer is not None
    gens = {ServerDataset.parse(Location.parse(url)).parse_table_collection(c)[0]  # type: ignore[index]
            for c in mine}
    assert gens == {pointer.generation, pointer.previous}, "superseded collections remain"


def test_server_down_missing_dataset_and_refusals(url: str, chroma_server: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    down = "chroma://127.0.0.1:9/default_tenant/default_database/qa"  # discard port
    arrays, manifest = make_arrays(16, 8, seed=3)
    with pytest.raises(ChromaStoreError, match=r"chroma://127.0.0.1:9/.*cannot connect"):
        jasper.open_store(down)
    with pytest.raises(ChromaStoreError, match="cannot connect"):
        jasper.write_store(down, arrays, manifest, backend="chroma", progress=False)
    assert main(["info", down]) != 0
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(DatasetNotFoundError):
        jasper.open_store(url)
    with pytest.raises(JasperError, match="tenant|database"):
        jasper.open_store(f"{chroma_server}/no_such_tenant/default_database/qa")
    with pytest.raises(FormatError, match="dataset name"):
        jasper.write_store(f"{chroma_server}/t/d/bad.name", arrays, manifest, backend="chroma")


def test_missing_collection_wrong_dimension_and_missing_id(url: str) -> None:
    arrays, manifest = make_arrays(24, 8, seed=6)
    jasper.write_store(url, arrays, manifest, backend="chroma", progress=False)
    with jasper.open_store(url) as reader:
        layout = reader.layout
    client = _objects(url).client()
    q = layout.tables["question_embs"].collection
    client.get_collection(q, embedding_function=None).delete(ids=["7"])
    with jasper.open_store(url) as reader, \
            pytest.raises(ChromaStoreError, match=rf"{url}: collection '{q}' has no id '7'"):
        reader.read("question_embs")
    s = layout.tables["source_embs"].collection
    client.delete_collection(s)
    wrong = client.create_collection(s, embedding_function=None)
    rows = layout.tables["source_embs"].rows
    wrong.add(ids=[str(i) for i in range(rows)], embeddings=torch.zeros(rows, 5).numpy())
    with jasper.open_store(url) as reader, \
            pytest.raises(ChromaStoreError, match=rf"'{s}' holds 5-dimensional embeddings, "
                          "expected 8"):
        reader.read("source_embs")
    wrong.add(ids=[str(rows)], embeddings=torch.zeros(1, 5).numpy())
    with jasper.open_store(url) as reader, \
            pytest.raises(ChromaStoreError, match=rf"'{s}' holds id '{rows}', not a row number "
                          rf"in \[0, {rows}\)"):
        reader.read("source_embs")
    k = layout.tables["keyword_embs"].collection
    client.delete_collection(k)
    with jasper.open_store(url) as reader, \
            pytest.raises(ChromaStoreError, match=rf"{url}: collection '{k}' not found"):
        reader.read("keyword_embs")
    with pytest.raises(JasperError):
        jasper.validate(url, deep=True)


def test_failed_write_leaves_nothing_and_keeps_the_old_version(url: str,
                                                               chroma_server: str) -> None:
    from jasper.testing import _workers

    arrays, manifest = make_arrays(20, 8, seed=3)
    before = _server_collections(chroma_server)
    sources: dict[str, Any] = dict(arrays)
    sources["steering_residual"] = _workers.HalfThenFail(arrays["steering_residual"])
    with pytest.raises(_workers.SourceFailed):
        jasper.write_store(url, sources, manifest, backend="chroma", progress=False)
    assert _server_collections(chroma_server) - before == set()
    assert list(_objects(url).list()) == []
    jasper.write_store(url, arrays, manifest, backend="chroma", progress=False)
    other, manifest2 = make_arrays(20, 8, seed=4)
    sources = dict(other)
    sources["hard_negatives"] = _workers.HalfThenFail(other["hard_negatives"])
    with pytest.raises(_workers.SourceFailed):
        jasper.write_store(url, sources, manifest2, backend="chroma", overwrite=True,
                           progress=False)
    with jasper.open_store(url) as reader:
        for name, value in arrays.items():
            assert torch.equal(reader.read(name), value), name
    pointer = read_pointer(_objects(url))
    assert pointer is not None
    assert {k.split("/")[1] for k in _objects(url).list("generations/")} == {pointer.generation}
    assert json.loads(_objects(url).get("jasper-pointer.json"))["generation"] == \
        pointer.generation


_COMMIT_LOOP = """
import sys, time
import jasper
from jasper.testing.data import make_arrays
url, stop = sys.argv[1], float(sys.argv[2])
versions = [make_arrays(48, 8, seed=s) for s in (1, 2)]
end = time.monotonic() + stop
i = 0
while time.monotonic() < end:
    arrays, manifest = versions[i % 2]
    jasper.write_store(url, arrays, manifest, backend="chroma", overwrite=True, progress=False)
    i += 1
print(i)
"""


def test_reader_during_commits_sees_one_version(url: str) -> None:
    """A writer process commits two versions to one URL again and again while this process
    opens and reads it: every reader serves the arrays of the version its manifest describes,
    or (its generation deleted two commits later) a typed error; never a mix."""
    import subprocess
    import sys
    import time

    from jasper.testing.conformance import child_env

    arrays, manifest = make_arrays(48, 8, seed=1)
    jasper.write_store(url, arrays, manifest, backend="chroma", progress=False)
    writer = subprocess.Popen([sys.executable, "-c", _COMMIT_LOOP, url, "12"],
                              env=child_env(JASPER_PROGRESS="0"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    served = gone = 0
    try:
        end = time.monotonic() + 12
        while time.monotonic() < end and writer.poll() is None:
            try:
                with jasper.open_store(url) as reader:
                    _assert_version(reader)
                served += 1
            except JasperError:
                gone += 1  # the generation it opened was superseded twice meanwhile
    finally:
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-2000:]
    assert int(out) > 2, "the writer did not commit repeatedly"
    assert served > 0, "no reader could read the dataset while it was being replaced"
