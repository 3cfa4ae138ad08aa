"""Run the campaign: prepare the pristine datasets, run every case of every family, write the
results (JSON), the table (``docs/reliability.md``) and the findings list.

    python -m reliability                     # the full campaign (nox -s reliability)
    python -m reliability --quick             # the CI sample (< 2 minutes on 2 cores)
    python -m reliability --families corpus,kill --backends hdf5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reliability import report
from reliability.reference import Reference
from reliability.runner import Case, Result, run_case, run_cases

ROOT = Path(__file__).resolve().parent.parent

_WORKDIR: list[Path] = []
#: the pristine writes that are results of their own (today: the cluster-labeled one)
PREPARE: list[Result] = []


def current_workdir() -> Path:
    """The running campaign's scratch directory (pristine datasets live under it)."""
    return _WORKDIR[-1]


FamilyFn = Callable[[dict[str, Reference], list[str], bool], list[Case]]


def family_table() -> dict[str, FamilyFn]:
    """Family name -> case generator, in the table's order."""
    from reliability import cli_cases, families, faults, trust

    return {
        "corpus": families.corpus_cases,
        "region": families.region_cases,
        "path-trust": trust.path_trust_cases,
        "pickle": trust.pickle_cases,
        "kill": faults.kill_cases,
        "disk-full": faults.disk_full_cases,
        "concurrent-writers": faults.concurrent_writer_cases,
        "reader-during-commit": faults.reader_during_commit_cases,
        "interrupt": cli_cases.interrupt_cases,
        "cli": cli_cases.cli_cases,
    }


def _quiet_parent() -> None:
    """One torch thread and no allocator tuning in the parent: children are forked from it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    # import what the cases use once, before the first fork
    import h5py  # noqa: F401
    import numpy  # noqa: F401

    import jasper.cli
    import jasper.dataset
    import jasper.store
    import jasper.synth
    import jasper.validation  # noqa: F401


def prepare(root: Path, backends: list[str]) -> dict[str, Reference]:
    """Write (in forked children) and load the pristine datasets of every backend."""
    from reliability import reference

    refs: dict[str, Reference] = {}
    shutil.rmtree(root / "pristine", ignore_errors=True)  # always written by the code under test
    for b in backends:
        res = run_case(Case("prepare", b, "pristine", "write", lambda _w, b=b: reference.build(root, b),
                            timeout=300), root / "prepare" / b)
        if res.outcome.value != "ok":
            raise SystemExit(f"cannot write the pristine {b} dataset: {res.exception} {res.message}")
        refs[b] = Reference.from_dict(json.loads((root / "pristine" / b / "reference.json").read_text()))
    from reliability import cluster_cases

    # a failure here is a finding (a valid synthetic write failed); the cluster-labeled cases
    # then leave that dataset out of the run
    names = [*backends, cluster_cases.SEED] if "memmap-sqlite" in backends else list(backends)
    for name in names:
        res = run_case(Case("prepare", "cluster", f"pristine:{name}", "write",
                            lambda _w, n=name: cluster_cases.build(root, n), timeout=300),
                       root / "prepare" / f"cluster-{name}")
        PREPARE.append(res)
    return refs


def run(families: list[str], backends: list[str] | None, quick: bool, workdir: Path,
        progress: bool = True, jobs: int = 1,
        on_result: Callable[[Result], None] | None = None,
        on_family: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Run the chosen families; returns every case's result."""
    from reliability.reference import writable_backends

    _quiet_parent()
    _WORKDIR.append(workdir)
    all_backends = writable_backends()
    chosen = [b for b in all_backends if backends is None or b in backends]
    refs = prepare(workdir, all_backends)
    refs = {b: refs[b] for b in chosen}
    table = family_table()
    results: list[Result] = list(PREPARE)
    for fam in families:
        cases = table[fam](refs, all_backends, quick)
        t0 = time.monotonic()
        dirs = [workdir / "cases" / fam / f"{i:05d}" for i in range(len(cases))]

        def report_one(i: int, res: Result, n: int = len(cases), t0: float = t0,
                       dirs: list[Path] = dirs) -> None:
            unmount_under(dirs[i])  # a case that crashed never ran its own umount
            shutil.rmtree(dirs[i], ignore_errors=True)
            if on_result is not None:
                on_result(res)
            if progress and (i % 50 == 0 or res.outcome.value not in ("ok", "typed", "undetected")):
                print(f"[{res.family} {i + 1}/{n} {time.monotonic() - t0:.0f}s] {res.key}: "
                      f"{res.outcome.value} {res.exception} {res.message[:160]}",
                      file=sys.stderr, flush=True)

        results += run_cases(list(zip(cases, dirs)), jobs=jobs, on_result=report_one)
        if on_family is not None:
            on_family(results)
    return results


def unmount_under(path: Path) -> None:
    """Lazily unmount every file system mounted below ``path`` (the disk-full family's tmpfs)."""
    import subprocess

    prefix = str(path.absolute()) + "/"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    for line in mounts:
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _scratch_root() -> str | None:
    """/dev/shm where there is one: the cases fsync every file they write, and on a shared
    disk the fsyncs, not the code under test, would set the campaign's pace. Kills, full disks
    and races behave the same on tmpfs (only power loss would differ, which no case simulates)."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 << 30:
            return str(shm)
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI sample of every family")
    p.add_argument("--families", help="comma-separated families (default: all)")
    p.add_argument("--backends", help="comma-separated backends (default: every writable one)")
    p.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write every result here")
    p.add_argument("--table", type=Path, help="regenerate this markdown table "
                   "(default: docs/reliability.md for a full run, none for --quick)")
    p.add_argument("--findings", type=Path, help="write the findings list here")
    p.add_argument("--fuzz-seconds", type=int, default=0,
                   help="afterwards, fuzz every reader this long (0: no fuzzing)")
    p.add_argument("--jobs", "-j", type=int, default=len(os.sched_getaffinity(0)),
                   help="cases run at once (default: one per CPU)")
    p.add_argument("--max-variants", type=int,
                   help="at most this many corpus mutations per backend, spread over every kind "
                   "(default: all)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    fams = args.families.split(",") if args.families else list(family_table())
    if args.max_variants:
        from reliability import families

        families.MAX_VARIANTS.append(args.max_variants)
    unknown = [f for f in fams if f not in family_table()]
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(family_table())}")
    backends = args.backends.split(",") if args.backends else None
    import signal

    # `kill` of a long run still unmounts and removes its scratch directory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="jasper-reliability-", dir=_scratch_root()))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    partial = args.json.with_suffix(".partial.jsonl") if args.json else None
    if partial is not None:
        partial.write_text("")

    def save(res: Result) -> None:  # every result as it comes: a long run is never lost
        if partial is not None:
            with open(partial, "a") as fh:
                fh.write(json.dumps(res.to_dict()) + "\n")

    def family_done(so_far: list[Result]) -> None:  # the findings list grows family by family
        if args.findings:
            report.write_findings(args.findings, so_far, quick=args.quick,
                                  seconds=time.monotonic() - t0)

    try:
        results = run(fams, backends, args.quick, work, progress=not args.quiet, jobs=args.jobs,
                      on_result=save, on_family=family_done)
    finally:
        unmount_under(work)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    fuzz = _fuzz(args.fuzz_seconds) if args.fuzz_seconds else []
    seconds = time.monotonic() - t0
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    table_path = args.table or (None if args.quick else ROOT / "docs" / "reliability.md")
    if table_path:
        report.write_table(table_path, results, quick=args.quick, seconds=seconds, fuzz=fuzz)
    if args.findings:
        report.write_findings(args.findings, results, quick=args.quick, seconds=seconds, fuzz=fuzz)
    print(report.summary(results))
    for f in fuzz:
        print(f"fuzz {f['target']}: {f['result']} ({f['inputs']} inputs) {f['finding']}")
    ok = report.goal_met(results) and all(f["result"] == "ok" for f in fuzz)
    return 0 if ok else 1


def _fuzz(seconds: int) -> list[dict[str, str]]:
    """Run every fuzz target for ``seconds`` (its own processes) and return its results."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fuzz.json"
        subprocess.run([sys.executable, "-m", "reliability.fuzz", "--seconds", str(seconds),
                        "--json", str(out)], cwd=ROOT, check=False)
        return json.loads(out.read_text()) if out.exists() else [
            {"target": "all", "inputs": "?", "coverage": "?", "result": "FINDING",
             "finding": "the fuzz driver did not finish"}]
