"""``config.json``: the dataset manifest.

The original system's keys are kept as they are (``embedding_dim``, ``n_neg``, ``n_clusters``,
``dataset_name``, ``created_at``, ``split_sizes``, ``steering_probabilities``, ``curriculum``) and
any key jasper does not know is preserved on rewrite. jasper adds ``schema_version``, ``writer``
(backend name and versions), ``arrays`` (per array: shape, dtype, checksum) and ``data_digests``
(a digest of each data-describing key, so an edit made after writing is reported by name), so that
``validate --deep`` can prove nothing was changed or lost. Seed-era manifests without these keys
still open; only ``embedding_dim`` and ``n_neg`` are required.

Every manifest is checked against :data:`MANIFEST_SCHEMA` (a declared JSON Schema, validated with
the ``jsonschema`` library) before any value is used, so a wrong type anywhere is a
:class:`~jasper.errors.ManifestError` naming the file and the key, never a raw Python error.

The manifest is written last, as the commit marker of a dataset directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from jasper.dtypes import to_storage
from jasper.errors import DatasetNotFoundError, ManifestError, SchemaVersionError
from jasper.lazy import lazy_torch
from jasper.location import Location, as_target

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

MANIFEST_NAME = "config.json"
SCHEMA_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_64"

_KNOWN_KEYS = (
    "kind",
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
    "data_digests",
    "derived_steering",
)

#: The manifest keys that describe the stored data (an edit to any of them after writing makes
#: the manifest disagree with the files it describes).
DATA_KEYS = ("embedding_dim", "n_neg", "n_clusters", "n_tiers", "kind", "arrays",
             "derived_steering")

_NONNEG_INT = {"type": "integer", "minimum": 0}
_DERIVED_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["formula"],
    "properties": {
        "formula": {"type": "string", "minLength": 1},
        "params": {"type": "object"},
        "dtype": {"type": "string", "enum": ["bfloat16", "float16", "float32", "float64"]},
        "exceptions": _NONNEG_INT,
        "tolerance": {"type": "object", "properties": {"atol": {"type": "number", "minimum": 0},
                                                       "rtol": {"type": "number", "minimum": 0}}},
        "checked_rows": {"type": ["integer", "null"], "minimum": 0},
        # variants whose arrays are kept stored (absent: all three derived)
        "stored_variants": {"type": "array", "maxItems": 2, "uniqueItems": True,
                            "items": {"enum": ["centroid", "keyword", "residual"]}},
    },
}
_OPT_NONNEG_INT = {"type": ["integer", "null"], "minimum": 0}

#: JSON Schema (draft 2020-12) of ``config.json``. Unknown keys are allowed (and kept on rewrite).
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "jasper dataset manifest (config.json)",
    "type": "object",
    "required": ["embedding_dim"],
    # what else is required depends on the dataset kind (jasper.schema.KINDS)
    "if": {"properties": {"kind": {"const": "cluster-labeled"}}, "required": ["kind"]},
    "then": {"required": ["n_clusters"], "properties": {"n_clusters": _NONNEG_INT}},
    "else": {"required": ["n_neg"]},
    "properties": {
        "embedding_dim": _NONNEG_INT,
        "n_neg": _NONNEG_INT,
        "n_clusters": _OPT_NONNEG_INT,
        "n_tiers": _OPT_NONNEG_INT,
        "kind": {"type": "string", "minLength": 1},
        "dataset_name": {"type": ["string", "null"]},
        "created_at": {"type": ["string", "null"]},
        "random_seed": {"type": ["integer", "null"]},
        "schema_version": {"type": "integer", "minimum": 1},
        "split_sizes": {"type": ["object", "null"], "additionalProperties": _NONNEG_INT},
        "steering_probabilities": {"type": ["object", "null"],
                                   "additionalProperties": {"type": "number"}},
        "curriculum": {"type": ["object", "null"]},
        "steering_schedule": {"type": ["array", "null"], "items": {"type": "object"}},
        "writer": {
            "type": ["object", "null"],
            "properties": {
                "backend": {"type": "string"},
                "backend_version": {"type": ["string", "null"]},
                "jasper_core": {"type": ["string", "null"]},
                "options": {"type": "object"},
            },
        },
        "arrays": {
            "type": ["object", "null"],
            "additionalProperties": {
                "type": "object",
                "required": ["shape", "dtype"],
                "properties": {
                    "shape": {"type": "array", "items": _NONNEG_INT, "maxItems": 8},
                    "dtype": {"type": "string"},
                    "checksum": {"type": "string", "pattern": "^[a-z0-9_]+:[0-9a-f]+$"},
                },
            },
        },
        "data_digests": {"type": "object", "additionalProperties": {"type": "string"}},
        # steering computed per batch instead of stored (jasper.steering.DERIVED_SCHEMA)
        "derived_steering": _DERIVED_SCHEMA,
    },
}

_validator: Any = None


def _schema_problem(d: dict[str, Any]) -> str | None:
    """The most relevant schema violation of ``d`` as one line naming the key, or None."""
    global _validator
    # imported on first use: only reading a manifest needs the library
    import jsonschema

    if _validator is None:
        cls = jsonschema.validators.validator_for(MANIFEST_SCHEMA)
        _validator = cls(MANIFEST_SCHEMA)
    if _validator.is_valid(d):
        return None
    err = jsonschema.exceptions.best_match(_validator.iter_errors(d))
    if err is None:
        return None
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    value = repr(err.instance)
    if len(value) > 60:
        value = value[:57] + "..."
    prefix = "malformed 'arrays' entry: " if where.startswith("arrays") else ""
    return f"{prefix}key {where!r} = {value}: {err.message.splitlines()[0][:200]}"


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
    #: digest of each data-describing key (:data:`DATA_KEYS`) at write time.
    data_digests: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: The dataset kind (:data:`jasper.schema.KINDS`); ``None`` (absent) is ``jasper-steering``.
    kind: str | None = None
    #: Steering computed per batch instead of stored: formula, parameters, served dtype,
    #: exception count (:class:`jasper.steering.DerivedSpec`); ``None``: stored.
    derived_steering: dict[str, Any] | None = None

    @property
    def dataset_kind(self) -> str:
        """The kind of dataset this manifest describes, ``"jasper-steering"`` when unnamed."""
        from jasper.schema import DEFAULT_KIND

        return self.kind or DEFAULT_KIND

    @property
    def is_seed_era(self) -> bool:
        """True for a manifest written by the original system (no jasper keys)."""
        return self.schema_version is None

    # --- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | Path = MANIFEST_NAME) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(path, "the manifest must be a JSON object")
        from jasper.schema import KINDS, dataset_kind

        kind = d.get("kind")
        if kind is not None and kind not in KINDS:
            raise ManifestError(path, f"'kind' is {kind!r}; known dataset kinds: "
                                f"{', '.join(KINDS)}")
        for key in dataset_kind(kind).required_keys:
            if key not in d:
                raise ManifestError(
                    path, f"required key {key!r} is missing (found: {', '.join(sorted(d)) or 'none'})"
                )
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0:
                raise ManifestError(path, f"{key!r} must be a non-negative integer, got {d[key]!r}")
        version = d.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise SchemaVersionError(
                path,
                f"schema_version {version!r} is newer than this jasper-core understands "
                f"({SCHEMA_VERSION}); upgrade: {_upgrade_core()}",
            )
        try:
            problem = _schema_problem(d)
        except RecursionError:
            problem = "nested too deeply to check"
        if problem is not None:
            raise ManifestError(path, problem)
        arrays = {k: ArrayRecord.from_dict(v) for k, v in (d.get("arrays") or {}).items()}
        return cls(
            embedding_dim=d["embedding_dim"],
            n_neg=d.get("n_neg", 0),
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
            data_digests=d.get("data_digests"),
            extra={k: v for k, v in d.items() if k not in _KNOWN_KEYS},
            kind=kind,
            derived_steering=d.get("derived_steering"),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        for key in _KNOWN_KEYS:
            if key == "arrays" or (key == "n_neg" and self.dataset_kind != "jasper-steering"):
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
                path, "Config file",
                "A complete jasper dataset has a config.json written last; an interrupted write "
                "leaves none. Re-run the write or `jasper synth` to create a dataset",
            )
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(path, f"cannot be read ({exc.strerror or exc}); check the file's "
                                "permissions") from None
        except UnicodeDecodeError as exc:
            raise ManifestError(path, f"not valid JSON: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, f"not valid JSON: {exc}") from None
        except RecursionError:
            raise ManifestError(path, "not valid JSON: nested too deeply") from None
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

    def stamp(self, backend: str, backend_version: str | None,
              options: dict[str, Any] | None = None) -> None:
        """Record the writer, its write options and the schema version (core does on every
        write), and the digests of the data-describing keys."""
        from jasper import __version__

        self.schema_version = SCHEMA_VERSION
        self.writer = {"backend": backend, "backend_version": backend_version, "jasper_core": __version__}
        if options:
            self.writer["options"] = dict(options)
        if self.created_at is None:
            self.created_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.data_digests = self.compute_data_digests()

    def compute_data_digests(self) -> dict[str, str]:
        """A digest of each data-describing key as it is now (absent keys included)."""
        d = self.to_dict()
        return {k: _json_digest(d.get(k)) for k in DATA_KEYS}

    def edited_data_keys(self) -> list[str] | None:
        """The data-describing keys changed since the manifest was written; None when the
        manifest carries no digests (seed-era, or written by an earlier jasper-core)."""
        if not self.data_digests:
            return None
        now = self.compute_data_digests()
        absent = _json_digest(None)
        # a key added to DATA_KEYS later is unrecorded in older manifests: unchanged while absent
        return [k for k in DATA_KEYS if self.data_digests.get(k, absent) != now[k]]


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


def _json_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return f"{CHECKSUM_ALGORITHM}:{xxhash.xxh3_64_hexdigest(text.encode())}"


def checksum(tensor: torch.Tensor) -> str:
    """The manifest checksum of a whole tensor."""
    c = Checksummer()
    c.update(tensor)
    return c.hexdigest()


def _upgrade_core() -> str:
    from jasper.registry import install_hint

    return install_hint("jasper-core", upgrade=True)
