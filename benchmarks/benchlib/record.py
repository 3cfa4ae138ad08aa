"""How benchmarks label their results, so that the report can find and group them."""

from __future__ import annotations

from typing import Any

from benchlib.config import GridPoint
from benchlib.data import BackendPreset


def tag(benchmark: Any, question: int, kind: str, point: GridPoint,
        preset: BackendPreset | None = None, **extra: Any) -> None:
    """Attach what the report needs to ``benchmark.extra_info`` (and set its group)."""
    benchmark.group = f"Q{question} {kind} {point.key}"
    info = benchmark.extra_info
    info.update(question=question, kind=kind, grid=point.key, grid_label=point.label,
                n_pairs=point.n_pairs, embedding_dim=point.embedding_dim, n_neg=point.n_neg,
                dtype=point.dtype)
    if preset is not None:
        info.update(backend=preset.backend, preset=preset.preset)
    info.update(extra)


def case_id(point: GridPoint, preset: BackendPreset | None = None, *rest: Any) -> str:
    parts = [point.key]
    if preset is not None:
        parts.append(preset.id)
    parts.extend(str(r) for r in rest)
    return "-".join(parts)
