"""Helpers shared by jasper-hdf5's tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import torch

from jasper.manifest import Manifest
from jasper.synth import SynthConfig, synthesize

SMALL = SynthConfig(n_pairs=600, embedding_dim=24, n_neg=4, n_clusters=6, seed=3)


def synth_tensors(cfg: SynthConfig = SMALL) -> tuple[dict[str, torch.Tensor], Manifest]:
    """A synthetic dataset as in-memory tensors and its manifest."""
    sources, manifest = synthesize(cfg)
    return {n: s.materialize().clone() for n, s in sources.items()}, manifest


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits of ``t`` (so the comparison is bit-exact: -0.0 != 0.0, NaN == NaN)."""
    t = t.contiguous()
    if t.dtype.is_floating_point:
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(bits(actual), bits(expected)), f"{what}: values differ"
