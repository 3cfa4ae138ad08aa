"""Processes, locks and damaged stores: spawn works, fork is refused (never a hang), one writer,
a missing id is a typed error naming collection and id."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import jasper
from jasper.errors import FormatError
from jasper.testing import _workers
from jasper.testing.data import make_arrays
from jasper_chroma.client import (
    ChromaStoreError,
    ForkedClientError,
    StoreLockedError,
    WriterLock,
    get_client,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    arrays, manifest = make_arrays(40, 8, seed=2)
    path = jasper.write_store(tmp_path_factory.mktemp("w") / "ds", arrays, manifest,
                              backend="chroma", progress=False)
    return path, arrays


def test_spawned_dataloader_workers_read_correct_rows(dataset: Any) -> None:
    path, arrays = dataset
    with jasper.open_store(path) as reader:
        reader.read("question_embs")  # the parent used Chroma: spawn must still work
        loader = DataLoader(_workers.PickledReaderRows(reader, 40), batch_size=8, num_workers=2,
                            multiprocessing_context="spawn", timeout=120)
        seen = []
        for batch in loader:
            rows = batch["row"]
            seen += rows.tolist()
            q = arrays["pair_index"][rows, 0]
            assert torch.equal(batch["question_emb"], arrays["question_embs"][q])
    assert sorted(seen) == list(range(40))


def _read_in_fork(reader: Any, queue: Any) -> None:
    try:
        reader.read("source_embs")
        queue.put("no error")
    except ForkedClientError as exc:
        queue.put(f"ForkedClientError: {exc}")
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_fork_after_use_is_refused_not_hung(dataset: Any) -> None:
    path, _ = dataset
    with jasper.open_store(path) as reader:
        reader.read("source_embs")
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_read_in_fork, args=(reader, queue))
        proc.start()
        proc.join(timeout=60)
        alive = proc.is_alive()
        if alive:
            proc.kill()
        assert not alive, "a forked reader hung"
        message = queue.get(timeout=5)
    assert message.startswith("ForkedClientError"), message
    assert "spawn" in message and "forked from pid" in message


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from jasper_chroma.client import WriterLock\n"
        f"with WriterLock(Path({str(store)!r})):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"written by pid {holder.pid}"):
            WriterLock(store).__enter__()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the lock dies with its holder
        try:
            with WriterLock(store):
                break
        except StoreLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_missing_id_names_collection_and_id(dataset: Any, tmp_path: Path) -> None:
    import shutil

    path, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    with jasper.open_store(copy) as reader:
        name = reader.layout.tables["source_embs"].collection
    col = get_client(copy / "chroma").get_collection(name, embedding_function=None)
    col.delete(ids=["7"])
    with jasper.open_store(copy) as reader, \
            pytest.raises(ChromaStoreError, match=f"collection '{name}' has no id '7'"):
        reader.read("source_embs")
    with pytest.raises(ChromaStoreError, match="has no id '7'"):
        jasper.validate(copy, deep=True)


def test_missing_collection_and_a_server_layout_in_a_directory(dataset: Any, tmp_path: Path) -> None:
    import json
    import shutil

    path, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    layout = json.loads((copy / "chroma.json").read_text())
    layout["tables"]["keyword_embs"]["collection"] = "jasper-gone-keyword_embs"
    (copy / "chroma.json").write_text(json.dumps(layout))
    # a local reader loads every collection when it opens (pinning the version): refused there
    with pytest.raises(ChromaStoreError, match=f"{copy / 'chroma'}: collection "
                       "'jasper-gone-keyword_embs' not found"):
        jasper.open_store(copy)
    # a local dataset's chroma.json naming a server is refused (servers hold whole datasets)
    layout["where"], layout["server"] = "server", {"host": "127.0.0.1", "port": 9,
                                                   "tenant": "default_tenant",
                                                   "database": "default_database"}
    (copy / "chroma.json").write_text(json.dumps(layout))
    with pytest.raises(FormatError, match="chroma.json.*local"):
        jasper.open_store(copy)


def test_local_reader_keeps_its_version_through_an_overwrite(tmp_path: Path) -> None:
    """A reader opened before a commit replaces (and deletes) the directory serves the version
    it opened, tables and .npy arrays alike, without having read anything before the commit."""
    from jasper.manifest import checksum

    a, manifest_a = make_arrays(32, 8, seed=1)
    b, manifest_b = make_arrays(32, 8, seed=2)
    target = tmp_path / "live"
    jasper.write_store(target, a, manifest_a, backend="chroma", progress=False)
    with jasper.open_store(target) as old:
        jasper.write_store(target, b, manifest_b, backend="chroma", overwrite=True,
                           progress=False)
        for name, value in a.items():
            got = old.read(name)
            assert torch.equal(got, value), f"{name} of the old reader comes from the new version"
            assert checksum(got) == old.manifest.arrays[name].checksum
        # Chroma opens new SQLite connections by name whenever it wants: the commit left the old
        # store's files on disk (held for this reader), not only the descriptors already open
        held = [p for p in tmp_path.iterdir() if ".jasper-held-" in p.name]
        assert len(held) == 1 and (held[0] / "chroma" / "chroma.sqlite3").is_file()
    with jasper.open_store(target) as new:
        assert torch.equal(new.read("source_embs"), b["source_embs"])
    # the first write after the reader closed removes the held version
    jasper.write_store(target, a, manifest_a, backend="chroma", overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["live"]


@pytest.mark.parametrize(("version", "match"), [("x", "not a positive integer"),
                                                (10**6, "newer than this jasper-chroma reads"),
                                                (None, "not a positive integer")])
def test_hostile_layout_versions_are_format_errors(dataset: Any, tmp_path: Path, version: Any,
                                                   match: str) -> None:
    import json
    import shutil

    path, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    layout = json.loads((copy / "chroma.json").read_text())
    layout["layout_version"] = version
    (copy / "chroma.json").write_text(json.dumps(layout))
    with pytest.raises(FormatError, match=match):
        jasper.open_store(copy)


@pytest.mark.parametrize(("field", "value", "match"), [("dtype", "float3r", "has dtype 'float3r'"),
                                                       ("dtype", 7, "has dtype '7'"),
                                                       ("rows", -5, "not a shape")])
def test_damaged_table_records_are_format_errors(dataset: Any, tmp_path: Path, field: str,
                                                 value: Any, match: str) -> None:
    """A table record of chroma.json with an unknown dtype (one flipped bit: float32 ->
    float3r) or a negative size fails opening with a FormatError naming the file and the table,
    not the TypeError of the dtype lookup (found by the reliability corpus)."""
    import json
    import shutil

    path, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    layout = json.loads((copy / "chroma.json").read_text())
    name = sorted(layout["tables"])[0]
    layout["tables"][name][field] = value
    (copy / "chroma.json").write_text(json.dumps(layout))
    with pytest.raises(FormatError, match=match) as err:
        jasper.open_store(copy)
    assert err.value.array == name and "chroma.json" in str(err.value)
