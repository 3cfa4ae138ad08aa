"""``jasper info`` of a real dataset imports no torch, for every backend that reads shapes from
its own files (torch is imported only where tensors are made; issue: a user's first hour)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jasper.synth import SynthConfig, write_synthetic
from jasper.testing.conformance import child_env

BACKENDS = ("pt", "hdf5", "memmap-sqlite")

_CODE = ("import sys\nfrom jasper.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
         "except SystemExit as e:\n    rc = e.code\n"
         "print('rc', rc, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CODE, *argv], capture_output=True, text=True,
                          timeout=120, env=child_env())


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_of_a_real_dataset_does_not_import_torch(backend: str, tmp_path: Path) -> None:
    target = tmp_path / backend
    write_synthetic(target, SynthConfig(n_pairs=300, embedding_dim=8),
                           backend=backend)
    for argv in (["info", str(target)], ["info", "--json", str(target)]):
        proc = _run(*argv)
        assert proc.stderr.strip().splitlines()[-1] == "rc 0 NO-TORCH", proc.stderr[-2000:]
        assert "pair_index" in proc.stdout


def test_deep_validate_makes_tensors_and_so_imports_torch(tmp_path: Path) -> None:
    """The counterpart, so that the check above can fail: a deep validation checksums and
    checks every value on tensors, and the child process does report torch when it was imported
    (plain validate is torch-free: tests of jasper-core's test_validate_without_torch.py)."""
    target = tmp_path / "ds"
    write_synthetic(target, SynthConfig(n_pairs=300, embedding_dim=8),
                           backend="hdf5")
    proc = _run("validate", "--deep", str(target))
    assert proc.stderr.strip().splitlines()[-1] == "rc 0 TORCH", proc.stderr[-2000:]
