"""One coverage-guided fuzz target (atheris/libFuzzer) of a jasper reader, run as
``python -m reliability.fuzz.target NAME [libFuzzer flags]``.

Targets: ``manifest`` (``config.json`` -> :meth:`jasper.manifest.Manifest.load`), ``pt`` (one
array file of a jasper-pt dataset -> the safe ``.pt`` loader through the backend), ``hdf5``
(``dataset.h5`` -> the jasper-hdf5 reader, whole reads and row reads), ``memmap`` (one ``.npy``
or the SQLite catalogue of a memmap-sqlite dataset -> its reader), ``zarr`` (any file of a
jasper-zarr group: ``zarr.json`` metadata or a shard object -> the zarr reader, preload and lazy
rows), ``chroma`` (``chroma.json`` or a side ``.npy`` of a jasper-chroma dataset -> its reader;
Chroma's own SQLite file is left to the corpus and region families, as each input would start
a Chroma runtime). Each input replaces the file
in a pristine dataset written at start-up; a :class:`jasper.errors.JasperError` is the wanted
answer to bad bytes, any other exception escapes and is a finding.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["jasper", "jasper_pt", "jasper_hdf5",
                                         "jasper_memmap_sqlite", "jasper_zarr", "jasper_chroma"]):
    import jasper.manifest
    import jasper.store
    import jasper.synth
    from jasper.errors import JasperError

from reliability.fuzz import TARGETS

BACKEND = {"manifest": "pt", "pt": "pt", "hdf5": "hdf5", "memmap": "memmap-sqlite",
           "zarr": "zarr", "chroma": "chroma"}


def _pristine(name: str, root: Path) -> tuple[Path, list[str]]:
    """Write the dataset the target damages; returns it and the files an input may replace."""
    import torch

    torch.set_num_threads(1)
    ds = jasper.synth.write_synthetic(
        root / "ds", jasper.synth.SynthConfig(n_pairs=64, embedding_dim=8, n_neg=2, n_clusters=2),
        backend=BACKEND[name], progress=False)
    if name == "manifest":
        files = ["config.json"]
    elif name == "hdf5":
        files = [p.name for p in ds.glob("*.h5")]
    elif name == "pt":
        files = sorted(p.name for p in ds.glob("*.pt"))
    elif name == "zarr":
        files = sorted(str(p.relative_to(ds)) for p in ds.rglob("*")
                       if p.is_file() and p.name != "config.json")
    elif name == "chroma":
        files = ["chroma.json", *sorted(str(p.relative_to(ds)) for p in ds.glob("arrays/*.npy"))]
    else:
        files = [*sorted(p.name for p in ds.glob("*.npy")), "catalogue.db"]
    return ds, files


def _exercise(name: str, ds: Path) -> None:
    import torch

    if name == "manifest":
        jasper.manifest.Manifest.load(ds)
        return
    with jasper.store.open_store(ds, BACKEND[name]) as reader:
        for n in reader.array_names():
            t = reader.read(n)
            if t.dim() and t.shape[0]:
                reader.read_rows(n, torch.tensor([0, t.shape[0] - 1]))


def main() -> None:
    name = sys.argv[1]
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    root = Path(tempfile.mkdtemp(prefix=f"jasper-fuzz-{name}-",
                                 dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    ds, files = _pristine(name, root)
    pristine = {f: (ds / f).read_bytes() for f in files}
    corpus = Path(os.environ.get("JASPER_FUZZ_CORPUS", root / "corpus"))
    corpus.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):  # seeds: each replaceable file as written, selector first
        (corpus / f"seed-{i:02d}").write_bytes(bytes([i]) + pristine[f])
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:  # a claim of 10^15 rows must fail, not swap
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))

    def one_input(data: bytes) -> None:
        if not data:
            return
        f = files[data[0] % len(files)]
        (ds / f).write_bytes(data[1:])
        try:
            _exercise(name, ds)
        except JasperError:
            pass
        finally:
            (ds / f).write_bytes(pristine[f])

    flags = sys.argv[2:]
    inputs = [a for a in flags if not a.startswith("-")]  # given inputs: reproduce them only
    atheris.Setup([sys.argv[0], *flags, *([] if inputs else [str(corpus)])], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
