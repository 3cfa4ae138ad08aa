"""The user-facing operations a damaged dataset is put through, each judging what it served.

``preload`` and ``mmap`` open a :class:`jasper.JASPERSteeringDataset` (``mmap`` maps, or reads
rows lazily where the backend cannot map) and fetch a batch; ``validate`` and ``deep`` run
:func:`jasper.validate`; ``convert`` converts into another backend. Every mode that succeeds has
its served data compared with the reference (:func:`reliability.reference.judge`).
"""

from __future__ import annotations

from pathlib import Path

from reliability.reference import Reference, judge, served_by_dataset, served_by_store

MODES = ("preload", "mmap", "validate", "deep", "convert")


def convert_target(backend: str, backends: list[str]) -> str:
    """Convert into a different installed backend when there is one (it reads the source with
    the backend under test and writes with a second one)."""
    others = [b for b in backends if b != backend]
    return others[0] if others else backend


def run(mode: str, path: Path, ref: Reference, workdir: Path, backends: list[str]) -> None:
    """Run ``mode`` on the dataset at ``path``; raise what it raised or a Verdict on bad data."""
    import warnings

    import jasper

    warnings.simplefilter("ignore")
    if mode in ("preload", "mmap"):
        ds = jasper.JASPERSteeringDataset(path, "train", use_mmap=(mode == "mmap"))
        try:
            ds.__getitems__(list(range(min(len(ds), 64))))
            judge(served_by_dataset(ds), ref, checksummed=False, what=f"{mode} ({ds.mode})")
        finally:
            ds.close()
    elif mode in ("validate", "deep"):
        jasper.validate(path, deep=(mode == "deep"), progress=False)
        judge(served_by_store(path), ref, checksummed=(mode == "deep"), what=f"validate {mode}")
    elif mode == "convert":
        to = convert_target(ref.backend, backends)
        out = workdir / "converted"
        jasper.convert(path, out, to=to, progress=False)
        judge(served_by_store(out), ref, checksummed=True, what=f"convert to {to}")
    else:  # pragma: no cover - a typo in a case table
        raise ValueError(f"unknown mode {mode!r}")
