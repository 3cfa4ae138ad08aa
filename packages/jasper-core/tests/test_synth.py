"""The synthetic generator: valid, realistic, deterministic, streaming."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jasper.manifest import checksum
from jasper.synth import SynthConfig, synthesize
from jasper.validation import check_arrays


def materialize(cfg: SynthConfig, **kw: object) -> tuple[dict[str, torch.Tensor], object]:
    sources, manifest = synthesize(cfg, **kw)  # type: ignore[arg-type]
    return {n: s.materialize().clone() for n, s in sources.items()}, manifest


@settings(max_examples=20, deadline=None)
@given(
    n_pairs=st.integers(1, 300),
    dim=st.integers(2, 24),
    n_neg=st.integers(1, 6),
    clusters=st.integers(1, 6),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**31),
)
# a corpus of 6 sources whose 16 candidate draws for one pair held only 3 distinct negatives:
# the repeat that was pushed to the bottom used to be picked anyway
@example(n_pairs=16, dim=2, n_neg=4, clusters=1, dtype="float32", seed=28660)
def test_every_configuration_is_valid(n_pairs: int, dim: int, n_neg: int, clusters: int,
                                      dtype: str, seed: int) -> None:
    cfg = SynthConfig(n_pairs=n_pairs, embedding_dim=dim, n_neg=n_neg, n_clusters=clusters,
                      dtype=dtype, seed=seed)
    arrays, manifest = materialize(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a data-quality finding
        assert check_arrays(arrays, manifest) == []  # type: ignore[arg-type]
    neg = arrays["hard_negatives"]
    assert not (neg == arrays["pair_index"][:, 1:]).any()
    # a pair's negatives are distinct sources
    s, _ = neg.sort(dim=1)
    assert not (s[:, 1:] == s[:, :-1]).any()
    assert set(arrays["negative_tiers"].unique().tolist()) <= {1, 2, 3, 4}
    assert arrays["steering_centroid"].dtype == getattr(torch, dtype)
    sizes = sum(arrays[f"{x}_idx"].numel() for x in ("train", "val", "test"))
    assert sizes == n_pairs


def test_realistic_structure() -> None:
    arrays, _ = materialize(SynthConfig(n_pairs=4000, embedding_dim=64, n_neg=8, n_clusters=8))
    q = arrays["question_embs"][arrays["pair_index"][:, 0]]
    s = arrays["source_embs"][arrays["pair_index"][:, 1]]
    neg = arrays["source_embs"][arrays["hard_negatives"]]
    pos_sim = (q * s).sum(-1)
    neg_sim = torch.einsum("bd,bkd->bk", s, neg)
    rand_sim = (s * arrays["source_embs"][torch.randint(0, s.shape[0] // 4, (s.shape[0],))]).sum(-1)
    # unit norm, positives more similar than random, mined negatives harder than random
    assert torch.allclose(arrays["question_embs"].norm(dim=1), torch.ones(1), atol=1e-4)
    assert pos_sim.mean() > rand_sim.mean() + 0.2
    assert neg_sim.mean() > rand_sim.mean() + 0.2
    # tiers follow similarity: tier 1 negatives are the most similar
    tiers = arrays["negative_tiers"]
    means = [float(neg_sim[tiers == t].mean()) for t in (1, 2, 3, 4)]
    assert means == sorted(means, reverse=True)
    counts = torch.bincount(tiers.reshape(-1), minlength=5)[1:].float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02  # quartiles
    # steering vectors are unit norm and consistent with the centroids
    c = arrays["centroid_embs"][arrays["pair_cluster_id"]]
    assert torch.equal(arrays["steering_centroid"], c)
    assert torch.allclose(arrays["steering_residual"].norm(dim=1), torch.ones(1), atol=1e-4)
    d = 1 - (q * c).sum(-1)
    assert torch.allclose(arrays["centroid_distances"], d.clamp(0, 2), atol=1e-5)


def test_deterministic_by_seed() -> None:
    cfg = SynthConfig(n_pairs=500, embedding_dim=8, n_neg=2, n_clusters=3, seed=11)
    a, _ = materialize(cfg)
    b, _ = materialize(cfg)
    c, _ = materialize(SynthConfig(n_pairs=500, embedding_dim=8, n_neg=2, n_clusters=3, seed=12))
    assert all(checksum(a[n]) == checksum(b[n]) for n in a)
    assert checksum(a["steering_residual"]) != checksum(c["steering_residual"])


def test_streaming_path_matches_in_memory(tmp_path: Path) -> None:
    """Above memory_limit the pair arrays go to memory-mapped scratch files: same bytes."""
    cfg = SynthConfig(n_pairs=9000, embedding_dim=8, n_neg=3, n_clusters=4, seed=5)
    in_ram, _ = materialize(cfg)
    streamed, _ = materialize(cfg, workdir=tmp_path / "scratch", memory_limit=0)
    assert (tmp_path / "scratch" / "steering_residual.npy").exists()
    for n in in_ram:
        assert checksum(in_ram[n]) == checksum(streamed[n]), n


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="split_ratios"):
        SynthConfig(split_ratios=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="dtype"):
        SynthConfig(dtype="int8")


@pytest.mark.parametrize("table", ["n_questions", "n_sources", "n_keywords"])
def test_a_table_smaller_than_the_clusters_is_refused(table: str) -> None:
    # before: materialize indexed past a cluster's members (IndexError) or drew from nothing
    with pytest.raises(ValueError, match=f"{table}=3 is below n_clusters=4"):
        SynthConfig(n_pairs=200, embedding_dim=8, n_neg=2, n_clusters=4, **{table: 3})
    materialize(SynthConfig(n_pairs=200, embedding_dim=8, n_neg=2, n_clusters=4, **{table: 4}))


def test_pairs_without_keywords_are_refused() -> None:
    # before: numpy's "low >= high" ValueError from deep inside materialize
    with pytest.raises(ValueError, match="max_keywords_per_pair must be at least 1"):
        SynthConfig(max_keywords_per_pair=0)
