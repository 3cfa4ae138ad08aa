"""DDP: two real torch.distributed processes (gloo, CPU) serve every sample exactly once per epoch
(with DistributedSampler's padding otherwise), and each sample's steering equals the
single-process run's -- for the CPU loader and for the GPULoader on the CPU device."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jasper.dataset import BATCH_KEYS, JASPERSteeringDataset

pytestmark = pytest.mark.distributed

WORLD = 2
N_PAIRS = 203
EPOCHS = (0, 1, 37)
BATCH = 8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, port: int, path: str, out: str) -> None:
    """One DDP process: iterate both loaders for a few epochs and save what it served."""
    from jasper.gpu_loader import GPULoader
    from jasper.loader import create_loader, set_epoch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        results: dict[str, torch.Tensor] = {}
        for split in ("train", "test"):
            for drop_last in (False, True):
                cpu = create_loader(path, split, batch_size=BATCH, distributed=True,
                                    drop_last=drop_last, shuffle=True)
                gpu = GPULoader(JASPERSteeringDataset(path, split), BATCH, shuffle=True,
                                drop_last=drop_last, distributed=True)
                for name, loader in (("cpu", cpu), ("gpu", gpu)):
                    for epoch in EPOCHS:
                        set_epoch(loader, epoch)
                        served = {k: [] for k in ("pair", "variant", "steering")}
                        for batch in loader:
                            pair = torch.round(batch["relevance"].double() * N_PAIRS).long()
                            served["pair"].append(pair)
                            served["variant"].append(batch["steering_variant"].clone())
                            served["steering"].append(batch["steering"].clone())
                        tag = f"{split}/{drop_last}/{name}/{epoch}"
                        for k, v in served.items():
                            results[f"{tag}/{k}"] = torch.cat(v)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    from jasper.store import write_store
    from jasper.testing.data import make_arrays

    root = tmp_path_factory.mktemp("ddp")
    arrays, manifest = make_arrays(n_pairs=N_PAIRS, embedding_dim=8, n_neg=3, seed=21)
    arrays["pair_relevance"] = torch.arange(N_PAIRS, dtype=torch.float32) / N_PAIRS
    path = write_store(root / "ds", arrays, manifest, backend="pt")
    mp.spawn(_rank_main, args=(_free_port(), str(path), str(root)), nprocs=WORLD, join=True)
    return path, [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("loader", ["cpu", "gpu"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_epoch_serves_every_sample_once_across_ranks(
        ddp_results: tuple[Path, list[dict[str, torch.Tensor]]], loader: str, split: str,
        drop_last: bool) -> None:
    path, results = ddp_results
    with JASPERSteeringDataset(path, split) as ds:
        members = ds.split_indices
        n = len(ds)
    per_rank = math.ceil((n - WORLD) / WORLD) if drop_last and n % WORLD else math.ceil(n / WORLD)
    for epoch in EPOCHS:
        tag = f"{split}/{drop_last}/{loader}/{epoch}"
        pairs = [r[f"{tag}/pair"] for r in results]
        # the batch-level drop_last of each rank trims its incomplete last batch
        expect_rank = (per_rank // BATCH) * BATCH if drop_last else per_rank
        assert [len(p) for p in pairs] == [expect_rank] * WORLD
        served = torch.cat(pairs)
        counts = torch.bincount(served, minlength=N_PAIRS)
        assert not bool(counts[~torch.isin(torch.arange(N_PAIRS), members)].any())
        if not drop_last:
            # every member at least once; padding repeats exactly total - n of them
            assert int(counts[members].min()) == 1
            assert int(counts.sum()) == per_rank * WORLD
            assert int((counts > 1).sum()) == per_rank * WORLD - n
            if n % WORLD == 0:
                assert int(counts.max()) == 1
        else:
            assert int(counts.max()) == 1  # nothing twice, the tail dropped evenly


def test_split_sizes_cover_both_cases(ddp_results: tuple[Path, list[dict[str, torch.Tensor]]]
                                      ) -> None:
    path, _ = ddp_results
    sizes = {s: len(JASPERSteeringDataset(path, s)) for s in ("train", "test")}
    assert sizes["train"] % WORLD == 0 and sizes["test"] % WORLD == 1, sizes


@pytest.mark.parametrize("loader", ["cpu", "gpu"])
def test_steering_equals_the_single_process_run(
        ddp_results: tuple[Path, list[dict[str, torch.Tensor]]], loader: str) -> None:
    path, results = ddp_results
    for split in ("train", "test"):
        with JASPERSteeringDataset(path, split) as ds:
            for epoch in EPOCHS:
                ds.set_epoch(epoch)
                whole = ds.__getitems__(list(range(len(ds))))
                row_of = {int(p): i for i, p in enumerate(ds.split_indices.tolist())}
                tag = f"{split}/False/{loader}/{epoch}"
                for r in results:
                    rows = torch.tensor([row_of[int(p)] for p in r[f"{tag}/pair"]])
                    assert torch.equal(r[f"{tag}/variant"], whole["steering_variant"][rows])
                    assert torch.equal(r[f"{tag}/steering"], whole["steering"][rows])
    assert set(BATCH_KEYS) >= {"steering", "steering_variant"}
