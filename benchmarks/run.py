#!/usr/bin/env python
"""Run jasper's benchmark suite and write its report.

    python benchmarks/run.py [--full] [--smoke] [--gpu-only] [--pairs N] [--out DIR] [pytest args...]

Writes, under ``benchmarks/results/<UTC timestamp>/`` (or ``--out``): ``benchmark.json`` (the raw
pytest-benchmark JSON), ``machine.json``, ``outcomes.json`` (passed / skipped with reasons),
``report.md`` (one table per question of the benchmark issue) and PNG charts. ``--report DIR``
rebuilds the report of an earlier run without measuring again. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from benchlib.config import ENV_CONFIG, make_config  # noqa: E402


class Outcomes:
    """A pytest plugin that keeps every test's outcome and skip reason for the report."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            reason = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2]).removeprefix("Skipped: ")
            elif report.failed:
                reason = str(report.longrepr)[-2000:]
            self.items.append({"id": report.nodeid, "outcome": report.outcome,
                               "reason": reason, "duration_s": report.duration})


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help="the issue's grid: D 384/1024 x n_neg 8/32 x fp32/bf16 at 10^6 pairs")
    size.add_argument("--smoke", action="store_true",
                      help="a tiny dataset and one round of everything (CI)")
    ap.add_argument("--gpu-only", action="store_true",
                    help="only the GPU benchmarks (at 10^6 pairs unless --smoke/--pairs)")
    ap.add_argument("--pairs", type=int, default=None, help="override the number of pairs")
    ap.add_argument("--out", type=Path, default=None,
                    help="output directory (default benchmarks/results/<UTC timestamp>)")
    ap.add_argument("--report", type=Path, default=None, metavar="DIR",
                    help="only rebuild the report of an earlier run in DIR")
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = parse(argv)
    from benchlib.report import write_report

    if args.report is not None:
        print(write_report(args.report))
        return 0
    mode = "smoke" if args.smoke else "full" if args.full else "gpu" if args.gpu_only else "default"
    cfg = make_config(mode, args.pairs)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = (args.out or BENCH_DIR / "results" / stamp).absolute()
    out.mkdir(parents=True, exist_ok=True)

    os.environ[ENV_CONFIG] = cfg.to_json()
    os.environ["JASPER_BENCH_JSON"] = str(out / "benchmark.json")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from benchlib.machine import machine_info

    t0 = time.perf_counter()
    import pytest

    try:
        import pytest_benchmark  # noqa: F401

        plugin_args = [f"--benchmark-json={out / 'benchmark.json'}",
                       "--benchmark-columns=median,rounds", "--benchmark-sort=fullname"]
        if os.environ.get("JASPER_BENCH_NO_PLUGIN") == "1":
            plugin_args = ["-p", "no:benchmark"]
    except ImportError:
        plugin_args = []
    outcomes = Outcomes()
    selection = ["-m", "gpu"] if args.gpu_only else []
    # storage first: its cold reads need pages no earlier benchmark still maps
    modules = [str(BENCH_DIR / f"bench_{m}.py") for m in ("storage", "memory", "serving", "derived", "gpu", "zarr")]
    code = pytest.main([
        *modules, "--rootdir", str(ROOT), "-o", "python_files=bench_*.py",
        "-p", "no:cacheprovider", "-q", "-rs", *selection, *plugin_args, *pytest_args,
    ], plugins=[outcomes])
    wall = time.perf_counter() - t0
    (out / "outcomes.json").write_text(json.dumps(outcomes.items, indent=1))
    (out / "machine.json").write_text(json.dumps(machine_info(), indent=1))
    (out / "run.json").write_text(json.dumps({
        "mode": mode, "gpu_only": args.gpu_only,
        "device": os.environ.get("JASPER_BENCH_DEVICE", "cuda"), "config": json.loads(cfg.to_json()),
        "wall_s": wall, "started_utc": stamp, "commit": _git_commit(),
        "pytest_args": pytest_args, "pytest_exit": int(code),
    }, indent=1))
    if not (out / "benchmark.json").is_file():
        print(f"no benchmark results were written (pytest exit {int(code)})", file=sys.stderr)
        return int(code) or 1
    report = write_report(out)
    print(f"\nreport: {report} ({wall:.0f} s)")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
