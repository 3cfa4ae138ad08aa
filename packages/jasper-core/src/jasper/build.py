"""Build a complete JASPER dataset from what you have: bring your own embeddings.

You give question and source embeddings and the (question, source) pairs; everything else the
data model needs (docs/data-model.md) is taken from you when you have it and derived when
you do not:

======================  ==========================================================================
array                   derived (when not given) as
======================  ==========================================================================
pair_relevance          the pair's cosine similarity rescaled to 0..1
centroid_embs           spherical k-means over the source embeddings (scikit-learn; see
                        :func:`kmeans_centroids` for the measurements behind it), or the
                        normalised mean source of each given cluster id
pair_cluster_id         the k-means cluster of the pair's source
keyword_embs + CSR      an empty table when you have no keywords (keyword steering then falls back
                        to the centroid)
hard_negatives          mined by similarity: candidates from the pair's cluster (or a nearest-
                        neighbour function you pass), from the adjacent clusters and from anywhere,
                        ranked by cosine similarity to the positive source, the positive excluded
negative_tiers          1..4 from the similarity quartiles of all mined negatives (1 = hardest)
steering_*              centroid; similarity-weighted keyword mean; normalised residual of the
                        source after removing its centroid component
centroid_distances      cosine distance of the question to its pair's centroid
train/val/test_idx      disjoint splits by question (no question's pairs are in two splits)
======================  ==========================================================================

Inputs may be numpy arrays, torch tensors, or files: ``.npy`` (memory-mapped, so tables larger
than RAM are read row by row), ``.pt`` (weights-only load), and parquet / Arrow IPC
(``PATH:COLUMN``; list or fixed-size-list columns become matrices). Pair-level outputs are
produced in chunks; above ``memory_limit`` bytes they go to memory-mapped scratch files, so only
the tables' index structures and one chunk of pairs are in RAM. The write is
:func:`jasper.store.write_store`'s: atomic, with any installed backend.

scikit-learn (k-means) and pyarrow (parquet/Arrow) are optional: ``pip install
'jasper-core[build]'``; they are imported only when the step that needs them runs.

The same pipeline serves ``jasper synth`` (which generates the raw inputs first), ``jasper build``
and the Chroma builder of ``jasper-chroma``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jasper.atomic import allocate_file
from jasper.backend import ArraySource, TensorSource
from jasper.dtypes import FLOAT_DTYPES, from_storage, to_storage, torch_dtype
from jasper.errors import FormatError, IntegrityError, JasperError, ShapeError
from jasper.index_dtypes import INDEX_ARRAYS, cast_index, compact_dtypes
from jasper.manifest import Manifest
from jasper.progress import count_bar
from jasper.schema import PAIRS
from jasper.steering import (
    EXCEPTION_ROWS,
    EXCEPTION_VALUES,
    JASPER_V1,
    KEEPABLE,
    STEERING,
    DerivedSpec,
    KeywordRows,
    kept_variants,
    steering_rows,
)

#: Input accepted wherever an array is expected: an array, a tensor or a file path
#: (``.npy``, ``.pt``, ``.parquet``/``.arrow``/``.feather`` with ``:COLUMN``).
ArrayInput = np.ndarray | torch.Tensor | str | Path

#: ``neighbours(source_rows, k) -> [len(source_rows), k]`` int64 source rows most similar to
#: each given source (the row itself may be among them). Used for hard-negative candidates.
NeighbourFn = Callable[[np.ndarray, int], np.ndarray]

#: The step curriculum written explicitly into every built dataset (docs/curriculum.md).
DEFAULT_STEP_SCHEDULE: list[dict[str, Any]] = [
    {"start_epoch": 0, "probs": [0.7, 0.2, 0.1, 0.0]},
    {"start_epoch": 10, "probs": [0.5, 0.3, 0.15, 0.05]},
    {"start_epoch": 20, "probs": [0.3, 0.3, 0.25, 0.15]},
    {"start_epoch": 30, "probs": [0.1, 0.3, 0.35, 0.25]},
    {"start_epoch": 40, "probs": [0.0, 0.2, 0.4, 0.4]},
]

#: For each array and manifest key a dataset needs: the argument of :func:`build_arrays` that
#: takes it, or how the builder derives it. ``write_store`` quotes this when something is missing.
HOW_TO_BUILD: dict[str, str] = {
    "embedding_dim": "build_arrays() sets it from the embeddings",
    "n_neg": "build_arrays(n_neg=...) or the columns of hard_negatives",
    "question_embs": "build_arrays(questions=...)",
    "source_embs": "build_arrays(sources=...)",
    "pair_index": "build_arrays(pairs=...)",
    "keyword_embs": "build_arrays(keywords=...); empty when you have none",
    "centroid_embs": "derived by build_arrays() (k-means over the sources)",
    "pair_cluster_id": "derived by build_arrays() (k-means), or cluster_ids=...",
    "pair_relevance": "build_arrays(relevance=...), else derived from cosine similarity",
    "pair_keyword_offsets": "build_arrays(pair_keywords=...) (CSR built for you)",
    "pair_keyword_ids": "build_arrays(pair_keywords=...) (CSR built for you)",
    "hard_negatives": "mined by build_arrays(), or hard_negatives=...",
    "negative_tiers": "derived by build_arrays() from negative similarity",
    "steering_centroid": "derived by build_arrays()",
    "steering_keyword_weighted": "derived by build_arrays()",
    "steering_residual": "derived by build_arrays()",
    "centroid_distances": "derived by build_arrays()",
    "train_idx": "derived by build_arrays() (split by question)",
    "val_idx": "derived by build_arrays() (split by question)",
    "test_idx": "derived by build_arrays() (split by question)",
}


class BuildError(JasperError, ValueError):
    """Inputs to the builder that cannot make a dataset (wrong shape, index out of range...)."""


class MissingDependencyError(JasperError, ImportError):
    """An optional library a build step needs is not installed; the message says what to run."""


def missing_report(missing_keys: Sequence[str], missing_arrays: Sequence[str]) -> str:
    """One message listing every missing manifest key and array, each with what builds it."""

    def listed(names: Sequence[str]) -> str:
        return "; ".join(f"{n} ({HOW_TO_BUILD.get(n, 'see jasper.build')})" for n in names)

    parts = []
    if missing_keys:
        parts.append(f"manifest keys: {listed(missing_keys)}")
    if missing_arrays:
        parts.append(f"arrays: {listed(missing_arrays)}")
    return ("cannot write a dataset without " + " and without ".join(parts)
            + ". jasper.build.build_dataset() (or `jasper build`) derives everything but the "
            "embeddings and pairs")


def _need(module: str, step: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        from jasper.registry import install_hint as _install_hint

        top = module.partition(".")[0]  # the distribution is named after the top package
        package = {"sklearn": "scikit-learn", "pyarrow": "pyarrow"}.get(top, top)
        raise MissingDependencyError(
            f"{step} needs {package}, which is not installed: pip install -c constraints.txt "
            f"{package}; or jasper-core's build extra: "
            f"{_install_hint('jasper-core', extra='build')}"
        ) from exc


# --- inputs -----------------------------------------------------------------------------------
_ARROW_SUFFIXES = {".parquet", ".pq", ".arrow", ".feather", ".ipc"}


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> dict[str, Any]:
    """The columns of a parquet or Arrow IPC file as numpy arrays (list columns of equal length
    as 2-D arrays; ragged list columns as ``(offsets, values)``)."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(p, "file not found")
    pa = _need("pyarrow", f"reading {p.name}")
    try:
        if p.suffix in {".parquet", ".pq"}:
            pq = _need("pyarrow.parquet", f"reading {p.name}")
            table = pq.read_table(p, columns=list(columns) if columns else None)
        else:
            feather = _need("pyarrow.feather", f"reading {p.name}")
            table = feather.read_table(p, columns=list(columns) if columns else None)
    except (pa.ArrowInvalid, pa.ArrowIOError, KeyError, OSError) as exc:
        raise FormatError(p, f"not a readable parquet/Arrow file or column missing: {exc}") from None
    return {name: _arrow_to_numpy(table.column(name), p, name) for name in table.column_names}


def _arrow_to_numpy(col: Any, path: Path, name: str) -> Any:
    import pyarrow as pa

    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        values = arr.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(arr), t.list_size)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if arr.null_count:
            raise FormatError(path, f"list column {name!r} has {arr.null_count} null rows",
                              array=name)
        offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        values = arr.flatten().to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        if len(lengths) and lengths.min() == lengths.max() and lengths[0] > 0 and \
                np.issubdtype(values.dtype, np.floating):
            return values.reshape(len(arr), int(lengths[0]))  # an embedding column
        return offsets - offsets[0], values
    if arr.null_count:
        raise FormatError(path, f"column {name!r} has {arr.null_count} null values", array=name)
    return arr.to_numpy(zero_copy_only=False)


def load_array(obj: ArrayInput, name: str = "array") -> np.ndarray:
    """``obj`` as a numpy array: arrays as they are, tensors as float32/int64 numpy (bfloat16
    widens exactly to float32), ``.npy`` memory-mapped read-only, ``.pt`` loaded weights-only,
    ``PATH.parquet:COLUMN`` / ``PATH.arrow:COLUMN`` one column."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.contiguous().numpy()
    text = str(obj)
    path, column = Path(text), None
    if not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if Path(head).suffix in _ARROW_SUFFIXES:
            path, column = Path(head), tail
    if not path.is_file():
        raise FormatError(path, f"input file for {name} not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise FormatError(path, f"not a plain .npy array: {exc}", array=name) from None
    if suffix == ".pt":
        try:
            t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise FormatError(path, f"not a weights-only .pt tensor file: {str(exc)[:200]}",
                              array=name) from None
        if not isinstance(t, torch.Tensor):
            raise FormatError(path, f"expected one tensor, found {type(t).__name__}", array=name)
        return load_array(t, name)
    if suffix in _ARROW_SUFFIXES:
        cols = read_table(path, [column] if column else None)
        if column is None:
            if len(cols) != 1:
                raise FormatError(path, f"has columns {', '.join(cols)}; name one as "
                                  f"{path}:COLUMN", array=name)
            column = next(iter(cols))
        value = cols[column]
        if isinstance(value, tuple):
            raise FormatError(path, f"column {column!r} is a ragged list; {name} needs equal-"
                              "length rows", array=name)
        return np.asarray(value)
    raise FormatError(path, f"unsupported input format {suffix!r} for {name}: use .npy, .pt, "
                      ".parquet or .arrow", array=name)


def load_ragged(obj: Any, name: str = "pair_keywords") -> tuple[np.ndarray, np.ndarray]:
    """Ragged integer lists as CSR ``(offsets [n + 1], values)``: from a sequence of sequences,
    an ``(offsets, values)`` pair, or a parquet/Arrow list column ``PATH:COLUMN``."""
    if isinstance(obj, (str, Path)):
        text = str(obj)
        head, _, column = text.rpartition(":")
        if not head or Path(text).exists():
            head, column = text, ""
        cols = read_table(head, [column] if column else None)
        value = cols[column] if column else next(iter(cols.values()))
        if not isinstance(value, tuple):
            value = (np.arange(len(value) + 1, dtype=np.int64), np.asarray(value))
        obj = value
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], (list, tuple)):
        offsets = np.asarray(load_array(obj[0], f"{name} offsets"), dtype=np.int64)
        values = np.asarray(load_array(obj[1], f"{name} values"), dtype=np.int64)
    else:
        rows = list(obj)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = (np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows
                  else np.zeros(0, dtype=np.int64))
        if values.size == 0:
            values = np.zeros(0, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0 or \
            (offsets.size > 1 and np.diff(offsets).min() < 0) or offsets[-1] != values.size:
        raise BuildError(f"{name}: CSR offsets must start at 0, never decrease and end at the "
                         f"number of values ({values.size})")
    return offsets, values


# --- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildConfig:
    """How the builder derives what is missing.

    ``n_clusters`` defaults to ``sqrt(N_s / 2)`` clamped to 2..1024 (a common k-means rule of
    thumb); ``dtype`` of the stored embeddings defaults to float32 (float16 inputs stay float16).
    """

    n_neg: int = 8
    n_clusters: int | None = None
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    dtype: str | None = None
    seed: int = 0
    dataset_name: str = "dataset"
    #: "auto" (all sources up to 256 per centroid, a seeded sample above), "kmeans", "sampled"
    kmeans: str = "auto"
    memory_limit: int = 1 << 30
    #: Declare the steering derived (computed per batch by jasper.steering's kernel, the one
    #: that would have produced the stored arrays) instead of storing the three arrays.
    derived_steering: bool = False
    #: With ``derived_steering``: the variants (``centroid``, ``keyword``, ``residual``; at
    #: most two) whose arrays are still stored, computed by the same kernel; the others are
    #: derived. Keeping ``keyword`` (the one variant computed per batch from every keyword of
    #: the pair) serves at the speed of stored steering for 4 D bytes per pair.
    keep_steering: tuple[str, ...] = ()
    #: Store each index array in the narrowest integer dtype that holds it (int32 ids while the
    #: table has at most 2^31 rows, int8 tiers; jasper.index_dtypes); False keeps int64.
    compact_indices: bool = True
    steering_probabilities: dict[str, float] = field(
        default_factory=lambda: {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25})

    def __post_init__(self) -> None:
        if self.n_neg < 1:
            raise BuildError(f"n_neg must be positive, got {self.n_neg}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise BuildError(f"n_clusters must be positive, got {self.n_clusters}")
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise BuildError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype!r}")
        if abs(sum(self.split_ratios) - 1.0) > 1e-6 or min(self.split_ratios) < 0:
            raise BuildError(f"split_ratios must be non-negative and sum to 1: {self.split_ratios}")
        if self.kmeans not in {"auto", "kmeans", "sampled"}:
            raise BuildError(f"kmeans must be auto, kmeans or sampled, got {self.kmeans!r}")
        if self.keep_steering:
            if not self.derived_steering:
                raise BuildError("keep_steering names the steering variants a derived dataset "
                                 "keeps stored: it needs derived_steering=True")
            try:
                kept_variants(self.keep_steering)
            except ValueError as exc:
                raise BuildError(f"keep_steering: {exc}") from None

    @property
    def stored_steering(self) -> tuple[str, ...]:
        """The steering arrays this build stores: all three, none, or the kept ones."""
        if not self.derived_steering:
            return STEERING
        kept = kept_variants(self.keep_steering)
        return tuple(a for v, a in zip(KEEPABLE, STEERING, strict=True) if v in kept)


# --- numerics ---------------------------------------------------------------------------------
def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    np.maximum(n, 1e-12, out=n)
    return x / n


def _rows(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a (possibly memory-mapped) table as float32, reading only those rows."""
    if idx.size == 0:
        return np.zeros((0, table.shape[1]), dtype=np.float32)
    uniq, inv = np.unique(idx, return_inverse=True)
    return np.asarray(table[uniq], dtype=np.float32)[inv.reshape(idx.shape)]


def _chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _members(assign: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by cluster: (rows sorted by cluster, offsets [n_clusters + 1])."""
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=n_clusters)
    offsets = np.zeros(n_clusters + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets


def _pick(rng: np.random.Generator, members: np.ndarray, offsets: np.ndarray,
          clusters: np.ndarray, n_all: int) -> np.ndarray:
    """One random member of each given cluster (vectorised); any row for an empty cluster."""
    lo, hi = offsets[clusters], offsets[clusters + 1]
    r = rng.random(clusters.shape)
    out = members[np.minimum(lo + (r * (hi - lo)).astype(np.int64), len(members) - 1)]
    empty = hi == lo
    if empty.any():
        out[empty] = (r[empty] * n_all).astype(np.int64)
    return out


def _storage_dtype(logical: str) -> np.dtype:
    return np.dtype("uint16") if logical == "bfloat16" else np.dtype(logical)


def _cast(x: np.ndarray, logical: str) -> np.ndarray:
    """float32 rows in the storage dtype of ``logical`` (bfloat16 as its uint16 bit patterns)."""
    if logical == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    return x.astype(np.dtype(logical), copy=False)


def _stored_rows(table: np.ndarray, idx: np.ndarray, logical: str) -> torch.Tensor:
    """Rows ``idx`` of a table exactly as the dataset will store them (cast to ``logical``)."""
    return from_storage(_cast(_rows(table, idx), logical), logical)


def _tensor(a: np.ndarray) -> TensorSource:
    """An in-RAM or mapped numpy array as a source without a copy (read-only inputs such as
    ``.npy`` maps are shared; nothing writes to them)."""
    return TensorSource(from_storage(np.ascontiguousarray(a), str(a.dtype)))


class NumpySource(ArraySource):
    """A numpy array or memmap streamed as tensors of the logical dtype: rows already in its
    storage dtype are copied as they are, others are cast (bfloat16 through float32, stored as
    its bit pattern)."""

    def __init__(self, array: np.ndarray, logical: str) -> None:
        self.array = array
        self.logical = logical
        self.shape = tuple(array.shape)
        self.dtype = torch_dtype(logical)

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        storage = _storage_dtype(self.logical)
        for i in range(0, max(self.shape[0], 1), rows_per_chunk):  # one empty chunk if no rows
            part = np.asarray(self.array[i : i + rows_per_chunk])
            part = np.array(part) if part.dtype == storage else _cast(part, self.logical)
            yield from_storage(part, self.logical)


#: The name the float tables were streamed under (one class does both now).
CastSource = NumpySource


# --- clustering -------------------------------------------------------------------------------
#: Rows per centroid that k-means fits on; above ``POINTS_PER_CENTROID * k`` sources a seeded
#: sample of that size is clustered and every source is then assigned to its nearest centroid
#: (faiss uses the same cap, ``max_points_per_centroid = 256``).
POINTS_PER_CENTROID = 256


def kmeans_centroids(sources: np.ndarray, n_clusters: int, *, seed: int = 0,
                     method: str = "auto", progress: bool | None = None) -> np.ndarray:
    """Unit-norm centroids of spherical k-means over ``sources`` (rows normalised first).

    scikit-learn's ``KMeans`` (Lloyd, k-means++ init, one init). ``method="sampled"`` (what
    ``"auto"`` picks above ``POINTS_PER_CENTROID * k`` rows) fits on a seeded sample of that many
    rows, read row by row from a memory-mapped input, so the sources never need to be in RAM.

    Why scikit-learn and this cap (50k x 384 floats, k = 64, planted clusters, a busy 2-core
    machine): full k-means 82 s, mean cosine to the centroid 0.857 (the planted optimum);
    256 rows per centroid 37 s, 0.842; faiss ``Kmeans`` 2.2 s but 0.800 (random init stuck in a
    worse optimum; 5 restarts 16 s, 0.816); ``MiniBatchKMeans`` 33 s at 7% higher inertia than
    full k-means. k-means++ finds the planted clusters; the cap bounds the time for any N_s.
    """
    cluster = _need("sklearn.cluster", "clustering the sources (k-means)")
    n = sources.shape[0]
    k = min(n_clusters, n)
    cap = POINTS_PER_CENTROID * k
    if method == "auto":
        method = "kmeans" if n <= cap else "sampled"
    if method == "sampled" and n > cap:
        rows = np.sort(np.random.default_rng([seed, 7]).choice(n, cap, replace=False))
        x = np.empty((cap, sources.shape[1]), dtype=np.float32)
        with count_bar(cap, "k-means sample", progress, unit="row") as update:
            for start, stop in _chunks(cap, 1 << 14):
                x[start:stop] = _normalize(np.asarray(sources[rows[start:stop]]))
                update(stop - start)
    else:
        x = _normalize(np.asarray(sources))
    km = cluster.KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100)
    km.fit(x)
    return _normalize(np.asarray(km.cluster_centers_, dtype=np.float32))


def nearest_centroid(table: np.ndarray, centroids_n: np.ndarray, step: int = 1 << 15) -> np.ndarray:
    """The most cosine-similar centroid of every row (chunked)."""
    out = np.empty(table.shape[0], dtype=np.int64)
    for start, stop in _chunks(table.shape[0], step):
        out[start:stop] = np.argmax(_normalize(np.asarray(table[start:stop])) @ centroids_n.T,
                                    axis=1)
    return out


# --- the builder ------------------------------------------------------------------------------
def _check_table(name: str, arr: np.ndarray, dim: int | None) -> None:
    if arr.ndim != 2:
        raise ShapeError(f"{name} must be a 2-D [rows, D] matrix, got shape {arr.shape}",
                         array=name, rule="rank")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ShapeError(f"{name} must hold floats, got {arr.dtype}", array=name, rule="dtype")
    if dim is not None and arr.shape[1] != dim:
        raise ShapeError(f"{name} has {arr.shape[1]} columns but question_embs has {dim}",
                         array=name, rule="columns")


def _check_index(name: str, arr: np.ndarray, bound: int, bound_name: str,
                 step: int = 1 << 20) -> None:
    """Every value in ``0 <= v < bound``, else an error naming the first bad row."""
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    for start, stop in _chunks(flat.shape[0], step):
        part = np.asarray(flat[start:stop])
        bad = (part < 0) | (part >= bound)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            pos = f"[{start + row}, {col}]" if arr.ndim > 1 else f"[{start + row}]"
            raise IntegrityError(f"{name}{pos} = {int(part[row, col])} but {bound_name} has "
                                 f"{bound} rows", array=name, row=int(start + row),
                                 rule="index in range")


def _as_int(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as int64; floats only when every value is whole (parquet may widen ids)."""
    if np.issubdtype(arr.dtype, np.integer):
        return np.asarray(arr, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.floating) or (
            arr.size and not np.all(np.equal(np.mod(arr, 1), 0))):
        raise ShapeError(f"{name} must hold integers, got {arr.dtype}", array=name,
                         rule="dtype")
    return np.asarray(arr, dtype=np.int64)


def _adjacent(centroids_n: np.ndarray) -> np.ndarray:
    c = centroids_n.shape[0]
    if c == 1:
        return np.zeros((1, 1), np.int64)
    sim = centroids_n @ centroids_n.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, : max(1, min(3, c - 1))]


def _split_by_question(questions_of_pairs: np.ndarray, n_questions: int,
                       ratios: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint splits of pair ids with every question's pairs in one split, pair counts close
    to ``ratios``: questions in a seeded random order fill train, then val, then test."""
    n_pairs = questions_of_pairs.shape[0]
    counts = np.bincount(questions_of_pairs, minlength=n_questions)
    order = np.random.default_rng([seed, 3]).permutation(n_questions)
    before = np.cumsum(counts[order]) - counts[order]  # pairs placed before each question
    split_of_q = np.empty(n_questions, dtype=np.int8)
    edges = np.array([ratios[0], ratios[0] + ratios[1]]) * n_pairs
    split_of_q[order] = np.searchsorted(edges, before, side="right")
    split_of_pair = split_of_q[questions_of_pairs]
    return {f"{s}_idx": np.flatnonzero(split_of_pair == i).astype(np.int64)
            for i, s in enumerate(("train", "val", "test"))}


class _Miner:
    """Every derived pair-level array, chunk by chunk."""

    CHUNK = 4096  # pairs; bounds the candidate tensor of negative mining to ~100 MB at D=384

    def __init__(self, *, cfg: BuildConfig, logical: str, questions: np.ndarray,
                 sources: np.ndarray, pairs: np.ndarray, pair_cluster: np.ndarray,
                 centroids: np.ndarray, centroids_n: np.ndarray, source_cluster: np.ndarray,
                 keywords: np.ndarray, kw_offsets: np.ndarray, kw_values: np.ndarray,
                 hard_negatives: np.ndarray | None, neighbours: NeighbourFn | None) -> None:
        self.cfg, self.logical = cfg, logical
        self.q, self.s, self.pairs = questions, sources, pairs
        self.pair_cluster = pair_cluster
        self.centroids, self.centroids_n = centroids, centroids_n
        self.s_members, self.s_offsets = _members(source_cluster, centroids.shape[0])
        self.adjacent = _adjacent(centroids_n)
        self.keywords = keywords
        # the centroid table as it is stored (the steering kernel reads stored rows)
        self.centroids_stored = from_storage(_cast(np.asarray(centroids, dtype=np.float32),
                                                   logical), logical)
        self.kw_offsets, self.kw_values = kw_offsets, kw_values
        self.given_negatives = hard_negatives
        self.neighbours = neighbours

    def fill(self, out: dict[str, np.ndarray], progress: bool | None) -> None:
        n, n_neg = self.pairs.shape[0], out["hard_negatives"].shape[1]
        sims = np.empty((n, n_neg), dtype=np.float32)
        with count_bar(n, "deriving pair arrays", progress, unit="pair") as update:
            for ci, (start, stop) in enumerate(_chunks(n, self.CHUNK)):
                self._chunk(ci, start, stop, out, sims)
                update(stop - start)
        if "negative_tiers" in out:
            # tiers from the similarity quartiles of every mined negative (1 = hardest)
            sample = sims.reshape(-1)[:: max(1, sims.size // 1_000_000)]
            qs = np.quantile(sample, [0.75, 0.5, 0.25]) if sample.size else np.zeros(3)
            tiers = out["negative_tiers"]
            for start, stop in _chunks(n, 1 << 16):
                s = sims[start:stop]
                tiers[start:stop] = 1 + (s < qs[0]) + (s < qs[1]) + (s < qs[2])

    def _chunk(self, ci: int, start: int, stop: int, out: dict[str, np.ndarray],
               sims: np.ndarray) -> None:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 4, ci])
        pi = np.asarray(self.pairs[start:stop])
        q, s = pi[:, 0], pi[:, 1]
        cluster = np.asarray(self.pair_cluster[start:stop])
        qe, se = _normalize(_rows(self.q, q)), _normalize(_rows(self.s, s))
        ce = self.centroids_n[cluster]
        if "pair_relevance" in out:
            out["pair_relevance"][start:stop] = np.clip((np.einsum("bd,bd->b", qe, se) + 1) / 2,
                                                        0.0, 1.0)
        out["centroid_distances"][start:stop] = np.clip(1.0 - np.einsum("bd,bd->b", qe, ce),
                                                        0.0, 2.0)
        if any(name in out for name in STEERING):
            self._steering(start, stop, q, s, cluster, out)

        if self.given_negatives is not None:
            neg = np.asarray(self.given_negatives[start:stop])
            sims[start:stop] = np.einsum("bkd,bd->bk", _normalize(_rows(self.s, neg)), se)
            return
        out["hard_negatives"][start:stop], sims[start:stop] = self._mine(rng, s, se, cluster,
                                                                         out["hard_negatives"].shape[1])

    def _steering(self, start: int, stop: int, q: np.ndarray, s: np.ndarray,
                  cluster: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """The stored steering arrays (all three, or those a derived dataset keeps) of pairs
        ``start:stop`` through the one kernel that also derives them per batch
        (jasper.steering), from the rows as they are stored."""
        logical = self.logical
        lo, hi = int(self.kw_offsets[start]), int(self.kw_offsets[stop])
        counts = np.diff(self.kw_offsets[start : stop + 1]).astype(np.int64)
        owner = np.repeat(np.arange(stop - start), counts)
        kw = KeywordRows(_stored_rows(self.keywords, np.asarray(self.kw_values[lo:hi]), logical),
                         torch.from_numpy(owner), torch.from_numpy(counts))
        c = self.centroids_stored.index_select(0, torch.from_numpy(np.asarray(cluster)))
        qt, st = _stored_rows(self.q, q, logical), _stored_rows(self.s, s, logical)
        for v, name in enumerate(STEERING, start=1):
            if name not in out:
                continue
            out[name][start:stop] = to_storage(steering_rows(
                JASPER_V1, v, centroids=c, questions=qt, sources=st, keywords=kw))

    def _mine(self, rng: np.random.Generator, s: np.ndarray, se: np.ndarray,
              cluster: np.ndarray, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the pair's cluster (or nearest neighbours), the adjacent clusters and
        anywhere, ranked by similarity to the positive; the top ``n_neg`` distinct ones."""
        b, n_all = s.shape[0], self.s.shape[0]
        n_cand = 4 * n_neg
        n_same, n_adj = n_cand // 2, n_cand // 4
        cand = np.empty((b, n_cand), dtype=np.int64)
        if self.neighbours is not None:
            nn = np.asarray(self.neighbours(s, min(n_all, n_same + 1)), dtype=np.int64)
            nn = nn[:, : n_same + 1]
            # the positive itself moves to the end (stable), then the first n_same are kept
            order = np.argsort(nn == s[:, None], axis=1, kind="stable")
            nn = np.take_along_axis(nn, order, axis=1)[:, :n_same]
            cand[:, : nn.shape[1]] = nn
            if nn.shape[1] < n_same:
                cand[:, nn.shape[1] : n_same] = rng.integers(0, n_all, (b, n_same - nn.shape[1]))
        else:
            cand[:, :n_same] = _pick(rng, self.s_members, self.s_offsets,
                                     np.repeat(cluster, n_same), n_all).reshape(b, n_same)
        adj = self.adjacent[cluster][np.arange(b)[:, None],
                                     rng.integers(0, self.adjacent.shape[1], (b, n_adj))]
        cand[:, n_same : n_same + n_adj] = _pick(rng, self.s_members, self.s_offsets,
                                                 adj.reshape(-1), n_all).reshape(b, n_adj)
        cand[:, n_same + n_adj :] = rng.integers(0, n_all, (b, n_cand - n_same - n_adj))
        # a candidate equal to the positive is replaced by a random other source
        clash = cand == s[:, None]
        while clash.any():
            cand[clash] = rng.integers(0, n_all, int(clash.sum()))
            clash = cand == s[:, None]
        sim = np.einsum("bkd,bd->bk", _normalize(_rows(self.s, cand)), se)
        # duplicate candidates must not be picked twice: push repeats to the bottom
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_c = np.take_along_axis(cand, order, axis=1)
        dup = np.zeros_like(clash)
        dup[:, 1:] = sorted_c[:, 1:] == sorted_c[:, :-1]
        np.put_along_axis(sim, order, np.where(dup, -np.inf, np.take_along_axis(sim, order, axis=1)),
                          axis=1)
        top = np.argsort(-sim, axis=1, kind="stable")[:, :n_neg]
        picked = np.take_along_axis(sim, top, axis=1)
        negs = np.take_along_axis(cand, top, axis=1)
        # a row whose candidates held fewer than n_neg distinct sources (a small corpus drawn
        # with repeats) picked a pushed-down repeat: fill it with distinct sources not drawn yet
        for r in np.flatnonzero(np.isneginf(picked).any(axis=1)):
            ok = ~np.isneginf(picked[r])
            pool = np.setdiff1d(np.arange(n_all), np.append(negs[r, ok], s[r]))
            extra = rng.permutation(pool)[: int((~ok).sum())]
            negs[r, ~ok] = extra
            picked[r, ~ok] = _normalize(_rows(self.s, extra[None, :]))[0] @ se[r]
        return negs, np.where(np.isfinite(picked), picked, -1.0)


@dataclass
class BuildReport:
    """What :func:`build_arrays` took from the inputs and what it derived."""

    given: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    n_clusters: int = 0
    kmeans: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_arrays(
    questions: ArrayInput,
    sources: ArrayInput,
    pairs: ArrayInput,
    *,
    relevance: ArrayInput | None = None,
    cluster_ids: ArrayInput | None = None,
    centroids: ArrayInput | None = None,
    source_clusters: ArrayInput | None = None,
    keywords: ArrayInput | None = None,
    pair_keywords: Any = None,
    hard_negatives: ArrayInput | None = None,
    negative_tiers: ArrayInput | None = None,
    splits: Mapping[str, ArrayInput] | None = None,
    config: BuildConfig | None = None,
    neighbours: NeighbourFn | None = None,
    workdir: str | Path | None = None,
    progress: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, ArraySource], Manifest]:
    """Every array and the manifest of a JASPER dataset, ready for :func:`jasper.write_store`.

    Required: ``questions`` ``[N_q, D]``, ``sources`` ``[N_s, D]`` and ``pairs`` ``[N_p, 2]``
    (question row, source row). Optional (derived when missing; see the module docstring):
    ``relevance`` ``[N_p]``; ``cluster_ids`` ``[N_p]`` with optional ``centroids`` ``[N_c, D]``
    and ``source_clusters`` ``[N_s]``; ``keywords`` ``[N_k, D]`` with ``pair_keywords`` (ragged
    keyword rows per pair); ``hard_negatives`` ``[N_p, n_neg]`` with optional
    ``negative_tiers``; ``splits`` (``{"train": ids, "val": ids, "test": ids}``).
    ``neighbours`` supplies nearest-neighbour candidates for mining (e.g. a vector database's
    query). Pair arrays larger than ``config.memory_limit`` go to memory-mapped files under
    ``workdir`` (required then; :func:`build_dataset` provides and removes one).
    """
    cfg = config or BuildConfig()
    report = BuildReport()
    q = load_array(questions, "question_embs")
    s = load_array(sources, "source_embs")
    _check_table("question_embs", q, None)
    d = q.shape[1]
    _check_table("source_embs", s, d)
    pi = _as_int(load_array(pairs, "pair_index"), "pair_index")
    if pi.ndim != 2 or pi.shape[1] != 2:
        raise ShapeError(f"pair_index must be [N_p, 2] (question row, source row), got "
                         f"{pi.shape}", array="pair_index", rule="columns")
    n = pi.shape[0]
    if n == 0:
        raise BuildError("no pairs: a dataset needs at least one (question, source) pair")
    _check_index("pair_index[:, 0]", pi[:, 0], q.shape[0], "question_embs")
    _check_index("pair_index[:, 1]", pi[:, 1], s.shape[0], "source_embs")
    report.given += ["question_embs", "source_embs", "pair_index"]
    logical = cfg.dtype or ("float16" if q.dtype == np.float16 else "float32")

    def pair_vector(obj: ArrayInput, name: str) -> np.ndarray:
        a = load_array(obj, name)
        if a.shape[:1] != (n,):
            raise ShapeError(f"{name} has {a.shape[0] if a.ndim else 0} rows but pair_index has "
                             f"{n}", array=name, rule="pair rows")
        return a

    # --- clusters and centroids
    pair_cluster: np.ndarray | None = None
    if cluster_ids is not None:
        pair_cluster = _as_int(pair_vector(cluster_ids, "pair_cluster_id"), "pair_cluster_id")
        if pair_cluster.min() < 0:
            _check_index("pair_cluster_id", pair_cluster, int(pair_cluster.max()) + 1, "clusters")
        report.given.append("pair_cluster_id")
    if centroids is not None:
        cent = np.asarray(load_array(centroids, "centroid_embs"), dtype=np.float32)
        _check_table("centroid_embs", cent, d)
        report.given.append("centroid_embs")
    elif pair_cluster is not None:
        # the normalised mean of each cluster's pair sources
        n_c = int(pair_cluster.max()) + 1
        cent = np.zeros((n_c, d), dtype=np.float32)
        for start, stop in _chunks(n, 1 << 16):
            np.add.at(cent, pair_cluster[start:stop], _normalize(_rows(s, pi[start:stop, 1])))
        cent = _normalize(cent)
        report.derived.append("centroid_embs")
    else:
        k = cfg.n_clusters or int(min(1024, max(2, round(math.sqrt(s.shape[0] / 2)))))
        method = cfg.kmeans if cfg.kmeans != "auto" else (
            "kmeans" if s.shape[0] <= POINTS_PER_CENTROID * k else "sampled")
        cent = kmeans_centroids(s, k, seed=cfg.seed, method=method, progress=progress)
        report.derived.append("centroid_embs")
        report.kmeans = method
    cent_n = _normalize(cent)
    n_c = cent.shape[0]
    if pair_cluster is not None:
        _check_index("pair_cluster_id", pair_cluster, n_c, "centroid_embs")
    if source_clusters is not None:
        s_cluster = _as_int(load_array(source_clusters, "source_clusters"), "source_clusters")
        if s_cluster.shape != (s.shape[0],):
            raise ShapeError(f"source_clusters must have one id per source ({s.shape[0]}), got "
                             f"{s_cluster.shape}", array="source_clusters", rule="rows")
        _check_index("source_clusters", s_cluster, n_c, "centroid_embs")
    else:
        s_cluster = nearest_centroid(s, cent_n)
    if pair_cluster is None:
        pair_cluster = s_cluster[pi[:, 1]]
        report.derived.append("pair_cluster_id")
    report.n_clusters = n_c

    # --- keywords
    if keywords is not None:
        kw = load_array(keywords, "keyword_embs")
        _check_table("keyword_embs", kw, d)
        report.given.append("keyword_embs")
    else:
        kw = np.zeros((0, d), dtype=np.float32)
    if pair_keywords is not None:
        kw_off, kw_val = load_ragged(pair_keywords)
        if kw_off.shape[0] != n + 1:
            raise ShapeError(f"pair_keywords has {kw_off.shape[0] - 1} rows but pair_index has "
                             f"{n}", array="pair_keyword_offsets", rule="pair rows")
        _check_index("pair_keyword_ids", kw_val, kw.shape[0], "keyword_embs")
        report.given.append("pair_keyword_ids")
    else:
        kw_off, kw_val = np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)

    # --- negatives
    given_neg: np.ndarray | None = None
    n_neg = cfg.n_neg
    if hard_negatives is not None:
        given_neg = _as_int(pair_vector(hard_negatives, "hard_negatives"), "hard_negatives")
        if given_neg.ndim != 2:
            raise ShapeError(f"hard_negatives must be [N_p, n_neg], got {given_neg.shape}",
                             array="hard_negatives", rule="rank")
        _check_index("hard_negatives", given_neg, s.shape[0], "source_embs")
        n_neg = given_neg.shape[1]
        report.given.append("hard_negatives")
    elif s.shape[0] < 2:
        raise BuildError(f"mining hard negatives needs at least 2 sources, source_embs has "
                         f"{s.shape[0]}")
    tiers_given: np.ndarray | None = None
    if negative_tiers is not None:
        if given_neg is None:
            raise BuildError("negative_tiers were given without hard_negatives")
        tiers_given = _as_int(pair_vector(negative_tiers, "negative_tiers"), "negative_tiers")
        if tiers_given.shape != given_neg.shape or (tiers_given.size and tiers_given.min() < 0):
            raise ShapeError(f"negative_tiers must be non-negative with the shape of "
                             f"hard_negatives {given_neg.shape}", array="negative_tiers",
                             rule="shape")
        report.given.append("negative_tiers")

    # --- index dtypes: the narrowest that holds each array (or int64 throughout)
    n_tiers = 4 if tiers_given is None else int(tiers_given.max()) + 1 if tiers_given.size else 0
    index_rows = {"question_embs": q.shape[0], "source_embs": s.shape[0],
                  "keyword_embs": kw.shape[0], "centroid_embs": n_c, PAIRS: n,
                  "pair_keyword_ids": kw_val.shape[0]}
    index_dt = compact_dtypes(index_rows, n_tiers) if cfg.compact_indices else {
        name: "int64" for name in INDEX_ARRAYS}

    def index_source(arr: np.ndarray, name: str) -> TensorSource:
        return _tensor(cast_index(arr, index_dt[name], name))

    # --- the pair arrays, chunk by chunk
    storage = _storage_dtype(logical)
    layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        name: ((n, d), storage) for name in cfg.stored_steering}
    layout.update({
        "centroid_distances": ((n,), np.dtype(np.float32)),
        "hard_negatives": ((n, n_neg), np.dtype(index_dt["hard_negatives"])),
    })
    if relevance is None:
        layout["pair_relevance"] = ((n,), np.dtype(np.float32))
    if tiers_given is None:
        layout["negative_tiers"] = ((n, n_neg), np.dtype(index_dt["negative_tiers"]))
    out: dict[str, np.ndarray] = {}
    pair_bytes = sum(int(np.prod(shape)) * dt.itemsize for shape, dt in layout.values())
    if pair_bytes > cfg.memory_limit:
        if workdir is None:
            raise BuildError(f"the pair arrays need {pair_bytes:,} bytes, over memory_limit "
                             f"{cfg.memory_limit:,}: pass workdir= for scratch files")
        scratch = Path(workdir)
        scratch.mkdir(parents=True, exist_ok=True)
        for name, (shape, dt) in layout.items():
            out[name] = np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=dt,
                                                  shape=shape)
            allocate_file(scratch / f"{name}.npy")  # ENOSPC now, not SIGBUS on a full disk
    else:
        out = {name: np.empty(shape, dtype=dt) for name, (shape, dt) in layout.items()}
    if given_neg is not None:
        out["hard_negatives"] = given_neg
    miner = _Miner(cfg=cfg, logical=logical, questions=q, sources=s, pairs=pi,
                   pair_cluster=pair_cluster, centroids=cent, centroids_n=cent_n,
                   source_cluster=s_cluster, keywords=kw, kw_offsets=kw_off, kw_values=kw_val,
                   hard_negatives=given_neg, neighbours=neighbours)
    miner.fill(out, progress)
    report.derived += [x for x in ("pair_relevance", "negative_tiers") if x in layout]
    if given_neg is None:
        report.derived.append("hard_negatives")
    report.derived += [*cfg.stored_steering, "centroid_distances"]

    # --- splits
    if splits is not None:
        split_ids = {f"{k}_idx": _as_int(load_array(splits[k], f"{k}_idx"), f"{k}_idx")
                     for k in ("train", "val", "test")}
        report.given += list(split_ids)
    else:
        split_ids = _split_by_question(pi[:, 0], q.shape[0], cfg.split_ratios, cfg.seed)
        report.derived += list(split_ids)

    arrays: dict[str, ArraySource] = {
        "question_embs": CastSource(q, logical),
        "source_embs": CastSource(s, logical),
        "keyword_embs": CastSource(kw, logical),
        "centroid_embs": CastSource(cent, logical),
        "pair_index": index_source(pi, "pair_index"),
        "pair_cluster_id": index_source(pair_cluster, "pair_cluster_id"),
        "pair_keyword_offsets": index_source(kw_off, "pair_keyword_offsets"),
        "pair_keyword_ids": index_source(kw_val, "pair_keyword_ids"),
    }
    if relevance is not None:
        rel = np.asarray(pair_vector(relevance, "pair_relevance"), dtype=np.float32)
        arrays["pair_relevance"] = _tensor(rel)
        report.given.append("pair_relevance")
    if tiers_given is not None:
        arrays["negative_tiers"] = index_source(tiers_given, "negative_tiers")
    for name, arr in out.items():
        if name == "hard_negatives" and given_neg is not None:
            arrays[name] = index_source(arr, name)
            continue
        arrays[name] = NumpySource(arr, logical if name.startswith("steering_") else str(arr.dtype))
    for name, idx in split_ids.items():
        arrays[name] = index_source(idx, name)
    derived = None
    if cfg.derived_steering:
        derived = DerivedSpec(JASPER_V1, logical,
                              stored_variants=kept_variants(cfg.keep_steering)).to_dict()
        arrays[EXCEPTION_ROWS] = TensorSource(torch.zeros((0, 2), dtype=torch.int64))
        arrays[EXCEPTION_VALUES] = TensorSource(torch.zeros((0, d), dtype=torch_dtype(logical)))

    manifest = Manifest(
        embedding_dim=d,
        n_neg=n_neg,
        n_clusters=n_c,
        dataset_name=cfg.dataset_name,
        split_sizes={k: int(arrays[f"{k}_idx"].shape[0]) for k in ("train", "val", "test")},
        steering_probabilities=dict(cfg.steering_probabilities),
        steering_schedule=[dict(x) for x in DEFAULT_STEP_SCHEDULE],
        random_seed=cfg.seed,
        n_tiers=n_tiers,
        extra={"build": report.to_dict(), **dict(extra or {})},
        derived_steering=derived,
    )
    return arrays, manifest


def default_writer() -> str:
    """The backend a build writes with when none is named: the CLI's choice (the first
    installed of ``jasper.cli.DEFAULT_WRITERS``, else any installed writer)."""
    from jasper.cli import default_writer as cli_default

    return cli_default()


def build_dataset(
    path: str | Path,
    questions: ArrayInput,
    sources: ArrayInput,
    pairs: ArrayInput,
    *,
    backend: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    options: Mapping[str, Any] | None = None,
    **inputs: Any,
) -> Path:
    """Build with :func:`build_arrays` (``inputs`` are its keyword arguments) and write the
    dataset atomically to ``path`` with ``backend`` (default: :func:`default_writer`).

    Scratch files for pair arrays larger than the memory limit live beside the target and are
    removed afterwards (also a crashed build's, by the next write to the target).
    """
    from jasper.atomic import SCRATCH_MARK, check_target, clean_leftovers, leftover_name
    from jasper.store import write_store

    backend = backend or default_writer()
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    check_target(target, overwrite=overwrite)  # refuse before the work, not after
    scratch = leftover_name(target, SCRATCH_MARK)
    scratch.mkdir()
    try:
        arrays, manifest = build_arrays(questions, sources, pairs, workdir=scratch,
                                        progress=progress, **inputs)
        return write_store(target, arrays, manifest, backend=backend, overwrite=overwrite,
                           progress=progress, **dict(options or {}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = [
    "DEFAULT_STEP_SCHEDULE",
    "HOW_TO_BUILD",
    "ArrayInput",
    "BuildConfig",
    "BuildError",
    "BuildReport",
    "CastSource",
    "MissingDependencyError",
    "NeighbourFn",
    "NumpySource",
    "build_arrays",
    "build_dataset",
    "default_writer",
    "kmeans_centroids",
    "load_array",
    "load_ragged",
    "missing_report",
    "nearest_centroid",
    "read_table",
]
