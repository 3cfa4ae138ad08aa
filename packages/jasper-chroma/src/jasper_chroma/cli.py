"""``jasper rag ...``: the commands this package adds to the jasper CLI (through the
``jasper.commands`` entry point; import-light: chromadb is imported when a command runs)."""

from __future__ import annotations

import argparse
from typing import Any

from jasper_chroma.rag_names import STRATEGIES


def cmd_rag_generate(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from jasper.errors import FormatError
    from jasper_chroma.rag import CorpusTripletGenerator, export_csv

    with tempfile.TemporaryDirectory(prefix="jasper-rag-") as scratch:
        store = args.store or str(Path(scratch) / "store")
        gen = CorpusTripletGenerator(args.corpus, store, seed=args.seed)
        if not gen.validate_dataset():
            raise FormatError(args.corpus, "; ".join(gen.problems[:5]))
        gen.load_dataset()
        kinds = STRATEGIES if args.strategy == "all" else (args.strategy,)
        triplets = []
        for kind in kinds:
            kw: dict[str, Any] = {"k": args.k} if kind == "contrastive" else {}
            triplets += gen.generate_samples(kind, **kw)
        out = export_csv(triplets, args.out)
    print(f"wrote {len(triplets):,} triplets ({', '.join(kinds)}) to {out}"
          + (f"; the Chroma store is at {args.store}" if args.store else ""))
    return 0


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``jasper rag generate`` to the jasper CLI."""
    rag = subparsers.add_parser("rag", parents=[common],
                                help="RAG triplet generation over a Chroma store")
    sub = rag.add_subparsers(dest="rag_command", metavar="RAG_COMMAND", required=True,
                             help="generate: corpus -> Chroma store -> triplets CSV")
    g = sub.add_parser("generate", parents=[common],
                       help="load a JSONL/CSV corpus into Chroma and write triplets as CSV")
    g.add_argument("corpus", help="the corpus: .jsonl or .csv with ids, embeddings, "
                   "question_id and relevance")
    g.add_argument("out", help="the CSV to write (question_id, source_id_1, source_id_2, label)")
    g.add_argument("--strategy", choices=[*STRATEGIES, "all"], default="all",
                   help="which triplets to generate (all)")
    g.add_argument("--k", type=int, default=3,
                   help="irrelevant passages per relevant one, for contrastive (3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (0)")
    g.add_argument("--store", help="keep the Chroma store in this directory (default: a "
                   "temporary one); `jasper build --from-chroma STORE OUT` builds from it")
    g.set_defaults(func=cmd_rag_generate)
