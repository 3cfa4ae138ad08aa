"""jasper build --from-chroma: a complete JASPER dataset from questions, passages and relevance
in a real PersistentClient store and on a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jasper.build import BuildConfig
from jasper.loader import create_loader
from jasper.store import open_store
from jasper.validation import validate
from jasper_chroma.build import build_from_chroma, read_corpus
from jasper_chroma.client import ChromaStoreError, get_client
from jasper_chroma.layout import ServerLocation
from jasper_chroma.rag import CorpusTripletGenerator

CORPUS = Path(__file__).parent / "corpus" / "corpus.jsonl"


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store") / "chroma"
    CorpusTripletGenerator(CORPUS, store).load_dataset()
    return store


def check_built(path: Path, n_pairs: int = 30) -> None:
    report = validate(path, deep=True)
    assert report.ok and report.n_pairs == n_pairs
    with open_store(path) as r:
        pairs = r.read("pair_index")
        neg = r.read("hard_negatives")
        assert not (neg == pairs[:, 1:]).any()
        assert r.read("pair_keyword_offsets")[-1] == 60  # two keywords per relevant passage
        assert set(r.read("negative_tiers").unique().tolist()) <= {1, 2, 3, 4}
    loader = create_loader(path, "train", batch_size=4, pin_memory=False)
    batch = next(iter(loader))
    model = torch.nn.Linear(16, 16)
    loss = torch.nn.functional.mse_loss(model(batch["question_emb"]), batch["target_source_emb"])
    loss.backward()
    assert torch.isfinite(loss)


def test_build_from_a_local_store(local_store: Path, tmp_path: Path) -> None:
    out = build_from_chroma(local_store, tmp_path / "ds", backend="pt",
                            config=BuildConfig(n_neg=4, n_clusters=3, seed=1))
    check_built(out)
    corpus = read_corpus(local_store)
    with open_store(out) as r:
        # rows are the collections' sorted ids, embeddings as Chroma holds them (float32)
        assert torch.equal(r.read("question_embs"), torch.from_numpy(corpus["questions"]))
        relevance = r.read("pair_relevance")
    assert sorted(set(relevance.tolist())) == pytest.approx([0.6, 1.0])
    # deterministic: the same store and seed build the same bytes
    again = build_from_chroma(local_store, tmp_path / "ds2", backend="pt",
                              config=BuildConfig(n_neg=4, n_clusters=3, seed=1))
    with open_store(out) as a, open_store(again) as b:
        for name in ("hard_negatives", "steering_residual", "train_idx"):
            assert torch.equal(a.read(name), b.read(name)), name


def test_negatives_come_from_the_nearest_neighbours(local_store: Path, tmp_path: Path) -> None:
    out = build_from_chroma(local_store, tmp_path / "ds", backend="pt",
                            config=BuildConfig(n_neg=2, n_clusters=3))
    corpus = read_corpus(local_store)
    s = corpus["sources"] / np.linalg.norm(corpus["sources"], axis=1, keepdims=True)
    with open_store(out) as r:
        pos, neg = r.read("pair_index")[:, 1].numpy(), r.read("hard_negatives").numpy()
    sims = s @ s.T
    np.fill_diagonal(sims, -np.inf)
    # each pair's hardest negative is among the 4 passages nearest its positive
    top4 = np.argsort(-sims, axis=1)[:, :4]
    hit = [neg[i, 0] in top4[pos[i]] for i in range(len(pos))]
    assert np.mean(hit) > 0.9


def test_build_from_a_server_store(chroma_server: str, tmp_path: Path) -> None:
    url = f"{chroma_server}/default_tenant/default_database"
    gen = CorpusTripletGenerator(CORPUS, url)
    gen.question_collection, gen.passage_collection = "srv-questions", "srv-passages"
    gen.load_dataset()
    from jasper.cli import main

    # the built dataset goes onto the same server, next to the corpus it came from
    out = build_from_chroma(url, f"{url}/built", backend="chroma",
                            config=BuildConfig(n_neg=4, n_clusters=3),
                            question_collection="srv-questions",
                            passage_collection="srv-passages")
    assert str(out) == f"{url}/built"
    check_built(out)
    assert main(["validate", str(out), "--deep"]) == 0
    assert not Path("chroma:").exists(), "the URL was taken for a relative directory"
    assert list(tmp_path.iterdir()) == []


def test_bad_stores_are_typed_errors(local_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ChromaStoreError, match="collection 'nope' not found"):
        build_from_chroma(local_store, tmp_path / "a", question_collection="nope")
    assert not (tmp_path / "a").exists()
    client = get_client(local_store)
    wrong = client.get_or_create_collection("wrong-dim", embedding_function=None)
    wrong.upsert(ids=["w"], embeddings=np.zeros((1, 5), np.float32))
    with pytest.raises(ChromaStoreError, match="'passages' has dimension 16 but 'wrong-dim' has 5"):
        build_from_chroma(local_store, tmp_path / "b", question_collection="wrong-dim")
    from jasper.errors import FormatError

    with pytest.raises(FormatError, match="not a Chroma PersistentClient directory"):
        build_from_chroma(tmp_path, tmp_path / "c")
    down = ServerLocation("127.0.0.1", 9)  # discard port: nothing listens
    with pytest.raises(ChromaStoreError, match="127.0.0.1:9.*cannot connect"):
        build_from_chroma(down.url(), tmp_path / "d")
    assert not any(p.exists() for p in (tmp_path / "b", tmp_path / "c", tmp_path / "d"))


def test_cluster_labeled_from_the_same_store(local_store: Path, tmp_path: Path) -> None:
    from jasper import records
    from jasper.schema import CLUSTER_RECORDS
    from jasper_chroma.build import build_cluster_labeled_from_chroma

    out = build_cluster_labeled_from_chroma(local_store, tmp_path / "cl", n_clusters=3,
                                            backend="pt")
    report = validate(out, deep=True)
    assert report.ok
    spec = CLUSTER_RECORDS["chroma_id"]
    every = np.arange(60)
    with open_store(out) as r:
        ids = records.decode(r.read(spec.offsets_array), r.read(spec.bytes_array), every, spec)
        kinds = records.decode(r.read(CLUSTER_RECORDS["sample_type"].offsets_array),
                               r.read(CLUSTER_RECORDS["sample_type"].bytes_array), every,
                               CLUSTER_RECORDS["sample_type"])
        labels = r.read("combined_labels")
    assert ids[:2] == ["p000", "p001"] and ids[-1] == "q09" and len(ids) == 60
    assert kinds.count("question") == 10 and kinds.count("source") == 50
    assert torch.allclose(labels.sum(1), torch.ones(60))
