"""Cases for cluster-labeled datasets: path trust, malicious pickles and ``update_labels`` killed.

The ``cluster-labeled`` kind is an ordinary jasper dataset written through any backend
(:mod:`jasper.cluster_kind`), and the original system's ``dataset.db`` layout is served by
jasper-memmap-sqlite (``seed``). The campaign writes one pristine cluster-labeled dataset per
writable backend, and one in the original layout, under ``pristine/cluster/<name>/ds``; every
case here copies one of them, damages it and puts it through what a user does with it:

- ``open``: :class:`jasper.ClusterLabeledDataset` (mapped where the backend maps) and one batch
  of every sample; ``preload``: the same with ``mmap_mode=None``;
- ``validate-deep``: :func:`jasper.validate` with ``deep=True``.

Arrays are read through the store (``open_store(...).read(name)``), never by file name, so a
backend's layout is its own business.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability.runner import Case, Outcome, Verdict

ROOT = Path(__file__).resolve().parent.parent
#: the original system's layout, as the memmap-sqlite package's tests write it
SEED = "seed"
SEED_WRITER = ROOT / "packages" / "jasper-memmap-sqlite" / "tests" / "seed_cluster.py"
CLUSTER = {"n_samples": 120, "embedding_dim": 16, "n_clusters": 4}
LABELS = ("source", "steering", "combined")
MODES = ("open", "preload", "validate-deep")

Place = tuple[str, Callable[[Path, Path], None]]  # name, fn(dataset copy, case workdir)


def pristine_root() -> Path:
    from reliability.campaign import current_workdir

    return current_workdir() / "pristine" / "cluster"


def build(root: Path, name: str) -> Path:
    """Write the pristine cluster-labeled dataset ``name`` (a backend, or ``seed``) under
    ``root``; runs in a forked child."""
    out = root / "pristine" / "cluster" / name / "ds"
    if name == SEED:
        spec = importlib.util.spec_from_file_location("_seed_cluster", SEED_WRITER)
        if spec is None or spec.loader is None:
            raise FileNotFoundError(SEED_WRITER)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.write_seed_cluster_dataset(out, n=CLUSTER["n_samples"], dim=CLUSTER["embedding_dim"],
                                       n_clusters=CLUSTER["n_clusters"], seed=0)
    else:
        from jasper.cluster_kind import write_synthetic_cluster_labeled

        write_synthetic_cluster_labeled(out, **CLUSTER, seed=0, backend=name, progress=False)
    return out


def pristines() -> dict[str, Path]:
    """The pristine cluster-labeled datasets this run wrote (name -> directory)."""
    root = pristine_root()
    if not root.is_dir():
        return {}
    return {p.name: p / "ds" for p in sorted(root.iterdir()) if (p / "ds").is_dir()}


def _copy(src: Path, work: Path) -> Path:
    d = work / "ds"
    shutil.copytree(src, d, symlinks=True)
    if (d / "dataset.db").exists():
        # the original system recorded each embedding file's absolute path: record the copy's
        # own, as if it had been written here (the pristine's files still exist, so a copy
        # recording them would rightly be refused as reading outside its directory)
        conn = sqlite3.connect(d / "dataset.db")
        try:
            for kind, recorded in conn.execute(
                    "SELECT embedding_type, file_path FROM embeddings_meta").fetchall():
                conn.execute("UPDATE embeddings_meta SET file_path=? WHERE embedding_type=?",
                             (str(d / Path(recorded).name), kind))
            conn.commit()
        finally:
            conn.close()
    return d


def _data_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix in (".npy", ".pt",
                                                                               ".h5", ".db"))


# --- the operations -----------------------------------------------------------------------------
def _digests(path: Path) -> dict[str, str]:
    from reliability.reference import store_digests

    return store_digests(path)


def run(mode: str, d: Path) -> dict[str, str]:
    """Put the dataset at ``d`` through ``mode``; returns the digests of what it served."""
    import warnings

    import torch

    from reliability.reference import digest

    warnings.simplefilter("ignore")
    if mode in ("open", "preload"):
        from jasper import ClusterLabeledDataset

        ds = ClusterLabeledDataset(d, mmap_mode="r" if mode == "open" else None)
        try:
            base, steering, label = ds.__getitems__(list(range(len(ds))))[:3]
            return {"base": digest(base), "steering": digest(steering),
                    "label": digest(torch.as_tensor(label))}
        finally:
            ds.close()
    if mode == "validate-deep":
        import jasper

        jasper.validate(d, deep=True, progress=False)
        return _digests(d)
    raise ValueError(f"unknown mode {mode!r}")  # pragma: no cover - a typo in a case table


# --- path trust ---------------------------------------------------------------------------------
def _symlink_out(rel: str, relative: bool) -> Callable[[Path, Path], None]:
    def apply(d: Path, work: Path) -> None:
        outside = work / "outside"
        outside.mkdir(exist_ok=True)
        shutil.copy(d / rel, outside / rel)
        (d / rel).unlink()
        target = outside / rel
        (d / rel).symlink_to(os.path.relpath(target, d) if relative else target)
    return apply


def _catalogue_out(array: str, absolute: bool) -> Callable[[Path, Path], None]:
    """memmap-sqlite: the catalogue's file name of ``array`` points outside the directory."""
    def apply(d: Path, work: Path) -> None:
        conn = sqlite3.connect(d / "catalogue.db")
        try:
            (rel,) = conn.execute("SELECT file FROM arrays WHERE name=?", (array,)).fetchone()
            outside = work / "outside"
            outside.mkdir(exist_ok=True)
            shutil.copy(d / rel, outside / rel)
            target = outside / rel
            conn.execute("UPDATE arrays SET file=? WHERE name=?",
                         (str(target) if absolute else os.path.relpath(target, d), array))
            conn.commit()
        finally:
            conn.close()
    return apply


def _seed_file_path(kind: str, absolute: bool) -> Callable[[Path, Path], None]:
    """The original layout: ``embeddings_meta.file_path`` absolute or through ``..``, naming a
    copy outside the directory (the in-place file stays, so deep validation could pass)."""
    def apply(d: Path, work: Path) -> None:
        outside = work / "outside"
        outside.mkdir(exist_ok=True)
        name = f"{kind}_embeddings.npy"
        shutil.copy(d / name, outside / name)
        target = outside / name
        conn = sqlite3.connect(d / "dataset.db")
        try:
            conn.execute("UPDATE embeddings_meta SET file_path=? WHERE embedding_type=?",
                         (str(target) if absolute else os.path.relpath(target, d), kind))
            conn.commit()
        finally:
            conn.close()
    return apply


def trust_places(name: str, d: Path) -> list[Place]:
    files = [f for f in _data_files(d) if f not in ("catalogue.db", "dataset.db")]
    places: list[Place] = []
    for rel in files:
        places.append((f"symlink-out-abs:{rel}", _symlink_out(rel, relative=False)))
        places.append((f"symlink-out-rel:{rel}", _symlink_out(rel, relative=True)))
    if (d / "catalogue.db").exists():
        for array in ("base_embeddings", "combined_labels"):
            places.append((f"catalogue-path-abs:{array}", _catalogue_out(array, True)))
            places.append((f"catalogue-path-rel:{array}", _catalogue_out(array, False)))
    if name == SEED:
        for kind in ("base", "steering"):
            places.append((f"file_path-absolute:{kind}", _seed_file_path(kind, True)))
            places.append((f"file_path-dotdot:{kind}", _seed_file_path(kind, False)))
    return places


def trust_cases(quick: bool) -> list[Case]:
    """Item 9: a cluster-labeled dataset reads only regular files inside its own directory."""
    from reliability.families import _sample

    cases: list[Case] = []
    for name, src in pristines().items():
        places = trust_places(name, src)
        if quick:
            special = [p for p in places if not p[0].startswith("symlink-out")]
            places = _sample([p for p in places if p not in special], 1) + _sample(special, 2)
        modes = MODES if not quick else ("validate-deep",)
        for place, fn in places:
            for mode in modes:
                cases.append(Case("path-trust", "cluster", f"{name}:{place}", mode,
                                  _trust_body(src, fn, mode)))
    return cases


def _trust_body(src: Path, fn: Callable[[Path, Path], None], mode: str) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        d = _copy(src, work)
        fn(d, work)
        run(mode, d)
        raise Verdict(Outcome.SILENT_WRONG, f"{mode} accepted a file outside the dataset "
                      "directory and read it")
    return body


# --- malicious pickles --------------------------------------------------------------------------
def pickle_places(d: Path) -> list[Place]:
    from reliability import trust

    places: list[Place] = []
    for rel in _data_files(d):
        if rel.endswith(".pt"):
            places.append((f"pt-zip-bare:{rel}", trust._pt_zip(rel, "bare")))
            places.append((f"pt-zip-beside-tensor:{rel}", trust._pt_zip(rel, "tuple")))
            places.append((f"legacy-raw-pickle:{rel}", trust._raw_pickle(rel)))
        elif rel.endswith(".npy"):
            places.append((f"npy-object:{rel}", trust._npy_object(rel)))
    if any(f.endswith(".h5") for f in _data_files(d)):
        for array in ("base_embeddings", "source_labels", "sample_ids"):
            places.append((f"pt-beside-h5:{array}.pt", trust._pt_zip(f"{array}.pt", "bare")))
    return places


def pickle_cases(quick: bool) -> list[Case]:
    from reliability.families import _sample

    cases: list[Case] = []
    for name, src in pristines().items():
        places = pickle_places(src)
        if quick:
            places = _sample(places, 1)
        modes = MODES if not quick else ("open",)
        for place, fn in places:
            for mode in modes:
                cases.append(Case("pickle", "cluster", f"{name}:{place}", mode,
                                  _pickle_body(src, fn, mode)))
    return cases


def _pickle_body(src: Path, fn: Callable[[Path, Path], None], mode: str) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        d = _copy(src, work)
        fn(d, work)
        try:
            run(mode, d)
        finally:
            if (work / "canary").exists():
                raise Verdict(Outcome.CANARY, f"{mode} unpickled a malicious object: the canary "
                              "file was created")
    return body


# --- update_labels killed -----------------------------------------------------------------------
def writes_rows(name: str) -> bool:
    """Whether ``update_labels`` is supported on this pristine (write_rows capability)."""
    if name == SEED:
        return True
    from jasper.registry import get_backend

    return bool(get_backend(name).capabilities.write_rows)


def _labels(d: Path) -> dict[str, Any]:
    """Every label matrix and the sample ids, read through the store."""
    from jasper.schema import cluster_label_array
    from jasper.store import open_store

    with open_store(d) as r:
        out = {t: r.read(cluster_label_array(t)).numpy().copy() for t in LABELS}
        out["ids"] = r.read("sample_ids").numpy().copy()
    return out


def _new_labels(i: int, k: int) -> tuple[Any, Any, Any]:
    import numpy as np

    src = np.full(k, 0.01, dtype=np.float32)
    src[i % k] = 1.0 - 0.01 * (k - 1)
    st = np.roll(src, 1)
    return src, st, (src + st) / 2


def kill_cases(quick: bool, seed: int = 20261202) -> list[Case]:
    """Items 6: ``update_labels`` (one sample's three label types per call) SIGKILLed at
    seeded random times (30 per dataset that can update rows); afterwards deep validation
    passes and every sample holds all-old or all-new labels."""
    import random

    rng = random.Random(seed)
    cases: list[Case] = []
    for name, src in pristines().items():
        if not writes_rows(name):
            continue
        fracs = [round(rng.random(), 3) for _ in range(30)]
        if quick:
            fracs = fracs[:2]
        cases += [Case("kill", "cluster", f"{name}:update_labels@time-{f}", "update_labels",
                       _kill_body(src, f), timeout=90) for f in fracs]
    return cases


def _kill_body(src: Path, frac: float) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        import numpy as np

        from reliability.faults import _fork_run

        d = _copy(src, work)
        old = _labels(d)
        ids = old["ids"]
        k = old["source"].shape[1]
        calls = list(range(min(len(ids), 40)))

        def updates() -> None:
            from jasper import ClusterLabeledDataset

            ds = ClusterLabeledDataset(d)
            for i in calls:
                s, st, c = _new_labels(i, k)
                ds.update_labels(int(ids[i]), source_label=s, steering_label=st, combined_label=c)
            ds.close()

        probe = _fork_run(updates, report=work / "dry.json")
        if "error" in probe:
            raise RuntimeError(f"update_labels fails without a fault: {probe['error']}")
        shutil.rmtree(d)
        d = _copy(src, work)
        res = _fork_run(updates, kill_after=frac * probe["seconds"], report=work / "run.json")
        what = f"killed after {frac * probe['seconds']:.3f} s of {probe['seconds']:.3f} s"
        if "error" in res and not res.get("typed"):
            raise RuntimeError(f"{what}: update_labels raised {res['error']}")
        import jasper

        try:
            jasper.validate(d, deep=True, progress=False)
            now = _labels(d)
        except Exception as exc:
            raise Verdict(Outcome.LOST, f"{what}: deep validation fails afterwards: "
                          f"{type(exc).__name__}: {exc}"[:600]) from None
        for i in calls:
            new = dict(zip(LABELS, _new_labels(i, k)))
            state = ["new" if np.allclose(now[t][i], new[t]) else
                     "old" if np.array_equal(now[t][i], old[t][i]) else "other" for t in LABELS]
            if len(set(state)) != 1 or state[0] == "other":
                raise Verdict(Outcome.SILENT_WRONG, f"{what}: sample {int(ids[i])} has labels "
                              f"(source, steering, combined) = {state}: one call, torn")
    return body
