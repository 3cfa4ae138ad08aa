"""Processes against the S3 server: fork and spawn DataLoader workers, two torch.distributed
ranks, and writers killed with SIGKILL in the middle of a write."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import jasper
from jasper.dataset import JASPERSteeringDataset
from jasper.location import GENERATIONS, POINTER_NAME, Location, read_pointer
from jasper.testing.conformance import assert_bit_equal, child_env
from jasper.testing.data import make_arrays
from jasper_zarr.stores import S3Objects

N_PAIRS = 203
WORLD = 2
BATCH = 8
EPOCHS = (0, 1, 5)


@pytest.fixture(scope="module")
def s3_dataset(s3, tmp_path_factory) -> tuple[str, Path]:
    """One dataset on the server and the same data in a local pt directory (the reference)."""
    arrays, manifest = make_arrays(n_pairs=N_PAIRS, embedding_dim=8, n_neg=3, seed=21)
    arrays["pair_relevance"] = torch.arange(N_PAIRS, dtype=torch.float32) / N_PAIRS
    url = f"s3://{s3.bucket}/procs-{time.time_ns()}"
    # small inner chunks: lazy row reads hit many chunks of one shard
    jasper.write_store(url, arrays, manifest, backend="zarr", chunk_rows=16)
    local = jasper.write_store(tmp_path_factory.mktemp("ref") / "ds", arrays, manifest,
                               backend="pt")
    return url, local


@pytest.mark.parametrize(("context", "use_mmap"), [
    ("fork", False), ("fork", True), ("spawn", True)],
    ids=["fork-preload", "fork-rows", "spawn-rows"])
def test_process_workers_read_from_the_server(s3_dataset, context: str, use_mmap) -> None:
    """Preloaded data serves forked workers as it is; rows read from the server would hang a
    forked child (obstore's tokio runtime does not survive fork), so those workers are spawned
    instead, with a warning when fork was asked for; spawned workers get the reader by pickle.
    All serve the reference batches."""
    import contextlib

    url, local = s3_dataset
    from jasper.loader import create_loader

    ref = create_loader(local, "train", batch_size=BATCH, shuffle=False)
    respawned = context == "fork" and use_mmap
    with (pytest.warns(RuntimeWarning, match="started with spawn") if respawned
          else contextlib.nullcontext()):
        loader = create_loader(url, "train", batch_size=BATCH, shuffle=False, num_workers=2,
                               worker_type="process", multiprocessing_context=context,
                               use_mmap=use_mmap)
    if respawned:
        assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert loader.dataset.storage_format == "zarr"
    loader.dataset.__getitems__([0, 1])  # the parent uses its client before workers start
    got, want = list(loader), list(ref)
    assert len(got) == len(want)
    for key in ("question_emb", "target_source_emb", "negative_embs", "steering"):
        assert_bit_equal(torch.cat([b[key] for b in got]), torch.cat([b[key] for b in want]),
                         key)


def _rank_main(rank: int, port: int, url: str, env: dict[str, str], out: str) -> None:
    import os

    os.environ.update(env)
    from jasper.loader import create_loader, set_epoch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results: dict[str, torch.Tensor] = {}
        for mode, use_mmap in (("preload", False), ("rows", True)):
            loader = create_loader(url, "train", batch_size=BATCH, distributed=True,
                                   shuffle=True, drop_last=False, use_mmap=use_mmap)
            assert loader.dataset.mode == mode
            for epoch in EPOCHS:
                set_epoch(loader, epoch)
                pairs, steering = [], []
                for batch in loader:
                    pairs.append(torch.round(batch["relevance"].double() * N_PAIRS).long())
                    steering.append(batch["steering"].clone())
                results[f"{mode}/{epoch}/pair"] = torch.cat(pairs)
                results[f"{mode}/{epoch}/steering"] = torch.cat(steering)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.distributed
def test_two_gloo_ranks_serve_their_shard_once_per_epoch(s3, s3_dataset, tmp_path) -> None:
    """Two spawned gloo ranks read the dataset from the server, preloaded and by lazy rows:
    per epoch each serves its shard once, with the single-process steering draw."""
    url, local = s3_dataset
    mp.spawn(_rank_main, args=(_free_port(), url, s3.env, str(tmp_path)),
             nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    with JASPERSteeringDataset(local, "train") as ref:
        members = ref.split_indices
        n = len(ref)
        row_of = {int(p): i for i, p in enumerate(members.tolist())}
        per_rank = math.ceil(n / WORLD)
        for mode, epoch in ((m, e) for m in ("preload", "rows") for e in EPOCHS):
            pairs = [r[f"{mode}/{epoch}/pair"] for r in results]
            assert [len(p) for p in pairs] == [per_rank] * WORLD
            counts = torch.bincount(torch.cat(pairs), minlength=N_PAIRS)
            assert int(counts[members].min()) == 1
            assert int(counts.sum()) == per_rank * WORLD
            ref.set_epoch(epoch)
            whole = ref.__getitems__(list(range(n)))
            for r in results:
                rows = torch.tensor([row_of[int(p)] for p in r[f"{mode}/{epoch}/pair"]])
                assert torch.equal(r[f"{mode}/{epoch}/steering"], whole["steering"][rows]), \
                    f"{mode}: steering differs from the single-process draw"


_ZYGOTE = r"""
import os, sys, time
import jasper
from jasper.testing.data import make_arrays

url = sys.argv[1]
data = {seed: make_arrays(n_pairs=400, embedding_dim=32, seed=seed) for seed in (100, 101)}
print("ready", flush=True)
for line in sys.stdin:
    seed = int(line)
    pid = os.fork()  # nothing here has opened an object-store client: the child makes its own
    if pid == 0:
        t0 = time.perf_counter()
        arrays, manifest = data[seed]
        # several shards per large array: the write has many objects to be killed between
        jasper.write_store(url, arrays, manifest, backend="zarr", overwrite=True,
                           chunk_rows=16, shard_bytes=32768)
        print(f"done {time.perf_counter() - t0:.3f}", flush=True)
        os._exit(0)
    print(f"pid {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def test_killed_writers_leave_previous_or_nothing(s3, s3_url) -> None:
    """SIGKILL 20 writers at random points of their write: a reader always opens a complete
    dataset (the previous one, or the new one when the kill came after the pointer), never a
    partial one; the next writer removes the killed writers' generations.

    Writers are forked from a process that has imported jasper already, so each kill costs a
    write, not an interpreter start."""
    rng = random.Random(11)
    objects = S3Objects(Location.parse(s3_url))
    expected = {seed: make_arrays(n_pairs=400, embedding_dim=32, seed=seed)[0]["question_embs"]
                for seed in (100, 101)}
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, s3_url], env=child_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert zygote.stdin is not None and zygote.stdout is not None
    out, inp = zygote.stdout, zygote.stdin

    def start(seed: int) -> int:
        inp.write(f"{seed}\n")
        inp.flush()
        line = out.readline().split()
        assert line[0] == "pid", line
        return int(line[1])

    def finish() -> tuple[int, float | None]:
        took = None
        while True:
            line = out.readline().split()
            if line[0] == "done":
                took = float(line[1])
            elif line[0] == "exit":
                return int(line[1]), took

    try:
        assert out.readline().strip() == "ready"
        start(100)  # a complete first write; its duration sets the window of the kills
        code, write_s = finish()
        assert code == 0 and write_s is not None
        kills = 0
        i = 0
        # until 20 writers were killed mid-write (a write that wins the race to its end counts
        # as a completed overwrite, and the next kill comes earlier: the window follows the
        # fastest write seen, so a loaded machine cannot starve the test of kills)
        while kills < 20 and i < 60:
            pid = start(101 if i % 2 == 0 else 100)
            time.sleep(rng.uniform(0.0, 0.9 * write_s))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            code, took = finish()
            if took is not None:
                write_s = min(write_s, took)
            kills += code == -signal.SIGKILL
            with jasper.open_store(s3_url) as reader:
                q = reader.read("question_embs")
                assert any(torch.equal(q, e) for e in expected.values()), "a partial dataset"
                for name in reader.array_names():
                    reader.read(name)
            if i % 5 == 4:
                jasper.validate(s3_url, deep=True)
            i += 1
        assert kills >= 20, f"only {kills} of {i} writers were killed before finishing"
        start(100)
        assert finish()[0] == 0
    finally:
        inp.close()
        zygote.wait(timeout=60)
    ptr = read_pointer(objects)
    assert ptr is not None
    gens = {k.split("/")[1] for k in objects.list(f"{GENERATIONS}/")}
    assert gens <= {ptr.generation, ptr.previous}, f"stale generations left: {gens}"
    assert POINTER_NAME in set(objects.list())
