"""The Mosaic streaming peer, run in Mosaic's own environment (see benchmarks/README.md).

mosaicml-streaming pins numpy below 2.2 and imports torchvision and transformers, which cannot
share the benchmark's environment (torch's CPU build, ``datasets`` 5); ``nox -s benchmark``
builds it a virtualenv of its own, and ``benchlib.contenders.MosaicPeer`` drives this script
there over a pipe: one JSON command per line on stdin, one JSON reply per line on stdout.

- ``build``: write the MDS dataset (``MDSWriter``, uncompressed) from the served arrays'
  ``.npy`` files, unless it is complete already. Mosaic is sample-oriented and has no join, so a
  sample is what a batch serves for one train item, denormalised: question, target, steering
  and negative embeddings, tiers, cluster id, relevance, centroid distance (sample ``i`` is item
  ``i``). This is the layout Mosaic's docs build for training; it stores ~3x the normalised bytes.
- ``open``: ``LocalDataset`` over the shards (Mosaic's random-access map dataset), in a
  ``DataLoader`` with ``default_collate`` serving exactly the given index stream.
- ``first``: the stream's first batch, written to an ``.npz`` for the parent to check value for
  value against the raw gather.
- ``pass``: one pass over the stream, a ``{"batch": n}`` line as each batch is ready (the parent
  times the pass and the gaps), then ``{"done": n}``.

Only numpy, torch and streaming are imported: this file must not import jasper or benchlib.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PAIR_FIELDS = ("pair_index", "hard_negatives", "negative_tiers", "pair_cluster_id",
               "pair_relevance", "centroid_distances", "steering_centroid")
#: Items denormalised per vectorised step of the build.
BUILD_CHUNK = 4096


def _columns(inputs: dict[str, np.ndarray]) -> dict[str, str]:
    """MDS column encodings of one denormalised sample (fixed dtypes and shapes: no per-sample
    header)."""
    d = inputs["question_embs"].shape[1]
    k = inputs["hard_negatives"].shape[1]
    emb = inputs["question_embs"].dtype.name  # bfloat16 arrives as its int16 pattern
    return {
        "question_emb": f"ndarray:{emb}:{d}",
        "target_source_emb": f"ndarray:{emb}:{d}",
        "steering": f"ndarray:{emb}:{d}",
        "negative_embs": f"ndarray:{emb}:{k},{d}",
        "negative_tiers": f"ndarray:{inputs['negative_tiers'].dtype.name}:{k}",
        "cluster_id": inputs["pair_cluster_id"].dtype.name,
        "relevance": inputs["pair_relevance"].dtype.name,
        "centroid_distance": inputs["centroid_distances"].dtype.name,
        "steering_variant": "int64",
    }


def build(inputs_dir: str, mds_dir: str) -> dict[str, Any]:
    from streaming import MDSWriter

    target = Path(mds_dir)
    if (target / ".complete").is_file():
        return {"mds_bytes": _size(target)}
    t0 = time.perf_counter()
    names = (*PAIR_FIELDS, "question_embs", "source_embs", "train_idx")
    a = {n: np.load(Path(inputs_dir) / f"{n}.npy", mmap_mode="r") for n in names}
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    n_items = int(a["train_idx"].shape[0])
    with MDSWriter(out=str(tmp), columns=_columns(a), compression=None) as writer:
        for lo in range(0, n_items, BUILD_CHUNK):
            p = np.asarray(a["train_idx"][lo:lo + BUILD_CHUNK])
            qs = np.asarray(a["pair_index"][p])
            neg = np.asarray(a["hard_negatives"][p])
            q = np.asarray(a["question_embs"][qs[:, 0]])
            s = np.asarray(a["source_embs"][qs[:, 1]])
            st = np.asarray(a["steering_centroid"][p])
            n = np.asarray(a["source_embs"][neg.reshape(-1)]).reshape(*neg.shape, -1)
            tiers = np.asarray(a["negative_tiers"][p])
            cl = np.asarray(a["pair_cluster_id"][p])
            rel = np.asarray(a["pair_relevance"][p])
            dist = np.asarray(a["centroid_distances"][p])
            for j in range(p.shape[0]):
                writer.write({
                    "question_emb": q[j], "target_source_emb": s[j], "steering": st[j],
                    "negative_embs": n[j], "negative_tiers": tiers[j], "cluster_id": cl[j],
                    "relevance": rel[j], "centroid_distance": dist[j],
                    "steering_variant": np.int64(1),
                })
    (tmp / ".complete").write_text("{}")
    tmp.rename(target)
    return {"mds_bytes": _size(target), "mds_build_s": time.perf_counter() - t0}


def _size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file())


class Server:
    def __init__(self) -> None:
        self.loader: Any = None

    def open(self, mds_dir: str, stream_file: str) -> dict[str, Any]:
        from streaming import LocalDataset
        from torch.utils.data import DataLoader

        stream = np.load(stream_file)
        dataset = LocalDataset(local=mds_dir)
        # Mosaic's map dataset has __getitem__ only: the DataLoader fetches item by item and
        # default_collate stacks the per-sample dicts (what Mosaic's StreamingDataLoader does too)
        self.loader = DataLoader(dataset, batch_size=int(stream.shape[1]),
                                 sampler=stream.reshape(-1).tolist(), drop_last=True,
                                 num_workers=0)
        return {"items": len(dataset), "batches": len(self.loader)}

    def first(self, out: str) -> dict[str, Any]:
        batch = next(iter(self.loader))
        np.savez(out, **{k: v.numpy() for k, v in batch.items()})
        return {}

    def one_pass(self, reply: Any) -> dict[str, Any]:
        n = 0
        for _ in self.loader:
            n += 1
            reply({"batch": n})
        return {"done": n}


def main() -> None:
    # replies go to the original stdout; anything a library prints goes to stderr
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")

    server = Server()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "build":
                reply(build(cmd["inputs"], cmd["mds"]))
            elif op == "open":
                reply(server.open(cmd["mds"], cmd["stream"]))
            elif op == "first":
                reply(server.first(cmd["out"]))
            elif op == "pass":
                reply(server.one_pass(reply))
            elif op == "quit":
                reply({})
                return
            else:
                reply({"error": f"unknown command {op!r}"})
        except Exception as exc:  # the parent raises it as the peer's failure
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
