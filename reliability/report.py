"""The campaign's table (docs/reliability.md) and findings list, from the case results."""

from __future__ import annotations

import datetime as _dt
import platform
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from reliability.runner import GOOD, Outcome, Result

COLUMNS = [o for o in Outcome]
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"

PLACEHOLDER = "No reliability figures have been recorded in the repository yet."

INTRO = """`nox -s reliability` runs every case below against every installed backend that can write
(found through the plugin registry, so a backend installed later joins without a change), each
case in its own forked process with a timeout and an address-space cap (`RLIMIT_AS`), and
regenerates the table between the markers. `python -m reliability --quick` runs a small
deterministic sample of every family; CI runs it through `tests/test_reliability_quick.py`.

Outcomes:

| outcome | meaning |
| --- | --- |
| ok | succeeded and served exactly the reference data |
| typed | failed with a `jasper.errors.JasperError` subclass (the wanted end for bad input) |
| untyped | failed with any other exception |
| crash | died from a signal, or exited without a Python traceback |
| hang | ran past its timeout (stretched by the load per CPU when it started, so waiting for a CPU is not a hang) |
| silent-wrong | succeeded but served data differing from the reference where a structural rule (any mode), the manifest's checksums (deep validation, convert) or the dataset's own directory (foreign data) could have caught it |
| undetected | succeeded with different data that no rule of the mode can see (preload and mmap do not verify checksums); reported, not a goal failure |
| lost | after a kill, a full disk or a race, neither the previous nor the new dataset is intact, or a source was damaged |
| leftover | a dead writer's scratch directory survived the next write |
| canary | a malicious pickle ran code |

The goal: 0 untyped, 0 crash, 0 hang, 0 silent-wrong, 0 lost, 0 leftover, 0 canary.

Families: **corpus** (every damage of `reliability/corpus.py`: truncations, bit flips in headers
and data, zeroed ranges, deleted / replaced / self-symlinked files, same-shape files swapped,
forged manifests, catalogue rows and HDF5 attributes) x {preload, mmap (rows where the backend
cannot map), validate, validate --deep, convert}; **region** (one byte flipped in every region of
every file: zip members, `.npy` headers, HDF5 object headers and extents, SQLite pages) x
{preload, deep}; **path-trust** (symlinks out of the dataset, FIFOs, `/dev/zero`, HDF5 external
links / external storage / virtual datasets, legacy files beside a dataset, `..` and absolute
catalogue paths); **pickle** (malicious pickles in every place a loader could meet one; a canary
file must never appear); **kill** (SIGKILL before every file-system step and at random times of
synth, overwrite, convert and `update_labels`; afterwards the previous or the new dataset must be
intact and pass deep validation, and the next write must leave no scratch directory);
**disk-full** (writes into a small tmpfs); **concurrent-writers** (two writers released at once at
one new target); **reader-during-commit** (readers opening while a writer replaces the dataset
must see one generation).
"""


def _counts(results: Iterable[Result]) -> Counter[Outcome]:
    return Counter(r.outcome for r in results)


def findings(results: Iterable[Result]) -> list[Result]:
    """Every result off the goal; a pristine write that failed at all is one too."""
    return [r for r in results if r.outcome not in GOOD
            or (r.family == "prepare" and r.outcome is not Outcome.OK)]


def goal_met(results: Iterable[Result]) -> bool:
    return not findings(results)


def summary(results: list[Result]) -> str:
    c = _counts(results)
    parts = ", ".join(f"{o.value}={c[o]}" for o in COLUMNS if c[o])
    return f"{len(results)} cases: {parts}; goal {'met' if goal_met(results) else 'NOT met'}"


def _table(results: list[Result]) -> str:
    by: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        by[(r.family, r.backend)].append(r)
    families = list(dict.fromkeys(r.family for r in results))
    backends = sorted({r.backend for r in results})
    head = "| family | backend | cases | " + " | ".join(o.value for o in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(COLUMNS))]
    for fam in families:
        for b in backends:
            rs = by.get((fam, b))
            if not rs:
                continue
            c = _counts(rs)
            cells = [(f"**{c[o]}**" if c[o] and o not in GOOD else str(c[o])) for o in COLUMNS]
            lines.append(f"| {fam} | {b} | {len(rs)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per backend, all families:")
    lines.append("")
    lines.append("| backend | cases | " + " | ".join(o.value for o in COLUMNS) + " |")
    lines.append("|" + " --- |" * (2 + len(COLUMNS)))
    for b in backends:
        rs = [r for r in results if r.backend == b]
        c = _counts(rs)
        cells = [(f"**{c[o]}**" if c[o] and o not in GOOD else str(c[o])) for o in COLUMNS]
        lines.append(f"| {b} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LABEL: list[str] = []  # set by ``python -m reliability.report --label``


def _stamp(quick: bool, seconds: float, results: list[Result]) -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    label = LABEL[-1] if LABEL else ("quick sample" if quick else "full campaign")
    took = f" in {seconds:.0f} s" if seconds else ""
    return (f"Last run: {now}, {label}, {len(results)} cases{took} on {platform.machine()} "
            f"({_cpus()} CPUs), Python {platform.python_version()}. {summary(results)}.")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _group(results: list[Result]) -> list[tuple[tuple[str, ...], list[Result]]]:
    """Findings grouped by family, backend, kind of damage, mode, outcome and exception type."""
    groups: dict[tuple[str, ...], list[Result]] = defaultdict(list)
    for r in findings(results):
        kind = re.split(r"[:@]", r.name, maxsplit=1)[0]
        groups[(r.family, r.backend, kind, r.mode, r.outcome.value, r.exception)].append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -len(kv[1])))


def _findings_md(results: list[Result], limit: int | None = None) -> str:
    lines = ["| family | backend | damage | mode | outcome | exception | cases | example (case: message) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups = _group(results)
    for key, rs in groups[:limit] if limit else groups:
        fam, b, kind, mode, outcome, exc = key
        ex = rs[0]
        msg = (ex.message or "").replace("|", "/").replace("\n", " ")[:220]
        where = f" [{ex.where}]" if ex.where else ""
        lines.append(f"| {fam} | {b} | {kind} | {mode} | {outcome} | {exc or '-'} | {len(rs)} | "
                     f"`{ex.name}`: {msg}{where} |")
    if len(lines) == 2:
        lines.append("| - | - | - | - | - | - | 0 | no findings |")
    return "\n".join(lines)


def _fuzz_md(fuzz: list[dict[str, str]]) -> str:
    if not fuzz:
        return ""
    lines = ["Fuzzing (atheris, coverage-guided; any exception but a JasperError is a finding):", "",
             "| target | inputs | coverage (edges) | result | finding |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {f['target']} | {f['inputs']} | {f['coverage']} | {f['result']} | "
              f"{str(f['finding']).replace('|', '/')} |" for f in fuzz]
    return "\n".join(lines) + "\n"


def write_table(path: Path, results: list[Result], *, quick: bool, seconds: float,
                fuzz: list[dict[str, str]] | None = None) -> None:
    """Replace the generated block of ``path`` (creating the file with its introduction if
    absent), keeping any prose around the markers."""
    block = "\n".join([BEGIN, "", INTRO, _stamp(quick, seconds, results), "", _table(results), "",
                       _fuzz_md(fuzz or []),
                       "Findings (grouped; the full list is in the JSON results):", "",
                       _findings_md(results, limit=80), "", END])
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Reliability\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text and PLACEHOLDER in text:
        text = text.replace(PLACEHOLDER, BEGIN + "\n" + END)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_findings(path: Path, results: list[Result], *, quick: bool, seconds: float,
                   fuzz: list[dict[str, str]] | None = None) -> None:
    """The findings list for routing fixes: every failing case with its exception and where."""
    lines = ["# Reliability findings", "", _stamp(quick, seconds, results), "", "## Grouped", "",
             _findings_md(results), "", "## Every failing case", ""]
    for r in findings(results):
        msg = (r.message or "").replace("\n", " ")[:300]
        lines.append(f"- `{r.key}` **{r.outcome.value}** {r.exception} "
                     f"{('[' + r.where + ']') if r.where else ''} {msg}")
    lines.append("")
    lines.append("## Table")
    lines.append("")
    lines.append(_table(results))
    lines.append("")
    lines.append(_fuzz_md(fuzz or []))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def load(paths: Iterable[Path]) -> list[Result]:
    """Results saved with ``--json`` (or the ``.partial.jsonl`` a run writes as it goes; several
    runs are concatenated, a later run's case with the same key replacing an earlier one)."""
    import json

    by_key: dict[str, Result] = {}
    for p in paths:
        text = Path(p).read_text()
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()]
                if str(p).endswith(".jsonl") else json.loads(text))
        for d in rows:
            d = dict(d)
            d["outcome"] = Outcome(d["outcome"])
            r = Result(**d)
            by_key[r.key] = r
    return list(by_key.values())


def main(argv: list[str] | None = None) -> int:
    """``python -m reliability.report RESULTS.json... [--table PATH] [--findings PATH]``: the
    table and findings of saved runs (e.g. one run per family, merged)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m reliability.report", description=main.__doc__)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--table", type=Path)
    p.add_argument("--findings", type=Path)
    p.add_argument("--seconds", type=float, default=0.0, help="campaign time to state")
    p.add_argument("--label", help="what the results are (default: full campaign)")
    p.add_argument("--fuzz-json", type=Path, help="results of `python -m reliability.fuzz --json`")
    args = p.parse_args(argv)
    fuzz = json.loads(args.fuzz_json.read_text()) if args.fuzz_json else []
    if args.label:
        LABEL.append(args.label)
    results = load(args.results)
    if args.table:
        write_table(args.table, results, quick=False, seconds=args.seconds, fuzz=fuzz)
    if args.findings:
        write_findings(args.findings, results, quick=False, seconds=args.seconds, fuzz=fuzz)
    print(summary(results))
    return 0 if goal_met(results) and all(f["result"] == "ok" for f in fuzz) else 1


if __name__ == "__main__":
    raise SystemExit(main())
