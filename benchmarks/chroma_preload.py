"""Chroma preload against Chroma's own fastest full read of the same rows, in the same run.

    python benchmarks/chroma_preload.py --rows 20000 --dim 384 --rounds 3 [--server URL]

Writes a JASPER dataset with the ``chroma`` backend (tables of ``--rows`` rows), then times, best
of ``--rounds``:

- ``chroma ids``: Chroma alone, paging the collection by explicit ids
  (``get(ids=page, include=["embeddings"])``, ``get_max_batch_size()`` ids a page), which was the
  fastest full read in our measurements;
- ``chroma offset``: Chroma alone, paging with ``limit``/``offset``;
- ``jasper preload``: ``reader.read_into`` of the whole table: ``limit``/``offset`` pages, every
  returned id checked to be a row number and every row checked present, rows placed by id and
  cast float64 -> float32 into one preallocated tensor.

``--server chroma://HOST:PORT`` measures a dataset on that server too (over HTTP).

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
    ap.add_argument("--server", help="also on this Chroma server (chroma://HOST:PORT): the "
                    "dataset at chroma://HOST:PORT/default_tenant/default_database/NAME")
    args = ap.parse_args(argv)

    from jasper.testing.data import make_arrays

    # a source table of --rows rows; the other tables and the pairs stay small
    arrays, manifest = make_arrays(256, args.dim, n_sources=args.rows, n_questions=64,
                                   n_keywords=16, seed=0)
    results = []
    with tempfile.TemporaryDirectory(prefix="jasper-chroma-bench-") as tmp:
        results.append(measure(str(Path(tmp) / "ds"), "local", arrays, manifest, args))
    if args.server:
        url = f"{args.server.rstrip('/')}/default_tenant/default_database/bench{os.getpid()}"
        try:
            results.append(measure(url, "server", arrays, manifest, args))
        finally:
            _delete_dataset(url)
    text = json.dumps(results if len(results) > 1 else results[0], indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(r["ratio_vs_fastest_chroma"] >= 0.8 for r in results) else 1


def _delete_dataset(url: str) -> None:
    """Remove a benchmark dataset from the server (its collections and objects)."""
    from jasper.location import Location
    from jasper_chroma.layout import ServerDataset
    from jasper_chroma.objects import ChromaObjects

    store = ChromaObjects(ServerDataset.parse(Location.parse(url)))
    store.delete(list(store.list()))


def measure(target: str, where: str, arrays: dict, manifest: object,
            args: argparse.Namespace) -> dict:
    """Write the dataset at ``target`` and time Chroma's two full reads against the preload."""
    import jasper

    t0 = time.perf_counter()
    jasper.write_store(target, arrays, manifest, backend="chroma", progress=False)
    write_s = time.perf_counter() - t0
    reader = jasper.open_store(target)
    table = "source_embs"
    info = reader.info(table)
    col = reader.collection(table)  # the very handle the preload pages through
    page = 5461  # get_max_batch_size() on these machines; the reader's page
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
        "location": where, "rows": info.shape[0], "dim": args.dim, "table_mb": round(mb, 2),
        "write_rows_per_s": round(sum(a.shape[0] for n, a in arrays.items()
                                      if n.endswith("_embs")) / write_s),
        "chroma_ids_mb_s": round(mb / t_ids, 1), "chroma_offset_mb_s": round(mb / t_off, 1),
        "jasper_preload_mb_s": round(mb / t_jasper, 1),
        "ratio_vs_fastest_chroma": round(fastest / t_jasper, 3), "target": 0.8,
        "machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
    }
    reader.close()
    return result


if __name__ == "__main__":
    sys.exit(main())
