"""Validation of the original system's cluster-labeled layout (``dataset.db``), and the
writers' historical import path.

jasper writes cluster-labeled datasets as an ordinary dataset kind with any backend
(:func:`jasper.cluster_kind.write_cluster_labeled`, default backend memmap-sqlite); the names
below are kept so that ``from jasper_memmap_sqlite import write_cluster_labeled`` keeps working.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jasper.cluster_kind import write_cluster_labeled, write_synthetic_cluster_labeled
from jasper.errors import ChecksumError, IntegrityError
from jasper_memmap_sqlite.catalogue import connect, sqlite_checks
from jasper_memmap_sqlite.cluster_store import open_cluster_store


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
    ``foreign_key_check``, and the original system's SHA-256 of each embedding file.
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
        finally:
            conn.close()
        return report
    finally:
        if store.temp_dir is not None:
            shutil.rmtree(store.temp_dir, ignore_errors=True)


__all__ = [
    "ClusterValidationReport",
    "validate_cluster_labeled",
    "write_cluster_labeled",
    "write_synthetic_cluster_labeled",
]
