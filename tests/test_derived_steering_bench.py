"""``benchmarks/derived_steering.py`` runs and its byte arithmetic holds (timings are reported,
never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_derived_steering_benchmark_runs(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("derived_bench",
                                                  ROOT / "benchmarks" / "derived_steering.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--pairs", "800", "--dims", "16", "24", "--batch", "64", "--batches", "2",
                       "--rounds", "1", "--json", str(out), "--workdir",
                       str(tmp_path / "data")]) == 0
    doc = json.loads(out.read_text())
    for r in doc["results"]:
        stored, derived = r["stored"], r["derived"]
        # exactly the three float32 steering rows per pair are gone (no exceptions)
        saved = (stored["pair_bytes_per_pair"] - derived["pair_bytes_per_pair"]) * r["pairs"]
        assert round(saved) == 3 * r["dim"] * 4 * r["pairs"]
        assert derived["ram_bytes_per_pair"] < stored["ram_bytes_per_pair"]
        assert derived["max_pairs_16GB_pair_arrays"] > stored["max_pairs_16GB_pair_arrays"]
        # keeping the keyword variant stored keeps exactly its float32 row per pair
        kept = r["derived, keyword stored"]
        extra = (kept["pair_bytes_per_pair"] - derived["pair_bytes_per_pair"]) * r["pairs"]
        assert round(extra) == r["dim"] * 4 * r["pairs"]
        assert set(r["serving"]) == {"schedule@40", "centroid", "keyword", "residual"}
        for v in r["serving"].values():
            assert v["stored"] > 0 and v["stored_cpu"] > 0
            for kind in ("derived", "derived, keyword stored"):
                assert v[kind] > 0 and v[f"{kind} ratio"] > 0 and v[f"{kind} ratio_cpu"] > 0
