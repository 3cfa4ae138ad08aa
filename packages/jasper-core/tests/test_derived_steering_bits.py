"""jasper-v1 keeps its bits: the kernel's faster arrangement (slot-major keywords, per-table
caches in the gather) gives exactly the values of jasper-v1 as first written, which every
stored-steering dataset built before holds and every derived dataset served before served."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from jasper.steering import (
    _EXP_PIECE,
    JASPER_V1,
    KeywordRows,
    _exp,
    count_order,
    keyword_rows_of,
    keyword_slots_of,
    steering_rows,
    unit,
)


# --- jasper-v1 exactly as first released (the reference the bits are held to) ----------------
def _ref_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.unsqueeze(-1).expand(-1, 64).contiguous())[:, 0].contiguous()


def _ref_unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def _ref_v1(variant: int, q: torch.Tensor, s: torch.Tensor, c: torch.Tensor,
            kw: KeywordRows, dtype: torch.dtype) -> torch.Tensor:
    work = torch.float64 if c.dtype == torch.float64 else torch.float32
    q, s, c, rows = q.to(work), s.to(work), c.to(work), kw.rows.to(work)
    if variant == 1:
        return c.to(dtype)
    if variant == 2:
        b = c.shape[0]
        kwe = _ref_unit(rows)
        w = _ref_exp(4.0 * (kwe * _ref_unit(q).index_select(0, kw.owner)).sum(dim=-1))
        seg = torch.zeros((b, rows.shape[-1]), dtype=work).index_add_(
            0, kw.owner, kwe * w.unsqueeze(-1))
        return torch.where((kw.counts == 0).unsqueeze(-1), c, _ref_unit(seg)).to(dtype)
    se, ce = _ref_unit(s), _ref_unit(c)
    return _ref_unit(se - (se * ce).sum(dim=-1).unsqueeze(-1) * ce).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _case(seed: int, n_pairs: int, d: int, dtype: torch.dtype, max_kw: int,
          zeros: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_kw + 1, (n_pairs,), generator=g)
    offsets = torch.zeros(n_pairs + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    k = torch.randn(6, d, generator=g)
    if zeros:  # signed zeros, a zero row and tiny rows: where a changed order would show
        k[0] = 0.0
        k[1] = -0.0
        k[2] *= 1e-30
        k[3, : d // 2] = -0.0
    return {
        "q": torch.randn(n_pairs, d, generator=g).to(dtype),
        "s": torch.randn(n_pairs, d, generator=g).to(dtype),
        "c": torch.randn(n_pairs, d, generator=g).to(dtype),
        "k": k.to(dtype),
        "offsets": offsets,
        "ids": torch.randint(0, 6, (int(offsets[-1]),), generator=g),
    }


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n_pairs=st.integers(1, 60),
       d=st.sampled_from([1, 3, 7, 16, 64, 384]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       max_kw=st.integers(0, 7), zeros=st.booleans(), variant=st.integers(1, 3))
def test_the_kernel_keeps_jasper_v1s_first_bits(seed, n_pairs, d, dtype, max_kw, zeros,
                                                 variant) -> None:
    t = _case(seed, n_pairs, d, dtype, max_kw, zeros)
    pids = torch.arange(n_pairs)
    kw = keyword_rows_of(t["offsets"], t["ids"], pids, lambda i: t["k"].index_select(0, i))
    want = _ref_v1(variant, t["q"], t["s"], t["c"], kw, dtype)
    got = steering_rows(JASPER_V1, variant, centroids=t["c"], questions=t["q"],
                        sources=t["s"], keywords=kw)
    assert torch.equal(_bits(got), _bits(want))
    if variant != 2:
        return
    # the serving arrangement: pairs in count order, slot-major rows from a unit table
    order = count_order(t["offsets"], pids)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    units = unit(t["k"].to(work))
    for unit_rows in (False, True):
        slots = keyword_slots_of(
            t["offsets"], t["ids"], order,
            (lambda i: units.index_select(0, i)) if unit_rows
            else (lambda i: t["k"].index_select(0, i)), unit_rows=unit_rows)
        got = steering_rows(JASPER_V1, 2, centroids=t["c"].index_select(0, order),
                            questions=t["q"].index_select(0, order), keywords=slots)
        assert torch.equal(_bits(got), _bits(want.index_select(0, order)))


@settings(max_examples=40, deadline=None)
@given(n=st.one_of(st.integers(1, 300), st.integers(_EXP_PIECE - 70, 3 * _EXP_PIECE + 70)),
       dtype=st.sampled_from([torch.float32, torch.float64]), threads=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_exp_gives_the_vectorised_value_at_any_length_and_thread_count(n, dtype, threads,
                                                                        seed) -> None:
    """The keyword weights' exp: every element the vectorised value, whatever the batch's
    length (no scalar tail) and however many threads ATen splits a loop among."""
    x = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
         * 16 - 8).to(dtype)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the reference: one thread, each element in whole vectors
        want = _ref_exp(x)
        torch.set_num_threads(threads)
        got = _exp(x)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(_bits(got), _bits(want))


def test_slots_refuse_pairs_out_of_count_order() -> None:
    offsets = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="count_order"):
        keyword_slots_of(offsets, torch.tensor([0, 1, 2]), torch.tensor([0, 1]),
                         lambda i: torch.zeros(i.shape[0], 4))


def _dataset_arrays(seed: int, n_pairs: int, d: int, mixed_clusters: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_q, n_s, n_k, n_c = 5, 6, 7, 3
    counts = torch.randint(0, 4, (n_pairs,), generator=g)
    offsets = torch.zeros(n_pairs + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    src = torch.randint(0, n_s, (n_pairs,), generator=g)
    # clusters a function of the source (what the builders write), or not (given cluster ids)
    cluster = torch.randint(0, n_c, (n_pairs,), generator=g) if mixed_clusters \
        else src % n_c
    return {
        "question_embs": torch.randn(n_q, d, generator=g),
        "source_embs": torch.randn(n_s, d, generator=g),
        "keyword_embs": torch.randn(n_k, d, generator=g),
        "centroid_embs": torch.randn(n_c, d, generator=g),
        "pair_index": torch.stack([torch.randint(0, n_q, (n_pairs,), generator=g), src], 1),
        "pair_cluster_id": cluster,
        "pair_keyword_offsets": offsets,
        "pair_keyword_ids": torch.randint(0, n_k, (int(offsets[-1]),), generator=g),
    }


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n_pairs=st.integers(1, 50), d=st.sampled_from([3, 16, 384]),
       mixed=st.booleans(), resident=st.booleans(), which=st.integers(0, 2),
       data=st.data())
def test_served_rows_are_the_kernels_whatever_the_cache(seed, n_pairs, d, mixed, resident,
                                                          which, data) -> None:
    """The gather (zero, cached and computed rows, cache misses for pairs whose cluster is not
    their source's) serves each pair exactly the kernel's value of its variant."""
    from jasper.steering import DerivedSpec, DerivedSteering, derived_chunks, formula, table_args

    f = [JASPER_V1, formula("original"), formula("original", {"normalize_residual": True})][which]
    arrays = _dataset_arrays(seed, n_pairs, d, mixed)
    want = {v: rows for v, _, rows in derived_chunks(f, dtype=torch.float32,
                                                      **table_args(arrays))}
    ds = DerivedSteering(DerivedSpec(f, "float32"), n_pairs, d, torch.zeros((0, 2),
                         dtype=torch.int64), torch.zeros((0, d)))
    ds.prepare(arrays, resident=resident)
    # jasper-v1: centroid per cluster always, residual per source when resident; original:
    # centroid and residual per question when resident; keyword never
    assert sorted(ds.caches) == ([1, 3] if resident else [1] if f.name == "jasper-v1" else [])
    picked = data.draw(st.lists(st.integers(0, n_pairs - 1), min_size=1, max_size=2 * n_pairs))
    pids = torch.tensor(picked, dtype=torch.int64)
    variant = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=len(picked),
                                              max_size=len(picked))), dtype=torch.int64)
    got = ds.gather(pids, variant, table=lambda n, r: arrays[n].index_select(0, r),
                    csr=(arrays["pair_keyword_offsets"], arrays["pair_keyword_ids"]),
                    out=torch.full((len(picked), d), float("nan")))
    for i, (p, v) in enumerate(zip(pids.tolist(), variant.tolist(), strict=True)):
        expect = torch.zeros(d) if v == 0 else want[v][p]
        assert torch.equal(_bits(got[i]), _bits(expect)), (i, p, v)
