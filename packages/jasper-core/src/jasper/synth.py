"""Synthetic JASPER datasets that look like real ones.

- Clustered unit-norm embeddings: ``N_c`` random centroids; every question, source and keyword is
  its cluster's centroid plus Gaussian noise, normalised.
- Each pair joins a question with a source of the same cluster; relevance is the rescaled cosine
  similarity of the two; the pair's keyword ids are drawn from its cluster's keywords (CSR).
- Hard negatives are mined by similarity: for each pair, candidates from its own cluster, from the
  nearest ("adjacent") clusters and from anywhere are ranked by cosine similarity to the positive
  source (the positive itself excluded) and the top ``n_neg`` kept; their tiers 1..4 come from the
  similarity quartiles of all mined negatives (1 = most similar, the hardest), the four-tier
  scheme of the original system's miner.
- Steering: ``centroid`` is the pair's centroid, ``keyword_weighted`` the similarity-weighted mean
  of its keywords, ``residual`` the normalised part of the target not explained by the centroid;
  ``centroid_distances`` is the cosine distance of the question to its centroid.
- Disjoint train/val/test splits from one permutation.

Deterministic by seed: each chunk of pairs draws from its own generator keyed by (seed, chunk).
Pair arrays are produced in chunks; above ``memory_limit`` bytes they go to memory-mapped scratch
files, so 10^7 pairs at D=384 need only the tables and one chunk in RAM.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from jasper.location import Location

from jasper.backend import ArraySource, TensorSource
from jasper.dtypes import FLOAT_DTYPES, from_storage, torch_dtype
from jasper.manifest import Manifest
from jasper.progress import count_bar
from jasper.schema import PAIR_ARRAYS

#: The step curriculum ``jasper synth`` writes explicitly (DATA_MODEL.md section 4).
DEFAULT_STEP_SCHEDULE: list[dict[str, Any]] = [
    {"start_epoch": 0, "probs": [0.7, 0.2, 0.1, 0.0]},
    {"start_epoch": 10, "probs": [0.5, 0.3, 0.15, 0.05]},
    {"start_epoch": 20, "probs": [0.3, 0.3, 0.25, 0.15]},
    {"start_epoch": 30, "probs": [0.1, 0.3, 0.35, 0.25]},
    {"start_epoch": 40, "probs": [0.0, 0.2, 0.4, 0.4]},
]


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of a synthetic dataset. Table sizes default to fractions of ``n_pairs``."""

    n_pairs: int = 20_000
    embedding_dim: int = 384
    n_neg: int = 8
    n_clusters: int = 16
    n_questions: int | None = None
    n_sources: int | None = None
    n_keywords: int | None = None
    max_keywords_per_pair: int = 5
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    dtype: str = "float32"
    noise: float = 0.6
    seed: int = 0
    dataset_name: str = "synthetic"

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.embedding_dim < 1 or self.n_neg < 1 or self.n_clusters < 1:
            raise ValueError("n_pairs, embedding_dim, n_neg and n_clusters must be positive")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype!r}")
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) < 0:
            raise ValueError(f"split_ratios must be non-negative and sum to 1: {self.split_ratios}")

    # Tables default to a quarter of the pairs, capped at 10^6 rows, so that 10^7 pairs at D=384
    # need about 3 GB of tables in RAM while the pair arrays stream through scratch files.
    @property
    def questions(self) -> int:
        return self.n_questions or max(self.n_clusters, min(self.n_pairs // 4, 1_000_000))

    @property
    def sources(self) -> int:
        n = self.n_sources or max(2 * self.n_clusters, min(self.n_pairs // 4, 1_000_000))
        return max(n, self.n_neg + 2)

    @property
    def keywords(self) -> int:
        return self.n_keywords or max(self.n_clusters, min(4096, self.n_pairs // 50))

    def pair_bytes(self) -> int:
        d = self.embedding_dim
        return self.n_pairs * (3 * d * torch_dtype(self.dtype).itemsize + 16 * self.n_neg + 40)


def _normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    np.maximum(n, 1e-12, out=n)
    return x / n


def _cluster_members(assign: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by cluster: (rows sorted by cluster, offsets [n_clusters + 1])."""
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=n_clusters)
    offsets = np.zeros(n_clusters + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets


def _pick(rng: np.random.Generator, members: np.ndarray, offsets: np.ndarray,
          clusters: np.ndarray) -> np.ndarray:
    """One random member of each given cluster (vectorised)."""
    lo, hi = offsets[clusters], offsets[clusters + 1]
    return members[lo + (rng.random(clusters.shape) * (hi - lo)).astype(np.int64)]


class _Tables:
    """Centroids, questions, sources and keywords, with cluster memberships."""

    def __init__(self, cfg: SynthConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 0])
        d, c = cfg.embedding_dim, cfg.n_clusters
        self.centroids = _normalize(rng.standard_normal((c, d), dtype=np.float32))
        sigma = np.float32(cfg.noise / np.sqrt(d))

        def members(n: int) -> np.ndarray:
            # every cluster gets at least one member, the rest at random
            a = rng.integers(0, c, size=n)
            a[: min(n, c)] = np.arange(min(n, c))
            return a

        def around(assign: np.ndarray) -> np.ndarray:
            out = np.empty((assign.shape[0], d), dtype=np.float32)
            step = 1 << 16
            for i in range(0, assign.shape[0], step):
                a = assign[i : i + step]
                noise = rng.standard_normal((a.shape[0], d), dtype=np.float32) * sigma
                out[i : i + step] = _normalize(self.centroids[a] + noise)
            return out

        self.q_cluster = members(cfg.questions)
        self.s_cluster = members(cfg.sources)
        self.k_cluster = members(cfg.keywords)
        self.questions = around(self.q_cluster)
        self.sources = around(self.s_cluster)
        self.keywords = around(self.k_cluster)
        self.s_members, self.s_offsets = _cluster_members(self.s_cluster, c)
        self.k_members, self.k_offsets = _cluster_members(self.k_cluster, c)
        # the nearest other clusters, for "adjacent" negatives
        sim = self.centroids @ self.centroids.T
        np.fill_diagonal(sim, -np.inf)
        self.adjacent = np.argsort(-sim, axis=1)[:, : max(1, min(3, c - 1))] if c > 1 else np.zeros((1, 1), np.int64)


class _PairGenerator:
    """Generates every pair-level array chunk by chunk into ``out`` (arrays or memmaps)."""

    CHUNK = 4096  # pairs; bounds the candidate tensor of negative mining to ~100 MB at D=384

    def __init__(self, cfg: SynthConfig, tables: _Tables) -> None:
        self.cfg = cfg
        self.t = tables
        rng = np.random.default_rng([cfg.seed, 1])
        counts = rng.integers(1, cfg.max_keywords_per_pair + 1, size=cfg.n_pairs)
        self.offsets = np.zeros(cfg.n_pairs + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])

    def fill(self, out: dict[str, np.ndarray], progress: bool | None) -> None:
        cfg = self.cfg
        n = cfg.n_pairs
        sims = np.empty((n, cfg.n_neg), dtype=np.float32)
        with count_bar(n, "synthesising pairs", progress, unit="pair") as update:
            for ci, start in enumerate(range(0, n, self.CHUNK)):
                stop = min(n, start + self.CHUNK)
                self._chunk(ci, start, stop, out, sims)
                update(stop - start)
        # tiers from the similarity quartiles of every mined negative (1 = hardest)
        qs = np.quantile(sims.reshape(-1)[:: max(1, sims.size // 1_000_000)], [0.75, 0.5, 0.25])
        tiers = out["negative_tiers"]
        for start in range(0, n, 1 << 16):
            s = sims[start : start + (1 << 16)]
            tiers[start : start + (1 << 16)] = 1 + (s < qs[0]) + (s < qs[1]) + (s < qs[2])

    def _chunk(self, ci: int, start: int, stop: int, out: dict[str, np.ndarray],
               sims: np.ndarray) -> None:
        cfg, t = self.cfg, self.t
        rng = np.random.default_rng([cfg.seed, 2, ci])
        b = stop - start
        q = rng.integers(0, t.questions.shape[0], size=b)
        cluster = t.q_cluster[q]
        s = _pick(rng, t.s_members, t.s_offsets, cluster)
        qe, se, ce = t.questions[q], t.sources[s], t.centroids[cluster]
        out["pair_index"][start:stop, 0] = q
        out["pair_index"][start:stop, 1] = s
        out["pair_cluster_id"][start:stop] = cluster
        cos_qs = np.einsum("bd,bd->b", qe, se)
        out["pair_relevance"][start:stop] = np.clip((cos_qs + 1.0) / 2.0, 0.0, 1.0)
        out["centroid_distances"][start:stop] = np.clip(1.0 - np.einsum("bd,bd->b", qe, ce), 0.0, 2.0)

        # keywords of the pair's cluster, weighted by similarity to the question
        lo, hi = self.offsets[start], self.offsets[stop]
        counts = np.diff(self.offsets[start : stop + 1])
        owner = np.repeat(np.arange(b), counts)
        kw = _pick(rng, t.k_members, t.k_offsets, cluster[owner])
        out["pair_keyword_ids"][lo:hi] = kw
        w = np.exp(4.0 * np.einsum("nd,nd->n", t.keywords[kw], qe[owner])).astype(np.float32)
        acc = np.zeros((b, cfg.embedding_dim), dtype=np.float32)
        np.add.at(acc, owner, t.keywords[kw] * w[:, None])
        out["steering_keyword_weighted"][start:stop] = self._cast(_normalize(acc))
        out["steering_centroid"][start:stop] = self._cast(ce)
        resid = se - np.einsum("bd,bd->b", se, ce)[:, None] * ce
        out["steering_residual"][start:stop] = self._cast(_normalize(resid))

        # hard negatives: same-cluster, adjacent-cluster and random candidates ranked by similarity
        n_cand = 4 * cfg.n_neg
        n_same, n_adj = n_cand // 2, n_cand // 4
        cand = np.empty((b, n_cand), dtype=np.int64)
        cand[:, :n_same] = _pick(rng, t.s_members, t.s_offsets, np.repeat(cluster, n_same)).reshape(b, n_same)
        adj = t.adjacent[cluster][np.arange(b)[:, None], rng.integers(0, t.adjacent.shape[1], (b, n_adj))]
        cand[:, n_same : n_same + n_adj] = _pick(rng, t.s_members, t.s_offsets, adj.reshape(-1)).reshape(b, n_adj)
        cand[:, n_same + n_adj :] = rng.integers(0, t.sources.shape[0], (b, n_cand - n_same - n_adj))
        # a candidate equal to the positive is replaced by a random other source
        clash = cand == s[:, None]
        while clash.any():
            cand[clash] = rng.integers(0, t.sources.shape[0], int(clash.sum()))
            clash = cand == s[:, None]
        sim = np.einsum("bkd,bd->bk", t.sources[cand], se)
        # duplicate candidates must not be picked twice: push repeats to the bottom
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_c = np.take_along_axis(cand, order, axis=1)
        dup = np.zeros_like(clash)
        dup[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
        np.put_along_axis(sim, order, np.where(dup, -np.inf, np.take_along_axis(sim, order, axis=1)), axis=1)
        top = np.argsort(-sim, axis=1, kind="stable")[:, : cfg.n_neg]
        out["hard_negatives"][start:stop] = np.take_along_axis(cand, top, axis=1)
        picked = np.take_along_axis(sim, top, axis=1)
        sims[start:stop] = np.where(np.isfinite(picked), picked, -1.0)

    def _cast(self, x: np.ndarray) -> np.ndarray:
        if self.cfg.dtype == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return x.astype(np.dtype(self.cfg.dtype), copy=False)


def _split_indices(cfg: SynthConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 3])
    perm = rng.permutation(cfg.n_pairs).astype(np.int64)
    n_train = round(cfg.split_ratios[0] * cfg.n_pairs)
    n_val = round(cfg.split_ratios[1] * cfg.n_pairs)
    n_val = min(n_val, cfg.n_pairs - n_train)
    return {
        "train_idx": np.sort(perm[:n_train]),
        "val_idx": np.sort(perm[n_train : n_train + n_val]),
        "test_idx": np.sort(perm[n_train + n_val :]),
    }


class _NumpySource(ArraySource):
    """A numpy array (or memmap) in storage dtype, streamed as tensors of the logical dtype."""

    def __init__(self, array: np.ndarray, logical: str) -> None:
        self.array = array
        self.logical = logical
        self.shape = tuple(array.shape)
        self.dtype = torch_dtype(logical)

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        n = self.shape[0]
        if n == 0:
            yield from_storage(np.ascontiguousarray(self.array), self.logical)
            return
        for i in range(0, n, rows_per_chunk):
            yield from_storage(np.array(self.array[i : i + rows_per_chunk]), self.logical)


def synthesize(
    cfg: SynthConfig | None = None,
    *,
    workdir: str | Path | None = None,
    memory_limit: int = 1 << 30,
    progress: bool | None = None,
) -> tuple[dict[str, ArraySource], Manifest]:
    """Generate a dataset: ``(arrays, manifest)`` ready for :func:`jasper.write_store`.

    Pair arrays larger than ``memory_limit`` bytes in total are generated into memory-mapped
    scratch files under ``workdir`` (a temporary directory when not given; the caller removes it
    after writing, or uses :func:`write_synthetic`, which does).
    """
    cfg = cfg or SynthConfig()
    tables = _Tables(cfg)
    gen = _PairGenerator(cfg, tables)
    n, d, k = cfg.n_pairs, cfg.embedding_dim, cfg.n_neg
    nnz = int(gen.offsets[-1])
    storage_float = np.dtype("uint16") if cfg.dtype == "bfloat16" else np.dtype(cfg.dtype)
    layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "pair_index": ((n, 2), np.dtype(np.int64)),
        "pair_cluster_id": ((n,), np.dtype(np.int64)),
        "pair_relevance": ((n,), np.dtype(np.float32)),
        "pair_keyword_ids": ((nnz,), np.dtype(np.int64)),
        "hard_negatives": ((n, k), np.dtype(np.int64)),
        "negative_tiers": ((n, k), np.dtype(np.int64)),
        "steering_centroid": ((n, d), storage_float),
        "steering_keyword_weighted": ((n, d), storage_float),
        "steering_residual": ((n, d), storage_float),
        "centroid_distances": ((n,), np.dtype(np.float32)),
    }
    assert set(layout) | {"pair_keyword_ids"} >= set(PAIR_ARRAYS)
    out: dict[str, np.ndarray] = {}
    if cfg.pair_bytes() > memory_limit:
        scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="jasper-synth-"))
        scratch.mkdir(parents=True, exist_ok=True)
        for name, (shape, dt) in layout.items():
            out[name] = np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=dt,
                                                  shape=shape)
    else:
        out = {name: np.empty(shape, dtype=dt) for name, (shape, dt) in layout.items()}
    gen.fill(out, progress)

    def table(x: np.ndarray) -> ArraySource:
        return TensorSource(torch.from_numpy(x).to(torch_dtype(cfg.dtype)))

    arrays: dict[str, ArraySource] = {
        "question_embs": table(tables.questions),
        "source_embs": table(tables.sources),
        "keyword_embs": table(tables.keywords),
        "centroid_embs": table(tables.centroids),
        "pair_keyword_offsets": TensorSource(torch.from_numpy(gen.offsets)),
    }
    for name, arr in out.items():
        logical = cfg.dtype if name.startswith("steering_") else str(arr.dtype)
        arrays[name] = _NumpySource(arr, logical)
    for name, idx in _split_indices(cfg).items():
        arrays[name] = TensorSource(torch.from_numpy(idx))
    manifest = Manifest(
        embedding_dim=d,
        n_neg=k,
        n_clusters=cfg.n_clusters,
        dataset_name=cfg.dataset_name,
        split_sizes={s: int(arrays[f"{s}_idx"].shape[0]) for s in ("train", "val", "test")},
        steering_probabilities={"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25},
        steering_schedule=[dict(x) for x in DEFAULT_STEP_SCHEDULE],
        random_seed=cfg.seed,
        n_tiers=4,
        extra={"synth": {k_: (list(v) if isinstance(v, tuple) else v)
                         for k_, v in asdict(cfg).items()}},
    )
    return arrays, manifest


def write_synthetic(
    path: str | Path | Location,
    cfg: SynthConfig | None = None,
    *,
    backend: str = "pt",
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Path:
    """Generate a dataset with :func:`synthesize` and write it atomically with ``backend``."""
    from jasper.location import as_target
    from jasper.store import write_store

    target = as_target(path)
    if isinstance(target, Path):
        target = target.absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch_dir: Path | None = target.parent
    else:
        scratch_dir = None  # an object-store URL: scratch space in the system temp directory
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.synth-", dir=scratch_dir))
    try:
        arrays, manifest = synthesize(cfg, workdir=scratch, progress=progress)
        return write_store(target, arrays, manifest, backend=backend, overwrite=overwrite,
                           progress=progress, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
