"""Questions 3, 4 and 5 on the CPU: serving throughput and latency of jasper's batched paths, the
raw-gather ceiling and the peers, all on the same bytes and the same index stream.

Per measurement: one untimed warm-up round (it pays worker start-up and page faults and gives the
time to first batch), then timed rounds that each serve the same ``n_batches`` rows of the
stream. samples/s = samples per round / median round time; GB/s counts the bytes of the batches
produced (``jasper.schema.bytes_per_sample``); p50/p99 are over every batch of the timed rounds.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from benchlib import contenders as C
from benchlib.config import GridPoint, load_config
from benchlib.data import (
    BackendPreset,
    base_preset,
    dataset_cases,
    ensure_dataset,
    installed_presets,
)
from benchlib.measure import Clock, percentile_ms
from benchlib.record import case_id, tag

CFG = load_config()
POINTS = list(CFG.grid)
FIRST = [(p, b) for p, b in dataset_cases(CFG.grid) if b.first]
_ARRAYS: dict[str, Any] = {}
_DATASETS: dict[tuple, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _release_module_caches():
    """Close the datasets and drop the arrays this module held, so later modules (and the
    page-cache measurements of a later run in the same process) see no stale maps."""
    yield
    for ds in _DATASETS.values():
        ds.close()
    _DATASETS.clear()
    _ARRAYS.clear()
    gc.collect()


def bytes_per_sample(point: GridPoint) -> int:
    from jasper.dtypes import torch_dtype
    from jasper.schema import bytes_per_sample as bps

    return bps(point.embedding_dim, point.n_neg, torch_dtype(point.dtype).itemsize)


def arrays_of(point: GridPoint) -> tuple[Any, dict[str, torch.Tensor]]:
    """The served arrays of ``point`` preloaded (one grid point held at a time)."""
    if point.key not in _ARRAYS:
        _ARRAYS.clear()
        gc.collect()
        path = ensure_dataset(point, base_preset(installed_presets()), CFG.seed)
        _ARRAYS[point.key] = (path, C.load_arrays(path))
    return _ARRAYS[point.key]


def dataset_of(point: GridPoint, preset: BackendPreset, mapped: bool) -> Any:
    """jasper's train-split dataset of ``(point, preset)``, one held at a time."""
    key = (point.key, preset.id, mapped)
    if key not in _DATASETS:
        for ds in _DATASETS.values():
            ds.close()
        _DATASETS.clear()
        gc.collect()
        path = ensure_dataset(point, preset, CFG.seed)
        _DATASETS[key] = C.jasper_dataset(path, use_mmap=mapped)
    return _DATASETS[key]


def n_items(point: GridPoint) -> int:
    return int(arrays_of(point)[1]["train_idx"].shape[0])


def stream_for(point: GridPoint, batch_size: int, samples: int) -> torch.Tensor:
    n_batches = max(1, samples // batch_size)
    return C.index_stream(n_items(point), batch_size, n_batches, seed=CFG.seed)


def run_serving(benchmark: Any, batches: Callable[[], Iterable[Any]], shape: tuple[int, int],
                point: GridPoint, question: int, kind: str, preset: BackendPreset | None = None,
                end_sync: Callable[[], None] | None = None, paired: bool = False,
                **extra: Any) -> None:
    """Time whole passes of ``batches()`` (``shape`` = (batches per pass, batch size)) and
    record throughput and latency.

    ``end_sync`` ends every pass (``torch.cuda.synchronize`` for device work); latencies are then
    the host-side gaps between batches, which on a GPU are launch times, not kernel times.
    ``paired``: a pass of the raw-gather ceiling over the same index stream runs before every
    round (untimed by the benchmark, timed here), so the ratio to the ceiling divides two
    measurements taken side by side; a ceiling measured once, minutes earlier, moves with
    whatever else the machine did in between (``paired_ceiling_s``: its rounds' seconds).
    """
    clock = Clock()
    ceiling_s: list[float] = []
    setup = None
    if paired:
        _, arrays = arrays_of(point)
        gather = C.RawGather(arrays, shape[1])
        stream = stream_for(point, shape[1], CFG.samples(point))

        def setup() -> None:
            t0 = time.perf_counter()
            for _ in C.iterate_direct(gather, stream):
                pass
            ceiling_s.append(time.perf_counter() - t0)

        setup()  # warm-up of the ceiling too
        ceiling_s.clear()

    def one_pass() -> int:
        clock.start()
        n = 0
        for _ in batches():
            clock.tick()
            n += 1
        if end_sync is not None:
            end_sync()
        return n

    first_pass = one_pass()  # warm-up: workers start, pages fault in
    ttfb = clock.first
    clock.latencies.clear()
    got = benchmark.pedantic(one_pass, setup=setup, rounds=CFG.rounds)
    n_batches, b = shape
    assert got == first_pass == n_batches, f"served {got} batches, expected {n_batches}"
    if ceiling_s:
        extra["paired_ceiling_s"] = ceiling_s
    tag(benchmark, question, kind, point, preset, batch_size=b, n_batches=n_batches,
        samples=n_batches * b, bytes_per_sample=bytes_per_sample(point), ttfb_s=ttfb,
        p50_ms=percentile_ms(clock.latencies, 50), p99_ms=percentile_ms(clock.latencies, 99),
        **extra)


def _check_batch(batch: dict, point: GridPoint, items: torch.Tensor) -> None:
    """Every contender must serve the very batch the ceiling gathers for the same items: a
    benchmark of a wrong batch is worthless."""
    _, arrays = arrays_of(point)
    want = C.RawGather(arrays, items.shape[0])(items)
    for key in ("question_emb", "target_source_emb", "steering", "negative_embs",
                "negative_tiers", "cluster_id", "relevance", "centroid_distance"):
        got = batch[key].cpu()
        assert got.shape == want[key].shape, f"{key}: {tuple(got.shape)} != {tuple(want[key].shape)}"
        assert torch.equal(got.to(want[key].dtype), want[key]), f"{key} differs from the ceiling's"


# --- question 4: the ceiling ------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", CFG.batch_sizes)
@pytest.mark.parametrize("point", POINTS, ids=[p.key for p in POINTS])
def test_ceiling_raw_gather(benchmark, point, batch_size):
    _, arrays = arrays_of(point)
    gather = C.RawGather(arrays, batch_size)
    stream = stream_for(point, batch_size, CFG.samples(point))
    run_serving(benchmark, lambda: C.iterate_direct(gather, stream), stream.shape, point, 4,
                "cpu_raw_gather", contender="raw gather (ceiling)")


# --- question 3: jasper's batched CPU paths ---------------------------------------------------
SERVE_CASES = [(p, b, m) for p, b in FIRST for m in ([False, True] if b.mmap else [False])]
SERVE_IDS = [case_id(p, b, "mmap" if m else "preload") for p, b, m in SERVE_CASES]


def _jasper(point: GridPoint, preset: BackendPreset, mapped: bool) -> Any:
    try:
        return dataset_of(point, preset, mapped)
    except C.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("batch_size", CFG.batch_sizes)
@pytest.mark.parametrize(("point", "preset", "mapped"), SERVE_CASES, ids=SERVE_IDS)
def test_jasper_getitems(benchmark, point, preset, mapped, batch_size):
    """``dataset.__getitems__(indices)`` called directly: jasper's batched fetch without a
    DataLoader around it."""
    ds = _jasper(point, preset, mapped)
    stream = stream_for(point, batch_size, CFG.samples(point))
    rows = [r.tolist() for r in stream]
    _check_batch(ds.__getitems__(rows[0]), point, stream[0])
    run_serving(benchmark, lambda: (ds.__getitems__(r) for r in rows), stream.shape, point, 3,
                "jasper_getitems", preset, paired=True, mapped=mapped, workers=0,
                contender=f"jasper __getitems__ ({'mmap' if mapped else 'preload'})")


WORKERS = [(w, t) for w in CFG.worker_counts for t in (["process", "thread"] if w else ["none"])]


@pytest.mark.parametrize(("workers", "worker_type"), WORKERS,
                         ids=[f"w{w}-{t}" if w else "w0" for w, t in WORKERS])
@pytest.mark.parametrize("batch_size", CFG.batch_sizes)
@pytest.mark.parametrize(("point", "preset", "mapped"), SERVE_CASES, ids=SERVE_IDS)
def test_jasper_loader(benchmark, point, preset, mapped, batch_size, workers, worker_type):
    """jasper's dataset in a ``DataLoader`` (one ``__getitems__`` per batch): no workers, worker
    processes, or worker threads (``create_loader``'s choice for data in memory or mapped)."""
    ds = _jasper(point, preset, mapped)
    stream = stream_for(point, batch_size, CFG.samples(point))
    try:
        loader = C.dataloader(ds, stream, workers, worker_type=worker_type)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    try:
        # in-process paths (no workers, threads) are timed side by side with the ceiling
        run_serving(benchmark, lambda: loader, stream.shape, point, 3, "jasper_loader", preset,
                    paired=workers == 0 or worker_type == "thread",
                    mapped=mapped, workers=workers, worker_type=worker_type,
                    contender=f"jasper DataLoader w{workers} ({'mmap' if mapped else 'preload'})")
    finally:
        _stop_workers(loader)


def _stop_workers(loader: Any) -> None:
    """Shut persistent workers down now rather than at garbage collection."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


@pytest.mark.parametrize("batch_size", CFG.batch_sizes)
@pytest.mark.parametrize(("point", "preset", "mapped"), SERVE_CASES, ids=SERVE_IDS)
def test_jasper_inprocess_loader(benchmark, point, preset, mapped, batch_size):
    """jasper's worker-free loader (``GPULoader``, device-generic) on the CPU: gathers each batch
    into reused buffers in the training process. It shuffles by its own (seed, epoch) order, a
    random permutation like the stream's."""
    ds = _jasper(point, preset, mapped)
    try:
        mod = C.optional_import("jasper.gpu_loader", "jasper's worker-free loader has not landed")
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    loader = mod.GPULoader(ds, batch_size, shuffle=True, drop_last=True, device="cpu")
    n_batches = min(len(loader), max(1, CFG.samples(point) // batch_size))
    if n_batches == 0:
        pytest.skip(f"the split has fewer than {batch_size} samples")
    run_serving(benchmark, lambda: itertools.islice(loader, n_batches), (n_batches, batch_size),
                point, 3,
                "jasper_inprocess", preset, mapped=mapped, workers=0,
                contender=f"jasper GPULoader on CPU ({'mmap' if mapped else 'preload'})")


# --- question 5: peers ------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", CFG.batch_sizes)
@pytest.mark.parametrize("point", POINTS, ids=[p.key for p in POINTS])
def test_peer_reference(benchmark, point, batch_size):
    """What the original system did: per-item ``__getitem__`` dicts + ``default_collate``."""
    path = ensure_dataset(point, base_preset(installed_presets()), CFG.seed)
    try:
        ds = C.reference_dataset(path)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    stream = stream_for(point, batch_size, CFG.samples(point, slow=True))
    loader = C.dataloader(ds, stream, 0, collate=None)
    _check_batch(next(iter(loader)), point, stream[0])
    run_serving(benchmark, lambda: loader, stream.shape, point, 5, "peer",
                contender="per-item reference + default_collate", peer="reference",
                path="preload")


PEERS = {"tensordict": C.TensorDictPeer, "hf_datasets": C.HFDatasetsPeer,
         "numpy_memmap": C.NumpyMemmapDataset, "safetensors": C.SafetensorsPeer,
         "lance": C.LancePeer, "mosaic": C.MosaicPeer}
#: peers timed on ``slow_bytes`` per round (they serve tens of thousands of samples/s or fewer)
SLOW_PEERS = {"hf_datasets", "tensordict", "lance", "mosaic"}


@pytest.mark.parametrize("batch_size", CFG.batch_sizes)
@pytest.mark.parametrize("peer", list(PEERS))
@pytest.mark.parametrize("point", POINTS, ids=[p.key for p in POINTS])
def test_peer_library(benchmark, point, peer, batch_size):
    path, arrays = arrays_of(point)
    try:
        fn = PEERS[peer](arrays, path.parent / "peers" / peer)
    except C.Unavailable as exc:
        pytest.skip(str(exc))
    samples = CFG.samples(point, slow=peer in SLOW_PEERS)
    stream = stream_for(point, batch_size, samples)
    if isinstance(fn, C.MosaicPeer):  # served in its own environment, the child reports batches
        try:
            fn.use_stream(stream)
            _check_batch(fn.first_batch(), point, stream[0])
            run_serving(benchmark, fn.passes, stream.shape, point, 5, "peer", contender=fn.name,
                        peer=peer, path=fn.path, **fn.built)
        finally:
            fn.close()
        return
    if hasattr(fn, "__getitems__"):  # a Dataset: served through a DataLoader, like jasper's
        loader = C.dataloader(fn, stream, 0)
        _check_batch(next(iter(loader)), point, stream[0])
        batches: Callable[[], Iterable[Any]] = lambda: loader  # noqa: E731
    else:
        _check_batch(fn(stream[0]), point, stream[0])
        batches = lambda: C.iterate_direct(fn, stream)  # noqa: E731
    run_serving(benchmark, batches, stream.shape, point, 5, "peer", contender=fn.name, peer=peer,
                path=fn.path)
