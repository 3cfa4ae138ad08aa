"""The command line as a user meets it: damaged datasets through ``jasper info / validate /
convert`` (one line on stderr, never a traceback), bad arguments, ``--overwrite`` aimed at
things that are not a jasper dataset (nothing the command did not write may disappear), and
Ctrl-C during a write (exit 130, nothing partial, nothing swallowed)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from reliability import corpus
from reliability.families import _sample
from reliability.faults import _after_fault, _fork_run, _leftovers, _setup_write
from reliability.ops import convert_target
from reliability.reference import Reference
from reliability.runner import Case, Outcome, Verdict

EXIT_INTERRUPTED = 130


def _cli(argv: list[str], work: Path) -> tuple[int, str, str]:
    """Run ``jasper ARGV`` in this process; returns (exit code, stdout, stderr). A SystemExit
    of argparse is its exit code; anything else escaping ``main`` propagates (untyped)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from jasper.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = int(main(["--no-progress", *argv] if argv[:1] != ["--no-progress"] else argv))
        except SystemExit as exc:
            code = int(exc.code) if isinstance(exc.code, int) else 2
    (work / "cli.out").write_text(out.getvalue())
    (work / "cli.err").write_text(err.getvalue())
    return code, out.getvalue(), err.getvalue()


def _judge_cli(code: int, out: str, err: str, what: str) -> None:
    """Exit 0, or 1/2 with one line on stderr and no traceback; a failure is reported typed."""
    if "Traceback (most recent call last)" in err or "Traceback (most recent call last)" in out:
        last = [ln for ln in err.splitlines() if ln.strip()][-1:]
        raise Verdict(Outcome.UNTYPED, f"{what}: the CLI printed a traceback: {last}")
    if code == 0:
        if "pairs=?" in out:
            raise Verdict(Outcome.SILENT_WRONG, f"{what}: exit 0 with an unknown pair count "
                          f"(pairs=?): the wrong backend read the dataset")
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code not in (1, 2):
        raise Verdict(Outcome.CRASH, f"{what}: exit {code}: {lines[-1:]}")
    if code == 1 and len(lines) != 1:
        raise Verdict(Outcome.UNTYPED, f"{what}: exit 1 but {len(lines)} lines on stderr: "
                      f"{lines[:3]}")
    raise Verdict(Outcome.TYPED, f"{what}: exit {code}: {lines[-1][:400] if lines else ''}")


# --- damaged datasets through the CLI -----------------------------------------------------------
def cli_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    cases: list[Case] = []
    for backend, ref in refs.items():
        muts = corpus.mutations(ref)
        muts = _sample(muts, 4 if quick else 40)
        for i, mut in enumerate(muts):
            cmds = _commands(ref, backends)
            cmd_names = list(cmds)
            picked = [cmd_names[i % len(cmd_names)]] if quick else cmd_names
            for name in picked:
                cases.append(Case("cli", backend, mut[0], name, _damaged_body(ref, mut, cmds[name])))
        cases += _overwrite_cases(ref, backends, quick)
        cases.append(Case("cli", backend, "wrong-backend-forced", "info",
                          _wrong_backend_body(ref, backends)))
    bad_args = [["synth", "{d}", "--pairs", "0"], ["synth", "{d}", "--dim", "0"],
                ["synth", "{d}", "--neg", "0"], ["synth", "{d}", "--clusters", "0"],
                ["synth", "{d}", "--pairs", "-5"], ["synth", "{d}", "--seed", "-1"],
                ["synth", "{d}", "--backend", "nope"], ["synth", "{d}", "-o", "level=9"],
                ["info", "{d}/missing"], ["validate", "/dev/null"],
                ["convert", "{d}/missing", "{d}/out", "--to", "pt"]]
    if quick:
        bad_args = bad_args[:3]
    for argv in bad_args:
        cases.append(Case("cli", "cli", " ".join(a.replace("{d}", "D") for a in argv), argv[0],
                          _bad_args_body(argv)))
    return cases


def _commands(ref: Reference, backends: list[str]) -> dict[str, Callable[[Path, Path], list[str]]]:
    to = convert_target(ref.backend, backends)
    return {
        "info": lambda d, _w: ["info", str(d)],
        "validate": lambda d, _w: ["validate", str(d)],
        "validate --deep": lambda d, _w: ["validate", str(d), "--deep"],
        "convert": lambda d, w: ["convert", str(d), str(w / "converted"), "--to", to],
    }


def _damaged_body(ref: Reference, mut: corpus.Mutation,
                  argv: Callable[[Path, Path], list[str]]) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        d = corpus.apply(ref, mut, work / "ds")
        args = argv(d, work)
        code, out, err = _cli(args, work)
        _judge_cli(code, out, err, f"jasper {args[0]}")
    return body


def _bad_args_body(argv: list[str]) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        args = [a.replace("{d}", str(work / "d")) for a in argv]
        code, out, err = _cli(args, work)
        _judge_cli(code, out, err, "jasper " + " ".join(argv))
    return body


def _wrong_backend_body(ref: Reference, backends: list[str]) -> Callable[[Path], None]:
    """Item 14: forcing a backend that did not write the dataset must be a clear error."""
    def body(work: Path) -> None:
        other = convert_target(ref.backend, backends)
        d = ref.copy_to(work / "ds")
        code, out, err = _cli(["info", str(d), "--backend", other], work)
        _judge_cli(code, out, err, f"jasper info --backend {other} on a {ref.backend} dataset")
    return body


# --- --overwrite aimed at the wrong thing (item 1) ----------------------------------------------
def _user_files(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    files = {"thesis.tex": b"\\documentclass{article}", "notes/todo.txt": b"buy milk"}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return files


def _files_intact(d: Path, files: dict[str, bytes], what: str) -> None:
    lost = [rel for rel, data in files.items()
            if not (d / rel).is_file() or (d / rel).read_bytes() != data]
    if lost:
        raise Verdict(Outcome.LOST, f"{what}: user files gone or changed: {lost}")


def _overwrite_cases(ref: Reference, backends: list[str], quick: bool) -> list[Case]:
    b = ref.backend
    scenarios: list[tuple[str, Callable[[Path], None]]] = [
        ("synth-over-user-dir", lambda w: _over_user_dir(w, ["synth", "{t}", "--pairs", "50",
                                                             "--dim", "8", "--backend", b,
                                                             "--overwrite"])),
        ("convert-over-user-dir", lambda w: _over_user_dir(w, ["convert", str(ref.ds), "{t}",
                                                               "--to", b, "--overwrite"])),
        ("synth-over-symlink-to-user-dir", lambda w: _over_symlink(w, b)),
        ("convert-into-parent-of-source", lambda w: _convert_related(w, ref, "parent")),
        ("convert-onto-itself", lambda w: _convert_related(w, ref, "same")),
        ("convert-into-source-subdir", lambda w: _convert_related(w, ref, "child")),
        ("write_store-over-user-dir", lambda w: _write_store_over_user_dir(w, ref)),
    ]
    if quick:
        scenarios = scenarios[:1] + scenarios[3:4]
    return [Case("cli", b, name, "--overwrite", fn) for name, fn in scenarios]


def _over_user_dir(work: Path, argv: list[str]) -> None:
    target = work / "user"
    files = _user_files(target)
    args = [a.replace("{t}", str(target)) for a in argv]
    code, out, err = _cli(args, work)
    _files_intact(target, files, f"jasper {' '.join(argv[:1])} --overwrite onto a user directory")
    if code == 0:
        raise Verdict(Outcome.LOST, "--overwrite replaced a directory that is not a jasper "
                      "dataset and exited 0")
    _judge_cli(code, out, err, "overwrite onto a user directory")


def _over_symlink(work: Path, backend: str) -> None:
    user = work / "elsewhere"
    files = _user_files(user)
    link = work / "data" / "ds"
    link.parent.mkdir(parents=True)
    link.symlink_to(user)
    code, out, err = _cli(["synth", str(link), "--pairs", "50", "--dim", "8", "--backend", backend,
                           "--overwrite"], work)
    _files_intact(user, files, "synth --overwrite onto a symlink to a user directory")
    _judge_cli(code, out, err, "synth --overwrite onto a symlink")


def _convert_related(work: Path, ref: Reference, how: str) -> None:
    parent = work / "project"
    src = ref.copy_to(parent / "ds")
    sibling = _user_files(parent / "sibling")
    dst = {"parent": parent, "same": src, "child": src / "inner"}[how]
    code, out, err = _cli(["convert", str(src), str(dst), "--to", ref.backend, "--overwrite"], work)
    _files_intact(parent / "sibling", sibling, f"convert --overwrite into the {how} of the source")
    from reliability.reference import store_digests

    try:
        same = store_digests(src) == ref.digests
    except Exception as exc:
        raise Verdict(Outcome.LOST, f"convert --overwrite ({how}): the source no longer reads: "
                      f"{type(exc).__name__}: {exc}"[:400]) from None
    if not same:
        raise Verdict(Outcome.LOST, f"convert --overwrite ({how}): the source changed")
    if code == 0 and how != "child":
        raise Verdict(Outcome.LOST, f"convert --overwrite ({how}) exited 0")
    _judge_cli(code, out, err, f"convert --overwrite ({how})")


def _write_store_over_user_dir(work: Path, ref: Reference) -> None:
    from jasper.manifest import Manifest
    from jasper.store import open_store, write_store

    target = work / "user"
    files = _user_files(target)
    with open_store(ref.ds) as r:
        arrays = {n: r.read(n) for n in r.array_names()}
    try:
        write_store(target, arrays, Manifest.load(ref.ds), backend=ref.backend, overwrite=True)
    finally:
        _files_intact(target, files, "write_store(overwrite=True) onto a user directory")
    raise Verdict(Outcome.LOST, "write_store(overwrite=True) replaced a directory that is not a "
                  "jasper dataset")


# --- Ctrl-C during a write (item 5) -------------------------------------------------------------
def interrupt_cases(refs: dict[str, Reference], backends: list[str], quick: bool) -> list[Case]:
    cases: list[Case] = []
    for backend, ref in refs.items():
        pts = [(op, f) for op in ("synth", "overwrite", "convert")
               for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
        if quick:
            pts = _sample(pts, 2)
        for op, f in pts:
            cases.append(Case("interrupt", backend, f"{op}@{f}", op,
                              _interrupt_body(ref, refs, backends, op, f), timeout=90))
    return cases


def _cli_argv(op: str, ref: Reference, refs: dict[str, Reference], backends: list[str],
              target: Path, src: Path | None) -> list[str]:
    n = ["--pairs", "200", "--dim", "16", "--neg", "2", "--clusters", "4", "--seed", "1",
         "--name", "ds", "--backend", ref.backend]
    if op == "synth":
        return ["synth", str(target), *n]
    if op == "overwrite":
        return ["synth", str(target), *n, "--overwrite"]
    assert src is not None
    return ["convert", str(src), str(target), "--to", ref.backend]


def _interrupt_body(ref: Reference, refs: dict[str, Reference], backends: list[str], op: str,
                    frac: float) -> Callable[[Path], None]:
    def body(work: Path) -> None:
        def cli_write(target: Path, src: Path | None, report: Path) -> Callable[[], None]:
            def fn() -> None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                try:
                    code, _out, err = _cli(_cli_argv(op, ref, refs, backends, target, src),
                                           report.parent)
                except KeyboardInterrupt:  # escaped jasper's main: a traceback for the user
                    code, err = -1, "KeyboardInterrupt escaped the CLI"
                report.write_text(json.dumps({"code": code, "end": time.monotonic(),
                                              "err": err[-500:]}))
            return fn

        dry = work / "dry"
        target, _w, _a, src, _d = _setup_write(op, ref, refs, backends, dry)
        t0 = time.monotonic()
        _fork_run(cli_write(target, src, dry / "cli.json"))
        duration = time.monotonic() - t0
        run = work / "run"
        target, _w, allowed, src, src_digests = _setup_write(op, ref, refs, backends, run)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the interrupted command
            try:
                cli_write(target, src, run / "cli.json")()
            finally:
                os._exit(0)
        # interrupt inside the write: once its scratch directory exists beside the target
        started = time.monotonic()
        while not _leftovers(target) and time.monotonic() - started < 10:
            time.sleep(0.001)
        time.sleep(frac * max(0.0, duration - (time.monotonic() - started)))
        t_sig = time.monotonic()
        os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        info = json.loads((run / "cli.json").read_text()) if (run / "cli.json").exists() else {}
        what = f"SIGINT after {frac * duration:.2f} s of {duration:.2f} s"
        if not info:
            raise Verdict(Outcome.CRASH, f"{what}: the command died without an exit code "
                          f"(status {status})")
        if info["code"] == -1:
            raise Verdict(Outcome.UNTYPED, f"{what}: KeyboardInterrupt escaped jasper's main "
                          "(a traceback instead of 'interrupted' and exit 130)")
        if info["code"] == 0 and info["end"] > t_sig + 0.05:
            raise Verdict(Outcome.UNTYPED, f"{what}: the interrupt was swallowed; the command "
                          f"ran on {info['end'] - t_sig:.2f} s and exited 0: {info['err'][-200:]}")
        if info["code"] not in (0, EXIT_INTERRUPTED):
            raise Verdict(Outcome.UNTYPED, f"{what}: exit {info['code']} instead of 130: "
                          f"{info['err'][-300:]}")
        left = _leftovers(target)
        if left:
            raise Verdict(Outcome.LEFTOVER, f"{what}: the interrupted write left {left}")
        _after_fault(target, allowed, src, src_digests, ref.backend, what)
    return body

