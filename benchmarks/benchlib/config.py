"""The benchmark grid for each mode, passed from ``run.py`` to the pytest session by environment.

Modes:

- ``default``: one grid point (D=384, n_neg=8, float32) at 10^5 pairs, so the whole suite fits in
  10 minutes on 2 CPU cores (a tenth of the issue's 10^6 pairs; the report says so).
- ``full``: the issue's grid, D in {384, 1024} x n_neg in {8, 32} x {float32, bfloat16}, 10^6 pairs.
- ``smoke``: a tiny dataset and one round of everything, so CI notices a broken benchmark.
- ``gpu``: the GPU part at 10^6 pairs (``--gpu-only``), for ``gpu.sh``.

Every backend's every write preset is measured at the first ("base") grid point; the other grid
points use each backend's first preset, which keeps the disk needed by ``--full`` bounded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV_CONFIG = "JASPER_BENCH_CONFIG"
ENV_CACHE = "JASPER_BENCH_CACHE"
BENCH_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = BENCH_DIR / ".cache"


@dataclass(frozen=True)
class GridPoint:
    """One dataset shape of the grid."""

    n_pairs: int
    embedding_dim: int
    n_neg: int
    dtype: str

    @property
    def key(self) -> str:
        return f"p{self.n_pairs}-d{self.embedding_dim}-n{self.n_neg}-{self.dtype}"

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one served sample (``jasper.schema.bytes_per_sample``'s formula)."""
        itemsize = 4 if self.dtype == "float32" else 8 if self.dtype == "float64" else 2
        return itemsize * self.embedding_dim * (3 + self.n_neg) + 8 * self.n_neg + 24

    @property
    def label(self) -> str:
        dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(self.dtype, self.dtype)
        return f"D={self.embedding_dim} n_neg={self.n_neg} {dt} {self.n_pairs:,} pairs"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark module needs to know about the run's scale."""

    mode: str = "default"
    grid: tuple[GridPoint, ...] = (GridPoint(100_000, 384, 8, "float32"),)
    batch_sizes: tuple[int, ...] = (256, 1024, 4096)
    worker_counts: tuple[int, ...] = (0, 2)
    #: timed rounds per measurement (pytest-benchmark ``pedantic`` rounds)
    rounds: int = 3
    #: bytes of batches served per timed round by the fast contenders (so rounds stay the same
    #: length across the grid); the slow ones (per-item reference, peers) serve ``slow_bytes``
    round_bytes: int = 512 << 20
    slow_bytes: int = 128 << 20
    #: rounds of each open / preload measurement (cold and warm)
    open_rounds: int = 2
    seed: int = 0
    #: the statistic of the timed rounds the report shows: ``min`` (the best round, the least
    #: disturbed by other processes on a shared machine) or ``median``
    stat: str = "min"
    #: memory probes for every backend (else only the base backend's, to keep smoke runs short)
    memory_all_backends: bool = True
    #: GPU preload and GPU loader for every backend (else only the base backend's)
    gpu_all_backends: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def samples(self, point: GridPoint, slow: bool = False) -> int:
        """Samples per timed round at ``point``."""
        return max(1, (self.slow_bytes if slow else self.round_bytes) // point.bytes_per_sample)

    @property
    def base(self) -> GridPoint:
        return self.grid[0]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchConfig:
        raw = json.loads(text)
        raw["grid"] = tuple(GridPoint(**g) for g in raw["grid"])
        for k in ("batch_sizes", "worker_counts", "notes"):
            raw[k] = tuple(raw[k])
        return cls(**raw)


def full_grid(n_pairs: int) -> tuple[GridPoint, ...]:
    return tuple(
        GridPoint(n_pairs, d, k, dt)
        for dt in ("float32", "bfloat16")
        for d in (384, 1024)
        for k in (8, 32)
    )


def make_config(mode: str, n_pairs: int | None = None) -> BenchConfig:
    """The configuration of ``mode`` (``default``, ``full``, ``smoke`` or ``gpu``)."""
    if mode == "default":
        n = n_pairs or 100_000
        return BenchConfig(
            mode=mode,
            grid=(GridPoint(n, 384, 8, "float32"),),
            notes=(f"Default scale: {n:,} pairs (the issue's grid uses 10^6; run with --full), "
                   "one grid point, so that the suite finishes in under 10 minutes on 2 cores.",),
        )
    if mode == "full":
        n = n_pairs or 1_000_000
        return BenchConfig(mode=mode, grid=full_grid(n), rounds=5, round_bytes=2 << 30,
                           slow_bytes=256 << 20, open_rounds=3)
    if mode == "smoke":
        n = n_pairs or 600
        return BenchConfig(
            mode=mode, grid=(GridPoint(n, 32, 4, "float32"),), batch_sizes=(64, 256),
            rounds=1, round_bytes=512 << 10, slow_bytes=128 << 10, open_rounds=1,
            memory_all_backends=False, gpu_all_backends=False,
            notes=("Smoke mode: a tiny dataset and one round; the numbers mean nothing.",),
        )
    if mode == "gpu":
        n = n_pairs or 1_000_000
        return BenchConfig(
            mode=mode, grid=(GridPoint(n, 384, 8, "float32"),), rounds=5,
            round_bytes=16 << 30, slow_bytes=64 << 20, open_rounds=2, gpu_all_backends=False,
            notes=(f"GPU part only, {n:,} pairs, the base backend's dataset (the issue's scale "
                   "for the GPU loader target; sized for under 8 minutes).",))
    raise ValueError(f"unknown benchmark mode {mode!r}")


def load_config() -> BenchConfig:
    """The configuration ``run.py`` exported, else the default mode."""
    text = os.environ.get(ENV_CONFIG)
    return BenchConfig.from_json(text) if text else make_config("default")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE)
