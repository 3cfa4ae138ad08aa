"""What the kit's test mixins (dataset-level, derived steering, compact indices) need from
:class:`~jasper.testing.conformance.BackendConformance`, declared once: its hooks, and the small
synthetic dataset several mixins build their stored-vs-variant twins from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from jasper.backend import BackendEntrypoint, Capabilities
from jasper.manifest import Manifest


class KitHooks:
    """The hooks every kit mixin calls; :class:`~jasper.testing.BackendConformance` (or
    :class:`~jasper.testing.RemoteDatasetConformance`) provides them."""

    #: options for every write of the kit
    write_options: ClassVar[dict[str, Any]] = {}
    #: the width of the kit's embeddings
    embedding_dim: ClassVar[int] = 8

    def caps(self, backend: BackendEntrypoint) -> Capabilities:  # pragma: no cover
        raise NotImplementedError

    def require_write(self, backend: BackendEntrypoint) -> None:  # pragma: no cover
        raise NotImplementedError

    def write_dataset(self, backend: BackendEntrypoint, path: Path, arrays: dict[str, Any],
                      manifest: Manifest, **options: Any) -> Path:  # pragma: no cover
        raise NotImplementedError

    def synth_twin(self, n_pairs: int, seed: int, **options: Any
                   ) -> tuple[dict[str, torch.Tensor], Manifest]:
        """A small synthetic dataset in memory (4 clusters, 12 keywords, n_neg=3), built with
        ``options`` of :class:`~jasper.synth.SynthConfig`: the same ``seed`` with and without an
        option gives the twins a mixin compares."""
        from jasper.synth import SynthConfig, synthesize

        cfg = SynthConfig(n_pairs=n_pairs, embedding_dim=self.embedding_dim, n_clusters=4,
                          n_keywords=12, n_neg=3, seed=seed, **options)
        sources, manifest = synthesize(cfg)
        return {n: s.materialize().clone() for n, s in sources.items()}, manifest


__all__ = ["KitHooks"]
