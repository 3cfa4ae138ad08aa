"""A per-item reference dataset: what the original system computed, item by item.

:class:`ReferenceSteeringDataset` follows the original ``JASPERSteeringDataset.__getitem__`` step
by step (resolve the split position to a pair, look up question, target, steering, negatives and
scalars with Python-level indexing, return one dict per item), to be used with
``default_collate``. It serves two purposes:

- parity tests: for the same dataset and forced steering, jasper's batches must equal these
  value for value (the original returned scalars and tiers in their stored dtypes and a zero
  steering vector in the question's dtype; jasper's documented dtypes are int64 tiers and float32
  relevance and distance, so tests compare after casting);
- the benchmark's baseline "(a)": per-item ``__getitem__`` + ``default_collate``.

The unforced variant uses jasper's deterministic draw one item at a time (the original drew from
a per-dataset numpy generator, which no two runs with workers could reproduce).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from jasper.curriculum import VARIANT_NAMES, curriculum_from_manifest, draw_variants, variant_id
from jasper.schema import split_array
from jasper.store import open_store


class ReferenceSteeringDataset(Dataset[dict[str, Any]]):
    """Per-item reference of a dataset split, preloaded from any backend.

    ``forced`` pins a variant (name, alias or id); otherwise each item's variant is drawn with
    :func:`jasper.curriculum.draw_variants` for ``(seed, epoch, pair id)``.
    """

    question_embs: torch.Tensor
    source_embs: torch.Tensor
    pair_index: torch.Tensor
    pair_cluster_id: torch.Tensor
    pair_relevance: torch.Tensor
    hard_negatives: torch.Tensor
    negative_tiers: torch.Tensor
    steering_centroid: torch.Tensor
    steering_keyword_weighted: torch.Tensor
    steering_residual: torch.Tensor
    centroid_distances: torch.Tensor

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        *,
        epoch: int = 0,
        seed: int | None = None,
        forced: str | int | None = None,
        storage_format: str = "auto",
    ) -> None:
        with open_store(dataset_dir, storage_format) as reader:
            self.manifest = reader.manifest
            names = (
                "question_embs", "source_embs", "pair_index", "pair_cluster_id",
                "pair_relevance", "hard_negatives", "negative_tiers", "steering_centroid",
                "steering_keyword_weighted", "steering_residual", "centroid_distances",
            )
            for name in names:
                setattr(self, name, reader.read(name))
            self.split_indices = reader.read(split_array(split))
        self.embedding_dim = int(self.manifest.embedding_dim)
        self.curriculum = curriculum_from_manifest(self.manifest)
        self.seed = int(seed if seed is not None else (self.manifest.random_seed or 0))
        self.epoch = epoch
        self.forced = None if forced is None else VARIANT_NAMES[variant_id(forced)]
        self._drawn: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.split_indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def variant_of(self, pair_idx: int) -> str:
        if self.forced is not None:
            return self.forced
        # The original drew one numpy choice per item (a few microseconds); the deterministic
        # draw is cheapest for a whole epoch at once, so it is computed once per epoch and
        # looked up per item, keeping the per-item cost comparable to the original's.
        if self._drawn is None or self._drawn[0] != self.epoch:
            pairs = torch.arange(self.pair_index.shape[0])
            self._drawn = (self.epoch, draw_variants(pairs, self.epoch, self.seed,
                                                     self.curriculum).tolist())
        return VARIANT_NAMES[self._drawn[1][pair_idx]]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < len(self.split_indices):
            raise IndexError(f"Index {idx} out of range [0, {len(self.split_indices)})")
        pair_idx = int(self.split_indices[idx])
        q_idx = int(self.pair_index[pair_idx, 0])
        s_idx = int(self.pair_index[pair_idx, 1])
        question_emb = self.question_embs[q_idx]
        target_source_emb = self.source_embs[s_idx]
        variant = self.variant_of(pair_idx)
        if variant == "zero":
            steering = torch.zeros(self.embedding_dim, dtype=question_emb.dtype)
        elif variant == "centroid":
            steering = self.steering_centroid[pair_idx]
        elif variant == "keyword":
            steering = self.steering_keyword_weighted[pair_idx]
        else:
            steering = self.steering_residual[pair_idx]
        negative_embs = self.source_embs[self.hard_negatives[pair_idx]]
        return {
            "question_emb": question_emb,
            "target_source_emb": target_source_emb,
            "steering": steering,
            "negative_embs": negative_embs,
            "cluster_id": self.pair_cluster_id[pair_idx],
            "relevance": self.pair_relevance[pair_idx],
            "centroid_distance": self.centroid_distances[pair_idx],
            "steering_variant": torch.tensor(VARIANT_NAMES.index(variant), dtype=torch.long),
            "negative_tiers": self.negative_tiers[pair_idx],
        }


__all__ = ["ReferenceSteeringDataset"]
