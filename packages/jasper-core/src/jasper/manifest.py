"""``config.json``: the dataset manifest.

The original system's keys are kept as they are (``embedding_dim``, ``n_neg``, ``n_clusters``,
``dataset_name``, ``created_at``, ``split_sizes``, ``steering_probabilities``, ``curriculum``) and
any key jasper does not know is preserved on rewrite. jasper adds ``schema_version``, ``writer``
(backend name and versions) and ``arrays`` (per array: shape, dtype, checksum), so that
``validate --deep`` can prove nothing was changed or lost. Seed-era manifests without these keys
still open; only ``embedding_dim`` and ``n_neg`` are required.

The manifest is written last, as the commit marker of a dataset directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from jasper.dtypes import to_storage
from jasper.errors import DatasetNotFoundError, ManifestError, SchemaVersionError
from jasper.location import Location, as_target

MANIFEST_NAME = "config.json"
SCHEMA_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_64"

_KNOWN_KEYS = (
    "embedding_dim",
    "n_neg",
    "n_clusters",
    "dataset_name",
    "created_at",
    "split_sizes",
    "steering_probabilities",
    "curriculum",
    "steering_schedule",
    "random_seed",
    "n_tiers",
    "schema_version",
    "writer",
    "arrays",
)


@dataclass
class ArrayRecord:
    """What the manifest records of one stored array."""

    shape: tuple[int, ...]
    dtype: str
    checksum: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        if self.checksum is not None:
            d["checksum"] = self.checksum
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArrayRecord:
        return cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]), d.get("checksum"))


@dataclass
class Manifest:
    """The parsed ``config.json`` of a dataset. Unknown keys live in :attr:`extra`."""

    embedding_dim: int
    n_neg: int
    n_clusters: int | None = None
    dataset_name: str | None = None
    created_at: str | None = None
    split_sizes: dict[str, int] | None = None
    steering_probabilities: dict[str, float] | None = None
    curriculum: dict[str, Any] | None = None
    #: jasper's explicit step table: ``[{"start_epoch": 0, "probs": [z, c, k, r]}, ...]``.
    steering_schedule: list[dict[str, Any]] | None = None
    random_seed: int | None = None
    n_tiers: int | None = None
    schema_version: int | None = None
    writer: dict[str, Any] | None = None
    arrays: dict[str, ArrayRecord] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_seed_era(self) -> bool:
        """True for a manifest written by the original system (no jasper keys)."""
        return self.schema_version is None

    # --- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path = MANIFEST_NAME) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(path, "the manifest must be a JSON object")
        for key in ("embedding_dim", "n_neg"):
            if key not in d:
                raise ManifestError(
                    path, f"required key {key!r} is missing (found: {', '.join(sorted(d)) or 'none'})"
                )
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise ManifestError(path, f"{key!r} must be a non-negative integer, got {d[key]!r}")
        version = d.get("schema_version")
        if version is not None and (not isinstance(version, int) or version > SCHEMA_VERSION):
            raise SchemaVersionError(
                path,
                f"schema_version {version!r} is newer than this jasper-core understands "
                f"({SCHEMA_VERSION}); upgrade with `pip install -U jasper-core`",
            )
        try:
            arrays = {k: ArrayRecord.from_dict(v) for k, v in (d.get("arrays") or {}).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(path, f"malformed 'arrays' entry: {exc}") from None
        return cls(
            embedding_dim=d["embedding_dim"],
            n_neg=d["n_neg"],
            n_clusters=d.get("n_clusters"),
            dataset_name=d.get("dataset_name"),
            created_at=d.get("created_at"),
            split_sizes=d.get("split_sizes"),
            steering_probabilities=d.get("steering_probabilities"),
            curriculum=d.get("curriculum"),
            steering_schedule=d.get("steering_schedule"),
            random_seed=d.get("random_seed"),
            n_tiers=d.get("n_tiers"),
            schema_version=version,
            writer=d.get("writer"),
            arrays=arrays,
            extra={k: v for k, v in d.items() if k not in _KNOWN_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        for key in _KNOWN_KEYS:
            if key == "arrays":
                continue
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.arrays:
            d["arrays"] = {k: v.to_dict() for k, v in self.arrays.items()}
        return d

    @classmethod
    def load(cls, directory: str | Path | Location) -> Manifest:
        """Read ``directory/config.json`` (at a URL: the committed generation's)."""
        target = as_target(directory)
        if isinstance(target, Location):
            from jasper.remote import manifest_at

            return manifest_at(target)
        directory = target
        path = directory / MANIFEST_NAME
        if not directory.exists():
            raise DatasetNotFoundError(directory)
        if not path.is_file():
            raise DatasetNotFoundError(
                path, "manifest",
                "A complete jasper dataset has a config.json written last; an interrupted write "
                "leaves none. Re-run the write or `jasper synth` to create a dataset",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(path, f"not valid JSON: {exc}") from None
        return cls.from_dict(data, path)

    def dump(self, directory: str | Path, *, fsync: bool = True) -> Path:
        """Write ``directory/config.json`` (through a temporary file and a rename)."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def stamp(self, backend: str, backend_version: str | None) -> None:
        """Record the writer and schema version (called by core on every write)."""
        from jasper import __version__

        self.schema_version = SCHEMA_VERSION
        self.writer = {"backend": backend, "backend_version": backend_version, "jasper_core": __version__}
        if self.created_at is None:
            self.created_at = datetime.now(UTC).isoformat(timespec="seconds")


class Checksummer:
    """Streaming checksum of an array's storage bytes (xxh3-64: ~10 GB/s, so hashing is never
    the bottleneck of a write)."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def update(self, chunk: torch.Tensor | np.ndarray) -> None:
        arr = to_storage(chunk) if isinstance(chunk, torch.Tensor) else np.ascontiguousarray(chunk)
        self._h.update(arr.reshape(-1).view(np.uint8).data)

    def hexdigest(self) -> str:
        return f"{CHECKSUM_ALGORITHM}:{self._h.hexdigest()}"


def checksum(tensor: torch.Tensor) -> str:
    """The manifest checksum of a whole tensor."""
    c = Checksummer()
    c.update(tensor)
    return c.hexdigest()
