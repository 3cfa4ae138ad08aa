"""The steering curriculum: which steering variant each item gets, epoch by epoch.

Three forms, chosen from ``config.json`` as the original system chose them
(docs/curriculum.md), plus jasper's explicit step table:

- :class:`StepCurriculum` from jasper's own ``steering_schedule`` key (``jasper synth`` writes it),
  a list of ``{"start_epoch": e, "probs": [zero, centroid, keyword, residual]}``;
- :class:`LinearCurriculum` when ``curriculum`` is a non-empty object: the zero probability moves
  linearly from ``zero_prob_start`` (0.5) at epoch 0 to ``zero_prob_end`` (0.1) at
  ``epochs_total`` (100) and stays there; the rest is shared among centroid / keyword / residual
  in proportion to ``steering_probabilities``;
- :class:`StaticCurriculum` when only ``steering_probabilities`` is present;
- the documented default step table (:data:`DEFAULT_STEPS`) when neither key is present.

The draw (:func:`draw_variants`) is a pure function of ``(seed, epoch, pair id)``: a counter-based
integer hash of the pair id keyed by (seed, epoch), read as a uniform number in [0, 1) and compared
with the cumulative probabilities. It is vectorised and uses only int64 tensor arithmetic whose
values never exceed 2^50, so no multiplication wraps and every right shift is of a non-negative
number: the result is bit-identical on the CPU and on CUDA, for any batch size, worker count,
shuffle or DDP world size. The original drew from one numpy generator per dataset object, so
DataLoader workers repeated each other's draws and the draw depended on access order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import torch

from jasper.errors import ManifestError, UnknownVariantError
from jasper.schema import STEERING_VARIANTS, VARIANT_ALIASES

#: The variant names in id order: 0 zero, 1 centroid, 2 keyword, 3 residual.
VARIANT_NAMES: tuple[str, ...] = STEERING_VARIANTS
N_VARIANTS = len(VARIANT_NAMES)

#: The documented default step table (docs/curriculum.md): (start epoch, probabilities).
DEFAULT_STEPS: tuple[tuple[int, tuple[float, float, float, float]], ...] = (
    (0, (0.7, 0.2, 0.1, 0.0)),
    (10, (0.5, 0.3, 0.15, 0.05)),
    (20, (0.3, 0.3, 0.25, 0.15)),
    (30, (0.1, 0.3, 0.35, 0.25)),
    (40, (0.0, 0.2, 0.4, 0.4)),
)

_M32 = 0xFFFFFFFF
_ONE = 1 << 32  # the hash is read as h / 2^32, a uniform number in [0, 1)


def variant_id(variant: str | int) -> int:
    """The id (0-3) of a variant name, alias (``none``, ``keyword_weighted``) or id.

    Raises :class:`~jasper.errors.UnknownVariantError` (a ``ValueError``) for anything else.
    """
    if isinstance(variant, bool):
        raise UnknownVariantError(f"unknown steering variant {variant!r}; {_known()}")
    if isinstance(variant, int):
        if 0 <= variant < N_VARIANTS:
            return variant
        raise UnknownVariantError(f"unknown steering variant id {variant}; {_known()}")
    if isinstance(variant, str):
        name = VARIANT_ALIASES.get(variant, variant)
        if name in VARIANT_NAMES:
            return VARIANT_NAMES.index(name)
    raise UnknownVariantError(f"unknown steering variant {variant!r}; {_known()}")


def _known() -> str:
    aliases = ", ".join(f"{a} = {n}" for a, n in VARIANT_ALIASES.items())
    return f"known: {', '.join(VARIANT_NAMES)} (aliases: {aliases}) or ids 0-3"


def _as_probs(values: Sequence[float], where: str) -> tuple[float, float, float, float]:
    if len(values) != N_VARIANTS:
        raise ValueError(f"{where}: expected {N_VARIANTS} probabilities, got {len(values)}")
    out = tuple(float(v) for v in values)
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ValueError(f"{where}: probabilities must be finite and non-negative, got {out}")
    total = sum(out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}: probabilities must sum to 1, got {out} (sum {total:g})")
    return out[0], out[1], out[2], out[3]


def _probs_from_mapping(probs: Mapping[str, Any], where: str) -> dict[int, float]:
    """``{"zero": .., "centroid": ..}`` (names or aliases) as ``{variant id: probability}``."""
    out: dict[int, float] = {}
    for key, value in probs.items():
        try:
            vid = variant_id(key)
        except UnknownVariantError as exc:
            raise ValueError(f"{where}: {exc}") from None
        out[vid] = float(value)
    return out


class Curriculum:
    """Base class: the four variant probabilities as a function of the epoch."""

    kind: ClassVar[str] = ""

    def probabilities(self, epoch: int) -> tuple[float, float, float, float]:
        """Probabilities of zero, centroid, keyword and residual at ``epoch``."""
        raise NotImplementedError

    def thresholds(self, epoch: int) -> tuple[int, int, int]:
        """Integer thresholds on the 32-bit hash: variant = number of thresholds <= hash.

        ``t_k = ceil(c_k * 2^32)`` for the cumulative probabilities ``c_k``, computed in exact
        rational arithmetic, so ``h >= t_k`` is exactly ``h / 2^32 >= c_k`` and a variant of
        probability zero is never drawn.
        """
        probs = [Fraction(p) for p in self.probabilities(epoch)]
        total = sum(probs)
        cum = Fraction(0)
        out = []
        for p in probs[:-1]:
            cum += p
            out.append(min(_ONE, math.ceil(cum / total * _ONE)))
        return out[0], out[1], out[2]

    def describe(self) -> str:
        return self.kind


@dataclass(frozen=True)
class StaticCurriculum(Curriculum):
    """The same probabilities at every epoch (``steering_probabilities`` without curriculum)."""

    probs: tuple[float, float, float, float]
    kind: ClassVar[str] = "static"

    def __post_init__(self) -> None:
        object.__setattr__(self, "probs", _as_probs(self.probs, "static curriculum"))

    def probabilities(self, epoch: int) -> tuple[float, float, float, float]:
        return self.probs


@dataclass(frozen=True)
class LinearCurriculum(Curriculum):
    """The original's linear form: the zero probability moves from ``zero_start`` to
    ``zero_end`` over ``epochs_total`` epochs; ``shares`` split the rest among centroid,
    keyword and residual (in proportion; all-zero shares give the rest to centroid, as the
    original did)."""

    zero_start: float = 0.5
    zero_end: float = 0.1
    epochs_total: int = 100
    shares: tuple[float, float, float] = (1.0, 1.0, 1.0)
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        for name in ("zero_start", "zero_end"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"linear curriculum: {name} must be in [0, 1], got {v}")
        if any(not math.isfinite(s) or s < 0 for s in self.shares):
            raise ValueError(f"linear curriculum: shares must be non-negative, got {self.shares}")

    def probabilities(self, epoch: int) -> tuple[float, float, float, float]:
        progress = min(max(epoch, 0) / max(self.epochs_total, 1), 1.0)
        zero = self.zero_start + (self.zero_end - self.zero_start) * progress
        rest = 1.0 - zero
        total = sum(self.shares)
        if total <= 0:
            return zero, rest, 0.0, 0.0
        c, k, r = (rest * s / total for s in self.shares)
        return zero, c, k, r


@dataclass(frozen=True)
class StepCurriculum(Curriculum):
    """A step table: ``steps[i] = (start_epoch, probs)``; the last step whose start is at or
    before the epoch applies (the first step applies before its start)."""

    steps: tuple[tuple[int, tuple[float, float, float, float]], ...] = DEFAULT_STEPS
    kind: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("step curriculum: the table is empty")
        steps = tuple(
            (int(start), _as_probs(probs, f"step curriculum, step at epoch {start}"))
            for start, probs in self.steps
        )
        starts = [s for s, _ in steps]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError(f"step curriculum: start epochs must increase, got {starts}")
        object.__setattr__(self, "steps", steps)

    def probabilities(self, epoch: int) -> tuple[float, float, float, float]:
        chosen = self.steps[0][1]
        for start, probs in self.steps:
            if epoch >= start:
                chosen = probs
            else:
                break
        return chosen


def curriculum_from_manifest(manifest: Any) -> Curriculum:
    """The curriculum a manifest (a :class:`~jasper.manifest.Manifest` or its dict) describes.

    Precedence: jasper's explicit ``steering_schedule``; a non-empty ``curriculum`` (linear);
    ``steering_probabilities`` alone (static); else the default step table. A malformed entry
    raises :class:`~jasper.errors.ManifestError`.
    """
    get = manifest.get if isinstance(manifest, Mapping) else lambda k: getattr(manifest, k, None)
    where = "config.json"
    try:
        schedule = get("steering_schedule")
        if schedule:
            steps = []
            for i, step in enumerate(schedule):
                if not isinstance(step, Mapping) or "start_epoch" not in step or "probs" not in step:
                    raise ValueError(f"steering_schedule[{i}] must be an object with start_epoch "
                                     f"and probs, got {step!r}")
                probs = step["probs"]
                if isinstance(probs, Mapping):
                    by_id = _probs_from_mapping(probs, f"steering_schedule[{i}]")
                    probs = [by_id.get(v, 0.0) for v in range(N_VARIANTS)]
                steps.append((int(step["start_epoch"]), tuple(probs)))
            return StepCurriculum(tuple(steps))
        base = get("steering_probabilities")
        curriculum = get("curriculum")
        if isinstance(curriculum, Mapping) and curriculum:
            by_id = _probs_from_mapping(base or {}, "steering_probabilities")
            # the original's defaults for a missing share (0.3 each); only ratios matter
            shares = (by_id.get(1, 0.3), by_id.get(2, 0.3), by_id.get(3, 0.3))
            return LinearCurriculum(
                zero_start=float(curriculum.get("zero_prob_start", 0.5)),
                zero_end=float(curriculum.get("zero_prob_end", 0.1)),
                epochs_total=int(curriculum.get("epochs_total", 100)),
                shares=shares,
            )
        if base:
            by_id = _probs_from_mapping(base, "steering_probabilities")
            return StaticCurriculum((by_id.get(0, 0.0), by_id.get(1, 0.0), by_id.get(2, 0.0),
                                     by_id.get(3, 0.0)))
        return StepCurriculum(DEFAULT_STEPS)
    except (TypeError, ValueError) as exc:
        raise ManifestError(where, f"bad steering curriculum: {exc}") from None


# --- the deterministic draw ------------------------------------------------------------------


def _mix32_int(x: int) -> int:
    """The same 32-bit mixer as :func:`_mix32`, on a Python int (for deriving keys)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for ``x`` in [0, 2^32), without int64 overflow: the constant is split
    into 16-bit halves, so every intermediate stays below 2^49."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply; the constants of C. Wellons' "lowbias32",
    https://nullprogram.com/blog/2018/07/31/) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw_key(seed: int, epoch: int) -> tuple[int, int]:
    """The two 32-bit keys of ``(seed, epoch)``; any Python ints (negative and >64-bit too)."""
    s = seed & ((1 << 64) - 1)
    e = epoch & ((1 << 64) - 1)
    k = _mix32_int((s & _M32) ^ 0x9E3779B9)
    k = _mix32_int(k ^ (s >> 32))
    k = _mix32_int(k ^ (e & _M32) ^ 0x632BE5AB)
    k = _mix32_int(k ^ (e >> 32))
    return k, _mix32_int(k ^ 0x85157AF5)


def key_tensor(seed: int, epoch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``draw_key`` as an int64 tensor ``[2]`` (graph-friendly input of :func:`hash32`)."""
    return torch.tensor(draw_key(seed, epoch), dtype=torch.int64, device=device)


def hash32(pair_ids: torch.Tensor, key: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """A 32-bit hash (int64 tensor of values in [0, 2^32)) of each non-negative pair id under
    ``key`` (two 32-bit words). Pure tensor arithmetic: capturable in a CUDA graph."""
    ids = pair_ids.to(torch.int64)
    if isinstance(key, tuple):
        k0: torch.Tensor | int = key[0]
        k1: torch.Tensor | int = key[1]
    else:
        k0, k1 = key[0], key[1]
    h = _mix32((ids & _M32) ^ k0)
    return _mix32(h ^ (ids >> 32) ^ k1)


def uniform(pair_ids: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The draw's uniform number in [0, 1) for each pair id (float64; exact: h / 2^32)."""
    return hash32(pair_ids, draw_key(seed, epoch)).to(torch.float64) / float(_ONE)


def variants_from_hash(
    h: torch.Tensor, thresholds: torch.Tensor | tuple[int, int, int]
) -> torch.Tensor:
    """Variant ids (int64) from hashes and the three cumulative thresholds."""
    if isinstance(thresholds, tuple):
        t0, t1, t2 = thresholds
        return (h >= t0).to(torch.int64) + (h >= t1).to(torch.int64) + (h >= t2).to(torch.int64)
    return (h.unsqueeze(-1) >= thresholds).sum(-1)


def draw_variants(
    pair_ids: torch.Tensor,
    epoch: int,
    seed: int,
    curriculum: Curriculum,
) -> torch.Tensor:
    """The steering variant (int64, 0-3) of each pair id at ``epoch``: a pure function of
    (seed, epoch, pair id) that follows ``curriculum.probabilities(epoch)``."""
    h = hash32(pair_ids, draw_key(seed, epoch))
    return variants_from_hash(h, curriculum.thresholds(epoch))


__all__ = [
    "DEFAULT_STEPS",
    "VARIANT_NAMES",
    "Curriculum",
    "LinearCurriculum",
    "StaticCurriculum",
    "StepCurriculum",
    "curriculum_from_manifest",
    "draw_key",
    "draw_variants",
    "hash32",
    "key_tensor",
    "uniform",
    "variant_id",
    "variants_from_hash",
]
