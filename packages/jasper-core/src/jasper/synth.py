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

This module generates only the raw inputs (tables, clusters, pairs, keyword ids); everything
derived (relevance, negatives and tiers, steering, distances, splits by question) is
:func:`jasper.build.build_arrays`'s, the one pipeline that ``jasper build`` and the Chroma
builder use too.

Deterministic by seed: each chunk of pairs draws from its own generator keyed by (seed, chunk).
Pair arrays are produced in chunks; above ``memory_limit`` bytes they go to memory-mapped scratch
files, so 10^7 pairs at D=384 need only the tables and one chunk in RAM.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.atomic import allocate_file
from jasper.backend import ArraySource
from jasper.build import DEFAULT_STEP_SCHEDULE, BuildConfig, build_arrays
from jasper.dtypes import FLOAT_DTYPES, torch_dtype
from jasper.interrupts import holds_interrupts
from jasper.manifest import Manifest
from jasper.progress import count_bar

if TYPE_CHECKING:
    from jasper.location import Location

__all__ = ["DEFAULT_STEP_SCHEDULE", "SynthConfig", "synthesize", "write_synthetic"]


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
    #: Declare the steering derived instead of storing it (jasper.steering).
    derived_steering: bool = False
    #: With ``derived_steering``: the variants kept stored (``centroid``, ``keyword``,
    #: ``residual``; at most two), computed by the same kernel (jasper.build.BuildConfig).
    keep_steering: tuple[str, ...] = ()
    #: Store index arrays in the narrowest integer dtype (jasper.index_dtypes); False: int64.
    compact_indices: bool = True

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.embedding_dim < 1 or self.n_neg < 1 or self.n_clusters < 1:
            raise ValueError("n_pairs, embedding_dim, n_neg and n_clusters must be positive")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype!r}")
        # every cluster draws its questions, sources and keywords from its own members, so
        # each table needs at least one row per cluster (fewer indexed past a cluster's end)
        for name in ("n_questions", "n_sources", "n_keywords"):
            n = getattr(self, name)
            if n is not None and n < self.n_clusters:
                raise ValueError(f"{name}={n} is below n_clusters={self.n_clusters}: each "
                                 f"cluster needs at least one row of its own")
        if self.max_keywords_per_pair < 1:
            raise ValueError(f"max_keywords_per_pair must be at least 1 (every synthetic pair "
                             f"has keywords), got {self.max_keywords_per_pair}")
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) < 0:
            raise ValueError(f"split_ratios must be non-negative and sum to 1: {self.split_ratios}")
        if self.keep_steering:
            from jasper.steering import kept_variants

            if not self.derived_steering:
                raise ValueError("keep_steering names the steering variants a derived dataset "
                                 "keeps stored: it needs derived_steering=True")
            kept_variants(self.keep_steering)  # ValueError naming the bad value

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
        kept = len(self.keep_steering) if self.derived_steering else 3
        steering = kept * d * torch_dtype(self.dtype).itemsize
        return self.n_pairs * (steering + 16 * self.n_neg + 40)


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


class _RawPairs:
    """The raw pairs (question, source of the same cluster) and their keyword ids (CSR), chunk
    by chunk into ``out`` (arrays or memmaps)."""

    CHUNK = 4096

    def __init__(self, cfg: SynthConfig, tables: _Tables) -> None:
        self.cfg = cfg
        self.t = tables
        rng = np.random.default_rng([cfg.seed, 1])
        counts = rng.integers(1, cfg.max_keywords_per_pair + 1, size=cfg.n_pairs)
        self.offsets = np.zeros(cfg.n_pairs + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])

    def fill(self, out: dict[str, np.ndarray], progress: bool | None) -> None:
        n = self.cfg.n_pairs
        with count_bar(n, "synthesising pairs", progress, unit="pair") as update:
            for ci, start in enumerate(range(0, n, self.CHUNK)):
                stop = min(n, start + self.CHUNK)
                self._chunk(ci, start, stop, out)
                update(stop - start)

    def _chunk(self, ci: int, start: int, stop: int, out: dict[str, np.ndarray]) -> None:
        t = self.t
        rng = np.random.default_rng([self.cfg.seed, 2, ci])
        b = stop - start
        q = rng.integers(0, t.questions.shape[0], size=b)
        cluster = t.q_cluster[q]
        out["pair_index"][start:stop, 0] = q
        out["pair_index"][start:stop, 1] = _pick(rng, t.s_members, t.s_offsets, cluster)
        out["pair_cluster_id"][start:stop] = cluster
        lo, hi = self.offsets[start], self.offsets[stop]
        owner = np.repeat(np.arange(b), np.diff(self.offsets[start : stop + 1]))
        out["pair_keyword_ids"][lo:hi] = _pick(rng, t.k_members, t.k_offsets, cluster[owner])


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
    raw = _RawPairs(cfg, tables)
    n = cfg.n_pairs
    layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "pair_index": ((n, 2), np.dtype(np.int64)),
        "pair_cluster_id": ((n,), np.dtype(np.int64)),
        "pair_keyword_ids": ((int(raw.offsets[-1]),), np.dtype(np.int64)),
    }
    scratch: Path | None = None
    out: dict[str, np.ndarray]
    if cfg.pair_bytes() > memory_limit:
        scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="jasper-synth-"))
        scratch.mkdir(parents=True, exist_ok=True)
        out = {name: np.lib.format.open_memmap(scratch / f"raw_{name}.npy", mode="w+", dtype=dt,
                                               shape=shape)
               for name, (shape, dt) in layout.items()}
        for name in out:
            allocate_file(scratch / f"raw_{name}.npy")
    else:
        out = {name: np.empty(shape, dtype=dt) for name, (shape, dt) in layout.items()}
    raw.fill(out, progress)
    build_cfg = BuildConfig(n_neg=cfg.n_neg, split_ratios=cfg.split_ratios, dtype=cfg.dtype,
                            seed=cfg.seed, dataset_name=cfg.dataset_name,
                            memory_limit=memory_limit, derived_steering=cfg.derived_steering,
                            keep_steering=tuple(cfg.keep_steering),
                            compact_indices=cfg.compact_indices)
    arrays, manifest = build_arrays(
        tables.questions, tables.sources, out["pair_index"],
        cluster_ids=out["pair_cluster_id"], centroids=tables.centroids,
        source_clusters=tables.s_cluster, keywords=tables.keywords,
        pair_keywords=(raw.offsets, out["pair_keyword_ids"]), config=build_cfg,
        workdir=scratch, progress=progress,
        extra={"synth": {k_: (list(v) if isinstance(v, tuple) else v)
                         for k_, v in asdict(cfg).items()}},
    )
    manifest.extra.pop("build", None)  # everything but the raw pairs is derived, as always
    return arrays, manifest


@holds_interrupts
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
    from jasper.atomic import (
        SCRATCH_MARK,
        check_target,
        clean_leftovers,
        leftover_name,
        storage_error,
    )
    from jasper.location import as_target
    from jasper.store import write_store

    where = as_target(path)
    if isinstance(where, Path):
        target = where.absolute()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, target) from exc
        # Named for the target with this pid, so a killed synth's scratch (possibly hundreds of
        # MB) is removed by the next write to the target.
        clean_leftovers(target)
        check_target(target, overwrite=overwrite)  # refuse before minutes of synthesis, not after
        scratch = leftover_name(target, SCRATCH_MARK)
        try:
            scratch.mkdir()
        except OSError as exc:
            raise storage_error(exc, target) from exc
    else:
        # an object-store URL: scratch space in the system temp directory; the generation
        # commit refuses an existing dataset without overwrite
        scratch = Path(tempfile.mkdtemp(prefix=f".{where.name}.synth-"))
    try:
        try:
            arrays, manifest = synthesize(cfg, workdir=scratch, progress=progress)
        except OSError as exc:  # the memory-mapped scratch files: disk full, no permission
            raise storage_error(exc, target if isinstance(where, Path) else scratch) from exc
        return write_store(target if isinstance(where, Path) else where, arrays, manifest,
                           backend=backend, overwrite=overwrite, progress=progress, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
