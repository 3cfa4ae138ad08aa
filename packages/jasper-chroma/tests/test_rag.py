"""RAG triplets over a real PersistentClient store, from the corpus shipped with the tests."""

from __future__ import annotations

import csv
import json
from math import comb
from pathlib import Path

import pytest

from jasper.cli import main
from jasper_chroma.rag import (
    CSV_COLUMNS,
    FIRST_BETTER,
    NEITHER,
    SECOND_BETTER,
    CorpusTripletGenerator,
    export_csv,
)

CORPUS = Path(__file__).parent / "corpus" / "corpus.jsonl"


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> CorpusTripletGenerator:
    gen = CorpusTripletGenerator(CORPUS, tmp_path_factory.mktemp("rag") / "store", seed=3)
    assert gen.validate_dataset(), gen.problems
    gen.load_dataset()
    return gen


def test_positive_is_every_pair_of_relevant_passages(generator: CorpusTripletGenerator) -> None:
    triplets = generator.generate_samples("positive")
    assert len(triplets) == 10 * comb(3, 2)
    by_pair = {(t.source_id_1, t.source_id_2): t.label for t in triplets}
    assert by_pair[("p000", "p001")] == FIRST_BETTER  # 1.0 vs 0.6
    assert by_pair[("p001", "p002")] == NEITHER       # 0.6 vs 0.6
    assert all(t.question_id == f"q{t.source_id_1[1:3]}" for t in triplets)
    assert SECOND_BETTER not in by_pair.values()  # passages are listed best first


def test_contrastive_samples_irrelevant_passages(generator: CorpusTripletGenerator) -> None:
    triplets = generator.generate_samples("contrastive", k=2)
    assert len(triplets) == 10 * 3 * 2
    for t in triplets:
        assert t.label == FIRST_BETTER
        assert not t.source_id_2.startswith(f"p{t.question_id[1:]}")  # not its own passage
    assert triplets == generator.generate_samples("contrastive", k=2)  # deterministic by seed
    other = CorpusTripletGenerator(CORPUS, generator.location, seed=4)
    assert other.generate_samples("contrastive", k=2) != triplets


def test_similar_finds_the_nearest_non_relevant_passage(generator: CorpusTripletGenerator) -> None:
    import numpy as np

    triplets = generator.generate_samples("similar")
    assert len(triplets) == 30
    recs = {r["id"]: r for r in generator.records()}
    for t in triplets[:6]:
        mine = {p for p in recs if p.startswith(f"p{t.question_id[1:]}")}
        assert t.source_id_2 not in mine
        e = np.asarray(recs[t.source_id_1]["embedding"])

        def cos(p: str, e: np.ndarray = e) -> float:
            v = np.asarray(recs[p]["embedding"])
            return float(v @ e / np.linalg.norm(v) / np.linalg.norm(e))
        best = max((p for p in recs if recs[p]["type"] == "passage" and p not in mine), key=cos)
        assert cos(t.source_id_2) >= cos(best) - 1e-4


def test_validate_dataset_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = [json.loads(x) for x in CORPUS.read_text().splitlines()[:4]]
    lines[1]["question_id"] = "nope"
    lines[2]["relevance"] = 1.5
    bad.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    gen = CorpusTripletGenerator(bad, tmp_path / "store")
    assert not gen.validate_dataset()
    assert any("'nope' is not a question" in p for p in gen.problems)
    assert any("relevance 1.5" in p for p in gen.problems)


def test_csv_corpus_and_export(tmp_path: Path) -> None:
    recs = [json.loads(x) for x in CORPUS.read_text().splitlines()]
    path = tmp_path / "corpus.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["type", "id", "question_id", "relevance", "text", "embedding",
                               "keywords"])
        w.writeheader()
        for r in recs:
            w.writerow({**r, "embedding": " ".join(map(str, r["embedding"])),
                        "keywords": ",".join(r.get("keywords", []))})
    gen = CorpusTripletGenerator(path, tmp_path / "store")
    assert gen.validate_dataset(), gen.problems
    gen.load_dataset()
    triplets = gen.generate_samples("positive")
    out = export_csv(triplets, tmp_path / "t.csv")
    rows = list(csv.reader(out.read_text().splitlines()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 31


def test_cli_rag_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "triplets.csv"
    rc = main(["rag", "generate", str(CORPUS), str(out), "--strategy", "all", "--k", "1",
               "--store", str(tmp_path / "store")])
    assert rc == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 30 + 30 + 30
    assert "wrote 90 triplets" in capsys.readouterr().out
    # the kept store builds a complete JASPER dataset
    from jasper.validation import validate

    rc = main(["build", str(tmp_path / "ds"), "--from-chroma", str(tmp_path / "store"),
               "--neg", "4", "--clusters", "3", "--no-progress"])
    assert rc == 0
    assert validate(tmp_path / "ds", deep=True).n_pairs == 30
    rc = main(["build", str(tmp_path / "cl"), "--from-chroma", str(tmp_path / "store"),
               "--kind", "cluster-labeled", "--clusters", "3", "--no-progress"])
    assert rc == 0
    assert "wrote cluster-labeled dataset" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "cl"), "--deep"]) == 0
