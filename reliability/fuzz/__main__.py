"""``python -m reliability.fuzz``: run every fuzz target for a while and report findings."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from reliability.fuzz import TARGETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability.fuzz", description=__doc__)
    p.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    p.add_argument("--runs", type=int, help="stop after this many inputs (with --seed: a "
                   "deterministic run, for CI)")
    p.add_argument("--seed", type=int, help="libFuzzer's random seed")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--artifacts", type=Path, help="where failing inputs are saved")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="targets run at once (default: one per CPU)")
    p.add_argument("--json", type=Path, help="write per-target results here")
    p.add_argument("--report", type=Path, help="append a markdown summary here")
    args = p.parse_args(argv)
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="jasper-fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    names = args.targets.split(",")
    jobs = max(1, min(args.jobs, len(names)))
    running: list[tuple[str, subprocess.Popen[str]]] = []
    done: dict[str, tuple[int, str]] = {}
    pending = list(names)
    while pending or running:
        while pending and len(running) < jobs:  # targets run side by side, one per core
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "reliability.fuzz.target", name,
                   f"-max_total_time={args.seconds}", "-timeout=20", "-rss_limit_mb=4096",
                   f"-artifact_prefix={artifacts}/{name}-", "-print_final_stats=1"]
            cmd += [f"-runs={args.runs}"] if args.runs else []
            cmd += [f"-seed={args.seed}"] if args.seed is not None else []
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True)))
        name, proc = running.pop(0)
        out, _ = proc.communicate(timeout=args.seconds * 4 + 300)
        done[name] = (proc.returncode, out)
    rows, failed = [], 0
    for name in names:
        code, log = done[name]
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        cov = re.findall(r"cov: (\d+)", log)
        finding = ""
        if code != 0:
            failed += 1
            exc = re.findall(r"^(?:\w+\.)*\w+(?:Error|Exception|Interrupt)\b.*$", log, re.M)
            finding = (exc[-1] if exc else f"exit {code}: " + " ".join(log.strip().splitlines()[-2:]))[:300]
        rows.append((name, runs[-1] if runs else "?", cov[-1] if cov else "?",
                     "FINDING" if code else "ok", finding))
        print(f"fuzz {name}: {rows[-1][3]}, {rows[-1][1]} inputs, coverage {rows[-1][2]}"
              + (f": {finding} (inputs in {artifacts})" if finding else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("target", "inputs", "coverage", "result",
                                                     "finding"), r)) for r in rows], indent=1))
    if args.report:
        lines = ["", f"Fuzzing ({args.seconds} s per target):", "",
                 "| target | inputs | coverage | result | finding |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {n} | {r} | {c} | {o} | {f.replace('|', '/')} |" for n, r, c, o, f in rows]
        with open(args.report, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
