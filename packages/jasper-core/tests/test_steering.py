"""The steering kernel: row-wise (a row's value never depends on its batch), the formulas it
implements, and the builder's stored arrays being exactly its output."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from jasper.steering import (
    JASPER_V1,
    KeywordRows,
    formula,
    keyword_rows_of,
    steering_rows,
    unit,
)
from jasper.synth import SynthConfig, synthesize


def _tables(seed: int, n_pairs: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_q, n_s, n_k, n_c = 7, 9, 11, 3
    counts = torch.randint(0, 4, (n_pairs,), generator=g)
    offsets = torch.zeros(n_pairs + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return {
        "q": torch.randn(n_q, d, generator=g).to(dtype),
        "s": torch.randn(n_s, d, generator=g).to(dtype),
        "k": torch.randn(n_k, d, generator=g).to(dtype),
        "c": torch.randn(n_c, d, generator=g).to(dtype),
        "pairs": torch.stack([torch.randint(0, n_q, (n_pairs,), generator=g),
                              torch.randint(0, n_s, (n_pairs,), generator=g)], 1),
        "cluster": torch.randint(0, n_c, (n_pairs,), generator=g),
        "offsets": offsets,
        "ids": torch.randint(0, n_k, (int(offsets[-1]),), generator=g),
    }


def _rows(t: dict[str, torch.Tensor], f, v: int, pids: torch.Tensor) -> torch.Tensor:
    pi = t["pairs"].index_select(0, pids)
    kw = keyword_rows_of(t["offsets"], t["ids"], pids, lambda i: t["k"].index_select(0, i))
    return steering_rows(f, v, centroids=t["c"].index_select(0, t["cluster"][pids]),
                         questions=t["q"].index_select(0, pi[:, 0]),
                         sources=t["s"].index_select(0, pi[:, 1]), keywords=kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so -0.0 and 0.0 differ and NaN equals itself)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


FORMULAS = [JASPER_V1, formula("original"), formula("original", {"normalize_residual": True}),
            formula("original", {"fallback": "zero"})]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n_pairs=st.integers(1, 40), d=st.sampled_from([1, 3, 16, 384]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       which=st.integers(0, len(FORMULAS) - 1), variant=st.integers(1, 3), data=st.data())
def test_a_rows_value_does_not_depend_on_its_batch(seed, n_pairs, d, dtype, which, variant,
                                                   data) -> None:
    """Bit-identical per row whatever the batch (what makes building in chunks and deriving
    per batch agree exactly)."""
    t = _tables(seed, n_pairs, d, dtype)
    f = FORMULAS[which]
    every = _rows(t, f, variant, torch.arange(n_pairs))
    picked = data.draw(st.lists(st.integers(0, n_pairs - 1), min_size=1, max_size=2 * n_pairs))
    pids = torch.tensor(picked, dtype=torch.int64)
    got = _rows(t, f, variant, pids)
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(every.index_select(0, pids)))


def test_jasper_v1_formulas() -> None:
    t = _tables(1, 30, 16, torch.float32)
    pids = torch.arange(30)
    c = t["c"][t["cluster"]]
    assert torch.equal(_rows(t, JASPER_V1, 1, pids), c)
    kw = _rows(t, JASPER_V1, 2, pids)
    counts = t["offsets"][1:] - t["offsets"][:-1]
    assert torch.equal(kw[counts == 0], c[counts == 0])  # no keywords: the centroid
    assert torch.allclose(kw[counts > 0].norm(dim=1), torch.ones(int((counts > 0).sum())))
    # by hand for one pair with keywords
    p = int(torch.nonzero(counts > 1)[0])
    ks = unit(t["k"][t["ids"][t["offsets"][p]:t["offsets"][p + 1]]])
    w = torch.exp(4.0 * ks @ unit(t["q"][t["pairs"][p, 0]]))
    assert torch.allclose(kw[p], unit((w[:, None] * ks).sum(0)), atol=1e-6)
    res = _rows(t, JASPER_V1, 3, pids)
    assert torch.allclose((res * unit(c)).sum(1), torch.zeros(30), atol=1e-5)  # orthogonal
    assert torch.allclose(res.norm(dim=1), torch.ones(30), atol=1e-5)


def test_original_formulas_match_a_per_pair_reading() -> None:
    """The original builder's per-pair loop, restated: unit(C - Q), unit(mean K) with the
    centroid steering as fallback, Q - C."""
    t = _tables(2, 25, 8, torch.float32)
    pids = torch.arange(25)
    f = formula("original")
    cen, kw, res = (_rows(t, f, v, pids) for v in (1, 2, 3))
    for p in range(25):
        q, c = t["q"][t["pairs"][p, 0]], t["c"][t["cluster"][p]]
        assert torch.allclose(cen[p], (c - q) / (c - q).norm(), atol=1e-6)
        assert torch.allclose(res[p], q - c)
        ids = t["ids"][t["offsets"][p]:t["offsets"][p + 1]]
        want = (c - q) / (c - q).norm() if ids.numel() == 0 else \
            t["k"][ids].mean(0) / t["k"][ids].mean(0).norm()
        assert torch.allclose(kw[p], want, atol=1e-6), p


def test_unknown_formula_and_parameter_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown steering formula"):
        formula("nope")
    with pytest.raises(ValueError, match="no parameter"):
        formula("jasper-v1", {"temperature": 1.0})
    with pytest.raises(ValueError, match="random"):
        formula("original", {"fallback": "random"})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_builder_stores_exactly_the_kernels_values(dtype: str) -> None:
    arrays, _ = synthesize(SynthConfig(n_pairs=600, embedding_dim=24, n_clusters=5, dtype=dtype,
                                       n_keywords=40, seed=3))
    a = {n: s.materialize() for n, s in arrays.items()}
    pids = torch.tensor(np.random.default_rng(0).permutation(600)[:200])
    pi = a["pair_index"][pids]
    kw = keyword_rows_of(a["pair_keyword_offsets"], a["pair_keyword_ids"], pids,
                         lambda i: a["keyword_embs"].index_select(0, i))
    assert int(kw.counts.sum()) > 0
    for v, name in enumerate(("steering_centroid", "steering_keyword_weighted",
                              "steering_residual"), start=1):
        got = steering_rows(JASPER_V1, v, centroids=a["centroid_embs"][a["pair_cluster_id"][pids]],
                            questions=a["question_embs"][pi[:, 0]],
                            sources=a["source_embs"][pi[:, 1]],
                            keywords=KeywordRows(kw.rows, kw.owner, kw.counts))
        stored = a[name][pids]
        assert got.dtype == stored.dtype
        assert torch.equal(_bits(got), _bits(stored)), name
