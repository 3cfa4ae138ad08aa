"""RAG triplet generation over a question collection and a passage collection
(docs/migrating.md#rag-triplets-over-chromadb): dataset preparation, not training.

A triplet ``(question_id, source_id_1, source_id_2, label)`` compares two passages for one
question; ``label`` is :data:`UNLABELED` (-1), :data:`NEITHER` (0, neither or equal),
:data:`FIRST_BETTER` (1) or :data:`SECOND_BETTER` (2). Passage metadata carry ``question_id``
and ``relevance``; a passage is relevant to its question when ``relevance > 0``.

Strategies of :meth:`TripletGenerator.generate_samples`:

- ``positive``: every pair of a question's relevant passages, ``C(R, 2)`` per question,
  labelled by which is more relevant (0 when equal);
- ``contrastive``: each relevant passage with ``k`` sampled passages not relevant to the question
  (label 1);
- ``similar``: each relevant passage with the most embedding-similar passage that is not
  relevant to the question, found by Chroma's nearest-neighbour query (label 1).

Deterministic by seed: questions and passages are visited in sorted id order and sampling uses
one generator seeded once. Chroma is always given embeddings: no model is downloaded.
"""

from __future__ import annotations

import abc
import csv
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jasper.errors import FormatError
from jasper_chroma.client import (
    DAMAGED_STORE,
    SERVER_FAILED,
    ChromaStoreError,
    WriterLock,
    chroma_errors,
    get_client,
    get_collection,
)
from jasper_chroma.layout import ServerLocation, is_server
from jasper_chroma.rag_names import STRATEGIES
from jasper_chroma.reader import PAGE

UNLABELED, NEITHER, FIRST_BETTER, SECOND_BETTER = -1, 0, 1, 2
CSV_COLUMNS: tuple[str, ...] = ("question_id", "source_id_1", "source_id_2", "label")


@dataclass(frozen=True)
class Triplet:
    """Two passages compared for one question."""

    question_id: str
    source_id_1: str
    source_id_2: str
    label: int


@dataclass
class _Relevance:
    """Passages by question: ``{question_id: [(passage_id, relevance), ...]}`` sorted by id."""

    relevant: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    passages: list[str] = field(default_factory=list)


def export_csv(triplets: Sequence[Triplet], path: str | Path) -> Path:
    """Write ``triplets`` to ``path`` with the columns of :data:`CSV_COLUMNS`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for t in triplets:
            w.writerow((t.question_id, t.source_id_1, t.source_id_2, t.label))
    tmp.replace(p)
    return p


class TripletGenerator(abc.ABC):
    """Triplets from a question collection and a passage collection in one Chroma store.

    Subclasses implement :meth:`load_dataset` (put the corpus into the collections) and
    :meth:`validate_dataset`; :meth:`generate_samples` implements the three strategies over
    whatever the collections hold and may be overridden.
    """

    def __init__(self, location: str | Path, *, question_collection: str = "questions",
                 passage_collection: str = "passages", seed: int = 0) -> None:
        self.location = location
        self.question_collection = question_collection
        self.passage_collection = passage_collection
        self.seed = seed
        self.problems: list[str] = []

    # --- the store
    def client(self) -> Any:
        if is_server(self.location):
            return get_client(ServerLocation.parse(str(self.location)))
        Path(self.location).mkdir(parents=True, exist_ok=True)
        return get_client(Path(self.location))

    @property
    def where(self) -> str:
        return str(self.location)

    @property
    def advice(self) -> str:
        """What to do when a Chroma call on the store fails (ends its error messages)."""
        return SERVER_FAILED if is_server(self.location) else DAMAGED_STORE

    def questions(self) -> Any:
        return get_collection(self.client(), self.question_collection, self.where)

    def passages(self) -> Any:
        return get_collection(self.client(), self.passage_collection, self.where)

    # --- what subclasses implement
    @abc.abstractmethod
    def load_dataset(self) -> None:
        """Put the questions and passages (with embeddings and metadata) into the store."""

    @abc.abstractmethod
    def validate_dataset(self) -> bool:
        """Whether the stored corpus can make triplets; problems go to :attr:`problems`."""

    # --- generation
    def _relevance(self) -> _Relevance:
        col = self.passages()
        rel = _Relevance()
        rows: list[tuple[str, dict[str, Any]]] = []
        with chroma_errors(self.where, f"reading the metadata of {col.name!r} failed",
                           self.advice):
            total = int(col.count())
            for offset in range(0, total, PAGE):
                got = col.get(include=["metadatas"], limit=PAGE, offset=offset)
                rows += list(zip(got["ids"], got["metadatas"] or [{}] * len(got["ids"])))
        rows.sort()
        rel.passages = [pid for pid, _ in rows]
        for pid, meta in rows:
            meta = meta or {}
            qid, r = meta.get("question_id"), float(meta.get("relevance", 0.0) or 0.0)
            if qid is not None and r > 0:
                rel.relevant.setdefault(str(qid), []).append((pid, r))
        return rel

    def generate_samples(self, kind: str, **kw: Any) -> list[Triplet]:
        """Triplets of strategy ``kind`` (:data:`STRATEGIES`); ``k`` for ``contrastive``
        (default 3)."""
        if kind not in STRATEGIES:
            raise ValueError(f"unknown strategy {kind!r}; strategies: {', '.join(STRATEGIES)}")
        rel = self._relevance()
        rng = np.random.default_rng([self.seed, STRATEGIES.index(kind)])
        return list(getattr(self, f"_{kind}")(rel, rng, **kw))

    def _positive(self, rel: _Relevance, rng: np.random.Generator) -> Iterator[Triplet]:
        for qid in sorted(rel.relevant):
            for (a, ra), (b, rb) in itertools.combinations(rel.relevant[qid], 2):
                label = NEITHER if ra == rb else (FIRST_BETTER if ra > rb else SECOND_BETTER)
                yield Triplet(qid, a, b, label)

    def _contrastive(self, rel: _Relevance, rng: np.random.Generator,
                     k: int = 3) -> Iterator[Triplet]:
        everything = np.array(rel.passages, dtype=object)
        for qid in sorted(rel.relevant):
            mine = {p for p, _ in rel.relevant[qid]}
            others = everything[[p not in mine for p in rel.passages]]
            if not len(others):
                continue
            for p, _ in rel.relevant[qid]:
                picks = rng.choice(len(others), size=min(k, len(others)), replace=False)
                for j in sorted(picks.tolist()):
                    yield Triplet(qid, p, str(others[j]), FIRST_BETTER)

    def _similar(self, rel: _Relevance, rng: np.random.Generator) -> Iterator[Triplet]:
        col = self.passages()
        for qid in sorted(rel.relevant):
            mine = [p for p, _ in rel.relevant[qid]]
            with chroma_errors(self.where, f"reading embeddings of {col.name!r} failed",
                               self.advice):
                got = col.get(ids=mine, include=["embeddings"])
                n = min(int(col.count()), len(mine) + 8)
            emb = {i: e for i, e in zip(got["ids"], got["embeddings"])}
            for p in mine:
                if p not in emb:
                    raise ChromaStoreError(f"{self.where}: collection {col.name!r} has no id {p!r}")
                with chroma_errors(self.where, f"nearest-neighbour query on {col.name!r} failed",
                                   self.advice):
                    hits = col.query(query_embeddings=[emb[p]], n_results=n,
                                     include=[])["ids"][0]
                best = next((h for h in hits if h not in mine), None)
                if best is not None:
                    yield Triplet(qid, p, best, FIRST_BETTER)


class CorpusTripletGenerator(TripletGenerator):
    """A corpus from a JSONL or CSV file with given embeddings.

    JSONL: one object a line, ``{"type": "question", "id": ..., "text": ..., "embedding":
    [...]}`` or ``{"type": "passage", "id": ..., "question_id": ..., "relevance": 0.8,
    "text": ..., "embedding": [...], "keywords": [...]}`` (keywords optional). CSV: the same
    fields as columns, ``embedding`` as space-separated floats, ``keywords`` comma-separated.
    """

    def __init__(self, corpus: str | Path, location: str | Path, **kw: Any) -> None:
        super().__init__(location, **kw)
        self.corpus = Path(corpus)

    def records(self) -> list[dict[str, Any]]:
        p = self.corpus
        if not p.is_file():
            raise FormatError(p, "corpus file not found")
        out: list[dict[str, Any]] = []
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise FormatError(p, f"line {n}: not JSON: {exc}") from None
        elif p.suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    # an empty CSV cell is an absent field
                    rec: dict[str, Any] = {k: v for k, v in row.items() if v not in ("", None)}
                    rec["embedding"] = [float(x) for x in (row.get("embedding") or "").split()]
                    if row.get("relevance"):
                        rec["relevance"] = float(row["relevance"])
                    rec["keywords"] = [k for k in (row.get("keywords") or "").split(",") if k]
                    out.append(rec)
        else:
            raise FormatError(p, "a corpus is a .jsonl or .csv file")
        for n, rec in enumerate(out, 1):
            if rec.get("type") not in {"question", "passage"} or not rec.get("id") or \
                    not rec.get("embedding"):
                raise FormatError(p, f"record {n}: needs type (question|passage), id and "
                                  "embedding")
        return out

    def load_dataset(self) -> None:
        """Create the collections (ids, embeddings, documents, metadata); one writer at a time
        for a local store."""
        recs = self.records()
        lock = WriterLock(Path(self.location)) if not is_server(self.location) else None
        if lock is not None:
            lock.__enter__()
        try:
            client = self.client()
            kw_names = sorted({k for r in recs for k in r.get("keywords") or []})
            for name, kind in ((self.question_collection, "question"),
                               (self.passage_collection, "passage")):
                part = [r for r in recs if r["type"] == kind]
                col = client.get_or_create_collection(name, embedding_function=None,
                                                      configuration={"hnsw": {"space": "cosine"}})
                for start in range(0, len(part), PAGE):
                    chunk = part[start : start + PAGE]
                    metas = [self._meta(r) for r in chunk] if kind == "passage" else None
                    col.upsert(ids=[str(r["id"]) for r in chunk],
                               embeddings=np.asarray([r["embedding"] for r in chunk], np.float32),
                               documents=[str(r.get("text", "")) for r in chunk],
                               metadatas=metas)
            if kw_names:
                # keyword embeddings: the mean of the passages naming the keyword
                kcol = client.get_or_create_collection("keywords", embedding_function=None)
                vecs = []
                for k in kw_names:
                    rows = [r["embedding"] for r in recs if k in (r.get("keywords") or [])]
                    vecs.append(np.mean(np.asarray(rows, np.float32), axis=0))
                kcol.upsert(ids=kw_names, embeddings=np.asarray(vecs, np.float32))
        finally:
            if lock is not None:
                lock.__exit__()

    @staticmethod
    def _meta(r: dict[str, Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {"relevance": float(r.get("relevance", 0.0) or 0.0)}
        if r.get("question_id") is not None:
            meta["question_id"] = str(r["question_id"])
        if r.get("keywords"):
            meta["keywords"] = ",".join(r["keywords"])
        return meta

    def validate_dataset(self) -> bool:
        """Every passage's question exists, relevances are in [0, 1], one dimension, at least one
        relevant passage."""
        self.problems = []
        recs = self.records()
        questions = {str(r["id"]) for r in recs if r["type"] == "question"}
        dims = {len(r["embedding"]) for r in recs}
        if len(dims) != 1:
            self.problems.append(f"embeddings have several dimensions: {sorted(dims)}")
        relevant = 0
        for r in recs:
            if r["type"] != "passage":
                continue
            rel = float(r.get("relevance", 0.0) or 0.0)
            if not 0.0 <= rel <= 1.0:
                self.problems.append(f"passage {r['id']!r}: relevance {rel} outside [0, 1]")
            qid = r.get("question_id")
            if qid is not None and str(qid) not in questions:
                self.problems.append(f"passage {r['id']!r}: question_id {qid!r} is not a question")
            relevant += rel > 0 and qid is not None
        if not relevant:
            self.problems.append("no passage is relevant to a question")
        return not self.problems
