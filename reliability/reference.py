"""Pristine datasets and the reference every case's served data is judged against.

For each writable backend the campaign writes two small datasets of the same shapes: ``ds``
(seed 0, the one cases damage) and ``alt`` (seed 1, the "foreign" data that swaps, symlinks and
external links point at, and the "new version" of overwrites and races). Each array's digest
(shape, dtype, SHA-256 of its bytes, computed independently of jasper's own checksums) is taken
once from the pristine copy; a case's served arrays are compared with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reliability.runner import Outcome, Verdict

#: a dataset small enough that every case copies it in milliseconds, big enough for several
#: chunks, blocks and pages per array
SYNTH = {"n_pairs": 200, "embedding_dim": 16, "n_neg": 2, "n_clusters": 4}


def digest(t: torch.Tensor) -> str:
    """``shape|dtype|sha256`` of a tensor's logical bytes (bfloat16 and all)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return f"{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}|{hashlib.sha256(raw).hexdigest()}"


@dataclass
class Reference:
    """One backend's pristine datasets and their array digests."""

    backend: str
    ds: Path
    alt: Path
    digests: dict[str, str]
    alt_digests: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "ds": str(self.ds), "alt": str(self.alt),
                "digests": self.digests, "alt_digests": self.alt_digests}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Reference:
        return cls(d["backend"], Path(d["ds"]), Path(d["alt"]), dict(d["digests"]),
                   dict(d["alt_digests"]))

    def copy_to(self, dest: Path, which: str = "ds") -> Path:
        """A fresh copy of the pristine dataset (symlinks kept as links)."""
        shutil.copytree(self.ds if which == "ds" else self.alt, dest, symlinks=True)
        return dest


def writable_backends() -> list[str]:
    """Every installed backend that can write datasets, found through the registry (so a zarr
    or chroma backend installed later joins the campaign without a change here)."""
    from jasper.registry import get_backend, list_backends

    out = []
    for name in sorted(list_backends()):
        try:
            if get_backend(name).capabilities.write:
                out.append(name)
        except Exception:  # a broken plugin is the registry's finding, not the campaign's
            continue
    return out


def store_digests(path: Path, backend: str = "auto") -> dict[str, str]:
    """Digest of every array of the dataset at ``path`` as its backend reads it."""
    from jasper.store import open_store

    with open_store(path, backend) as reader:
        return {n: digest(reader.read(n)) for n in reader.array_names()}


def build(root: Path, backend: str) -> Reference:
    """Write the pristine pair of datasets for ``backend`` under ``root`` and digest them.
    Runs in a forked child (see :func:`reliability.campaign.prepare`)."""
    from jasper.synth import SynthConfig, write_synthetic

    base = root / "pristine" / backend
    ds = write_synthetic(base / "ds", SynthConfig(**SYNTH, seed=0, dataset_name="ds"),  # type: ignore[arg-type]
                         backend=backend, progress=False)
    alt = write_synthetic(base / "alt", SynthConfig(**SYNTH, seed=1, dataset_name="ds"),  # type: ignore[arg-type]
                          backend=backend, progress=False)
    ref = Reference(backend, ds, alt, store_digests(ds), store_digests(alt))
    (base / "reference.json").write_text(json.dumps(ref.to_dict(), indent=1))
    return ref


# --- judging served data ------------------------------------------------------------------------
def structural_problem(arrays: Mapping[str, torch.Tensor], ref: Reference) -> str | None:
    """The first data-model rule the served arrays break, judged against the pristine manifest
    (not the case's possibly forged one); None when every structural rule holds."""
    from jasper.errors import JasperError
    from jasper.manifest import Manifest
    from jasper.validation import check_arrays

    manifest = Manifest.load(ref.ds)
    try:
        check_arrays(dict(arrays), manifest, strict=False, warn=False)
    except JasperError as exc:
        return str(exc)
    return None


def judge(arrays: Mapping[str, torch.Tensor], ref: Reference, *, checksummed: bool,
          what: str) -> None:
    """Raise a :class:`Verdict` when ``arrays`` (what the operation served) differ from the
    reference. Differences a structural rule sees are silent-wrong in every mode; differences
    only a checksum sees are silent-wrong where the operation promises checksums
    (``checksummed``: deep validation, convert) and ``undetected`` elsewhere."""
    got = {n: digest(t) for n, t in arrays.items()}
    differ = sorted(n for n in set(got) | set(ref.digests) if got.get(n) != ref.digests.get(n))
    if not differ:
        return
    foreign = [n for n in differ if got.get(n) == ref.alt_digests.get(n)]
    detail = f"{what} served {len(differ)} array(s) differing from the reference: " \
             f"{', '.join(differ[:6])}" + (f" (foreign data in {', '.join(foreign[:4])})"
                                           if foreign else "")
    missing = [n for n in differ if n not in got]
    if missing and len(missing) == len(differ):
        raise Verdict(Outcome.SILENT_WRONG, detail + " (arrays missing from what was served)")
    if foreign:
        raise Verdict(Outcome.SILENT_WRONG, detail + "; it was read from outside the dataset "
                      "directory, and the manifest's checksums could have caught it")
    problem = structural_problem({n: t for n, t in arrays.items()}, ref) if not missing else None
    if problem:
        raise Verdict(Outcome.SILENT_WRONG, f"{detail}; a structural rule sees it: {problem}")
    if checksummed:
        raise Verdict(Outcome.SILENT_WRONG, detail + "; the manifest's checksums could have "
                      "caught it")
    raise Verdict(Outcome.UNDETECTED, detail)


def served_by_dataset(ds: Any) -> dict[str, torch.Tensor]:
    """What an open :class:`JASPERSteeringDataset` serves: its tensors (preload, mmap), or for
    rows mode the tables left in storage fetched through its gather path."""
    tables = ds.tables
    out: dict[str, torch.Tensor] = {}
    for name, t in tables.arrays.items():
        if t.device.type == "meta":
            out[name] = tables.gather(name, torch.arange(t.shape[0], dtype=torch.int64))
        else:
            out[name] = t
    return out


def served_by_store(path: Path, backend: str = "auto") -> dict[str, torch.Tensor]:
    """Every array of the dataset at ``path`` as a plain read serves it."""
    from jasper.store import open_store

    with open_store(path, backend) as reader:
        return {n: reader.read(n) for n in reader.array_names()}
