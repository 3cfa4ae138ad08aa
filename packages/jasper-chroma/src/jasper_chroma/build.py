"""Build a JASPER dataset from questions, passages and relevance kept in Chroma.

The store (a PersistentClient directory or a server) holds two collections: questions, and
passages whose metadata carry ``question_id`` (the question they answer) and ``relevance``
(0..1); optionally ``keywords`` (comma-separated ids of a third collection of keyword
embeddings). Rows are the collections' ids in sorted order (deterministic). Every passage with
``relevance > 0`` and a known ``question_id`` is a pair; the rest are sources only, available
as negatives. Everything else is :func:`jasper.build.build_arrays`'s: k-means clusters over the
passages, hard negatives from Chroma's nearest-neighbour query (then tiered by similarity),
keyword CSR, steering, centroid distances, splits by question; written atomically with any
backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jasper.build import BuildConfig, build_dataset
from jasper.errors import FormatError
from jasper.location import is_url
from jasper_chroma.client import ChromaStoreError, chroma_errors, get_client, get_collection
from jasper_chroma.layout import ServerLocation, is_server
from jasper_chroma.reader import PAGE, fetch_ids

#: What to do when reading the store a dataset is built from fails.
SOURCE_FAILED = ("check that the Chroma store is reachable and intact (a damaged local store: "
                 "restore it from a copy)")


def open_store_location(location: str | Path) -> tuple[Any, str]:
    """A client for a PersistentClient directory or ``chroma://host:port[/tenant/db]``."""
    if is_server(location):
        loc = ServerLocation.parse(str(location))
        return get_client(loc), loc.url()
    p = Path(location)
    if not (p / "chroma.sqlite3").is_file():
        raise FormatError(p, "not a Chroma PersistentClient directory (no chroma.sqlite3)")
    return get_client(p), str(p)


def _build_then_commit(out: str | Path, backend: str | None, overwrite: bool,
                       progress: bool | None, options: Mapping[str, Any] | None,
                       build: Callable[[Path], Path]) -> Any:
    """Build into a local temporary directory, then commit it to the URL ``out`` with
    :func:`jasper.convert` (checksums verified; the URL's generation commit). The builder
    keeps its scratch files beside a local target, which a URL has not."""
    import tempfile

    import jasper
    from jasper.build import default_writer

    with tempfile.TemporaryDirectory(prefix="jasper-build-") as tmp:
        local = build(Path(tmp) / "built")
        report = jasper.convert(local, out, to=backend or default_writer(), overwrite=overwrite,
                                progress=progress, **dict(options or {}))
    return report.dst


def all_ids(collection: Any, where: str) -> list[str]:
    """Every id of ``collection``, sorted (the row order of the built dataset)."""
    ids: list[str] = []
    with chroma_errors(where, f"listing ids of {collection.name!r} failed", SOURCE_FAILED):
        total = int(collection.count())
        for offset in range(0, total, PAGE):
            ids += collection.get(include=[], limit=PAGE, offset=offset)["ids"]
    return sorted(ids)


def _dim(collection: Any, ids: list[str], where: str) -> int:
    if not ids:
        raise ChromaStoreError(f"{where}: collection {collection.name!r} is empty")
    with chroma_errors(where, f"reading an embedding of {collection.name!r} failed",
                       SOURCE_FAILED):
        emb = collection.get(ids=ids[:1], include=["embeddings"])["embeddings"]
    return int(np.shape(emb)[1])


def read_corpus(location: str | Path, *, question_collection: str = "questions",
                passage_collection: str = "passages", keyword_collection: str = "keywords",
                progress: bool | None = None) -> dict[str, Any]:
    """The store's tables, pairs and keywords as arrays (rows in sorted id order)."""
    client, where = open_store_location(location)
    qcol = get_collection(client, question_collection, where, SOURCE_FAILED)
    pcol = get_collection(client, passage_collection, where, SOURCE_FAILED)
    q_ids, p_ids = all_ids(qcol, where), all_ids(pcol, where)
    d = _dim(qcol, q_ids, where)
    if _dim(pcol, p_ids, where) != d:
        raise ChromaStoreError(f"{where}: collection {passage_collection!r} has dimension "
                               f"{_dim(pcol, p_ids, where)} but {question_collection!r} has {d}")
    questions = np.empty((len(q_ids), d), dtype=np.float32)
    fetch_ids(qcol, q_ids, questions, where, progress, advice=SOURCE_FAILED)
    sources = np.empty((len(p_ids), d), dtype=np.float32)
    metas = fetch_ids(pcol, p_ids, sources, where, progress, include_metadata=True,
                      advice=SOURCE_FAILED)
    q_row = {q: i for i, q in enumerate(q_ids)}
    pairs, relevance, kw_lists = [], [], []
    kw_names: list[str] = []
    with chroma_errors(where, f"opening collection {keyword_collection!r} failed",
                       SOURCE_FAILED):
        try:
            kcol = client.get_collection(keyword_collection, embedding_function=None)
        except Exception:  # keywords are optional: a store without them builds without them
            kcol = None
    kw_row: dict[str, int] = {}
    if kcol is not None:
        kw_names = all_ids(kcol, where)
        kw_row = {k: i for i, k in enumerate(kw_names)}
    for row, (pid, meta) in enumerate(zip(p_ids, metas)):
        meta = meta or {}
        qid, rel = meta.get("question_id"), float(meta.get("relevance", 0.0) or 0.0)
        if qid is None or rel <= 0:
            continue
        if str(qid) not in q_row:
            raise ChromaStoreError(f"{where}: passage {pid!r} of {passage_collection!r} names "
                                   f"question_id {qid!r}, which {question_collection!r} lacks")
        pairs.append((q_row[str(qid)], row))
        relevance.append(min(1.0, rel))
        names = [k for k in str(meta.get("keywords", "") or "").split(",") if k]
        unknown = [k for k in names if k not in kw_row]
        if unknown:
            raise ChromaStoreError(f"{where}: passage {pid!r} names keyword {unknown[0]!r}, "
                                   f"which collection {keyword_collection!r} lacks")
        kw_lists.append([kw_row[k] for k in names])
    if not pairs:
        raise ChromaStoreError(f"{where}: no passage of {passage_collection!r} has a "
                               "question_id and relevance > 0: there are no pairs")
    out: dict[str, Any] = {
        "questions": questions, "sources": sources,
        "pairs": np.asarray(pairs, dtype=np.int64),
        "relevance": np.asarray(relevance, dtype=np.float32),
        "question_ids": q_ids, "passage_ids": p_ids, "collection": pcol, "where": where,
    }
    if kcol is not None and kw_names:
        keywords = np.empty((len(kw_names), d), dtype=np.float32)
        fetch_ids(kcol, kw_names, keywords, where, progress, advice=SOURCE_FAILED)
        out["keywords"], out["pair_keywords"] = keywords, kw_lists
    return out


def chroma_neighbours(collection: Any, ids: list[str], sources: np.ndarray, where: str):  # type: ignore[no-untyped-def]
    """A :data:`jasper.build.NeighbourFn` answered by Chroma's nearest-neighbour query."""
    row_of = {p: i for i, p in enumerate(ids)}

    def neighbours(rows: np.ndarray, k: int) -> np.ndarray:
        out = np.empty((len(rows), k), dtype=np.int64)
        uniq, inv = np.unique(rows, return_inverse=True)
        found = np.empty((len(uniq), k), dtype=np.int64)
        for start in range(0, len(uniq), 512):
            part = uniq[start : start + 512]
            with chroma_errors(where, f"nearest-neighbour query on {collection.name!r} failed",
                               SOURCE_FAILED):
                res = collection.query(query_embeddings=sources[part], n_results=k, include=[])
            for j, hit in enumerate(res["ids"]):
                got = [row_of[h] for h in hit][:k]
                got += [int(part[j])] * (k - len(got))  # the positive pads; the miner drops it
                found[start + j] = got
        out[:] = found[inv.reshape(-1)]
        return out

    return neighbours


def build_from_chroma(
    location: str | Path,
    out: str | Path,
    *,
    backend: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    config: BuildConfig | None = None,
    options: Mapping[str, Any] | None = None,
    question_collection: str = "questions",
    passage_collection: str = "passages",
    keyword_collection: str = "keywords",
    kind: str = "jasper-steering",
) -> Path:
    """Build a complete JASPER dataset at ``out`` from the Chroma store at ``location``
    (``kind="cluster-labeled"``: :func:`build_cluster_labeled_from_chroma`)."""
    if is_url(out):
        return _build_then_commit(out, backend, overwrite, progress, options, lambda local: (
            build_from_chroma(location, local, backend=backend, progress=progress,
                              config=config, options=options,
                              question_collection=question_collection,
                              passage_collection=passage_collection,
                              keyword_collection=keyword_collection, kind=kind)))
    if kind == "cluster-labeled":
        cfg = config or BuildConfig()
        return build_cluster_labeled_from_chroma(
            location, out, n_clusters=cfg.n_clusters, seed=cfg.seed, backend=backend,
            overwrite=overwrite, progress=progress, options=options,
            question_collection=question_collection, passage_collection=passage_collection)
    if kind != "jasper-steering":
        raise ValueError(f"unknown dataset kind {kind!r}: jasper-steering or cluster-labeled")
    corpus = read_corpus(location, question_collection=question_collection,
                         passage_collection=passage_collection,
                         keyword_collection=keyword_collection, progress=progress)
    inputs: dict[str, Any] = {"relevance": corpus["relevance"]}
    if "keywords" in corpus:
        inputs["keywords"], inputs["pair_keywords"] = corpus["keywords"], corpus["pair_keywords"]
    return build_dataset(
        out, corpus["questions"], corpus["sources"], corpus["pairs"], backend=backend,
        overwrite=overwrite, progress=progress, options=options, config=config,
        neighbours=chroma_neighbours(corpus["collection"], corpus["passage_ids"],
                                     corpus["sources"], corpus["where"]),
        extra={"chroma": {"location": str(location), "questions": question_collection,
                          "passages": passage_collection}},
        **inputs)


def _documents(collection: Any, ids: list[str], where: str) -> list[str]:
    docs: dict[str, str] = {}
    for start in range(0, len(ids), PAGE):
        want = ids[start : start + PAGE]
        with chroma_errors(where, f"reading documents of {collection.name!r} failed",
                           SOURCE_FAILED):
            got = collection.get(ids=want, include=["documents"])
        docs.update(zip(got["ids"], [d or "" for d in (got["documents"] or [""] * len(want))]))
    return [docs.get(i, "") for i in ids]


def build_cluster_labeled_from_chroma(
    location: str | Path,
    out: str | Path,
    *,
    n_clusters: int | None = None,
    seed: int = 0,
    temperature: float = 10.0,
    backend: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    options: Mapping[str, Any] | None = None,
    question_collection: str = "questions",
    passage_collection: str = "passages",
) -> Path:
    """A cluster-labeled dataset (docs/data-model.md#cluster-labeled-datasets) from the same store: one sample per
    passage (``source``) and per question (``question``), keeping each one's ``chroma_id`` and
    document text. Clusters are k-means over the passages (:func:`jasper.build.kmeans_centroids`);
    a sample's labels are the softmax of ``temperature`` x its cosine similarity to each
    centroid; its steering embedding is its nearest centroid (``cluster_descriptor``) and the
    combined labels those of the normalised mean of both."""
    from jasper.build import default_writer, kmeans_centroids
    from jasper.cluster_kind import write_cluster_labeled

    if is_url(out):
        return _build_then_commit(out, backend, overwrite, progress, options, lambda local: (
            build_cluster_labeled_from_chroma(
                location, local, n_clusters=n_clusters, seed=seed, temperature=temperature,
                backend=backend, progress=progress, options=options,
                question_collection=question_collection,
                passage_collection=passage_collection)))

    corpus = read_corpus(location, question_collection=question_collection,
                         passage_collection=passage_collection, progress=progress)
    client, where = open_store_location(location)
    pcol = get_collection(client, passage_collection, where)
    qcol = get_collection(client, question_collection, where)
    base = np.concatenate([corpus["sources"], corpus["questions"]]).astype(np.float32)
    k = n_clusters or max(2, round(np.sqrt(corpus["sources"].shape[0] / 2)))
    centroids = kmeans_centroids(corpus["sources"], k, seed=seed, progress=progress)

    def labels(x: np.ndarray) -> np.ndarray:
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        logits = temperature * (xn @ centroids.T)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    base_labels = labels(base)
    steering = centroids[base_labels.argmax(axis=1)]
    bn = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
    n_p, n_q = corpus["sources"].shape[0], corpus["questions"].shape[0]
    return write_cluster_labeled(
        out, base_embeddings=base, steering_embeddings=steering, source_labels=base_labels,
        steering_labels=labels(steering), combined_labels=labels(bn + steering),
        sample_type=["source"] * n_p + ["question"] * n_q,
        text=_documents(pcol, corpus["passage_ids"], where)
        + _documents(qcol, corpus["question_ids"], where),
        chroma_id=[*corpus["passage_ids"], *corpus["question_ids"]],
        steering_mode=["cluster_descriptor"] * (n_p + n_q), n_clusters=centroids.shape[0],
        dataset_info={"source": {"chroma": str(location), "questions": question_collection,
                                 "passages": passage_collection}},
        backend=backend or default_writer(), overwrite=overwrite, progress=progress,
        **dict(options or {}))
