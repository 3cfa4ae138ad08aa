"""``jasper validate`` (not deep) of a pt, hdf5 or memmap-sqlite dataset imports no torch: the
rules run on numpy views of the stored arrays (:meth:`jasper.backend.StoreReader.map_numpy`,
:meth:`~jasper.backend.StoreReader.read_numpy`). Every rule family still fires there, with the
typed error the tensor path (:func:`jasper.validation.check_arrays`) gives for the same data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from jasper.errors import JasperError
from jasper.store import open_store, write_store
from jasper.testing.conformance import child_env
from jasper.validation import check_arrays

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(mod) is None,
                                             reason=f"{mod} is not installed"))
    for b, mod in (("pt", "jasper_pt"), ("hdf5", "jasper_hdf5"),
                   ("memmap-sqlite", "jasper_memmap_sqlite"))
]

#: Runs validate in a fresh interpreter and reports its outcome and whether torch was imported.
_CHILD = """
import json, sys
from jasper.validation import validate
try:
    r = validate(sys.argv[1])
    out = {"findings": sorted([f.array, f.rule, f.first_row, f.message] for f in r.findings)}
except Exception as e:
    out = {"error": type(e).__name__, "array": getattr(e, "array", None),
           "row": getattr(e, "row", None), "rule": getattr(e, "rule", None), "message": str(e)}
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def _validate_in_child(path: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                          text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


Arrays = dict[str, torch.Tensor]


def _set(name: str, index: tuple[int, ...] | int, value: float) -> Callable[[Arrays], None]:
    return lambda a: a[name].__setitem__(index, value)


def _overlap(a: Arrays) -> None:
    a["val_idx"][4] = a["train_idx"][0]


def _repeat(a: Arrays) -> None:
    a["test_idx"][3] = a["test_idx"][1]


def _own_source(a: Arrays) -> None:
    a["hard_negatives"][12, 0] = a["pair_index"][12, 1]


# one case per rule family of check_arrays: references in range (a two-table column and a
# one-table array), non-negative labels, finite values (a 2-D embedding table, which hdf5
# streams, and a 1-D pair array), CSR offsets, disjoint splits, and the value rules (findings)
BROKEN = {
    "index in range (pair_index)": _set("pair_index", (9, 1), 10**6),
    "index in range (hard_negatives)": _set("hard_negatives", (15, 3), 10**6),
    "non-negative": _set("negative_tiers", (2, 1), -3),
    "finite (embedding table)": _set("question_embs", (4, 5), float("nan")),
    "finite (pair array)": _set("pair_relevance", 21, float("inf")),
    "csr offsets non-decreasing": _set("pair_keyword_offsets", 10, 0),
    "disjoint splits (two splits)": _overlap,
    "disjoint splits (one split)": _repeat,
    "value rules": lambda a: (_own_source(a), a["pair_relevance"].__setitem__(8, 1.5),
                              a["centroid_distances"].__setitem__(30, -0.25)),
}


@pytest.fixture(scope="module")
def base(small_dataset: Path) -> tuple[Arrays, object]:
    with open_store(small_dataset) as r:
        return {n: r.read(n) for n in r.array_names()}, r.manifest


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_validate_of_a_valid_dataset_imports_no_torch(
        backend: str, base: tuple[Arrays, object], tmp_path: Path) -> None:
    arrays, manifest = base
    path = write_store(tmp_path / "ds", arrays, manifest, backend=backend)  # type: ignore[arg-type]
    code = ("import sys\nfrom jasper.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\nprint('rc', rc)\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    proc = subprocess.run([sys.executable, "-c", code, "validate", str(path)], capture_output=True,
                          text=True, timeout=300, env=child_env())
    lines = proc.stdout.strip().splitlines()
    assert lines[-2:] == ["rc 0", "NO-TORCH"], (proc.stdout, proc.stderr[-2000:])
    assert "validation passed for 2,000 pairs" in proc.stdout


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_rule_family_fires_without_torch(backend: str, case: str,
                                               base: tuple[Arrays, object], tmp_path: Path) -> None:
    arrays, manifest = base
    broken = {k: v.clone() for k, v in arrays.items()}
    BROKEN[case](broken)
    path = write_store(tmp_path / "ds", broken, manifest, backend=backend)  # type: ignore[arg-type]
    got = _validate_in_child(path)
    assert got.pop("torch") is False, f"validate of {backend} imported torch"
    # what the tensor path says of the same arrays
    try:
        findings = check_arrays(broken, manifest, path=path, warn=False)  # type: ignore[arg-type]
    except JasperError as e:
        assert got == {"error": type(e).__name__, "array": e.array, "row": e.row,
                       "rule": e.rule, "message": str(e)}
    else:
        assert findings, f"case {case!r} breaks no rule"
        assert got == {"findings": sorted([f.array, f.rule, f.first_row, f.message]
                                          for f in findings)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_checksum_record_fails_without_torch(
        backend: str, base: tuple[Arrays, object], tmp_path: Path) -> None:
    arrays, manifest = base
    path = write_store(tmp_path / "ds", arrays, manifest, backend=backend)  # type: ignore[arg-type]
    config = path / "config.json"
    data = json.loads(config.read_text())
    data["arrays"]["source_embs"].pop("checksum")
    config.write_text(json.dumps(data))
    got = _validate_in_child(path)
    assert got["torch"] is False
    assert got["error"] in {"ChecksumError", "ManifestError"}, got


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_tables_are_checked_from_their_bit_patterns(backend: str, tmp_path: Path) -> None:
    """numpy has no bfloat16: the torch-free path checks the stored uint16 bit patterns and
    names the same row and value as the tensor path."""
    from jasper.synth import SynthConfig, write_synthetic

    src = write_synthetic(tmp_path / "src", SynthConfig(n_pairs=300, embedding_dim=16, n_neg=4,
                                                        n_clusters=4, seed=3, dtype="bfloat16"),
                          backend="pt")
    with open_store(src) as r:
        arrays, manifest = {n: r.read(n) for n in r.array_names()}, r.manifest
    assert arrays["source_embs"].dtype == torch.bfloat16
    arrays["source_embs"][17, 3] = float("-inf")
    path = write_store(tmp_path / "ds", arrays, manifest, backend=backend)
    got = _validate_in_child(path)
    assert got.pop("torch") is False
    with pytest.raises(JasperError) as e:
        check_arrays(arrays, manifest, path=path, warn=False)
    assert "source_embs[17, 3] = -inf is not finite" in str(e.value)
    assert got == {"error": type(e.value).__name__, "array": e.value.array, "row": e.value.row,
                   "rule": e.value.rule, "message": str(e.value)}
