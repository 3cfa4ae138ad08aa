"""jasper.build: a complete dataset from a user's own embeddings and pairs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper.build import BuildConfig, BuildError, build_arrays, build_dataset, load_ragged
from jasper.cli import main
from jasper.errors import FormatError, IntegrityError, ShapeError
from jasper.validation import check_arrays, validate

D = 16


def user_data(n_q: int = 120, n_s: int = 200, n_p: int = 400, seed: int = 0,
              ) -> dict[str, np.ndarray]:
    """Clustered embeddings in the shape a user has them: not unit norm, float32."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((5, D)).astype(np.float32) * 3
    qc, sc = rng.integers(0, 5, n_q), rng.integers(0, 5, n_s)
    q = (centers[qc] + rng.standard_normal((n_q, D))).astype(np.float32)
    s = (centers[sc] + rng.standard_normal((n_s, D))).astype(np.float32)
    pq = rng.integers(0, n_q, n_p)
    # each question's source from its own cluster
    by_cluster = [np.flatnonzero(sc == c) for c in range(5)]
    ps = np.array([rng.choice(by_cluster[qc[i]]) for i in pq])
    return {"questions": q, "sources": s, "pairs": np.stack([pq, ps], axis=1),
            "relevance": rng.random(n_p).astype(np.float32)}


def materialize(arrays: dict) -> dict[str, torch.Tensor]:
    return {n: s.materialize().clone() for n, s in arrays.items()}


def test_build_from_numpy_derives_every_missing_array() -> None:
    data = user_data()
    arrays, manifest = build_arrays(data["questions"], data["sources"], data["pairs"],
                                    config=BuildConfig(n_neg=4, n_clusters=5, seed=1))
    a = materialize(arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a data-quality finding
        assert check_arrays(a, manifest) == []  # type: ignore[arg-type]
    derived = set(manifest.extra["build"]["derived"])
    assert {"centroid_embs", "pair_cluster_id", "hard_negatives", "negative_tiers",
            "steering_residual", "train_idx", "pair_relevance"} <= derived
    assert manifest.extra["build"]["kmeans"] == "kmeans"
    assert manifest.n_clusters == 5 and manifest.n_neg == 4 and manifest.embedding_dim == D
    # the tables are the user's, bit for bit
    assert torch.equal(a["question_embs"], torch.from_numpy(data["questions"]))
    # k-means found the five planted clusters: sources of one planted cluster share a label
    s_norm = torch.nn.functional.normalize(torch.from_numpy(data["sources"]), dim=1)
    labels = (s_norm @ a["centroid_embs"].T).argmax(1)
    assert len(labels.unique()) == 5
    # mined negatives: never the positive, distinct, harder than random
    neg, pos = a["hard_negatives"], a["pair_index"][:, 1]
    assert not (neg == pos[:, None]).any()
    srt, _ = neg.sort(dim=1)
    assert not (srt[:, 1:] == srt[:, :-1]).any()
    se = s_norm[pos]
    neg_sim = torch.einsum("bd,bkd->bk", se, s_norm[neg]).mean()
    rand = torch.randint(0, len(s_norm), (len(pos),), generator=torch.Generator().manual_seed(0))
    rand_sim = (se * s_norm[rand]).sum(1).mean()
    assert neg_sim > rand_sim + 0.2
    assert set(a["negative_tiers"].unique().tolist()) == {1, 2, 3, 4}
    # no keywords given: the keyword variant steers by the centroid
    assert a["keyword_embs"].shape == (0, D)
    assert torch.equal(a["steering_keyword_weighted"], a["steering_centroid"])


def test_splits_are_disjoint_by_question() -> None:
    data = user_data(n_q=300, n_p=1500)
    arrays, _ = build_arrays(data["questions"], data["sources"], data["pairs"],
                             config=BuildConfig(n_neg=2, n_clusters=4))
    a = materialize(arrays)
    q = a["pair_index"][:, 0]
    owners = [set(q[a[f"{s}_idx"]].tolist()) for s in ("train", "val", "test")]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    sizes = [a[f"{s}_idx"].numel() for s in ("train", "val", "test")]
    assert sum(sizes) == 1500
    assert abs(sizes[0] / 1500 - 0.8) < 0.05 and sizes[1] > 0 and sizes[2] > 0


def test_given_pieces_are_kept(tmp_path: Path) -> None:
    data = user_data(n_p=50)
    rng = np.random.default_rng(3)
    kw = rng.standard_normal((7, D)).astype(np.float32)
    pair_kw = [list(rng.integers(0, 7, rng.integers(0, 4))) for _ in range(50)]
    neg = rng.integers(0, 200, (50, 3))
    neg[neg == data["pairs"][:, 1:]] = (neg[neg == data["pairs"][:, 1:]] + 1) % 200
    clusters = rng.integers(0, 3, 50)
    arrays, m = build_arrays(data["questions"], data["sources"], data["pairs"],
                             relevance=data["relevance"], cluster_ids=clusters, keywords=kw,
                             pair_keywords=pair_kw, hard_negatives=neg)
    a = materialize(arrays)
    assert check_arrays(a, m) == []  # type: ignore[arg-type]
    assert torch.equal(a["hard_negatives"], torch.from_numpy(neg))
    assert torch.equal(a["pair_cluster_id"], torch.from_numpy(clusters))
    assert torch.equal(a["pair_relevance"], torch.from_numpy(data["relevance"]))
    offsets, values = load_ragged(pair_kw)
    assert torch.equal(a["pair_keyword_offsets"], torch.from_numpy(offsets))
    assert torch.equal(a["pair_keyword_ids"], torch.from_numpy(values))
    assert m.n_clusters == 3 and m.n_neg == 3
    assert "centroid_embs" in m.extra["build"]["derived"]
    # pairs with keywords steer by them, pairs without by the centroid
    has_kw = torch.from_numpy(np.diff(offsets) > 0)
    same = (a["steering_keyword_weighted"] == a["steering_centroid"]).all(1)
    assert same[~has_kw].all() and not same[has_kw].any()


def test_build_from_files_validates_deep_and_trains(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jasper.loader import create_loader

    data = user_data()
    np.save(tmp_path / "q.npy", data["questions"])
    torch.save(torch.from_numpy(data["sources"]), tmp_path / "s.pt")
    pq.write_table(pa.table({"question": data["pairs"][:, 0], "source": data["pairs"][:, 1],
                             "relevance": data["relevance"]}), tmp_path / "pairs.parquet")
    out = tmp_path / "built"
    rc = main(["build", str(out), "--questions", str(tmp_path / "q.npy"), "--sources",
               str(tmp_path / "s.pt"), "--pairs", str(tmp_path / "pairs.parquet"), "--neg", "4",
               "--clusters", "5", "--backend", "pt", "--no-progress"])
    assert rc == 0
    report = validate(out, deep=True)
    assert report.ok and report.n_pairs == 400
    loader = create_loader(out, "train", batch_size=32, pin_memory=False)
    batch = next(iter(loader))
    assert batch["question_emb"].shape == (32, D)
    # one step of a linear model on the built data: finite loss, gradients flow
    model = torch.nn.Linear(2 * D, D)
    pred = model(torch.cat([batch["question_emb"], batch["steering"]], dim=1))
    loss = torch.nn.functional.mse_loss(pred, batch["target_source_emb"])
    loss.backward()
    assert torch.isfinite(loss) and model.weight.grad is not None


def test_parquet_embedding_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = user_data(n_p=60)
    table = pa.table({"emb": pa.FixedSizeListArray.from_arrays(
        pa.array(data["questions"].reshape(-1)), D)})
    pq.write_table(table, tmp_path / "q.parquet")
    path = build_dataset(tmp_path / "ds", f"{tmp_path / 'q.parquet'}:emb", data["sources"],
                         data["pairs"], backend="pt", config=BuildConfig(n_neg=2, n_clusters=3))
    from jasper.store import open_store

    with open_store(path) as r:
        assert torch.equal(r.read("question_embs"), torch.from_numpy(data["questions"]))


def test_streaming_build_matches_in_memory(tmp_path: Path) -> None:
    data = user_data(n_p=5000)
    np.save(tmp_path / "s.npy", data["sources"])
    cfg = BuildConfig(n_neg=3, n_clusters=4, seed=2)
    a, _ = build_arrays(data["questions"], data["sources"], data["pairs"], config=cfg)
    streamed_cfg = BuildConfig(n_neg=3, n_clusters=4, seed=2, memory_limit=0)
    b, _ = build_arrays(data["questions"], str(tmp_path / "s.npy"), data["pairs"],
                        config=streamed_cfg, workdir=tmp_path / "scratch")
    assert (tmp_path / "scratch" / "steering_residual.npy").exists()
    for name, tensor in materialize(a).items():
        assert torch.equal(tensor, materialize(b)[name]), name


def test_bad_inputs_are_typed_errors(tmp_path: Path) -> None:
    data = user_data(n_p=20)
    bad = data["pairs"].copy()
    bad[7, 1] = 200
    with pytest.raises(IntegrityError, match=r"pair_index\[:, 1\]\[7\] = 200 but source_embs has 200"):
        build_arrays(data["questions"], data["sources"], bad)
    with pytest.raises(ShapeError, match="source_embs has 8 columns but question_embs has 16"):
        build_arrays(data["questions"], data["sources"][:, :8], data["pairs"])
    with pytest.raises(ShapeError, match="pair_relevance has 3 rows but pair_index has 20"):
        build_arrays(data["questions"], data["sources"], data["pairs"], relevance=np.ones(3))
    with pytest.raises(FormatError, match="not found"):
        build_arrays(tmp_path / "nope.npy", data["sources"], data["pairs"])
    with pytest.raises(BuildError, match="without hard_negatives"):
        build_arrays(data["questions"], data["sources"], data["pairs"],
                     negative_tiers=np.ones((20, 2), dtype=np.int64))
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(FormatError, match="unsupported input format"):
        build_arrays(tmp_path / "x.csv", data["sources"], data["pairs"])
    # nothing is left at the target of a failed build
    with pytest.raises(IntegrityError):
        build_dataset(tmp_path / "out", data["questions"], data["sources"], bad, backend="pt")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_write_store_reports_everything_missing_at_once(tmp_path: Path) -> None:
    from jasper.store import write_store

    with pytest.raises(ShapeError) as info:
        write_store(tmp_path / "x", {"question_embs": torch.zeros(2, 4)}, {}, backend="pt")
    msg = str(info.value)
    for name in ("embedding_dim", "n_neg", "source_embs", "hard_negatives", "test_idx"):
        assert name in msg
    assert "question_embs" not in msg.split("without arrays:")[1]
    assert "build_arrays" in msg and "jasper build" in msg


def test_cli_build_usage_error_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = user_data(n_p=20)
    np.save(tmp_path / "q.npy", data["questions"])
    np.save(tmp_path / "s.npy", data["sources"][:, :4])
    np.save(tmp_path / "p.npy", data["pairs"])
    rc = main(["build", str(tmp_path / "o"), "--questions", str(tmp_path / "q.npy"),
               "--sources", str(tmp_path / "s.npy"), "--pairs", str(tmp_path / "p.npy")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "source_embs has 4 columns" in err


def test_sampled_kmeans_streams_from_a_memmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above POINTS_PER_CENTROID * k sources, k-means fits a seeded sample read from the map."""
    import jasper.build as build

    monkeypatch.setattr(build, "POINTS_PER_CENTROID", 10)
    data = user_data(n_s=400)
    np.save(tmp_path / "s.npy", data["sources"])
    arrays, m = build_arrays(data["questions"], str(tmp_path / "s.npy"), data["pairs"],
                             config=BuildConfig(n_neg=2, n_clusters=5))
    assert m.extra["build"]["kmeans"] == "sampled"
    assert check_arrays(materialize(arrays), m) == []  # type: ignore[arg-type]


def test_a_missing_optional_dependency_names_the_distribution_that_installs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``sklearn.cluster`` is installed as ``scikit-learn``; the hint said ``sklearn.cluster``."""
    import sys

    from jasper.build import MissingDependencyError, _need

    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # import of it raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        _need("sklearn.cluster", "clustering")
    msg = str(err.value)
    assert "needs scikit-learn" in msg and "pip install -c constraints.txt scikit-learn;" in msg
    assert "'./packages/jasper-core[build]'" in msg
