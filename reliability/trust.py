"""Path-trust cases (a dataset must read only regular files inside its own directory) and
malicious-pickle placements (no loader may run code from a file; a canary must never appear)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability import ops
from reliability.families import _sample
from reliability.reference import Reference
from reliability.runner import Case, Outcome, Verdict

Place = tuple[str, Callable[[Path, Path], None]]  # name, fn(dataset copy, case workdir)


def _data_files(ref: Reference) -> list[str]:
    return sorted(p.name for p in ref.ds.iterdir() if p.is_file() and p.name != "config.json")


# --- path trust ---------------------------------------------------------------------------------
def _symlink_out(ref: Reference, rel: str, relative: bool) -> Callable[[Path, Path], None]:
    def apply(d: Path, work: Path) -> None:
        # a private copy of the foreign dataset, outside the damaged one
        foreign = work / "foreign"
        if not foreign.exists():
            ref.copy_to(foreign, "alt")
        (d / rel).unlink()
        target = foreign / rel
        (d / rel).symlink_to(os.path.relpath(target, d) if relative else target)
    return apply


def _to_special(rel: str, kind: str) -> Callable[[Path, Path], None]:
    def apply(d: Path, _work: Path) -> None:
        (d / rel).unlink()
        if kind == "fifo":
            os.mkfifo(d / rel)
        else:
            (d / rel).symlink_to("/dev/zero")
    return apply


def _h5_external(kind: str, array_path: str) -> Callable[[Path, Path], None]:
    """Item 8/9: replace one HDF5 dataset by an external link, external raw storage or a
    virtual dataset pointing at the foreign file."""
    def apply(d: Path, work: Path) -> None:
        import h5py

        h5 = next(d.glob("*.h5"))
        alt_h5 = work / "foreign.h5"
        with h5py.File(h5, "r+") as f:
            ds = f[array_path]
            attrs, shape, dtype = dict(ds.attrs), ds.shape, ds.dtype
            data = ds[()]
            foreign_data = data[::-1].copy() if data.ndim else data  # same shape, other values
            with h5py.File(alt_h5, "w") as g:
                g.create_dataset(array_path, data=foreign_data)
            del f[array_path]
            if kind == "external-link":
                f[array_path] = h5py.ExternalLink(str(alt_h5), array_path)
            elif kind == "external-storage":
                raw = work / "foreign.raw"
                raw.write_bytes(foreign_data.tobytes())
                new = f.create_dataset(array_path, shape=shape, dtype=dtype,
                                       external=[(str(raw), 0, raw.stat().st_size)])
                for k, v in attrs.items():
                    new.attrs[k] = v
            else:  # virtual
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[...] = h5py.VirtualSource(str(alt_h5), array_path, shape=shape)
                new = f.create_virtual_dataset(array_path, layout)
                for k, v in attrs.items():
                    new.attrs[k] = v
    return apply


def _legacy_beside(ref: Reference, name: str) -> Callable[[Path, Path], None]:
    """Item 9: a legacy ``train_idx.pt`` (foreign data) beside an HDF5 dataset."""
    def apply(d: Path, _work: Path) -> None:
        import torch

        from jasper.store import open_store

        with open_store(ref.alt) as r:
            idx = r.read(name.removesuffix(".pt"))
        torch.save(idx.flip(0).contiguous(), d / name)
    return apply


def _catalogue_path(ref: Reference, absolute: bool) -> Callable[[Path, Path], None]:
    def apply(d: Path, work: Path) -> None:
        import sqlite3

        foreign = work / "foreign"
        if not foreign.exists():
            ref.copy_to(foreign, "alt")
        target = foreign / "question_embs.npy"
        value = str(target) if absolute else os.path.relpath(target, d)
        conn = sqlite3.connect(d / "catalogue.db")
        try:
            conn.execute("UPDATE arrays SET file=? WHERE name='question_embs'", (value,))
            conn.commit()
        finally:
            conn.close()
    return apply


def _trust_places(ref: Reference) -> list[Place]:
    files = _data_files(ref)
    places: list[Place] = []
    for rel in files:
        places.append((f"symlink-out-abs:{rel}", _symlink_out(ref, rel, relative=False)))
        places.append((f"symlink-out-rel:{rel}", _symlink_out(ref, rel, relative=True)))
    for rel in files[:2]:
        places.append((f"dev-zero:{rel}", _to_special(rel, "devzero")))
        places.append((f"fifo:{rel}", _to_special(rel, "fifo")))
    places.append(("config-symlink-out", lambda d, w: _config_out(ref, d, w)))
    if any(f.endswith(".h5") for f in files):
        for kind in ("external-link", "external-storage", "virtual"):
            for arr in ("embeddings/questions", "pair_data/index"):
                places.append((f"h5-{kind}:{arr}", _h5_external(kind, arr)))
        places.append(("legacy-beside:train_idx.pt", _legacy_beside(ref, "train_idx.pt")))
    if "catalogue.db" in files:
        places.append(("catalogue-path-abs:question_embs", _catalogue_path(ref, True)))
        places.append(("catalogue-path-rel:question_embs", _catalogue_path(ref, False)))
    return places


def _config_out(ref: Reference, d: Path, work: Path) -> None:
    foreign = work / "foreign"
    if not foreign.exists():
        ref.copy_to(foreign, "alt")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(foreign / "config.json")


def path_trust_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    cases: list[Case] = []
    for backend, ref in refs.items():
        places = _trust_places(ref)
        if quick:
            special = [p for p in places if p[0].startswith(("h5-", "legacy", "catalogue", "fifo"))]
            places = _sample([p for p in places if p not in special], 2) + _sample(special, 3)
        modes = ("preload", "mmap", "deep") if not quick else ("preload",)
        for name, fn in places:
            for mode in modes:
                timeout = 10.0 if name.startswith(("fifo", "dev-zero")) else 20.0
                cases.append(Case("path-trust", backend, name, mode,
                                  _trust_body(ref, fn, mode, backends), timeout=timeout))
    from reliability import cluster_cases

    cases += cluster_cases.trust_cases(quick)
    return cases


def _trust_body(ref: Reference, fn: Callable[[Path, Path], None], mode: str,
                backends: list[str]) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        d = ref.copy_to(work / "ds")
        fn(d, work)
        ops.run(mode, d, ref, work, backends)
    return body


# --- malicious pickles --------------------------------------------------------------------------
class _Payload:
    """Unpickling this opens (creates) the canary file: code ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.canary, "w"))


def _pt_zip(rel: str, wrap: str) -> Callable[[Path, Path], None]:
    def apply(d: Path, work: Path) -> None:
        import torch

        payload = _Payload(work / "canary")
        obj: Any = payload if wrap == "bare" else (torch.zeros(3), payload)
        torch.save(obj, d / rel)
    return apply


def _raw_pickle(rel: str) -> Callable[[Path, Path], None]:
    def apply(d: Path, work: Path) -> None:
        (d / rel).write_bytes(pickle.dumps(_Payload(work / "canary"), protocol=2))
    return apply


def _npy_object(rel: str) -> Callable[[Path, Path], None]:
    def apply(d: Path, work: Path) -> None:
        import numpy as np

        arr = np.empty(4, dtype=object)
        arr[:] = [_Payload(work / "canary")] * 4
        with open(d / rel, "wb") as fh:
            np.save(fh, arr, allow_pickle=True)
    return apply


def _zarr_pickle(rel: str, how: str) -> Callable[[Path, Path], None]:
    """A zarr array (directory ``rel``) whose metadata asks for unpickling: numcodecs' pickle
    codec in its zarr 3 codec chain (``codec``) or inside its shards (``sharded``), or zarr 2
    metadata (``.zarray``) of an object array with a pickle object codec (``v2-object``); its
    chunk files hold the payload."""
    def apply(d: Path, work: Path) -> None:
        import json

        arr = d / rel
        meta = json.loads((arr / "zarr.json").read_text())
        payload = pickle.dumps(_Payload(work / "canary"), protocol=2)
        chunks = [p for p in arr.rglob("*") if p.is_file() and p.name != "zarr.json"]
        for c in chunks:
            c.write_bytes(payload)
        codec = {"name": "numcodecs.pickle", "configuration": {"protocol": 2}}
        if how == "codec":
            meta["codecs"] = [codec]
        elif how == "sharded":
            meta["codecs"][0].setdefault("configuration", {})["codecs"] = [codec]
        else:  # v2-object
            (arr / "zarr.json").unlink()
            shape = meta["shape"]
            (arr / ".zarray").write_text(json.dumps({
                "zarr_format": 2, "shape": shape, "chunks": shape, "dtype": "|O",
                "compressor": None, "fill_value": None, "order": "C",
                "filters": [{"id": "pickle", "protocol": 2}], "dimension_separator": "."}))
            (arr / ".zattrs").write_text(json.dumps(meta.get("attributes", {})))
            (arr / ".".join("0" * max(1, len(shape)))).write_bytes(payload)
            return
        (arr / "zarr.json").write_text(json.dumps(meta))
    return apply


def _chroma_index_pickle(seg: str) -> Callable[[Path, Path], None]:
    """Chroma's persistent HNSW segment directory: ``index_metadata.pickle`` is the file older
    chromadb releases ``pickle.load``ed from every segment."""
    def apply(d: Path, work: Path) -> None:
        (d / seg / "index_metadata.pickle").write_bytes(
            pickle.dumps(_Payload(work / "canary"), protocol=2))
    return apply


def _pickle_places(ref: Reference) -> list[Place]:
    files = _data_files(ref)
    places: list[Place] = []
    nested = sorted(p.relative_to(ref.ds).as_posix() for p in ref.ds.rglob("*.npy")
                    if p.parent != ref.ds)
    for rel in nested:  # side arrays in subdirectories (chroma's arrays/)
        places.append((f"npy-object:{rel}", _npy_object(rel)))
    for meta in sorted(ref.ds.rglob("zarr.json")):
        if meta.parent == ref.ds or '"array"' not in meta.read_text():
            continue
        rel = meta.parent.relative_to(ref.ds).as_posix()
        for how in ("codec", "sharded", "v2-object"):
            places.append((f"zarr-pickle-{how}:{rel}", _zarr_pickle(rel, how)))
    for sqlite in sorted(ref.ds.rglob("chroma.sqlite3")):
        for seg in sorted(p for p in sqlite.parent.iterdir() if p.is_dir()):
            rel = seg.relative_to(ref.ds).as_posix()
            places.append((f"chroma-index-metadata-pickle:{rel}", _chroma_index_pickle(rel)))
        store = sqlite.parent.relative_to(ref.ds).as_posix()
        places.append((f"chroma-pickle-in-store:{store}/index_metadata.pickle",
                       _raw_pickle(f"{store}/index_metadata.pickle")))
    for rel in files:
        if rel.endswith(".pt"):
            places.append((f"pt-zip-bare:{rel}", _pt_zip(rel, "bare")))
            places.append((f"pt-zip-beside-tensor:{rel}", _pt_zip(rel, "tuple")))
            places.append((f"legacy-raw-pickle:{rel}", _raw_pickle(rel)))
        elif rel.endswith(".npy"):
            places.append((f"npy-object:{rel}", _npy_object(rel)))
    if any(f.endswith(".h5") for f in files):
        from jasper.schema import ARRAYS

        for name in ARRAYS:  # legacy .pt files beside the HDF5 file, under every array's name
            places.append((f"pt-beside-h5:{name}.pt", _pt_zip(f"{name}.pt", "bare")))
    return places


def pickle_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    cases: list[Case] = []
    for backend, ref in refs.items():
        places = _pickle_places(ref)
        if quick:
            places = _sample(places, 3)
        modes = ("preload", "mmap", "deep", "convert") if not quick else ("preload",)
        for name, fn in places:
            for mode in modes:
                cases.append(Case("pickle", backend, name, mode, _pickle_body(ref, fn, mode, backends)))
    from reliability import cluster_cases

    cases += cluster_cases.pickle_cases(quick)
    return cases


def _pickle_body(ref: Reference, fn: Callable[[Path, Path], None], mode: str,
                 backends: list[str]) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        d = ref.copy_to(work / "ds")
        fn(d, work)
        try:
            ops.run(mode, d, ref, work, backends)
        finally:
            if (work / "canary").exists():
                raise Verdict(Outcome.CANARY, f"{mode} unpickled a malicious object: the canary "
                              "file was created")
    return body
