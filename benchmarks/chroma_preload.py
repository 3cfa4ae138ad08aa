"""Chroma preload against Chroma's own fastest full read of the same rows, in the same run.

    python benchmarks/chroma_preload.py --rows 20000 --dim 384 --rounds 3

Writes a JASPER dataset with the ``chroma`` backend (tables of ``--rows`` rows), then times, best
of ``--rounds``:

- ``chroma ids``: Chroma alone, paging the collection by explicit ids
  (``get(ids=page, include=["embeddings"])``, ``get_max_batch_size()`` ids a page), which was the
  fastest full read in our measurements;
- ``chroma offset``: Chroma alone, paging with ``limit``/``offset``;
- ``jasper preload``: ``reader.read_into`` of the whole table: the same id pages, every id checked,
  rows placed by id and cast float64 -> float32 into one preallocated tensor.

The target (issue 12) is jasper >= 0.8x the faster of Chroma's two reads. MB/s count the logical
float32 bytes of the table, as for the other backends. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("JASPER_PROGRESS", "0")


def best_interleaved(fns: list, rounds: int) -> list[float]:
    """Best time of each function over ``rounds`` rounds that run them in turn, so that a
    change of machine load hits every contender alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000, help="rows of each table")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)

    import jasper
    from jasper.testing.data import make_arrays
    from jasper_chroma.client import get_client

    with tempfile.TemporaryDirectory(prefix="jasper-chroma-bench-") as tmp:
        # a source table of --rows rows; the other tables and the pairs stay small
        arrays, manifest = make_arrays(256, args.dim, n_sources=args.rows, n_questions=64,
                                       n_keywords=16, seed=0)
        t0 = time.perf_counter()
        path = jasper.write_store(Path(tmp) / "ds", arrays, manifest, backend="chroma",
                                  progress=False)
        write_s = time.perf_counter() - t0
        reader = jasper.open_store(path)
        table = "source_embs"
        info = reader.info(table)
        rec = reader.layout.tables[table]
        col = get_client(path / "chroma").get_collection(rec.collection, embedding_function=None)
        page = get_client(path / "chroma").get_max_batch_size()
        ids = [str(i) for i in range(info.shape[0])]

        def chroma_ids() -> None:
            for s in range(0, len(ids), page):
                col.get(ids=ids[s : s + page], include=["embeddings"])

        def chroma_offset() -> None:
            for s in range(0, len(ids), page):
                col.get(include=["embeddings"], limit=page, offset=s)

        out = torch.empty(info.shape, dtype=info.dtype)

        def jasper_preload() -> None:
            reader.read_into(table, out)

        jasper_preload()  # warm: the client, the collection handle
        t_ids, t_off, t_jasper = best_interleaved([chroma_ids, chroma_offset, jasper_preload],
                                                  args.rounds)
        assert torch.equal(out, arrays[table]), "the preload changed values"
        mb = info.nbytes / 1e6
        fastest = min(t_ids, t_off)
        result = {
            "rows": info.shape[0], "dim": args.dim, "table_mb": round(mb, 2),
            "write_rows_per_s": round(sum(a.shape[0] for n, a in arrays.items()
                                          if n.endswith("_embs")) / write_s),
            "chroma_ids_mb_s": round(mb / t_ids, 1), "chroma_offset_mb_s": round(mb / t_off, 1),
            "jasper_preload_mb_s": round(mb / t_jasper, 1),
            "ratio_vs_fastest_chroma": round(fastest / t_jasper, 3), "target": 0.8,
            "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        }
        reader.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["ratio_vs_fastest_chroma"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
