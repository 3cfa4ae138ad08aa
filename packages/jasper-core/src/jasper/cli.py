"""The ``jasper`` command line: backends, synth, info, validate, convert, demo.

Exit codes: 0 success, 1 a jasper error (bad dataset, failed validation...), 2 bad usage,
130 interrupted. Errors print one line without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jasper import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Writers ``jasper synth`` picks by default, in order, among the installed ones.
DEFAULT_WRITERS = ("pt", "hdf5", "memmap-sqlite")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``jasper synth: error: ...``), exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing (no "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("%(default)" in text or "(default" in text or action.default is None
                or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _count(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _steering_variants(text: str) -> list[str]:
    """An argparse type: a comma list of steering variants a derived dataset may keep."""
    from jasper.steering import KEEPABLE

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in KEEPABLE:
            raise argparse.ArgumentTypeError(f"{name!r} is not a steering variant; choose from "
                                             f"{', '.join(KEEPABLE)}")
    if not names:
        raise argparse.ArgumentTypeError(f"name a variant: {', '.join(KEEPABLE)}")
    return names


def _kept(args: argparse.Namespace, derived: bool, needs: str) -> tuple[str, ...]:
    """``--keep-steering``'s variants (all occurrences), checked: a one-line error when they
    break a rule or come without ``needs`` (the flag that makes the steering derived)."""
    from jasper.steering import kept_variants

    given = [n for group in (args.keep_steering or []) for n in group]
    if not given:
        return ()
    if not derived:
        raise SystemExit(f"jasper {args.command}: error: --keep-steering names the variants a "
                         f"derived dataset keeps stored: it needs {needs}")
    try:
        return kept_variants(given)
    except ValueError as exc:
        raise SystemExit(f"jasper {args.command}: error: --keep-steering: {exc}") from None


def _installed_names() -> list[str]:
    """Installed backend names from metadata (no backend module is imported)."""
    from jasper.registry import list_backends

    try:
        return list(list_backends())
    except Exception:  # a broken plugin must not break the parser; it is reported on use
        return []


def default_writer() -> str:
    """The backend ``jasper synth`` writes with when none is given: the first installed of
    :data:`DEFAULT_WRITERS`, else any installed backend that can write."""
    from jasper.errors import BackendNotFoundError
    from jasper.registry import get_backend, list_backends

    installed = list_backends()
    for name in (*DEFAULT_WRITERS, *installed):
        if name in installed:
            try:
                if get_backend(name).capabilities.write:
                    return name
            except Exception:
                continue
    from jasper.registry import install_hint

    raise BackendNotFoundError("(a writer)", installed, install_hint("jasper-pt"))


def _parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with JSON values where they parse (``level=4`` -> 4, ``shuffle=true``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts = dict(args.option or [])
    if getattr(args, "compression", None) is not None:
        opts["compression"] = args.compression
    if getattr(args, "compression_level", None) is not None:
        opts["compression_level"] = args.compression_level
    return opts


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


# --- commands ---------------------------------------------------------------------------------
def cmd_backends(args: argparse.Namespace) -> int:
    from jasper.registry import get_backend, install_hint, installable_backends, list_backends

    installed = []
    # capabilities need each backend's class (and so its libraries, torch included); the plain
    # listing is metadata only and instant
    with_caps = args.json or args.capabilities
    for name, info in list_backends().items():
        entry = info.to_dict()
        if with_caps:
            try:
                flags = get_backend(name).capabilities
                entry["capabilities"] = {k: bool(v) for k, v in vars(flags).items()}
            except Exception as exc:  # a broken backend is reported, not fatal to the listing
                entry["error"] = f"{type(exc).__name__}: {exc}"
        installed.append(entry)
    missing = [{"name": k.name, "package": k.package, "description": k.description,
                "install": install_hint(k.package)} for k in installable_backends().values()]
    if args.json:
        print(json.dumps({"installed": installed, "installable": missing}, indent=2))
        return EXIT_OK
    print("Installed backends:")
    if not installed:
        print(f"  (none) - {install_hint('jasper-pt')}")
    for e in installed:
        caps = ", ".join(k for k, v in (e.get("capabilities") or {}).items() if v)
        origin = f"{e['distribution']} {e['version']}" if e["distribution"] else "run-time"
        print(f"  {e['name']:<15} {origin:<28} {e['description']}")
        if caps:
            print(f"  {'':<15} capabilities: {caps}")
        if "error" in e:
            print(f"  {'':<15} ERROR: {e['error']}")
    if missing:
        print("Installable:")
        for m in missing:
            print(f"  {m['name']:<15} {m['package']:<28} {m['description']}")
            print(f"  {'':<15} install: {m['install']}")
    if not with_caps:
        print("(jasper backends --capabilities also lists what each backend can do)")
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    import time

    if args.kind == "cluster-labeled":
        from jasper.cluster_kind import write_synthetic_cluster_labeled
        from jasper.store import dir_size

        backend = args.backend or default_writer()
        how = "" if args.backend else " (the default: first installed of " + ", ".join(
            DEFAULT_WRITERS) + "; choose with --backend)"
        t0 = time.perf_counter()
        out = write_synthetic_cluster_labeled(
            args.path, n_samples=args.samples, embedding_dim=args.dim,
            n_clusters=args.clusters, seed=args.seed, backend=backend,
            overwrite=args.overwrite, progress=_progress(args), **_options(args),
        )
        print(f"wrote cluster-labeled dataset {out} with backend {backend!r}{how}: "
              f"{args.samples:,} samples, D={args.dim}, {args.clusters} clusters, "
              f"{_mib(dir_size(out))} in {time.perf_counter() - t0:.1f} s")
        return EXIT_OK

    from jasper.store import dir_size
    from jasper.synth import SynthConfig, write_synthetic

    cfg = SynthConfig(
        n_pairs=args.pairs, embedding_dim=args.dim, n_neg=args.neg, n_clusters=args.clusters,
        dtype=args.dtype, seed=args.seed, dataset_name=args.name or Path(args.path).name,
        derived_steering=args.derived_steering, compact_indices=not args.int64_indices,
        keep_steering=_kept(args, args.derived_steering, "--derived-steering"),
    )
    backend = args.backend or default_writer()
    how = "" if args.backend else " (the default: first installed of " + ", ".join(
        DEFAULT_WRITERS) + "; choose with --backend)"
    t0 = time.perf_counter()
    out = write_synthetic(args.path, cfg, backend=backend, overwrite=args.overwrite,
                          progress=_progress(args), **_options(args))
    print(f"wrote {out} with backend {backend!r}{how}: {cfg.n_pairs:,} pairs, "
          f"D={cfg.embedding_dim}, n_neg={cfg.n_neg}, {cfg.dtype}, {_mib(dir_size(out))} in "
          f"{time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def _require_dir(path: str) -> None:
    """Fail fast on a missing dataset, before the imports that opening one needs (torch).
    URLs (``s3://...``) are left to opening, which follows the store's pointer."""
    if "://" in path and not path.startswith("file://"):
        return
    p = Path(path.removeprefix("file://"))
    # an interrupted commit's old dataset beside it is restored by opening: leave that to open
    if not p.is_dir() and not any(p.parent.glob(f".{p.name}.jasper-old-*")):
        from jasper.errors import DatasetNotFoundError

        raise DatasetNotFoundError(path, hint="Check the path; `jasper synth DIR` creates a "
                                              "dataset")


def cmd_info(args: argparse.Namespace) -> int:
    _require_dir(args.path)
    from jasper.store import dir_size, open_store

    with open_store(args.path, args.backend) as reader:
        m = reader.manifest
        arrays = {n: reader.info(n) for n in reader.array_names()}
        data: dict[str, Any] = {
            "path": str(reader.path),
            "backend": reader.backend_name,
            "size_bytes": dir_size(reader.path),
            "kind": m.dataset_kind,
            "schema_version": m.schema_version,
            "writer": m.writer,
            "dataset_name": m.dataset_name,
            "embedding_dim": m.embedding_dim,
            "n_neg": m.n_neg,
            "n_clusters": m.n_clusters,
            "created_at": m.created_at,
            "splits": {s: int(arrays[f"{s}_idx"].shape[0]) for s in ("train", "val", "test")
                       if f"{s}_idx" in arrays},
            "arrays": {n: {"shape": list(i.shape), "dtype": i.dtype_name,
                           "bytes": i.nbytes} for n, i in arrays.items()},
        }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"{data['path']}  [{data['backend']}]  {_mib(data['size_bytes'])}")
    era = "original system (seed-era manifest)" if m.is_seed_era else f"schema {m.schema_version}"
    print(f"  name: {data['dataset_name']}   created: {data['created_at']}   {era}")
    from jasper.kinds import kind_job

    kind_summary = kind_job(m.dataset_kind, "summary")
    if kind_summary is not None:
        print(kind_summary(m, arrays))
    else:
        print(f"  D={m.embedding_dim}  n_neg={m.n_neg}  clusters={m.n_clusters}  "
              f"pairs={arrays['pair_index'].shape[0] if 'pair_index' in arrays else '?'}")
    print("  splits: " + ", ".join(f"{k}={v:,}" for k, v in data["splits"].items()))
    for n, a in data["arrays"].items():
        print(f"  {n:<27} {a['dtype']:<9} {tuple(a['shape'])!s:<18} {_mib(a['bytes']):>14}")
    return EXIT_OK


def _kind_of(path: str) -> str:
    """The dataset kind at ``path`` as its manifest says (a directory without one is read by a
    backend's foreign-layout reader: today only cluster-labeled ``dataset.db``)."""
    from jasper.errors import JasperError
    from jasper.manifest import MANIFEST_NAME, Manifest

    if not (Path(path) / MANIFEST_NAME).exists():
        return "cluster-labeled" if (Path(path) / "dataset.db").exists() else "jasper-steering"
    try:
        return Manifest.load(path).dataset_kind
    except JasperError:
        return "jasper-steering"


def cmd_validate(args: argparse.Namespace) -> int:
    _require_dir(args.path)
    import warnings

    from jasper.validation import DataQualityWarning, validate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataQualityWarning)
        report = validate(args.path, deep=args.deep, strict=args.strict, backend=args.backend,
                          progress=_progress(args))
    if args.json:
        kind = _kind_of(args.path)
        counted = {"n_samples": report.n_pairs} if kind == "cluster-labeled" else {
            "n_pairs": report.n_pairs}
        print(json.dumps({
            "path": str(report.path), "ok": report.ok, "kind": kind, **counted,
            "seconds": report.seconds, "pairs_per_second": report.pairs_per_second,
            "checksums_verified": report.checksums_verified,
            "findings": [vars(f) for f in report.findings],
        }, indent=2))
    else:
        what = "deep " if args.deep else ""
        items = "samples" if _kind_of(args.path) == "cluster-labeled" else "pairs"
        print(f"{report.path}: {what}validation passed for {report.n_pairs:,} {items} in "
              f"{report.seconds:.2f} s ({report.pairs_per_second:,.0f} {items}/s)"
              + (f"; {report.checksums_verified} checksums verified" if args.deep else ""))
        for f in report.findings:
            print(f"  warning: {f.message}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    _require_dir(args.src)
    from jasper.store import convert

    report = convert(args.src, args.dst, to=args.to, src_backend=args.src_backend,
                     overwrite=args.overwrite, progress=_progress(args),
                     derive_steering=args.derive_steering, atol=args.atol, rtol=args.rtol,
                     keep_steering=_kept(args, args.derive_steering is not None,
                                         "--derive-steering"),
                     **_options(args))
    print(f"source: {report.src} ({report.src_backend}) {_mib(report.src_bytes)}")
    print(f"target: {report.dst} ({report.dst_backend}) {_mib(report.dst_bytes)}")
    print(report.options_line())
    if report.derived is not None:
        print(report.derived)
    print(f"saving: {report.saving * 100:+.1f}%  ({report.seconds:.1f} s, bit-exact: checksums match)")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    import time

    from jasper.build import BuildConfig, build_dataset, read_table
    from jasper.store import dir_size

    backend = args.backend or default_writer()
    ratios = tuple(float(x) for x in args.split.split(","))
    if len(ratios) != 3:
        raise SystemExit("jasper build: error: --split takes three ratios, e.g. 0.8,0.1,0.1")
    cfg = BuildConfig(n_neg=args.neg, n_clusters=args.clusters, dtype=args.dtype, seed=args.seed,
                      dataset_name=args.name or Path(args.out).name,
                      split_ratios=(ratios[0], ratios[1], ratios[2]),
                      compact_indices=not args.int64_indices)
    t0 = time.perf_counter()
    if args.from_chroma:
        from jasper.plugins import plugin_function
        from jasper.registry import install_hint

        build_from = plugin_function("jasper.build_sources", "chroma",
                                     install_hint("jasper-chroma"))
        out = build_from(args.from_chroma, args.out, backend=backend, overwrite=args.overwrite,
                         progress=_progress(args), config=cfg, options=_options(args),
                         kind=args.kind)
    else:
        if args.kind != "jasper-steering":
            raise SystemExit("jasper build: error: --kind cluster-labeled needs --from-chroma")
        if not (args.questions and args.sources and args.pairs):
            raise SystemExit("jasper build: error: give --questions, --sources and --pairs "
                             "(or --from-chroma LOCATION)")
        inputs: dict[str, Any] = {}
        pairs: Any = args.pairs
        if Path(args.pairs).suffix in {".parquet", ".pq", ".arrow", ".feather", ".ipc"}:
            cols = read_table(args.pairs)
            import numpy as np

            if "question" not in cols or "source" not in cols:
                from jasper.errors import FormatError

                raise FormatError(args.pairs, "a pairs table needs columns 'question' and "
                                  f"'source' (found: {', '.join(cols)})")
            pairs = np.stack([np.asarray(cols["question"]), np.asarray(cols["source"])], axis=1)
            for col, arg in (("relevance", "relevance"), ("cluster_id", "cluster_ids"),
                             ("keywords", "pair_keywords"), ("hard_negatives", "hard_negatives"),
                             ("negative_tiers", "negative_tiers")):
                if col in cols:
                    inputs[arg] = cols[col]
        for arg in ("relevance", "cluster_ids", "centroids", "keywords", "pair_keywords",
                    "hard_negatives", "negative_tiers"):
            if getattr(args, arg, None):
                inputs[arg] = getattr(args, arg)
        out = build_dataset(args.out, args.questions, args.sources, pairs, backend=backend,
                            overwrite=args.overwrite, progress=_progress(args),
                            options=_options(args), config=cfg, **inputs)
    from jasper.manifest import Manifest

    m = Manifest.load(out)
    if m.dataset_kind != "jasper-steering":
        print(f"wrote {m.dataset_kind} dataset {out} with backend {backend!r}: "
              f"D={m.embedding_dim}, {m.n_clusters} clusters, {_mib(dir_size(out))} in "
              f"{time.perf_counter() - t0:.1f} s")
        return EXIT_OK
    derived = ", ".join((m.extra.get("build") or {}).get("derived", [])) or "nothing"
    print(f"wrote {out} with backend {backend!r}: D={m.embedding_dim}, n_neg={m.n_neg}, "
          f"{m.n_clusters} clusters, splits {m.split_sizes}, {_mib(dir_size(out))} in "
          f"{time.perf_counter() - t0:.1f} s; derived: {derived}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from jasper.demo import main as demo_main

    return int(demo_main(list(args.demo_args)))


# --- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common.add_argument("--no-progress", action="store_true", help="never show progress bars")
    installed = ", ".join(_installed_names()) or "none"
    fmt = _HelpFormatter

    p = _Parser(
        prog="jasper", parents=[common], formatter_class=fmt,
        description="Serve JASPER steering datasets to PyTorch from pluggable storage backends.",
    )
    p.add_argument("--version", action="version", version=f"jasper-core {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser,
                           help="what to do (jasper COMMAND --help for its options)")

    b = sub.add_parser("backends", parents=[common], formatter_class=fmt,
                       help="list installed and installable backends")
    b.add_argument("--json", action="store_true",
                   help="machine-readable output (includes capabilities)")
    b.add_argument("--capabilities", action="store_true",
                   help="also list what each backend can do (imports every backend)")
    b.set_defaults(func=cmd_backends)

    s = sub.add_parser("synth", parents=[common], formatter_class=fmt,
                       help="write a realistic synthetic dataset")
    s.add_argument("path", help="target dataset directory (written atomically)")
    s.add_argument("--kind", choices=["jasper", "jasper-steering", "cluster-labeled"],
                   default="jasper",
                   help="dataset kind: a JASPER steering dataset ('jasper' or "
                        "'jasper-steering') or a cluster-labeled one")
    s.add_argument("--pairs", type=_count(1), default=20_000,
                   help="number of question-source pairs")
    s.add_argument("--samples", type=_count(1), default=10_000,
                   help="number of samples of a cluster-labeled dataset")
    s.add_argument("--dim", type=_count(1), default=384, help="embedding dimension D")
    s.add_argument("--neg", type=_count(1), default=8, help="hard negatives per pair")
    s.add_argument("--clusters", type=_count(1), default=16,
                   help="number of topic clusters (k-means centroids)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the embedding and steering arrays")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed writes the same dataset")
    s.add_argument("--derived-steering", action="store_true",
                   help="store no steering arrays: each batch computes them (the same values)")
    s.add_argument("--keep-steering", action="append", type=_steering_variants,
                   metavar="VARIANT[,VARIANT]",
                   help="with --derived-steering: keep these variants stored (centroid, "
                        "keyword, residual; at most two; repeatable or a comma list). "
                        "'keyword' serves at the speed of stored steering for 4*D bytes "
                        "per pair (float32)")
    s.add_argument("--int64-indices", action="store_true",
                   help="store index arrays as int64 (default: the narrowest that holds them, "
                   "int32 ids and int8 tiers; batches carry int64 either way)")
    s.add_argument("--name", help="dataset_name in the manifest (default: directory name)")
    s.add_argument("--backend", default=None,
                   help=f"storage backend to write with (installed: {installed}; default: the "
                        f"first installed of {', '.join(DEFAULT_WRITERS)})")
    s.add_argument("--compression",
                   help="compression, for backends that take it (hdf5: none, lzf, gzip)")
    s.add_argument("--compression-level", type=int,
                   help="compression level, for compressions that take one (gzip: 0-9)")
    s.add_argument("--option", "-o", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="a backend write option (repeatable)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at PATH (never other files)")
    s.set_defaults(func=cmd_synth)

    i = sub.add_parser("info", parents=[common], formatter_class=fmt, help="describe a dataset")
    i.add_argument("path", help="dataset directory")
    i.add_argument("--backend", default="auto",
                   help=f"backend to open it with (installed: {installed}); auto: the one "
                        "that wrote it")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("validate", parents=[common], formatter_class=fmt,
                       help="check a dataset's integrity")
    v.add_argument("path", help="dataset directory")
    v.add_argument("--deep", action="store_true",
                   help="also verify every checksum and the backend's own integrity checks")
    v.add_argument("--strict", action="store_true",
                   help="fail on data-quality findings (which otherwise only warn)")
    v.add_argument("--backend", default="auto",
                   help=f"backend to open it with (installed: {installed}); auto: the one "
                        "that wrote it")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("convert", parents=[common], formatter_class=fmt,
                       help="convert a dataset to another backend")
    c.add_argument("src", help="source dataset directory (never modified)")
    c.add_argument("dst", help="target dataset directory (written atomically)")
    c.add_argument("--to", required=True, metavar="BACKEND",
                   help=f"target backend; installed: {installed}")
    c.add_argument("--src-backend", default="auto",
                   help="backend to read the source with; auto: the one that wrote it")
    c.add_argument("--compression",
                   help="compression of the target, for backends that take it (default: the "
                        "source's where the target takes it)")
    c.add_argument("--compression-level", type=int,
                   help="compression level of the target, for compressions that take one")
    c.add_argument("--option", "-o", action="append", type=_parse_option, metavar="KEY=VALUE",
                   help="a target backend write option (repeatable)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at DST (never other files, never the source)")
    c.add_argument("--derive-steering", nargs="?", const="jasper-v1", default=None,
                   metavar="FORMULA",
                   help="store no steering arrays: each batch computes them with FORMULA "
                        "(jasper-v1, the default, or original); stored rows the formula does "
                        "not reproduce within the tolerance are kept as exceptions")
    c.add_argument("--keep-steering", action="append", type=_steering_variants,
                   metavar="VARIANT[,VARIANT]",
                   help="with --derive-steering: keep these variants' arrays stored, copied "
                        "as they are (centroid, keyword, residual; at most two; repeatable or "
                        "a comma list); only the others are derived")
    c.add_argument("--atol", type=float, default=None,
                   help="--derive-steering: absolute tolerance per element (default 1e-6)")
    c.add_argument("--rtol", type=float, default=None,
                   help="--derive-steering: relative tolerance per element (default 0)")
    c.set_defaults(func=cmd_convert)

    bl = sub.add_parser(
        "build", parents=[common], help="build a complete dataset from your own embeddings",
        description="Build a complete JASPER dataset from question and source embeddings and "
        "pairs; everything missing (clusters, negatives, tiers, steering, distances, splits) is "
        "derived. Inputs: .npy, .pt, or parquet/Arrow (PATH:COLUMN for one column).")
    bl.add_argument("out", help="target dataset directory (written atomically)")
    bl.add_argument("--questions", help="question embeddings [N_q, D]")
    bl.add_argument("--sources", help="source embeddings [N_s, D]")
    bl.add_argument("--pairs", help="pairs: .npy [N_p, 2] or a table with columns question, "
                    "source (and optionally relevance, cluster_id, keywords, hard_negatives)")
    bl.add_argument("--relevance", help="relevance of each pair [N_p] (default: from cosine)")
    bl.add_argument("--cluster-ids", dest="cluster_ids", help="cluster id of each pair [N_p] "
                    "(default: k-means over the sources)")
    bl.add_argument("--centroids", help="cluster centroids [N_c, D] (default: derived)")
    bl.add_argument("--keywords", help="keyword embeddings [N_k, D]")
    bl.add_argument("--pair-keywords", dest="pair_keywords",
                    help="keyword rows of each pair: a list column TABLE:COLUMN")
    bl.add_argument("--hard-negatives", dest="hard_negatives",
                    help="hard-negative source rows [N_p, n_neg] (default: mined)")
    bl.add_argument("--negative-tiers", dest="negative_tiers",
                    help="tier of each hard negative (default: similarity quartiles 1..4)")
    bl.add_argument("--from-chroma", dest="from_chroma", metavar="LOCATION",
                    help="read questions, passages and relevance from a Chroma store "
                    "(a PersistentClient directory or chroma://host:port; needs jasper-chroma)")
    bl.add_argument("--kind", choices=["jasper-steering", "cluster-labeled"],
                    default="jasper-steering", help="the dataset kind to build; "
                    "cluster-labeled needs --from-chroma (one sample per passage and question)")
    bl.add_argument("--neg", type=int, default=8, help="hard negatives to mine per pair (8)")
    bl.add_argument("--clusters", type=int, help="k-means clusters (default: sqrt(N_s/2))")
    bl.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="stored embedding dtype (default: float32, float16 inputs stay float16)")
    bl.add_argument("--split", default="0.8,0.1,0.1",
                    help="train,val,test pair ratios; splits are by question (0.8,0.1,0.1)")
    bl.add_argument("--seed", type=int, default=0, help="seed of k-means, mining, splits (0)")
    bl.add_argument("--int64-indices", action="store_true",
                    help="store index arrays as int64 (default: the narrowest that holds them)")
    bl.add_argument("--name", help="dataset_name in the manifest (default: directory name)")
    bl.add_argument("--backend", help="storage backend to write with (default: pt if "
                    "installed, else the first installed writer)")
    bl.add_argument("--compression", help="compression, for backends that take it")
    bl.add_argument("--compression-level", type=int, help="compression level")
    bl.add_argument("--option", "-o", action="append", type=_parse_option, metavar="KEY=VALUE",
                    help="a backend write option (repeatable)")
    bl.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    bl.set_defaults(func=cmd_build)

    from jasper.plugins import add_plugin_commands

    add_plugin_commands(sub, common)

    d = sub.add_parser("demo", parents=[common], add_help=False,
                       help="the main job: synthesise, write with every backend, train, report")
    d.add_argument("demo_args", nargs=argparse.REMAINDER,
                   help="options of the demo (see `jasper demo --help`)")
    d.set_defaults(func=cmd_demo)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `jasper demo --help` belongs to the demo's own parser
    if args_list[:1] == ["demo"]:
        args = argparse.Namespace(command="demo", demo_args=args_list[1:], debug="--debug" in args_list,
                                  no_progress=False, func=cmd_demo)
        args.demo_args = [a for a in args.demo_args if a != "--debug"]
    else:
        args = parser.parse_args(args_list)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from jasper.errors import JasperError, WriteOptionError

    try:
        return int(args.func(args))
    except BrokenPipeError:  # `jasper backends --json | head`: the reader left, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (JasperError, FileExistsError) as exc:
        if args.debug:
            raise
        print(f"jasper {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        # an option the backend does not take is a usage error, like argparse's
        return EXIT_USAGE if isinstance(exc, WriteOptionError) else EXIT_ERROR
    except Exception as exc:  # a bug or an unmapped library error: still one line, no traceback
        if args.debug:
            raise
        print(f"jasper {args.command}: error: {type(exc).__name__}: {_one_line(exc)} (this is "
              "not a typed jasper error; please report it, with the output of --debug)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
