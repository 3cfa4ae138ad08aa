"""MkDocs hooks of the jasper documentation site (``hooks:`` in mkdocs.yml).

Two jobs, both so that the site cannot drift from the code or from the measurements:

- **Generated tables.** A page line holding only ``<!-- jasper:NAME -->`` is replaced by the table
  ``NAME`` built from the code itself: the array catalogue from :mod:`jasper.schema`, the default
  step curriculum from :mod:`jasper.curriculum`, the batch keys from :mod:`jasper.dataset`. An
  unknown name fails the build, and so does a batch key without a description here (a key added to
  the code must be documented).
- **Included files.** ``<!-- jasper:include PATH -->`` includes a file of the repository (a
  package's README or changelog) with its headings one level down; ``<!-- jasper:changelogs -->``
  includes every package's ``CHANGELOG.md``, so a new package's changelog appears by itself.
- **The benchmark report.** The newest committed run under ``benchmarks/results/*-committed/`` is
  published as ``benchmarks/report.md`` with its charts beside it, so the performance page shows
  the charts of the report it quotes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"^<!-- jasper:([a-z_]+)(?: ([^ ]+))? -->$", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~)")

#: What each batch key holds. The key set must equal ``jasper.dataset.BATCH_KEYS``.
BATCH_CONTENT: dict[str, tuple[str, str, str]] = {
    "question_emb": ("[B, D]", "the tables' float dtype", "`question_embs[q]`"),
    "target_source_emb": ("[B, D]", "the tables' float dtype", "`source_embs[s]`"),
    "steering": ("[B, D]", "the steering arrays' float dtype",
                 "row `p` of the drawn variant's steering array; zeros for variant 0"),
    "negative_embs": ("[B, n_neg, D]", "the tables' float dtype",
                      "`source_embs[hard_negatives[p]]`"),
    "cluster_id": ("[B]", "int64", "`pair_cluster_id[p]`"),
    "relevance": ("[B]", "float32", "`pair_relevance[p]`"),
    "centroid_distance": ("[B]", "float32", "`centroid_distances[p]`"),
    "steering_variant": ("[B]", "int64", "0 zero, 1 centroid, 2 keyword, 3 residual"),
    "negative_tiers": ("[B, n_neg]", "int64", "`negative_tiers[p]`, widened to int64"),
}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _shape(spec: Any) -> str:
    from jasper.schema import Cols, Role

    tables = {"question_embs": "N_q", "source_embs": "N_s", "keyword_embs": "N_k",
              "centroid_embs": "N_c", "base_embeddings": "M", "steering_embeddings": "M"}
    rows = {
        Role.TABLE: tables.get(spec.name, "N"),
        Role.PAIR: "N_p",
        Role.SPLIT: "N_split",
        Role.CSR_OFFSETS: "N_p + 1",
        Role.CSR_VALUES: "total keyword ids",
        Role.SAMPLE: "N",
        Role.RECORD_OFFSETS: "N + 1",
        Role.RECORD_BYTES: "total bytes",
    }.get(spec.role, "?")
    if spec.rank == 1:
        return f"[{rows}]"
    cols = {Cols.EMBEDDING_DIM: "D", Cols.N_NEG: "n_neg", Cols.TWO: "2"}.get(
        spec.cols, getattr(spec.cols, "value", "?"))
    return f"[{rows}, {cols}]"


def _rules(spec: Any) -> str:
    from jasper.schema import PAIRS, Cols

    rules = []
    if spec.references:
        if spec.cols is Cols.TWO and len(spec.references) == 2:
            rules += [f"column {i} < rows of `{ref}`" for i, ref in enumerate(spec.references)]
        else:
            bound = "N_p (the number of pairs)" if spec.references[0] == PAIRS else \
                f"rows of `{spec.references[0]}`"
            rules.append(f"every value in [0, {bound})")
    if spec.finite:
        rules.append("no NaN or Inf")
    if spec.non_negative:
        rules.append("non-negative")
    if getattr(spec, "increasing", False):
        rules.append("strictly increasing")
    if getattr(spec, "mutable", False):
        rules.append("rows may be rewritten in place after writing")
    if spec.quality_range:
        lo, hi = spec.quality_range
        rules.append(f"in [{lo:g}, {hi:g}] (data-quality rule: a warning on open, an error "
                     "with `validate --strict`)")
    if spec.name == "hard_negatives":
        rules.append("should not be the pair's own source (data-quality rule)")
    if spec.name == "pair_keyword_offsets":
        rules.append("starts at 0, never decreases, ends at the length of `pair_keyword_ids`")
    if spec.name in ("train_idx", "val_idx", "test_idx"):
        others = [s for s in ("train_idx", "val_idx", "test_idx") if s != spec.name]
        rules.append(f"disjoint from `{others[0]}` and `{others[1]}`")
    return "; ".join(rules) or "-"


def _arrays_table(kind: str | None = None) -> str:
    from jasper import schema

    catalogue = schema.KINDS[kind].arrays if kind else schema.ARRAYS
    rows = []
    for spec in catalogue.values():
        dtypes = ", ".join(sorted(spec.dtypes, key=_dtype_order))
        rows.append([f"`{spec.name}`", spec.role.value, _shape(spec), dtypes, _rules(spec),
                     spec.description])
    return _table(["array", "role", "shape", "dtypes", "rules", "what it holds"], rows)


def _cluster_arrays_table() -> str:
    from jasper.schema import CLUSTER_KIND

    return _arrays_table(CLUSTER_KIND)


def _records_table() -> str:
    from jasper.schema import CLUSTER_RECORDS

    rows = []
    for rec in CLUSTER_RECORDS.values():
        rules = []
        if getattr(rec, "choices", None):
            rules.append("one of " + ", ".join(f"`{c}`" for c in rec.choices))
        if getattr(rec, "nullable", False):
            rules.append("may be null")
        rows.append([f"`{rec.name}`", f"`{rec.offsets_array}` + `{rec.bytes_array}`",
                     str(rec.encoding), "; ".join(rules) or "-", rec.description])
    return _table(["record", "stored as", "encoding", "rules", "what it holds"], rows)


def _dtype_order(name: str) -> tuple[int, str]:
    order = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
             "uint8"]
    return (order.index(name) if name in order else len(order), name)


def _steps_table() -> str:
    from jasper.curriculum import DEFAULT_STEPS, VARIANT_NAMES

    rows = []
    for i, (start, probs) in enumerate(DEFAULT_STEPS):
        end = DEFAULT_STEPS[i + 1][0] - 1 if i + 1 < len(DEFAULT_STEPS) else None
        epochs = f"{start}-{end}" if end is not None else f"{start} and later"
        rows.append([epochs, *(f"{p:g}" for p in probs)])
    return _table(["epochs", *VARIANT_NAMES], rows)


def _batch_table() -> str:
    from jasper.dataset import BATCH_KEYS

    if set(BATCH_KEYS) != set(BATCH_CONTENT):
        missing = sorted(set(BATCH_KEYS) - set(BATCH_CONTENT))
        extra = sorted(set(BATCH_CONTENT) - set(BATCH_KEYS))
        raise ValueError(f"docs/hooks.py BATCH_CONTENT is out of date with "
                         f"jasper.dataset.BATCH_KEYS: undocumented {missing}, gone {extra}")
    rows = [[f"`{k}`", *BATCH_CONTENT[k]] for k in BATCH_KEYS]
    return _table(["key", "shape", "dtype", "content"], rows)


def _variants_table() -> str:
    from jasper.schema import STEERING_ARRAYS, STEERING_VARIANTS, VARIANT_ALIASES

    rows = []
    for vid, name in enumerate(STEERING_VARIANTS):
        aliases = ", ".join(f"`{a}`" for a, n in VARIANT_ALIASES.items() if n == name) or "-"
        array = STEERING_ARRAYS[name]
        rows.append([str(vid), f"`{name}`", aliases, f"`{array}`" if array else "zeros"])
    return _table(["id", "name", "aliases", "served from"], rows)


def _tiers_table() -> str:
    from jasper.schema import NEGATIVE_TIERS

    return _table(["tier", "negative drawn from"],
                  [[str(t), what] for t, what in NEGATIVE_TIERS.items()])


TABLES: dict[str, Callable[[], str]] = {
    "arrays": _arrays_table,
    "cluster_arrays": _cluster_arrays_table,
    "cluster_records": _records_table,
    "default_steps": _steps_table,
    "batch_keys": _batch_table,
    "variants": _variants_table,
    "negative_tiers": _tiers_table,
}


def demote(markdown: str, levels: int = 1) -> str:
    """``markdown`` with every ATX heading outside code fences ``levels`` deeper."""
    out, fence = [], None
    for line in markdown.splitlines():
        m = FENCE.match(line)
        if m:
            fence = None if fence == m.group(1) else fence or m.group(1)
        elif fence is None and re.match(r"^#{1,5} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out) + "\n"


def include(path: str) -> str:
    """A repository file's text, headings demoted; a missing file fails the build."""
    target = (ROOT / path).resolve()
    if ROOT not in target.parents or not target.is_file():
        raise FileNotFoundError(f"docs: included file {path!r} is not a file of the repository")
    return demote(target.read_text())


def package_changelogs() -> list[Path]:
    """Every package's and example's CHANGELOG.md, jasper-core first."""
    found = sorted(ROOT.glob("packages/*/CHANGELOG.md")) + sorted(ROOT.glob("examples/*/CHANGELOG.md"))
    return sorted(found, key=lambda p: (p.parent.name != "jasper-core", p.parent.parent.name != "packages",
                                        p.parent.name))


def changelogs() -> str:
    parts = []
    for path in package_changelogs():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if text.startswith("# "):  # the file's own title: the section heading replaces it
            text = text.partition("\n")[2]
        parts.append(f"## {path.parent.name}\n\n_From `{rel}`._\n\n{demote(text)}")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        name, arg = match.group(1), match.group(2)
        if name == "include" and arg:
            return include(arg)
        if name == "changelogs":
            return changelogs()
        if name not in TABLES or arg:
            raise ValueError(f"{page.file.src_uri}: unknown generated content {match.group(0)!r}; "
                             f"known: include PATH, changelogs, {', '.join(TABLES)}")
        return TABLES[name]()

    return MARKER.sub(replace, markdown)


def _complete(run: Path) -> bool:
    """A run of the whole suite: a report, and no pytest selection (``-k``) narrowing it."""
    if not (run / "report.md").is_file():
        return False
    try:
        meta = json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return not meta.get("pytest_args") and not meta.get("gpu_only")


def committed_run() -> Path:
    """The newest committed run of the whole suite (directory names start with a UTC timestamp);
    partial runs (one question, a ``-k`` selection) are committed as evidence but not published."""
    runs = sorted(p for p in RESULTS.glob("*-committed") if _complete(p))
    if not runs:
        raise FileNotFoundError(f"no committed complete benchmark run under {RESULTS}")
    return runs[-1]


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File  # here, so tests can import this module without mkdocs

    run = committed_run()
    title, _, body = (run / "report.md").read_text().partition("\n")
    note = (f"\n!!! note \"Generated\"\n    This page is the committed benchmark run "
            f"`benchmarks/results/{run.name}/report.md`, published as it was written.\n")
    files.append(File.generated(config, "benchmarks/report.md", content=title + "\n" + note + body))
    for png in sorted(run.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{png.name}", abs_src_path=str(png)))
    return files
