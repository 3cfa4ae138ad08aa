"""The data model as code: one catalogue of stored arrays per dataset kind.

A dataset's manifest names its **kind** (:data:`KINDS`): ``jasper-steering`` (the JASPER steering
data of docs/data-model.md, the default when a manifest names none) or ``cluster-labeled``
(the domain-classification triplets of docs/migrating.md#cluster-labeled-datasets). Backends,
validation, the synthetic generators, the manifest and both datasets read these catalogues;
nothing else lists array names. :data:`ARRAYS` is the ``jasper-steering`` catalogue; :data:`ALL_ARRAYS` holds every
kind's arrays (names are unique across kinds), for backends that map names to places.

Ragged keyword ids are stored as CSR: ``pair_keyword_offsets`` ``[N_p + 1]`` (row ``p`` owns
``pair_keyword_ids[offsets[p]:offsets[p + 1]]``) and ``pair_keyword_ids`` (the flat values).

**Records** (strings and small JSON values, one per row: a sample's text, chroma id,
suggestions...) use the same idea, so every backend stores them without code of its own: record
``x`` is two ordinary arrays, ``x_offsets`` int64 ``[N + 1]`` and ``x_bytes`` uint8 (the UTF-8
bytes of every row, concatenated). :mod:`jasper.records` encodes and decodes them; checksums,
validation and convert treat them as the arrays they are.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from jasper.dtypes import FLOAT_DTYPES


class Role(enum.Enum):
    """What an array's rows are: table rows, one row per pair, split members, or CSR parts."""

    TABLE = "table"
    PAIR = "pair"
    SPLIT = "split"
    CSR_OFFSETS = "csr_offsets"
    CSR_VALUES = "csr_values"
    SAMPLE = "sample"  # one row per sample of a cluster-labeled dataset
    RECORD_OFFSETS = "record_offsets"  # [N + 1] byte offsets of a record's rows
    RECORD_BYTES = "record_bytes"  # the UTF-8 bytes of a record's rows
    EXCEPTION = "exception"  # a stored exception to derived steering (jasper.steering)


class Cols(enum.Enum):
    """What the second dimension of a rank-2 array must equal."""

    EMBEDDING_DIM = "embedding_dim"
    N_NEG = "n_neg"
    TWO = "2"
    N_CLUSTERS = "n_clusters"


INT_INDEX = frozenset({"int64"})
#: Index arrays of the steering kind may be stored compact: int32 while the table they reference
#: fits (the rule is :func:`jasper.index_dtypes.check_index_capacity`); batches carry int64.
INT_COMPACT_INDEX = frozenset({"int64", "int32"})
INT_LABEL = frozenset({"int64", "int32", "int16", "int8", "uint8"})


@dataclass(frozen=True)
class ArraySpec:
    """One stored array of the data model.

    ``references`` names the table (or ``"pairs"``) whose row count bounds the values, per column
    for rank-2 index arrays. ``quality_range`` is a value rule that only warns on open (datasets
    from the original system can break it) and fails ``validate --strict``.
    """

    name: str
    role: Role
    rank: int
    dtypes: frozenset[str]
    description: str
    cols: Cols | None = None
    references: tuple[str, ...] = ()
    finite: bool = False
    non_negative: bool = False
    quality_range: tuple[float, float] | None = None
    #: Values strictly increase down the rows (sample ids: lookups bisect them).
    increasing: bool = False
    #: Rows may be replaced in place after writing (``StoreReader.write_rows``): label matrices.
    mutable: bool = False

    @property
    def is_float(self) -> bool:
        return self.dtypes <= FLOAT_DTYPES


def _emb(name: str, desc: str, role: Role = Role.TABLE) -> ArraySpec:
    return ArraySpec(name, role, 2, FLOAT_DTYPES, desc, cols=Cols.EMBEDDING_DIM, finite=True)


PAIRS = "pairs"  # pseudo-table: the number of pairs, N_p

ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        _emb("question_embs", "question embeddings [N_q, D]"),
        _emb("source_embs", "source embeddings [N_s, D]"),
        _emb("keyword_embs", "keyword embeddings [N_k, D]"),
        _emb("centroid_embs", "cluster centroid embeddings [N_c, D]"),
        ArraySpec(
            "pair_index", Role.PAIR, 2, INT_COMPACT_INDEX,
            "(question row, source row) of each pair",
            cols=Cols.TWO, references=("question_embs", "source_embs"),
        ),
        ArraySpec(
            "pair_cluster_id", Role.PAIR, 1, INT_COMPACT_INDEX, "cluster of each pair",
            references=("centroid_embs",),
        ),
        ArraySpec(
            "pair_relevance", Role.PAIR, 1, FLOAT_DTYPES, "relevance of each pair, 0..1",
            finite=True, quality_range=(0.0, 1.0),
        ),
        ArraySpec(
            "pair_keyword_offsets", Role.CSR_OFFSETS, 1, INT_COMPACT_INDEX,
            "CSR offsets of each pair's keyword ids [N_p + 1]",
        ),
        ArraySpec(
            "pair_keyword_ids", Role.CSR_VALUES, 1, INT_COMPACT_INDEX,
            "CSR values: keyword rows",
            references=("keyword_embs",),
        ),
        ArraySpec(
            "hard_negatives", Role.PAIR, 2, INT_COMPACT_INDEX,
            "hard-negative source rows of each pair",
            cols=Cols.N_NEG, references=("source_embs",),
        ),
        ArraySpec(
            "negative_tiers", Role.PAIR, 2, INT_LABEL, "difficulty tier of each hard negative",
            cols=Cols.N_NEG, non_negative=True,
        ),
        _emb("steering_centroid", "centroid steering vector of each pair", Role.PAIR),
        _emb("steering_keyword_weighted", "keyword-weighted steering of each pair", Role.PAIR),
        _emb("steering_residual", "residual steering vector of each pair", Role.PAIR),
        ArraySpec(
            "centroid_distances", Role.PAIR, 1, FLOAT_DTYPES,
            "cosine distance of each pair to its centroid, 0..2",
            finite=True, quality_range=(0.0, 2.0),
        ),
        ArraySpec("train_idx", Role.SPLIT, 1, INT_COMPACT_INDEX,
                  "pair ids of the train split",
                  references=(PAIRS,)),
        ArraySpec("val_idx", Role.SPLIT, 1, INT_COMPACT_INDEX,
                  "pair ids of the validation split",
                  references=(PAIRS,)),
        ArraySpec("test_idx", Role.SPLIT, 1, INT_COMPACT_INDEX,
                  "pair ids of the test split",
                  references=(PAIRS,)),
    )
}

ARRAY_NAMES: tuple[str, ...] = tuple(ARRAYS)
TABLES: tuple[str, ...] = tuple(n for n, s in ARRAYS.items() if s.role is Role.TABLE)
PAIR_ARRAYS: tuple[str, ...] = tuple(n for n, s in ARRAYS.items() if s.role is Role.PAIR)
SPLITS: tuple[str, ...] = ("train", "val", "test")


# --- records ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordSpec:
    """One per-row record of a dataset kind: strings (``"utf8"``) or JSON values (``"json"``).

    ``nullable`` records may hold ``None`` for a row; ``choices`` restricts the strings a
    ``utf8`` record may hold (checked by validation).
    """

    name: str
    encoding: str
    description: str
    nullable: bool = False
    choices: tuple[str, ...] = ()

    @property
    def offsets_array(self) -> str:
        return f"{self.name}_offsets"

    @property
    def bytes_array(self) -> str:
        return f"{self.name}_bytes"


def _record_arrays(rec: RecordSpec) -> tuple[ArraySpec, ArraySpec]:
    return (
        ArraySpec(rec.offsets_array, Role.RECORD_OFFSETS, 1, INT_INDEX,
                  f"byte offsets of each row's {rec.name} [N + 1]"),
        ArraySpec(rec.bytes_array, Role.RECORD_BYTES, 1, frozenset({"uint8"}),
                  f"UTF-8 bytes of every row's {rec.name}"),
    )


# --- the cluster-labeled kind (docs/migrating.md#cluster-labeled-datasets) -------------------------
CLUSTER_LABEL_TYPES: tuple[str, ...] = ("source", "steering", "combined")
SAMPLE_TYPES: tuple[str, ...] = ("source", "question")
STEERING_MODES: tuple[str, ...] = ("suggestion", "llm_generated", "cluster_descriptor", "zero",
                                   "mixed")

CLUSTER_RECORDS: dict[str, RecordSpec] = {
    r.name: r
    for r in (
        RecordSpec("sample_type", "utf8", "'source' or 'question'", choices=SAMPLE_TYPES),
        RecordSpec("text", "utf8", "the sample's text"),
        RecordSpec("chroma_id", "utf8", "id of the sample in the Chroma collection",
                   nullable=True),
        RecordSpec("suggestions", "json", "steering suggestions (JSON)", nullable=True),
        RecordSpec("steering_mode", "utf8", "how the steering embedding was made",
                   nullable=True),
    )
}


def cluster_label_array(label_type: str) -> str:
    """The array holding one label type, e.g. ``"combined" -> "combined_labels"``."""
    return f"{label_type}_labels"


CLUSTER_ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        _emb("base_embeddings", "base embeddings [M, D]"),
        _emb("steering_embeddings", "steering embeddings [M, D]"),
        *(ArraySpec(cluster_label_array(t), Role.SAMPLE, 2, frozenset({"float32"}),
                    f"{t} cluster probabilities of each sample [N, n_clusters]",
                    cols=Cols.N_CLUSTERS, finite=True, mutable=True)
          for t in CLUSTER_LABEL_TYPES),
        ArraySpec("sample_ids", Role.SAMPLE, 1, INT_INDEX,
                  "database id of each sample, strictly increasing", increasing=True),
        ArraySpec("embedding_idx", Role.SAMPLE, 1, INT_INDEX,
                  "embedding row of each sample", references=("base_embeddings",)),
        *(a for r in CLUSTER_RECORDS.values() for a in _record_arrays(r)),
    )
}


# --- dataset kinds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetKind:
    """A kind of dataset: its catalogue of arrays, its records, and what counts its items."""

    name: str
    description: str
    arrays: dict[str, ArraySpec]
    records: dict[str, RecordSpec]
    #: The array whose first dimension is the number of items (pairs, samples).
    rows_array: str
    #: Manifest keys a dataset of this kind must have.
    required_keys: tuple[str, ...]


STEERING_KIND = "jasper-steering"
CLUSTER_KIND = "cluster-labeled"
#: What a manifest without a ``kind`` is: every dataset written before kinds existed.
DEFAULT_KIND = STEERING_KIND

KINDS: dict[str, DatasetKind] = {
    STEERING_KIND: DatasetKind(STEERING_KIND, "JASPER steering pairs, negatives and splits",
                               ARRAYS, {}, "pair_index", ("embedding_dim", "n_neg")),
    CLUSTER_KIND: DatasetKind(CLUSTER_KIND, "cluster-labeled domain-classification samples",
                              CLUSTER_ARRAYS, CLUSTER_RECORDS, "sample_ids",
                              ("embedding_dim", "n_clusters")),
}

#: The arrays a steering dataset with derived steering stores instead of the three steering
#: arrays (docs/derived-steering.md): the (variant 1-3, pair id) rows whose stored value the
#: formula does not reproduce, and those values.
STEERING_EXCEPTION_ARRAYS: dict[str, ArraySpec] = {
    spec.name: spec
    for spec in (
        ArraySpec("steering_exception_rows", Role.EXCEPTION, 2, INT_INDEX,
                  "(variant 1-3, pair id) of each stored steering exception, sorted",
                  cols=Cols.TWO),
        ArraySpec("steering_exception_values", Role.EXCEPTION, 2, FLOAT_DTYPES,
                  "the stored steering row of each exception", cols=Cols.EMBEDDING_DIM,
                  finite=True),
    )
}

#: Every array of every kind, by name (names are unique across kinds).
ALL_ARRAYS: dict[str, ArraySpec] = {n: s for k in KINDS.values() for n, s in k.arrays.items()}
ALL_ARRAYS.update(STEERING_EXCEPTION_ARRAYS)


def dataset_kind(name: str | None) -> DatasetKind:
    """The kind called ``name`` (``None``: the default kind); ``KeyError`` lists the known."""
    try:
        return KINDS[name or DEFAULT_KIND]
    except KeyError:
        raise KeyError(f"unknown dataset kind {name!r}; known kinds: "
                       f"{', '.join(KINDS)}") from None


def split_array(split: str) -> str:
    """The array holding a split's pair ids, e.g. ``"train" -> "train_idx"``."""
    return f"{split}_idx"


# Steering variants: id, canonical name, aliases, and the array holding the vectors (None = zeros).
STEERING_VARIANTS: tuple[str, ...] = ("zero", "centroid", "keyword", "residual")
STEERING_ARRAYS: dict[str, str | None] = {
    "zero": None,
    "centroid": "steering_centroid",
    "keyword": "steering_keyword_weighted",
    "residual": "steering_residual",
}
VARIANT_ALIASES: dict[str, str] = {"none": "zero", "keyword_weighted": "keyword"}

# The four negative tiers of the original system's miner (docs/data-model.md#negative-tiers).
NEGATIVE_TIERS: dict[int, str] = {
    1: "same cluster as the positive",
    2: "adjacent cluster",
    3: "most similar in a wrong cluster",
    4: "random from a distant cluster",
}


def bytes_per_sample(embedding_dim: int, n_neg: int, itemsize: int = 4) -> int:
    """Bytes a served sample occupies: question, target, steering and n_neg negatives, plus the
    int64 tiers and the three scalars and variant id: 4*D*(3+n_neg) + 8*n_neg + 24
    (docs/performance.md#what-a-sample-costs).
    """
    return itemsize * embedding_dim * (3 + n_neg) + 8 * n_neg + 24
