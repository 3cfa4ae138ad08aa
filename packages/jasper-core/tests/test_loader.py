"""create_loader, set_epoch and validate_first_batch, with real DataLoader workers."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from jasper.curriculum import draw_variants
from jasper.dataset import BATCH_KEYS, JASPERSteeringDataset
from jasper.loader import create_loader, set_epoch, validate_first_batch


def _served(loader: Iterable[dict[str, torch.Tensor]], n_pairs: int) -> dict[str, torch.Tensor]:
    """Every batch of an epoch concatenated, plus the pair id of each sample (read back from
    ``relevance``, which the ``tagged`` dataset sets to pair_id / N_p)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in BATCH_KEYS}
    for batch in loader:
        for k in BATCH_KEYS:
            parts[k].append(batch[k].clone())
    out = {k: torch.cat(v) for k, v in parts.items()}
    out["pair"] = torch.round(out["relevance"].double() * n_pairs).long()
    return out


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dataset whose relevance identifies the pair exactly (pair_id / N_p)."""
    from jasper.store import write_store
    from jasper.testing.data import make_arrays

    arrays, manifest = make_arrays(n_pairs=300, embedding_dim=8, n_neg=3, seed=5)
    arrays["pair_relevance"] = torch.arange(300, dtype=torch.float32) / 300
    return write_store(tmp_path_factory.mktemp("tagged") / "ds", arrays, manifest, backend="pt")


def _by_pair(served: dict[str, torch.Tensor]) -> dict[int, tuple[int, torch.Tensor]]:
    return {int(p): (int(v), s) for p, v, s in
            zip(served["pair"], served["steering_variant"], served["steering"], strict=True)}


# --- defaults of the original -------------------------------------------------------------------
def test_defaults_follow_the_original(small_dataset: Path) -> None:
    train = create_loader(small_dataset, "train", batch_size=64)
    assert isinstance(train.dataset_obj, JASPERSteeringDataset)
    assert train.sampler_obj is None
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    assert len(train) == len(train.dataset_obj) // 64
    val = create_loader(small_dataset, "val", batch_size=64)
    assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
    assert sum(len(b["cluster_id"]) for b in val) == len(val.dataset_obj)
    dist = create_loader(small_dataset, "train", batch_size=8, distributed=True,
                         num_replicas=2, rank=1)
    assert isinstance(dist.sampler_obj, DistributedSampler) and dist.sampler is dist.sampler_obj
    assert dist.sampler_obj.rank == 1 and dist.sampler_obj.drop_last


@pytest.mark.parametrize(("workers", "worker_type"), [(0, "auto"), (2, "thread"), (1, "process")])
def test_pin_memory_reports_what_was_asked_and_is_silent_without_cuda(
        small_dataset: Path, workers: int, worker_type: str) -> None:
    """The original's loader reports ``pin_memory`` and ``num_workers`` as asked (user code
    checks them); jasper pins only where an accelerator exists, without a warning elsewhere."""
    for asked in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader = create_loader(small_dataset, "val", batch_size=32, pin_memory=asked,
                                   num_workers=workers,
                                   worker_type=worker_type)  # type: ignore[arg-type]
            assert loader.pin_memory is asked and loader.num_workers == workers
            batch = next(iter(loader))
        assert batch["question_emb"].is_pinned() == (asked and torch.cuda.is_available())


def test_validate_first_batch_passes(small_dataset: Path) -> None:
    assert validate_first_batch(create_loader(small_dataset, "train", batch_size=16)) is True
    assert validate_first_batch(create_loader(small_dataset, "test", batch_size=5,
                                              use_mmap=True)) is True


def _good_batch() -> dict[str, torch.Tensor]:
    b, d, k = 4, 6, 3
    return {
        "question_emb": torch.zeros(b, d), "target_source_emb": torch.zeros(b, d),
        "steering": torch.zeros(b, d), "negative_embs": torch.zeros(b, k, d),
        "cluster_id": torch.zeros(b, dtype=torch.int64), "relevance": torch.full((b,), 0.5),
        "centroid_distance": torch.ones(b), "steering_variant": torch.zeros(b, dtype=torch.int64),
        "negative_tiers": torch.ones(b, k, dtype=torch.int64),
    }


def _spoil(key: str, fn: Callable[[torch.Tensor], Any]) -> Callable[[dict[str, Any]], None]:
    def apply(batch: dict[str, Any]) -> None:
        batch[key] = fn(batch[key])
    return apply


def _set(key: str, value: float) -> Callable[[dict[str, Any]], None]:
    def apply(batch: dict[str, Any]) -> None:
        batch[key] = batch[key].clone()
        batch[key].view(-1)[1] = value
    return apply


@pytest.mark.parametrize(("spoil", "message"), [
    (lambda b: b.pop("relevance"), "batch keys"),
    (lambda b: b.update(extra=torch.zeros(4)), "batch keys"),
    (_spoil("steering", lambda t: t[:, :-1]), "steering shape"),
    (_spoil("negative_tiers", lambda t: t[:, :-1]), "negative_tiers shape"),
    (_spoil("cluster_id", lambda t: t[:-1]), "cluster_id shape"),
    (_spoil("negative_embs", lambda t: t[:-1]), "negative_embs shape"),
    (_set("question_emb", float("nan")), "NaN detected in question_emb"),
    (_set("negative_embs", float("inf")), "Inf detected in negative_embs"),
    (_set("target_source_emb", float("-inf")), "Inf detected in target_source_emb"),
    (_set("cluster_id", -1), "cluster_id must be non-negative"),
    (_set("relevance", 1.5), "relevance must be <= 1"),
    (_set("relevance", -0.1), "relevance must be >= 0"),
    (_set("centroid_distance", 2.5), "centroid_distance must be <= 2"),
    (_set("centroid_distance", -1), "centroid_distance must be >= 0"),
    (_set("steering_variant", 4), "steering_variant must be <= 3"),
    (_set("steering_variant", -1), "steering_variant must be >= 0"),
])
def test_validate_first_batch_names_the_failed_check(spoil: Callable[[dict[str, Any]], None],
                                                     message: str) -> None:
    batch = _good_batch()
    assert validate_first_batch([batch]) is True
    spoil(batch)
    with pytest.raises(AssertionError, match=message):
        validate_first_batch([batch])


def test_validate_first_batch_checks_clusters_against_the_dataset(small_dataset: Path) -> None:
    loader = create_loader(small_dataset, "val", batch_size=8)

    class Wrapped:
        dataset_obj = loader.dataset_obj

        def __iter__(self) -> Any:
            batch = dict(next(iter(loader)))
            batch["cluster_id"] = batch["cluster_id"].clone()
            batch["cluster_id"][0] = loader.dataset_obj.n_clusters
            return iter([batch])

    with pytest.raises(AssertionError, match=f"cluster_id must be < {loader.dataset_obj.n_clusters}"):
        validate_first_batch(Wrapped())


# --- the draw across batch sizes, workers and shuffles --------------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 97), workers=st.sampled_from([0, 2]),
       worker_type=st.sampled_from(["thread", "process"]),
       shuffle=st.booleans(), epoch=st.integers(0, 50))
def test_every_sample_is_the_same_whatever_the_loader(tagged: Path, batch_size: int,
                                                      workers: int, worker_type: str,
                                                      shuffle: bool, epoch: int) -> None:
    n_pairs = 300
    base = create_loader(tagged, "train", batch_size=len(JASPERSteeringDataset(tagged, "train")),
                         shuffle=False, drop_last=False, epoch=epoch)
    expect = _by_pair(_served(base, n_pairs))
    loader = create_loader(tagged, "train", batch_size=batch_size, num_workers=workers,
                           shuffle=shuffle, drop_last=False, epoch=epoch,
                           worker_type=worker_type)  # type: ignore[arg-type]
    got = _by_pair(_served(loader, n_pairs))
    assert got.keys() == expect.keys()
    for pair, (variant, steering) in got.items():
        assert variant == expect[pair][0]
        assert torch.equal(steering, expect[pair][1])


def test_persistent_workers_follow_force_steering_set_epoch_and_reloads(
        tagged: Path, copy_dataset: Callable[[Path], Path]) -> None:
    path = copy_dataset(tagged)
    n_pairs = 300
    loader = create_loader(path, "train", batch_size=32, num_workers=2, persistent_workers=True,
                           drop_last=False, worker_type="process")
    ds = loader.dataset_obj
    first = _served(loader, n_pairs)
    assert torch.equal(first["steering_variant"],
                       draw_variants(first["pair"], 0, ds.seed, ds.curriculum))
    workers = loader._iterator._workers
    assert workers and all(w.is_alive() for w in workers)

    ds.force_steering("residual")
    forced = _served(loader, n_pairs)
    assert set(forced["steering_variant"].tolist()) == {3}

    ds.force_steering(None)
    set_epoch(loader, 45)
    later = _served(loader, n_pairs)
    want = draw_variants(later["pair"], 45, ds.seed, ds.curriculum)
    assert torch.equal(later["steering_variant"], want)
    # the workers really moved on: epoch 0's draw differs for most pairs
    assert not torch.equal(want, draw_variants(later["pair"], 0, ds.seed, ds.curriculum))

    # re-mined negatives reach the same (still running) workers
    from jasper.store import open_store, write_store

    with open_store(path) as r:
        arrays = {n: r.read(n) for n in r.array_names()}
        manifest = r.manifest
    arrays["negative_tiers"] = torch.full_like(arrays["negative_tiers"], 9)
    write_store(path, arrays, manifest, backend="pt", overwrite=True)
    ds.reload_negatives()
    reloaded = _served(loader, n_pairs)
    assert set(reloaded["negative_tiers"].unique().tolist()) == {9}
    assert loader._iterator._workers == workers  # the same worker processes served it


def test_spawned_workers_share_the_controls(tagged: Path) -> None:
    loader = create_loader(tagged, "val", batch_size=16, num_workers=1, persistent_workers=True,
                           use_mmap=True, multiprocessing_context="spawn", worker_type="process")
    n_pairs = 300
    _served(loader, n_pairs)
    loader.dataset_obj.force_steering("keyword")
    assert set(_served(loader, n_pairs)["steering_variant"].tolist()) == {2}


def test_set_epoch_reseeds_the_shuffle_reproducibly(small_dataset: Path) -> None:
    a = create_loader(small_dataset, "train", batch_size=50, seed=3)
    b = create_loader(small_dataset, "train", batch_size=50, seed=3)

    def order(loader: Any) -> torch.Tensor:
        return torch.cat([x["target_source_emb"][:, 0] for x in loader])

    set_epoch(a, 4)
    set_epoch(b, 4)
    first = order(a)
    assert torch.equal(first, order(b))
    set_epoch(a, 5)
    assert not torch.equal(first, order(a))
    assert a.dataset_obj.current_epoch == 5


def test_distributed_sampler_epoch(small_dataset: Path) -> None:
    loader = create_loader(small_dataset, "train", batch_size=8, distributed=True,
                           num_replicas=2, rank=0, epoch=3)
    assert loader.sampler_obj.epoch == 3
    set_epoch(loader, 7)
    assert loader.sampler_obj.epoch == 7 and loader.dataset_obj.current_epoch == 7



@pytest.mark.parametrize("use_mmap", [False, True])
def test_thread_workers_serve_what_zero_workers_serve_in_order(tagged: Path,
                                                               use_mmap: bool) -> None:
    """In-memory datasets get thread workers by default: same batches, same order, same length,
    and the curriculum controls apply at once (no worker processes to reach)."""
    from jasper.loader import ThreadedLoader

    kw = dict(batch_size=24, shuffle=True, seed=5, use_mmap=use_mmap, drop_last=False)
    plain = create_loader(tagged, "train", num_workers=0, **kw)  # type: ignore[arg-type]
    threaded = create_loader(tagged, "train", num_workers=3, prefetch_factor=2,
                             **kw)  # type: ignore[arg-type]
    assert isinstance(threaded, ThreadedLoader) and not isinstance(plain, ThreadedLoader)
    assert len(threaded) == len(plain)
    for epoch in (0, 7):
        set_epoch(plain, epoch)
        set_epoch(threaded, epoch)
        got, want = list(threaded), list(plain)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for k in w:
                assert torch.equal(g[k], w[k]), k
    threaded.dataset_obj.force_steering("keyword")
    assert all(set(b["steering_variant"].tolist()) == {2} for b in threaded)



@pytest.mark.parametrize("workers", [0, 2], ids=["no-workers", "threads"])
def test_every_pass_hands_the_batches_heap_back(tagged: Path, workers: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuned heap keeps freed batches for reuse during a pass; once a pass ends (also one
    abandoned half-way) and no next one starts within the idle delay, it goes back."""
    import time

    from jasper import allocator

    calls: list[int] = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "IDLE_RELEASE_S", 0.3)
    monkeypatch.setattr(allocator.release_when_idle, "__defaults__", (0.3,))
    loader = create_loader(tagged, "train", batch_size=16, num_workers=workers)
    for _ in range(3):  # passes that follow at once keep the heap
        for _ in loader:
            pass
    time.sleep(0.1)
    assert calls == []
    time.sleep(0.6)
    assert calls == [1]  # idle after the last pass: released once
    it = iter(loader)
    next(it)
    it.close()
    time.sleep(0.6)
    assert calls == [1, 1]

def test_worker_type_choice(tagged: Path) -> None:
    from torch.utils.data import DataLoader

    from jasper.loader import ThreadedLoader

    forced = create_loader(tagged, "val", batch_size=8, num_workers=2, worker_type="process")
    assert isinstance(forced, DataLoader) and not isinstance(forced, ThreadedLoader)
    assert forced.num_workers == 2
    with pytest.raises(ValueError, match="worker_type"):
        create_loader(tagged, "val", batch_size=8, worker_type="fibers")  # type: ignore[arg-type]
    t = create_loader(tagged, "val", batch_size=8, num_workers=2, worker_type="thread")
    assert isinstance(t, ThreadedLoader) and t.thread_workers == 2 and t.num_workers == 2


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 70), batch_size=st.integers(1, 20), drop_last=st.booleans(),
       kind=st.sampled_from(["sequential", "shuffle", "distributed"]), skip=st.integers(0, 3))
def test_tensor_index_batches_are_the_batch_samplers_batches(n: int, batch_size: int,
                                                             drop_last: bool, kind: str,
                                                             skip: int) -> None:
    """In-process loaders hand __getitems__ int64 views of one order tensor instead of Python
    lists: the same batches, the same len, and a restore's skip drops exactly the first ones."""
    from torch.utils.data import BatchSampler

    from jasper.loader import EpochShuffleSampler, IndexBatches

    data = range(n)

    def make() -> Any:
        if kind == "sequential":
            return SequentialSampler(data)
        if kind == "shuffle":
            return EpochShuffleSampler(data, seed=3, epoch=2)
        return DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)  # type: ignore[arg-type]

    ours = IndexBatches(make(), batch_size, drop_last, skip=skip)
    theirs = BatchSampler(make(), batch_size, drop_last)
    want = list(theirs)[skip:]
    got = list(ours)
    assert len(ours) == len(want) == len(got)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int64 and g.tolist() == w


def test_the_epoch_variant_table_equals_the_per_pair_draw(small_dataset: Path) -> None:
    with JASPERSteeringDataset(small_dataset, "train") as ds:
        positions = torch.tensor([5, 0, 999, 5, len(ds) - 1])
        for epoch in (0, 12, 40, 12):
            ds.set_epoch(epoch)
            batch = ds.__getitems__(positions)
            pids = ds.split_indices[positions]
            assert torch.equal(batch["steering_variant"], ds.variants_for_pairs(pids))
            assert torch.equal(batch["steering_variant"],
                               draw_variants(pids, epoch, ds.seed, ds.curriculum))
        ds.force_steering("centroid")
        assert set(ds.__getitems__(positions)["steering_variant"].tolist()) == {1}


@pytest.mark.parametrize(("prefetch_factor", "in_flight"), [(None, 2), (2, 4)])
def test_thread_workers_bound_the_batches_alive_and_allocate_in_the_consumer(
        tagged: Path, monkeypatch: pytest.MonkeyPatch, prefetch_factor: int | None,
        in_flight: int) -> None:
    """Summed PSS with 2 threads was 1.17-1.25x of 0 workers: 2 x num_workers batches in flight,
    each allocated in its gathering thread's malloc arena. Now num_workers x prefetch_factor
    (default 1) are in flight and every output is allocated by the consuming thread."""
    import threading

    loader = create_loader(tagged, "train", batch_size=8, num_workers=2, worker_type="thread",
                           prefetch_factor=prefetch_factor)
    ds = loader.dataset_obj
    allocated: list[int] = []  # one output per submitted batch, by the allocating thread
    empty = ds.empty_batch

    def recording_empty(*a: Any, **kw: Any) -> Any:
        allocated.append(threading.get_ident())
        return empty(*a, **kw)

    monkeypatch.setattr(ds, "empty_batch", recording_empty)
    it = iter(loader)
    next(it)
    assert len(allocated) == in_flight  # submitted before the first batch was handed out
    rest = list(it)
    assert len(rest) == len(loader) - 1 and len(allocated) == len(loader)
    assert set(allocated) == {threading.get_ident()}


def _freeze_seen_by_workers(counts: torch.Tensor) -> Callable[[int], None]:
    def init(worker_id: int) -> None:
        import gc

        counts[worker_id] = gc.get_freeze_count()
    return init


def test_forked_workers_keep_the_collector_off_what_they_share(tagged: Path) -> None:
    """While forked workers live, the objects that existed at the fork sit in the collector's
    permanent generation, in the training process and in the workers; the freeze ends with the
    workers (each epoch for non-persistent ones)."""
    import gc

    from jasper import gcfreeze
    from jasper.dataset import passthrough_collate
    from jasper.loader import JasperLoader

    assert gc.get_freeze_count() == 0 and gcfreeze.holders() == 0
    ds = JASPERSteeringDataset(tagged, "val")
    counts = torch.full((2,), -1, dtype=torch.int64).share_memory_()
    loader = JasperLoader(ds, batch_size=8, num_workers=2, collate_fn=passthrough_collate,
                          multiprocessing_context="fork",
                          worker_init_fn=_freeze_seen_by_workers(counts))
    for epoch in range(2):
        counts.fill_(-1)
        it = iter(loader)
        next(it)
        assert gc.get_freeze_count() > 0 and gcfreeze.holders() == 1
        for _ in it:
            pass
        del it
        assert bool((counts > 0).all()), f"epoch {epoch}: workers saw {counts.tolist()}"
        assert gc.get_freeze_count() == 0 and gcfreeze.holders() == 0, f"epoch {epoch}"


def test_persistent_workers_hold_the_freeze_until_the_loader_goes(tagged: Path) -> None:
    import gc

    from jasper import gcfreeze

    loader = create_loader(tagged, "val", batch_size=8, num_workers=2, worker_type="process",
                           persistent_workers=True)
    for _ in range(2):
        for _ in loader:
            assert gcfreeze.holders() == 1
    assert gcfreeze.holders() == 1 and gc.get_freeze_count() > 0  # the workers still live
    del loader
    assert gcfreeze.holders() == 0 and gc.get_freeze_count() == 0


def test_the_freeze_leaves_spawned_workers_threads_users_and_opt_outs_alone(
        tagged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from jasper import gcfreeze

    def held_while_serving(loader: Any) -> int:
        it = iter(loader)
        next(it)
        held = gcfreeze.holders()
        del it
        return held

    spawned = create_loader(tagged, "val", batch_size=8, num_workers=1, worker_type="process",
                            multiprocessing_context="spawn")
    assert held_while_serving(spawned) == 0  # a spawned child shares no pages
    assert held_while_serving(create_loader(tagged, "val", batch_size=8, num_workers=2,
                                            worker_type="thread")) == 0
    forked = create_loader(tagged, "val", batch_size=8, num_workers=1, worker_type="process")
    monkeypatch.setenv("JASPER_GC_FREEZE", "0")
    assert held_while_serving(forked) == 0 and gc.get_freeze_count() == 0
    monkeypatch.delenv("JASPER_GC_FREEZE")

    # a user's own freeze is theirs: jasper adds to it and never undoes it
    gc.freeze()
    try:
        assert held_while_serving(forked) == 1
        assert gcfreeze.holders() == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
