"""The case families of the campaign. Each ``*_cases`` function returns the cases of one family for
every backend; ``quick=True`` returns a small deterministic sample of the same cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reliability import corpus, ops
from reliability.reference import Reference
from reliability.runner import Case


def interleave(per_backend: list[list[Case]]) -> list[Case]:
    """Round-robin over the backends, so that a run cut short has covered each of them alike."""
    out: list[Case] = []
    for i in range(max((len(c) for c in per_backend), default=0)):
        out += [c[i] for c in per_backend if i < len(c)]
    return out


def _sample(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (deterministic)."""
    if n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


#: cap on corpus mutations per backend in a full run (None: all), spread over every kind of damage
MAX_VARIANTS: list[int] = []


def corpus_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    """Every corpus mutation crossed with every mode (quick: one mode per sampled mutation,
    rotating, so every mode and every kind of damage appears)."""
    per_backend: list[list[Case]] = []
    for backend, ref in refs.items():
        cases: list[Case] = []
        per_backend.append(cases)
        muts = corpus.mutations(ref)
        if quick:
            picked = [(m, ops.MODES[i % len(ops.MODES)]) for i, m in enumerate(_sample(muts, 15))]
        else:
            if MAX_VARIANTS:
                muts = _sample(muts, MAX_VARIANTS[-1])
            picked = [(m, mode) for m in muts for mode in ops.MODES]
        for mut, mode in picked:
            cases.append(Case("corpus", backend, mut[0], mode, _corpus_body(ref, mut, mode, backends)))
    return interleave(per_backend)


def _corpus_body(ref: Reference, mut: corpus.Mutation, mode: str,
                 backends: list[str]) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        d = corpus.apply(ref, mut, work / "ds")
        ops.run(mode, d, ref, work, backends)
    return body


def region_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    """One flipped byte (all bits of it) in every region of every file, under preload and deep
    validation."""
    from reliability.regions import regions

    per_backend: list[list[Case]] = []
    for backend, ref in refs.items():
        cases: list[Case] = []
        per_backend.append(cases)
        targets: list[tuple[str, str, int]] = []
        for f in sorted(p for p in ref.ds.rglob("*") if p.is_file()):
            rel = f.relative_to(ref.ds).as_posix()
            for name, start, stop in regions(f):
                targets.append((rel, name, (start + stop) // 2))
        if quick:
            targets = _sample(targets, 6)
        modes = ("preload", "deep") if not quick else ("deep",)
        for rel, region, pos in targets:
            mut: corpus.Mutation = (f"byte@{region}:{rel}",
                                    lambda d, r=rel, p=pos: corpus.flip(d / r, p, 0xFF))
            for mode in modes:
                cases.append(Case("region", backend, mut[0], mode,
                                  _corpus_body(ref, mut, mode, backends)))
    return interleave(per_backend)
