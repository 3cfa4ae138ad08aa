"""The reliability campaign's quick mode as a CI gate: a small deterministic sample of every case
family (corrupt files, flipped regions, path trust, malicious pickles, kills, full disks,
concurrent writers, readers during a commit, Ctrl-C, the CLI), against every installed backend.

Each (family, backend) group asserts the campaign's goal: no untyped error, no crash, no hang,
no silent-wrong data, no dataset lost, no leftovers, no canary. Groups that fail today are marked
xfail with the issue item that fixes them (``reliability/known.py``); the goal is the same for
them. The fuzz smoke run is in
test_fuzz_smoke.py, a module of its own so that a parallel run gives it a worker of its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the campaign lives at the repository root, not in a package
    sys.path.insert(0, str(ROOT))

FAMILIES = ["corpus", "region", "path-trust", "pickle", "kill", "disk-full",
            "concurrent-writers", "reader-during-commit", "interrupt", "cli"]
#: groups beside the backends: cluster-labeled datasets (one per writable backend, and the
#: original system's dataset.db layout with memmap-sqlite), argument-only CLI cases
EXTRA_GROUPS = {"path-trust": "cluster", "pickle": "cluster", "kill": "cluster", "cli": "cli"}


def _backends() -> list[str]:
    return importlib.import_module("reliability.reference").writable_backends()


def _groups() -> list:
    known = importlib.import_module("reliability.known").KNOWN
    backends = _backends()
    out = []
    for fam in FAMILIES:
        extra = EXTRA_GROUPS.get(fam)
        names = [*backends, extra] if extra else backends
        for b in names:
            k = known.get((fam, b))
            marks = [pytest.mark.xfail(strict=not k.racy, reason=f"{k.item}: {k.reason}")] if k else []
            out.append(pytest.param(fam, b, id=f"{fam}-{b}", marks=marks))
    return out


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("reliability")
    proc = subprocess.run(
        [sys.executable, "-m", "reliability", "--quick", "--quiet", "--json", str(out / "r.json"),
         "--findings", str(out / "findings.md")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert (out / "r.json").exists(), f"the campaign did not finish: {proc.stderr[-3000:]}"
    return json.loads((out / "r.json").read_text())


def _prepare_mark() -> list:
    k = importlib.import_module("reliability.known").KNOWN.get(("prepare", "cluster"))
    return [pytest.mark.xfail(strict=True, reason=f"{k.item}: {k.reason}")] if k else []


@pytest.mark.parametrize("backend", [pytest.param("cluster", marks=_prepare_mark())])
def test_pristine_datasets_write(quick_results: list[dict], backend: str) -> None:
    """Every pristine dataset the cases damage is written by jasper itself without error."""
    bad = [r for r in quick_results if r["family"] == "prepare" and r["outcome"] != "ok"
           and r["backend"] == backend]
    assert not bad, f"{bad[0]['exception']}: {bad[0]['message'][:400]}" if bad else ""


@pytest.mark.parametrize(("family", "backend"), _groups())
def test_quick_campaign_goal(quick_results: list[dict], family: str, backend: str) -> None:
    group = [r for r in quick_results if r["family"] == family and r["backend"] == backend]
    assert group, f"the quick campaign ran no {family} case for {backend}"
    bad = [r for r in group if r["outcome"] not in ("ok", "typed", "undetected")]
    assert not bad, "\n".join(
        f"{r['key']}: {r['outcome']} {r['exception']} [{r['where']}] {r['message'][:300]}"
        for r in bad)


def test_every_family_has_a_quick_sample(quick_results: list[dict]) -> None:
    assert {r["family"] for r in quick_results} - {"prepare"} == set(FAMILIES)
