"""The original system's cluster-labeled layout (``dataset.db``), opened for serving.

The original system's layout (docs/migrating.md#cluster-labeled-datasets)::

    dataset.db               SQLite: samples (labels as JSON text per row), embeddings_meta
                             (file_path, shape, dtype, SHA-256 of the whole file), dataset_info
    base_embeddings.npy      [N, D], opened with numpy memmap
    steering_embeddings.npy  [N, D]

Opening parses the JSON labels once into float32 matrices held in a private temporary directory,
so the dataset is served by the same vectorised code as every other (see
:mod:`jasper_memmap_sqlite.cluster_reader`). Item ``i`` is the ``i``-th sample in ``sample_id``
order, as in the original.

Only regular files inside the dataset directory are read: an ``embeddings_meta.file_path`` that
names a file elsewhere (absolute, or through ``..``) is refused with
:class:`~jasper.errors.UnsafeFileError`, unless that file no longer exists and the dataset
directory holds a file of the same name (a moved dataset: the original recorded the absolute
path it wrote to). Symbolic links are refused as well.

jasper writes cluster-labeled datasets as an ordinary dataset kind (``config.json`` with
``"kind": "cluster-labeled"``, see :mod:`jasper.cluster_kind`) with any backend.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.errors import (
    DatasetNotFoundError,
    FormatError,
    IntegrityError,
    ShapeError,
    UnsafeFileError,
)
from jasper.lazy import lazy_torch
from jasper_memmap_sqlite.catalogue import (
    connect,
    existing_tables,
    require_tables,
)
from jasper_memmap_sqlite.npy import NpyHeader, check_size, read_header, write_npy

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

DB_NAME = "dataset.db"
BASE_FILE = "base_embeddings.npy"
STEERING_FILE = "steering_embeddings.npy"
LABEL_TYPES: tuple[str, ...] = ("source", "steering", "combined")
LABEL_FILES: dict[str, str] = {t: f"{t}_labels.npy" for t in LABEL_TYPES}
LOCK_FILE = "labels.lock"
SEED_TABLES = ("samples", "embeddings_meta", "dataset_info")


@dataclass(frozen=True)
class MappedFile:
    """A ``.npy`` file to map: where it is, what its header says, its logical dtype."""

    path: Path
    header: NpyHeader
    logical: str


@dataclass
class ClusterStore:
    """Everything needed to serve a cluster-labeled dataset; picklable (paths, no handles)."""

    directory: Path
    db_path: Path
    generation: str  # "seed": the original system's layout
    n_samples: int
    n_clusters: int
    embedding_dim: int
    base: MappedFile
    steering: MappedFile
    labels: dict[str, MappedFile]
    lock_path: Path
    sample_ids: MappedFile | torch.Tensor
    embedding_idx: MappedFile | torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    temp_dir: Path | None = None

    @property
    def is_seed(self) -> bool:
        return self.generation == "seed"


def _logical(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in {"float32", "float16", "float64"}:
        raise TypeError(name)
    return name


def _dataset_info(conn: sqlite3.Connection, db: Path) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for key, value in conn.execute("SELECT key, value FROM dataset_info"):
        try:
            info[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            raise FormatError(db, f"dataset_info[{key!r}] is not JSON: {value!r} (rule: "
                              "dataset_info values are JSON)") from None
    return info


def _resolve(directory: Path, recorded: str, kind: str, db: Path) -> Path:
    """The file ``embeddings_meta`` registers, if it is a regular file inside ``directory``.

    The original system stored the absolute path it wrote to; datasets get moved, so a recorded
    path that no longer exists falls back to the file of that name inside the directory. A path
    that exists outside the directory (or is a symbolic link) is never read.
    """
    import stat

    p = Path(recorded)
    # os.path.join keeps an absolute recorded path as it is; normpath folds "a/../b" lexically
    candidate = Path(os.path.normpath(os.path.join(directory.absolute(), p)))
    try:
        inside = ".." not in p.parts and candidate.parent.resolve().is_relative_to(
            directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        if os.path.lexists(candidate):
            raise UnsafeFileError(
                db, f"embeddings_meta[{kind!r}].file_path = {recorded!r} names a file outside "
                f"the dataset directory {directory} (rule: a dataset reads only regular files "
                "inside its own directory); copy the file into the directory and record its "
                "name there")
        candidate = directory / p.name  # a moved dataset: its own file of that name
    try:
        mode = os.lstat(candidate).st_mode
    except FileNotFoundError:
        return candidate  # reported by the caller as a missing file
    if not stat.S_ISREG(mode):
        raise UnsafeFileError(
            candidate, f"the {kind} embedding file is not a regular file (a symbolic link or "
            "something else); a dataset reads only regular files inside its own directory")
    return candidate


def _embedding_file(directory: Path, db: Path, conn: sqlite3.Connection, kind: str,
                    default_name: str, dim: int | None) -> MappedFile:
    row = conn.execute("SELECT file_path, shape, dtype FROM embeddings_meta WHERE "
                       "embedding_type = ?", (kind,)).fetchone()
    if row is None:
        raise FormatError(db, f"embeddings_meta has no row for embedding_type {kind!r} (rule: "
                          "base and steering embedding files are registered)")
    path = _resolve(directory, row[0] or default_name, kind, db)
    if not path.is_file():
        raise DatasetNotFoundError(path, f"{kind} embedding file",
                                   f"embeddings_meta of {db} registers {row[0]!r}")
    header = read_header(path, kind)
    check_size(path, header, kind)
    try:
        recorded = tuple(int(s) for s in json.loads(row[1]))
    except (json.JSONDecodeError, TypeError, ValueError):
        raise FormatError(db, f"embeddings_meta[{kind!r}].shape is not a JSON list: {row[1]!r} "
                          "(rule: shape is JSON)") from None
    if len(header.shape) != 2:
        raise ShapeError(f"{path.name} has shape {header.shape}, expected [N, D]", array=kind,
                         rule="embeddings are 2-D", path=path)
    if recorded != header.shape:
        raise ShapeError(f"{path.name} has shape {header.shape} but embeddings_meta records "
                         f"{recorded}", array=kind, row=min(recorded[0], header.shape[0]),
                         rule="file shape matches embeddings_meta", path=path)
    if dim is not None and header.shape[1] != dim:
        raise ShapeError(f"{path.name} has {header.shape[1]} columns but dataset_info "
                         f"embedding_dim is {dim}", array=kind, rule="embedding width",
                         path=path)
    try:
        logical = _logical(header.dtype)
    except TypeError:
        raise FormatError(path, f"dtype {header.dtype} is not a float type jasper serves "
                          "(rule: float embeddings)", array=kind) from None
    return MappedFile(path, header, logical)


def open_cluster_store(directory: str | Path) -> ClusterStore:
    """Inspect a cluster-labeled dataset directory; typed errors for every broken rule that can
    be checked without reading the embeddings (tables, shapes, label widths, index ranges)."""
    d = Path(directory)
    if not d.is_dir():
        raise DatasetNotFoundError(d, "cluster-labeled dataset directory")
    db = d / DB_NAME
    conn = connect(db, readonly=True)
    try:
        if "jasper_meta" in existing_tables(conn):
            raise FormatError(db, "this is jasper's first, unreleased cluster-labeled layout "
                              "(dataset.db with label matrices), which this version no longer "
                              "reads; write it again with jasper.cluster_kind."
                              "write_cluster_labeled")
        require_tables(conn, db, SEED_TABLES, "cluster-labeled dataset")
        return _open_seed(d, db, conn)
    finally:
        conn.close()


def _dims(info: dict[str, Any], db: Path) -> tuple[int | None, int | None]:
    out = []
    for key in ("embedding_dim", "n_clusters"):
        v = info.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise FormatError(db, f"dataset_info[{key!r}] = {v!r} is not a positive integer "
                              f"(rule: {key} is a positive integer)")
        out.append(v)
    return out[0], out[1]


def _check_embedding_idx(idx: torch.Tensor, sample_ids: torch.Tensor, rows: int,
                         db: Path) -> None:
    if idx.numel() == 0:
        return
    lo, hi = torch.aminmax(idx)
    if int(lo) >= 0 and int(hi) < rows:
        return
    pos = int(torch.nonzero((idx < 0) | (idx >= rows))[0])
    raise IntegrityError(
        f"sample_id {int(sample_ids[pos])} (item {pos}) has embedding_idx {int(idx[pos])} but "
        f"{BASE_FILE} has {rows} rows", array="embedding_idx", row=pos,
        rule="0 <= embedding_idx < embedding rows", path=db)


def _check_same_shape(base: MappedFile, steering: MappedFile) -> None:
    if base.header.shape != steering.header.shape:
        raise ShapeError(f"{BASE_FILE} is {base.header.shape} but {STEERING_FILE} is "
                         f"{steering.header.shape}", array="steering",
                         row=min(base.header.shape[0], steering.header.shape[0]),
                         rule="base and steering embeddings have the same shape",
                         path=steering.path)


def _parse_labels(texts: list[Any], sample_ids: np.ndarray, column: str, db: Path,
                  width: int | None) -> np.ndarray:
    """One column of JSON label texts as a float32 matrix (one ``json.loads`` for the column)."""
    if any(not isinstance(t, str) for t in texts):
        pos = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise FormatError(db, f"samples row sample_id={int(sample_ids[pos])} (item {pos}): "
                          f"{column} is {texts[pos]!r}, not a JSON list (rule: labels are JSON "
                          "arrays of probabilities)")
    try:
        rows = json.loads("[" + ",".join(texts) + "]")
    except json.JSONDecodeError:
        for pos, t in enumerate(texts):
            try:
                json.loads(t)
            except json.JSONDecodeError as exc:
                raise FormatError(db, f"samples row sample_id={int(sample_ids[pos])} (item "
                                  f"{pos}): {column} is not JSON ({exc}) (rule: labels are "
                                  "JSON arrays of probabilities)") from None
        raise
    lengths = np.fromiter((len(r) if isinstance(r, list) else -1 for r in rows), np.int64,
                          count=len(rows))
    want = width if width is not None else (int(lengths[0]) if len(lengths) else 0)
    bad = np.nonzero(lengths != want)[0]
    if len(bad):
        pos = int(bad[0])
        raise ShapeError(f"sample_id {int(sample_ids[pos])} (item {pos}) has a {column} of "
                         f"{lengths[pos]} values but n_clusters is {want}", array=column,
                         row=pos, rule="labels have n_clusters values", path=db)
    try:
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), want)
    except (TypeError, ValueError) as exc:
        raise FormatError(db, f"{column} holds a value that is not a number ({exc}) (rule: "
                          "labels are JSON arrays of probabilities)") from None


def _open_seed(d: Path, db: Path, conn: sqlite3.Connection) -> ClusterStore:
    info = _dataset_info(conn, db)
    dim, n_clusters = _dims(info, db)
    base = _embedding_file(d, db, conn, "base", BASE_FILE, dim)
    steering = _embedding_file(d, db, conn, "steering", STEERING_FILE, dim)
    _check_same_shape(base, steering)
    rows = conn.execute("SELECT sample_id, embedding_idx, source_label, steering_label, "
                        "combined_label FROM samples ORDER BY sample_id").fetchall()
    n = len(rows)
    cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
    ids = np.asarray(cols[0], dtype=np.int64)
    try:
        emb = np.asarray(cols[1], dtype=np.int64)
    except (TypeError, ValueError):
        raise FormatError(db, "samples.embedding_idx holds a value that is not an integer "
                          "(rule: embedding_idx is an integer)") from None
    if len(emb) == n:
        _check_embedding_idx(torch.from_numpy(emb), torch.from_numpy(ids),
                             base.header.shape[0], db)
    temp = Path(tempfile.mkdtemp(prefix="jasper-cluster-labels-"))
    try:
        labels: dict[str, MappedFile] = {}
        for t, texts in zip(LABEL_TYPES, cols[2:]):
            m = _parse_labels(list(texts), ids, f"{t}_label", db, n_clusters)
            n_clusters = n_clusters or (m.shape[1] if n else 0)
            path = temp / LABEL_FILES[t]
            write_npy(path, m.shape, m.dtype, iter([m]), array=f"{t}_labels")
            labels[t] = MappedFile(path, read_header(path), "float32")
        (temp / LOCK_FILE).touch()
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ClusterStore(
        directory=d, db_path=db, generation="seed", n_samples=n, n_clusters=int(n_clusters or 0),
        embedding_dim=int(base.header.shape[1]), base=base, steering=steering, labels=labels,
        lock_path=temp / LOCK_FILE, sample_ids=torch.from_numpy(ids),
        embedding_idx=torch.from_numpy(emb), info=info, temp_dir=temp)


def remove_temp_on_collect(owner: object, store: ClusterStore) -> None:
    """Delete a seed dataset's private label matrices when ``owner`` is collected, in the
    process that created them only (forked workers share the directory)."""
    if store.temp_dir is None:
        return
    pid = os.getpid()
    temp = store.temp_dir

    def _cleanup() -> None:
        if os.getpid() == pid:
            shutil.rmtree(temp, ignore_errors=True)

    weakref.finalize(owner, _cleanup)
