"""Writers killed with SIGKILL at random points of a write, against the real server and a local
directory: the committed version stays readable, and the next writer removes the dead writer's
leftovers (collections, objects, temporary directories), never the live generation's and never
anything jasper did not create."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import jasper
from jasper.location import Location, read_pointer
from jasper.testing.conformance import child_env, leftovers
from jasper.testing.data import make_arrays
from jasper_chroma.client import get_client
from jasper_chroma.layout import ServerDataset
from jasper_chroma.objects import ChromaObjects

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

#: big enough that a write takes a while (collections, then the .npy arrays, then the commit)
N_PAIRS, DIM = 3000, 16
KILLS = 4

_WRITER = """
import sys
import jasper
from jasper.testing.data import make_arrays
arrays, manifest = make_arrays({n}, {d}, seed=int(sys.argv[2]))
print("start", flush=True)
jasper.write_store(sys.argv[1], arrays, manifest, backend="chroma", overwrite=True,
                   progress=False)
print("done", flush=True)
"""


def _start(target: str, seed: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(n=N_PAIRS, d=DIM), target,
                             str(seed)], env=child_env(JASPER_PROGRESS="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "start":
        proc.kill()
        raise AssertionError(f"the writer failed to start: {proc.communicate()[1][-2000:]}")
    return proc


def _timed_write(target: str, seed: int) -> float:
    proc = _start(target, seed)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "done" in out, err[-2000:]
    return time.monotonic() - t0


def _kill_at_random_points(target: str, seconds: float, rng: random.Random,
                           probe: Callable[[], bool] = lambda: True) -> list[float]:
    """Start writers and SIGKILL each at a random point of its write; returns the points
    (fractions of a full write) at which writers died before finishing and left something
    ``probe`` sees."""
    killed = []
    for i in range(KILLS):
        frac = rng.uniform(0.05, 0.9)
        proc = _start(target, seed=100 + i)
        time.sleep(frac * seconds)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()  # reaped: a zombie still looks alive to the cleaner
        if "done" not in out and probe():
            killed.append(round(frac, 2))
    return killed


def _kill_once_it_left(target: str, left: Callable[[], bool], seed: int = 200) -> None:
    """Start a writer and SIGKILL it as soon as ``left()`` sees something of it: the random
    kills alone cannot promise that the last one died after creating anything (one killed early
    has only removed the leftovers of the one before it), and the cleaning is what is tested."""
    proc = _start(target, seed)
    deadline = time.monotonic() + 600
    while not left():
        assert proc.poll() is None, "the writer ended before it created anything"
        assert time.monotonic() < deadline, "the writer created nothing in 600 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert "done" not in out, "the writer finished before it was killed"


def _expected(seed: int) -> dict[str, torch.Tensor]:
    return make_arrays(N_PAIRS, DIM, seed=seed)[0]


def _assert_serves(target: str | Path, arrays: dict[str, torch.Tensor]) -> None:
    with jasper.open_store(target) as reader:
        for name in ("source_embs", "question_embs", "pair_index", "steering_residual"):
            assert torch.equal(reader.read(name), arrays[name]), name


def test_killed_server_writers_are_cleaned_by_the_next(chroma_server: str) -> None:
    url = f"{chroma_server}/default_tenant/default_database/killed{os.getpid()}"
    dataset = ServerDataset.parse(Location.parse(url))
    client = get_client(dataset.server)
    # collections jasper did not create, some named much like its own, must survive
    foreign = ["notes-keep", f"jasper-{dataset.name}-source_embs", f"{dataset.name}.objects",
               f"jasper.{dataset.name}x.20261202T023500Z-1-0123456789ab-source_embs"]
    for name in foreign:
        client.get_or_create_collection(name, embedding_function=None).upsert(
            ids=["k"], embeddings=[[1.0, 2.0]])
    seconds = _timed_write(url, seed=1)
    store = ChromaObjects(dataset)
    committed = read_pointer(store)
    assert committed is not None
    killed = _kill_at_random_points(url, seconds, random.Random(12))
    assert len(killed) >= 2, f"too few writers died mid-write ({killed}); raise N_PAIRS"
    pointer = read_pointer(store)
    assert pointer is not None

    def dead() -> set[str]:
        return {g for g, _ in store.table_collections()} - {pointer.generation, pointer.previous}

    _kill_once_it_left(url, lambda: bool(dead()))
    assert read_pointer(store) == pointer, "a writer killed mid-write moved the pointer"
    if pointer.generation == committed.generation:
        _assert_serves(url, _expected(1))  # the killed writers committed nothing
    assert jasper.validate(url, deep=True).ok
    assert dead(), f"expected leftovers of the writers killed at {killed} and of the last one"

    arrays, manifest = make_arrays(N_PAIRS, DIM, seed=7)
    jasper.write_store(url, arrays, manifest, backend="chroma", overwrite=True, progress=False)
    _assert_serves(url, arrays)
    now = read_pointer(store)
    assert now is not None
    live = {now.generation, now.previous}
    assert {g for g, _ in store.table_collections()} <= live, "a dead writer's collections remain"
    assert {k.split("/")[1] for k in store.list("generations/")} <= live, \
        "a dead writer's objects remain"
    names = {c.name for c in client.list_collections()}
    assert set(foreign) <= names, "a collection jasper did not create was deleted"
    if now.previous:  # the generation kept for readers of the previous version is whole
        with jasper.open_store(url) as reader:
            assert reader.manifest.arrays  # the live one opens
    for name in foreign:
        client.delete_collection(name)


def test_killed_local_writers_are_cleaned_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "killed"
    seconds = _timed_write(str(target), seed=1)
    killed = _kill_at_random_points(str(target), seconds, random.Random(34),
                                    probe=lambda: bool(leftovers(target)))
    # whatever the kills hit, the path holds one whole version (the first, or one that finished)
    report = jasper.validate(target, deep=True)
    assert report.ok, f"writers killed at {killed} broke the dataset"
    # each writer removes the temporary directories of the dead ones before it (core's
    # clean_leftovers): the last writer is killed once it has made one, whatever the random
    # kills left (on a loaded machine they may all land before a writer creates anything)
    _kill_once_it_left(str(target), lambda: bool(leftovers(target)))
    assert leftovers(target), "the last killed writer left no temporary directory"
    assert jasper.validate(target, deep=True).ok
    arrays, manifest = make_arrays(N_PAIRS, DIM, seed=7)
    jasper.write_store(target, arrays, manifest, backend="chroma", overwrite=True,
                       progress=False)
    assert leftovers(target) == [], f"the next write left {leftovers(target)}"
    _assert_serves(target, arrays)
