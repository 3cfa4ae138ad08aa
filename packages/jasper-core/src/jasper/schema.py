"""The JASPER data model as code: the one catalogue of every stored array.

Backends, validation, the synthetic generator, the manifest and the dataset all read
:data:`ARRAYS`; nothing else lists array names. See docs/data-model.md.

Ragged keyword ids are stored as CSR: ``pair_keyword_offsets`` ``[N_p + 1]`` (row ``p`` owns
``pair_keyword_ids[offsets[p]:offsets[p + 1]]``) and ``pair_keyword_ids`` (the flat values).
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


class Cols(enum.Enum):
    """What the second dimension of a rank-2 array must equal."""

    EMBEDDING_DIM = "embedding_dim"
    N_NEG = "n_neg"
    TWO = "2"


INT_INDEX = frozenset({"int64"})
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
            "pair_index", Role.PAIR, 2, INT_INDEX, "(question row, source row) of each pair",
            cols=Cols.TWO, references=("question_embs", "source_embs"),
        ),
        ArraySpec(
            "pair_cluster_id", Role.PAIR, 1, INT_INDEX, "cluster of each pair",
            references=("centroid_embs",),
        ),
        ArraySpec(
            "pair_relevance", Role.PAIR, 1, FLOAT_DTYPES, "relevance of each pair, 0..1",
            finite=True, quality_range=(0.0, 1.0),
        ),
        ArraySpec(
            "pair_keyword_offsets", Role.CSR_OFFSETS, 1, INT_INDEX,
            "CSR offsets of each pair's keyword ids [N_p + 1]",
        ),
        ArraySpec(
            "pair_keyword_ids", Role.CSR_VALUES, 1, INT_INDEX, "CSR values: keyword rows",
            references=("keyword_embs",),
        ),
        ArraySpec(
            "hard_negatives", Role.PAIR, 2, INT_INDEX, "hard-negative source rows of each pair",
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
        ArraySpec("train_idx", Role.SPLIT, 1, INT_INDEX, "pair ids of the train split",
                  references=(PAIRS,)),
        ArraySpec("val_idx", Role.SPLIT, 1, INT_INDEX, "pair ids of the validation split",
                  references=(PAIRS,)),
        ArraySpec("test_idx", Role.SPLIT, 1, INT_INDEX, "pair ids of the test split",
                  references=(PAIRS,)),
    )
}

ARRAY_NAMES: tuple[str, ...] = tuple(ARRAYS)
TABLES: tuple[str, ...] = tuple(n for n, s in ARRAYS.items() if s.role is Role.TABLE)
PAIR_ARRAYS: tuple[str, ...] = tuple(n for n, s in ARRAYS.items() if s.role is Role.PAIR)
SPLITS: tuple[str, ...] = ("train", "val", "test")


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
