"""The ``cluster-labeled`` dataset kind: layout rules, validation, writing and synthesis.

A cluster-labeled dataset (docs/data-model.md#cluster-labeled-datasets) is an ordinary jasper
dataset whose manifest says ``"kind": "cluster-labeled"``: every array of :data:`jasper.schema.CLUSTER_ARRAYS` (the two
embedding tables, three label matrices, sample ids, embedding indices and the per-sample
records) written through :func:`jasper.store.write_store` with any backend. Item ``i`` is the
``i``-th sample in ``sample_id`` order; it reads embedding row ``embedding_idx[i]``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from jasper import records
from jasper.backend import ArraySource, TensorSource, as_source
from jasper.dtypes import dtype_name
from jasper.errors import ChecksumError, IntegrityError, ShapeError
from jasper.manifest import Manifest
from jasper.schema import (
    CLUSTER_ARRAYS,
    CLUSTER_KIND,
    CLUSTER_LABEL_TYPES,
    CLUSTER_RECORDS,
    SAMPLE_TYPES,
    STEERING_MODES,
    Cols,
    Role,
    cluster_label_array,
)

if TYPE_CHECKING:
    from jasper.backend import StoreReader
    from jasper.validation import ValidationReport

ArrayLike = torch.Tensor | np.ndarray | ArraySource


# --- layout -------------------------------------------------------------------------------------
def _cols(spec_cols: Cols | None, manifest: Manifest) -> int | None:
    if spec_cols is Cols.EMBEDDING_DIM:
        return manifest.embedding_dim
    if spec_cols is Cols.N_CLUSTERS:
        return manifest.n_clusters
    return None


def check_layout(arrays: Mapping[str, Any], manifest: Manifest,
                 path: str | Path | None = None) -> int:
    """Shape-level rules of the kind, on anything with ``shape`` and ``dtype`` (sources,
    tensors, :class:`~jasper.backend.ArrayInfo`): every array present and no other, ranks,
    dtypes, columns, one row per sample. Returns the number of samples."""
    missing = [n for n in CLUSTER_ARRAYS if n not in arrays]
    if missing:
        raise ShapeError(f"a cluster-labeled dataset needs arrays {', '.join(missing)}",
                         array=missing[0], rule="required array", path=path)
    unknown = [n for n in arrays if n not in CLUSTER_ARRAYS]
    if unknown:
        raise ShapeError(f"unknown arrays {', '.join(unknown)}; a cluster-labeled dataset has: "
                         f"{', '.join(CLUSTER_ARRAYS)}", array=unknown[0], rule="known array",
                         path=path)
    n = int(arrays["sample_ids"].shape[0]) if len(arrays["sample_ids"].shape) else 0
    for name, spec in CLUSTER_ARRAYS.items():
        shape = tuple(int(s) for s in arrays[name].shape)
        logical = dtype_name(arrays[name].dtype)
        if len(shape) != spec.rank:
            raise ShapeError(f"{name} has shape {shape}, expected rank {spec.rank}", array=name,
                             rule="rank", path=path)
        if logical not in spec.dtypes:
            raise ShapeError(f"{name} has dtype {logical}, allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype",
                             path=path)
        want = _cols(spec.cols, manifest)
        if want is not None and shape[1] != want:
            raise ShapeError(f"{name} has {shape[1]} columns but {spec.cols.value if spec.cols else ''}"
                             f" is {want}", array=name, rule="columns", path=path)
        if spec.role is Role.SAMPLE and shape[0] != n:
            raise ShapeError(f"{name} has {shape[0]} rows but sample_ids has {n}", array=name,
                             row=min(n, shape[0]), rule="one row per sample", path=path)
        if spec.role is Role.RECORD_OFFSETS and shape[0] != n + 1:
            raise ShapeError(f"{name} has {shape[0]} rows, expected N + 1 = {n + 1}",
                             array=name, rule="record offsets rows", path=path)
    base, steering = (tuple(arrays[k].shape) for k in ("base_embeddings", "steering_embeddings"))
    if base != steering:
        raise ShapeError(f"steering_embeddings is {steering} but base_embeddings is {base}",
                         array="steering_embeddings", row=min(base[0], steering[0]),
                         rule="base and steering embeddings have the same shape", path=path)
    return n


def check_values(arrays: Mapping[str, torch.Tensor], manifest: Manifest,
                 path: str | Path | None = None, *, decode_records: bool = True,
                 skip_finite: frozenset[str] = frozenset()) -> int:
    """Every structural rule on tensors (mapped or in RAM): the layout, embedding indices in
    range, sample ids strictly increasing, finite labels and embeddings (except
    ``skip_finite``), sound records. Raises a typed error naming array, row and rule; returns
    the number of samples."""
    from jasper.validation import _check_finite

    n = check_layout(arrays, manifest, path)
    rows = int(arrays["base_embeddings"].shape[0])
    emb = arrays["embedding_idx"]
    if emb.numel():
        lo, hi = torch.aminmax(emb)
        if int(lo) < 0 or int(hi) >= rows:
            row = int(torch.nonzero((emb < 0) | (emb >= rows))[0])
            raise IntegrityError(f"embedding_idx[{row}] = {int(emb[row])} but base_embeddings "
                                 f"has {rows} rows", array="embedding_idx", row=row,
                                 rule="0 <= embedding_idx < embedding rows", path=path)
    ids = arrays["sample_ids"]
    if ids.numel() > 1:
        step = ids[1:] - ids[:-1]
        if int(step.min()) <= 0:
            row = int(torch.nonzero(step <= 0)[0]) + 1
            raise IntegrityError(f"sample_ids[{row}] = {int(ids[row])} does not follow "
                                 f"{int(ids[row - 1])}", array="sample_ids", row=row,
                                 rule="sample ids strictly increase", path=path)
    for name, spec in CLUSTER_ARRAYS.items():
        if spec.finite and name not in skip_finite:
            _check_finite(name, arrays[name], Path(path) if path is not None else None)
    for rec in CLUSTER_RECORDS.values():
        records.check(arrays[rec.offsets_array], arrays[rec.bytes_array], rec, n, path,
                      decode_values=decode_records)
    return n


# --- validation ---------------------------------------------------------------------------------
def validate(reader: StoreReader, *, deep: bool = False, strict: bool = False,
             progress: bool | None = None) -> ValidationReport:
    """Check an open cluster-labeled dataset: every structural rule (records decoded only with
    ``deep``), and with ``deep`` every checksum the manifest records and the backend's own
    checks. Large float arrays are mapped where the backend maps, else streamed in chunks."""
    from jasper.validation import (
        ValidationReport,
        check_manifest_records,
        load_for_checks,
        stream_finite_checks,
        verify_stored,
    )

    t0 = time.perf_counter()
    p = reader.path
    manifest = reader.manifest
    infos = {n: reader.info(n) for n in CLUSTER_ARRAYS if reader.has(n)}
    check_manifest_records(infos, manifest, p)
    check_layout(infos, manifest, p)
    arrays, streamed = load_for_checks(reader, infos, CLUSTER_ARRAYS)
    with reader.reading_rows():
        n_samples = check_values(arrays, manifest, p, decode_records=deep,
                                 skip_finite=frozenset(streamed))
    stream_finite_checks(reader, streamed, p)
    del arrays
    report = ValidationReport(p, n_samples, 0.0)
    if deep:
        if manifest.schema_version is not None:
            unsealed = [n for n in CLUSTER_ARRAYS
                        if n in manifest.arrays and not manifest.arrays[n].checksum]
            if unsealed or any(n not in manifest.arrays for n in CLUSTER_ARRAYS):
                name = (unsealed or [n for n in CLUSTER_ARRAYS if n not in manifest.arrays])[0]
                raise ChecksumError(f"{name}: the manifest of this jasper-written dataset records "
                                    "no checksum for it, so its data cannot be verified",
                                    array=name, rule="every array checksummed", path=p)
        verify_stored(reader, report, [n for n in manifest.arrays if n in infos], infos,
                      progress)
    del strict  # the kind has no value-quality rules yet; every rule above is structural
    report.seconds = time.perf_counter() - t0
    return report


def summary(manifest: Manifest, infos: Mapping[str, Any]) -> str:
    """One line for ``jasper info``."""
    n = infos["sample_ids"].shape[0] if "sample_ids" in infos else "?"
    rows = infos["base_embeddings"].shape[0] if "base_embeddings" in infos else "?"
    return (f"  kind=cluster-labeled  D={manifest.embedding_dim}  clusters={manifest.n_clusters}"
            f"  samples={n}  embedding rows={rows}")


# --- writing ------------------------------------------------------------------------------------
class _Float32Source(ArraySource):
    """Another source's chunks as float32 (labels are stored as float32)."""

    def __init__(self, inner: ArraySource) -> None:
        self.inner = inner
        self.shape = tuple(inner.shape)
        self.dtype = torch.float32

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        for chunk in self.inner.iter_chunks(rows_per_chunk):
            yield chunk.to(torch.float32)


def _source(a: ArrayLike, name: str) -> ArraySource:
    if isinstance(a, ArraySource):
        return a
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "fiu":
            raise ShapeError(f"{name} has numpy dtype {a.dtype}, expected numbers", array=name,
                             rule="dtype")
        return TensorSource(torch.from_numpy(np.ascontiguousarray(a)))
    return as_source(a)


def _int64(a: Any, name: str, n: int) -> torch.Tensor:
    t = a.materialize() if isinstance(a, ArraySource) else torch.as_tensor(np.asarray(a))
    t = t.to(torch.int64).reshape(-1) if t.numel() or t.dim() else torch.zeros(0, dtype=torch.int64)
    if t.shape != (n,):
        raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected ({n},)", array=name,
                         rule="one entry per sample")
    return t.contiguous()


def _column(values: Sequence[Any] | None, n: int, name: str) -> Sequence[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ShapeError(f"{name} has {len(values)} entries for {n} samples", array=name,
                         row=min(n, len(values)), rule="one metadata entry per sample")
    return values


def cluster_arrays(
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
    sample_ids: Any = None,
    embedding_idx: Any = None,
) -> dict[str, ArraySource]:
    """Every array of the kind from user data: embeddings ``[M, D]``, labels ``[N, C]``,
    per-sample metadata of length ``N`` encoded as records, ``sample_ids`` (default ``1..N``)
    and ``embedding_idx`` (default ``0..N-1``)."""
    n = len(text)
    out: dict[str, ArraySource] = {
        "base_embeddings": _source(base_embeddings, "base_embeddings"),
        "steering_embeddings": _source(steering_embeddings, "steering_embeddings"),
    }
    for t, a in zip(CLUSTER_LABEL_TYPES, (source_labels, steering_labels, combined_labels)):
        src = _source(a, cluster_label_array(t))
        out[cluster_label_array(t)] = src if src.dtype == torch.float32 else _Float32Source(src)
    out["sample_ids"] = TensorSource(torch.arange(1, n + 1, dtype=torch.int64)
                                     if sample_ids is None else _int64(sample_ids, "sample_ids", n))
    out["embedding_idx"] = TensorSource(torch.arange(n, dtype=torch.int64)
                                        if embedding_idx is None
                                        else _int64(embedding_idx, "embedding_idx", n))
    columns = {"sample_type": sample_type, "text": text, "chroma_id": chroma_id,
               "suggestions": suggestions, "steering_mode": steering_mode}
    for name, spec in CLUSTER_RECORDS.items():
        offsets, data = records.encode(_column(columns[name], n, name), spec)
        out[spec.offsets_array] = TensorSource(offsets)
        out[spec.bytes_array] = TensorSource(data)
    return out


def cluster_manifest(embedding_dim: int, n_clusters: int,
                     extra: Mapping[str, Any] | None = None) -> Manifest:
    """The manifest of a cluster-labeled dataset (``extra``: further keys, kept as given)."""
    d: dict[str, Any] = {**dict(extra or {}), "kind": CLUSTER_KIND,
                         "embedding_dim": int(embedding_dim), "n_clusters": int(n_clusters)}
    return Manifest.from_dict(d)


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
    sample_ids: Any = None,
    embedding_idx: Any = None,
    n_clusters: int | None = None,
    dataset_info: Mapping[str, Any] | None = None,
    backend: str = "memmap-sqlite",
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Path:
    """Write a cluster-labeled dataset atomically with ``backend``; returns its path.

    Embeddings are ``[M, D]`` floats (tensors, numpy arrays or memmaps, or
    :class:`~jasper.backend.ArraySource` objects for data larger than RAM); labels ``[N,
    n_clusters]`` (stored as float32); per-sample metadata are sequences of length ``N``.
    ``dataset_info`` keys go into the manifest. Every rule is checked before anything is
    committed: layout first, then values (a failed check leaves nothing at ``path``).
    """
    from jasper.store import write_store

    arrays = cluster_arrays(
        base_embeddings=base_embeddings, steering_embeddings=steering_embeddings,
        source_labels=source_labels, steering_labels=steering_labels,
        combined_labels=combined_labels, sample_type=sample_type, text=text,
        chroma_id=chroma_id, suggestions=suggestions, steering_mode=steering_mode,
        sample_ids=sample_ids, embedding_idx=embedding_idx)
    emb_shape = tuple(arrays["base_embeddings"].shape)
    if len(emb_shape) != 2:
        raise ShapeError(f"base_embeddings has shape {emb_shape}, expected [M, D]",
                         array="base_embeddings", rule="embeddings are 2-D", path=path)
    c = n_clusters if n_clusters is not None else int(arrays["combined_labels"].shape[-1])
    manifest = cluster_manifest(emb_shape[1], c, dataset_info)
    check_layout(arrays, manifest, path)
    _check_small_values(arrays, manifest, path)
    return write_store(path, arrays, manifest, backend=backend, overwrite=overwrite,
                       progress=progress, **options)


def _check_small_values(arrays: Mapping[str, ArraySource], manifest: Manifest,
                        path: str | Path) -> None:
    """The value rules on what is small (indices, labels, records) before anything is written;
    the embeddings stand in as zero-stride placeholders (``jasper validate`` checks their
    values), so this needs no second copy of them."""
    embeddings = frozenset({"base_embeddings", "steering_embeddings"})
    probe = {n: torch.zeros((), dtype=a.dtype).expand(a.shape) if n in embeddings
             else a.materialize() for n, a in arrays.items()}
    check_values(probe, manifest, path, skip_finite=embeddings)


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
    *,
    backend: str = "memmap-sqlite",
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Any,
) -> Path:
    """Write a synthetic cluster-labeled dataset that looks like a real one, with ``backend``.

    Unit-norm embeddings scattered around ``n_clusters`` random centroids; a sample's steering
    embedding comes from its own cluster 70% of the time; labels are softmax similarities to
    the centroids (combined = their mean). Deterministic by ``seed``; embeddings and labels are
    generated in chunks (the per-sample metadata strings are built in memory).
    """
    for name, value, low in (("n_samples", n_samples, 0), ("embedding_dim", embedding_dim, 1),
                             ("n_clusters", n_clusters, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ShapeError(f"{name} must be an integer >= {low}, got {value!r}", array=name,
                             rule=f"{name} >= {low}")
    synth = _Synth(n_samples, embedding_dim, n_clusters, seed)
    assign = synth.assignments()
    rng = np.random.default_rng([seed, 3])
    types = [SAMPLE_TYPES[i] for i in (rng.random(n_samples) >= 0.5).astype(np.int64)]
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
        backend=backend, overwrite=overwrite, progress=progress, **options)


__all__ = [
    "check_layout",
    "check_values",
    "cluster_arrays",
    "cluster_manifest",
    "summary",
    "validate",
    "write_cluster_labeled",
    "write_synthetic_cluster_labeled",
]
