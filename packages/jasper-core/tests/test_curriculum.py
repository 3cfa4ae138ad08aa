"""The curriculum: the three forms read from the manifest, and the deterministic draw."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.curriculum import (
    DEFAULT_STEPS,
    LinearCurriculum,
    StaticCurriculum,
    StepCurriculum,
    curriculum_from_manifest,
    draw_key,
    draw_variants,
    hash32,
    key_tensor,
    uniform,
    variant_id,
    variants_from_hash,
)
from jasper.errors import ManifestError, UnknownVariantError
from jasper.manifest import Manifest

BASE = {"embedding_dim": 8, "n_neg": 2}
EQUAL = {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}

# chi-square critical values at p = 0.001 by degrees of freedom (tables; e.g. NIST handbook)
CHI2_CRIT = {1: 10.828, 2: 13.816, 3: 16.266}


# --- variant names ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "vid"), [
    ("zero", 0), ("none", 0), ("centroid", 1), ("keyword", 2), ("keyword_weighted", 2),
    ("residual", 3), (0, 0), (3, 3),
])
def test_variant_names_aliases_and_ids(name: str | int, vid: int) -> None:
    assert variant_id(name) == vid


@pytest.mark.parametrize("bad", ["Zero", "random", "", 4, -1, True, None, 1.0])
def test_unknown_variant_is_a_value_error_listing_the_names(bad: object) -> None:
    with pytest.raises(UnknownVariantError, match="centroid") as info:
        variant_id(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


# --- the three forms ----------------------------------------------------------------------------
def test_linear_form_with_defaults_when_curriculum_has_only_builder_keys() -> None:
    c = curriculum_from_manifest({**BASE, "steering_probabilities": EQUAL,
                                  "curriculum": {"mode": "linear", "warmup_epochs": 3}})
    assert isinstance(c, LinearCurriculum)
    assert c.probabilities(0) == pytest.approx((0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3))
    assert c.probabilities(50) == pytest.approx((0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3))
    assert c.probabilities(100) == pytest.approx((0.1, 0.3, 0.3, 0.3))
    assert c.probabilities(1000) == c.probabilities(100)  # stays at the end value


def test_linear_form_shares_the_rest_in_proportion_to_steering_probabilities() -> None:
    c = curriculum_from_manifest({
        **BASE, "steering_probabilities": {"zero": 0.4, "centroid": 0.3, "keyword": 0.2,
                                           "residual": 0.1},
        "curriculum": {"zero_prob_start": 0.8, "zero_prob_end": 0.2, "epochs_total": 10}})
    z, cc, k, r = c.probabilities(5)
    assert z == pytest.approx(0.5)
    # the original: each share scaled by (1 - zero) / (1 - base zero)
    assert (cc, k, r) == pytest.approx((0.3 * 0.5 / 0.6, 0.2 * 0.5 / 0.6, 0.1 * 0.5 / 0.6))
    # all-zero shares: the rest goes to centroid, as the original did
    only_zero = curriculum_from_manifest({
        **BASE, "steering_probabilities": {"zero": 1.0, "centroid": 0, "keyword": 0,
                                           "residual": 0},
        "curriculum": {"epochs_total": 10}})
    assert only_zero.probabilities(10) == pytest.approx((0.1, 0.9, 0.0, 0.0))


def test_static_form_when_curriculum_is_absent_or_empty() -> None:
    probs = {"zero": 0.1, "centroid": 0.2, "keyword_weighted": 0.3, "residual": 0.4}
    for extra in ({}, {"curriculum": {}}, {"curriculum": None}):
        c = curriculum_from_manifest({**BASE, "steering_probabilities": probs, **extra})
        assert isinstance(c, StaticCurriculum)
        assert c.probabilities(0) == c.probabilities(77) == (0.1, 0.2, 0.3, 0.4)


def test_step_table_by_default_and_its_documented_values() -> None:
    c = curriculum_from_manifest(BASE)
    assert isinstance(c, StepCurriculum)
    expect = {0: (0.7, 0.2, 0.1, 0.0), 9: (0.7, 0.2, 0.1, 0.0), 10: (0.5, 0.3, 0.15, 0.05),
              25: (0.3, 0.3, 0.25, 0.15), 39: (0.1, 0.3, 0.35, 0.25), 40: (0.0, 0.2, 0.4, 0.4),
              500: (0.0, 0.2, 0.4, 0.4)}
    for epoch, probs in expect.items():
        assert c.probabilities(epoch) == probs


def test_explicit_schedule_wins_and_matches_what_synth_writes() -> None:
    from jasper.synth import DEFAULT_STEP_SCHEDULE

    m = Manifest(embedding_dim=8, n_neg=2, steering_probabilities=EQUAL,
                 steering_schedule=[dict(x) for x in DEFAULT_STEP_SCHEDULE])
    c = curriculum_from_manifest(m)
    assert isinstance(c, StepCurriculum)
    assert c.steps == DEFAULT_STEPS
    custom = curriculum_from_manifest({**BASE, "steering_schedule": [
        {"start_epoch": 0, "probs": [0, 0, 0, 1]},
        {"start_epoch": 3, "probs": {"none": 1.0}}]})
    assert custom.probabilities(2) == (0.0, 0.0, 0.0, 1.0)
    assert custom.probabilities(3) == (1.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("config", [
    {"steering_probabilities": {"zero": 0.5, "centroid": 0.6}},
    {"steering_probabilities": {"zero": -0.5, "centroid": 1.5}},
    {"steering_probabilities": {"zero": 0.5, "bogus": 0.5}},
    {"steering_schedule": [{"start_epoch": 0}]},
    {"steering_schedule": [{"start_epoch": 5, "probs": [1, 0, 0, 0]},
                           {"start_epoch": 2, "probs": [1, 0, 0, 0]}]},
    {"steering_schedule": [{"start_epoch": 0, "probs": [1, 0, 0]}]},
    {"steering_probabilities": EQUAL, "curriculum": {"zero_prob_start": 1.5}},
])
def test_malformed_curriculum_is_a_manifest_error(config: dict[str, object]) -> None:
    with pytest.raises(ManifestError, match="curriculum"):
        curriculum_from_manifest({**BASE, **config})


# --- the draw -----------------------------------------------------------------------------------
def _py_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def _py_hash(pid: int, key: tuple[int, int]) -> int:
    h = _py_mix((pid % 2**32) ^ key[0])
    return _py_mix(h ^ (pid >> 32) ^ key[1])


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=50),
       seed=st.integers(-(2**70), 2**70), epoch=st.integers(0, 10**6))
def test_tensor_hash_equals_exact_integer_arithmetic(ids: list[int], seed: int,
                                                     epoch: int) -> None:
    """int64 tensor arithmetic must not wrap: compare with Python's exact integers."""
    key = draw_key(seed, epoch)
    got = hash32(torch.tensor(ids, dtype=torch.int64), key).tolist()
    assert got == [_py_hash(i, key) for i in ids]
    assert all(0 <= h < 2**32 for h in got)
    # the key as a tensor (the graph-friendly form) gives the same hashes
    assert hash32(torch.tensor(ids), key_tensor(seed, epoch)).tolist() == got


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), cut=st.lists(st.integers(1, 64), min_size=1, max_size=8),
       seed=st.integers(0, 2**40), epoch=st.integers(0, 60), perm_seed=st.integers(0, 1000))
def test_draw_is_identical_across_batch_sizes_and_orders(n: int, cut: list[int], seed: int,
                                                         epoch: int, perm_seed: int) -> None:
    c = StepCurriculum()
    ids = torch.randperm(10 * n, generator=torch.Generator().manual_seed(perm_seed))[:n]
    whole = draw_variants(ids, epoch, seed, c)
    # any chunking (batch sizes) gives the same variants
    parts, start, i = [], 0, 0
    while start < n:
        size = cut[i % len(cut)]
        parts.append(draw_variants(ids[start : start + size], epoch, seed, c))
        start += size
        i += 1
    assert torch.equal(torch.cat(parts), whole)
    # any order (shuffles) gives each id the same variant
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed + 1))
    assert torch.equal(draw_variants(ids[perm], epoch, seed, c), whole[perm])
    # thresholds as a tensor (the graph-friendly form) agree with the tuple form
    h = hash32(ids, draw_key(seed, epoch))
    thr = torch.tensor(c.thresholds(epoch))
    assert torch.equal(variants_from_hash(h, thr), whole)


def test_draw_depends_on_seed_and_epoch() -> None:
    ids = torch.arange(5000)
    c = StaticCurriculum(EQUAL_T := (0.25, 0.25, 0.25, 0.25))
    assert c.probabilities(0) == EQUAL_T
    base = draw_variants(ids, 0, 0, c)
    assert torch.equal(base, draw_variants(ids, 0, 0, c))
    for other in (draw_variants(ids, 1, 0, c), draw_variants(ids, 0, 1, c)):
        agree = float((other == base).double().mean())
        assert 0.2 < agree < 0.3  # independent draws agree ~25% of the time


def test_uniform_is_in_the_unit_interval_and_flat() -> None:
    u = uniform(torch.arange(100_000), 3, 7)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    expected = 10_000
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 27.88  # chi-square, 9 degrees of freedom, p = 0.001


def _chi_square(variants: torch.Tensor, probs: tuple[float, ...]) -> tuple[float, int]:
    n = variants.numel()
    counts = torch.bincount(variants, minlength=4).double()
    chi2, df = 0.0, -1
    for k, p in enumerate(probs):
        if p == 0:
            assert int(counts[k]) == 0, f"variant {k} has probability 0 but was drawn"
            continue
        exp = n * p
        chi2 += float((counts[k] - exp) ** 2 / exp)
        df += 1
    return chi2, df


FORMS = {
    "linear": LinearCurriculum(shares=(0.5, 0.3, 0.2)),
    "static": StaticCurriculum((0.1, 0.2, 0.3, 0.4)),
    "step": StepCurriculum(),
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("epoch", [0, 15, 45, 100])
def test_variant_frequencies_match_the_schedule_over_1e5_draws(form: str, epoch: int) -> None:
    c = FORMS[form]
    ids = torch.arange(100_000) * 7 + 3  # arbitrary pair ids
    probs = c.probabilities(epoch)
    chi2, df = _chi_square(draw_variants(ids, epoch, 12345, c), probs)
    assert df >= 1
    assert chi2 < CHI2_CRIT[df], f"{form} at epoch {epoch}: chi2 {chi2:.1f} with {df} df"


def test_a_biased_draw_would_fail_the_frequency_test() -> None:
    """The frequency test can fail: a schedule shifted by 1% is rejected on 10^5 draws."""
    drawn = draw_variants(torch.arange(100_000), 0, 1, StaticCurriculum((0.26, 0.24, 0.25, 0.25)))
    chi2, df = _chi_square(drawn, (0.25, 0.25, 0.25, 0.25))
    assert chi2 > CHI2_CRIT[df]


def test_thresholds_never_draw_a_zero_probability_variant() -> None:
    c = StaticCurriculum((0.0, 1 / 3, 0.0, 2 / 3))
    t = c.thresholds(0)
    assert t[0] == 0 and t[1] == t[2]
    v = draw_variants(torch.arange(50_000), 0, 0, c)
    assert set(torch.unique(v).tolist()) == {1, 3}
