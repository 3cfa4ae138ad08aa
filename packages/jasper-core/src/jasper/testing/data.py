"""Tiny datasets for tests: one in memory (:func:`make_arrays`) and one on disk exactly as the
original system wrote it (:func:`write_seed_dataset`).

Nothing here imports pytest, so parity tests and benchmarks can use these functions too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from jasper.dtypes import FLOAT_DTYPES, torch_dtype
from jasper.manifest import MANIFEST_NAME, Manifest
from jasper.schema import ARRAYS, INT_LABEL

#: The keys of ``config.json`` that the original system's README documents
#: (docs/data-model.md#the-manifest-configjson).
SEED_CONFIG_KEYS: tuple[str, ...] = (
    "embedding_dim",
    "n_neg",
    "n_clusters",
    "dataset_name",
    "created_at",
    "split_sizes",
    "steering_probabilities",
    "curriculum",
)

#: The linear curriculum the original README shows; its builder always wrote one.
SEED_CURRICULUM: dict[str, Any] = {
    "zero_prob_start": 0.5,
    "zero_prob_end": 0.1,
    "epochs_total": 100,
}


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    """Finite values that a lossy or value-converting storage path would change: negative zero,
    the smallest subnormal, the largest finite magnitude and a value with a full mantissa."""
    fi = torch.finfo(dtype)
    vals = torch.tensor([-0.0, fi.max, -fi.max, fi.tiny, 1.0 / 3.0], dtype=dtype)
    # the smallest positive subnormal: the bit pattern 0...01 of the same width
    same_width = {16: torch.int16, 32: torch.int32, 64: torch.int64}[fi.bits]
    sub = torch.ones(1, dtype=same_width).view(dtype)
    return torch.cat([vals, sub])


def make_arrays(
    n_pairs: int = 64,
    embedding_dim: int = 16,
    *,
    n_neg: int = 4,
    n_clusters: int = 4,
    n_questions: int | None = None,
    n_sources: int | None = None,
    n_keywords: int | None = None,
    dtype: str = "float32",
    tier_dtype: str = "int64",
    empty_val: bool = False,
    zero_keyword_every: int = 5,
    special_values: bool = False,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], Manifest]:
    """A tiny valid dataset in memory: every array of :data:`jasper.schema.ARRAYS` and its
    manifest, deterministic by ``seed`` (the same arguments always give identical tensors).

    - ``dtype`` is the float dtype of the embedding tables and steering arrays (float32, float16,
      bfloat16, float64); ``tier_dtype`` the integer dtype of ``negative_tiers`` (int64, int8...).
    - Keyword ids are CSR; pair 0, the last pair and every ``zero_keyword_every``-th pair have no
      keywords (0 disables the periodic ones), so empty rows at both ends are exercised.
    - Splits are disjoint and in shuffled order (not sorted), so order bugs show; with
      ``empty_val`` the validation split is empty.
    - ``special_values`` writes negative zero, subnormals and the largest finite values into
      ``question_embs`` row 0 (when ``embedding_dim >= 6``), so any value conversion on the way
      to disk and back breaks bit-exactness.

    Every value rule of the data model holds, so opening the dataset raises no data-quality
    warning.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    if tier_dtype not in INT_LABEL:
        raise ValueError(f"tier_dtype must be one of {sorted(INT_LABEL)}, got {tier_dtype!r}")
    if n_pairs < 1 or embedding_dim < 1 or n_neg < 1 or n_clusters < 1:
        raise ValueError("n_pairs, embedding_dim, n_neg and n_clusters must be positive")
    g = torch.Generator().manual_seed(seed)
    fdt = torch_dtype(dtype)
    n_q = n_questions or max(4, n_pairs // 2)
    n_s = max(n_sources or max(4, n_pairs // 2), 2)
    n_k = n_keywords or max(4, n_pairs // 4)
    d = embedding_dim

    def table(rows: int) -> torch.Tensor:
        x = torch.randn(rows, d, generator=g, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x.to(fdt)

    arrays: dict[str, torch.Tensor] = {
        "question_embs": table(n_q),
        "source_embs": table(n_s),
        "keyword_embs": table(n_k),
        "centroid_embs": table(n_clusters),
    }
    if special_values and d >= 6:
        arrays["question_embs"][0, :6] = _special_values(fdt)

    q = torch.randint(0, n_q, (n_pairs,), generator=g)
    s = torch.randint(0, n_s, (n_pairs,), generator=g)
    arrays["pair_index"] = torch.stack([q, s], dim=1)
    arrays["pair_cluster_id"] = torch.randint(0, n_clusters, (n_pairs,), generator=g)
    arrays["pair_relevance"] = torch.rand(n_pairs, generator=g, dtype=torch.float32)

    counts = torch.randint(1, 4, (n_pairs,), generator=g)
    if zero_keyword_every > 0:
        counts[::zero_keyword_every] = 0
    counts[0] = 0
    counts[-1] = 0
    offsets = torch.zeros(n_pairs + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    arrays["pair_keyword_offsets"] = offsets
    arrays["pair_keyword_ids"] = torch.randint(0, n_k, (int(offsets[-1]),), generator=g)

    # negatives never equal the pair's own source: draw from N_s - 1 rows and skip over it
    neg = torch.randint(0, n_s - 1, (n_pairs, n_neg), generator=g)
    neg = neg + (neg >= s[:, None]).to(torch.int64)
    arrays["hard_negatives"] = neg
    arrays["negative_tiers"] = torch.randint(1, 5, (n_pairs, n_neg), generator=g).to(
        torch_dtype(tier_dtype)
    )
    for name in ("steering_centroid", "steering_keyword_weighted", "steering_residual"):
        arrays[name] = torch.randn(n_pairs, d, generator=g, dtype=torch.float64).to(fdt)
    arrays["centroid_distances"] = torch.rand(n_pairs, generator=g, dtype=torch.float32) * 2

    perm = torch.randperm(n_pairs, generator=g)
    n_train = max(1, (n_pairs * 7) // 10)
    n_val = 0 if empty_val else (n_pairs - n_train) // 2
    arrays["train_idx"] = perm[:n_train].clone()
    arrays["val_idx"] = perm[n_train : n_train + n_val].clone()
    arrays["test_idx"] = perm[n_train + n_val :].clone()

    assert set(arrays) == set(ARRAYS)
    arrays = {name: arrays[name].contiguous() for name in ARRAYS}
    manifest = Manifest(
        embedding_dim=d,
        n_neg=n_neg,
        n_clusters=n_clusters,
        dataset_name=f"jasper-testing-{seed}",
        split_sizes={sp: int(arrays[f"{sp}_idx"].shape[0]) for sp in ("train", "val", "test")},
        steering_probabilities={"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25},
        n_tiers=4,
        random_seed=seed,
    )
    return arrays, manifest


def csr_to_lists(offsets: torch.Tensor, values: torch.Tensor) -> list[list[int]]:
    """CSR keyword ids as the original system's list of lists of Python ints."""
    flat = values.tolist()
    bounds = offsets.tolist()
    return [flat[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def write_seed_dataset(
    path: str | Path,
    arrays: Mapping[str, torch.Tensor] | None = None,
    manifest: Manifest | None = None,
    *,
    curriculum: Mapping[str, Any] | None = SEED_CURRICULUM,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    **make_kwargs: Any,
) -> Path:
    """Write a dataset directory exactly as the original system did, for parity tests.

    One ``<name>.pt`` per array saved with ``torch.save``; keyword ids as a Python list of lists
    in ``pair_keyword_ids.pt`` and no ``pair_keyword_offsets.pt``; ``config.json`` holding only
    the seed's keys (:data:`SEED_CONFIG_KEYS`, ``curriculum`` omitted when ``None``) plus
    ``extra_config`` (e.g. builder keys such as ``clustering_source``), no jasper keys.

    ``arrays`` and ``manifest`` default to :func:`make_arrays` called with ``make_kwargs``, so a
    test can rebuild the exact tensors with ``make_arrays(**same_kwargs)``. Returns the path.
    """
    if arrays is None:
        arrays, made = make_arrays(**make_kwargs)
        manifest = manifest or made
    elif make_kwargs:
        raise TypeError("pass either arrays or make_arrays keyword arguments, not both")
    if manifest is None:
        raise TypeError("a manifest is needed with explicit arrays")
    target = Path(path)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in ARRAYS:
        if name == "pair_keyword_offsets":
            continue
        if name == "pair_keyword_ids":
            obj: Any = csr_to_lists(arrays["pair_keyword_offsets"], arrays["pair_keyword_ids"])
        else:
            obj = arrays[name].contiguous().clone()
        torch.save(obj, target / f"{name}.pt")
    config: dict[str, Any] = {
        "embedding_dim": manifest.embedding_dim,
        "n_neg": manifest.n_neg,
        "n_clusters": manifest.n_clusters
        if manifest.n_clusters is not None
        else int(arrays["centroid_embs"].shape[0]),
        "dataset_name": manifest.dataset_name or "seed",
        "created_at": manifest.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "split_sizes": {sp: int(arrays[f"{sp}_idx"].shape[0]) for sp in ("train", "val", "test")},
        "steering_probabilities": dict(
            manifest.steering_probabilities
            or {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}
        ),
    }
    if curriculum is not None:
        config["curriculum"] = dict(curriculum)
    config.update(extra_config or {})
    (target / MANIFEST_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return target


__all__ = ["SEED_CONFIG_KEYS", "SEED_CURRICULUM", "csr_to_lists", "make_arrays",
           "write_seed_dataset"]
