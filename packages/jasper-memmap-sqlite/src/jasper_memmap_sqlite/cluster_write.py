"""Write cluster-labeled datasets atomically, generate synthetic ones, validate both generations.

:func:`write_cluster_labeled` fills a temporary directory beside the target (arrays streamed in
chunks into page-aligned ``.npy`` files, the database in one transaction), fsyncs every file,
renames the directory into place and fsyncs the parent, so an interrupted write leaves no
dataset (docs/design.md#atomic-dataset-writes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jasper.backend import ArraySource, default_rows_per_chunk
from jasper.dtypes import dtype_name, to_storage
from jasper.errors import ChecksumError, IntegrityError, ShapeError
from jasper.progress import byte_bar
from jasper.store import atomic_directory
from jasper_memmap_sqlite.catalogue import (
    CATALOGUE_DDL,
    block_checksums,
    check_entry_file,
    connect,
    insert_array,
    sqlite_checks,
    transaction,
    verify_blocks,
)
from jasper_memmap_sqlite.cluster_store import (
    BASE_FILE,
    DB_NAME,
    EMBEDDING_IDX_FILE,
    FORMAT,
    FORMAT_VERSION,
    LABEL_FILES,
    LABEL_TYPES,
    LOCK_FILE,
    SAMPLE_IDS_FILE,
    SAMPLES_DDL,
    STEERING_FILE,
    open_cluster_store,
)
from jasper_memmap_sqlite.npy import Written, write_npy

SAMPLE_TYPES = ("source", "question")
STEERING_MODES = ("suggestion", "llm_generated", "cluster_descriptor", "zero", "mixed")

ArrayLike = torch.Tensor | np.ndarray | ArraySource


# --- arrays in, chunks out ----------------------------------------------------------------------
def _shape_dtype(a: ArrayLike) -> tuple[tuple[int, ...], str]:
    if isinstance(a, ArraySource):
        return tuple(a.shape), dtype_name(a.dtype)
    if isinstance(a, torch.Tensor):
        return tuple(a.shape), dtype_name(a.dtype)
    return tuple(a.shape), np.dtype(a.dtype).name


def _chunks(a: ArrayLike, logical: str, as_dtype: str | None = None) -> Iterator[np.ndarray]:
    """Storage-dtype chunks of ``a`` (numpy memmaps stay on disk but for one chunk)."""
    shape, _ = _shape_dtype(a)
    row = 1
    for s in shape[1:]:
        row *= s
    step = max(1, (64 << 20) // max(1, row * 8))
    if isinstance(a, ArraySource):
        for t in a.iter_chunks(default_rows_per_chunk(a)):
            yield _storage(t, as_dtype)
        return
    n = shape[0]
    for start in range(0, max(n, 1), step):
        part = a[start : start + step]
        yield _storage(part, as_dtype)


def _storage(part: Any, as_dtype: str | None) -> np.ndarray:
    if isinstance(part, torch.Tensor):
        if as_dtype is not None:
            part = part.to(getattr(torch, as_dtype))
        return to_storage(part)
    arr = np.asarray(part)
    if as_dtype is not None:
        arr = arr.astype(as_dtype, copy=False)
    return np.ascontiguousarray(arr)


def _whole(a: ArrayLike) -> np.ndarray:
    if isinstance(a, ArraySource):
        return to_storage(a.materialize())
    if isinstance(a, torch.Tensor):
        return to_storage(a)
    return np.asarray(a)


@dataclass
class _Meta:
    sample_ids: np.ndarray
    sample_type: Sequence[str]
    text: Sequence[str]
    chroma_id: Sequence[str | None]
    suggestions: Sequence[Any]
    steering_mode: Sequence[str | None]


def _column(values: Sequence[Any] | None, n: int, name: str, path: Path) -> Sequence[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ShapeError(f"{name} has {len(values)} entries for {n} samples", array=name,
                         row=min(n, len(values)), rule="one metadata entry per sample",
                         path=path)
    return values


def write_cluster_labeled(
    path: str | Path,
    *,
    base_embeddings: ArrayLike,
    steering_embeddings: ArrayLike,
    source_labels: ArrayLike,
    steering_labels: ArrayLike,
    combined_labels: ArrayLike,
    sample_type: Sequence[str],
    text: Sequence[str],
    chroma_id: Sequence[str | None] | None = None,
    suggestions: Sequence[Any] | None = None,
    steering_mode: Sequence[str | None] | None = None,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    embedding_idx: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    n_clusters: int | None = None,
    dataset_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write a cluster-labeled dataset directory atomically; returns its path.

    Embeddings are ``[M, D]`` floats (tensors, numpy arrays or memmaps, or jasper
    :class:`~jasper.backend.ArraySource` objects for data larger than RAM); labels ``[N,
    n_clusters]`` (stored as float32); per-sample metadata are sequences of length ``N``.
    ``sample_ids`` (strictly increasing, default ``1..N``) order the items;
    ``embedding_idx`` (default ``0..N-1``) points each sample at its embedding row.
    """
    target = Path(path).absolute()
    base_shape, emb_dtype = _shape_dtype(base_embeddings)
    if len(base_shape) != 2:
        raise ShapeError(f"base_embeddings has shape {base_shape}, expected [M, D]",
                         array="base_embeddings", rule="embeddings are 2-D", path=target)
    m, d = base_shape
    if _shape_dtype(steering_embeddings)[0] != (m, d):
        raise ShapeError(f"steering_embeddings is {_shape_dtype(steering_embeddings)[0]} but "
                         f"base_embeddings is {(m, d)}", array="steering_embeddings",
                         rule="base and steering embeddings have the same shape", path=target)
    n = len(text)
    label_shapes = {t: _shape_dtype(a)[0] for t, a in
                    zip(LABEL_TYPES, (source_labels, steering_labels, combined_labels))}
    c = n_clusters if n_clusters is not None else label_shapes["combined"][-1]
    for t, shape in label_shapes.items():
        if shape != (n, c):
            raise ShapeError(f"{t}_labels has shape {shape}, expected ({n}, {c}) for {n} "
                             f"samples and n_clusters = {c}", array=f"{t}_labels",
                             row=min(n, shape[0]) if shape else 0,
                             rule="labels are [N, n_clusters]", path=target)
    ids = (np.arange(1, n + 1, dtype=np.int64) if sample_ids is None
           else np.asarray(_whole(sample_ids) if isinstance(sample_ids, torch.Tensor)
                           else sample_ids, dtype=np.int64))
    emb = (np.arange(n, dtype=np.int64) if embedding_idx is None
           else np.asarray(_whole(embedding_idx) if isinstance(embedding_idx, torch.Tensor)
                           else embedding_idx, dtype=np.int64))
    for name, arr in (("sample_ids", ids), ("embedding_idx", emb)):
        if arr.shape != (n,):
            raise ShapeError(f"{name} has shape {arr.shape}, expected ({n},)", array=name,
                             rule="one entry per sample", path=target)
    if n > 1 and (np.diff(ids) <= 0).any():
        row = int(np.nonzero(np.diff(ids) <= 0)[0][0]) + 1
        raise IntegrityError(f"sample_ids[{row}] = {ids[row]} does not follow {ids[row - 1]}",
                             array="sample_ids", row=row, rule="sample ids strictly increase",
                             path=target)
    if n and (emb.min() < 0 or emb.max() >= m):
        row = int(np.nonzero((emb < 0) | (emb >= m))[0][0])
        raise IntegrityError(f"embedding_idx[{row}] = {emb[row]} but the embeddings have {m} "
                             "rows", array="embedding_idx", row=row,
                             rule="0 <= embedding_idx < embedding rows", path=target)
    types = _column(sample_type, n, "sample_type", target)
    bad = [i for i, t in enumerate(types) if t not in SAMPLE_TYPES]
    if bad:
        raise IntegrityError(f"sample_type[{bad[0]}] = {types[bad[0]]!r}, expected one of "
                             f"{SAMPLE_TYPES}", array="sample_type", row=bad[0],
                             rule="sample_type is 'source' or 'question'", path=target)
    meta = _Meta(ids, types, text, _column(chroma_id, n, "chroma_id", target),
                 _column(suggestions, n, "suggestions", target),
                 _column(steering_mode, n, "steering_mode", target))
    total = 2 * m * d * np.dtype("float32").itemsize + 3 * n * c * 4 + 16 * n
    with atomic_directory(target, overwrite=overwrite) as tmp, \
            byte_bar(total, f"writing {target.name} (cluster-labeled)", progress) as update:
        written: dict[str, tuple[str, Written]] = {}

        def put(name: str, file: str, a: ArrayLike, logical: str,
                as_dtype: str | None = None) -> None:
            storage = np.dtype("uint16") if logical == "bfloat16" else np.dtype(logical)
            shape = _shape_dtype(a)[0]
            written[name] = (logical, write_npy(tmp / file, shape, storage,
                                                _chunks(a, logical, as_dtype), array=name,
                                                on_bytes=update))

        put("base", BASE_FILE, base_embeddings, emb_dtype)
        put("steering", STEERING_FILE, steering_embeddings, _shape_dtype(
            steering_embeddings)[1])
        for t, a in zip(LABEL_TYPES, (source_labels, steering_labels, combined_labels)):
            put(f"{t}_labels", LABEL_FILES[t], a, "float32", "float32")
        put("sample_ids", SAMPLE_IDS_FILE, ids, "int64")
        put("embedding_idx", EMBEDDING_IDX_FILE, emb, "int64")
        _finite_labels(tmp, target)
        _write_db(tmp / DB_NAME, written, meta, emb, d, c, dataset_info)
        (tmp / LOCK_FILE).touch()
    return target


def _finite_labels(tmp: Path, target: Path) -> None:
    for t in LABEL_TYPES:
        mm = np.load(tmp / LABEL_FILES[t], mmap_mode="r")
        step = max(1, (16 << 20) // max(1, mm.shape[1] * 4))
        for start in range(0, mm.shape[0], step):
            part = np.asarray(mm[start : start + step])
            if not np.isfinite(part).all():
                r, col = (int(x) for x in np.argwhere(~np.isfinite(part))[0])
                raise IntegrityError(f"{t}_labels[{start + r}, {col}] = {part[r, col]} is not "
                                     "finite", array=f"{t}_labels", row=start + r,
                                     rule="labels are finite", path=target)


def _write_db(db: Path, written: dict[str, tuple[str, Written]], meta: _Meta, emb: np.ndarray,
              dim: int, n_clusters: int, extra_info: Mapping[str, Any] | None) -> None:
    conn = connect(db, readonly=False, create=True)
    try:
        conn.executescript(CATALOGUE_DDL + SAMPLES_DDL)
        with transaction(conn):
            conn.executemany("INSERT INTO jasper_meta (key, value) VALUES (?, ?)",
                             [("format", FORMAT), ("format_version", str(FORMAT_VERSION))])
            for name, (logical, w) in written.items():
                insert_array(conn, name, logical, w, mutable=name.endswith("_labels"))
            for kind in ("base", "steering"):
                w = written[kind][1]
                conn.execute("INSERT INTO embeddings_meta (embedding_type, file_path, shape, "
                             "dtype, checksum) VALUES (?, ?, ?, ?, ?)",
                             (kind, w.file, json.dumps(list(w.shape)), w.storage_dtype.name,
                              w.checksum))
            info = {"n_clusters": n_clusters, "embedding_dim": dim,
                    "n_samples": len(meta.sample_ids), **dict(extra_info or {})}
            conn.executemany("INSERT INTO dataset_info (key, value) VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in info.items()])
            conn.executemany(
                "INSERT INTO samples (sample_id, sample_type, text, chroma_id, suggestions, "
                "embedding_idx, steering_mode) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((int(sid), st, tx, ch, None if sg is None else json.dumps(sg), int(e), sm)
                 for sid, st, tx, ch, sg, e, sm in zip(
                     meta.sample_ids.tolist(), meta.sample_type, meta.text, meta.chroma_id,
                     meta.suggestions, emb.tolist(), meta.steering_mode)))
    finally:
        conn.close()


# --- synthetic datasets -------------------------------------------------------------------------
class _SynthSource(ArraySource):
    """One array of a synthetic dataset, generated chunk by chunk from (seed, chunk)."""

    CHUNK = 8192

    def __init__(self, synth: _Synth, part: str) -> None:
        self.synth = synth
        self.part = part
        width = synth.dim if part in ("base", "steering") else synth.n_clusters
        self.shape = (synth.n, width)
        self.dtype = torch.float32

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.shape[0], self.CHUNK):
            yield torch.from_numpy(self.synth.chunk(start // self.CHUNK)[self.part])
        if self.shape[0] == 0:
            yield torch.empty(self.shape, dtype=self.dtype)


class _Synth:
    def __init__(self, n: int, dim: int, n_clusters: int, seed: int) -> None:
        self.n, self.dim, self.n_clusters, self.seed = n, dim, n_clusters, seed
        rng = np.random.default_rng([seed, 0])
        self.centroids = _normalize(rng.standard_normal((n_clusters, dim)).astype(np.float32))
        self._last: tuple[int, dict[str, np.ndarray]] | None = None

    def assignments(self) -> np.ndarray:
        return np.concatenate([self._assign(i) for i in range(-(-self.n // _SynthSource.CHUNK))]
                              or [np.zeros(0, np.int64)])

    def _assign(self, chunk: int) -> np.ndarray:
        start = chunk * _SynthSource.CHUNK
        rows = min(_SynthSource.CHUNK, self.n - start)
        return np.random.default_rng([self.seed, 1, chunk]).integers(0, self.n_clusters, rows)

    def chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if self._last is not None and self._last[0] == chunk:
            return self._last[1]
        rng = np.random.default_rng([self.seed, 2, chunk])
        own = self._assign(chunk)
        rows = len(own)
        other = np.where(rng.random(rows) < 0.7, own, rng.integers(0, self.n_clusters, rows))
        # per-component noise 0.6/sqrt(D): a noise vector of norm ~0.6 around unit centroids
        noise = np.float32(0.6 / np.sqrt(self.dim))
        base = _normalize(self.centroids[own] +
                          noise * rng.standard_normal((rows, self.dim), dtype=np.float32))
        steering = _normalize(self.centroids[other] +
                              noise * rng.standard_normal((rows, self.dim), dtype=np.float32))
        src = _softmax(base @ self.centroids.T * 8.0)
        steer = _softmax(steering @ self.centroids.T * 8.0)
        out = {"base": base, "steering": steering, "source": src, "steering_label": steer,
               "combined": (0.5 * (src + steer)).astype(np.float32)}
        self._last = (chunk, out)
        return out


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def write_synthetic_cluster_labeled(
    path: str | Path,
    n_samples: int = 1000,
    embedding_dim: int = 384,
    n_clusters: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write a synthetic cluster-labeled dataset that looks like a real one.

    Unit-norm embeddings scattered around ``n_clusters`` random centroids; a sample's steering
    embedding comes from its own cluster 70% of the time; labels are softmax similarities to
    the centroids (combined = their mean). Deterministic by ``seed``; generated in chunks, so
    ``n_samples`` may exceed RAM (the per-sample metadata strings are built in memory).
    """
    if n_samples < 0 or embedding_dim < 1 or n_clusters < 1:
        raise ValueError("n_samples must be >= 0, embedding_dim and n_clusters >= 1")
    synth = _Synth(n_samples, embedding_dim, n_clusters, seed)
    assign = synth.assignments()
    rng = np.random.default_rng([seed, 3])
    types = np.where(rng.random(n_samples) < 0.5, "source", "question").tolist()
    modes = [STEERING_MODES[i] for i in rng.integers(0, len(STEERING_MODES), n_samples)]
    text = [f"synthetic {t} {i} about topic {c}" for i, (t, c) in
            enumerate(zip(types, assign.tolist()))]
    sugg = [[f"topic-{c}", f"keyword-{c}-{i % 7}"] for i, c in enumerate(assign.tolist())]
    return write_cluster_labeled(
        path,
        base_embeddings=_SynthSource(synth, "base"),
        steering_embeddings=_SynthSource(synth, "steering"),
        source_labels=_SynthSource(synth, "source"),
        steering_labels=_SynthSource(synth, "steering_label"),
        combined_labels=_SynthSource(synth, "combined"),
        sample_type=types, text=text, chroma_id=[f"syn-{i}" for i in range(n_samples)],
        suggestions=sugg, steering_mode=modes, n_clusters=n_clusters,
        dataset_info={"dataset_name": "synthetic-cluster-labeled", "random_seed": seed},
        overwrite=overwrite, progress=progress)


# --- validation ---------------------------------------------------------------------------------
@dataclass
class ClusterValidationReport:
    """What :func:`validate_cluster_labeled` checked."""

    path: Path
    generation: str
    n_samples: int
    checksums_verified: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def validate_cluster_labeled(path: str | Path, *, deep: bool = True) -> ClusterValidationReport:
    """Check a cluster-labeled dataset (either generation); raise the first failure as a typed
    error naming the file, the row and the rule.

    Always: the tables, shapes, label widths, sample-id order and embedding index ranges (what
    opening checks), and finite labels. ``deep``: SQLite's ``integrity_check`` and
    ``foreign_key_check``, and every checksum: the original system's SHA-256 of each embedding
    file, or jasper's per-block xxh3 checksums of every array.
    """
    store = open_cluster_store(path)
    try:
        report = ClusterValidationReport(Path(path), store.generation, store.n_samples)
        for t, f in store.labels.items():
            mm = np.load(f.path, mmap_mode="r")
            if mm.size and not np.isfinite(mm).all():
                r, col = (int(x) for x in np.argwhere(~np.isfinite(np.asarray(mm)))[0])
                raise IntegrityError(f"{t}_label of item {r} holds {mm[r, col]} at column "
                                     f"{col}", array=f"{t}_labels", row=r,
                                     rule="labels are finite", path=store.db_path)
        if not deep:
            return report
        conn = connect(store.db_path, readonly=True)
        try:
            problems = sqlite_checks(conn, store.db_path)
            if problems:
                raise IntegrityError("; ".join(problems), rule="SQLite integrity",
                                     path=store.db_path)
            if store.is_seed:
                for kind, f in (("base", store.base), ("steering", store.steering)):
                    (recorded,) = conn.execute("SELECT checksum FROM embeddings_meta WHERE "
                                               "embedding_type = ?", (kind,)).fetchone()
                    actual = _sha256(f.path)
                    if str(recorded).lower() != actual:
                        raise ChecksumError(
                            f"{f.path.name}: SHA-256 {actual} does not match embeddings_meta's "
                            f"{recorded} (the file changed after it was registered)",
                            array=kind, rule="embeddings_meta SHA-256 checksum", path=f.path)
                    report.checksums_verified += 1
            else:
                for e in store.catalogue.values():
                    found = check_entry_file(store.directory, e)
                    if not found:
                        found = verify_blocks(store.directory, e, block_checksums(conn, e.name))
                    if found:
                        raise ChecksumError("; ".join(found), array=e.name,
                                            row=_first_row(found[0]), rule="block checksum",
                                            path=store.directory / e.file)
                    report.checksums_verified += 1
        finally:
            conn.close()
        return report
    finally:
        if store.temp_dir is not None:
            shutil.rmtree(store.temp_dir, ignore_errors=True)


def _first_row(problem: str) -> int | None:
    marker = "rows "
    if marker in problem:
        try:
            return int(problem.split(marker, 1)[1].split("..", 1)[0])
        except ValueError:
            return None
    return None


__all__ = [
    "ClusterValidationReport",
    "validate_cluster_labeled",
    "write_cluster_labeled",
    "write_synthetic_cluster_labeled",
]
