"""Locations (paths and URLs) and the generation commit for stores without rename.

The protocol runs here on :class:`DirectoryObjectStore` (no server needed); jasper-zarr's tests
run it against a real S3-compatible server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import jasper
from jasper.errors import CapabilityError, DatasetNotFoundError, FormatError
from jasper.location import (
    GENERATIONS,
    POINTER_NAME,
    WRITER_RECORD,
    DirectoryObjectStore,
    Location,
    as_target,
    clean_stale_generations,
    commit_generation,
    committed_generation,
    generation_prefix,
    is_url,
    read_pointer,
)
from jasper.store import DatasetExistsError

S3 = Location.parse("s3://bucket/some/prefix")


def test_parse_local_paths_and_file_urls(tmp_path: Path) -> None:
    assert Location.parse(tmp_path).local_path == tmp_path
    assert Location.parse(f"file://{tmp_path}").local_path == tmp_path
    assert Location.parse(f"file://localhost{tmp_path}").local_path == tmp_path
    rel = Location.parse("data/qa")
    assert rel.is_local and rel.local_path == Path("data/qa").absolute()
    assert as_target(f"file://{tmp_path}") == tmp_path
    assert not is_url(str(tmp_path)) and not is_url(f"file://{tmp_path}")


def test_parse_object_store_urls() -> None:
    loc = Location.parse("S3://bucket/some/prefix/", {"region": "eu-west-1"})
    assert (loc.scheme, loc.bucket, loc.key, loc.name) == ("s3", "bucket", "some/prefix", "prefix")
    assert str(loc) == "s3://bucket/some/prefix" and not loc.is_local and is_url(loc)
    assert loc.storage_options == {"region": "eu-west-1"}
    assert loc == S3  # storage options are not part of the address
    assert str(loc.join("generations/g1/")) == "s3://bucket/some/prefix/generations/g1"
    assert Location.parse("s3://bucket").key == ""
    assert isinstance(as_target("s3://bucket/x"), Location)


@pytest.mark.parametrize("bad", ["s3://", "s3:///", "s3://bucket/../x", "s3://b//x",
                                 "file://relative/path", "s 3://bucket/x"])
def test_parse_rejects_bad_urls(bad: str) -> None:
    with pytest.raises(FormatError):
        Location.parse(bad)


@given(st.lists(st.text("abcxyz0189-_.", min_size=1, max_size=8)
                .filter(lambda s: s not in (".", "..")), min_size=1, max_size=4))
def test_url_round_trips(parts: list[str]) -> None:
    url = "s3://" + "/".join(parts)
    loc = Location.parse(url)
    assert str(loc) == url and Location.parse(str(loc)) == loc
    assert loc.bucket == parts[0] and loc.key == "/".join(parts[1:])


# --- the generation protocol --------------------------------------------------------------
def _write(store: DirectoryObjectStore, payload: str, *, overwrite: bool = False) -> str:
    with commit_generation(store, S3, overwrite=overwrite) as pending:
        store.put(pending.prefix + "data.bin", payload.encode())
        store.put(pending.prefix + "config.json", b"{}")
        return pending.generation


def _read(store: DirectoryObjectStore) -> str:
    gen = committed_generation(store, S3)
    return store.get(generation_prefix(gen) + "data.bin").decode()


def _generations(root: Path) -> set[str]:
    base = root / GENERATIONS
    return {p.name for p in base.iterdir()} if base.is_dir() else set()


def test_commit_then_overwrite_keeps_previous_until_pointer_lands(tmp_path: Path) -> None:
    store = DirectoryObjectStore(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="nothing was committed"):
        committed_generation(store, S3)
    g1 = _write(store, "one")
    assert _read(store) == "one"
    with pytest.raises(DatasetExistsError):
        _write(store, "two")
    with commit_generation(store, S3, overwrite=True) as pending:
        store.put(pending.prefix + "data.bin", b"two")
        assert _read(store) == "one", "the old dataset must stay readable during the overwrite"
    ptr = read_pointer(store)
    assert ptr is not None and ptr.previous == g1 and _read(store) == "two"
    assert g1 in _generations(tmp_path), "the superseded generation stays for its readers"
    _write(store, "three", overwrite=True)
    assert _read(store) == "three"
    assert g1 not in _generations(tmp_path), "two overwrites later the old generation goes"
    assert len(_generations(tmp_path)) == 2


def test_failed_write_deletes_its_generation_and_keeps_the_dataset(tmp_path: Path) -> None:
    store = DirectoryObjectStore(tmp_path)
    _write(store, "one")
    before = _generations(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), \
            commit_generation(store, S3, overwrite=True) as pending:
        store.put(pending.prefix + "data.bin", b"partial")
        raise RuntimeError("boom")
    assert _read(store) == "one" and _generations(tmp_path) == before


def test_stale_generations_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    store = DirectoryObjectStore(tmp_path)
    _write(store, "one")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    import socket

    def fake(gen: str, pid: int, host: str, started: float) -> None:
        store.put(f"{GENERATIONS}/{gen}/{WRITER_RECORD}", json.dumps(
            {"host": host, "pid": pid, "started": started}).encode())
        store.put(f"{GENERATIONS}/{gen}/data.bin", b"junk")

    now = time.time()
    fake("dead-here", dead_pid, socket.gethostname(), now)
    fake("alive-here", os.getpid(), socket.gethostname(), now)
    fake("young-elsewhere", 1, "another-host", now)
    fake("old-elsewhere", 1, "another-host", now - 3 * 86400)
    removed = clean_stale_generations(store)
    assert sorted(removed) == ["dead-here", "old-elsewhere"]
    assert {"alive-here", "young-elsewhere"} <= _generations(tmp_path)
    assert _read(store) == "one"


_KILL_CHILD = r"""
import sys, time
from jasper.location import DirectoryObjectStore, Location, commit_generation
store = DirectoryObjectStore(sys.argv[1])
loc = Location.parse("s3://bucket/some/prefix")
with commit_generation(store, loc, overwrite=True) as pending:
    for i in range(200):
        store.put(pending.prefix + f"part-{i}", sys.argv[2].encode() * 100)
    store.put(pending.prefix + "data.bin", sys.argv[2].encode())
    store.put(pending.prefix + "config.json", b"{}")
print("done", flush=True)
"""


def test_killed_writers_never_expose_a_partial_generation(tmp_path: Path) -> None:
    """kill -9 writers at staggered points: readers always see a whole committed dataset."""
    store = DirectoryObjectStore(tmp_path)
    _write(store, "v0")
    seen = {"v0"}
    for i in range(1, 8):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path), f"v{i}"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.25 + 0.05 * i)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        value = _read(store)
        gen = committed_generation(store, S3)
        files = {p.name for p in (tmp_path / GENERATIONS / gen).iterdir()}
        assert "config.json" in files and "data.bin" in files, f"partial generation {gen}"
        assert value in seen | {f"v{i}"}
        seen.add(value)
    _write(store, "final", overwrite=True)
    ptr = read_pointer(store)
    assert ptr is not None
    left = _generations(tmp_path) - {ptr.generation, ptr.previous}
    assert not left, f"stale generations of killed writers survived: {left}"
    assert (tmp_path / POINTER_NAME).is_file()


def test_local_backend_refuses_urls() -> None:
    from jasper.testing.data import make_arrays

    arrays, manifest = make_arrays()
    with pytest.raises(CapabilityError, match="cannot use s3:// locations"):
        jasper.write_store("s3://bucket/x", arrays, manifest, backend="pt")
    with pytest.raises(CapabilityError, match="s3://"):
        jasper.open_store("s3://bucket/x", backend="pt")
