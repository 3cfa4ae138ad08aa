"""GPULoader: device-side shuffle and sharding, reused buffers, staged copies. The logic runs on
the CPU device here; tests marked ``gpu`` repeat the checks on CUDA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from jasper.dataset import BATCH_KEYS, JASPERSteeringDataset
from jasper.gpu_loader import DeviceShardSampler, GPULoader, shuffle_order
from jasper.loader import create_loader, set_epoch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Relevance = pair_id / N_p, so every served sample names its pair."""
    from jasper.store import write_store
    from jasper.testing.data import make_arrays

    arrays, manifest = make_arrays(n_pairs=301, embedding_dim=8, n_neg=3, seed=11)
    arrays["pair_relevance"] = torch.arange(301, dtype=torch.float32) / 301
    return write_store(tmp_path_factory.mktemp("gpu") / "ds", arrays, manifest, backend="pt")


def _collect(loader: object) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in BATCH_KEYS}
    for batch in loader:  # type: ignore[attr-defined]
        for k in BATCH_KEYS:
            parts[k].append(batch[k].clone())  # batches are reused buffers
    out = {k: torch.cat(v).cpu() for k, v in parts.items()}
    out["pair"] = torch.round(out["relevance"].double() * 301).long()
    return out


# --- shuffle and sharding ---------------------------------------------------------------------
def test_shuffle_order_is_a_deterministic_permutation() -> None:
    a = shuffle_order(1000, seed=1, epoch=2)
    assert torch.equal(torch.sort(a).values, torch.arange(1000))
    assert torch.equal(a, shuffle_order(1000, seed=1, epoch=2))
    assert not torch.equal(a, shuffle_order(1000, seed=1, epoch=3))
    assert not torch.equal(a, shuffle_order(1000, seed=2, epoch=2))
    assert not torch.equal(a, torch.arange(1000))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 60), replicas=st.integers(1, 5), drop_last=st.booleans())
def test_sharding_is_exactly_distributed_samplers(n: int, replicas: int, drop_last: bool) -> None:
    data = list(range(n))
    for rank in range(replicas):
        ref = list(DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=False,
                                      drop_last=drop_last))
        ours = DeviceShardSampler(n, shuffle=False, seed=0, num_replicas=replicas, rank=rank,
                                  drop_last=drop_last)
        assert list(ours) == ref
        assert len(ours) == len(ref)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), replicas=st.integers(1, 4), drop_last=st.booleans(),
       epoch=st.integers(0, 9))
def test_shuffled_shards_cover_the_split_like_distributed_sampler(
        n: int, replicas: int, drop_last: bool, epoch: int) -> None:
    shards = [DeviceShardSampler(n, shuffle=True, seed=4, num_replicas=replicas, rank=r,
                                 drop_last=drop_last, epoch=epoch) for r in range(replicas)]
    served = torch.cat([s.indices() for s in shards])
    per_rank = math.ceil((n - replicas) / replicas) if drop_last and n % replicas else \
        math.ceil(n / replicas)
    assert all(len(s.indices()) == per_rank for s in shards)
    counts = torch.bincount(served, minlength=n)
    if drop_last or n % replicas == 0:
        assert int(counts.max()) <= 1 and int(counts.sum()) == per_rank * replicas
    else:
        # padding repeats the start of the epoch's order: everything at least once
        assert int(counts.min()) >= 1 and int(counts.sum()) == per_rank * replicas
        order = shuffle_order(n, 4, epoch)
        pad = per_rank * replicas - n
        extra = order.repeat(math.ceil(pad / n) + 1)[:pad]
        assert torch.equal(counts - 1, torch.bincount(extra, minlength=n))


# --- GPULoader on the CPU device --------------------------------------------------------------
@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("reuse", [True, False])
def test_gpu_loader_serves_the_split_once_with_the_datasets_values(tagged: Path, staged: bool,
                                                                   reuse: bool) -> None:
    with JASPERSteeringDataset(tagged, "train") as ds:
        loader = GPULoader(ds, 64, shuffle=True, drop_last=False, staged=staged,
                           reuse_buffers=reuse)
        assert len(loader) == math.ceil(len(ds) / 64)
        got = _collect(loader)
        assert sorted(got["pair"].tolist()) == sorted(ds.split_indices.tolist())
        # every sample equals what the dataset itself computes for its position
        pos_of_pair = {int(p): i for i, p in enumerate(ds.split_indices.tolist())}
        positions = [pos_of_pair[int(p)] for p in got["pair"]]
        expect = ds.__getitems__(positions)
        for key in BATCH_KEYS:
            assert torch.equal(got[key], expect[key]), key


def test_reused_buffers_are_overwritten_and_drop_last(tagged: Path) -> None:
    with JASPERSteeringDataset(tagged, "train") as ds:
        loader = GPULoader(ds, 50, shuffle=False, drop_last=True)
        assert len(loader) == len(ds) // 50
        it = iter(loader)
        first = next(it)
        keep = first["question_emb"].clone()
        second = next(it)
        assert second["question_emb"].data_ptr() == first["question_emb"].data_ptr()
        assert not torch.equal(keep, second["question_emb"])
        assert sum(1 for _ in loader) == len(ds) // 50


def test_forced_steering_and_epochs_reach_the_gpu_loader(tagged: Path) -> None:
    with JASPERSteeringDataset(tagged, "val") as ds:
        loader = GPULoader(ds, 16, shuffle=True)
        ds.force_steering("keyword")
        assert set(_collect(loader)["steering_variant"].tolist()) == {2}
        ds.force_steering(None)
        set_epoch(loader, 6)
        assert loader.sampler_obj.epoch == 6 and ds.current_epoch == 6
        got = _collect(loader)
        from jasper.curriculum import draw_variants

        assert torch.equal(got["steering_variant"],
                           draw_variants(got["pair"], 6, ds.seed, ds.curriculum))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 120), epoch=st.integers(0, 45), staged=st.booleans(),
       mmap=st.booleans())
def test_gpu_loader_on_cpu_equals_the_cpu_loader(tagged: Path, batch_size: int, epoch: int,
                                                 staged: bool, mmap: bool) -> None:
    cpu = create_loader(tagged, "train", batch_size=batch_size, epoch=epoch, drop_last=False)
    ref = _collect(cpu)
    with JASPERSteeringDataset(tagged, "train", epoch=epoch, use_mmap=mmap) as ds:
        got = _collect(GPULoader(ds, batch_size, staged=staged or mmap))
    order_ref, order_got = torch.argsort(ref["pair"]), torch.argsort(got["pair"])
    for key in BATCH_KEYS:
        assert torch.equal(ref[key][order_ref], got[key][order_got]), key


def test_distributed_needs_a_group_or_explicit_ranks(tagged: Path) -> None:
    with JASPERSteeringDataset(tagged, "val") as ds:
        with pytest.raises(RuntimeError, match="process group"):
            GPULoader(ds, 8, distributed=True)
        loader = GPULoader(ds, 8, distributed=True, num_replicas=3, rank=2)
        assert loader.sampler.num_samples == math.ceil(len(ds) / 3)
        with pytest.raises(ValueError, match="rank"):
            GPULoader(ds, 8, distributed=True, num_replicas=2, rank=2)


# --- CUDA -------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_resident_loader_equals_the_cpu_loader(tagged: Path, graph: bool) -> None:
    loader = create_loader(tagged, "train", batch_size=32, device="cuda", drop_last=False)
    assert isinstance(loader, GPULoader)
    loader.cuda_graph = graph
    ref = _collect(create_loader(tagged, "train", batch_size=32, drop_last=False))
    got = _collect(loader)
    order_ref, order_got = torch.argsort(ref["pair"]), torch.argsort(got["pair"])
    for key in BATCH_KEYS:
        assert torch.equal(ref[key][order_ref], got[key][order_got]), key
    # the device shuffle equals the CPU one (same hash on both devices)
    assert torch.equal(shuffle_order(500, 1, 2, "cuda").cpu(), shuffle_order(500, 1, 2))


@pytest.mark.gpu
@needs_cuda
def test_cuda_staged_loader_from_a_cpu_dataset(tagged: Path) -> None:
    with JASPERSteeringDataset(tagged, "train") as ds:
        loader = GPULoader(ds, 32, device="cuda")
        assert loader.staged
        got = _collect(loader)
        assert sorted(got["pair"].tolist()) == sorted(ds.split_indices.tolist())
        assert all(t.is_pinned() for t in loader._slots[0].host.values())
