"""Preload time and serving throughput of this checkout against an older revision, in one run.

Issue 10 (contract v2) asks for a before/after benchmark with no regression beyond noise. Timings
on a shared machine drift by tens of percent within minutes, so the two revisions are measured in
alternating child processes over the same datasets, round after round, and what is reported is
the median of each side and the ratio new/old of the medians (a ratio is meaningful under load
that hits both sides alike; an absolute number is not).

- **old**: a ``git worktree`` of ``--old`` (default: main before contract v2) in a temporary
  directory; its children get that tree's ``src`` folders first on ``PYTHONPATH``, so the same
  installed entry points resolve to the old modules (each child prints which tree it imported).
- **new**: this checkout, as installed.
- **data**: written once per backend by the *old* code (the new code must keep reading what the
  old one wrote), ``--pairs`` pairs, ``--dim`` wide, float32.
- **preload**: seconds to construct ``JASPERSteeringDataset(split="train", use_mmap=False)``
  (every table read into RAM), page cache warm, the second time in the child; **first open**
  is the first time, which also pays one-time imports.
- **serving**: samples/s of ``dataset.__getitems__`` over a fixed seeded stream of random
  batches (the per-batch gather a DataLoader calls), best of ``--passes`` passes per child.

Usage::

    python benchmarks/compare_revisions.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: main just before the contract v2 work (the source sizes of issue 10's "before" were
#: counted at this commit: jasper-hdf5 899 lines, the npz example 247)
DEFAULT_OLD = "ddc8077"
BACKENDS = ("pt", "hdf5", "memmap-sqlite")
_MEASURES = ("first_open_s", "preload_s", "samples_per_s")
SRC_DIRS = ("packages/jasper-core/src", "packages/jasper-pt/src", "packages/jasper-hdf5/src",
            "packages/jasper-memmap-sqlite/src")


def _child(args: argparse.Namespace) -> None:
    """One measurement in this process: preload, then serving; one JSON line on stdout."""
    import numpy as np
    import torch

    import jasper
    from jasper import JASPERSteeringDataset

    torch.set_num_threads(1)

    def open_preloaded() -> JASPERSteeringDataset:
        return JASPERSteeringDataset(args.path, split="train", storage_format=args.backend,
                                     use_mmap=False)

    # the first open also pays one-time imports (backend modules, the manifest's schema
    # checker): reported apart, so that preload compares the reading itself
    t0 = time.perf_counter()
    open_preloaded().close()
    first_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = open_preloaded()
    preload = time.perf_counter() - t0
    n = len(ds)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, n, args.batch_size))
               for _ in range(args.batches)]
    ds.__getitems__(batches[0])  # warm-up
    best = float("inf")
    for _ in range(args.passes):
        t0 = time.perf_counter()
        for b in batches:
            ds.__getitems__(b)
        best = min(best, time.perf_counter() - t0)
    print(json.dumps({"tree": str(Path(jasper.__file__).resolve().parents[4]),
                      "first_open_s": first_open, "preload_s": preload,
                      "samples_per_s": args.batches * args.batch_size / best}))


def _env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["JASPER_PROGRESS"] = "0"
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in SRC_DIRS)
    else:
        env.pop("PYTHONPATH", None)
    return env


def _run_child(tree: Path | None, backend: str, path: Path, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--backend", backend, "--path", str(path),
           "--batch-size", str(a.batch_size), "--batches", str(a.batches),
           "--passes", str(a.passes)]
    out = subprocess.run(cmd, env=_env(tree), capture_output=True, text=True, check=False,
                         timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({'old' if tree else 'new'} {backend}):\n{out.stderr}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = tree if tree is not None else ROOT
    if Path(got["tree"]) != expected.resolve():
        raise SystemExit(f"child imported jasper from {got['tree']}, expected {expected}")
    return got


def _old_tree(rev: str, where: Path) -> Path:
    tree = where / f"jasper-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                       check=True, capture_output=True)
    return tree


def _write(tree: Path, backend: str, path: Path, a: argparse.Namespace) -> None:
    if (path / "config.json").exists():
        return
    code = ("import sys\nfrom jasper.synth import SynthConfig, write_synthetic\n"
            "write_synthetic(sys.argv[1], SynthConfig(n_pairs=int(sys.argv[3]), "
            "embedding_dim=int(sys.argv[4]), seed=0), backend=sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, str(path), backend, str(a.pairs), str(a.dim)],
                   env=_env(tree), check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", default=DEFAULT_OLD, help="the revision to compare against")
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="alternating old/new pairs per backend")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "jasper-cmp")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a)
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    old = _old_tree(a.old, a.workdir)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for backend in a.backends.split(","):
        path = a.workdir / f"data-{a.pairs}-{a.dim}-{backend}"
        _write(old, backend, path, a)
        _run_child(old, backend, path, a)  # warm the page cache; not counted
        sides: dict[str, dict[str, list[float]]] = {
            s: {k: [] for k in _MEASURES} for s in ("old", "new")}
        for r in range(a.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for side in order:
                got = _run_child(old if side == "old" else None, backend, path, a)
                for k in _MEASURES:
                    sides[side][k].append(got[k])
        results[backend] = sides
        med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in sides.items()}
        print(f"{backend:<14}" + "".join(
            f"  {k} old {med['old'][k]:,.3f} new {med['new'][k]:,.3f} "
            f"new/old {med['new'][k] / med['old'][k]:.2f}" for k in _MEASURES), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"old": a.old, "new": _head(), "pairs": a.pairs,
                                      "dim": a.dim, "rounds": a.rounds,
                                      "batch_size": a.batch_size, "load": os.getloadavg(),
                                      "results": results}, indent=2))
    return 0


def _head() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
