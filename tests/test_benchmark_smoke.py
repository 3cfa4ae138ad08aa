"""The benchmark suite's smoke mode, inside the normal test session, so a broken benchmark fails CI.

``python benchmarks/run.py --smoke`` runs every benchmark once on a tiny dataset (its own cache in
a temporary directory) and writes the report. Peers that are not installed (tensordict, Hugging
Face datasets) must be skipped with a reason, not fail; without CUDA the GPU benchmarks skip.
Timings are never asserted here: only that every question produced its measurements.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def bench_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _run(bench_tmp: Path, name: str, *args: str, **env_extra: str) -> Path:
    out = bench_tmp / name
    env = dict(os.environ)
    env["JASPER_BENCH_CACHE"] = str(bench_tmp / "cache")  # the runs share their tiny datasets
    env.pop("JASPER_BENCH_CONFIG", None)
    env.pop("JASPER_BENCH_DEVICE", None)
    env.update(env_extra)
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, f"smoke run failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def smoke_run(bench_tmp: Path) -> Path:
    """The whole suite once; the GPU module runs its code on the CPU device, since CI has no GPU
    and a broken GPU benchmark would otherwise surface only on the rare runs that get one."""
    return _run(bench_tmp, "run", JASPER_BENCH_DEVICE="cpu")


def _entries(run: Path) -> list[dict]:
    return json.loads((run / "benchmark.json").read_text())["benchmarks"]


def _kinds(run: Path) -> set[str]:
    return {e["extra_info"]["kind"] for e in _entries(run)}


def test_smoke_writes_every_artifact(smoke_run: Path) -> None:
    for name in ("benchmark.json", "machine.json", "outcomes.json", "run.json", "report.md"):
        assert (smoke_run / name).is_file(), name
    report = (smoke_run / "report.md").read_text()
    for heading in ("## Machine", "## Issue 3's targets", "## 1. Open and preload",
                    "## 2. Memory", "## 3. Serving", "## 4. Ceilings", "## 5. Peers",
                    "## 6. Size on disk"):
        assert heading in report, heading
    assert "n/a" not in report.split("## Issue 3's targets")[1].split("## 1.")[0]
    assert "no CUDA device was available" in report or torch.cuda.is_available()


def test_smoke_nothing_failed(smoke_run: Path) -> None:
    outcomes = json.loads((smoke_run / "outcomes.json").read_text())
    failed = [o["id"] for o in outcomes if o["outcome"] == "failed"]
    assert not failed
    assert any(o["outcome"] == "passed" for o in outcomes)
    for o in outcomes:
        if o["outcome"] == "skipped":
            assert o["reason"], f"{o['id']} skipped without a reason"


def test_smoke_measures_every_question(smoke_run: Path) -> None:
    kinds = _kinds(smoke_run)
    expected = {"size", "raw_read", "store_preload", "dataset_open", "memory", "cpu_raw_gather",
                "jasper_loader", "jasper_getitems", "jasper_inprocess", "peer"}
    assert expected <= kinds, expected - kinds
    questions = {e["extra_info"]["question"] for e in _entries(smoke_run)}
    assert questions >= {1, 2, 3, 4, 5, 6}


def test_smoke_covers_every_installed_backend_and_preset(smoke_run: Path) -> None:
    import jasper

    want = {(name, preset) for name in jasper.list_backends()
            for preset in jasper.get_backend(name).write_presets}
    got = {(e["extra_info"]["backend"], e["extra_info"]["preset"])
           for e in _entries(smoke_run) if e["extra_info"]["kind"] == "size"}
    assert got == want
    mapped = {e["extra_info"]["backend"] for e in _entries(smoke_run)
              if e["extra_info"]["kind"] == "jasper_loader" and e["extra_info"]["mapped"]}
    assert mapped == {n for n in jasper.list_backends()
                      if jasper.get_backend(n).capabilities.mmap}


def test_smoke_peers_run_or_skip_with_reason(smoke_run: Path) -> None:
    peers = {e["extra_info"]["peer"] for e in _entries(smoke_run)
             if e["extra_info"]["kind"] == "peer"}
    assert "reference" in peers
    outcomes = json.loads((smoke_run / "outcomes.json").read_text())
    for peer, module in (("tensordict", "tensordict"), ("hf_datasets", "datasets")):
        if _has(module):
            assert peer in peers
        else:
            skipped = [o for o in outcomes if f"-{peer}-" in o["id"]]
            assert skipped and all(o["outcome"] == "skipped" and module in o["reason"]
                                   for o in skipped)
    # Mosaic streaming runs only in the environment `nox -s benchmark` builds for it
    if os.environ.get("JASPER_BENCH_MOSAIC_PYTHON"):
        assert "mosaic" in peers
    else:
        skipped = [o for o in outcomes if "-mosaic-" in o["id"]]
        assert skipped and all(o["outcome"] == "skipped"
                               and "JASPER_BENCH_MOSAIC_PYTHON" in o["reason"] for o in skipped)


def test_gpu_part_code_runs_on_the_cpu_device(smoke_run: Path) -> None:
    outcomes = json.loads((smoke_run / "outcomes.json").read_text())
    gpu = [o for o in outcomes if "bench_gpu.py" in o["id"]]
    assert gpu and all(o["outcome"] == "passed" for o in gpu), [
        (o["id"], o["reason"][-300:]) for o in gpu if o["outcome"] != "passed"]
    assert {"gpu_pinned_h2d", "gpu_index_select", "gpu_loader", "gpu_raw_preload",
            "gpu_dataset_preload"} <= _kinds(smoke_run)
    staged = {e["extra_info"]["staged"] for e in _entries(smoke_run)
              if e["extra_info"]["kind"] == "gpu_loader"}
    assert staged == {False, True}
    report = (smoke_run / "report.md").read_text()
    assert "a check of their code, not GPU figures" in report
    assert "of the on-device index_select loop" in report


def test_smoke_cold_reads_start_cold(smoke_run: Path) -> None:
    cold = [e["extra_info"]["resident_before"] for e in _entries(smoke_run)
            if e["extra_info"]["kind"] == "raw_read" and e["extra_info"]["temp"] == "cold"]
    assert cold
    known = [x for x in cold if x is not None and x == x]  # mincore may be unavailable: nan
    assert all(x < 0.05 for x in known), known


def test_smoke_charts(smoke_run: Path) -> None:
    pngs = sorted(smoke_run.glob("*.png"))
    report = (smoke_run / "report.md").read_text()
    if _has("matplotlib"):
        assert {p.stem for p in pngs} >= {"serving", "peers", "open_preload", "memory",
                                          "size_on_disk"}
        for p in pngs:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({p.name})" in report
    else:
        assert not pngs
        assert "matplotlib is not installed" in report


def _smoke_results(benchlib, run: Path):
    r = benchlib.report
    raw = json.loads((run / "benchmark.json").read_text())
    return r.Results(raw["benchmarks"]), json.loads((run / "run.json").read_text())


def test_smoke_charts_say_smoke_on_the_image(benchlib, smoke_run: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    results, run = _smoke_results(benchlib, smoke_run)
    assert run["mode"] == "smoke"
    names = []
    for name, fig in benchlib.report.chart_figures(results, run):
        texts = [t.get_text() for t in fig.texts]
        plt.close(fig)
        assert any("SMOKE RUN" in t for t in texts), (name, texts)
        names.append(name)
    assert "serving" in names and "size_on_disk" in names
    run["mode"] = "default"  # the same results drawn as a real run carry no smoke mark
    for name, fig in benchlib.report.chart_figures(results, run):
        texts = [t.get_text() for t in fig.texts]
        plt.close(fig)
        assert not any("SMOKE" in t for t in texts), name


def test_size_chart_labels_are_never_rounded_to_zero(benchlib, smoke_run: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    results, run = _smoke_results(benchlib, smoke_run)
    fig = dict(benchlib.report.chart_figures(results, run))["size_on_disk"]
    labels = [t.get_text().strip() for ax in fig.axes for t in ax.texts]
    plt.close(fig)
    assert labels and all(not label.startswith("0 ") for label in labels), labels
    assert all(float(label.split()[0].replace(",", "")) > 0 for label in labels), labels


def test_serving_chart_groups_bars_by_backend_and_path(benchlib, smoke_run: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    results, run = _smoke_results(benchlib, smoke_run)
    fig = dict(benchlib.report.chart_figures(results, run))["serving"]
    ax = fig.axes[0]
    groups = [t.get_text() for t in ax.texts if t.get_weight() == "bold"]
    assert ax.get_xscale() == "linear"
    plt.close(fig)
    backends = {e["extra_info"]["backend"] for e in results.entries
                if e["extra_info"]["kind"] == "jasper_getitems"}
    assert {g.split(",")[0] for g in groups} == backends
    assert len(groups) == len(set(groups))


def test_targets_separate_missed_from_not_applicable(benchlib, smoke_run: Path) -> None:
    r = benchlib.report
    results, run = _smoke_results(benchlib, smoke_run)
    machine = json.loads((smoke_run / "machine.json").read_text())
    text = r._headline(results, machine, run)
    if not torch.cuda.is_available():
        assert f"({r.NOT_APPLICABLE}" in text  # the GPU target, on the CPU device or no GPU
        for line in text.splitlines():
            if "index_select loop" in line:
                assert "missed" not in line and "met," not in line, line
    summary = text.splitlines()[0]
    assert "met" in summary and "missed" in summary and r.NOT_APPLICABLE in summary


def test_report_rebuilds_from_results(smoke_run: Path, tmp_path: Path) -> None:
    for name in ("benchmark.json", "machine.json", "outcomes.json", "run.json"):
        (tmp_path / name).write_bytes((smoke_run / name).read_bytes())
    done = subprocess.run([sys.executable, str(BENCH / "run.py"), "--report", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.md").read_text() == (smoke_run / "report.md").read_text()


# --- pieces of the suite ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchlib():
    sys.path.insert(0, str(BENCH))
    try:
        import benchlib.contenders
        import benchlib.measure
        import benchlib.report

        yield benchlib
    finally:
        sys.path.remove(str(BENCH))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), b=st.integers(1, 20), k=st.integers(1, 10))
def test_index_stream_is_whole_shuffled_epochs(benchlib, n: int, b: int, k: int) -> None:
    s = benchlib.contenders.index_stream(n, b, k, seed=3)
    assert s.shape == (k, b)
    flat = s.reshape(-1)
    for start in range(0, flat.numel() - n + 1, n):
        assert torch.equal(flat[start : start + n].sort().values, torch.arange(n))
    assert torch.equal(s, benchlib.contenders.index_stream(n, b, k, seed=3))


def test_drop_pages_evicts_the_page_cache(benchlib, tmp_path: Path) -> None:
    m = benchlib.measure
    f = tmp_path / "d" / "x.bin"
    f.parent.mkdir()
    f.write_bytes(os.urandom(4 << 20))
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())
        fh.read()
    before = m.resident_fraction(f.parent)
    if before != before:
        pytest.skip("mincore is not available here")
    assert before > 0.9
    assert m.drop_pages(f.parent) == 1
    assert m.resident_fraction(f.parent) < 0.05


def test_report_targets_compare_the_right_way(benchlib) -> None:
    r = benchlib.report
    assert r.target_verdict(0.6, r.TARGET_CEILING) == "met"
    assert r.target_verdict(0.4, r.TARGET_CEILING) == "missed"
    assert r.target_verdict(1.05, r.TARGET_PSS, higher=False) == "met"
    assert r.target_verdict(1.2, r.TARGET_PSS, higher=False) == "missed"
    assert r.target_verdict(float("nan"), r.TARGET_PSS) == "not measured"
