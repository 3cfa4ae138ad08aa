"""Faults of the process and the file system while a dataset is written: SIGKILL at chosen and
random points, a full disk, two writers at once, and readers opening during a commit.

After each fault the case checks what a user would find: the previous dataset or the new one,
intact (deep validation passes and every array equals one generation), never neither; a source
never damaged; and no scratch directory left behind once the next write has run.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability.families import _sample
from reliability.ops import convert_target
from reliability.reference import SYNTH, Reference, store_digests
from reliability.runner import Case, Outcome, Verdict

#: the file-system steps a kill point can land before (each call is one event)
_HOOKS: list[tuple[Any, str]] = [
    (os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (os, "rmdir"),
    (os, "open"), (os, "link"), (os, "symlink"), (os, "truncate"), (os, "ftruncate"),
    (shutil, "rmtree"), (builtins, "open"), (io, "open"),
]


def _arm(kill_at: int | None) -> list[int]:
    """Count file-system steps in this process; SIGKILL it right before step ``kill_at``."""
    count = [0]

    def wrap(mod: Any, name: str) -> None:
        orig = getattr(mod, name, None)
        if orig is None:
            return

        def hooked(*a: Any, **k: Any) -> Any:
            count[0] += 1
            if kill_at is not None and count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(*a, **k)

        setattr(mod, name, hooked)

    for mod, name in _HOOKS:
        wrap(mod, name)
    try:
        import numpy as np

        wrap(np.memmap, "flush")
    except ImportError:  # pragma: no cover
        pass
    return count


def _spawn(fn: Callable[[], None], *, kill_at: int | None = None,
           report: Path | None = None) -> int:
    """Fork a grandchild that runs ``fn`` (SIGKILLed before its ``kill_at``-th file-system step)
    and writes {"events", "seconds"} or {"error", "typed"} to ``report``."""
    pid = os.fork()
    if pid:
        return pid
    code = 0  # pragma: no cover - the grandchild
    info: dict[str, Any] = {}
    try:
        count = _arm(kill_at)
        t0 = time.monotonic()
        fn()
        info = {"events": count[0], "seconds": time.monotonic() - t0}
    except BaseException as exc:
        from jasper.errors import JasperError

        info = {"error": f"{type(exc).__qualname__}: {exc}"[:500],
                "typed": isinstance(exc, JasperError)}
        code = 3
    if report is not None:
        fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, json.dumps(info).encode())
        os.close(fd)
    os._exit(code)


def _fork_run(fn: Callable[[], None], *, kill_at: int | None = None,
              kill_after: float | None = None, report: Path | None = None) -> dict[str, Any]:
    """Run ``fn`` in a grandchild; kill it before its ``kill_at``-th file-system step or after
    ``kill_after`` seconds. Returns {"killed", "events", "seconds", "error", "typed"}."""
    pid = _spawn(fn, kill_at=kill_at, report=report)
    status = None
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while status is None and time.monotonic() < deadline:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            else:
                time.sleep(0.002)
        if status is None:
            os.kill(pid, signal.SIGKILL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    out: dict[str, Any] = {"killed": os.WIFSIGNALED(status)
                           and os.WTERMSIG(status) == signal.SIGKILL}
    if report is not None and report.exists():
        out.update(json.loads(report.read_text() or "{}"))
    return out


def _leftovers(target: Path) -> list[str]:
    """Hidden siblings of ``target`` a writer made (scratch, trash, temporary directories)."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(f".{target.name}") and p.name != target.name)


def _check_generation(target: Path, allowed: dict[str, dict[str, str]], what: str) -> str:
    """``target`` must pass deep validation and equal one allowed generation entirely; returns
    that generation's name or raises a LOST verdict."""
    import jasper

    try:
        jasper.validate(target, deep=True, progress=False)
        got = store_digests(target)
    except Exception as exc:
        raise Verdict(Outcome.LOST, f"{what}: the dataset at the target does not validate: "
                      f"{type(exc).__name__}: {exc}"[:600]) from None
    for name, digests in allowed.items():
        if got == digests:
            return name
    mixed = {n: [g for g, d in allowed.items() if d.get(n) == v] for n, v in got.items()}
    raise Verdict(Outcome.LOST, f"{what}: the dataset at the target validates but equals no "
                  f"single generation (per array: {json.dumps(mixed)[:300]})")


# --- the writes that get killed -----------------------------------------------------------------
def _synth(target: Path, backend: str, seed: int, overwrite: bool) -> Callable[[], None]:
    def fn() -> None:
        from jasper.synth import SynthConfig, write_synthetic

        write_synthetic(target, SynthConfig(**SYNTH, seed=seed, dataset_name="ds"),  # type: ignore[arg-type]
                        backend=backend, overwrite=overwrite, progress=False)
    return fn


def _convert(src: Path, target: Path, backend: str, overwrite: bool) -> Callable[[], None]:
    def fn() -> None:
        import jasper

        jasper.convert(src, target, to=backend, overwrite=overwrite, progress=False)
    return fn


WRITE_OPS = ("synth", "overwrite", "convert", "convert-overwrite")


def _setup_write(op: str, ref: Reference, refs: dict[str, Reference], backends: list[str],
                 work: Path, src_base: Path | None = None) -> tuple[Path, Callable[[], None], dict[str, dict[str, str]], Path | None,
                                      dict[str, str] | None]:
    """For ``op``: the target, the write, the generations allowed at the target afterwards,
    and the source (with its digests) that must stay intact."""
    target = work / "data" / "target"
    target.parent.mkdir(parents=True, exist_ok=True)
    b = ref.backend
    if op == "synth":
        return target, _synth(target, b, 1, False), {"new": ref.alt_digests, "none": {}}, None, None
    if op == "overwrite":
        ref.copy_to(target)
        return target, _synth(target, b, 1, True), {"old": ref.digests, "new": ref.alt_digests}, \
            None, None
    src_ref = refs.get(convert_target(b, backends), ref)
    src = (src_base or work) / "source"
    src_ref.copy_to(src, "alt")
    if op == "convert":
        return target, _convert(src, target, b, False), {"new": ref.alt_digests, "none": {}}, \
            src, src_ref.alt_digests
    ref.copy_to(target)
    return target, _convert(src, target, b, True), {"old": ref.digests, "new": ref.alt_digests}, \
        src, src_ref.alt_digests


def _after_fault(target: Path, allowed: dict[str, dict[str, str]], src: Path | None,
                 src_digests: dict[str, str] | None, backend: str, what: str) -> None:
    """What the user finds after the fault, then the next write to the same target."""
    if target.exists() or "none" not in allowed:
        if not target.exists():
            hidden = _leftovers(target)
            raise Verdict(Outcome.LOST, f"{what}: no dataset at the target, which held one "
                          f"before; beside it: {hidden}")
        _check_generation(target, {k: v for k, v in allowed.items() if k != "none"}, what)
    if src is not None and src_digests is not None:
        try:
            ok = store_digests(src) == src_digests
        except Exception as exc:
            raise Verdict(Outcome.LOST, f"{what}: the conversion source no longer reads: {exc}") from None
        if not ok:
            raise Verdict(Outcome.LOST, f"{what}: the conversion source was changed")
    # the user runs the write again: it must succeed and leave nothing behind
    _synth(target, backend, 0, True)()
    left = _leftovers(target)
    if left:
        raise Verdict(Outcome.LEFTOVER, f"{what}: after the next write, beside the target: {left}")


def kill_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    """SIGKILL before evenly spread file-system steps and at seeded random times of every write
    op (>= 30 per backend), and during ``update_labels``."""
    cases: list[Case] = []
    rng = random.Random(20261201)
    for backend, ref in refs.items():
        points: list[tuple[str, str, float]] = []
        for op in WRITE_OPS:
            points += [(op, "step", f) for f in (0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                                                  0.88, 0.94, 0.98, 1.0)]
            points += [(op, "time", round(rng.random(), 3)) for _ in range(3)]
        if quick:
            points = [p for p in points if p[2] in (0.94, 0.98, 1.0) and p[1] == "step"]
            points = _sample(points, 4)
        for op, how, frac in points:
            cases.append(Case("kill", backend, f"{op}@{how}-{frac}", op,
                              _kill_body(ref, refs, backends, op, how, frac), timeout=90))
    from reliability import cluster_cases

    cases += cluster_cases.kill_cases(quick)
    return cases


def _kill_body(ref: Reference, refs: dict[str, Reference], backends: list[str], op: str,
               how: str, frac: float) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        dry = work / "dry"
        target, write, _allowed, _src, _sd = _setup_write(op, ref, refs, backends, dry)
        probe = _fork_run(write, report=work / "dry.json")
        if "error" in probe:
            raise RuntimeError(f"the write itself fails without a fault: {probe['error']}")
        shutil.rmtree(dry, ignore_errors=True)
        run = work / "run"
        target, write, allowed, src, src_digests = _setup_write(op, ref, refs, backends, run)
        if how == "step":
            k = max(1, round(frac * probe["events"]))
            res = _fork_run(write, kill_at=k, report=work / "run.json")
            what = f"killed before file-system step {k} of {probe['events']}"
        else:
            res = _fork_run(write, kill_after=frac * probe["seconds"], report=work / "run.json")
            what = f"killed after {frac * probe['seconds']:.3f} s of {probe['seconds']:.3f} s"
        if "error" in res and not res.get("typed"):
            raise RuntimeError(f"{what}: the write raised {res['error']}")
        _after_fault(target, allowed, src, src_digests, ref.backend, what)
    return body


# --- disk full ----------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def disk_full_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    """Every write op into a small tmpfs (RLIMIT_FSIZE where mounting is refused), at sizes from
    a tenth of the dataset to twice it."""
    cases: list[Case] = []
    for backend, ref in refs.items():
        size = sum(p.stat().st_size for p in ref.ds.rglob("*") if p.is_file())
        fracs = (0.1, 0.3, 0.5, 0.7, 0.9, 1.2, 1.6, 2.2)
        pts = [(op, f) for op in WRITE_OPS for f in fracs]
        if quick:
            pts = _sample(pts, 3)
        for op, f in pts:
            cases.append(Case("disk-full", backend, f"{op}@{f}x", op,
                              _disk_full_body(ref, refs, backends, op, int(size * f)), timeout=60))
    return cases


def _disk_full_body(ref: Reference, refs: dict[str, Reference], backends: list[str], op: str,
                    nbytes: int) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        mnt = work / "mnt"
        # the old dataset an overwrite replaces is copied in first: its pages come on top
        mounted = _mount_tmpfs(mnt, max(4096, nbytes + (footprint(ref.ds) if "overwrite" in op else 0)))
        try:
            target, write, allowed, _src, _src_digests = _setup_write(op, ref, refs, backends, mnt,
                                                                    src_base=work)
            if not mounted:
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
            from jasper.errors import JasperError

            what = f"{op} into {nbytes:,} bytes of free space ({'tmpfs' if mounted else 'RLIMIT_FSIZE'})"
            error: BaseException | None = None
            try:
                write()
            except JasperError as exc:
                error = exc
            if not mounted:
                import resource

                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            left = _leftovers(target)
            if error is not None:
                if left:
                    raise Verdict(Outcome.LEFTOVER, f"{what}: the failed write left {left}")
                if target.exists() or "none" not in allowed:
                    _check_generation(target, {k: v for k, v in allowed.items()
                                               if k not in ("none", "new")}, what)
                raise error
            _check_generation(target, {k: v for k, v in allowed.items() if k != "none"}, what)
            if left:
                raise Verdict(Outcome.LEFTOVER, f"{what}: the write left {left}")
        finally:
            if mounted:
                _umount(mnt)
    return body


def footprint(d: Path, page: int = 4096) -> int:
    """Bytes a copy of ``d`` takes on tmpfs: whole pages per file, plus the directory."""
    return page + sum(-(-p.stat().st_size // page) * page + page for p in d.rglob("*"))


# --- two writers at once ------------------------------------------------------------------------
def concurrent_writer_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    """Two writers released at the same instant at one target (new, or with ``overwrite``)."""
    cases: list[Case] = []
    reps = 1 if quick else 5
    for backend, ref in refs.items():
        for variant in ("new-target", "overwrite"):
            for r in range(reps if variant == "new-target" or not quick else 0):
                cases.append(Case("concurrent-writers", backend, f"{variant}#{r}", "synth x2",
                                  _concurrent_body(ref, variant), timeout=90))
    return cases


def _concurrent_body(ref: Reference, variant: str) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        target = work / "data" / "target"
        target.parent.mkdir(parents=True)
        if variant == "overwrite":
            ref.copy_to(target)
        go_r, go_w = os.pipe()
        pids = []
        for seed in (0, 1):
            def write(seed: int = seed) -> None:
                os.read(go_r, 1)  # both start at the same instant
                _synth(target, ref.backend, seed, variant == "overwrite")()
            pids.append(_spawn(write, report=work / f"w{seed}.json"))
        time.sleep(0.2)
        os.write(go_w, b"xx")
        for pid in pids:
            os.waitpid(pid, 0)
        reports = [json.loads((work / f"w{s}.json").read_text()) if (work / f"w{s}.json").exists()
                   else {"error": "no report"} for s in (0, 1)]
        ok = [s for s, r in zip((0, 1), reports) if "error" not in r]
        untyped = [r["error"] for r in reports if "error" in r and not r.get("typed")]
        if untyped:
            raise RuntimeError(f"a concurrent writer raised {untyped[0]}")
        gens = {"seed0": ref.digests, "seed1": ref.alt_digests}
        winner = _check_generation(target, gens, "after two concurrent writers")
        if variant == "new-target" and len(ok) == 2:
            raise Verdict(Outcome.SILENT_WRONG, "both writers to one new target reported success; "
                          f"the target holds {winner}, the other writer's dataset is gone")
        if ok and f"seed{ok[-1]}" != winner and len(ok) == 1:
            raise Verdict(Outcome.LOST, f"the writer that succeeded (seed{ok[0]}) is not what the "
                          f"target holds ({winner})")
        left = _leftovers(target)
        if left:
            raise Verdict(Outcome.LEFTOVER, f"two finished writers left {left}")
    return body


# --- readers during a commit --------------------------------------------------------------------
def reader_during_commit_cases(refs: dict[str, Reference], backends: list[str],
                               quick: bool) -> list[Case]:
    """Readers open the dataset over and over while a writer replaces it with the other
    generation; every open must serve one generation (item 7)."""
    cases: list[Case] = []
    seconds = 2.0 if quick else 6.0
    for backend, ref in refs.items():
        modes = ("preload",) if quick else ("preload", "mmap", "deep")
        for mode in modes:
            cases.append(Case("reader-during-commit", backend, f"{mode}-{seconds:.0f}s", mode,
                              _reader_body(ref, mode, seconds), timeout=seconds + 60))
    return cases


def _reader_body(ref: Reference, mode: str, seconds: float) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        import warnings

        import jasper
        from jasper.errors import JasperError
        from jasper.manifest import Manifest
        from jasper.store import open_store, write_store
        from reliability.reference import digest, served_by_dataset, served_by_store

        warnings.simplefilter("ignore")
        target = work / "data" / "target"
        target.parent.mkdir(parents=True)
        ref.copy_to(target)
        gens = []
        for d in (ref.ds, ref.alt):
            with open_store(d) as r:
                gens.append(({n: r.read(n).clone() for n in r.array_names()}, Manifest.load(d)))
        stop_at = time.monotonic() + seconds

        def writer() -> None:
            i = 1
            while time.monotonic() < stop_at:
                arrays, manifest = gens[i % 2]
                write_store(target, arrays, manifest, backend=ref.backend, overwrite=True)
                i += 1

        pid = os.fork()
        if pid == 0:  # pragma: no cover - the writer
            code = 0
            try:
                writer()
            except BaseException:
                code = 3
            os._exit(code)
        opened = typed = 0
        try:
            while time.monotonic() < stop_at:
                try:
                    if mode in ("preload", "mmap"):
                        ds = jasper.JASPERSteeringDataset(target, "train", use_mmap=(mode == "mmap"))
                        served = {n: digest(t) for n, t in served_by_dataset(ds).items()}
                        ds.close()
                    else:
                        jasper.validate(target, deep=True, progress=False)
                        served = {n: digest(t) for n, t in served_by_store(target).items()}
                except JasperError:
                    typed += 1
                    continue
                opened += 1
                a = {n for n, v in served.items() if v == ref.digests.get(n)}
                b = {n for n, v in served.items() if v == ref.alt_digests.get(n)}
                if not (a == set(served) or b == set(served)):
                    raise Verdict(Outcome.SILENT_WRONG, f"{mode} open #{opened} during a commit "
                                  f"served a mix of generations: old {sorted(a - b)[:4]}, new "
                                  f"{sorted(b - a)[:4]}, neither "
                                  f"{sorted(set(served) - a - b)[:4]}")
        finally:
            os.waitpid(pid, 0)
        _check_generation(target, {"seed0": ref.digests, "seed1": ref.alt_digests},
                          "after the writer stopped")
        if opened == 0:
            raise Verdict(Outcome.TYPED, f"no open succeeded during {seconds:.0f} s of commits "
                          f"({typed} typed errors)")
    return body
