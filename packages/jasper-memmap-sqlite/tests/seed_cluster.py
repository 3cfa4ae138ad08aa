"""Build a cluster-labeled dataset exactly as the original system wrote one
(docs/migrating.md#cluster-labeled-datasets): ``samples`` with labels as JSON text, ``embeddings_meta`` with the path it wrote to
and the SHA-256 of the whole ``.npy`` file, ``dataset_info`` with JSON values, embeddings saved
with ``numpy.save`` (no page alignment), rollback journal, foreign keys never turned on."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

SEED_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    sample_id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_type TEXT NOT NULL,
    text TEXT NOT NULL,
    chroma_id TEXT,
    suggestions TEXT,
    source_label TEXT NOT NULL,
    steering_label TEXT NOT NULL,
    combined_label TEXT NOT NULL,
    embedding_idx INTEGER NOT NULL,
    steering_mode TEXT,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS embeddings_meta (
    embedding_type TEXT PRIMARY KEY,
    file_path TEXT NOT NULL,
    shape TEXT NOT NULL,
    dtype TEXT NOT NULL,
    checksum TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_info (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_sample_type ON samples(sample_type);
CREATE INDEX IF NOT EXISTS idx_chroma_id ON samples(chroma_id);
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_seed_cluster_dataset(directory: Path, n: int = 40, dim: int = 12, n_clusters: int = 5,
                               seed: int = 0) -> dict[str, Any]:
    """Write the dataset and return what it holds, for comparison."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    steering = rng.standard_normal((n, dim)).astype(np.float32)
    labels = {t: rng.dirichlet(np.ones(n_clusters), n).astype(np.float32)
              for t in ("source", "steering", "combined")}
    # samples point at embedding rows in reverse order, so item i != embedding row i
    emb_idx = np.arange(n)[::-1].copy()
    for name, arr in (("base", base), ("steering", steering)):
        np.save(directory / f"{name}_embeddings.npy", arr)
    conn = sqlite3.connect(directory / "dataset.db")
    conn.execute("PRAGMA synchronous=OFF")  # test speed only; the file format is unchanged
    conn.executescript(SEED_SCHEMA)
    for i in range(n):
        conn.execute(
            "INSERT INTO samples (sample_type, text, chroma_id, suggestions, source_label, "
            "steering_label, combined_label, embedding_idx, steering_mode) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("source" if i % 2 else "question", f"text number {i}",
             None if i % 5 == 0 else f"chroma-{i}",
             json.dumps([f"sugg-{i}"]) if i % 3 else None,
             json.dumps(labels["source"][i].tolist()), json.dumps(labels["steering"][i].tolist()),
             json.dumps(labels["combined"][i].tolist()), int(emb_idx[i]),
             "suggestion" if i % 2 else None))
        conn.commit()  # the original committed every insert
    for name, arr in (("base", base), ("steering", steering)):
        f = directory / f"{name}_embeddings.npy"
        conn.execute("INSERT OR REPLACE INTO embeddings_meta (embedding_type, file_path, shape, "
                     "dtype, checksum) VALUES (?, ?, ?, ?, ?)",
                     (name, str(f), json.dumps(list(arr.shape)), str(arr.dtype), _sha256(f)))
    for key, value in (("n_clusters", n_clusters), ("embedding_dim", dim),
                       ("clustering_source", "keywords.json")):
        conn.execute("INSERT OR REPLACE INTO dataset_info (key, value) VALUES (?, ?)",
                     (key, json.dumps(value)))
    conn.commit()
    conn.close()
    return {"base": base, "steering": steering, "labels": labels, "embedding_idx": emb_idx,
            "n": n, "dim": dim, "n_clusters": n_clusters}
